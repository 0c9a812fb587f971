//! Every rule of docs/lifecycle.md, as rows: a view of the store, an event, the time, and
//! what the machine must write and do. The clock is the row's `now`; nothing here sleeps or does I/O.

use super::*;

const S: u64 = 1000;
const BOOT: Duration = Duration::from_secs(120);
const IDLE: Duration = Duration::from_secs(900);
fn rules() -> Rules {
    Rules {
        idle_timeout: Some(IDLE),
        ..never_stop()
    }
}

fn never_stop() -> Rules {
    Rules {
        boot_timeout: BOOT,
        ..Rules::default()
    }
}

fn vm() -> SocketAddr {
    "192.0.2.7:22".parse().unwrap()
}

fn other_vm() -> SocketAddr {
    "192.0.2.8:22".parse().unwrap()
}

fn me() -> Holder {
    Holder {
        host: None,
        pid: 1,
        claim: "1.0".into(),
    }
}

fn them() -> Holder {
    Holder {
        host: Some("b".into()),
        pid: 2,
        claim: "2.0".into(),
    }
}

/// A start held by `holder`, of a VM that was at `was` before (if it ran).
fn starting(holder: Holder, was: Option<SocketAddr>) -> Phase {
    Phase::Starting { holder, was }
}

/// The VM at `vm()` booting, its start's answer shared with logins until `until`.
fn booting(until: u64) -> Phase {
    Phase::Booting { vm: vm(), until }
}

/// A view of `phase`, entered at `since`, after `starts` starts, with `sessions` live sessions and the
/// holder (if any) alive or not.
fn view(phase: Phase, since: u64, sessions: usize, holder_alive: bool) -> View {
    View {
        record: Record {
            phase,
            since,
            ..Record::default()
        },
        sessions: Some(sessions),
        holder_alive,
        revision: 0,
    }
}

fn with_start(mut view: View, ok: bool, detail: &str) -> View {
    view.record.starts = 1;
    view.record.last_start = Some(CallEnd {
        at: view.record.since,
        ok,
        detail: detail.into(),
        ms: 5,
    });
    view
}

/// What a row expects: the phase written (`None`: nothing written), and the action.
struct Row {
    rule: &'static str,
    view: View,
    event: Event<'static>,
    now: u64,
    rules: Rules,
    writes: Option<Phase>,
    action: Action,
}

fn check(rows: Vec<Row>) {
    for row in rows {
        let step = step(&row.view, row.event, row.now, &row.rules);
        let written = match &step.write {
            Write::Keep => None,
            Write::Put(record) => Some(record.phase.clone()),
            Write::Forget => Some(Phase::New),
        };
        assert_eq!(written, row.writes, "{}: written", row.rule);
        assert_eq!(step.action, row.action, "{}: action", row.rule);
        if let Write::Put(record) = &step.write
            && std::mem::discriminant(&record.phase)
                != std::mem::discriminant(&row.view.record.phase)
        {
            assert_eq!(
                record.since, row.now,
                "{}: a new phase begins now",
                row.rule
            );
        }
    }
}

// Leaked for the 'static events of the table; a test process is short-lived.
fn me_ref() -> &'static Holder {
    Box::leak(Box::new(me()))
}

fn login() -> Event<'static> {
    Event::Login {
        me: me_ref(),
        starts_seen: 0,
    }
}

#[test]
fn starts_made_without_the_store_are_learnt_when_it_is_back() {
    check(vec![
        Row {
            rule: "a VM the store believes stopped runs: up, to be stopped once idle",
            view: view(Phase::Stopped, 10 * S, 0, false),
            event: Event::Unrecorded { vm: vm() },
            now: 500 * S,
            rules: rules(),
            writes: Some(Phase::Up { vm: vm() }),
            action: Action::Nothing,
        },
        Row {
            rule: "a VM the store knows runs elsewhere now: its new address",
            view: view(Phase::Idle { vm: other_vm() }, 10 * S, 0, false),
            event: Event::Unrecorded { vm: vm() },
            now: 500 * S,
            rules: rules(),
            writes: Some(Phase::Idle { vm: vm() }),
            action: Action::Nothing,
        },
        Row {
            rule: "a call in flight is left to finish",
            view: view(
                Phase::Stopping {
                    holder: them(),
                    vm: vm(),
                },
                10 * S,
                0,
                true,
            ),
            event: Event::Unrecorded { vm: vm() },
            now: 500 * S,
            rules: rules(),
            writes: None,
            action: Action::Nothing,
        },
    ]);
}

#[test]
fn vms_that_have_not_run_for_a_day_are_forgotten() {
    let day = millis(FORGET_AFTER);
    check(vec![
        Row {
            rule: "stopped for more than a day: forgotten",
            view: view(Phase::Stopped, 10 * S, 0, false),
            event: Event::Tick { me: me_ref() },
            now: 10 * S + day + 1,
            rules: rules(),
            writes: Some(Phase::New),
            action: Action::Nothing,
        },
        Row {
            rule: "stopped for less: kept",
            view: view(Phase::Stopped, 10 * S, 0, false),
            event: Event::Tick { me: me_ref() },
            now: 10 * S + day,
            rules: rules(),
            writes: None,
            action: Action::Nothing,
        },
        Row {
            rule: "a VM that runs is never forgotten, however long",
            view: view(Phase::Idle { vm: vm() }, 10 * S, 0, false),
            event: Event::Tick { me: me_ref() },
            now: 10 * S + 2 * day,
            rules: never_stop(),
            writes: None,
            action: Action::Nothing,
        },
    ]);
}

#[test]
fn operators_read_interrupted_calls_apart() {
    let theirs = starting(them(), None);
    assert_eq!(view(theirs.clone(), 0, 0, true).shown(), Shown::Starting);
    assert_eq!(view(theirs, 0, 0, false).shown(), Shown::Interrupted);
    assert_eq!(view(Phase::New, 0, 0, false).shown(), Shown::New);
    assert_eq!(
        view(Phase::Idle { vm: vm() }, 0, 0, false).shown(),
        Shown::Idle
    );
}

#[test]
fn records_round_trip_through_json() {
    let record = Record {
        phase: Phase::Stopping {
            holder: them(),
            vm: vm(),
        },
        since: 5,
        ..Record::default()
    };
    let text = serde_json::to_string(&record).unwrap();
    assert_eq!(serde_json::from_str::<Record>(&text).unwrap(), record);
    assert_eq!(
        serde_json::from_str::<Record>("{}").unwrap(),
        Record::default()
    );
}

#[test]
fn stop_calls_are_counted_once_and_start_answers_recorded() {
    let stopping = view(
        Phase::Stopping {
            holder: me(),
            vm: vm(),
        },
        0,
        0,
        true,
    );
    let step = step(
        &stopping,
        Event::StopDone {
            me: &me(),
            result: Ok(()),
            ms: 7,
        },
        9,
        &rules(),
    );
    let Write::Put(record) = step.write else {
        panic!("a stop is recorded")
    };
    assert_eq!(record.stops, 1);
    assert_eq!(record.last_stop.map(|c| (c.ok, c.ms)), Some((true, 7)));
}

#[test]
fn a_run_begins_with_its_first_start_and_ends_with_its_stop() {
    let started = |was, started| {
        let view = View {
            record: Record {
                phase: starting(me(), was),
                started,
                ..Record::default()
            },
            sessions: Some(1),
            holder_alive: true,
            revision: 0,
        };
        let event = Event::Started {
            me: &me(),
            answer: Ok(vm()),
            ms: 1,
        };
        match step(&view, event, 50 * S, &rules()).write {
            Write::Put(record) => record.started,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(started(None, None), Some(50 * S), "a new run");
    assert_eq!(
        started(Some(vm()), Some(10 * S)),
        Some(10 * S),
        "a start of a VM that runs is the same run"
    );
}

mod idle;
mod start;
