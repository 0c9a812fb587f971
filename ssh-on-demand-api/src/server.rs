//! The HTTP side: `POST /start` and `POST /stop` as the proxy sends them, the bearer token, and the
//! listeners (systemd's sockets, loopback TCP or a unix socket), all serving HTTP/1.1.
//!
//! Every request is admitted by [`admit`] before anything else: the token from its headers, then a body of
//! at most [`MAX_BODY_BYTES`]. A request without the token has no byte of its body read, so it costs this
//! process nothing but its headers, however much it announces or sends.

use std::{net::IpAddr, path::Path, sync::Arc};

use anyhow::{Context, Result, bail};
use axum::{
    Json, Router,
    body::{Body, Bytes},
    extract::{Request, State},
    http::{
        HeaderMap, StatusCode,
        header::{AUTHORIZATION, CONTENT_LENGTH},
    },
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::post,
};
use http_body_util::LengthLimitError;
use serde::{Deserialize, Serialize};
use ssh_on_demand_common::secret::Secret;
use tokio::net::{TcpListener, UnixListener};

use crate::{
    backend::How,
    config::Listen,
    vms::{Stopped, Vms},
};

pub struct App {
    pub vms: Vms,
    pub token: Secret,
}

/// What the proxy sends to `/start`; fields it may add later are ignored.
#[derive(Debug, Default, Deserialize)]
struct StartRequest {
    client_addr: Option<IpAddr>,
    client_port: Option<u16>,
    profile: Option<String>,
}

/// The answer to `/start`: where to connect (all the proxy reads), and how the start went: `how` is
/// `running`, `booted`, `resumed` or `started` (a start command that did not say), `ms` how long the
/// platform took to boot or resume the VM up to its address.
#[derive(Debug, Serialize)]
struct StartAnswer {
    vm_ip: IpAddr,
    port: u16,
    how: How,
    #[serde(skip_serializing_if = "Option::is_none")]
    ms: Option<u64>,
}

/// What the proxy sends to `/stop`.
#[derive(Debug, Default, Deserialize)]
struct StopRequest {
    vm_ip: Option<IpAddr>,
    profile: Option<String>,
    client_addr: Option<IpAddr>,
    idle_seconds: Option<u64>,
}

/// The largest body a request may have. The proxy's are a few hundred bytes (a profile name is at most 64);
/// this leaves room for fields it may add, and bounds what an authorized client can make this process hold.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/start", post(start))
        .route("/stop", post(stop))
        .layer(middleware::from_fn_with_state(app.clone(), admit))
        .with_state(app)
}

/// Lets a request through once it has the token and a body of at most [`MAX_BODY_BYTES`], read here whole.
/// The token comes first and from the headers alone: until it matches, not one body byte is read.
async fn admit(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    if let Err(refusal) = authorize(&app, request.headers()) {
        return refusal.into_response();
    }
    let too_large = || {
        let what = "the request body is larger than ";
        Refusal(
            StatusCode::PAYLOAD_TOO_LARGE,
            what,
            format!("{} KiB", MAX_BODY_BYTES / 1024),
        )
    };
    let announced = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if announced.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return too_large().into_response();
    }
    let (parts, body) = request.into_parts();
    match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
        Ok(body) => next.run(Request::from_parts(parts, Body::from(body))).await,
        Err(e) if std::error::Error::source(&e).is_some_and(|e| e.is::<LengthLimitError>()) => {
            too_large().into_response()
        }
        Err(_) => {
            let what = "the request body could not be read";
            Refusal(StatusCode::BAD_REQUEST, what, String::new()).into_response()
        }
    }
}

async fn start(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let request: StartRequest = match parse(&body) {
        Ok(r) => r,
        Err(refusal) => return refusal.into_response(),
    };
    let profile = request.profile.as_deref();
    let client = request
        .client_addr
        .map(|a| a.to_string())
        .unwrap_or_default();
    // The profile names the request in the message too: `journalctl -t ssh-on-demand-api` shows no fields.
    let name = profile.unwrap_or(crate::config::DEFAULT_PROFILE);
    tracing::info!(
        PROFILE = profile,
        CLIENT_ADDR = client,
        CLIENT_PORT = request.client_port,
        "profile {name}: start requested for {}",
        if client.is_empty() {
            "no client"
        } else {
            &client
        }
    );
    match app.vms.start(profile, request.client_addr).await {
        Ok(started) => {
            tracing::info!(PROFILE = profile, CLIENT_ADDR = client, VM_IP = %started.ip, HOW = started.how.as_str(), "profile {name}: start answered {}", started.ip);
            Json(StartAnswer {
                vm_ip: started.ip,
                port: started.port,
                how: started.how,
                ms: started.ms,
            })
            .into_response()
        }
        Err(why) => {
            tracing::warn!(PROFILE = profile, CLIENT_ADDR = client, status = %why.status(), "profile {name}: start refused: {why}");
            why.into_response()
        }
    }
}

async fn stop(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let request: StopRequest = match parse(&body) {
        Ok(r) => r,
        Err(refusal) => return refusal.into_response(),
    };
    let profile = request.profile.as_deref();
    let vm_ip = request.vm_ip.map(|a| a.to_string()).unwrap_or_default();
    let name = profile.unwrap_or(crate::config::DEFAULT_PROFILE);
    tracing::info!(
        PROFILE = profile,
        VM_IP = vm_ip,
        IDLE_SECONDS = request.idle_seconds,
        "profile {name}: stop requested for {vm_ip}"
    );
    match app
        .vms
        .stop(profile, request.client_addr, request.vm_ip)
        .await
    {
        Ok(stopped) => {
            let (status, word) = match stopped {
                Stopped::AlreadyOff => (StatusCode::OK, "off"),
                Stopped::AlreadySuspended => (StatusCode::OK, "suspended"),
                Stopped::Stopping => (StatusCode::ACCEPTED, "stopping"),
                Stopped::Suspending => (StatusCode::ACCEPTED, "suspending"),
            };
            (status, Json(serde_json::json!({ "status": word }))).into_response()
        }
        Err(why) => {
            tracing::warn!(PROFILE = profile, VM_IP = vm_ip, status = %why.status(), "profile {name}: stop refused: {why}");
            why.into_response()
        }
    }
}

/// A request turned away before it reached a VM: bad token, bad body.
struct Refusal(StatusCode, &'static str, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let Refusal(status, what, detail) = self;
        (
            status,
            Json(serde_json::json!({ "error": format!("{what}{detail}") })),
        )
            .into_response()
    }
}

fn authorize(app: &App, headers: &HeaderMap) -> Result<(), Refusal> {
    let offered = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match offered {
        Some(token) if app.token.matches(token) => Ok(()),
        _ => {
            tracing::warn!("refused a request without the right bearer token");
            let why = "missing or wrong bearer token; the proxy's api_token_file must hold this API's token";
            Err(Refusal(StatusCode::UNAUTHORIZED, why, String::new()))
        }
    }
}

/// The JSON body; an empty one (an API client that sends none) means no fields.
fn parse<T: for<'de> Deserialize<'de> + Default>(body: &[u8]) -> Result<T, Refusal> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| {
        let what = "the request body is not the JSON the proxy sends: ";
        Refusal(StatusCode::BAD_REQUEST, what, e.to_string())
    })
}

/// A listening socket of either kind.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// The sockets systemd passed (socket activation), else the one `listen` names.
pub fn listeners(
    passed: &mut listenfd::ListenFd,
    listen: Option<&Listen>,
) -> Result<Vec<Listener>> {
    let mut found = Vec::new();
    for index in 0..passed.len() {
        if let Some(tcp) = passed
            .take_tcp_listener(index)
            .context("a socket from systemd")?
        {
            tcp.set_nonblocking(true)?;
            found.push(Listener::Tcp(TcpListener::from_std(tcp)?));
        } else if let Some(unix) = passed
            .take_unix_listener(index)
            .context("a socket from systemd")?
        {
            unix.set_nonblocking(true)?;
            found.push(Listener::Unix(UnixListener::from_std(unix)?));
        }
    }
    if !found.is_empty() {
        return Ok(found);
    }
    match listen {
        Some(Listen::Tcp(addr)) => {
            let std = std::net::TcpListener::bind(addr)
                .with_context(|| format!("listening on {addr}"))?;
            std.set_nonblocking(true)?;
            Ok(vec![Listener::Tcp(TcpListener::from_std(std)?)])
        }
        Some(Listen::Unix(path)) => Ok(vec![Listener::Unix(bind_unix(path)?)]),
        None => bail!(
            "nothing to listen on: set listen in the configuration, pass --listen, or use the socket unit"
        ),
    }
}

fn bind_unix(path: &Path) -> Result<UnixListener> {
    // A socket file left by an earlier run would make bind fail; anything else there is not ours to remove.
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if meta.file_type().is_socket() {
            std::fs::remove_file(path)
                .with_context(|| format!("removing the old socket {}", path.display()))?;
        }
    }
    UnixListener::bind(path).with_context(|| format!("listening on {}", path.display()))
}

/// Serves every listener until SIGTERM or SIGINT.
pub async fn serve(app: Arc<App>, listeners: Vec<Listener>) -> Result<()> {
    let router = router(app);
    let mut tasks = tokio::task::JoinSet::new();
    for listener in listeners {
        let router = router.clone();
        match listener {
            Listener::Tcp(l) => {
                tracing::info!(listen = %l.local_addr()?, "serving");
                tasks.spawn(async move { axum::serve(l, router).await });
            }
            Listener::Unix(l) => {
                tracing::info!(listen = ?l.local_addr()?.as_pathname(), "serving");
                tasks.spawn(async move { axum::serve(l, router).await });
            }
        }
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: exiting"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: exiting"),
        Some(ended) = tasks.join_next() => {
            ended.context("a listener task")?.context("serving")?;
        }
    }
    Ok(())
}
