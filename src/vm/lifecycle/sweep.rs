//! The sweep: takes over what killed processes left undone (an idle wait, a session's disconnect), and
//! forgets VMs that have not run for a long time. Run every minute by the sweep's timer, and by the daemon.

use std::{io, sync::Arc, time::Duration};

use tracing::{Level, debug, warn};

use super::{IdleWatch, Lifecycle, decision, millis};
use crate::{
    config::{Config, Profile},
    vm::store::{VmDir, now_ms},
};

/// Takes over what killed processes left undone: for every VM that may run, has no session and no idle
/// waiter, counts the idle time from its last disconnect (or from now, if a session died without saying
/// so) and returns its idle wait if due by `adopt_until`; later ones are left for a later sweep.
pub async fn sweep(lifecycle: &Lifecycle, config: &Config, adopt_until: u64) -> Vec<IdleWatch> {
    let mut watches = Vec::new();
    let vms = match lifecycle.store.vms() {
        Ok(vms) => vms,
        Err(e) => {
            warn!("reading {}: {e}", lifecycle.store.root().display());
            return watches;
        }
    };
    for dir in vms {
        let profile = config.profile_labeled(&dir.key().profile);
        match sweep_vm(&dir, profile, adopt_until).await {
            Ok(Some(watch)) => watches.push(watch),
            Ok(None) => {}
            Err(e) => warn!(vm_key = %dir.key(), "sweeping: {e}"),
        }
    }
    watches
}

/// How long the state of a VM that does not run stays after its last change. Every client address that
/// ever identified has a VM here (per-client scope): without this, scanners would grow the directory forever.
pub(super) const FORGET_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

/// One VM: forgotten if it has not run for a long time; adopted if it may run, is idle and nobody waits.
async fn sweep_vm(
    dir: &VmDir,
    profile: Option<&Arc<Profile>>,
    adopt_until: u64,
) -> io::Result<Option<IdleWatch>> {
    let gate = dir.gate().await?;
    let mut state = gate.read()?;
    let (live, dead) = gate.live_sessions()?;
    if live > 0 {
        return Ok(None);
    }
    if !state.may_run() {
        let last_change = state.since.max(state.last_disconnect.unwrap_or(0));
        if now_ms().saturating_sub(last_change) > millis(FORGET_AFTER) {
            gate.forget()?;
            debug!(vm_key = %dir.key(), "forgotten: not run for a day");
        }
        return Ok(None);
    }
    let Some((profile, stop)) = profile.and_then(|p| Some((p, p.stop.as_ref()?))) else {
        return Ok(None);
    };
    let Some(lock) = gate.try_idle()? else {
        return Ok(None);
    };
    let now = now_ms();
    let idle_since = match state.last_disconnect {
        Some(at) if dead == 0 && at >= state.since => at,
        _ => now,
    };
    state.last_disconnect = Some(idle_since);
    let due = idle_since + millis(stop.idle_timeout);
    let watch = (due <= adopt_until).then(|| IdleWatch::begin(&mut state, dir, lock, profile, due));
    gate.write(&state)?;
    if watch.is_some() {
        decision(
            Level::INFO,
            dir,
            &state,
            "idle",
            "adopted: the VM's last session or idle waiter is gone",
            Duration::from_millis(now - idle_since),
        );
    }
    Ok(watch)
}
