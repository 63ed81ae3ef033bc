//! The master's state index at the size the design promises: 1,000 minions
//! × 7 days of samples at a 5-minute interval (2,016,000 samples), written
//! into PROVIS_STATE with their own timestamps by a generator. Measured, in
//! one run:
//!
//! - rebuilding the index from the stream on a master restart, beside the
//!   physical limit: the same stream read by a bare ordered consumer;
//! - the index's memory;
//! - p50/p99 of a `--for 7d` query and of a latest-state query.
//!
//! Run: `cargo bench --bench state_index` (PROVIS_BENCH_MINIONS=1000,
//! PROVIS_BENCH_DAYS=7 by default).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use provis_core::envelope::now_unix_ms;
use provis_testkit::{TestFleet, eventually};
use serde_json::json;

fn env_number(name: &str, default: i64) -> i64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_mb() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: f64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0.0);
    pages * 4096.0 / 1e6
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let minions = env_number("PROVIS_BENCH_MINIONS", 1000);
    let days = env_number("PROVIS_BENCH_DAYS", 7);
    let interval_ms = 5 * 60_000;
    let per_minion = days * 86_400_000 / interval_ms;
    let total = minions * per_minion;
    let mut fleet = TestFleet::start().await?;
    let js = jetstream::new(fleet.nats().connect().await?);

    // The generator: every minion, every 5 minutes, for `days` days, with its
    // own timestamps. One minion in a hundred is low on disk all along.
    let now = now_unix_ms();
    let started = Instant::now();
    let mut acks = VecDeque::new();
    for step in 0..per_minion {
        let at = now - (per_minion - step) * interval_ms;
        for m in 0..minions {
            let free = if m % 100 == 0 {
                5.0
            } else {
                20.0 + ((m * 7 + step * 13) % 60) as f64
            };
            let sample = json!({
                "minion": format!("gen{m:04}"),
                "at_unix_ms": at,
                "state": {
                    "mem": { "total_mb": 16000, "free_mb": 8000, "free_pct": 50.0 - (step % 40) as f64, "used_pct": 50.0 },
                    "disk": { "mount": "/", "total_gb": 100.0, "free_gb": free, "free_pct": free },
                    "cpu_pct": ((m + step) % 100) as f64,
                    "load": { "one": 0.5, "five": 0.4, "fifteen": 0.3 },
                    "uptime_s": step * 300,
                },
            });
            acks.push_back(
                js.publish(
                    format!("provis.state.gen{m:04}"),
                    serde_json::to_vec(&sample)?.into(),
                )
                .await?,
            );
            // async-nats holds at most 5,000 unacknowledged publishes.
            if acks.len() >= 4_000 {
                while acks.len() > 2_000
                    && let Some(ack) = acks.pop_front()
                {
                    ack.await?;
                }
            }
        }
    }
    for ack in acks {
        ack.await?;
    }
    let generated = started.elapsed();
    println!(
        "generated {total} samples ({minions} minions × {days} days every 5 min) in {generated:.1?}"
    );
    let started = Instant::now();
    eventually(
        "the live index took every sample",
        Duration::from_secs(600),
        || async {
            match fleet.master().await {
                Ok(master) => master
                    .stats(false)
                    .await
                    .is_ok_and(|s| i64::try_from(s.counters.accepted).unwrap_or(0) >= total),
                Err(_) => false,
            }
        },
    )
    .await?;

    println!(
        "the live index took them all {:.1?} after the last was written",
        started.elapsed()
    );

    // The physical limit: the whole stream through a bare ordered consumer.
    let stream = js.get_stream(provis_core::storage::STREAM_STATE).await?;
    let started = Instant::now();
    let raw = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: "provis.state.>".into(),
            ..Default::default()
        })
        .await?;
    let mut messages = raw.messages().await?;
    let mut read = 0;
    while read < total {
        messages
            .next()
            .await
            .ok_or_else(|| anyhow::anyhow!("the stream ended after {read} messages"))??;
        read += 1;
    }
    let raw_read = started.elapsed().as_secs_f64();
    drop(messages);

    let rss_before = rss_mb();
    fleet.restart_master().await?;
    eventually("the index is rebuilt", Duration::from_secs(600), || async {
        match fleet.master().await {
            Ok(master) => master.stats(false).await.is_ok_and(|s| s.rebuild.is_some()),
            Err(_) => false,
        }
    })
    .await?;
    let stats = fleet.master().await?.stats(false).await?;
    let rebuild = stats.rebuild.map_or(f64::NAN, |r| r.seconds);
    println!(
        "rebuild from the stream: {rebuild:.1} s for {} samples; bare read of the same stream {raw_read:.1} s ({:.2}x)",
        stats.rebuild.map_or(0, |r| r.samples),
        rebuild / raw_read
    );
    println!(
        "index memory: ~{:.0} MB of history (estimate); process RSS {rss_before:.0} MB before the restart, {:.0} MB after",
        stats.approximate_bytes as f64 / 1e6,
        rss_mb()
    );

    use provis_core::master_api::{QueryMode, QueryRequest};
    let master = fleet.master().await?;
    let question = |expression: &str, mode, window_ms| QueryRequest {
        expression: expression.to_owned(),
        mode,
        window_ms,
        page: Default::default(),
    };
    let week = days * 86_400_000;
    for (name, request) in [
        (
            "latest: state.disk.free_pct < 10.0",
            question("state.disk.free_pct < 10.0", QueryMode::Latest, 0),
        ),
        (
            "--for 7d: state.disk.free_pct < 10.0",
            question("state.disk.free_pct < 10.0", QueryMode::For, week),
        ),
        (
            "--any 7d: state.mem.free_pct < 12.0",
            question("state.mem.free_pct < 12.0", QueryMode::Any, week),
        ),
    ] {
        let mut latencies = Vec::new();
        let mut matched = 0;
        for _ in 0..30 {
            let started = Instant::now();
            let answer = master.query(request.clone()).await?;
            latencies.push(started.elapsed().as_secs_f64() * 1e3);
            matched = answer.matches.len();
        }
        let (p50, p99) = provis_testkit::p50_p99(latencies);
        println!("{name:40} p50 {p50:7.1} ms  p99 {p99:7.1} ms  ({matched} of {minions} match)");
    }
    Ok(())
}
