//! What a provis process tells the people and tools that operate it:
//! Prometheus metrics ([`metrics`]), `/metrics`, `/healthz` and `/readyz` on
//! one HTTP address ([`http`]), bunyan-style JSON log lines ([`logs`]) and
//! systemd's readiness and watchdog notifications ([`systemd`]).
//!
//! Masters and minions record into a [`metrics::Metrics`] of their own (a
//! test process runs several) and serve it only when `metrics_addr` is set.

pub mod http;
pub mod logs;
pub mod metrics;
pub mod systemd;

pub use http::{HttpServer, Readiness, TelemetryError};
pub use logs::{BunyanLayer, LogFormat};
pub use metrics::Metrics;
