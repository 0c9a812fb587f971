//! Start API: the HTTP POST that asks the operator's API to start the VM, and the reading of its answer.
//!
//! The contract (README.md, "Start API"): we POST a small JSON body describing the connection; a 2xx answer
//! is either JSON `{"vm_ip": "192.168.0.57", "port": 22}` (port optional) or plain text `192.168.0.57`,
//! `192.168.0.57:2222` or `[2001:db8::7]:2222`. A 4xx answer refuses the start, and its text (or the JSON
//! `error`/`message` field) is shown to the user. Connection errors, timeouts and 5xx are retried.

use std::{
    fs,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{Context, ensure};
use reqwest::{
    Certificate, StatusCode, Url,
    header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue},
    redirect::Policy,
};
use serde::{Deserialize, Serialize};
use tokio::time::{Instant, timeout};
use tracing::warn;

use crate::{config::ApiConfig, retry::Backoff};

/// Bigger answers are refused: an address fits in a few dozen bytes, and a runaway body must not eat memory.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// Redirects followed before giving up, which also ends redirect loops.
pub const MAX_REDIRECTS: usize = 5;
/// First pause before retrying a failed request; it doubles (with jitter) up to [`MAX_RETRY_DELAY`].
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(200);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);
/// Longest error text from the API that is passed on to the user.
const MAX_DETAIL: usize = 200;

/// The POST body: what is known of the connection. APIs that ignore bodies keep working.
#[derive(Debug, Serialize)]
pub struct StartRequest<'a> {
    pub client_addr: IpAddr,
    pub client_port: u16,
    pub local_addr: IpAddr,
    pub local_port: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<&'a str>,
}

/// Where the VM's sshd is to be reached, and how many requests it took to learn it.
#[derive(Debug)]
pub struct Started {
    pub addr: SocketAddr,
    pub attempts: u32,
}

/// Why the start API gave no address. The text is what the ssh user reads, after "VM failed to start: ".
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot reach the start API ({0})")]
    Unreachable(String),
    /// A certificate that is not trusted will not become trusted by retrying.
    #[error("the start API's TLS connection failed ({0})")]
    Tls(String),
    #[error("the start API did not answer within {}", crate::seconds(*.0))]
    Timeout(Duration),
    #[error("the start API answered {status}{}", .detail.as_ref().map(|d| format!(": {d}")).unwrap_or_default())]
    Status {
        status: StatusCode,
        detail: Option<String>,
    },
    #[error("the start API redirected more than {MAX_REDIRECTS} times")]
    TooManyRedirects,
    #[error("the start API's answer is larger than {} KiB", MAX_ANSWER_BYTES / 1024)]
    TooLarge,
    #[error("the start API's answer is unusable: {0}")]
    BadAnswer(String),
}

impl ApiError {
    /// Worth another try: the API may be restarting or overloaded. A 4xx or a bad answer will not change.
    fn is_transient(&self) -> bool {
        match self {
            ApiError::Unreachable(_) | ApiError::Timeout(_) => true,
            ApiError::Status { status, .. } => status.is_server_error(),
            _ => false,
        }
    }
}

pub struct StartApi {
    client: reqwest::Client,
    url: Url,
    timeout: Duration,
    default_port: u16,
}

impl StartApi {
    pub fn new(config: &ApiConfig, default_port: u16) -> anyhow::Result<StartApi> {
        let mut headers = HeaderMap::new();
        for (name, value) in &config.headers {
            headers.append(name.clone(), sensitive(value.expose())?);
        }
        if let Some(token) = &config.token {
            headers.insert(
                AUTHORIZATION,
                sensitive(&format!("Bearer {}", token.expose()))?,
            );
        }
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("ssh-on-demand/", env!("CARGO_PKG_VERSION")))
            .default_headers(headers)
            .redirect(Policy::limited(MAX_REDIRECTS));
        if config.url.scheme() == "https" {
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
            // Loading the system's CA store is most of the cost of building a client, and every connection pays
            // it: skip it for plain http. (A redirect from http to https then fails; configure the https URL.)
            builder = builder.tls_certs_only([]);
        }
        Ok(StartApi {
            client: builder.build().context("setting up the HTTP client")?,
            url: config.url.clone(),
            timeout: config.timeout,
            default_port,
        })
    }

    /// Asks for the VM until it gets an address, a final refusal, or `deadline` leaves no room for another try.
    pub async fn start(
        &self,
        request: &StartRequest<'_>,
        deadline: Instant,
    ) -> Result<Started, ApiError> {
        let body = serde_json::to_vec(request).expect("addresses and strings always serialize");
        let mut backoff = Backoff::new(FIRST_RETRY_DELAY, MAX_RETRY_DELAY);
        let mut attempts = 0;
        loop {
            attempts += 1;
            let error = match self.attempt(body.clone(), deadline).await {
                Ok(addr) => return Ok(Started { addr, attempts }),
                Err(error) => error,
            };
            if !error.is_transient() || Instant::now() >= deadline {
                return Err(error);
            }
            warn!(attempt = attempts, %error, "start API failed; retrying");
            if !backoff.pause(deadline).await {
                return Err(error);
            }
        }
    }

    async fn attempt(&self, body: Vec<u8>, deadline: Instant) -> Result<SocketAddr, ApiError> {
        let limit = self
            .timeout
            .min(deadline.saturating_duration_since(Instant::now()));
        let exchange = async {
            let response = self
                .client
                .post(self.url.clone())
                .header(CONTENT_TYPE, "application/json")
                .header(ACCEPT, "application/json, text/plain")
                .body(body)
                .send()
                .await
                .map_err(classify)?;
            let status = response.status();
            let content_type = response
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_ascii_lowercase();
            let body = read_limited(response).await?;
            if !status.is_success() {
                return Err(ApiError::Status {
                    status,
                    detail: error_detail(&body),
                });
            }
            parse_answer(&content_type, &body, self.default_port).map_err(ApiError::BadAnswer)
        };
        timeout(limit, exchange)
            .await
            .map_err(|_| ApiError::Timeout(limit))?
    }
}

fn sensitive(value: &str) -> anyhow::Result<HeaderValue> {
    let mut value = HeaderValue::from_str(value).context("invalid header value")?;
    value.set_sensitive(true);
    Ok(value)
}

fn classify(error: reqwest::Error) -> ApiError {
    if error.is_redirect() {
        return ApiError::TooManyRedirects;
    }
    // reqwest's own text is "error sending request for url (…)"; the innermost cause says what went wrong.
    let mut cause: &dyn std::error::Error = &error;
    let mut tls = false;
    loop {
        tls |= is_tls_error(cause);
        match cause.source() {
            Some(source) => cause = source,
            None => break,
        }
    }
    if tls {
        ApiError::Tls(cause.to_string())
    } else {
        ApiError::Unreachable(cause.to_string())
    }
}

/// A rustls error, which reaches us wrapped in `io::Error`s (whose `source()` skips what they wrap).
fn is_tls_error(mut error: &(dyn std::error::Error + 'static)) -> bool {
    loop {
        if error.is::<rustls::Error>() {
            return true;
        }
        match error
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
        {
            Some(inner) => error = inner,
            None => return false,
        }
    }
}

async fn read_limited(mut response: reqwest::Response) -> Result<Vec<u8>, ApiError> {
    if response
        .content_length()
        .is_some_and(|n| n > MAX_ANSWER_BYTES as u64)
    {
        return Err(ApiError::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(classify)? {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(ApiError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// What a refusing API said, for the user: a JSON `error`/`message`/`detail` field, or the first line of text.
/// HTML error pages carry nothing worth a line.
fn error_detail(body: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?.trim();
    if text.is_empty() || text.starts_with('<') {
        return None;
    }
    if let Ok(json) = serde_json::from_str::<serde_json::Value>(text) {
        return ["error", "message", "detail", "reason"]
            .iter()
            .find_map(|key| json.get(key)?.as_str())
            .map(short);
    }
    Some(short(text))
}

fn short(text: &str) -> String {
    let line = text.lines().next().unwrap_or("").trim();
    if line.chars().count() <= MAX_DETAIL {
        return line.to_owned();
    }
    let cut: String = line.chars().take(MAX_DETAIL).collect();
    format!("{cut}…")
}

#[derive(Deserialize)]
struct JsonAnswer {
    vm_ip: Option<String>,
    port: Option<u16>,
}

/// The VM's address from a 2xx answer, or what is wrong with the answer.
pub fn parse_answer(
    content_type: &str,
    body: &[u8],
    default_port: u16,
) -> Result<SocketAddr, String> {
    let text = std::str::from_utf8(body)
        .map_err(|_| "it is not text".to_owned())?
        .trim();
    if text.is_empty() {
        return Err("it is empty".to_owned());
    }
    if content_type.starts_with("application/json") || text.starts_with('{') {
        let answer: JsonAnswer =
            serde_json::from_str(text).map_err(|e| format!("invalid JSON ({e})"))?;
        let ip = answer.vm_ip.unwrap_or_default();
        if ip.trim().is_empty() {
            return Err("the JSON has no vm_ip".to_owned());
        }
        return usable(SocketAddr::new(
            parse_ip(ip.trim())?,
            answer.port.unwrap_or(default_port),
        ));
    }
    if text.starts_with('<') {
        return Err("it is HTML, not an address (is api_url right?)".to_owned());
    }
    if text.contains('\n') {
        return Err(format!(
            "expected one address, got several lines: {}…",
            short(text)
        ));
    }
    match text.parse::<SocketAddr>() {
        Ok(addr) => usable(addr),
        Err(_) => usable(SocketAddr::new(parse_ip(text)?, default_port)),
    }
}

fn parse_ip(text: &str) -> Result<IpAddr, String> {
    text.parse().map_err(|_| {
        let hostname = text.len() <= 253
            && text.contains(|c: char| c.is_ascii_alphabetic())
            && text
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
        if hostname {
            format!("{text:?} is a hostname; the start API must answer with an IP address")
        } else {
            format!("{:?} is not an IP address", short(text))
        }
    })
}

fn usable(addr: SocketAddr) -> Result<SocketAddr, String> {
    let ip = addr.ip();
    if ip.is_unspecified() || ip.is_multicast() || ip == IpAddr::from([255, 255, 255, 255]) {
        return Err(format!("{ip} is not a VM's address"));
    }
    if addr.port() == 0 {
        return Err("port 0 is not a VM's port".to_owned());
    }
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(content_type: &str, body: &str) -> Result<SocketAddr, String> {
        parse_answer(content_type, body.as_bytes(), 22)
    }

    #[test]
    fn json_answers() {
        let json = "application/json";
        assert_eq!(
            parse(json, r#"{"vm_ip": "192.168.0.57"}"#),
            Ok("192.168.0.57:22".parse().unwrap())
        );
        assert_eq!(
            parse(
                json,
                r#"{"vm_ip": "2001:db8::7", "port": 2222, "state": "booting"}"#
            ),
            Ok("[2001:db8::7]:2222".parse().unwrap())
        );
        // JSON without the right content type is still recognised.
        assert_eq!(
            parse("text/plain", r#"{"vm_ip":"10.0.0.1"}"#),
            Ok("10.0.0.1:22".parse().unwrap())
        );
    }

    #[test]
    fn plain_text_answers() {
        assert_eq!(
            parse("text/plain", "192.168.0.57\n"),
            Ok("192.168.0.57:22".parse().unwrap())
        );
        assert_eq!(
            parse("", "192.168.0.57:2222"),
            Ok("192.168.0.57:2222".parse().unwrap())
        );
        assert_eq!(
            parse("", "[2001:db8::7]:2222"),
            Ok("[2001:db8::7]:2222".parse().unwrap())
        );
        assert_eq!(
            parse("", "2001:db8::7"),
            Ok("[2001:db8::7]:22".parse().unwrap())
        );
    }

    #[test]
    fn unusable_answers_say_why() {
        let cases = [
            ("application/json", "{}", "no vm_ip"),
            ("application/json", r#"{"vm_ip": ""}"#, "no vm_ip"),
            ("application/json", r#"{"vm_ip": null}"#, "no vm_ip"),
            (
                "application/json",
                r#"{"vm_ip": "10.0.0.1", "port": 70000}"#,
                "invalid JSON",
            ),
            ("application/json", "not json", "invalid JSON"),
            ("text/html", "<html><body>Welcome</body></html>", "HTML"),
            ("text/plain", "", "empty"),
            ("text/plain", "vm-7.internal", "is a hostname"),
            ("text/plain", "banana split!", "not an IP address"),
            ("text/plain", "10.0.0.1\n10.0.0.2", "several lines"),
            ("text/plain", "0.0.0.0", "not a VM's address"),
            ("text/plain", "10.0.0.1:0", "port 0"),
        ];
        for (content_type, body, expected) in cases {
            let error = parse(content_type, body).unwrap_err();
            assert!(error.contains(expected), "{body:?}: {error}");
        }
        assert!(
            parse_answer("", &[0xff, 0xfe], 22)
                .unwrap_err()
                .contains("not text")
        );
    }

    #[test]
    fn refusal_detail_for_the_user() {
        assert_eq!(
            error_detail(br#"{"error": "quota exceeded"}"#).as_deref(),
            Some("quota exceeded")
        );
        assert_eq!(
            error_detail(b"no such VM\nmore text").as_deref(),
            Some("no such VM")
        );
        assert_eq!(error_detail(b"<html>403</html>"), None);
        assert_eq!(error_detail(b""), None);
        let long = "x".repeat(500);
        assert_eq!(
            error_detail(long.as_bytes()).unwrap().chars().count(),
            MAX_DETAIL + 1
        );
    }

    #[test]
    fn only_outages_and_server_errors_are_retried() {
        assert!(ApiError::Unreachable("refused".into()).is_transient());
        assert!(ApiError::Timeout(Duration::from_secs(1)).is_transient());
        let status = |status| ApiError::Status {
            status,
            detail: None,
        };
        assert!(status(StatusCode::SERVICE_UNAVAILABLE).is_transient());
        assert!(!status(StatusCode::FORBIDDEN).is_transient());
        assert!(!ApiError::BadAnswer("x".into()).is_transient());
        assert!(!ApiError::Tls("invalid peer certificate".into()).is_transient());
        assert!(!ApiError::TooLarge.is_transient());
    }
}
