//! One call's HTTP exchange: POSTs retried until the deadline, redirects followed without the configured
//! headers leaving their origin, the answer's size bound, and failures told apart (final or worth another
//! try, TLS or not).

use std::time::Duration;

use reqwest::{
    Method,
    header::{ACCEPT, CONTENT_TYPE, LOCATION},
};
use ssh_on_demand_common::retry::Backoff;
use tokio::time::{Instant, timeout};
use tracing::info;

use super::{
    Api, ApiError, Endpoint, FIRST_RETRY_DELAY, MAX_ANSWER_BYTES, MAX_REDIRECTS, MAX_RETRY_DELAY,
    answer::error_detail,
};
use crate::secret::SecretUrl;

impl Api {
    /// POSTs `body` until a 2xx answer that `read` accepts, a final error, or the deadline.
    pub(super) async fn post<T>(
        &self,
        call: Call<'_>,
        body: Vec<u8>,
        read: impl Fn(&str, &[u8]) -> Result<T, ApiError>,
    ) -> Result<(T, u32), ApiError> {
        let mut backoff = Backoff::new(FIRST_RETRY_DELAY, MAX_RETRY_DELAY);
        let mut attempts = 0;
        let mut previous: Option<ApiError> = None;
        loop {
            attempts += 1;
            let error = match self.attempt(&call, body.clone(), &read).await {
                Ok(value) => return Ok((value, attempts)),
                Err(error) => error,
            };
            // A last try cut short by the deadline says less about the API than the try before it.
            let error = match (error, previous.take()) {
                (ApiError::Deadline(..), Some(previous)) => previous,
                (error, _) => error,
            };
            if !error.is_transient() || Instant::now() >= call.deadline {
                return Err(error);
            }
            // Not a warning: a retry that then succeeds is no failure; the summary record tells the end.
            info!(attempt = attempts, %error, "{} failed; retrying", call.endpoint);
            previous = Some(error);
            if !backoff.pause(call.deadline).await {
                return Err(previous.unwrap_or(ApiError::Deadline(call.endpoint, call.budget)));
            }
        }
    }

    pub(super) async fn attempt<T>(
        &self,
        call: &Call<'_>,
        body: Vec<u8>,
        read: &impl Fn(&str, &[u8]) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let left = call.deadline.saturating_duration_since(Instant::now());
        let endpoint = call.endpoint;
        let exchange = async {
            let response = self.send(call, body).await?;
            let status = response.status();
            let content_type = response
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_ascii_lowercase();
            let body = read_limited(endpoint, response).await?;
            if !status.is_success() {
                return Err(ApiError::Status {
                    endpoint,
                    status,
                    detail: error_detail(&body),
                });
            }
            read(&content_type, &body)
        };
        match timeout(self.timeout.min(left), exchange).await {
            Ok(result) => result,
            Err(_) if left < self.timeout => Err(ApiError::Deadline(endpoint, call.budget)),
            Err(_) => Err(ApiError::Timeout(endpoint, self.timeout)),
        }
    }

    /// POSTs `body` to the call's URL and follows up to [`MAX_REDIRECTS`] redirects as browsers and reqwest
    /// do (301 and 302 turn a POST into a GET, 303 always, 307 and 308 keep it), but once a redirect leaves
    /// the URL's origin (scheme, host and port) the configured headers stay behind for the rest of the
    /// chain: a header that authenticates to one API must not reach whatever it redirects to.
    pub(super) async fn send(
        &self,
        call: &Call<'_>,
        body: Vec<u8>,
    ) -> Result<reqwest::Response, ApiError> {
        let endpoint = call.endpoint;
        let mut url = call.url.expose().clone();
        let mut body = Some(body);
        let mut headers = Some(&self.headers);
        for _ in 0..=MAX_REDIRECTS {
            let method = if body.is_some() {
                Method::POST
            } else {
                Method::GET
            };
            let mut request = self
                .client
                .request(method, url.clone())
                .header(ACCEPT, "application/json, text/plain");
            if let Some(headers) = headers {
                request = request.headers(headers.clone());
            }
            if let Some(body) = &body {
                request = request
                    .header(CONTENT_TYPE, "application/json")
                    .body(body.clone());
            }
            let response = request.send().await.map_err(|e| classify(endpoint, e))?;
            let status = response.status().as_u16();
            let followed = matches!(status, 301 | 302 | 303 | 307 | 308);
            let Some(location) = response.headers().get(LOCATION).filter(|_| followed) else {
                return Ok(response);
            };
            let next = location
                .to_str()
                .ok()
                .and_then(|location| url.join(location).ok())
                .filter(|next| matches!(next.scheme(), "http" | "https"))
                .ok_or(ApiError::BadRedirect(endpoint))?;
            if matches!(status, 301..=303) {
                body = None;
            }
            if next.origin() != url.origin() {
                headers = None;
            }
            url = next;
        }
        Err(ApiError::TooManyRedirects(endpoint))
    }
}

/// `budget` from now, or as far as a deadline goes: a `stop_timeout` of "300000000000 years" parses, and
/// `Instant + Duration` panics past what the clock can hold.
pub(super) fn deadline_after(budget: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    let now = Instant::now();
    now.checked_add(budget).unwrap_or(now + FAR)
}

/// One call's fixed parts.
pub(super) struct Call<'a> {
    pub(super) endpoint: Endpoint,
    pub(super) url: &'a SecretUrl,
    pub(super) deadline: Instant,
    /// What the deadline was set from, for the message when it passes.
    pub(super) budget: Duration,
}

fn classify(endpoint: Endpoint, error: reqwest::Error) -> ApiError {
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
        ApiError::Tls(endpoint, cause.to_string())
    } else {
        ApiError::Unreachable(endpoint, cause.to_string())
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

async fn read_limited(
    endpoint: Endpoint,
    mut response: reqwest::Response,
) -> Result<Vec<u8>, ApiError> {
    if response
        .content_length()
        .is_some_and(|n| n > MAX_ANSWER_BYTES as u64)
    {
        return Err(ApiError::TooLarge(endpoint));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| classify(endpoint, e))? {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(ApiError::TooLarge(endpoint));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
