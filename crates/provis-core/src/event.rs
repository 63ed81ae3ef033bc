//! Events: CloudEvents 1.0 JSON published on `<prefix>.event.<source>.<kind>`
//! and kept by the `PROVIS_EVENTS` stream. Other tools follow a fleet by
//! subscribing to `<prefix>.event.>`.

use serde::Serialize;
use serde_json::Value;

use crate::subject::Subjects;

/// One event as it travels on NATS.
#[derive(Debug, Clone, Serialize)]
pub struct CloudEvent {
    pub specversion: &'static str,
    pub id: String,
    /// Who emitted it, e.g. `provis/minion/m1`.
    pub source: String,
    /// Reverse-DNS type, e.g. `io.provis.minion.online`.
    #[serde(rename = "type")]
    pub kind: String,
    /// RFC 3339 time of emission.
    pub time: String,
    pub subject: String,
    pub datacontenttype: &'static str,
    pub data: Value,
}

/// Publishes an event from `source` (a checked subject token such as a minion
/// id or `master`) of kind `kind` (dot-separated tokens such as `minion.online`).
/// Events are best effort: a failure is logged, never fatal to the emitter.
pub async fn emit(
    nats: &async_nats::Client,
    subjects: &Subjects,
    source: &str,
    kind: &str,
    data: Value,
) {
    let event = CloudEvent {
        specversion: "1.0",
        id: uuid::Uuid::new_v4().to_string(),
        source: format!("provis/{source}"),
        kind: format!("io.provis.{kind}"),
        time: humantime_rfc3339(),
        subject: source.to_owned(),
        datacontenttype: "application/json",
        data,
    };
    let subject = subjects.event(source, kind);
    let payload = match serde_json::to_vec(&event) {
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

fn humantime_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}
