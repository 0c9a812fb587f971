//! Why a start or stop did not happen, and the HTTP status that tells the proxy whether to retry.
//!
//! The proxy shows the text to the ssh user ("VM failed to start: the start API answered 409 Conflict:
//! <text>"), so it is the platform's own words, never a stack or a secret.

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};

/// What kind of failure it is, which decides the HTTP status and so whether the proxy asks again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The request names no VM we know of (profile, client address): 404, not retried.
    NoSuchVm,
    /// The platform refused, and asking again will not change that (no such domain, not enough memory,
    /// a script that exited 1): 409, not retried.
    Refused,
    /// The platform could not be asked, or failed in a way that may pass (connection refused, its own 5xx):
    /// 502, which the proxy retries until its boot deadline.
    Unavailable,
    /// The platform started the VM but named no address within `address_timeout`: 504, retried.
    Timeout,
}

/// Why a start or stop did not happen: its [`Kind`], and in words what we were doing and what the platform
/// said.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    kind: Kind,
    message: String,
}

impl Failure {
    pub fn new(kind: Kind, message: impl Into<String>) -> Failure {
        Failure {
            kind,
            message: message.into(),
        }
    }

    pub fn no_such_vm(message: impl Into<String>) -> Failure {
        Failure::new(Kind::NoSuchVm, message)
    }

    pub fn refused(message: impl Into<String>) -> Failure {
        Failure::new(Kind::Refused, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Failure {
        Failure::new(Kind::Unavailable, message)
    }

    pub fn timeout(message: impl Into<String>) -> Failure {
        Failure::new(Kind::Timeout, message)
    }

    /// The platform could not be asked: `doing` and the library's error with its causes ("error sending
    /// request" alone says nothing; its causes say "Connection refused").
    pub fn unreachable(
        doing: impl std::fmt::Display,
        error: impl std::error::Error + Send + Sync + 'static,
    ) -> Failure {
        Failure::unavailable(format!("{doing}: {:#}", anyhow::Error::new(error)))
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The platform's words alone, without the kind.
    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn status(&self) -> StatusCode {
        match self.kind {
            Kind::NoSuchVm => StatusCode::NOT_FOUND,
            Kind::Refused => StatusCode::CONFLICT,
            Kind::Unavailable => StatusCode::BAD_GATEWAY,
            Kind::Timeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The same failure with `context` in front, e.g. "starting domain 'dev': <the platform's words>".
    pub fn context(self, context: impl std::fmt::Display) -> Failure {
        Failure::new(self.kind, format!("{context}: {}", self.message))
    }

    /// Whether waiting and asking again may help (used while waiting for an address or a state).
    pub fn is_transient(&self) -> bool {
        matches!(self.kind, Kind::Unavailable | Kind::Timeout)
    }

    /// Whether the platform could not be asked at all, so that nothing is known about what it did.
    pub fn is_unreachable(&self) -> bool {
        self.kind == Kind::Unavailable
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
