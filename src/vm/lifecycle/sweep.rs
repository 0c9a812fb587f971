//! The sweep: takes over what killed processes (or lost hosts) left undone: a session's end that was never
//! recorded, an idle wait nobody runs any more, a call whose process died; and forgets VMs that have not run
//! for a day. Run every minute by the sweep's timer, and by the daemon.

use std::{sync::Arc, time::Duration};

use tracing::{Level, warn};

use super::{IdleEnd, IdleWatch, Lifecycle, PreWake, Profiles, decision, holder, rules};
use crate::{
    cli::VmScope,
    config::{Config, Profile},
    vm::{
        api::Api,
        state::{self, Action, Event, Rules},
        store::{StoreError, VmKey, now_ms},
    },
};

/// What the sweep found to do: an idle wait (or a stop due now), or a start ahead of logins.
#[derive(Debug)]
pub enum Due {
    Stop(IdleWatch),
    Wake(PreWake),
}

impl Due {
    pub fn key(&self) -> &VmKey {
        match self {
            Due::Stop(watch) => watch.key(),
            Due::Wake(wake) => wake.key(),
        }
    }

    /// Runs it with `api`, an idle wait with its profile as `profiles` has it then; how a stop ended, for
    /// the metrics.
    pub async fn run(self, api: Arc<Api>, profiles: &dyn Profiles) -> Option<IdleEnd> {
        match self {
            Due::Stop(watch) => Some(watch.run(api, profiles).await),
            Due::Wake(wake) => {
                wake.run(&api).await;
                None
            }
        }
    }
}

/// Steps every VM's machine with a tick (and those of profiles that start their VM ahead of logins, even
/// before they have a record), and returns what is due: the idle waits due by `adopt_until` that this
/// process takes over (later ones are left for a later sweep), and starts ahead of logins.
pub async fn sweep(lifecycle: &Lifecycle, config: &Config, adopt_until: u64) -> Vec<Due> {
    let mut watches = Vec::new();
    if !lifecycle.store.may_decide() {
        return watches;
    }
    let mut vms = match lifecycle.store.vms().await {
        Ok(vms) => vms,
        Err(e) => {
            warn!("sweeping: {e}");
            return watches;
        }
    };
    for profile in config
        .all_profiles()
        .filter(|p| p.pre_wake && p.vm_scope == VmScope::Profile)
    {
        let key = VmKey {
            profile: profile.label().to_owned(),
            client: None,
        };
        if !vms.contains(&key) {
            vms.push(key);
        }
    }
    for key in vms {
        let profile = config.profile_labeled(&key.profile);
        match sweep_vm(lifecycle, &key, profile, adopt_until).await {
            Ok(Some(watch)) => watches.push(watch),
            Ok(None) => {}
            Err(e) => warn!(vm_key = %key, "sweeping: {e}"),
        }
    }
    watches
}

/// The sweep of one VM: the store says it lost a session without its host saying so.
pub async fn sweep_one(lifecycle: &Lifecycle, config: &Config, key: &VmKey) -> Option<Due> {
    if !lifecycle.store.may_decide() {
        return None;
    }
    let profile = config.profile_labeled(&key.profile);
    sweep_vm(lifecycle, key, profile, u64::MAX)
        .await
        .unwrap_or_else(|e| {
            warn!(vm_key = %key, "sweeping: {e}");
            None
        })
}

async fn sweep_vm(
    lifecycle: &Lifecycle,
    key: &VmKey,
    profile: Option<&Arc<Profile>>,
    adopt_until: u64,
) -> Result<Option<Due>, StoreError> {
    let store = &lifecycle.store;
    // A profile no longer configured: nothing of it is stopped, but it is still forgotten in time.
    let rules = profile.map_or(Rules::default(), |p| rules(p));
    // Stopping needs a holder: a stop found due is left to the idle wait returned, which holds it.
    let me = holder(store, None);
    let (view, action) = store
        .transact(key, true, |view| {
            let now = now_ms();
            let step = state::step(view, Event::Tick { me: &me }, now, &rules);
            match step.action {
                Action::CallStop(_) => (state::Write::Keep, Action::WaitUntil(now)),
                Action::CallStart => (state::Write::Keep, Action::CallStart),
                _ => (step.write, step.action),
            }
        })
        .await?;
    let Some(profile) = profile else {
        return Ok(None);
    };
    let due = match action {
        Action::WaitUntil(due) => due,
        Action::CallStart => {
            return Ok(Some(Due::Wake(PreWake {
                store: store.clone(),
                key: key.clone(),
                profile: profile.clone(),
            })));
        }
        _ => return Ok(None),
    };
    if due > adopt_until.max(now_ms()) {
        return Ok(None);
    }
    let Some(waiter) = store.try_idle_waiter(key)? else {
        return Ok(None);
    };
    decision(
        Level::INFO,
        key,
        &view,
        "idle",
        "adopted: the VM's last session or idle waiter is gone",
        Duration::from_millis(now_ms().saturating_sub(view.record.since)),
    );
    Ok(Some(Due::Stop(IdleWatch {
        store: store.clone(),
        key: key.clone(),
        profile: profile.clone(),
        due,
        _waiter: waiter,
    })))
}
