//! A platform emulator run by one of ssh-on-demand-api/tests/emulators/*.py: its first line on stdout (JSON) says
//! where it listens and with which credentials, every later line is one event (a power action) it saw. Killed
//! when dropped. Both crates' tests use this one file.
//!
//! The emulators (moto, fakepve) are PyPI packages, installed into a virtual environment of the workspace's
//! own, `target/tmp/venv`: Debian's Python refuses `pip install` outside one (PEP 668), and a venv keeps the
//! pinned versions apart from whatever else the machine has.

use std::{
    ffi::OsStr,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
};

use serde_json::Value;

use super::{PATIENCE, log::Log};

pub struct Emulator {
    child: Child,
    /// Held open: the script exits when its stdin closes, should this process die without dropping it.
    _stdin: ChildStdin,
    /// The first line.
    pub ready: Value,
    pub events: Log,
}

impl Emulator {
    /// Runs `script` with `args` by the venv's Python.
    pub fn start(script: &Path, args: &[&OsStr], stderr: Stdio, name: &'static str) -> Emulator {
        let python = venv().join("bin/python3");
        assert!(
            python.exists(),
            "{name} runs in a Python virtual environment at {}, which is missing; create it with `{}`",
            venv().display(),
            setup_command(script)
        );
        let mut child = Command::new(&python)
            .arg(script)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("running {}: {e}", python.display()));
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        stdout.read_line(&mut first).unwrap();
        let ready: Value = serde_json::from_str(&first).unwrap_or_else(|_| {
            panic!(
                "{name} did not start (are the emulators installed in {}? `{}`); it printed {first:?}",
                venv().display(),
                setup_command(script)
            )
        });
        Emulator {
            child,
            _stdin: stdin,
            ready,
            events: Log::collect(stdout, name),
        }
    }

    /// A text field of the first line.
    pub fn text(&self, key: &str) -> String {
        self.ready[key].as_str().unwrap().to_owned()
    }

    /// Events so far whose line contains `needle`.
    pub fn events(&self, needle: &str) -> usize {
        self.events
            .lines()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    pub fn wait_for_event(&self, needle: &str) {
        self.events.wait_for(PATIENCE, |l| l.contains(needle));
    }
}

/// The emulators' virtual environment: `target/tmp/venv`, beside the other caches of the tests (under
/// `CARGO_TARGET_DIR` when that is set).
fn venv() -> PathBuf {
    super::target_tmp().join("venv")
}

/// What makes the venv, as `.ci/run` does: the pinned emulators are in requirements.txt beside `script`.
fn setup_command(script: &Path) -> String {
    format!(
        "python3 -m venv {0} && {0}/bin/pip install -r {1}",
        venv().display(),
        script.with_file_name("requirements.txt").display()
    )
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
