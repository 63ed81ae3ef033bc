//! `/metrics`, `/healthz` and `/readyz` on one HTTP address (`metrics_addr`):
//! Prometheus scrapes the first, a load balancer or systemd asks the others.
//! `/healthz` answers 200 while the process serves HTTP at all; `/readyz`
//! answers 200 only when the part's [`Readiness`] check passes (connected,
//! storage reachable, a leader known), else 503 with the reason.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::future::BoxFuture;

use crate::metrics::Metrics;

/// How long `/readyz` waits for the check before it says not ready.
const READY_WAIT: Duration = Duration::from_secs(2);

/// Whether a part can do its work now, and if not, why.
pub trait Readiness: Send + Sync + 'static {
    fn check(&self) -> BoxFuture<'_, Result<(), String>>;
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What the endpoints answer from.
#[derive(Clone)]
struct Served {
    metrics: Arc<Metrics>,
    readiness: Arc<dyn Readiness>,
}

/// An HTTP server, bound and ready to serve: the health endpoints, or
/// any other router of a provis part (the dashboard).
pub struct HttpServer {
    listener: tokio::net::TcpListener,
    router: Router,
    addr: SocketAddr,
}

impl std::fmt::Debug for HttpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl HttpServer {
    /// Binds `addr` (port 0: any free port) for `router`.
    pub async fn bind(addr: SocketAddr, router: Router) -> Result<Self, TelemetryError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| TelemetryError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| TelemetryError::Bind { addr, source })?;
        Ok(Self {
            listener,
            router,
            addr,
        })
    }

    /// `/metrics`, `/healthz` and `/readyz` for `metrics` and `readiness`,
    /// bound on `addr`.
    pub async fn health(
        addr: SocketAddr,
        metrics: Arc<Metrics>,
        readiness: Arc<dyn Readiness>,
    ) -> Result<Self, TelemetryError> {
        let router = Router::new()
            .route("/metrics", get(metrics_text))
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .with_state(Served { metrics, readiness });
        Self::bind(addr, router).await
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `stop` is cancelled.
    pub async fn serve(self, stop: tokio_util::sync::CancellationToken) {
        let served = axum::serve(self.listener, self.router)
            .with_graceful_shutdown(async move { stop.cancelled().await });
        if let Err(err) = served.await {
            tracing::warn!(error = %err, addr = %self.addr, "HTTP server stopped");
        }
    }
}

async fn metrics_text(State(served): State<Served>) -> Response {
    match served.metrics.encode() {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{err}\n")).into_response(),
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(served): State<Served>) -> Response {
    match tokio::time::timeout(READY_WAIT, served.readiness.check()).await {
        Ok(Ok(())) => (StatusCode::OK, "ready\n".to_owned()).into_response(),
        Ok(Err(why)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response(),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: no answer within {READY_WAIT:?}\n"),
        )
            .into_response(),
    }
}
