//! Who may look: a one-time login token (issued by a master, its SHA-256
//! in the config bucket) becomes a session, a random id in an HttpOnly,
//! SameSite=Strict cookie, kept by this dashboard for [`SESSION_TTL`].
//! Every page but `/login` requires one.

use std::time::Duration;

use provis_core::master_api::{DashboardTokenRecord, dashboard_token_key};

/// How long a session lasts without being used.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

/// The cookie that carries the session id.
pub const COOKIE: &str = "provis_session";

/// A logged-in viewer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Who issued the token it logged in with.
    pub who: String,
}

/// Why a login was refused.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error(
        "this login link is not valid (unknown, or used already): ask for a new one with `provis dashboard token`"
    )]
    Unknown,
    #[error("this login link expired: ask for a new one with `provis dashboard token`")]
    Expired,
    #[error("the fleet's storage does not answer ({0}); try again")]
    Storage(String),
}

/// The sessions of one dashboard.
#[derive(Debug, Clone)]
pub struct Sessions {
    sessions: moka::sync::Cache<String, Session>,
    nats: async_nats::Client,
}

impl Sessions {
    pub fn new(nats: async_nats::Client) -> Self {
        Self {
            sessions: moka::sync::Cache::builder()
                .time_to_idle(SESSION_TTL)
                .max_capacity(10_000)
                .build(),
            nats,
        }
    }

    /// The session `id` names, if it is one.
    pub fn get(&self, id: &str) -> Option<Session> {
        self.sessions.get(id)
    }

    pub fn end(&self, id: &str) {
        self.sessions.invalidate(id);
    }

    /// Takes `token` (once: it is deleted as it is taken) and opens a
    /// session; its id.
    pub async fn log_in(&self, token: &str) -> Result<String, LoginError> {
        let js = async_nats::jetstream::new(self.nats.clone());
        let kv = js
            .get_key_value(provis_core::storage::BUCKET_CONFIG)
            .await
            .map_err(|err| LoginError::Storage(err.to_string()))?;
        let key = dashboard_token_key(&provis_core::identity::sha256_hex(token));
        let entry = kv
            .entry(key.clone())
            .await
            .map_err(|err| LoginError::Storage(err.to_string()))?
            .filter(|entry| entry.operation == async_nats::jetstream::kv::Operation::Put)
            .ok_or(LoginError::Unknown)?;
        let record: DashboardTokenRecord =
            serde_json::from_slice(&entry.value).map_err(|_| LoginError::Unknown)?;
        // Deleted at the revision read: of two logins racing, one wins.
        kv.delete_expect_revision(&key, Some(entry.revision))
            .await
            .map_err(|_| LoginError::Unknown)?;
        if record.expires_unix_ms < provis_core::envelope::now_unix_ms() {
            return Err(LoginError::Expired);
        }
        let id = provis_core::identity::random_hex(32)
            .map_err(|err| LoginError::Storage(err.to_string()))?;
        self.sessions.insert(
            id.clone(),
            Session {
                who: record.by.unwrap_or_else(|| "token".to_owned()),
            },
        );
        Ok(id)
    }
}

/// The session id in a `Cookie` header, if any.
pub fn session_id(cookies: &str) -> Option<&str> {
    cookies
        .split(';')
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_cookie_is_found_among_others() {
        assert_eq!(session_id("a=1; provis_session=abc; b=2"), Some("abc"));
        assert_eq!(session_id("provis_session_x=1"), None);
        assert_eq!(session_id(""), None);
    }
}
