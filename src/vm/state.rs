//! State: the VM's life as one explicit machine. Each [`Phase`] carries its own data; [`step`] is a pure
//! function of (what the store holds, an event, the time, the profile's rules) to (the record to write, the
//! one thing to do next). No I/O and no clock of its own: [`super::lifecycle`] feeds it events and carries
//! out its actions through a [`super::store`], and `status`, `sweep` and the metrics read its states.

use std::{fmt, net::SocketAddr, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};

use super::warm::Windows;

/// Milliseconds since the Unix epoch: the time base of the shared state, which every process and host reads.
pub type Millis = u64;

/// How long the record of a VM that does not run stays after its last change. Every client address that
/// ever identified has a VM (per-client scope): without this, scanners would grow the store forever.
pub const FORGET_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

/// Who makes a start or stop call: a registration in the store that lives as long as the call is in flight
/// and its process lives (a locked file, or an etcd key bound to the host's lease).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// The proxy host (`host_id`), for the etcd store; `None` for the local one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    pub pid: u32,
    /// The registration's name in the store.
    pub claim: String,
}

/// Where a VM is in its life.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    /// Nothing is known of it yet.
    #[default]
    New,
    /// `holder`'s start call is in flight. `was`: where the VM ran before, if it may still run.
    Starting {
        holder: Holder,
        was: Option<SocketAddr>,
    },
    /// The start API answered `vm`; its sshd has not answered yet. Until `until`, logins share the answer.
    Booting {
        vm: SocketAddr,
        until: Millis,
    },
    /// Its sshd answered, and it has sessions.
    Up {
        vm: SocketAddr,
    },
    /// Up without a session since the record's `since`: the idle clock runs.
    Idle {
        vm: SocketAddr,
    },
    /// `holder`'s stop call is in flight.
    Stopping {
        holder: Holder,
        vm: SocketAddr,
    },
    Stopped,
    /// The start API gave no address.
    Failed {
        detail: String,
    },
}

impl Phase {
    /// The VM's address if it may be running.
    pub fn vm(&self) -> Option<SocketAddr> {
        match self {
            Phase::Starting { was, .. } => *was,
            Phase::Booting { vm, .. }
            | Phase::Up { vm }
            | Phase::Idle { vm }
            | Phase::Stopping { vm, .. } => Some(*vm),
            Phase::New | Phase::Stopped | Phase::Failed { .. } => None,
        }
    }

    /// The address a client may be relayed to without a start: the VM is up, or booting from a start whose
    /// answer others may still take.
    pub fn running(&self, now: Millis) -> Option<SocketAddr> {
        match self {
            Phase::Up { vm } | Phase::Idle { vm } => Some(*vm),
            Phase::Booting { vm, until } if now < *until => Some(*vm),
            _ => None,
        }
    }

    /// Whose call is in flight, if any.
    pub fn holder(&self) -> Option<&Holder> {
        match self {
            Phase::Starting { holder, .. } | Phase::Stopping { holder, .. } => Some(holder),
            _ => None,
        }
    }
}

/// The end of one start or stop call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallEnd {
    /// When it ended.
    pub at: Millis,
    pub ok: bool,
    /// The address given, or what the user or operator was told.
    pub detail: String,
    pub ms: u64,
}

/// What the store keeps of one VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Record {
    pub phase: Phase,
    /// When the phase began (for `Idle`: the last disconnect, where the idle clock starts).
    pub since: Millis,
    pub last_start: Option<CallEnd>,
    pub last_stop: Option<CallEnd>,
    pub starts: u64,
    pub stops: u64,
    /// When the VM's current run began (its start answered), for `min_run_time`; `None` once stopped.
    pub started: Option<Millis>,
    /// The start of the keep-warm window for which it was last started ahead of logins.
    pub pre_woken: Option<Millis>,
}

impl Record {
    fn enter(&self, phase: Phase, now: Millis) -> Record {
        Record {
            phase,
            since: now,
            ..self.clone()
        }
    }
}

/// A record as one reader saw it, with what the store knows around it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    pub record: Record,
    /// Live sessions of the VM, on every host; `None` where the reader did not count them.
    pub sessions: Option<usize>,
    /// The record's holder still holds its registration: its call is in flight.
    pub holder_alive: bool,
    /// The store's revision this was read at (etcd), to wait for changes after it.
    pub revision: i64,
}

impl View {
    /// The state shown to operators.
    pub fn shown(&self) -> Shown {
        match &self.record.phase {
            Phase::New => Shown::New,
            Phase::Starting { .. } | Phase::Stopping { .. } if !self.holder_alive => {
                Shown::Interrupted
            }
            Phase::Starting { .. } => Shown::Starting,
            Phase::Booting { .. } => Shown::Booting,
            Phase::Up { .. } => Shown::Up,
            Phase::Idle { .. } => Shown::Idle,
            Phase::Stopping { .. } => Shown::Stopping,
            Phase::Stopped => Shown::Stopped,
            Phase::Failed { .. } => Shown::Failed,
        }
    }

    fn sessions(&self) -> usize {
        self.sessions.unwrap_or(0)
    }
}

/// The states operators read in `status`, `STATUS=` and the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Shown {
    New,
    Starting,
    Booting,
    Up,
    Idle,
    Stopping,
    Stopped,
    Failed,
    /// A start or stop whose process died during the call.
    Interrupted,
}

impl Shown {
    pub const ALL: [Shown; 9] = [
        Shown::New,
        Shown::Starting,
        Shown::Booting,
        Shown::Up,
        Shown::Idle,
        Shown::Stopping,
        Shown::Stopped,
        Shown::Failed,
        Shown::Interrupted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Shown::New => "new",
            Shown::Starting => "starting",
            Shown::Booting => "booting",
            Shown::Up => "up",
            Shown::Idle => "idle",
            Shown::Stopping => "stopping",
            Shown::Stopped => "stopped",
            Shown::Failed => "failed",
            Shown::Interrupted => "interrupted",
        }
    }
}

impl fmt::Display for Shown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The profile's rules that the machine applies.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rules {
    pub boot_timeout: Duration,
    /// `None`: never stopped (no stop API).
    pub idle_timeout: Option<Duration>,
    /// A VM is not stopped sooner after its start (some platforms bill a minimum per start).
    pub min_run_time: Option<Duration>,
    /// Windows in which an idle VM is not stopped.
    pub keep_warm: Arc<Windows>,
    /// At the start of a keep-warm window, a VM that does not run is started ahead of logins.
    pub pre_wake: bool,
}

impl Rules {
    /// When a VM idle since `since` is due to be stopped by the idle timeout alone.
    pub fn stop_due(&self, since: Millis) -> Option<Millis> {
        self.idle_timeout.map(|idle| since + millis(idle))
    }

    /// The earliest time a VM of `record`, idle since its `since`, may be stopped, as seen at `now`: after
    /// its idle timeout, outside keep-warm windows, and not before `min_run_time` since its start. `None` if
    /// it is never stopped.
    pub fn may_stop_at(&self, record: &Record, now: Millis) -> Option<Millis> {
        let mut at = self.stop_due(record.since)?;
        if let (Some(min), Some(started)) = (self.min_run_time, record.started) {
            at = at.max(started + millis(min));
        }
        // A window that covers that time holds the VM until its end.
        if let Some(end) = self.keep_warm.covering(at.max(now)) {
            at = end;
        }
        Some(at)
    }
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event<'a> {
    /// A connection identified and registered as a session; it wants its VM. `starts_seen`: the starts that
    /// had ended when it registered (its first view).
    Login { me: &'a Holder, starts_seen: u64 },
    /// `me`'s start call ended: the VM's address, or why not.
    Started {
        me: &'a Holder,
        answer: Result<SocketAddr, &'a str>,
        ms: u64,
    },
    /// The VM's sshd answered at `vm`.
    Ready { vm: SocketAddr },
    /// The start API, asked for a VM that runs, answered `vm`: where it runs now.
    Answered { vm: SocketAddr },
    /// A start made while the store could not be reached answered `vm`: the VM runs, as the store learns now.
    Unrecorded { vm: SocketAddr },
    /// A session ended; the view counts those left.
    Left,
    /// A timer fired, or the sweep looked (a session or host may be gone, the store may be back).
    Tick { me: &'a Holder },
    /// `me`'s stop call ended.
    StopDone {
        me: &'a Holder,
        result: Result<(), &'a str>,
        ms: u64,
    },
}

/// What to write.
#[derive(Debug, Clone, PartialEq, Eq)]
// One per decision, on the stack for an instant: not worth a box.
#[allow(clippy::large_enum_variant)]
pub enum Write {
    Keep,
    Put(Record),
    /// Remove the record: a VM that has not run for [`FORGET_AFTER`].
    Forget,
}

/// What to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Nothing,
    /// Call the start API: this connection now holds the VM's start.
    CallStart,
    /// The VM runs at this address: call the start API all the same (it may answer elsewhere), holding
    /// nothing.
    Warm(SocketAddr),
    /// Take this address from another connection's start.
    Share(SocketAddr),
    /// Take this refusal from another connection's start.
    ShareFailure(String),
    /// Another holder's call is in flight: wait for the record to change, then step again.
    Wait,
    /// Call the stop API for the VM at this address: this process now holds its stop.
    CallStop(SocketAddr),
    /// Nothing before this time: step again then.
    WaitUntil(Millis),
}

/// One transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub write: Write,
    pub action: Action,
}

impl Step {
    fn stay(action: Action) -> Step {
        Step {
            write: Write::Keep,
            action,
        }
    }

    fn put(record: Record, action: Action) -> Step {
        Step {
            write: Write::Put(record),
            action,
        }
    }
}

pub fn millis(duration: Duration) -> u64 {
    duration.as_millis() as u64
}

mod step;
#[cfg(test)]
mod tests;

pub use step::step;
