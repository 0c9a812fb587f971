//! Lines from a child's stderr, collected by a thread, that a test can wait for without sleeping.

use std::{
    io::{BufRead, BufReader, Read},
    process::{Child, Command, Stdio},
    sync::{Arc, Condvar, Mutex},
    thread,
    time::{Duration, Instant},
};

/// Echoed lines, once [`hold_echoes`] was called.
static HELD: Mutex<Option<Vec<String>>> = Mutex::new(None);

/// From now on echoed lines are held instead of printed, for a test binary whose harness does not capture
/// stderr (libtest-mimic's): [`held_since`] gives them to a test that failed.
pub fn hold_echoes() {
    HELD.lock().unwrap().get_or_insert_with(Vec::new);
}

/// How many lines are held so far: where a test's own begin.
pub fn held_count() -> usize {
    HELD.lock().unwrap().as_ref().map_or(0, Vec::len)
}

/// The lines held since the `from`th.
pub fn held_since(from: usize) -> Vec<String> {
    HELD.lock()
        .unwrap()
        .as_ref()
        .map_or_else(Vec::new, |held| held[from..].to_vec())
}

fn echo_line(line: String) {
    match &mut *HELD.lock().unwrap() {
        Some(held) => held.push(line),
        None => eprintln!("{line}"),
    }
}

/// Starts `command` with nothing on its stdin and stdout and its stderr collected as `echo`'s lines; panics
/// saying `what` is missing if it cannot start.
pub fn spawn_logged(command: &mut Command, echo: &'static str, what: &str) -> (Child, Log) {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {what}: {e}"));
    let log = Log::collect(child.stderr.take().expect("stderr is piped"), echo);
    (child, log)
}

#[derive(Clone, Default)]
pub struct Log {
    inner: Arc<(Mutex<Lines>, Condvar)>,
}

#[derive(Default)]
struct Lines {
    lines: Vec<String>,
    closed: bool,
}

impl Log {
    /// Collects `source` line by line until EOF; `echo` copies each line to our stderr (shown on failure).
    pub fn collect(source: impl Read + Send + 'static, echo: &'static str) -> Log {
        let log = Log::default();
        let sink = log.clone();
        thread::spawn(move || {
            for line in BufReader::new(source).lines() {
                let Ok(line) = line else { break };
                echo_line(format!("[{echo}] {line}"));
                let (lines, changed) = &*sink.inner;
                lines.lock().unwrap().lines.push(line);
                changed.notify_all();
            }
            let (lines, changed) = &*sink.inner;
            lines.lock().unwrap().closed = true;
            changed.notify_all();
        });
        log
    }

    pub fn lines(&self) -> Vec<String> {
        self.inner.0.lock().unwrap().lines.clone()
    }

    /// Waits until a line satisfies `matches` and returns it; panics after `limit`.
    pub fn wait_for(&self, limit: Duration, matches: impl Fn(&str) -> bool) -> String {
        self.wait_until(limit, |lines| lines.iter().find(|l| matches(l)).cloned())
    }

    pub fn try_wait_for(&self, limit: Duration, matches: impl Fn(&str) -> bool) -> Option<String> {
        self.try_wait_until(limit, |lines| lines.iter().find(|l| matches(l)).cloned())
    }

    /// Waits until `check` finds what it looks for in all lines so far; panics after `limit`.
    pub fn wait_until<T>(&self, limit: Duration, check: impl Fn(&[String]) -> Option<T>) -> T {
        self.try_wait_until(limit, check).unwrap_or_else(|| {
            panic!(
                "log did not show what the test waits for within {limit:?}; log:\n{}",
                self.lines().join("\n")
            )
        })
    }

    pub fn try_wait_until<T>(
        &self,
        limit: Duration,
        check: impl Fn(&[String]) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + limit;
        let (lines, changed) = &*self.inner;
        let mut guard = lines.lock().unwrap();
        loop {
            if let Some(found) = check(&guard.lines) {
                return Some(found);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            if guard.closed {
                return None;
            }
            guard = changed.wait_timeout(guard, left).unwrap().0;
        }
    }
}
