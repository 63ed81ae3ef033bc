//! What can go wrong asking the master: it answered with an error (an
//! [`ApiError`], sent as the services protocol's error headers), or no
//! answer came at all.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Header carrying an error's description (the services protocol's).
pub const ERROR_HEADER: &str = "Nats-Service-Error";
/// Header carrying an error's code (the services protocol's).
pub const ERROR_CODE_HEADER: &str = "Nats-Service-Error-Code";

/// What kind of error the master answered with; each has an HTTP-like code
/// on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApiErrorKind {
    /// The request cannot be done as asked (bad shape, bad expression): 400.
    Usage,
    /// What the request names does not exist: 404.
    NotFound,
    /// The request does not fit the master's state now: 409.
    Conflict,
    /// The master cannot answer yet (starting, rebuilding, stopping): 503.
    Unavailable,
    /// The master tried and failed (storage, the repository): 500.
    Failed,
}

impl ApiErrorKind {
    pub fn code(self) -> usize {
        match self {
            Self::Usage => 400,
            Self::NotFound => 404,
            Self::Conflict => 409,
            Self::Unavailable => 503,
            Self::Failed => 500,
        }
    }

    /// The kind of a code read off the wire; an unknown code is a failure.
    pub fn from_code(code: usize) -> Self {
        match code {
            400 => Self::Usage,
            404 => Self::NotFound,
            409 => Self::Conflict,
            503 => Self::Unavailable,
            _ => Self::Failed,
        }
    }
}

/// An error the master answered with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ApiErrorKind,
    pub message: String,
}

impl ApiError {
    pub fn new(kind: ApiErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    pub fn usage(message: impl Into<String>) -> Self {
        Self::new(ApiErrorKind::Usage, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ApiErrorKind::NotFound, message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ApiErrorKind::Conflict, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ApiErrorKind::Unavailable, message)
    }

    pub fn failed(message: impl Into<String>) -> Self {
        Self::new(ApiErrorKind::Failed, message)
    }

    /// This error in the services protocol's terms.
    pub fn to_service_error(&self) -> async_nats::service::error::Error {
        async_nats::service::error::Error {
            code: self.kind.code(),
            // Headers are one line.
            status: self.message.replace(['\r', '\n'], " "),
        }
    }

    /// The error an answer's headers carry, if they carry one.
    pub fn from_headers(headers: &async_nats::HeaderMap) -> Option<Self> {
        let code = headers.get(ERROR_CODE_HEADER)?;
        let code = code.as_str().trim().parse().unwrap_or(500);
        let message = headers
            .get(ERROR_HEADER)
            .map(|value| value.as_str().to_owned())
            .unwrap_or_default();
        Some(Self::new(ApiErrorKind::from_code(code), message))
    }
}

/// Why a request to the master got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum MasterApiError {
    /// The master answered with an error.
    #[error(transparent)]
    Answered(#[from] ApiError),
    #[error("no master serves {subject}; is `provis master` (or `provis up`) running?")]
    NoMaster { subject: String },
    #[error("the master did not answer {subject} within {timeout:?}")]
    Timeout { subject: String, timeout: Duration },
    #[error("cannot ask the master on {subject}")]
    Request {
        subject: String,
        #[source]
        source: async_nats::RequestError,
    },
    #[error("cannot encode the request to {subject}")]
    Encode {
        subject: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "the master's answer on {subject} is not what provis {} reads",
        crate::VERSION
    )]
    Decode {
        subject: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the master's pages on {subject} do not advance (cursor {cursor:?} came back)")]
    PagesStuck { subject: String, cursor: String },
    #[error("the master's selection came incomplete: {received} of {sent} minions")]
    PartsLost { sent: usize, received: usize },
    #[error("cannot take the master's answer in parts on {subject}")]
    Parts {
        subject: String,
        #[source]
        source: async_nats::Error,
    },
}

impl MasterApiError {
    /// True when the request itself was wrong: the CLI exits 2.
    pub fn is_usage(&self) -> bool {
        matches!(self, Self::Answered(err) if err.kind == ApiErrorKind::Usage)
    }

    /// The master's error kind, when it answered with one.
    pub fn kind(&self) -> Option<ApiErrorKind> {
        match self {
            Self::Answered(err) => Some(err.kind),
            _ => None,
        }
    }
}
