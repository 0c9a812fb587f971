//! ssh-on-demand under real systemd: the Debian packages, built from the current sources, installed into
//! containers that boot systemd 252 as PID 1, configured and enabled the way the documents tell an operator,
//! then used. Each scenario shares one container among its steps, and each step is a test of its own
//! (`cargo test --test systemd -- --list`):
//! - [`modes`]: the per-connection units and the daemon's, each used from the host ([`host`]: its VMs and APIs);
//! - [`walkthrough`]: docs/first-login.md on a stock server, run as written, and the switch between modes;
//! - [`packages`]: what the packages install, and the companion's two flavours replacing each other.

use testkit as common;
mod host;
mod inspect;
mod modes;
mod packages;
mod walkthrough;

use std::process::ExitCode;

use common::steps;
use libtest_mimic::Arguments;

fn main() -> ExitCode {
    let args = Arguments::from_args();
    // libtest-mimic does not capture output: the processes' lines are shown only for a step that failed.
    common::log::hold_echoes();
    let trials = steps::side_by_side(vec![
        modes::per_connection(&args),
        walkthrough::walkthrough(&args),
        modes::daemon(&args),
        packages::companion_flavours(&args),
    ]);
    libtest_mimic::run(&args, trials).exit_code()
}
