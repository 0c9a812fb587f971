//! Why a start or stop did not happen, and the HTTP status that tells the proxy whether to retry.
//!
//! The proxy shows the text to the ssh user ("VM failed to start: the start API answered 409 Conflict:
//! <text>"), so it is the platform's own words, never a stack or a secret.

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// The request names no VM we know of (profile, client address): 404, not retried.
    #[error("{0}")]
    NoSuchVm(String),
    /// The platform refused, and asking again will not change that (no such domain, not enough memory,
    /// a script that exited 1): 409, not retried.
    #[error("{0}")]
    Refused(String),
    /// The platform could not be asked, or failed in a way that may pass (connection refused, its own 5xx):
    /// 502, which the proxy retries until its boot deadline.
    #[error("{0}")]
    Unavailable(String),
    /// The platform started the VM but named no address within `address_timeout`: 504, retried.
    #[error("{0}")]
    Timeout(String),
}

impl Failure {
    pub fn status(&self) -> StatusCode {
        match self {
            Failure::NoSuchVm(_) => StatusCode::NOT_FOUND,
            Failure::Refused(_) => StatusCode::CONFLICT,
            Failure::Unavailable(_) => StatusCode::BAD_GATEWAY,
            Failure::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The same failure with `context` in front, e.g. "starting domain 'dev': <the platform's words>".
    pub fn context(self, context: impl std::fmt::Display) -> Failure {
        let wrap = |m: String| format!("{context}: {m}");
        match self {
            Failure::NoSuchVm(m) => Failure::NoSuchVm(wrap(m)),
            Failure::Refused(m) => Failure::Refused(wrap(m)),
            Failure::Unavailable(m) => Failure::Unavailable(wrap(m)),
            Failure::Timeout(m) => Failure::Timeout(wrap(m)),
        }
    }

    /// Whether waiting and asking again may help (used while waiting for an address or a state).
    pub fn is_transient(&self) -> bool {
        matches!(self, Failure::Unavailable(_) | Failure::Timeout(_))
    }

    /// Whether the platform could not be asked at all, so that nothing is known about what it did.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Failure::Unavailable(_))
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (
            self.status(),
            Json(serde_json::json!({ "error": self.to_string() })),
        )
            .into_response()
    }
}

/// An error and its causes on one line, for messages built from library errors (reqwest's "error sending
/// request" alone says nothing; its causes say "Connection refused").
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
