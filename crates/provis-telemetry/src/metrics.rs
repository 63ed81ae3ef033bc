//! The metric families of masters and minions, by name:
//!
//! | name | kind | who | labels |
//! |---|---|---|---|
//! | `provis_calls_total` | counter | master: calls recorded as jobs; minion: calls it handled | minion: `status` = ok, error, refused |
//! | `provis_call_replies_total` | counter | master: minions' recorded results | `status` = ok, error |
//! | `provis_call_duration_seconds` | histogram | master: minions' time per result; minion: its time per call | |
//! | `provis_heartbeats_total` | counter | minion: written, failed; master: received | `outcome` |
//! | `provis_admissions_total` | counter | master: connections admitted or refused | `outcome` |
//! | `provis_admission_duration_seconds` | histogram | master: time to decide | |
//! | `provis_minions` | gauge | master: live, converged, failing minions | `state` |
//! | `provis_convergence_lag_seconds` | gauge | master: since the applied commit while a live minion has not converged (0 once all have) | `commit` |
//! | `provis_service_loads_total` | counter | minion: services loaded or failed | `outcome` |
//! | `provis_service_memory_bytes` | gauge | minion: QuickJS heap in use per service | `service` |
//! | `provis_events_spooled` | gauge | both: events waiting in the on-disk outbox | |
//! | `provis_jetstream_errors_total` | counter | both: JetStream requests that failed | |

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommitLabel {
    pub commit: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabel {
    pub service: String,
}

/// Every family a process may record into; only those of its kind are
/// exported ([`Metrics::master`], [`Metrics::minion`]).
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// A master's count of the calls recorded as jobs.
    pub calls_recorded: Counter,
    /// A minion's count of the calls it handled, by status.
    pub calls: Family<StatusLabel, Counter>,
    pub call_replies: Family<StatusLabel, Counter>,
    pub call_duration: Histogram,
    pub heartbeats: Family<OutcomeLabel, Counter>,
    pub admissions: Family<OutcomeLabel, Counter>,
    pub admission_duration: Histogram,
    pub minions: Family<StateLabel, Gauge>,
    pub convergence_lag: Family<CommitLabel, Gauge<f64, AtomicU64>>,
    pub service_loads: Family<OutcomeLabel, Counter>,
    pub service_memory: Family<ServiceLabel, Gauge>,
    pub events_spooled: Gauge,
    pub jetstream_errors: Counter,
}

impl Metrics {
    fn unregistered() -> Self {
        // 0.5 ms to about 16 s: a reply on loopback to a call near its timeout.
        let seconds = || Histogram::new(exponential_buckets(0.000_5, 2.0, 16));
        Self {
            registry: Registry::default(),
            calls_recorded: Counter::default(),
            calls: Family::default(),
            call_replies: Family::default(),
            call_duration: seconds(),
            heartbeats: Family::default(),
            admissions: Family::default(),
            admission_duration: seconds(),
            minions: Family::default(),
            convergence_lag: Family::default(),
            service_loads: Family::default(),
            service_memory: Family::default(),
            events_spooled: Gauge::default(),
            jetstream_errors: Counter::default(),
        }
    }

    /// A master's families.
    pub fn master() -> Self {
        let mut metrics = Self::unregistered();
        let r = &mut metrics.registry;
        r.register(
            "provis_calls",
            "Calls recorded as jobs",
            metrics.calls_recorded.clone(),
        );
        r.register(
            "provis_call_replies",
            "Minions' recorded results of calls, by status",
            metrics.call_replies.clone(),
        );
        r.register(
            "provis_call_duration_seconds",
            "Minions' time per call, as they recorded it",
            metrics.call_duration.clone(),
        );
        r.register(
            "provis_heartbeats",
            "Heartbeats received from minions",
            metrics.heartbeats.clone(),
        );
        r.register(
            "provis_admissions",
            "Connections the master's auth callout admitted or refused",
            metrics.admissions.clone(),
        );
        r.register(
            "provis_admission_duration_seconds",
            "Time the auth callout took to decide",
            metrics.admission_duration.clone(),
        );
        r.register(
            "provis_minions",
            "Minions live, converged on the applied commit, failing",
            metrics.minions.clone(),
        );
        r.register(
            "provis_convergence_lag_seconds",
            "Seconds since the applied commit while a live minion has not converged on it (0 once all have)",
            metrics.convergence_lag.clone(),
        );
        metrics.register_common();
        metrics
    }

    /// A minion's families.
    pub fn minion() -> Self {
        let mut metrics = Self::unregistered();
        let r = &mut metrics.registry;
        r.register(
            "provis_calls",
            "Calls this minion handled, by status",
            metrics.calls.clone(),
        );
        r.register(
            "provis_call_duration_seconds",
            "Time this minion took per call",
            metrics.call_duration.clone(),
        );
        r.register(
            "provis_heartbeats",
            "Heartbeats written or failed",
            metrics.heartbeats.clone(),
        );
        r.register(
            "provis_service_loads",
            "Services loaded or failed to load",
            metrics.service_loads.clone(),
        );
        r.register(
            "provis_service_memory_bytes",
            "QuickJS heap in use per service",
            metrics.service_memory.clone(),
        );
        metrics.register_common();
        metrics
    }

    fn register_common(&mut self) {
        self.registry.register(
            "provis_events_spooled",
            "Events waiting in the on-disk outbox",
            self.events_spooled.clone(),
        );
        self.registry.register(
            "provis_jetstream_errors",
            "JetStream requests that failed",
            self.jetstream_errors.clone(),
        );
    }

    /// Counts one more under `label` of `family`.
    pub fn count(family: &Family<StatusLabel, Counter>, status: &'static str) {
        family.get_or_create(&StatusLabel { status }).inc();
    }

    /// Counts one more `outcome` of `family`.
    pub fn outcome(family: &Family<OutcomeLabel, Counter>, outcome: &'static str) {
        family.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    /// The exposition, in the OpenMetrics text format Prometheus scrapes.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_counted_call_shows_in_the_text() {
        let metrics = Metrics::minion();
        Metrics::count(&metrics.calls, "ok");
        Metrics::count(&metrics.calls, "ok");
        Metrics::count(&metrics.calls, "refused");
        metrics.call_duration.observe(0.002);
        let text = metrics.encode().expect("encodes");
        assert!(
            text.contains("provis_calls_total{status=\"ok\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("provis_calls_total{status=\"refused\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("provis_call_duration_seconds_count 1"),
            "{text}"
        );
        assert!(
            !text.contains("provis_admissions"),
            "a master's family: {text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
