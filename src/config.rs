//! Configuration: flags, environment and the TOML file merged, checked in one pass, into profiles.
//!
//! Precedence, highest first: command-line flags, `SSH_ON_DEMAND_*` environment variables, the file's top
//! level, built-in defaults. A `[profiles.NAME]` table takes the connections of its `ports` and overrides the
//! top level for them. The API token and header values are never taken from the command line or the
//! environment, where other users can read them (`ps`, `/proc/*/environ`): only from the file, another file
//! or a systemd credential.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use ipnet::IpNet;
use reqwest::header::HeaderName;

use crate::{
    cli::{Cli, Settings, SilentClients, VmScope, settings_reference},
    guard::StartLimit,
    secret::{Secret, SecretUrl},
    vm::warm::Windows,
};

/// Read when no `--config` is given; its absence is not an error.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/ssh-on-demand/config.toml";
/// Name of the API token in `$CREDENTIALS_DIRECTORY` (`LoadCredential=api-token:…` in the unit).
pub const TOKEN_CREDENTIAL: &str = "api-token";
/// Name of the extra headers in `$CREDENTIALS_DIRECTORY` (`LoadCredential=api-headers:…` in the unit).
pub const HEADERS_CREDENTIAL: &str = "api-headers";

pub mod defaults;
mod file;
mod profile;
mod store;

use file::read_file;

pub use store::{EtcdConfig, StoreConfig};

/// The effective configuration.
#[derive(Debug)]
pub struct Config {
    /// The TOML file that was read, if any.
    pub file: Option<PathBuf>,
    /// The local store's directory.
    pub state_dir: PathBuf,
    pub store: StoreConfig,
    /// For connections that no named profile's `ports` takes. `None` when the file only has named profiles.
    pub default: Option<Arc<Profile>>,
    pub profiles: Vec<Arc<Profile>>,
    pub daemon: DaemonConfig,
}

/// One VM (or pool of VMs) behind this host: how to start and stop it, and every deadline on the way.
#[derive(Debug)]
pub struct Profile {
    /// Sent to the APIs as `profile`. `None` only for a default profile without `profile = …`.
    pub name: Option<String>,
    /// Local ports whose connections use this profile.
    pub ports: Vec<u16>,
    pub api: ApiConfig,
    pub stop: Option<StopConfig>,
    pub min_run_time: Option<Duration>,
    pub keep_warm: Arc<Windows>,
    pub pre_wake: bool,
    pub vm_scope: VmScope,
    pub vm_port: u16,
    /// Where the start API's answers may point, as `vm::targets` reads it; empty: anywhere but what it
    /// refuses by default.
    pub vm_networks: Vec<IpNet>,
    /// Client addresses that may wake the profile's VMs; empty: any.
    pub client_networks: Vec<IpNet>,
    /// `None`: no budget.
    pub start_limit: Option<StartLimit>,
    /// 0: no penalties.
    pub penalty_strikes: u32,
    pub penalty_max: Duration,
    pub silent_clients: SilentClients,
    pub boot_timeout: Duration,
    pub vm_connect_timeout: Duration,
    pub vm_banner_timeout: Duration,
    pub client_banner_timeout: Duration,
}

/// Extra headers, in order. Header values may be credentials too, so they are kept as secrets.
pub type Headers = Vec<(HeaderName, Secret)>;

/// What the start and stop requests share.
#[derive(Debug)]
pub struct ApiConfig {
    pub url: SecretUrl,
    pub token: Option<Secret>,
    /// Where the token was read from, for `check-config`.
    pub token_source: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    /// `api_headers` from the configuration file.
    pub headers: Headers,
    /// The headers of `api_headers_file` or the systemd credential, and where they were read from.
    pub headers_file: Option<(PathBuf, Headers)>,
    pub timeout: Duration,
}

impl ApiConfig {
    /// Every header to send, the file's after the configuration's.
    pub fn all_headers(&self) -> impl Iterator<Item = &(HeaderName, Secret)> {
        let from_file = self.headers_file.iter().flat_map(|(_, headers)| headers);
        self.headers.iter().chain(from_file)
    }
}

#[derive(Debug)]
pub struct StopConfig {
    pub url: SecretUrl,
    pub idle_timeout: Duration,
    pub timeout: Duration,
}

#[derive(Debug)]
pub struct DaemonConfig {
    pub max_sessions: usize,
    pub max_sessions_per_source: usize,
    pub max_pending_per_vm: usize,
    pub drain_timeout: Duration,
    pub metrics_listen: Option<String>,
}

impl Profile {
    /// The name the state directory and the journal know this profile by.
    pub fn label(&self) -> &str {
        self.name.as_deref().unwrap_or("default")
    }
}

impl Config {
    /// The configuration for this process: flags and environment from `cli`, the TOML file it names (or the
    /// default one), and token credentials from `$CREDENTIALS_DIRECTORY`.
    pub fn load(cli: &Cli) -> Result<Config> {
        ensure!(
            cli.api_header.is_empty(),
            "--api-header is not accepted: every local user can read the command line (ps, systemctl \
             status); put the headers in api_headers_file or the {HEADERS_CREDENTIAL} credential, or (not \
             secret) api_headers in the configuration file"
        );
        let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
        Self::resolve(
            cli.config.as_deref(),
            cli.settings.clone(),
            credentials.as_deref(),
        )
    }

    /// Merges `given` (flags and environment) over the file at `file` (or [`DEFAULT_CONFIG_FILE`] if it
    /// exists), applies defaults and checks everything an operator can get wrong.
    pub fn resolve(
        file: Option<&Path>,
        given: Settings,
        credentials_dir: Option<&Path>,
    ) -> Result<Config> {
        let file::File {
            path,
            settings: from_file,
            profile_keys,
        } = read_file(file)?;
        let shown_path = path.as_deref().unwrap_or(Path::new(DEFAULT_CONFIG_FILE));
        ensure!(
            from_file.ports.is_empty(),
            "ports is set at the top level of {}: it belongs in a [profiles.NAME] table",
            shown_path.display()
        );
        let mut top = given.or(&from_file);

        let mut profiles = Vec::new();
        for (name, table) in std::mem::take(&mut top.profiles) {
            let context = || format!("[profiles.{name}] in {}", shown_path.display());
            check_name(&name).with_context(context)?;
            let keys = profile_keys.get(&name).map_or(&[][..], Vec::as_slice);
            check_profile_table(&table, keys).with_context(context)?;
            let ports = table.ports.clone();
            let settings = Settings {
                profile: Some(name.clone()),
                ..table.or(&top)
            };
            let profile =
                Profile::resolve(settings, ports, credentials_dir).with_context(context)?;
            profiles.push(Arc::new(profile));
        }
        let mut seen = BTreeMap::new();
        for profile in &profiles {
            for port in &profile.ports {
                if let Some(other) = seen.insert(*port, profile.label()) {
                    bail!(
                        "port {port} is in the ports of both [profiles.{other}] and [profiles.{}]",
                        profile.label()
                    );
                }
            }
        }

        let host = top.clone();
        let default = match &top.api_url {
            None if !profiles.is_empty() => None,
            None => bail!(
                "api_url is not set: give --api-url, SSH_ON_DEMAND_API_URL or api_url in {}",
                shown_path.display()
            ),
            Some(_) => {
                if let Some(name) = &top.profile {
                    check_name(name).context("profile")?;
                }
                Some(Arc::new(Profile::resolve(
                    top,
                    Vec::new(),
                    credentials_dir,
                )?))
            }
        };

        if let Some(default) = &default {
            ensure!(
                !profiles.iter().any(|p| p.label() == default.label()),
                "[profiles.{0}] has the name of the top-level profile ({0}); rename one",
                default.label()
            );
        }
        let all: Vec<&Profile> = default
            .iter()
            .chain(&profiles)
            .map(|p| p.as_ref())
            .collect();
        let store = StoreConfig::resolve(&host, &all, credentials_dir)?;
        Ok(Config {
            file: path,
            store,
            state_dir: host
                .state_dir
                .unwrap_or_else(|| PathBuf::from(defaults::STATE_DIR)),
            default,
            profiles,
            daemon: DaemonConfig {
                max_sessions: at_least_one(
                    "max_sessions",
                    host.max_sessions,
                    defaults::MAX_SESSIONS,
                )?,
                max_sessions_per_source: at_least_one(
                    "max_sessions_per_source",
                    host.max_sessions_per_source,
                    defaults::MAX_SESSIONS_PER_SOURCE,
                )?,
                max_pending_per_vm: at_least_one(
                    "max_pending_per_vm",
                    host.max_pending_per_vm,
                    defaults::MAX_PENDING_PER_VM,
                )?,
                drain_timeout: positive(
                    "drain_timeout",
                    host.drain_timeout,
                    defaults::DRAIN_TIMEOUT,
                )?,
                metrics_listen: host.metrics_listen,
            },
        })
    }

    /// The state directory that `cli` names (or the default), for when the configuration is unusable.
    pub fn state_dir_of(cli: &Cli) -> PathBuf {
        cli.settings
            .state_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(defaults::STATE_DIR))
    }

    /// The profile for a connection that arrived on local port `port`.
    pub fn profile_for_port(&self, port: u16) -> Option<&Arc<Profile>> {
        self.profiles
            .iter()
            .find(|p| p.ports.contains(&port))
            .or(self.default.as_ref())
    }

    /// The profile called `name` (the default one's name included).
    pub fn profile_named(&self, name: &str) -> Option<&Arc<Profile>> {
        self.all_profiles()
            .find(|p| p.name.as_deref() == Some(name))
    }

    /// The profile whose [`Profile::label`] is `label`, as the state directory knows it.
    pub fn profile_labeled(&self, label: &str) -> Option<&Arc<Profile>> {
        self.all_profiles().find(|p| p.label() == label)
    }

    pub fn all_profiles(&self) -> impl Iterator<Item = &Arc<Profile>> {
        self.default.iter().chain(&self.profiles)
    }
}

/// A profile's table sets only what a profile has: not the host's settings, not its own name.
fn check_profile_table(table: &Settings, keys: &[String]) -> Result<()> {
    let reference = settings_reference();
    let of_the_host = |key: &String| {
        key == "profiles" || reference.iter().any(|s| &s.key == key && s.host_only())
    };
    if let Some(key) = keys.iter().find(|key| of_the_host(key)) {
        bail!("{key} is a setting of the host: set it at the top level");
    }
    ensure!(
        table.profile.is_none(),
        "profile is set: the table's name is the profile's name"
    );
    ensure!(
        !table.ports.is_empty(),
        "no ports: list the local ports whose connections this profile takes"
    );
    Ok(())
}

/// Profile names become directory names and journal fields: keep them plain.
fn check_name(name: &str) -> Result<()> {
    let plain = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    ensure!(
        plain && !name.is_empty() && !name.starts_with('.') && name.len() <= 64,
        "profile name {name:?} must be 1 to 64 letters, digits, '-', '_' or '.', not starting with '.'"
    );
    Ok(())
}

/// Longer than any wait needs, and short enough for every clock: "300000000000 years" parses as a
/// duration, but no deadline can be that far.
const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);

fn positive(name: &str, value: Option<Duration>, default: Duration) -> Result<Duration> {
    let value = value.unwrap_or(default);
    ensure!(!value.is_zero(), "{name} must be more than zero");
    ensure!(value <= MAX_DURATION, "{name} must be at most 10 years");
    Ok(value)
}

fn at_least_one(name: &str, value: Option<usize>, default: usize) -> Result<usize> {
    let value = value.unwrap_or(default);
    ensure!(value > 0, "{name} must be at least 1");
    Ok(value)
}

mod display;
#[cfg(test)]
mod tests;
