//! Built-in defaults, one per setting that has one.

use std::time::Duration;

/// One start or stop API request, connect to last body byte.
pub const API_TIMEOUT: Duration = Duration::from_secs(10);
/// The start API and the VM's sshd together, from the client's identification on.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// One TCP connect attempt to the VM.
pub const VM_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// The VM's identification line after one TCP connect succeeded.
pub const VM_BANNER_TIMEOUT: Duration = Duration::from_secs(5);
/// The client's identification line; nothing is started before it arrives. SSH clients send it as soon
/// as they are connected; those that wait for the server (ssh-keyscan, whose own timeout is 5 s) are
/// told apart from them after this long.
pub const CLIENT_BANNER_TIMEOUT: Duration = Duration::from_secs(3);
/// Where the VM's sshd listens when the start API names no port.
pub const VM_PORT: u16 = 22;
/// From a VM's last disconnect to its stop.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// One stop, retries included: the longest a login waits for a stop in flight.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// Shared state of connections: systemd's `RuntimeDirectory=ssh-on-demand`.
pub const STATE_DIR: &str = "/run/ssh-on-demand";
/// Daemon limits, in place of the socket unit's `MaxConnections=`/`MaxConnectionsPerSource=`.
pub const MAX_SESSIONS: usize = 1024;
pub const MAX_SESSIONS_PER_SOURCE: usize = 64;
pub const MAX_PENDING_PER_VM: usize = 128;
/// Daemon: how long live sessions may go on after SIGTERM.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Starts one client address may cause: generous for people, who start a VM a few times a day, and a bound
/// on what a stranger can run up.
pub const SOURCE_START_LIMIT: crate::guard::StartLimit = crate::guard::StartLimit {
    starts: 10,
    window: Duration::from_secs(10 * 60),
};
