//! The start ahead of logins at a keep-warm window's start (`pre_wake`): made by the sweep (the sweep's timer,
//! or the daemon), as the holder of the VM's start like any connection's, but with no connection to relay.

use std::{sync::Arc, time::Instant};

use tracing::{Instrument, Level, info_span, warn};

use super::{decision, rules, tick_holding};
use crate::{
    config::Profile,
    vm::{
        api::{Api, StartRequest},
        state::{self, Action, Event},
        store::{Store, StoreError, VmKey, now_ms},
    },
};

/// A VM to start now, ahead of logins.
#[derive(Debug)]
pub struct PreWake {
    pub(super) store: Store,
    pub(super) key: VmKey,
    pub(super) profile: Arc<Profile>,
}

impl PreWake {
    pub fn key(&self) -> &VmKey {
        &self.key
    }

    /// Starts the VM unless the machine no longer says so (a login, or another host, came first); the
    /// journal says how it went.
    pub async fn run(self, api: &Api) {
        let span = info_span!("vm", vm_key = %self.key, profile = %self.profile.label());
        if let Err(e) = self.start(api).instrument(span.clone()).await {
            span.in_scope(|| warn!("pre-wake: {e}"));
        }
    }

    async fn start(&self, api: &Api) -> Result<(), StoreError> {
        let rules = rules(&self.profile);
        let (_claim, me, view, action) = tick_holding(&self.store, &self.key, &rules).await?;
        if action != Action::CallStart {
            return Ok(());
        }
        decision(
            Level::INFO,
            &self.key,
            &view,
            "pre_wake",
            "a keep-warm window starts",
            Default::default(),
        );
        let request = StartRequest {
            connection: None,
            profile: self.profile.name.as_deref(),
            reason: Some("pre_wake"),
        };
        let began = Instant::now();
        let deadline = tokio::time::Instant::now() + self.profile.boot_timeout;
        let result = api
            .start(&request, deadline, self.profile.boot_timeout)
            .await;
        let answer = result.as_ref().map(|s| s.addr).map_err(|e| e.to_string());
        let event = Event::Started {
            me: &me,
            answer: answer.as_ref().map(|a| *a).map_err(String::as_str),
            ms: began.elapsed().as_millis() as u64,
        };
        let (after, ()) = self
            .store
            .transact(&self.key, false, |view| {
                (state::step(view, event, now_ms(), &rules).write, ())
            })
            .await?;
        match answer {
            Ok(vm) => decision(
                Level::INFO,
                &self.key,
                &after,
                "pre_woken",
                &vm.to_string(),
                Default::default(),
            ),
            Err(why) => decision(
                Level::WARN,
                &self.key,
                &after,
                "pre_wake_failed",
                &why,
                Default::default(),
            ),
        }
        Ok(())
    }
}
