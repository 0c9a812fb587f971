//! The idle stop's rules: when it comes, what holds it (sessions, keep-warm windows, min_run_time), calls in
//! flight and processes or hosts that die, and the start ahead of logins.

use super::*;

#[test]
fn the_idle_stop() {
    let up = Phase::Up { vm: vm() };
    let idle = Phase::Idle { vm: vm() };
    check(vec![
        Row {
            rule: "no stop while any session is open: a session that ends is not the last",
            view: view(up.clone(), 10 * S, 1, false),
            event: Event::Left,
            now: 20 * S,
            rules: rules(),
            writes: None,
            action: Action::Nothing,
        },
        Row {
            rule: "the idle clock starts at the last disconnect",
            view: view(up.clone(), 10 * S, 0, false),
            event: Event::Left,
            now: 20 * S,
            rules: rules(),
            writes: Some(idle.clone()),
            action: Action::WaitUntil(920 * S),
        },
        Row {
            rule: "and again at the last disconnect after a login that found it idle",
            view: view(idle.clone(), 10 * S, 0, false),
            event: Event::Left,
            now: 500 * S,
            rules: rules(),
            writes: Some(idle.clone()),
            action: Action::WaitUntil(1400 * S),
        },
        Row {
            rule: "not before idle_timeout has passed",
            view: view(idle.clone(), 20 * S, 0, false),
            event: Event::Tick { me: me_ref() },
            now: 919 * S,
            rules: rules(),
            writes: None,
            action: Action::WaitUntil(920 * S),
        },
        Row {
            rule: "then one stop call, by whoever holds it",
            view: view(idle.clone(), 20 * S, 0, false),
            event: Event::Tick { me: me_ref() },
            now: 920 * S,
            rules: rules(),
            writes: Some(Phase::Stopping {
                holder: me(),
                vm: vm(),
            }),
            action: Action::CallStop(vm()),
        },
        Row {
            rule: "a session found when the time comes keeps the VM (a login that raced the idle record)",
            view: view(idle.clone(), 20 * S, 1, false),
            event: Event::Tick { me: me_ref() },
            now: 920 * S,
            rules: rules(),
            writes: Some(up.clone()),
            action: Action::Nothing,
        },
        Row {
            rule: "a login during the idle wait cancels the stop",
            view: view(idle.clone(), 20 * S, 1, false),
            event: Event::Login {
                me: me_ref(),
                starts_seen: 1,
            },
            now: 400 * S,
            rules: rules(),
            writes: Some(up.clone()),
            action: Action::Warm(vm()),
        },
        Row {
            rule: "without a stop API nothing is ever stopped",
            view: view(idle.clone(), 20 * S, 0, false),
            event: Event::Tick { me: me_ref() },
            now: 100_000 * S,
            rules: never_stop(),
            writes: None,
            action: Action::Nothing,
        },
        Row {
            rule: "without a stop API the last logout starts no idle wait",
            view: view(up.clone(), 10 * S, 0, false),
            event: Event::Left,
            now: 20 * S,
            rules: never_stop(),
            writes: Some(idle.clone()),
            action: Action::Nothing,
        },
    ]);
}

#[test]
fn stops_in_flight_and_their_end() {
    let stopping = |holder| Phase::Stopping { holder, vm: vm() };
    check(vec![
        Row {
            rule: "a login while the stop call is in flight waits for it",
            view: view(stopping(them()), 920 * S, 1, true),
            event: login(),
            now: 921 * S,
            rules: rules(),
            writes: None,
            action: Action::Wait,
        },
        Row {
            rule: "then starts the VM again",
            view: view(Phase::Stopped, 922 * S, 1, false),
            event: login(),
            now: 922 * S,
            rules: rules(),
            writes: Some(starting(me(), None)),
            action: Action::CallStart,
        },
        Row {
            rule: "a stop that succeeded: stopped",
            view: view(stopping(me()), 920 * S, 0, true),
            event: Event::StopDone {
                me: me_ref(),
                result: Ok(()),
                ms: 800,
            },
            now: 921 * S,
            rules: rules(),
            writes: Some(Phase::Stopped),
            action: Action::Nothing,
        },
        Row {
            rule: "a stop API that failed: idle again, tried after another idle_timeout",
            view: view(stopping(me()), 920 * S, 0, true),
            event: Event::StopDone {
                me: me_ref(),
                result: Err("503"),
                ms: 60_000,
            },
            now: 980 * S,
            rules: rules(),
            writes: Some(Phase::Idle { vm: vm() }),
            action: Action::WaitUntil(1880 * S),
        },
        Row {
            rule: "a stop whose process died: the VM is idle from now, its stop tried again then",
            view: view(stopping(them()), 920 * S, 0, false),
            event: Event::Tick { me: me_ref() },
            now: 1000 * S,
            rules: rules(),
            writes: Some(Phase::Idle { vm: vm() }),
            action: Action::WaitUntil(1900 * S),
        },
        Row {
            rule: "a login after a stop whose process died starts the VM",
            view: view(stopping(them()), 920 * S, 1, false),
            event: login(),
            now: 930 * S,
            rules: rules(),
            writes: Some(starting(me(), Some(vm()))),
            action: Action::CallStart,
        },
    ]);
}

#[test]
fn killed_processes_and_lost_hosts() {
    check(vec![
        Row {
            rule: "the other sessions keep the VM up",
            view: view(Phase::Up { vm: vm() }, 10 * S, 1, false),
            event: Event::Tick { me: me_ref() },
            now: 2000 * S,
            rules: rules(),
            writes: None,
            action: Action::Nothing,
        },
        Row {
            rule: "if it was the last, the sweep finds the VM idle and counts from then",
            view: view(Phase::Up { vm: vm() }, 10 * S, 0, false),
            event: Event::Tick { me: me_ref() },
            now: 2000 * S,
            rules: rules(),
            writes: Some(Phase::Idle { vm: vm() }),
            action: Action::WaitUntil(2900 * S),
        },
        Row {
            rule: "a start whose process died, of a VM that ran: idle from now",
            view: view(starting(them(), Some(vm())), 10 * S, 0, false),
            event: Event::Tick { me: me_ref() },
            now: 20 * S,
            rules: rules(),
            writes: Some(Phase::Idle { vm: vm() }),
            action: Action::WaitUntil(920 * S),
        },
        Row {
            rule: "a start in flight is left alone",
            view: view(starting(them(), Some(vm())), 10 * S, 0, true),
            event: Event::Tick { me: me_ref() },
            now: 20 * S,
            rules: rules(),
            writes: None,
            action: Action::Nothing,
        },
        Row {
            rule: "a login after a start whose process died starts the VM itself",
            view: view(starting(them(), None), 10 * S, 1, false),
            event: login(),
            now: 20 * S,
            rules: rules(),
            writes: Some(starting(me(), None)),
            action: Action::CallStart,
        },
    ]);
}

/// Epoch milliseconds of a UTC time such as "2026-12-07T09:00".
fn utc(text: &str) -> u64 {
    let at: jiff::civil::DateTime = text.parse().unwrap();
    at.in_tz("UTC").unwrap().timestamp().as_millisecond() as u64
}

/// The rules with office hours (daily 08:00-18:00 UTC), `min_run_time` and `pre_wake` as given.
fn office(min_run_time: Option<Duration>, pre_wake: bool) -> Rules {
    Rules {
        min_run_time,
        keep_warm: std::sync::Arc::new(
            crate::vm::warm::Windows::parse(&["daily 08:00-18:00 UTC".to_owned()]).unwrap(),
        ),
        pre_wake,
        ..rules()
    }
}

#[test]
fn keep_warm_windows_and_min_run_time_hold_the_stop() {
    let idle = |since, started| View {
        record: Record {
            phase: Phase::Idle { vm: vm() },
            since,
            started,
            ..Record::default()
        },
        sessions: Some(0),
        holder_alive: false,
        revision: 0,
    };
    let stopping = Phase::Stopping {
        holder: me(),
        vm: vm(),
    };
    check(vec![
        Row {
            rule: "inside a keep-warm window an idle VM is not stopped: it waits for the window's end",
            view: idle(utc("2026-12-07T09:00"), None),
            event: Event::Tick { me: me_ref() },
            now: utc("2026-12-07T09:15"),
            rules: office(None, false),
            writes: None,
            action: Action::WaitUntil(utc("2026-12-07T18:00")),
        },
        Row {
            rule: "at the window's end, idle for longer than idle_timeout: stopped",
            view: idle(utc("2026-12-07T09:00"), None),
            event: Event::Tick { me: me_ref() },
            now: utc("2026-12-07T18:00"),
            rules: office(None, false),
            writes: Some(stopping.clone()),
            action: Action::CallStop(vm()),
        },
        Row {
            rule: "outside the windows, the idle stop as ever",
            view: idle(utc("2026-12-07T19:00"), None),
            event: Event::Tick { me: me_ref() },
            now: utc("2026-12-07T19:15"),
            rules: office(None, false),
            writes: Some(stopping.clone()),
            action: Action::CallStop(vm()),
        },
        Row {
            rule: "not stopped sooner than min_run_time after its start",
            view: idle(20 * S, Some(10 * S)),
            event: Event::Tick { me: me_ref() },
            now: 920 * S,
            rules: Rules {
                min_run_time: Some(Duration::from_secs(3600)),
                ..rules()
            },
            writes: None,
            action: Action::WaitUntil(3610 * S),
        },
    ]);
}

#[test]
fn pre_wake_starts_the_vm_once_per_window() {
    let window = utc("2026-12-07T08:00");
    let stopped = |pre_woken| View {
        record: Record {
            phase: Phase::Stopped,
            since: utc("2026-12-06T19:00"),
            pre_woken,
            ..Record::default()
        },
        sessions: Some(0),
        holder_alive: false,
        revision: 0,
    };
    check(vec![
        Row {
            rule: "a window starts: the VM is started ahead of the day's first login",
            view: stopped(None),
            event: Event::Tick { me: me_ref() },
            now: utc("2026-12-07T08:00"),
            rules: office(None, true),
            writes: Some(starting(me(), None)),
            action: Action::CallStart,
        },
        Row {
            rule: "once per window: stopped later in it (by its API, say), it stays so",
            view: stopped(Some(window)),
            event: Event::Tick { me: me_ref() },
            now: utc("2026-12-07T11:00"),
            rules: office(None, true),
            writes: None,
            action: Action::Nothing,
        },
        Row {
            rule: "without pre_wake, nothing starts before a login",
            view: stopped(None),
            event: Event::Tick { me: me_ref() },
            now: utc("2026-12-07T08:00"),
            rules: office(None, false),
            writes: None,
            action: Action::Nothing,
        },
    ]);
}
