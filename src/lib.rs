//! ssh-on-demand: boots a VM when someone connects to it with plain `ssh`, then relays the connection.
//!
//! systemd starts one process per connection (`Accept=yes`). The process takes the client's socket
//! ([`activation`]), asks the operator's API to start the VM ([`start_api`]), waits until the VM's sshd
//! identifies itself ([`readiness`]), both retrying within one deadline ([`retry`]), and relays bytes both
//! ways ([`relay`]). If there is no VM to give, the ssh client is told why ([`disconnect`]). [`connection`]
//! ties these together for one client.

pub mod activation;
pub mod config;
pub mod connection;
pub mod disconnect;
pub mod logging;
pub mod readiness;
pub mod relay;
pub mod retry;
pub mod secret;
pub mod start_api;

use std::{process::ExitCode, time::Duration};

use anyhow::{Context, Result};

use crate::config::Config;

/// Serves the one connection systemd handed to this process, with `config` or, if it is an error, by telling
/// the client the host is misconfigured. Returns the exit status: 0 when the client was relayed or left, 1
/// when it got no VM, 2 when there was no connection to serve.
pub fn serve_activated_connection(config: Result<Config>) -> ExitCode {
    let client = match activation::take_client() {
        Ok(client) => client,
        Err(e) => {
            tracing::error!("{e:#}");
            return ExitCode::from(2);
        }
    };
    // One connection per process: a single-threaded runtime starts fastest and is all the relay needs.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!("starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        let client = tokio::net::TcpStream::from_std(client)?;
        Ok::<_, std::io::Error>(match &config {
            Ok(config) => connection::run(client, config).await,
            Err(error) => connection::refuse_misconfigured(client, error).await,
        })
    });
    match outcome {
        Ok(outcome) => outcome.exit_code(),
        Err(e) => {
            tracing::error!("registering the client's socket: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What `check-config` prints: the effective configuration, once everything in it was found usable.
pub fn check_config(cli: &config::Cli) -> Result<String> {
    let config = Config::load(cli)?;
    // Building the HTTP client reads and parses the CA file, as every connection will.
    start_api::StartApi::new(&config.api, config.vm_port).context("api settings")?;
    Ok(config.to_string())
}

/// "120 s", "1.5 s": durations in the words users read.
pub(crate) fn seconds(duration: Duration) -> String {
    let secs = duration.as_secs_f64();
    if secs.fract() == 0.0 {
        format!("{secs:.0} s")
    } else {
        format!("{secs:.1} s")
    }
}
