//! Commands: what an operator runs by hand (`check-config`, `status`) or a timer runs (`sweep`).

use std::{io::Write, sync::Arc};

use anyhow::{Context as _, Result, anyhow};
use tracing::{error, info, warn};

use crate::{
    cli::Cli,
    config::{Config, StoreConfig},
    session::Host,
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
    let ctx = Host::new(Arc::new(config), false);
    for profile in ctx.config.all_profiles() {
        ctx.api(profile)?;
    }
    if let StoreConfig::Etcd(etcd) = &ctx.config.store {
        crate::runtime(false)?.block_on(Etcd::check(etcd))?;
    }
    Ok(ctx.config.to_string())
}

/// `status`: every VM in the store, as text or JSON on stdout.
pub fn status(cli: &Cli, json: bool) -> Result<()> {
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
    let report = crate::runtime(false)?.block_on(async {
        let (store, name) = open_for_reading(&store_config, &state_dir).await?;
        // The units' DynamicUser= keeps the state in /run/private, which only root may enter.
        let unreadable = |e: StoreError| match &e {
            StoreError::Io(io) if io.kind() == std::io::ErrorKind::PermissionDenied => anyhow!(
                "reading {name}: {e}: only root may read the service's state; run it as root \
                 (sudo ssh-on-demand status)"
            ),
            _ => anyhow!("reading {name}: {e}"),
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
        anyhow::Ok(status::Report {
            store: name,
            hosts,
            vms,
            sources,
        })
    })?;
    let text = if json {
        let document = serde_json::to_value(&report).unwrap_or_default();
        format!("{document:#}\n")
    } else {
        status::render(&report)
    };
    std::io::stdout()
        .write_all(text.as_bytes())
        .context("writing to stdout")
}

/// The store for `status`, and how to name it to an operator.
async fn open_for_reading(
    config: &StoreConfig,
    state_dir: &std::path::Path,
) -> Result<(Store, String)> {
    match config {
        StoreConfig::Local => Ok((
            Store::Local(Local::new(state_dir)),
            state_dir.display().to_string(),
        )),
        StoreConfig::Etcd(etcd) => {
            let name = format!("etcd {}", etcd.prefix);
            let store = Etcd::connect(etcd, false).await?;
            Ok((Store::Etcd(store), name))
        }
    }
}

/// `sweep`: stops the VMs whose idle timeout has passed while no process was waiting for it (the waiter or
/// the last session was killed), and notes the idle clock of those not due yet, for the next sweep.
pub fn sweep(config: Config) -> Result<()> {
    let config = Arc::new(config);
    if let StoreConfig::Etcd(_) = config.store {
        info!("state_store is etcd: the daemon sweeps by itself; nothing to do here");
        return Ok(());
    }
    crate::runtime(false)?.block_on(async {
        let ctx = Arc::new(Host::new(config.clone(), false));
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
    Ok(())
}
