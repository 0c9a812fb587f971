//! The operator's start and stop APIs: the client and its calls; [`exchange`] has the HTTP exchange (retries,
//! redirects, the size bound) and [`answer`] the reading of the answers.
//!
//! The contract (docs/api.md): we POST a small JSON body; a 2xx answer to a
//! start is either JSON `{"vm_ip": "192.168.0.57", "port": 22}` (port optional) or plain text `192.168.0.57`,
//! `192.168.0.57:2222` or `[2001:db8::7]:2222`; a 2xx answer to a stop is all it takes. A 4xx answer refuses,
//! and its text (or the JSON `error`/`message` field) is shown to the user. Connection errors, timeouts and
//! 5xx are retried until the caller's deadline. Redirects are followed here, not by reqwest, so that the
//! configured headers (the token, `api_headers`) never follow one to another origin.

use std::{
    fmt, fs,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{Context, ensure};
use reqwest::{
    Certificate, StatusCode,
    header::{AUTHORIZATION, HeaderMap, HeaderValue},
    redirect::Policy,
};
use serde::Serialize;
use tokio::time::Instant;

use super::targets::NotAllowed;

use crate::{config::Profile, secret::SecretUrl};

mod answer;
mod exchange;

pub use answer::{How, Unusable, parse_answer};
use exchange::{Call, deadline_after};

/// Bigger answers are refused: an address fits in a few dozen bytes, and a runaway body must not eat memory.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// Redirects followed before giving up, which also ends redirect loops.
pub const MAX_REDIRECTS: usize = 5;
/// First pause before retrying a failed request; it doubles (with jitter) up to [`MAX_RETRY_DELAY`].
pub const FIRST_RETRY_DELAY: Duration = Duration::from_millis(200);
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

/// The start POST's body: what is known of the connection. APIs that ignore bodies keep working.
#[derive(Debug, Serialize)]
pub struct StartRequest<'a> {
    /// The connection that asks; none for a start ahead of logins.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub connection: Option<Connection>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<&'a str>,
    /// Why a start without a connection is made: `"pre_wake"`, at a keep-warm window's start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
}

/// Who asks for the VM: the client, and the address it reached.
#[derive(Debug, Serialize)]
pub struct Connection {
    pub client_addr: IpAddr,
    pub client_port: u16,
    pub local_addr: IpAddr,
    pub local_port: u16,
}

/// The stop POST's body: which VM, and why now.
#[derive(Debug, Serialize)]
pub struct StopRequest<'a> {
    pub vm_ip: IpAddr,
    pub port: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<&'a str>,
    /// Only when the profile keeps one VM per client address, the way the start request named it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_addr: Option<IpAddr>,
    pub idle_seconds: u64,
}

/// Where the VM's sshd is to be reached, and how many requests it took to learn it.
#[derive(Debug)]
pub struct Started {
    pub addr: SocketAddr,
    pub attempts: u32,
    /// How the platform gave it, if the answer says (booted, resumed…).
    pub how: Option<How>,
}

impl Started {
    /// An address known without asking the API now: another connection's start, or a VM that runs.
    pub fn known(addr: SocketAddr) -> Started {
        Started {
            addr,
            attempts: 0,
            how: None,
        }
    }
}

/// Which API a failure is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Start,
    Stop,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Endpoint::Start => "start API",
            Endpoint::Stop => "stop API",
        })
    }
}

impl Endpoint {
    /// The setting that bounds all tries together.
    fn budget_setting(self) -> &'static str {
        match self {
            Endpoint::Start => "boot_timeout",
            Endpoint::Stop => "stop_timeout",
        }
    }
}

/// Why an API gave no usable answer. For the start API, the text is what the ssh user reads after "VM failed
/// to start: ".
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    #[error("cannot reach the {0} ({1})")]
    Unreachable(Endpoint, String),
    /// A certificate that is not trusted will not become trusted by retrying.
    #[error("the {0}'s TLS connection failed ({1})")]
    Tls(Endpoint, String),
    /// One request took all of `api_timeout`.
    #[error("the {0} did not answer within {s}", s = crate::seconds(*.1))]
    Timeout(Endpoint, Duration),
    /// The overall deadline cut the only request short.
    #[error("the {0} did not answer within {s} ({b})", s = crate::seconds(*.1), b = .0.budget_setting())]
    Deadline(Endpoint, Duration),
    #[error("the {endpoint} answered {status}{}", .detail.as_ref().map(|d| format!(": {d}")).unwrap_or_default())]
    Status {
        endpoint: Endpoint,
        status: StatusCode,
        detail: Option<String>,
    },
    #[error("the {0} redirected more than {MAX_REDIRECTS} times")]
    TooManyRedirects(Endpoint),
    #[error("the {0} redirected to something other than an http:// or https:// URL")]
    BadRedirect(Endpoint),
    #[error("the {0}'s answer is larger than {k} KiB", k = MAX_ANSWER_BYTES / 1024)]
    TooLarge(Endpoint),
    #[error("the start API's answer is unusable: {0}")]
    BadAnswer(#[from] Unusable),
    /// The answer points where no VM may be (`vm_networks`): a failed start, like any unusable answer.
    #[error("the start API answered {ip}, {why}", ip = .addr.ip())]
    NotAllowed { addr: SocketAddr, why: NotAllowed },
    /// Another connection's start of the same VM, whose answer this connection shares.
    #[error("{0}")]
    Shared(String),
}

impl ApiError {
    /// Worth another try: the API may be restarting or overloaded. A 4xx or a bad answer will not change.
    fn is_transient(&self) -> bool {
        match self {
            ApiError::Unreachable(..) | ApiError::Timeout(..) => true,
            ApiError::Status { status, .. } => status.is_server_error(),
            _ => false,
        }
    }
}

/// The HTTP client of one profile's APIs, built once per process (or per configuration, in the daemon):
/// TLS set-up and connections are reused.
pub struct Api {
    client: reqwest::Client,
    /// The token and `api_headers`: for the configured URLs' origins only.
    headers: HeaderMap,
    start_url: SecretUrl,
    stop_url: Option<SecretUrl>,
    timeout: Duration,
    default_port: u16,
}

impl Api {
    pub fn new(profile: &Profile) -> anyhow::Result<Api> {
        let config = &profile.api;
        let stop_url = profile.stop.as_ref().map(|stop| stop.url.clone());
        let mut headers = HeaderMap::new();
        for (name, value) in config.all_headers() {
            headers.append(name.clone(), sensitive(value.expose())?);
        }
        if let Some(token) = &config.token {
            headers.insert(
                AUTHORIZATION,
                sensitive(&format!("Bearer {}", token.expose()))?,
            );
        }
        // ring does the TLS cryptography, not aws-lc, reqwest's default. aws-lc probes the CPU when the client is
        // built, and in the per-connection mode every login builds one, even for a plain-http API; in a VM each
        // of the probe's CPUID instructions traps to the hypervisor (14 µs apiece on the benchmark's machine).
        // ring probes only once it does cryptography. An error means a provider is installed already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        // reqwest would follow redirects with every header but its own sensitive ones (Authorization, Cookie)
        // to any host, and add a Referer: `send` follows them instead.
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("ssh-on-demand/", env!("CARGO_PKG_VERSION")))
            .redirect(Policy::none());
        let https = config.url.scheme() == "https"
            || stop_url.as_ref().is_some_and(|u| u.scheme() == "https");
        if https {
            if let Some(path) = &config.ca_file {
                let pem = fs::read(path)
                    .with_context(|| format!("reading api_ca_file {}", path.display()))?;
                let certs = Certificate::from_pem_bundle(&pem)
                    .with_context(|| format!("api_ca_file {}", path.display()))?;
                ensure!(
                    !certs.is_empty(),
                    "api_ca_file {} holds no PEM certificate",
                    path.display()
                );
                builder = builder.tls_certs_merge(certs);
            }
        } else {
            // Loading the system's CA store is most of the cost of building a client, and in the per-connection
            // mode every connection pays it: skip it for plain http. (A redirect from http to https then fails;
            // configure the https URL.)
            builder = builder.tls_certs_only([]);
        }
        if config.url.scheme() == "http" {
            // A new connection for every request. Many start APIs (Python's http.server, as usually written)
            // send an answer's head and body as two segments with Nagle on, so the body waits until the head
            // is ACKed; on a reused connection whose last answer came less than ~40 ms before, Linux delays
            // that ACK, and the daemon's login stalls 40 ms. A new connection ACKs at once (quick-ACK), for
            // the price of a handshake that a warm login hides behind the VM's own answer. (TCP_QUICKACK
            // would have to be set again before every answer, and reqwest does not hand out its sockets.)
            // An https API keeps its connections: a new one would cost a TLS handshake per login.
            builder = builder.pool_max_idle_per_host(0);
        }
        Ok(Api {
            client: builder.build().context("setting up the HTTP client")?,
            headers,
            start_url: config.url.clone(),
            stop_url,
            timeout: config.timeout,
            default_port: profile.vm_port,
        })
    }

    /// Asks for the VM until it gets an address, a final refusal, or `deadline` (`budget` after the client
    /// identified) leaves no room for another try.
    pub async fn start(
        &self,
        request: &StartRequest<'_>,
        deadline: Instant,
        budget: Duration,
    ) -> Result<Started, ApiError> {
        let body = serde_json::to_vec(request).expect("addresses and strings always serialize");
        let call = Call {
            endpoint: Endpoint::Start,
            url: &self.start_url,
            deadline,
            budget,
        };
        let ((addr, how), attempts) = self
            .post(call, body, |content_type, body| {
                let addr = parse_answer(content_type, body, self.default_port)
                    .map_err(ApiError::BadAnswer)?;
                Ok((addr, answer::how(body)))
            })
            .await?;
        Ok(Started {
            addr,
            attempts,
            how,
        })
    }

    /// Asks for the VM to be stopped, retrying outages for at most `budget`. `None` without a `stop_url`.
    pub async fn stop(
        &self,
        request: &StopRequest<'_>,
        budget: Duration,
    ) -> Option<Result<u32, ApiError>> {
        let url = self.stop_url.as_ref()?;
        let body = serde_json::to_vec(request).expect("addresses and strings always serialize");
        let call = Call {
            endpoint: Endpoint::Stop,
            url,
            deadline: deadline_after(budget),
            budget,
        };
        let result = self.post(call, body, |_, _| Ok(())).await;
        Some(result.map(|((), attempts)| attempts))
    }
}

fn sensitive(value: &str) -> anyhow::Result<HeaderValue> {
    let mut value = HeaderValue::from_str(value).context("invalid header value")?;
    value.set_sensitive(true);
    Ok(value)
}

#[cfg(test)]
mod tests;
