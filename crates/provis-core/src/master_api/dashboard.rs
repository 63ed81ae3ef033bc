//! One-time login tokens for the master's dashboard: the master issues one
//! (`dashboard.token`, for admin operators; `provis dashboard token`) and
//! keeps only its SHA-256, with its expiry, in the config bucket, so any
//! master's dashboard takes it, once.

use serde::{Deserialize, Serialize};

/// The most a dashboard token may live: a day.
pub const MAX_DASHBOARD_TOKEN_TTL_S: u64 = 86_400;

/// The config bucket's key for the token whose SHA-256 is `sha256_hex`.
pub fn dashboard_token_key(sha256_hex: &str) -> String {
    format!("dashboard-token.{sha256_hex}")
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DashboardTokenRequest {
    /// How long the token may be used to log in, in seconds. Default: 3600.
    #[serde(default = "default_ttl_s")]
    pub ttl_s: u64,
    /// Who asked, for the record.
    #[serde(default)]
    pub by: Option<String>,
}

fn default_ttl_s() -> u64 {
    3_600
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DashboardTokenAnswer {
    pub token: String,
    pub ttl_s: u64,
    /// `http://<http_addr>/login?token=…` when the answering master serves
    /// a dashboard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// What the bucket holds for a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DashboardTokenRecord {
    pub expires_unix_ms: i64,
    #[serde(default)]
    pub by: Option<String>,
}

/// How long a signed login link may be used after it was made.
pub const SIGNED_LOGIN_WINDOW_MS: i64 = 5 * 60 * 1000;

/// What a key signs to log in to the dashboard at `host` (as the browser
/// names it, `127.0.0.1:8080`) at `at_unix_ms`: bound to that dashboard
/// and that moment, so a link is good there, briefly, once.
pub fn signed_login_message(host: &str, at_unix_ms: i64) -> String {
    format!("provis dashboard login\n{host}\n{at_unix_ms}")
}
