//! Events: CloudEvents 1.0 JSON published on `<prefix>.event.<source>.<kind>`
//! and kept by the `PROVIS_EVENTS` stream. Other tools follow a fleet by
//! subscribing to `<prefix>.event.>`. An event goes out through its
//! emitter's [`Outbox`]: acknowledged by the stream, stored once (its id is
//! the `Nats-Msg-Id`), kept on disk while the bus is unreachable.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::outbox::Outbox;
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

    /// Queues the event in `outbox`, which sends it once the stream takes it.
    pub fn send(&self, outbox: &Outbox, subjects: &Subjects) {
        let subject = subjects.event(&self.subject, self.short_kind());
        match serde_json::to_string(self) {
            Ok(payload) => outbox.send(subject, self.id.clone(), payload),
            Err(err) => tracing::warn!(error = %err, "event not serialisable"),
        }
    }
}

/// Builds an event and queues it in `outbox` in one step.
pub fn emit(outbox: &Outbox, subjects: &Subjects, source: &str, kind: &str, data: Value) {
    CloudEvent::new(source, kind, data).send(outbox, subjects);
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
