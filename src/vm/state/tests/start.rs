//! The start's rules: one start per burst of logins, and what each answer of the start API makes of the VM.

use super::*;

#[test]
fn one_start_per_burst() {
    let theirs = starting(them(), None);
    check(vec![
        Row {
            rule: "the first login of a VM that does not run holds its start",
            view: view(Phase::Stopped, 0, 1, false),
            event: login(),
            now: 10 * S,
            rules: rules(),
            writes: Some(starting(me(), None)),
            action: Action::CallStart,
        },
        Row {
            rule: "a login while another's start is in flight waits for it",
            view: view(theirs.clone(), 10 * S, 2, true),
            event: login(),
            now: 11 * S,
            rules: rules(),
            writes: None,
            action: Action::Wait,
        },
        Row {
            rule: "then takes its answer",
            view: with_start(
                view(booting(130 * S), 12 * S, 2, false),
                true,
                "192.0.2.7:22",
            ),
            event: login(),
            now: 12 * S,
            rules: rules(),
            writes: None,
            action: Action::Share(vm()),
        },
        Row {
            rule: "a refusal included",
            view: with_start(
                view(
                    Phase::Failed {
                        detail: "no capacity".into(),
                    },
                    12 * S,
                    2,
                    false,
                ),
                false,
                "no capacity",
            ),
            event: login(),
            now: 12 * S,
            rules: rules(),
            writes: None,
            action: Action::ShareFailure("no capacity".into()),
        },
        Row {
            rule: "a login while the VM boots from an earlier start takes its address at once",
            view: view(booting(130 * S), 10 * S, 1, false),
            event: Event::Login {
                me: me_ref(),
                starts_seen: 1,
            },
            now: 20 * S,
            rules: rules(),
            writes: None,
            action: Action::Share(vm()),
        },
        Row {
            rule: "past boot_timeout, a boot is not shared: the VM is started again",
            view: view(booting(130 * S), 10 * S, 1, false),
            event: login(),
            now: 131 * S,
            rules: rules(),
            writes: Some(starting(me(), Some(vm()))),
            action: Action::CallStart,
        },
        Row {
            rule: "a refusal that ended before this login is not its own: it asks again",
            view: with_start(
                view(
                    Phase::Failed {
                        detail: "no capacity".into(),
                    },
                    5 * S,
                    1,
                    false,
                ),
                false,
                "no capacity",
            ),
            event: Event::Login {
                me: me_ref(),
                starts_seen: 1,
            },
            now: 12 * S,
            rules: rules(),
            writes: Some(starting(me(), None)),
            action: Action::CallStart,
        },
        Row {
            rule: "a login to a VM that is up writes nothing and asks the API while it reaches sshd",
            view: view(Phase::Up { vm: vm() }, 10 * S, 3, false),
            event: Event::Login {
                me: me_ref(),
                starts_seen: 1,
            },
            now: 20 * S,
            rules: rules(),
            writes: None,
            action: Action::Warm(vm()),
        },
    ]);
}

#[test]
fn answers_of_the_start_api() {
    let mine = |was| starting(me(), was);
    check(vec![
        Row {
            rule: "an address: the VM boots, and logins share it until boot_timeout",
            view: view(mine(None), 10 * S, 1, true),
            event: Event::Started {
                me: me_ref(),
                answer: Ok(vm()),
                ms: 30,
            },
            now: 11 * S,
            rules: rules(),
            writes: Some(booting(131 * S)),
            action: Action::Nothing,
        },
        Row {
            rule: "a refusal of a VM that did not run: failed",
            view: view(mine(None), 10 * S, 1, true),
            event: Event::Started {
                me: me_ref(),
                answer: Err("no capacity"),
                ms: 30,
            },
            now: 11 * S,
            rules: rules(),
            writes: Some(Phase::Failed {
                detail: "no capacity".into(),
            }),
            action: Action::Nothing,
        },
        Row {
            rule: "a failed start of a VM that runs leaves it running, to be stopped once idle",
            view: view(mine(Some(vm())), 10 * S, 2, true),
            event: Event::Started {
                me: me_ref(),
                answer: Err("the start API answered 503"),
                ms: 30,
            },
            now: 11 * S,
            rules: rules(),
            writes: Some(Phase::Up { vm: vm() }),
            action: Action::Nothing,
        },
        Row {
            rule: "sshd answered: up",
            view: view(booting(131 * S), 11 * S, 1, false),
            event: Event::Ready { vm: vm() },
            now: 15 * S,
            rules: rules(),
            writes: Some(Phase::Up { vm: vm() }),
            action: Action::Nothing,
        },
        Row {
            rule: "another VM's sshd does not make this one up",
            view: view(booting(131 * S), 11 * S, 1, false),
            event: Event::Ready { vm: other_vm() },
            now: 15 * S,
            rules: rules(),
            writes: None,
            action: Action::Nothing,
        },
        Row {
            rule: "an answer to a start this process no longer holds changes nothing shared",
            view: view(starting(them(), None), 10 * S, 1, true),
            event: Event::Started {
                me: me_ref(),
                answer: Ok(vm()),
                ms: 30,
            },
            now: 11 * S,
            rules: rules(),
            writes: None,
            action: Action::Nothing,
        },
    ]);
}
