//! A secured fleet of N minions on one machine, each on its own
//! connection with its own key and enrollment (the testkit's swarm), and
//! what a call to all of them costs:
//!
//! - `provis call --all sys.ping` end to end, as a user runs it (the CLI
//!   process, its connection and admission included);
//! - the same call through the library (the master's selection included);
//! - raw NATS scatter-gather of the same shape in the same run: one publish
//!   answered by N plain subscribers on N connections of their own (on a
//!   plain server of its own, run before the fleet, so the two never share
//!   the machine);
//! - what the fleet costs nats-server and this process per minion while
//!   idle (resident memory, CPU), and the heartbeats per second.
//!
//! Run: `cargo bench --bench scale` (PROVIS_BENCH_SIZES=1000,5000,10000,
//! PROVIS_BENCH_ROUNDS=5 by default). The last lines, one per size, are for
//! scripts: `scale n=<N> end_to_end_ms=<p50> library_ms=<p50> raw_ms=<p50>
//! ratio=<library/raw>`.
// A measurement that cannot take place stops the benchmark: its closures
// return nothing, so a failure there ends it with the reason.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;
use provis_core::{CallRequest, CallTarget};
use provis_testkit::{NatsServer, ProcessUsage, RawResponders, TestFleet, raw_fanout};
use serde_json::Value;

/// How long the fleet is watched idle for its running cost.
const IDLE_WINDOW: Duration = Duration::from_secs(10);

fn provis_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_provis"))
}

struct Figures {
    n: usize,
    end_to_end_ms: f64,
    library_ms: f64,
    raw_ms: f64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let rounds = provis_testkit::bench_rounds(5);
    println!(
        "{rounds} rounds per figure; 2 cores shared by the caller, nats-server, the master and every minion\n"
    );
    let mut lines = Vec::new();
    for n in provis_testkit::bench_sizes("1000,5000,10000") {
        let raw_ms = raw_scatter_gather(n, rounds).await?;
        lines.push(measure_fleet(n, rounds, raw_ms).await?);
    }
    println!();
    for figures in &lines {
        println!(
            "scale n={} end_to_end_ms={:.1} library_ms={:.1} raw_ms={:.1} ratio={:.2}",
            figures.n,
            figures.end_to_end_ms,
            figures.library_ms,
            figures.raw_ms,
            figures.library_ms / figures.raw_ms
        );
    }
    if let (Some(first), Some(last)) = (lines.first(), lines.last())
        && last.n > first.n
    {
        println!(
            "growth n={}→{}: end_to_end {:.1}x library {:.1}x raw {:.1}x",
            first.n,
            last.n,
            last.end_to_end_ms / first.end_to_end_ms,
            last.library_ms / first.library_ms,
            last.raw_ms / first.raw_ms
        );
    }
    Ok(())
}

/// p50 of one publish answered by `n` subscribers on `n` connections.
async fn raw_scatter_gather(n: usize, rounds: usize) -> anyhow::Result<f64> {
    let server = NatsServer::start()?;
    let responders = RawResponders::start(&server, "bench.raw.scale", n, n).await?;
    let nats = server.connect().await?;
    // A first round warms the server's subject cache, as the fleet's is.
    raw_fanout(&nats, "bench.raw.scale", n).await?;
    let mut samples = Vec::new();
    for _ in 0..rounds {
        samples.push(raw_fanout(&nats, "bench.raw.scale", n).await?);
    }
    // Closed while the server runs, so nothing is left reconnecting to it.
    responders.close().await;
    let _ = nats.drain().await;
    Ok(provis_testkit::p50_p99(samples).0)
}

async fn measure_fleet(n: usize, rounds: usize, raw_ms: f64) -> anyhow::Result<Figures> {
    let mut fleet = TestFleet::start_secured().await?;
    let server_pid = fleet.nats().pid(0).expect("nats-server runs");
    let server_before = ProcessUsage::of(server_pid)?;
    let swarm_before = ProcessUsage::of(std::process::id())?;
    let setup = Instant::now();
    // Heartbeats as a real fleet sends them (tests use a shorter interval).
    fleet
        .add_swarm(n, &["web"], |config| {
            config.heartbeat_interval_ms = provis_minion::config::DEFAULT_HEARTBEAT_INTERVAL_MS;
        })
        .await?;
    println!(
        "n={n}: swarm enrolled and selectable in {:.1?}",
        setup.elapsed()
    );

    // Idle cost: nats-server and this process (the swarm and the master),
    // and the heartbeats that make it.
    let listener = fleet.connect().await?;
    let mut heartbeats = listener
        .subscribe(format!("{}.heartbeat.>", fleet.subjects().prefix()))
        .await?;
    let server_start = ProcessUsage::of(server_pid)?;
    let swarm_start = ProcessUsage::of(std::process::id())?;
    let window = Instant::now();
    let mut heard = 0u64;
    let mut bytes = 0u64;
    while let Ok(Some(message)) = tokio::time::timeout(
        IDLE_WINDOW.saturating_sub(window.elapsed()),
        heartbeats.next(),
    )
    .await
    {
        heard += 1;
        bytes += message.payload.len() as u64;
    }
    let seconds = window.elapsed().as_secs_f64();
    let server_end = ProcessUsage::of(server_pid)?;
    let swarm_end = ProcessUsage::of(std::process::id())?;
    drop(heartbeats);
    let per_minion = |bytes: u64| bytes as f64 / n as f64 / 1024.0;
    println!(
        "n={n}: idle: heartbeats {:.0}/s ({:.0} B/s payload); nats-server {:.1} KiB RSS and {:.3}% CPU per minion; swarm process {:.1} KiB RSS per minion, {:.1}% CPU for all",
        heard as f64 / seconds,
        bytes as f64 / seconds,
        per_minion(server_end.rss_bytes.saturating_sub(server_before.rss_bytes)),
        (server_end.cpu_seconds - server_start.cpu_seconds) / seconds / n as f64 * 100.0,
        per_minion(swarm_end.rss_bytes.saturating_sub(swarm_before.rss_bytes)),
        (swarm_end.cpu_seconds - swarm_start.cpu_seconds) / seconds * 100.0,
    );

    // Through the library: the master's selection, the publishes, the
    // signed replies checked.
    let client = fleet.client().await?;
    let request = CallRequest::parse_function("sys.ping", Value::Null, Duration::from_secs(30))?;
    let mut library = Vec::new();
    client.call(&CallTarget::All, &request).await?;
    for _ in 0..rounds {
        let started = Instant::now();
        let report = client.call(&CallTarget::All, &request).await?;
        library.push(started.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(
            report.summary.ok == n,
            "{} of {n} answered: {:?}",
            report.summary.ok,
            report.summary
        );
    }

    // End to end: the CLI as a user runs it.
    let mut end_to_end = Vec::new();
    for _ in 0..rounds {
        let started = Instant::now();
        let output = fleet
            .provis_command(provis_bin())
            .args(["call", "--all", "sys.ping", "--output", "json"])
            .output()?;
        end_to_end.push(started.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(
            output.status.success(),
            "provis call: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let report: Value = serde_json::from_slice(&output.stdout)?;
        anyhow::ensure!(
            report["summary"]["ok"] == n,
            "{} of {n} answered",
            report["summary"]["ok"]
        );
    }
    let (library_ms, library_p99) = provis_testkit::p50_p99(library);
    let (end_to_end_ms, end_to_end_p99) = provis_testkit::p50_p99(end_to_end);
    println!(
        "n={n}: end to end p50 {end_to_end_ms:.1} ms p99 {end_to_end_p99:.1} ms; library p50 {library_ms:.1} ms p99 {library_p99:.1} ms; raw p50 {raw_ms:.1} ms ({:.2}x)",
        library_ms / raw_ms
    );
    // Every connection closed while the server runs (see RawResponders).
    let _ = listener.drain().await;
    let _ = client.nats().drain().await;
    fleet.shut_down().await;
    Ok(Figures {
        n,
        end_to_end_ms,
        library_ms,
        raw_ms,
    })
}
