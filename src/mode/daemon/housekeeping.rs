//! What the daemon does besides serving connections: the sweep for VMs whose idle waiter died, `STATUS=` for
//! `systemctl status`, and the watchdog's pings.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use sd_notify::NotifyState;
use tokio::time::interval;
use tracing::{error, warn};

use super::Daemon;
use crate::{
    session::Host,
    vm::{
        lifecycle::{self, Due},
        state::Shown,
        store::{Store, now_ms},
    },
};

/// How often VMs whose idle waiter died are looked for, and `STATUS=` refreshed.
const SWEEP_EVERY: Duration = Duration::from_secs(60);
const STATUS_EVERY: Duration = Duration::from_secs(5);
impl Daemon {
    /// Stops VMs whose idle waiter died (at start, and then every minute; with etcd also as soon as another
    /// host's sessions vanish, or this host's are back in the store), and keeps `STATUS=` current.
    pub(super) async fn housekeeping(self: Arc<Self>) {
        let mut sweep = interval(SWEEP_EVERY);
        let mut status = interval(STATUS_EVERY);
        let mut changes = match &self.store {
            Store::Etcd(etcd) => Some(etcd.changes()),
            Store::Local(_) => None,
        };
        loop {
            tokio::select! {
                _ = sweep.tick() => {
                    let ctx = self.current();
                    let watches = lifecycle::sweep(&ctx.lifecycle, &ctx.config, u64::MAX).await;
                    Daemon::run_due(&self, &ctx, watches);
                }
                Some(change) = async { changes.as_mut()?.recv().await } => {
                    let ctx = self.current();
                    let watches = match change {
                        Some(key) => lifecycle::sweep_one(&ctx.lifecycle, &ctx.config, &key).await.into_iter().collect(),
                        None => lifecycle::sweep(&ctx.lifecycle, &ctx.config, u64::MAX).await,
                    };
                    Daemon::run_due(&self, &ctx, watches);
                }
                _ = status.tick() => {
                    let text = self.status_text().await;
                    let _ = sd_notify::notify(&[NotifyState::Status(&text)]);
                }
            }
        }
    }

    /// Runs what the sweep found due: idle waits, and starts ahead of logins.
    fn run_due(self: &Arc<Self>, ctx: &Host, due: Vec<Due>) {
        for due in due {
            let Some(profile) = ctx.config.profile_labeled(&due.key().profile) else {
                continue;
            };
            match ctx.api(profile) {
                Ok(api) => {
                    let daemon = self.clone();
                    tokio::spawn(async move {
                        if let Some(stopped) = due.run(api, &*daemon).await {
                            daemon.metrics.stop(stopped);
                        }
                    });
                }
                Err(e) => error!("{e:#}"),
            }
        }
    }

    /// `12 sessions; lab: up, 3 sessions; ci@203.0.113.9: idle, stop due in 240 s`, for `systemctl status`.
    async fn status_text(&self) -> String {
        let sessions = self.limits.sessions();
        let mut text = format!("{sessions} session{}", if sessions == 1 { "" } else { "s" });
        let ctx = self.current();
        if let Ok(vms) = crate::status::collect(&self.store, Some(&ctx.config)).await {
            self.metrics.set_vms(&vms);
            let now = now_ms();
            for vm in vms.iter().filter(|vm| vm.state != Shown::Stopped).take(8) {
                text.push_str(&format!("; {}: {}", vm.key, vm.state));
                if !vm.sessions.is_empty() {
                    let n = vm.sessions.len();
                    text.push_str(&format!(", {n} session{}", if n == 1 { "" } else { "s" }));
                }
                if let Some(due) = vm.stop_due {
                    text.push_str(&format!(
                        ", stop due in {} s",
                        due.saturating_sub(now) / 1000
                    ));
                }
            }
        }
        text
    }
}

/// Pings systemd's watchdog at half its interval, but only while every accept loop keeps coming round: a
/// stuck loop stops the pings, and systemd restarts the daemon.
pub(super) async fn watchdog(every: Duration, heartbeats: Vec<Arc<AtomicU64>>) {
    let mut tick = interval(every / 2);
    loop {
        tick.tick().await;
        let now = now_ms();
        let stale = (every.as_millis() as u64).max(2000);
        if heartbeats
            .iter()
            .all(|beat| now.saturating_sub(beat.load(Ordering::Relaxed)) < stale)
        {
            let _ = sd_notify::notify(&[NotifyState::Watchdog]);
        } else {
            warn!("an accept loop has not come round for {stale} ms; not pinging the watchdog");
        }
    }
}
