//! A platform emulator run by one of ssh-on-demand-api/tests/emulators/*.py: its first line on stdout (JSON) says
//! where it listens and with which credentials, every later line is one event (a power action) it saw. Killed
//! when dropped. Both crates' tests use this one file.

use std::{
    ffi::OsStr,
    io::{BufRead, BufReader},
    path::Path,
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
    /// Runs `script` with `args`; `install` is what to install if it does not start.
    pub fn start(
        script: &Path,
        args: &[&OsStr],
        stderr: Stdio,
        name: &'static str,
        install: &str,
    ) -> Emulator {
        let mut child = Command::new("python3")
            .arg(script)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("python3");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        stdout.read_line(&mut first).unwrap();
        let ready: Value = serde_json::from_str(&first).unwrap_or_else(|_| {
            panic!("{name} did not start (pip install '{install}'); it printed {first:?}")
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

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
