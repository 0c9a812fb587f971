//! The transitions: what each event does to each phase.

use super::{
    Action, CallEnd, Event, FORGET_AFTER, Holder, Millis, Phase, Rules, Step, View, Write, millis,
};

/// The machine: what `event` does to the VM seen as `view` at `now` under `rules`.
pub fn step(view: &View, event: Event<'_>, now: Millis, rules: &Rules) -> Step {
    let record = &view.record;
    match event {
        Event::Login { me, starts_seen } => login(view, me, starts_seen, now),
        Event::Started { me, answer, ms } => {
            let mut next = record.clone();
            next.starts += 1;
            next.last_start = Some(CallEnd {
                at: now,
                ok: answer.is_ok(),
                detail: match answer {
                    Ok(vm) => vm.to_string(),
                    Err(why) => why.to_owned(),
                },
                ms,
            });
            let Phase::Starting { holder, was } = &record.phase else {
                // Not ours any more (the record was reset): the answer stands for this connection alone.
                return Step::stay(Action::Nothing);
            };
            if holder != me {
                return Step::stay(Action::Nothing);
            }
            next = match (answer, was) {
                (Ok(vm), _) => {
                    // A VM that ran before this call is still the same run.
                    next.started = next.started.filter(|_| was.is_some()).or(Some(now));
                    next.enter(
                        Phase::Booting {
                            vm,
                            until: now + millis(rules.boot_timeout),
                        },
                        now,
                    )
                }
                // A VM that ran before this failed call may run still: it stays known, to be stopped once idle.
                (Err(_), Some(vm)) => next.enter(Phase::Up { vm: *vm }, now),
                (Err(detail), None) => next.enter(
                    Phase::Failed {
                        detail: detail.to_owned(),
                    },
                    now,
                ),
            };
            Step::put(next, Action::Nothing)
        }
        Event::Ready { vm } => match record.phase {
            Phase::Booting { vm: booting, .. } if booting == vm => {
                Step::put(record.enter(Phase::Up { vm }, now), Action::Nothing)
            }
            _ => Step::stay(Action::Nothing),
        },
        Event::Answered { vm } => match record.phase {
            Phase::Up { vm: known } if known != vm => {
                Step::put(record.enter(Phase::Up { vm }, now), Action::Nothing)
            }
            Phase::Idle { vm: known } if known != vm => Step::put(
                record.enter(Phase::Idle { vm }, record.since),
                Action::Nothing,
            ),
            _ => Step::stay(Action::Nothing),
        },
        Event::Unrecorded { vm } => match &record.phase {
            Phase::Up { .. } | Phase::Idle { .. } | Phase::Booting { .. } => {
                step(view, Event::Answered { vm }, now, rules)
            }
            Phase::Starting { .. } | Phase::Stopping { .. } if view.holder_alive => {
                Step::stay(Action::Nothing)
            }
            // It runs, whatever the store believed: up, so that the next look counts its sessions and the
            // idle stop follows.
            _ => {
                let mut next = record.enter(Phase::Up { vm }, now);
                next.started = Some(now);
                Step::put(next, Action::Nothing)
            }
        },
        Event::Left => match record.phase {
            Phase::Up { vm } | Phase::Booting { vm, .. } | Phase::Idle { vm }
                if view.sessions() == 0 =>
            {
                // The idle clock starts at the last disconnect (again, if it ran already).
                let wait = rules
                    .stop_due(now)
                    .map_or(Action::Nothing, Action::WaitUntil);
                Step::put(record.enter(Phase::Idle { vm }, now), wait)
            }
            _ => Step::stay(Action::Nothing),
        },
        Event::Tick { me } => tick(view, me, now, rules),
        Event::StopDone { me, result, ms } => {
            let Phase::Stopping { holder, vm } = &record.phase else {
                return Step::stay(Action::Nothing);
            };
            if holder != me {
                return Step::stay(Action::Nothing);
            }
            let mut next = record.clone();
            next.last_stop = Some(CallEnd {
                at: now,
                ok: result.is_ok(),
                detail: match result {
                    Ok(()) => "stopped".to_owned(),
                    Err(why) => why.to_owned(),
                },
                ms,
            });
            match result {
                Ok(()) => {
                    next.stops += 1;
                    next.started = None;
                    Step::put(next.enter(Phase::Stopped, now), Action::Nothing)
                }
                // Still up, as far as anyone knows: tried again after another idle timeout.
                Err(_) => {
                    let wait = rules
                        .stop_due(now)
                        .map_or(Action::Nothing, Action::WaitUntil);
                    Step::put(next.enter(Phase::Idle { vm: *vm }, now), wait)
                }
            }
        }
    }
}

fn login(view: &View, me: &Holder, starts_seen: u64, now: Millis) -> Step {
    let record = &view.record;
    let start = |was| {
        Step::put(
            record.enter(
                Phase::Starting {
                    holder: me.clone(),
                    was,
                },
                now,
            ),
            Action::CallStart,
        )
    };
    // A start that ended after this connection registered is its own: a burst makes one call.
    let fresh = record.starts > starts_seen;
    if let (true, Some(call)) = (fresh, &record.last_start) {
        match &record.phase {
            Phase::Failed { detail } => return Step::stay(Action::ShareFailure(detail.clone())),
            Phase::Booting { vm, .. } | Phase::Up { vm } if call.ok => {
                return Step::stay(Action::Share(*vm));
            }
            _ => {}
        }
    }
    match &record.phase {
        Phase::New | Phase::Stopped | Phase::Failed { .. } => start(None),
        Phase::Starting { holder, .. } | Phase::Stopping { holder, .. }
            if view.holder_alive && holder != me =>
        {
            Step::stay(Action::Wait)
        }
        // Its holder died during the call: the VM may or may not run; start it (again).
        Phase::Starting { was, .. } => start(*was),
        Phase::Stopping { vm, .. } => start(Some(*vm)),
        Phase::Booting { vm, until } if now < *until => Step::stay(Action::Share(*vm)),
        Phase::Booting { vm, .. } => start(Some(*vm)),
        Phase::Up { vm } => Step::stay(Action::Warm(*vm)),
        // A login during the idle wait cancels the stop.
        Phase::Idle { vm } => {
            Step::put(record.enter(Phase::Up { vm: *vm }, now), Action::Warm(*vm))
        }
    }
}

fn tick(view: &View, me: &Holder, now: Millis, rules: &Rules) -> Step {
    let record = &view.record;
    let sessions = view.sessions();
    let idle_since_now = |vm| {
        let wait = rules
            .stop_due(now)
            .map_or(Action::Nothing, Action::WaitUntil);
        Step::put(record.enter(Phase::Idle { vm }, now), wait)
    };
    match &record.phase {
        Phase::Idle { vm } if sessions > 0 => {
            Step::put(record.enter(Phase::Up { vm: *vm }, now), Action::Nothing)
        }
        Phase::Idle { vm } => match rules.may_stop_at(record, now) {
            None => Step::stay(Action::Nothing),
            Some(due) if now < due => Step::stay(Action::WaitUntil(due)),
            Some(_) => Step::put(
                record.enter(
                    Phase::Stopping {
                        holder: me.clone(),
                        vm: *vm,
                    },
                    now,
                ),
                Action::CallStop(*vm),
            ),
        },
        // Sessions that ended without saying so (a killed process, a lost host): idle from now.
        Phase::Up { vm } | Phase::Booting { vm, .. } if sessions == 0 => idle_since_now(*vm),
        Phase::Starting { .. } | Phase::Stopping { .. } if view.holder_alive => {
            Step::stay(Action::Nothing)
        }
        // A call whose process died: a VM that may run is idle from now, and its stop tried again then.
        Phase::Stopping { vm, .. } => idle_since_now(*vm),
        Phase::Starting { was: Some(vm), .. } if sessions == 0 => idle_since_now(*vm),
        // The start of a keep-warm window: started ahead of the day's first login, once per window.
        Phase::New | Phase::Stopped | Phase::Failed { .. }
            if rules.pre_wake
                && rules
                    .keep_warm
                    .started(now)
                    .is_some_and(|window| record.pre_woken.is_none_or(|done| done < window)) =>
        {
            let mut next = record.enter(
                Phase::Starting {
                    holder: me.clone(),
                    was: None,
                },
                now,
            );
            next.pre_woken = rules.keep_warm.started(now);
            Step::put(next, Action::CallStart)
        }
        Phase::New | Phase::Stopped | Phase::Failed { .. } | Phase::Starting { was: None, .. }
            if sessions == 0 && now.saturating_sub(record.since) > millis(FORGET_AFTER) =>
        {
            Step {
                write: Write::Forget,
                action: Action::Nothing,
            }
        }
        _ => Step::stay(Action::Nothing),
    }
}
