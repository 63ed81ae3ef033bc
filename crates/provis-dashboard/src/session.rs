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
    #[error(
        "this signed login link is not valid here: {0}; make a new one with `provis dashboard login`"
    )]
    BadSignature(&'static str),
}

/// A login link signed with a key (`provis dashboard login`).
#[derive(Debug, Clone)]
pub struct SignedLogin<'a> {
    /// The signer's public key, `ed25519:<hex>`.
    pub key: &'a str,
    pub at_unix_ms: i64,
    pub signature: &'a str,
    /// This dashboard as the browser named it (its `Host` header).
    pub host: &'a str,
}

/// The sessions of one dashboard.
#[derive(Debug, Clone)]
pub struct Sessions {
    sessions: moka::sync::Cache<String, Session>,
    /// Signed links already used, kept as long as they could be used.
    used_signatures: moka::sync::Cache<String, ()>,
    nats: async_nats::Client,
    grants: provis_master::admission::Grants,
}

impl Sessions {
    pub fn new(nats: async_nats::Client, grants: provis_master::admission::Grants) -> Self {
        let window = Duration::from_millis(
            u64::try_from(provis_core::master_api::SIGNED_LOGIN_WINDOW_MS).unwrap_or(0) * 2,
        );
        Self {
            sessions: moka::sync::Cache::builder()
                .time_to_idle(SESSION_TTL)
                .max_capacity(10_000)
                .build(),
            used_signatures: moka::sync::Cache::builder()
                .time_to_live(window)
                .max_capacity(100_000)
                .build(),
            nats,
            grants,
        }
    }

    /// Opens a session for a link signed by an observer's or an operator's
    /// key, made for this dashboard in the last few minutes, used once.
    pub fn log_in_signed(&self, login: &SignedLogin<'_>) -> Result<String, LoginError> {
        let who = if self.grants.observers.iter().any(|k| k == login.key) {
            "observer"
        } else if self.grants.operators.iter().any(|k| k == login.key) {
            "operator"
        } else {
            return Err(LoginError::BadSignature(
                "the key is not one of the master's observers or operators",
            ));
        };
        let age = provis_core::envelope::now_unix_ms() - login.at_unix_ms;
        if !(-60_000..=provis_core::master_api::SIGNED_LOGIN_WINDOW_MS).contains(&age) {
            return Err(LoginError::BadSignature("it was made too long ago"));
        }
        let message = provis_core::master_api::signed_login_message(login.host, login.at_unix_ms);
        if !provis_core::identity::verify(login.key, message.as_bytes(), login.signature) {
            return Err(LoginError::BadSignature(
                "its signature does not match (made for another address?)",
            ));
        }
        let mut fresh = false;
        self.used_signatures
            .entry(login.signature.to_owned())
            .or_insert_with(|| {
                fresh = true;
            });
        if !fresh {
            return Err(LoginError::BadSignature("it was used already"));
        }
        let id = provis_core::identity::random_hex(32)
            .map_err(|err| LoginError::Storage(err.to_string()))?;
        let short: String = login
            .key
            .trim_start_matches("ed25519:")
            .chars()
            .take(12)
            .collect();
        self.sessions.insert(
            id.clone(),
            Session {
                who: format!("{who}:{short}"),
            },
        );
        Ok(id)
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
