//! The command line: `serve` (the default) and `check-config`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tracing::level_filters::LevelFilter;

use crate::{
    config::{DEFAULT_CONFIG_FILE, Listen},
    logging::LogTarget,
};

/// Start/stop API for ssh-on-demand: boots and stops VMs on libvirt, Proxmox VE, AWS EC2 or through
/// commands, for the proxy on port 22, which holds no platform credentials itself.
#[derive(Debug, Parser)]
#[command(name = "ssh-on-demand-api", version)]
pub struct Cli {
    /// The TOML configuration file.
    #[arg(short, long, default_value = DEFAULT_CONFIG_FILE)]
    pub config: PathBuf,
    /// Listen here instead of the file's `listen` (ignored when systemd passes sockets): 127.0.0.1:PORT,
    /// [::1]:PORT or unix:/PATH.
    #[arg(long)]
    pub listen: Option<Listen>,
    /// Where log records go.
    #[arg(long, value_enum, default_value_t = LogTarget::Auto)]
    pub log_target: LogTarget,
    /// error, warn, info, debug or trace.
    #[arg(long, default_value_t = LevelFilter::INFO)]
    pub log_level: LevelFilter,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the start/stop API (the default).
    Serve,
    /// Check the configuration and every secret it needs, print the effective settings, and exit 1 with the
    /// reason on any error.
    CheckConfig {
        /// Look for the credentials (api-token, proxmox-token, aws-credentials, plain or prefixed
        /// `ssh-on-demand-api.`) in this directory, as the unit's credentials: e.g. /etc/credstore.
        #[arg(long)]
        credentials_dir: Option<PathBuf>,
    },
}
