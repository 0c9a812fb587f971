//! The systemd units in units/: valid for systemd, and hardened.

use testkit as common;

use std::path::Path;

use common::{proxy::binary, units};

/// Every unit the package installs, by its path under units/.
const UNITS: [&str; 6] = [
    "ssh-on-demand.socket",
    "ssh-on-demand@.service",
    "sweep/ssh-on-demand-sweep.service",
    "sweep/ssh-on-demand-sweep.timer",
    "daemon/ssh-on-demand-daemon.socket",
    "daemon/ssh-on-demand-daemon.service",
];

fn units_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/units"))
}

#[test]
fn units_verify_clean() {
    // The daemon's ExecReload= is /bin/kill, from procps (a dependency of the package); the sockets' check
    // that the other mode is off runs in /bin/sh.
    units::verify_clean(
        units_dir(),
        &UNITS,
        &[
            (binary(), "/usr/bin/ssh-on-demand"),
            ("/bin/kill", "/bin/kill"),
            ("/bin/sh", "/bin/sh"),
        ],
    );
}

/// Every service at most 1.5 (`--threshold=15` fails above), with the figures docs/operations.md quotes.
#[test]
fn service_exposure_is_at_most_1_5_as_the_docs_say() {
    let readme = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md"));
    for unit in UNITS.iter().filter(|u| u.ends_with(".service")) {
        let figure = units::exposure(&units_dir().join(unit));
        units::assert_readme_says(readme, &format!("{} at {figure}", units::file_name(unit)));
    }
}
