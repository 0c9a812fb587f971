//! ssh-on-demand-api: the start/stop API for ssh-on-demand, with backends for commands, libvirt, Proxmox VE
//! and AWS EC2. A program of its own, so that the proxy on port 22 holds no platform credentials.

/// Choosing the VM's address among the interfaces a platform reports.
mod address;
/// The platforms: power, start, address, shutdown and forced stop of one VM.
mod backend;
/// The command line.
pub mod cli;
/// The TOML configuration and its checks.
pub mod config;
/// Failures in the platform's words, and the HTTP status each becomes.
mod error;
/// journald or stderr, set up as the proxy does.
pub mod logging;
/// The man page, ssh-on-demand-api(8).
pub mod manpage;
/// The HTTP endpoints, the token check and the listeners.
pub mod server;
/// TLS with a CA file or a pinned certificate fingerprint.
mod tls;
/// Which VM a request means, shared starts, graceful-then-forced stops.
pub mod vms;
