//! The minion's gauges (QuickJS heap per service, events spooled, JetStream
//! sends that failed), taken every [`GAUGE_TICK`], and its readiness.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use provis_telemetry::Metrics;
use provis_telemetry::metrics::ServiceLabel;
use tokio_util::sync::CancellationToken;

use crate::services::ServiceTable;

/// How often the gauges are taken.
const GAUGE_TICK: Duration = Duration::from_secs(2);

/// Takes the gauges until `stop`.
pub async fn take_gauges(
    metrics: Arc<Metrics>,
    table: Arc<ServiceTable>,
    outbox: provis_core::outbox::Outbox,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(GAUGE_TICK);
    let mut failed_sends = 0;
    let mut measured: Vec<String> = Vec::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let stats = outbox.stats();
        metrics
            .events_spooled
            .set(i64::try_from(stats.waiting).unwrap_or(i64::MAX));
        metrics
            .jetstream_errors
            .inc_by(stats.failed_sends.saturating_sub(failed_sends));
        failed_sends = stats.failed_sends;
        let services = table.all();
        let names: Vec<String> = services
            .iter()
            .map(|loaded| loaded.sandbox.name().to_owned())
            .collect();
        // A service removed since is no longer measured.
        for gone in measured.iter().filter(|name| !names.contains(name)) {
            metrics.service_memory.remove(&ServiceLabel {
                service: gone.clone(),
            });
        }
        for loaded in &services {
            let bytes = i64::try_from(loaded.sandbox.memory_bytes()).unwrap_or(i64::MAX);
            metrics
                .service_memory
                .get_or_create(&ServiceLabel {
                    service: loaded.sandbox.name().to_owned(),
                })
                .set(bytes);
        }
        measured = names;
    }
}

/// Ready when connected to NATS and its registry bucket answers (a
/// request its permissions allow on a secured bus).
#[derive(Debug)]
pub struct MinionReadiness {
    pub nats: async_nats::Client,
}

impl provis_telemetry::Readiness for MinionReadiness {
    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            provis_core::readiness::connected(&self.nats)?;
            async_nats::jetstream::new(self.nats.clone())
                .get_key_value(provis_core::storage::BUCKET_MINIONS)
                .await
                .map_err(|err| format!("the registry bucket does not answer: {err}"))?;
            Ok(())
        })
    }
}
