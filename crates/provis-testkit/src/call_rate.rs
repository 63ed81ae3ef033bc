//! Call-rate measurements shared by the benchmarks: how long each runs
//! (`PROVIS_BENCH_SECONDS`, default 3), back-to-back runs of an operation
//! summed up as calls/s with p50 and p99, and the row that prints them
//! beside the limit measured in the same run.

use std::time::{Duration, Instant};

/// calls/s, p50 µs, p99 µs.
pub type CallRate = (f64, f64, f64);

/// How long each measurement runs: `PROVIS_BENCH_SECONDS`, else 3 s.
pub fn measurement_time() -> Duration {
    let s = std::env::var("PROVIS_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    Duration::from_secs_f64(s)
}

/// Summarises per-call samples (µs) taken since `started`.
pub fn summarize(mut samples: Vec<f64>, started: Instant) -> CallRate {
    let rate = samples.len() as f64 / started.elapsed().as_secs_f64();
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| {
        samples
            .get(((samples.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    (rate, at(0.5), at(0.99))
}

/// Runs `op` back to back (after `warm_up` runs) for the measurement time.
pub async fn sequential<F, Fut>(warm_up: usize, mut op: F) -> CallRate
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for _ in 0..warm_up {
        op().await;
    }
    let mut samples = Vec::new();
    let started = Instant::now();
    while started.elapsed() < measurement_time() {
        let t = Instant::now();
        op().await;
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    summarize(samples, started)
}

/// Prints a measurement, with its share of `limit` (what, calls/s) if given.
pub fn print_row(name: &str, (rate, p50, p99): CallRate, limit: Option<(&str, f64)>) {
    let ratio = limit.map_or_else(String::new, |(what, l)| {
        format!("  {:.2}x of {what}", rate / l)
    });
    println!("{name:50} {rate:>10.0} calls/s  p50 {p50:>8.1} µs  p99 {p99:>8.1} µs{ratio}");
}
