//! Guard: who may wake VMs. Port 22 faces strangers, and a transparent proxy cannot see authentication, so it
//! guards the wake itself: a profile's `client_networks`, a start budget per client address
//! (`source_start_limit`), and penalties for addresses whose connections wake VMs and go no further, like
//! OpenSSH's `PerSourcePenalties`. What an address has done is kept in the store (see
//! [`crate::vm::store::Store::transact_source`]), so that the per-connection processes, and the hosts of an
//! etcd cluster, all count it.
//!
//! Only a connection that wakes a VM (makes the start call for a VM that does not run) spends budget or can
//! earn a strike: joining a start under way, or reaching a VM that is up, costs nothing.

use std::{fmt, net::IpAddr, str::FromStr, time::Duration};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::{
    config::Profile,
    vm::{
        state::{Millis, millis},
        store::{Store, now_ms},
    },
};

/// Strikes in a row that earn a penalty, unless `penalty_strikes` says otherwise.
pub const PENALTY_STRIKES: u32 = 3;
/// The first penalty; each further one in a row doubles, up to `penalty_max`.
pub const FIRST_PENALTY: Duration = Duration::from_secs(30);
pub const PENALTY_MAX: Duration = Duration::from_secs(60 * 60);
/// Strikes older than this are forgotten: an address that woke a VM now and then is no attacker.
pub const STRIKE_MEMORY: Duration = Duration::from_secs(60 * 60);

/// `5 per 10m`: at most `starts` VM starts from one address within `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartLimit {
    pub starts: usize,
    pub window: Duration,
}

impl FromStr for StartLimit {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> anyhow::Result<StartLimit> {
        let Some((starts, window)) = text.split_once(" per ") else {
            bail!("{text:?} is not of the form \"5 per 10m\"");
        };
        let starts = starts
            .trim()
            .parse()
            .with_context(|| format!("{starts:?} is not a number of starts"))?;
        let window = humantime::parse_duration(window.trim())
            .with_context(|| format!("{window:?} is not a duration such as 10m"))?;
        if starts == 0 || window.is_zero() {
            bail!("{text:?} allows no start at all");
        }
        Ok(StartLimit { starts, window })
    }
}

impl fmt::Display for StartLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} per {}",
            self.starts,
            humantime::format_duration(self.window)
        )
    }
}

/// What the store keeps of one client address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SourceRecord {
    /// When it woke a VM, within the longest start window.
    pub starts: Vec<Millis>,
    /// When its connections woke a VM and went no further, within [`STRIKE_MEMORY`].
    pub strikes: Vec<Millis>,
    /// Penalties in a row: each one doubles the next.
    pub penalties: u32,
    pub penalized_until: Option<Millis>,
}

impl SourceRecord {
    fn parse(body: Option<&[u8]>) -> SourceRecord {
        body.and_then(|b| serde_json::from_slice(b).ok())
            .unwrap_or_default()
    }

    /// Nothing worth keeping: removed from the store.
    fn is_empty(&self, now: Millis) -> bool {
        self.starts.is_empty()
            && self.strikes.is_empty()
            && self.penalized_until.is_none_or(|until| until <= now)
    }
}

/// Why the guard refuses a connection. The text is what the user's ssh client prints.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("VM not started: your address {0} may not start VMs on this host")]
    Network(IpAddr),
    #[error(
        "VM not started: {starts} VM starts from your address in the last {window}; try again in {wait}",
        starts = .limit.starts,
        window = humantime::format_duration(.limit.window),
        wait = humantime::format_duration(*.wait),
    )]
    StartLimit { limit: StartLimit, wait: Duration },
    #[error(
        "VM not started: connections from your address woke VMs and went no further; try again in {}",
        humantime::format_duration(*.0)
    )]
    Penalty(Duration),
}

impl Refused {
    /// The rule, as the journal's `REFUSED_BY` field and the metrics' `rule` label say it.
    pub fn rule(&self) -> &'static str {
        match self {
            Refused::Network(_) => "client_networks",
            Refused::StartLimit { .. } => "source_start_limit",
            Refused::Penalty(_) => "penalty",
        }
    }
}

/// The guard for one connection's profile.
pub struct Guard<'a> {
    pub store: &'a Store,
    pub profile: &'a Profile,
}

impl Guard<'_> {
    /// Before anything is started: the address is one the profile serves, and not penalized. Returns what
    /// the store knows of it.
    pub async fn admit(&self, source: IpAddr) -> Result<SourceRecord, Refused> {
        let networks = &self.profile.client_networks;
        if !networks.is_empty() && !networks.iter().any(|net| net.contains(&source)) {
            return Err(Refused::Network(source));
        }
        let record = match self.store.source(source).await {
            Ok(body) => SourceRecord::parse(body.as_deref()),
            // The store cannot say: the login goes on, as with every other store failure.
            Err(e) => {
                warn!("reading the record of {source}: {e}");
                SourceRecord::default()
            }
        };
        let now = now_ms();
        match record.penalized_until {
            Some(until) if until > now => Err(Refused::Penalty(wait(now, until))),
            _ => Ok(record),
        }
    }

    /// Before this connection would wake its VM: the address has starts left in its budget.
    pub fn may_start(&self, record: &SourceRecord) -> Result<(), Refused> {
        let Some(limit) = self.profile.start_limit else {
            return Ok(());
        };
        let now = now_ms();
        let since = now.saturating_sub(millis(limit.window));
        let recent: Vec<Millis> = record
            .starts
            .iter()
            .copied()
            .filter(|&at| at > since)
            .collect();
        if recent.len() < limit.starts {
            return Ok(());
        }
        // Room again once the oldest start that counts leaves the window.
        let oldest = recent[recent.len() - limit.starts];
        Err(Refused::StartLimit {
            limit,
            wait: wait(now, oldest + millis(limit.window)),
        })
    }

    /// This connection woke a VM: one start spent.
    pub async fn started(&self, source: IpAddr) {
        let keep = self
            .profile
            .start_limit
            .map_or(Duration::ZERO, |l| l.window);
        self.update(source, |record, now| {
            record.starts.retain(|&at| at + millis(keep) > now);
            if !keep.is_zero() {
                record.starts.push(now);
            }
        })
        .await;
    }

    /// This connection woke a VM and ended: `strike` if it went no further. Enough strikes in a row earn a
    /// penalty, twice as long as the last; a connection that went further forgives them.
    pub async fn ended(&self, source: IpAddr, woke: bool, strike: bool, record: &SourceRecord) {
        let strikes_needed = self.profile.penalty_strikes;
        if strikes_needed == 0 || (!woke && record.strikes.is_empty() && record.penalties == 0) {
            return;
        }
        let max = self.profile.penalty_max;
        self.update(source, |record, now| {
            record
                .strikes
                .retain(|&at| at + millis(STRIKE_MEMORY) > now);
            if !strike {
                record.strikes.clear();
                record.penalties = 0;
                return;
            }
            record.strikes.push(now);
            if record.strikes.len() >= strikes_needed as usize {
                let penalty = FIRST_PENALTY
                    .saturating_mul(1 << record.penalties.min(16))
                    .min(max);
                record.penalties += 1;
                record.penalized_until = Some(now + millis(penalty));
                record.strikes.clear();
                warn!(
                    refused_by = "penalty",
                    penalty_s = penalty.as_secs(),
                    "{source} is refused for {}: its connections woke VMs and went no further",
                    humantime::format_duration(penalty)
                );
            }
        })
        .await;
    }

    async fn update(&self, source: IpAddr, change: impl Fn(&mut SourceRecord, Millis)) {
        let result = self
            .store
            .transact_source(source, |body| {
                let now = now_ms();
                let mut record = SourceRecord::parse(body);
                change(&mut record, now);
                let next = (!record.is_empty(now))
                    .then(|| serde_json::to_vec(&record).unwrap_or_default());
                (next, ())
            })
            .await;
        if let Err(e) = result {
            warn!("recording what {source} did: {e}");
        }
    }
}

/// From `now` to `until`, in whole seconds, at least one.
fn wait(now: Millis, until: Millis) -> Duration {
    Duration::from_secs(until.saturating_sub(now).div_ceil(1000).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_read_as_written() {
        let limit: StartLimit = "5 per 10m".parse().unwrap();
        assert_eq!(
            limit,
            StartLimit {
                starts: 5,
                window: Duration::from_secs(600)
            }
        );
        assert_eq!(limit.to_string(), "5 per 10m");
        for wrong in ["5", "five per 10m", "5 per ever", "0 per 10m"] {
            assert!(wrong.parse::<StartLimit>().is_err(), "{wrong}");
        }
    }

    #[test]
    fn refusals_say_when_to_try_again() {
        let refused = Refused::StartLimit {
            limit: "5 per 10m".parse().unwrap(),
            wait: Duration::from_secs(240),
        };
        assert_eq!(
            refused.to_string(),
            "VM not started: 5 VM starts from your address in the last 10m; try again in 4m"
        );
    }
}
