//! Events: CloudEvents 1.0 JSON published on `<prefix>.event.<source>.<kind>`
//! and kept by the `PROVIS_EVENTS` stream. Other tools follow a fleet by
//! subscribing to `<prefix>.event.>`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::subject::Subjects;

/// One event as it travels on NATS.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloudEvent {
    pub specversion: String,
    pub id: String,
    /// Who emitted it, e.g. `provis/m1`.
    pub source: String,
    /// Reverse-DNS type, e.g. `io.provis.minion.online`.
    #[serde(rename = "type")]
    pub kind: String,
    /// RFC 3339 time of emission.
    pub time: String,
    /// The emitter's id (a minion id, `master`).
    pub subject: String,
    pub datacontenttype: String,
    pub data: Value,
}

/// Why an event kind was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "event kind {0:?} must be 1 to 8 dot-separated tokens of lowercase letters, digits, '-' or '_'"
)]
pub struct BadEventKind(pub String);

/// Checks a kind such as `site.enabled` before it becomes part of a subject.
pub fn check_kind(kind: &str) -> Result<(), BadEventKind> {
    let tokens: Vec<&str> = kind.split('.').collect();
    let valid = tokens.len() <= 8
        && tokens
            .iter()
            .all(|token| token.parse::<crate::MinionId>().is_ok());
    if valid {
        Ok(())
    } else {
        Err(BadEventKind(kind.to_owned()))
    }
}

impl CloudEvent {
    /// An event from `source` (a checked subject token such as a minion id or
    /// `master`) of kind `kind` (checked dot-separated tokens such as `minion.online`).
    pub fn new(source: &str, kind: &str, data: Value) -> Self {
        Self {
            specversion: "1.0".to_owned(),
            id: uuid::Uuid::new_v4().to_string(),
            source: format!("provis/{source}"),
            kind: format!("io.provis.{kind}"),
            time: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            subject: source.to_owned(),
            datacontenttype: "application/json".to_owned(),
            data,
        }
    }

    /// The kind as given to `new` (`minion.online`).
    pub fn short_kind(&self) -> &str {
        self.kind.strip_prefix("io.provis.").unwrap_or(&self.kind)
    }

    /// Publishes the event. Events are best effort: a failure is logged,
    /// never fatal to the emitter.
    pub async fn publish(&self, nats: &async_nats::Client, subjects: &Subjects) {
        let subject = subjects.event(&self.subject, self.short_kind());
        let payload = match serde_json::to_vec(self) {
            Ok(payload) => payload,
            Err(err) => {
                tracing::warn!(error = %err, "event not serialisable");
                return;
            }
        };
        if let Err(err) = nats.publish(subject.clone(), payload.into()).await {
            tracing::warn!(%subject, error = %err, "event not published");
        }
    }
}

/// Builds and publishes an event in one step.
pub async fn emit(
    nats: &async_nats::Client,
    subjects: &Subjects,
    source: &str,
    kind: &str,
    data: Value,
) {
    CloudEvent::new(source, kind, data)
        .publish(nats, subjects)
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_checked_tokens() {
        assert!(check_kind("site.enabled").is_ok());
        assert!(check_kind("x").is_ok());
        for bad in ["", "a..b", "a.>", "a.*", "A", "a b", "a.b.c.d.e.f.g.h.i"] {
            assert!(check_kind(bad).is_err(), "{bad:?}");
        }
    }
}
