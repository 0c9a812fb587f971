//! Commands: what an operator runs by hand (`check-config`, `status`) or a timer runs (`sweep`).

use std::{io::Write, path::PathBuf, process::ExitCode, sync::Arc};

use anyhow::Result;
use tracing::{error, warn};

use crate::{
    cli::Cli,
    config::{Config, defaults},
    session::Context,
    status,
    vm::{lifecycle, store::now_ms},
};

/// What `check-config` prints: the effective configuration, once everything in it was found usable.
pub fn check_config(cli: &Cli) -> Result<String> {
    let config = Config::load(cli)?;
    // Building the HTTP clients reads and parses the CA files, as connections will.
    let ctx = Context::new(Arc::new(config), false);
    for profile in ctx.config.all_profiles() {
        ctx.api(profile)?;
    }
    Ok(ctx.config.to_string())
}

/// `status`: every VM in the state directory, as text or JSON on stdout.
pub fn status(cli: &Cli, json: bool) -> ExitCode {
    // The state directory is all it needs: it works even while the rest of the configuration is broken.
    let state_dir = match Config::load(cli) {
        Ok(config) => config.state_dir,
        Err(e) => {
            warn!("{e:#}");
            cli.settings
                .state_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(defaults::STATE_DIR))
        }
    };
    let vms = match status::collect(&state_dir) {
        Ok(vms) => vms,
        Err(e) => {
            error!("{e:#}");
            return ExitCode::FAILURE;
        }
    };
    let text = if json {
        let document = serde_json::json!({ "state_dir": state_dir, "vms": vms });
        format!("{document:#}\n")
    } else {
        status::render(&vms, &state_dir)
    };
    match std::io::stdout().write_all(text.as_bytes()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}

/// `sweep`: stops the VMs whose idle timeout has passed while no process was waiting for it (the waiter or
/// the last session was killed), and notes the idle clock of those not due yet, for the next sweep.
pub fn sweep(config: Result<Config>) -> ExitCode {
    let config = match config {
        Ok(config) => Arc::new(config),
        Err(e) => {
            error!("{e:#}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match crate::runtime(false) {
        Ok(runtime) => runtime,
        Err(e) => {
            error!("{e:#}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let ctx = Context::new(config.clone(), false);
        let mut stops = tokio::task::JoinSet::new();
        for watch in lifecycle::sweep(&ctx.lifecycle, &config, now_ms()).await {
            let Some(profile) = config.profile_labeled(&watch.key().profile) else {
                continue;
            };
            match ctx.api(profile) {
                Ok(api) => {
                    stops.spawn(async move { watch.run(&api).await });
                }
                Err(e) => error!("{e:#}"),
            }
        }
        stops.join_all().await;
    });
    ExitCode::SUCCESS
}
