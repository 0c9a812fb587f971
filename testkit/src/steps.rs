//! A scenario's steps as tests of their own (for `harness = false` test binaries, through libtest-mimic):
//! they share one fixture, made before the first step that runs and dropped after the last, and run in
//! order, each reporting on its own, so that the first failure does not hide the rest. Steps of different
//! scenarios run side by side on libtest's threads.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use libtest_mimic::{Arguments, Completion, Failed, Trial};

use super::log;

/// A step: its name (the test's is `scenario::step`) and what it does with the fixture.
pub type Step<F> = (&'static str, fn(&F));

/// What makes a scenario's fixture: `Err(why)` when this machine cannot run the scenario at all (no
/// containers, say), which ignores its steps with that reason instead of failing them.
pub type Setup<F> = fn() -> Result<F, String>;

/// The trials of scenario `name`: one per step, in order. `args` tells which of them will run: a step that
/// runs first takes the steps before it that do not (filtered out) as its own, so that it finds the fixture
/// as they leave it (`cargo test --test systemd -- daemon::reload` runs what reload needs before it).
pub fn scenario<F: Send + 'static>(
    args: &Arguments,
    name: &str,
    setup: Setup<F>,
    steps: &[Step<F>],
) -> Vec<Trial> {
    let trials: Vec<_> = steps
        .iter()
        .map(|(step, _)| Trial::test(format!("{name}::{step}"), || Ok(())))
        .collect();
    let runs: Vec<bool> = trials
        .iter()
        .map(|t| !args.is_filtered_out(t) && !args.is_ignored(t))
        .collect();
    let shared = Arc::new(Shared {
        fixture: Mutex::new(Fixture::Unmade),
        turn: Mutex::new(0),
        next: Condvar::new(),
        last: runs.iter().filter(|&&r| r).count(),
    });
    let (mut turn, mut before) = (0, Vec::new());
    steps
        .iter()
        .zip(trials)
        .zip(runs)
        .map(|(((_, step), trial), runs)| {
            let mine: Vec<_> = if runs {
                before.drain(..).chain(Some(*step)).collect()
            } else {
                before.push(*step);
                Vec::new()
            };
            let (shared, my_turn) = (shared.clone(), turn);
            turn += usize::from(runs);
            Trial::ignorable_test(trial.name().to_owned(), move || {
                shared.wait_for_turn(my_turn);
                let _next = Next(&shared, log::held_count());
                let mut fixture = shared.fixture();
                if let Fixture::Unmade = *fixture {
                    // A setup that panics leaves this for the steps after: its own step reports the panic.
                    *fixture = Fixture::Broken("panicked; the first step's output says why".into());
                    *fixture = match setup() {
                        Ok(made) => Fixture::Made(made),
                        Err(why) => Fixture::Unavailable(why),
                    };
                }
                match &*fixture {
                    Fixture::Made(made) => mine.iter().for_each(|step| step(made)),
                    Fixture::Unavailable(why) => return Ok(Completion::ignored_with(why)),
                    Fixture::Broken(why) => return Err(Failed::from(format!("the setup {why}"))),
                    Fixture::Unmade | Fixture::Gone => {
                        unreachable!("made above, dropped after the last")
                    }
                }
                Ok(Completion::Completed)
            })
        })
        .collect()
}

enum Fixture<F> {
    Unmade,
    Made(F),
    Unavailable(String),
    Broken(String),
    Gone,
}

struct Shared<F> {
    fixture: Mutex<Fixture<F>>,
    /// How many steps have ended (passed or failed).
    turn: Mutex<usize>,
    next: Condvar,
    /// How many steps run.
    last: usize,
}

impl<F> Shared<F> {
    // A step that panicked poisons them; the next step goes on with what it left.
    fn fixture(&self) -> MutexGuard<'_, Fixture<F>> {
        self.fixture.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait_for_turn(&self, mine: usize) {
        let turn = self.turn.lock().unwrap_or_else(PoisonError::into_inner);
        let _turn = self
            .next
            .wait_while(turn, |turn| *turn < mine)
            .unwrap_or_else(PoisonError::into_inner);
    }
}

/// Ends a step, even one that panicked: lets the next one go, and after the last drops the fixture (a
/// static would never be dropped: a container would outlive the test).
/// It also shows the output of the processes a failed step ran (which a passing step's hides), from the
/// `.1`th held line on: see [`log::hold_echoes`].
struct Next<'a, F>(&'a Shared<F>, usize);

impl<F> Drop for Next<'_, F> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for line in log::held_since(self.1) {
                eprintln!("{line}");
            }
        }
        let mut turn = self.0.turn.lock().unwrap_or_else(PoisonError::into_inner);
        *turn += 1;
        if *turn == self.0.last {
            let gone = std::mem::replace(&mut *self.0.fixture(), Fixture::Gone);
            drop(gone);
        }
        self.0.next.notify_all();
    }
}

/// The scenarios' trials taken in turn, one step of each at a time: libtest's threads take trials in this
/// order, so that the scenarios go on side by side rather than one after the other.
pub fn side_by_side(scenarios: Vec<Vec<Trial>>) -> Vec<Trial> {
    let mut scenarios: Vec<_> = scenarios.into_iter().map(Vec::into_iter).collect();
    let mut trials = Vec::new();
    while !scenarios.is_empty() {
        scenarios.retain_mut(|steps| steps.next().map(|t| trials.push(t)).is_some());
    }
    trials
}
