//! The command line: subcommands, and the settings that flags, `SSH_ON_DEMAND_*` variables and the TOML file
//! can all give. The same structs are the TOML schema, so a file key is always a long flag's name with `_`.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Parser, Subcommand};
use serde::Deserialize;
use tracing::level_filters::LevelFilter;

use crate::logging::LogTarget;

mod reference;
mod settings;

pub use reference::{SettingDoc, settings_reference};
pub use settings::Settings;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "ssh-on-demand",
    version,
    about = "Boots a VM when someone connects with plain ssh, then relays the connection",
    long_about = "Boots a VM when someone connects with plain ssh, then relays the connection.\n\n\
        Without a subcommand it serves one client connection handed over by systemd: a socket unit \
        with Accept=yes starts one instance per connection, with the client's TCP socket on standard \
        input (StandardInput=socket) or as fd 3 (LISTEN_FDS). It asks the start API to start the VM, \
        waits until the VM's sshd sends its SSH identification line, and relays bytes both ways. If the \
        VM cannot be started, the ssh client is told why. With `daemon`, one process serves every \
        connection of listening sockets from systemd (Accept=no) or --listen.\n\n\
        Settings come from flags, then SSH_ON_DEMAND_* environment variables, then the TOML file, \
        then built-in defaults.",
    after_help = "Every setting: man ssh-on-demand.toml. The start and stop API, the units, troubleshooting: \
                  /usr/share/doc/ssh-on-demand/docs/ (api.md, operations.md)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// TOML configuration file (keys as the long flags, with _ for -) [default: /etc/ssh-on-demand/config.toml, if it exists]
    #[arg(
        long,
        short = 'c',
        env = "SSH_ON_DEMAND_CONFIG",
        value_name = "FILE",
        global = true
    )]
    pub config: Option<PathBuf>,

    #[command(flatten)]
    pub settings: Settings,

    /// Refused with a reason, not taken: header values are secrets, and every local user can read the
    /// command line. (It was accepted once; an operator who still passes it learns where headers go now.)
    #[arg(long, value_name = "NAME: VALUE", global = true, hide = true)]
    pub api_header: Vec<String>,

    /// Where log records go; auto: the journal under systemd, else stderr, and never the client's socket
    #[arg(long, env = "SSH_ON_DEMAND_LOG_TARGET", value_enum, default_value_t = LogTarget::Auto, global = true)]
    pub log_target: LogTarget,

    /// Most detailed level logged: error, warn, info, debug or trace (trace: the libraries' records, which a
    /// release build leaves out)
    #[arg(
        long,
        env = "SSH_ON_DEMAND_LOG_LEVEL",
        default_value = "info",
        value_name = "LEVEL",
        global = true
    )]
    pub log_level: LevelFilter,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Serve every connection of the listening sockets from systemd (Accept=no) or --listen, in one process
    Daemon {
        /// Listen on ADDR, for the profile NAME if given (repeat for more); without it, the sockets systemd passes
        #[arg(long, value_name = "ADDR[=PROFILE]", value_parser = parse_listen)]
        listen: Vec<(SocketAddr, Option<String>)>,
    },
    /// Show each VM this host knows: its state, its sessions, the last start and stop
    Status {
        /// One JSON document, for scripts
        #[arg(long)]
        json: bool,
    },
    /// Stop VMs left idle by a process that died (the units run it every minute); changes nothing else
    Sweep,
    /// Validate the configuration and print the effective settings, secrets masked; exit 1 on any error
    CheckConfig {
        /// Print nothing unless there is an error (the daemon's unit checks the file this way before a reload)
        #[arg(long, short)]
        quiet: bool,
    },
}

fn parse_listen(text: &str) -> anyhow::Result<(SocketAddr, Option<String>)> {
    let (addr, profile) = match text.split_once('=') {
        Some((addr, profile)) => (addr, Some(profile.to_owned())),
        None => (text, None),
    };
    let addr = addr
        .parse()
        .map_err(|_| anyhow::anyhow!("{addr:?} is not an address such as 0.0.0.0:22 or [::]:22"))?;
    Ok((addr, profile))
}

/// Which connections share one VM, and so one start and one idle clock.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmScope {
    /// Connections from one client address (and profile): safe for start APIs that pick a VM per client.
    #[default]
    Client,
    /// Every connection of the profile: the start API always answers with the same VM.
    Profile,
}

impl VmScope {
    pub fn as_str(self) -> &'static str {
        match self {
            VmScope::Client => "client",
            VmScope::Profile => "profile",
        }
    }
}

/// Where the VMs' shared state lives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StateStore {
    /// Files under state_dir: the processes of this host.
    #[default]
    Local,
    /// An etcd cluster: several proxy hosts in front of the same VMs (daemon mode).
    Etcd,
}

/// What to do with a client that sends nothing: `ssh-keyscan` (Ansible, CI) waits for the server to speak
/// first, and so do port scanners.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SilentClients {
    /// Relay it to its VM if that runs; never start a VM for it.
    #[default]
    IfRunning,
    /// Start its VM as for any client: for CI that runs ssh-keyscan against cold VMs.
    Start,
    /// Close the connection.
    Close,
}

impl SilentClients {
    pub fn as_str(self) -> &'static str {
        match self {
            SilentClients::IfRunning => "if-running",
            SilentClients::Start => "start",
            SilentClients::Close => "close",
        }
    }
}
