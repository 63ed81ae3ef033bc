//! Log lines for people and for machines. `text` is tracing's compact
//! format, coloured only on a terminal; `json` is one bunyan record per
//! line (`v`, `level` as a number, `name`, `hostname`, `pid`, `time`,
//! `msg`) with the event's own fields beside them, so `bunyan` and log
//! shippers read it as it is.

use std::io::Write as _;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::Context;

/// How log lines are written (setting `log_format`, `--log-format`,
/// `PROVIS_LOG_FORMAT`). Default: text.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("log format {other:?} is not text or json")),
        }
    }
}

/// Fields of a bunyan record that an event's field of the same name must
/// not replace: such a field is written as `field.<name>`.
const RESERVED: &[&str] = &["v", "level", "name", "hostname", "pid", "time", "msg"];

/// Writes each event as one bunyan JSON line on stderr.
#[derive(Debug)]
pub struct BunyanLayer {
    name: String,
    hostname: String,
    pid: u32,
}

impl BunyanLayer {
    /// Records named `name` (the program: `provis`, `provis-minion`).
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            hostname: hostname::get()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
            pid: std::process::id(),
        }
    }

    /// The record of `event`, as one line of JSON.
    pub fn record(&self, event: &Event<'_>) -> String {
        let mut fields = Map::new();
        event.record(&mut JsonFields(&mut fields));
        let msg = match fields.remove("message") {
            Some(Value::String(text)) => text,
            Some(other) => other.to_string(),
            None => String::new(),
        };
        let mut line = Map::new();
        line.insert("v".into(), 0.into());
        line.insert(
            "level".into(),
            bunyan_level(*event.metadata().level()).into(),
        );
        line.insert("name".into(), self.name.clone().into());
        line.insert("hostname".into(), self.hostname.clone().into());
        line.insert("pid".into(), self.pid.into());
        line.insert(
            "time".into(),
            humantime::format_rfc3339_millis(std::time::SystemTime::now())
                .to_string()
                .into(),
        );
        line.insert("msg".into(), msg.into());
        line.insert("target".into(), event.metadata().target().into());
        for (key, value) in fields {
            let key = if RESERVED.contains(&key.as_str()) || key == "target" {
                format!("field.{key}")
            } else {
                key
            };
            line.insert(key, value);
        }
        Value::Object(line).to_string()
    }
}

/// Bunyan's numbers: trace 10 … error 50.
fn bunyan_level(level: Level) -> u8 {
    match level {
        Level::TRACE => 10,
        Level::DEBUG => 20,
        Level::INFO => 30,
        Level::WARN => 40,
        Level::ERROR => 50,
    }
}

impl<S: Subscriber> Layer<S> for BunyanLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut line = self.record(event);
        line.push('\n');
        // One write per line, so lines of two threads never interleave.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }
}

/// Collects an event's fields as JSON values.
struct JsonFields<'a>(&'a mut Map<String, Value>);

impl Visit for JsonFields<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0.insert(field.name().into(), value.to_string().into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::prelude::*;

    /// Keeps each record instead of writing it.
    struct Kept(BunyanLayer, Arc<Mutex<Vec<String>>>);

    impl<S: Subscriber> Layer<S> for Kept {
        fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
            if let Ok(mut kept) = self.1.lock() {
                kept.push(self.0.record(event));
            }
        }
    }

    #[test]
    fn records_carry_bunyan_fields_and_the_event_s_own() {
        let kept = Arc::new(Mutex::new(Vec::new()));
        let subscriber =
            tracing_subscriber::registry().with(Kept(BunyanLayer::new("provis"), kept.clone()));
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(
                minion = "m1",
                calls = 3_u64,
                pid = 7,
                "minion {} late",
                "m1"
            );
        });
        let kept = kept.lock().expect("lock").clone();
        let record: Value = serde_json::from_str(&kept[0]).expect("json");
        assert_eq!(record["v"], 0);
        assert_eq!(record["level"], 40);
        assert_eq!(record["name"], "provis");
        assert_eq!(record["pid"], std::process::id());
        assert_eq!(record["msg"], "minion m1 late");
        assert_eq!(record["minion"], "m1");
        assert_eq!(record["calls"], 3);
        assert_eq!(
            record["field.pid"], 7,
            "an event's pid does not hide the process's"
        );
        assert!(record["time"].as_str().is_some_and(|t| t.ends_with('Z')));
        assert!(record["hostname"].is_string());
    }
}
