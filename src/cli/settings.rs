//! Every setting, as flags, `SSH_ON_DEMAND_*` variables and the TOML file's keys all give it: one struct is
//! the command line's, the file's schema, and the merge of the two.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use clap::Args;
use merge::Merge;
use serde::Deserialize;

use super::{SilentClients, StateStore, VmScope};

/// Every setting. Every field is optional here: [`crate::config::Config::resolve`] layers flags over
/// environment over file, a profile's table over the file's top level, and applies the defaults. The same
/// struct is the schema of the file's top level and of each `[profiles.NAME]` table, which may not set the
/// host's settings (those marked "Host" or "Daemon").
#[derive(Debug, Clone, Default, Args, Deserialize, Merge)]
#[serde(deny_unknown_fields)]
#[merge(strategy = merge::option::overwrite_none)]
pub struct Settings {
    /// URL of the start API, which gets one POST per connection (required)
    #[arg(long, env = "SSH_ON_DEMAND_API_URL", value_name = "URL", global = true)]
    pub api_url: Option<String>,

    /// File holding the API's bearer token [default: the systemd credential api_token_credential, if any]
    #[arg(
        long,
        env = "SSH_ON_DEMAND_API_TOKEN_FILE",
        value_name = "FILE",
        global = true
    )]
    pub api_token_file: Option<PathBuf>,

    /// Name of the systemd credential holding the API's bearer token, used when api_token_file is not set [default: api-token]
    #[arg(
        long,
        env = "SSH_ON_DEMAND_API_TOKEN_CREDENTIAL",
        value_name = "NAME",
        global = true
    )]
    pub api_token_credential: Option<String>,

    /// PEM file of extra CA certificates trusted for an https start or stop API, besides the system's
    #[arg(
        long,
        env = "SSH_ON_DEMAND_API_CA_FILE",
        value_name = "FILE",
        global = true
    )]
    pub api_ca_file: Option<PathBuf>,

    /// File only: extra headers that are no secret (the words for the man page: `reference::FILE_ONLY`).
    #[arg(skip)]
    #[serde(default)]
    #[merge(strategy = merge::vec::overwrite_empty)]
    pub api_headers: Vec<String>,

    /// File of extra headers for the start and stop API, one "Name: value" per line; their values are kept secret [default: the systemd credential api_headers_credential, if any]
    #[arg(
        long,
        env = "SSH_ON_DEMAND_API_HEADERS_FILE",
        value_name = "FILE",
        global = true
    )]
    pub api_headers_file: Option<PathBuf>,

    /// Name of the systemd credential holding extra headers, used when api_headers_file is not set [default: api-headers]
    #[arg(
        long,
        env = "SSH_ON_DEMAND_API_HEADERS_CREDENTIAL",
        value_name = "NAME",
        global = true
    )]
    pub api_headers_credential: Option<String>,

    /// Time one request to the start or stop API may take [default: 10s]
    #[arg(long, env = "SSH_ON_DEMAND_API_TIMEOUT", value_parser = humantime::parse_duration, value_name = "DURATION", global = true)]
    #[serde(default, with = "humantime_serde")]
    pub api_timeout: Option<Duration>,

    /// Name of the profile used for connections that no [profiles.NAME] table takes, passed on to the APIs
    #[arg(
        long,
        env = "SSH_ON_DEMAND_PROFILE",
        value_name = "NAME",
        global = true
    )]
    pub profile: Option<String>,

    /// URL of the stop API, which gets one POST when a VM has been idle for idle_timeout [default: VMs are never stopped]
    #[arg(
        long,
        env = "SSH_ON_DEMAND_STOP_URL",
        value_name = "URL",
        global = true
    )]
    pub stop_url: Option<String>,

    /// Time from a VM's last disconnect to its stop [default: 15m]
    #[arg(long, env = "SSH_ON_DEMAND_IDLE_TIMEOUT", value_parser = humantime::parse_duration, value_name = "DURATION", global = true)]
    #[serde(default, with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,

    /// Time a stop may take, retries included; logins to the VM wait for it at most this long [default: 60s]
    #[arg(long, env = "SSH_ON_DEMAND_STOP_TIMEOUT", value_parser = humantime::parse_duration, value_name = "DURATION", global = true)]
    #[serde(default, with = "humantime_serde")]
    pub stop_timeout: Option<Duration>,

    /// A VM is not stopped sooner than this after its start, however idle (platforms that bill a minimum per start) [default: none]
    #[arg(long, env = "SSH_ON_DEMAND_MIN_RUN_TIME", value_parser = humantime::parse_duration, value_name = "DURATION", global = true)]
    #[serde(default, with = "humantime_serde")]
    pub min_run_time: Option<Duration>,

    /// A window in which an idle VM is not stopped, as "DAYS HH:MM-HH:MM [TIME ZONE]", e.g. "Mon-Fri 08:00-18:00 Europe/Berlin"; repeat for more (TOML: keep_warm = [...])
    #[arg(long = "keep-warm", value_name = "WINDOW", global = true)]
    #[serde(default)]
    #[merge(strategy = merge::vec::overwrite_empty)]
    pub keep_warm: Vec<String>,

    /// Start a profile's VM (vm_scope = "profile") at the start of each keep_warm window, so that the first login finds it up [default: false]
    #[arg(
        long,
        env = "SSH_ON_DEMAND_PRE_WAKE",
        value_name = "BOOL",
        global = true
    )]
    pub pre_wake: Option<bool>,

    /// Which connections share a VM: those from one client address ("client"), or all of the profile ("profile") [default: client]
    #[arg(
        long,
        env = "SSH_ON_DEMAND_VM_SCOPE",
        value_enum,
        value_name = "SCOPE",
        global = true
    )]
    pub vm_scope: Option<VmScope>,

    /// Port of the VM's sshd when the start API names none [default: 22]
    #[arg(
        long,
        env = "SSH_ON_DEMAND_VM_PORT",
        value_name = "PORT",
        global = true
    )]
    pub vm_port: Option<u16>,

    /// Deadline for the start API and the VM's sshd together, per connection [default: 120s]
    #[arg(long, env = "SSH_ON_DEMAND_BOOT_TIMEOUT", value_parser = humantime::parse_duration, value_name = "DURATION", global = true)]
    #[serde(default, with = "humantime_serde")]
    pub boot_timeout: Option<Duration>,

    /// Time one TCP connect attempt to the VM may take [default: 1s]
    #[arg(long, env = "SSH_ON_DEMAND_VM_CONNECT_TIMEOUT", value_parser = humantime::parse_duration, value_name = "DURATION", global = true)]
    #[serde(default, with = "humantime_serde")]
    pub vm_connect_timeout: Option<Duration>,

    /// Time the VM may take to send its SSH identification once connected, per attempt [default: 5s]
    #[arg(long, env = "SSH_ON_DEMAND_VM_BANNER_TIMEOUT", value_parser = humantime::parse_duration, value_name = "DURATION", global = true)]
    #[serde(default, with = "humantime_serde")]
    pub vm_banner_timeout: Option<Duration>,

    /// Time the client may take to send its SSH identification; nothing is started before it [default: 3s]
    #[arg(long, env = "SSH_ON_DEMAND_CLIENT_BANNER_TIMEOUT", value_parser = humantime::parse_duration, value_name = "DURATION", global = true)]
    #[serde(default, with = "humantime_serde")]
    pub client_banner_timeout: Option<Duration>,

    /// A client that sends nothing for client_banner_timeout (ssh-keyscan, scanners): "if-running" relays it to its VM if that runs, "start" starts the VM for it, "close" closes [default: if-running]
    #[arg(
        long,
        env = "SSH_ON_DEMAND_SILENT_CLIENTS",
        value_enum,
        value_name = "WHAT",
        global = true
    )]
    pub silent_clients: Option<SilentClients>,

    /// A network the start API's answers may point into, as a CIDR; repeat for more (TOML: vm_networks = [...]). Loopback, link-local, metadata services and this host's addresses need a network inside them listed; unspecified, multicast and broadcast are never allowed [default: any but loopback, link-local, metadata services and this host's own addresses]
    #[arg(long = "vm-network", value_name = "CIDR", global = true)]
    #[serde(default)]
    #[merge(strategy = merge::vec::overwrite_empty)]
    pub vm_networks: Vec<String>,

    /// A network whose client addresses may wake the profile's VMs, as a CIDR; repeat for more (TOML: client_networks = [...]); others are refused [default: any]
    #[arg(long = "client-network", value_name = "CIDR", global = true)]
    #[serde(default)]
    #[merge(strategy = merge::vec::overwrite_empty)]
    pub client_networks: Vec<String>,

    /// At most this many VM starts from one client address, as "N per DURATION", or "none" [default: 10 per 10m]
    #[arg(
        long,
        env = "SSH_ON_DEMAND_SOURCE_START_LIMIT",
        value_name = "N per DURATION",
        global = true
    )]
    pub source_start_limit: Option<String>,

    /// Connections in a row that wake a VM and go no further before their address is refused for a while (0: never) [default: 3]
    #[arg(
        long,
        env = "SSH_ON_DEMAND_PENALTY_STRIKES",
        value_name = "N",
        global = true
    )]
    pub penalty_strikes: Option<u32>,

    /// The longest a penalty lasts; the first is 30s, each further one in a row twice the last [default: 1h]
    #[arg(long, env = "SSH_ON_DEMAND_PENALTY_MAX", value_parser = humantime::parse_duration, value_name = "DURATION", global = true)]
    #[serde(default, with = "humantime_serde")]
    pub penalty_max: Option<Duration>,

    /// Host: directory of the state that connections share: VMs, their sessions and idle clocks [default: /run/ssh-on-demand]
    #[arg(
        long,
        env = "SSH_ON_DEMAND_STATE_DIR",
        value_name = "DIR",
        global = true
    )]
    pub state_dir: Option<PathBuf>,

    /// Host: where the VMs' shared state lives: "local" (files in state_dir, this host only) or "etcd" (a cluster several proxy hosts share; daemon only) [default: local]
    #[arg(
        long,
        env = "SSH_ON_DEMAND_STATE_STORE",
        value_enum,
        value_name = "STORE",
        global = true
    )]
    pub state_store: Option<StateStore>,

    /// Host: an etcd member's URL, http:// or https://; repeat for more (TOML: etcd_endpoints = [...])
    #[arg(long = "etcd-endpoint", value_name = "URL", global = true)]
    #[serde(default)]
    #[merge(strategy = merge::vec::overwrite_empty)]
    pub etcd_endpoints: Vec<String>,

    /// Host: prefix of every etcd key this cluster of proxies uses [default: /ssh-on-demand/]
    #[arg(
        long,
        env = "SSH_ON_DEMAND_ETCD_PREFIX",
        value_name = "PREFIX",
        global = true
    )]
    pub etcd_prefix: Option<String>,

    /// Host: this proxy's name among the hosts that share the etcd store; two processes on one machine need their own [default: the machine ID]
    #[arg(
        long,
        env = "SSH_ON_DEMAND_HOST_ID",
        value_name = "NAME",
        global = true
    )]
    pub host_id: Option<String>,

    /// Host: TTL of this process's etcd lease: how long the sessions of a host that died keep their VMs [default: 10s]
    #[arg(long, env = "SSH_ON_DEMAND_ETCD_LEASE_TTL", value_parser = humantime::parse_duration, value_name = "DURATION", global = true)]
    #[serde(default, with = "humantime_serde")]
    pub etcd_lease_ttl: Option<Duration>,

    /// Host: PEM file of the CA that signed the etcd members' certificates [default: the system's CAs]
    #[arg(
        long,
        env = "SSH_ON_DEMAND_ETCD_CA_FILE",
        value_name = "FILE",
        global = true
    )]
    pub etcd_ca_file: Option<PathBuf>,

    /// Host: PEM client certificate for etcd (with etcd_key_file)
    #[arg(
        long,
        env = "SSH_ON_DEMAND_ETCD_CERT_FILE",
        value_name = "FILE",
        global = true
    )]
    pub etcd_cert_file: Option<PathBuf>,

    /// Host: PEM private key of etcd_cert_file
    #[arg(
        long,
        env = "SSH_ON_DEMAND_ETCD_KEY_FILE",
        value_name = "FILE",
        global = true
    )]
    pub etcd_key_file: Option<PathBuf>,

    /// Host: etcd user name (its password from etcd_password_file or the credential etcd_password_credential)
    #[arg(
        long,
        env = "SSH_ON_DEMAND_ETCD_USER",
        value_name = "NAME",
        global = true
    )]
    pub etcd_user: Option<String>,

    /// Host: file holding the etcd user's password [default: the systemd credential etcd_password_credential, if any]
    #[arg(
        long,
        env = "SSH_ON_DEMAND_ETCD_PASSWORD_FILE",
        value_name = "FILE",
        global = true
    )]
    pub etcd_password_file: Option<PathBuf>,

    /// Host: name of the systemd credential holding the etcd user's password [default: etcd-password]
    #[arg(
        long,
        env = "SSH_ON_DEMAND_ETCD_PASSWORD_CREDENTIAL",
        value_name = "NAME",
        global = true
    )]
    pub etcd_password_credential: Option<String>,

    /// Daemon: most sessions at once; more are told so and closed [default: 1024]
    #[arg(
        long,
        env = "SSH_ON_DEMAND_MAX_SESSIONS",
        value_name = "N",
        global = true
    )]
    pub max_sessions: Option<usize>,

    /// Daemon: most sessions at once from one client address [default: 64]
    #[arg(
        long,
        env = "SSH_ON_DEMAND_MAX_SESSIONS_PER_SOURCE",
        value_name = "N",
        global = true
    )]
    pub max_sessions_per_source: Option<usize>,

    /// Daemon: most connections of one VM waiting for it to start at once [default: 128]
    #[arg(
        long,
        env = "SSH_ON_DEMAND_MAX_PENDING_PER_VM",
        value_name = "N",
        global = true
    )]
    pub max_pending_per_vm: Option<usize>,

    /// Daemon: on SIGTERM, time live sessions get to finish before they are closed [default: 30s]
    #[arg(long, env = "SSH_ON_DEMAND_DRAIN_TIMEOUT", value_parser = humantime::parse_duration, value_name = "DURATION", global = true)]
    #[serde(default, with = "humantime_serde")]
    pub drain_timeout: Option<Duration>,

    /// Daemon: serve Prometheus metrics over HTTP at ADDR (host:port, or a path for a unix socket) [default: none]
    #[arg(
        long,
        env = "SSH_ON_DEMAND_METRICS_LISTEN",
        value_name = "ADDR",
        global = true
    )]
    pub metrics_listen: Option<String>,

    /// Profile only: the local ports whose connections this profile takes (`reference::FILE_ONLY`).
    #[arg(skip)]
    #[serde(default)]
    #[merge(strategy = merge::vec::overwrite_empty)]
    pub ports: Vec<u16>,

    /// File only: named profiles, `[profiles.NAME]`, each a table of these settings
    #[arg(skip)]
    #[serde(default)]
    #[merge(strategy = overwrite_empty_map)]
    pub profiles: BTreeMap<String, Settings>,
}

impl Settings {
    /// Each setting from `self` where given, else from `lower`: a list or table counts as given unless empty.
    pub fn or(mut self, lower: &Settings) -> Settings {
        self.merge(lower.clone());
        self
    }
}

fn overwrite_empty_map<K, V>(left: &mut BTreeMap<K, V>, right: BTreeMap<K, V>) {
    if left.is_empty() {
        *left = right;
    }
}
