//! Commands: what an operator runs by hand (`check-config`, `status`) or a timer runs (`sweep`).

use std::{io::Write, process::ExitCode, sync::Arc};

use anyhow::Result;
use tracing::{error, info, warn};

use crate::{
    cli::Cli,
    config::{Config, StoreConfig},
    session::Context,
    status,
    vm::{
        lifecycle,
        store::{Store, StoreError, etcd::Etcd, local::Local, now_ms},
    },
};

/// What `check-config` prints: the effective configuration, once everything in it was found usable (the
/// etcd cluster reached, where it is the store).
pub fn check_config(cli: &Cli) -> Result<String> {
    let config = Config::load(cli)?;
    // Building the HTTP clients reads and parses the CA files, as connections will.
    let ctx = Context::new(Arc::new(config), false);
    for profile in ctx.config.all_profiles() {
        ctx.api(profile)?;
    }
    if let StoreConfig::Etcd(etcd) = &ctx.config.store {
        crate::runtime(false)?.block_on(Etcd::check(etcd))?;
    }
    Ok(ctx.config.to_string())
}

/// `status`: every VM in the store, as text or JSON on stdout.
pub fn status(cli: &Cli, json: bool) -> ExitCode {
    // The local store needs no more than its directory: it works even while the rest is broken.
    let (config, store_config, state_dir) = match Config::load(cli) {
        Ok(config) => {
            let (store, dir) = (config.store.clone(), config.state_dir.clone());
            (Some(config), store, dir)
        }
        Err(e) => {
            warn!("{e:#}");
            (None, StoreConfig::Local, Config::state_dir_of(cli))
        }
    };
    let result = crate::runtime(false)
        .map_err(|e| e.to_string())
        .and_then(|runtime| {
            runtime.block_on(async {
                let (store, name) = open_for_reading(&store_config, &state_dir).await?;
                // The units' DynamicUser= keeps the state in /run/private, which only root may enter.
                let unreadable = |e: StoreError| match &e {
                    StoreError::Io(io) if io.kind() == std::io::ErrorKind::PermissionDenied => format!(
                        "reading {name}: {e}: only root may read the service's state; run it as root \
                         (sudo ssh-on-demand status)"
                    ),
                    _ => format!("reading {name}: {e}"),
                };
                let vms = status::collect(&store, config.as_ref())
                    .await
                    .map_err(unreadable)?;
                let hosts = match (&store, &store_config) {
                    (Store::Etcd(etcd), StoreConfig::Etcd(settings)) => {
                        let alive = etcd.hosts().await.map_err(unreadable)?;
                        Some(status::Hosts::new(alive, &settings.host_id))
                    }
                    _ => None,
                };
                let sources = status::sources(&store).await.map_err(unreadable)?;
                Ok::<_, String>(status::Report {
                    store: name,
                    hosts,
                    vms,
                    sources,
                })
            })
        });
    let report = match result {
        Ok(report) => report,
        Err(e) => {
            // Run by hand: one plain line on the terminal, as check-config's, not a log record.
            let _ = writeln!(std::io::stderr(), "ssh-on-demand status: {e}");
            return ExitCode::FAILURE;
        }
    };
    let text = if json {
        let document = serde_json::to_value(&report).unwrap_or_default();
        format!("{document:#}\n")
    } else {
        status::render(&report)
    };
    match std::io::stdout().write_all(text.as_bytes()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}

/// The store for `status`, and how to name it to an operator.
async fn open_for_reading(
    config: &StoreConfig,
    state_dir: &std::path::Path,
) -> Result<(Store, String), String> {
    match config {
        StoreConfig::Local => Ok((
            Store::Local(Local::new(state_dir)),
            state_dir.display().to_string(),
        )),
        StoreConfig::Etcd(etcd) => {
            let name = format!("etcd {}", etcd.prefix);
            let store = Etcd::connect(etcd, false)
                .await
                .map_err(|e| format!("{e:#}"))?;
            Ok((Store::Etcd(store), name))
        }
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
    if let StoreConfig::Etcd(_) = config.store {
        info!("state_store is etcd: the daemon sweeps by itself; nothing to do here");
        return ExitCode::SUCCESS;
    }
    let runtime = match crate::runtime(false) {
        Ok(runtime) => runtime,
        Err(e) => {
            error!("{e:#}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let ctx = Arc::new(Context::new(config.clone(), false));
        let mut stops = tokio::task::JoinSet::new();
        for due in lifecycle::sweep(&ctx.lifecycle, &config, now_ms()).await {
            let Some(profile) = config.profile_labeled(&due.key().profile) else {
                continue;
            };
            match ctx.api(profile) {
                Ok(api) => {
                    let ctx = ctx.clone();
                    stops.spawn(async move { due.run(api, &*ctx).await });
                }
                Err(e) => error!("{e:#}"),
            }
        }
        stops.join_all().await;
    });
    ExitCode::SUCCESS
}
