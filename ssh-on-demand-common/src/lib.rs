//! What the proxy (`ssh-on-demand`) and its companion start/stop API (`ssh-on-demand-api`) share. Each is its
//! own program with its own dependencies; this crate holds only what both must do the same way.

/// Logging: native journald records under systemd, stderr elsewhere.
pub mod logging;
/// Retry pacing: backoff with jitter within a deadline.
pub mod retry;
/// Secrets: values that print as `***`.
pub mod secret;
