//! Metrics: the daemon's counters in the Prometheus/OpenMetrics text format, served over HTTP on a loopback
//! address or a unix socket for the operator's monitoring.

use std::{path::Path, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use hyper::{Request, Response, body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener},
};
use tracing::{debug, info, warn};

use crate::{
    report::Outcome,
    session::Report,
    status::VmStatus,
    vm::{lifecycle::IdleEnd, state::Shown, store::Store},
};

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StartLabel {
    /// "true" when the connection shared another's start call.
    shared: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DirectionLabel {
    direction: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SideLabel {
    side: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RuleLabel {
    rule: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

/// Everything the daemon counts.
pub struct Metrics {
    registry: Registry,
    sessions: Gauge,
    connections: Family<OutcomeLabel, Counter>,
    starts: Family<StartLabel, Counter>,
    stops: Family<ResultLabel, Counter>,
    api_seconds: Histogram,
    vm_wait_seconds: Histogram,
    bytes: Family<DirectionLabel, Counter>,
    relay_failures: Family<SideLabel, Counter>,
    vms: Family<StateLabel, Gauge>,
    refusals: Family<RuleLabel, Counter>,
}

/// `name, help => metric;` lines, each registered in `registry` as a clone of `metric`.
macro_rules! register {
    ($registry:ident, $($name:literal, $help:literal => $metric:expr;)*) => {
        $($registry.register($name, $help, $metric.clone());)*
    };
}

impl Metrics {
    /// The daemon's metrics; with the etcd store, its lease and errors too.
    pub fn new(store: &Store) -> Metrics {
        let mut registry = Registry::with_prefix("ssh_on_demand");
        let metrics = Metrics {
            sessions: Gauge::default(),
            connections: Family::default(),
            starts: Family::default(),
            stops: Family::default(),
            // 10 ms to about 5 min: a warm start API answers in milliseconds, a cold VM boots in minutes.
            api_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 15)),
            vm_wait_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 15)),
            bytes: Family::default(),
            relay_failures: Family::default(),
            vms: Family::default(),
            refusals: Family::default(),
            registry: Registry::default(),
        };
        // Each registered as a clone: the registry's copy and ours share their values.
        register! {
            registry,
            "sessions", "Connections in progress" => metrics.sessions;
            "connections", "Connections ended, by outcome (relayed, client_gone, not_ssh, api_failed, vm_not_ready, misconfigured, busy, refused)" => metrics.connections;
            "starts", "VM starts, made by the connection or shared with another's" => metrics.starts;
            "stops", "Idle stops, by result" => metrics.stops;
            "api_seconds", "Time until the start API gave an address" => metrics.api_seconds;
            "vm_wait_seconds", "Time from the start API's answer to the VM's SSH identification" => metrics.vm_wait_seconds;
            "relayed_bytes", "Bytes relayed, by direction" => metrics.bytes;
            "relay_failures", "Relays ended by a failed connection, by the end that failed (client, vm)" => metrics.relay_failures;
            "vms", "VMs the store knows, by state (new, starting, booting, up, idle, stopping, stopped, failed, interrupted)" => metrics.vms;
            "refusals", "Connections whose address the guard refused, by rule (client_networks, source_start_limit, penalty)" => metrics.refusals;
        }
        if let Store::Etcd(etcd) = store {
            let counters = etcd.counters();
            register! {
                registry,
                "store_errors", "Requests to etcd that failed or timed out" => counters.errors;
                "store_leases_granted", "etcd leases granted to this host (the first, and one after each loss)" => counters.leases_granted;
                "store_leases_lost", "etcd leases of this host lost: not renewed within their TTL" => counters.leases_lost;
                "store_decisions_deferred", "Idle stops put off because this host's sessions were not all in the store" => counters.deferred;
            }
        }
        Metrics {
            registry,
            ..metrics
        }
    }

    /// The count of VMs in each state, from the latest look at the store.
    pub fn set_vms(&self, vms: &[VmStatus]) {
        for state in Shown::ALL {
            let n = vms.iter().filter(|vm| vm.state == state).count();
            self.vms
                .get_or_create(&StateLabel {
                    state: state.as_str(),
                })
                .set(n as i64);
        }
    }

    pub fn set_sessions(&self, n: usize) {
        self.sessions.set(n as i64);
    }

    pub fn refused(&self, outcome: Outcome) {
        self.connections
            .get_or_create(&OutcomeLabel {
                outcome: outcome.as_str(),
            })
            .inc();
    }

    pub fn session(&self, report: &Report) {
        self.refused(report.outcome);
        let stats = &report.stats;
        if stats.vm.is_some() {
            let shared = if stats.shared_start { "true" } else { "false" };
            self.starts.get_or_create(&StartLabel { shared }).inc();
        }
        if let Some(api) = stats.api {
            self.api_seconds.observe(api.as_secs_f64());
        }
        if let Some(wait) = stats.vm_wait {
            self.vm_wait_seconds.observe(wait.as_secs_f64());
        }
        for (direction, n) in [
            ("to_vm", stats.transferred.to_vm),
            ("to_client", stats.transferred.to_client),
        ] {
            self.bytes
                .get_or_create(&DirectionLabel { direction })
                .inc_by(n);
        }
        if let Some(rule) = stats.refused_by {
            self.refusals.get_or_create(&RuleLabel { rule }).inc();
        }
        if let Some(side) = stats.relay_failed {
            self.relay_failures
                .get_or_create(&SideLabel {
                    side: side.as_str(),
                })
                .inc();
        }
    }

    pub fn stop(&self, stopped: IdleEnd) {
        let result = match stopped {
            IdleEnd::Stopped => "stopped",
            IdleEnd::Failed => "failed",
            IdleEnd::Kept => "kept",
        };
        self.stops.get_or_create(&ResultLabel { result }).inc();
    }

    pub fn text(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }
}

/// Time a scraper gets to send its request and read the answer.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `metrics` at `listen`: `host:port`, or an absolute path for a unix socket (replaced if it exists).
pub async fn serve(listen: &str, metrics: Arc<Metrics>) -> Result<()> {
    if listen.starts_with('/') {
        let path = Path::new(listen);
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)
            .with_context(|| format!("metrics_listen: binding {listen}"))?;
        info!("serving metrics at {listen}");
        loop {
            match listener.accept().await {
                Ok((stream, _)) => spawn_connection(stream, metrics.clone()),
                Err(e) => pause_after(e).await,
            }
        }
    } else {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("metrics_listen: binding {listen}"))?;
        info!("serving metrics at {listen}");
        loop {
            match listener.accept().await {
                Ok((stream, _)) => spawn_connection(stream, metrics.clone()),
                Err(e) => pause_after(e).await,
            }
        }
    }
}

fn spawn_connection<S>(stream: S, metrics: Arc<Metrics>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let service = service_fn(move |_: Request<Incoming>| {
            let text = metrics.text();
            async move {
                Response::builder()
                    .header(
                        "Content-Type",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )
                    .body(text)
            }
        });
        let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
        match tokio::time::timeout(SCRAPE_TIMEOUT, connection).await {
            Ok(Err(e)) => debug!("metrics request: {e}"),
            Err(_) => debug!("metrics request took longer than {SCRAPE_TIMEOUT:?}"),
            Ok(Ok(())) => {}
        }
    });
}

/// Out of file descriptors, say: wait rather than spin.
async fn pause_after(error: std::io::Error) {
    warn!("metrics: accepting: {error}");
    tokio::time::sleep(Duration::from_millis(100)).await;
}
