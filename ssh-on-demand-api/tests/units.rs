//! The systemd units in units/: valid for systemd, and hardened as README.md says.

use testkit as common;

use std::path::Path;

use common::{api_server::binary, units};

const UNITS: [&str; 2] = ["ssh-on-demand-api.socket", "ssh-on-demand-api.service"];

fn units_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/units"))
}

#[test]
fn units_verify_clean() {
    units::verify_clean(
        units_dir(),
        &UNITS,
        &[(binary(), "/usr/bin/ssh-on-demand-api")],
    );
}

/// At most 1.5 (`--threshold=15` fails above), with the figure README.md quotes.
#[test]
fn service_exposure_is_at_most_1_5_as_the_readme_says() {
    let figure = units::exposure(&units_dir().join("ssh-on-demand-api.service"));
    units::assert_readme_says(
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")),
        &format!("rates ssh-on-demand-api.service at {figure}"),
    );
}
