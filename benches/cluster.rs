//! What a 3-node NATS cluster (replicas 3) costs against one server, and
//! how fast the fleet recovers from a death, each measured in the same run:
//!
//! - fan-out to N minions (simulated, on shared connections) on one
//!   server and on a cluster, with the raw one-publish-N-replies figure of
//!   each beside it;
//! - leader failover: two masters, the leader stopped without a word
//!   (its task aborted, its lease left to expire), time until the other
//!   leads; p50/p99 over the kills;
//! - events per second through the outbox (JetStream publish, each
//!   acknowledged) with R3 on the cluster against R1 on one server.
//!
//! Run: `cargo bench --bench cluster` (PROVIS_BENCH_SIZE=1000,
//! PROVIS_BENCH_ROUNDS=10, PROVIS_BENCH_KILLS=10, PROVIS_BENCH_EVENTS=5000).
// A measurement that cannot take place stops the benchmark: its closures
// return nothing, so a failure there ends it with the reason.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::{Duration, Instant};

use provis_core::lifecycle::Lifecycle;
use provis_core::outbox::Outbox;
use provis_core::selection::Pick;
use provis_core::{CallRequest, CallTarget};
use provis_testkit::{NatsServer, RawResponders, TestFleet, raw_fanout, timed_call};
use serde_json::Value;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// p50 of a fan-out to `n` simulated minions and of the raw pattern, in ms.
async fn fanout(fleet: &mut TestFleet, n: usize, rounds: usize) -> anyhow::Result<(f64, f64)> {
    let connections = (n / 250).clamp(1, 16);
    fleet
        .add_simulated_minions(n, &["web"], connections, Duration::from_secs(30), |_| {})
        .await?;
    let _raw = RawResponders::start(fleet.nats(), "bench.raw.fanout", n, connections).await?;
    let client = fleet.client().await?;
    let target = CallTarget::Role("web".parse()?);
    let request = CallRequest::parse_function("sys.ping", Value::Null, Duration::from_secs(30))?;
    let selection = client.select(&target, None, Pick::All, None).await?;
    let nats = fleet.nats().connect().await?;
    let (mut provis_ms, mut raw_ms) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        provis_ms.push(timed_call(&client, &target, &selection, &request, n).await?);
        raw_ms.push(raw_fanout(&nats, "bench.raw.fanout", n).await?);
    }
    Ok((
        provis_testkit::p50_p99(provis_ms).0,
        provis_testkit::p50_p99(raw_ms).0,
    ))
}

/// Events a second through an outbox, each acknowledged by the stream.
async fn events_per_second(fleet: &TestFleet, count: usize) -> anyhow::Result<f64> {
    let lifecycle = Lifecycle::new();
    let outbox = Outbox::start(
        fleet.connect().await?,
        None,
        provis_core::outbox::DEFAULT_MAX_BYTES,
        &lifecycle,
    );
    let subjects = fleet.subjects();
    let started = Instant::now();
    for n in 0..count {
        provis_core::event::emit(
            &outbox,
            &subjects,
            "bench",
            "tick",
            serde_json::json!({ "n": n }),
        );
    }
    while outbox.stats().waiting > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    lifecycle.drain(Duration::from_secs(1)).await;
    Ok(rate)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let n = env("PROVIS_BENCH_SIZE", 1_000);
    let rounds = env("PROVIS_BENCH_ROUNDS", 10);
    let kills = env("PROVIS_BENCH_KILLS", 10);
    let events = env("PROVIS_BENCH_EVENTS", 5_000);
    println!("2 cores shared by the caller, every nats-server and every minion\n");

    let mut single = TestFleet::start().await?;
    let single_events = events_per_second(&single, events).await?;
    let (single_ms, single_raw) = fanout(&mut single, n, rounds).await?;
    drop(single);

    let cluster = NatsServer::start_cluster(3).await?;
    let mut clustered = TestFleet::start_on(cluster, |config| config.replicas = 3).await?;
    let cluster_events = events_per_second(&clustered, events).await?;
    let (cluster_ms, cluster_raw) = fanout(&mut clustered, n, rounds).await?;
    drop(clustered);

    println!("fan-out to {n} minions, p50 over {rounds} rounds:");
    println!(
        "  one server: provis {single_ms:.1} ms, raw NATS {single_raw:.1} ms ({:.2}x)",
        single_ms / single_raw
    );
    println!(
        "  3-node cluster, replicas 3: provis {cluster_ms:.1} ms, raw NATS {cluster_raw:.1} ms ({:.2}x); cluster/one server {:.2}x",
        cluster_ms / cluster_raw,
        cluster_ms / single_ms
    );
    println!("events through the outbox, each acknowledged ({events}):");
    println!(
        "  R1 on one server {single_events:.0}/s; R3 on the cluster {cluster_events:.0}/s ({:.2}x)",
        cluster_events / single_events
    );

    // Leader failover: two master processes; the leader is SIGKILLed (no
    // hand-back), the other takes over; the dead one is started again.
    let provis = std::path::Path::new(env!("CARGO_BIN_EXE_provis"));
    let cluster = NatsServer::start_cluster(3).await?;
    let mut fleet = TestFleet::start_on(cluster, |config| config.replicas = 3).await?;
    fleet.stop_master().await;
    let mut masters = [
        (
            "alpha",
            fleet.spawn_another_master(provis, "alpha", &[]).await?,
        ),
        (
            "beta",
            fleet.spawn_another_master(provis, "beta", &[]).await?,
        ),
    ];
    let master = fleet.master().await?;
    // Asked with a short timeout: a request that went to the dying master
    // must not count as failover time.
    let leader = || async {
        master
            .request_within::<provis_core::master_api::Status>(
                &Default::default(),
                Duration::from_millis(500),
            )
            .await
            .ok()
            .and_then(|status| {
                status
                    .masters
                    .iter()
                    .find(|m| m.leading)
                    .map(|m| m.id.clone())
            })
    };
    let mut failovers = Vec::new();
    for _ in 0..kills {
        let started = Instant::now();
        let mut current = leader().await;
        while current.is_none() && started.elapsed() < Duration::from_secs(20) {
            tokio::time::sleep(Duration::from_millis(50)).await;
            current = leader().await;
        }
        let Some(current) = current else {
            anyhow::bail!("no master leads");
        };
        let index = masters
            .iter()
            .position(|(name, _)| *name == current)
            .expect("a master of ours leads");
        masters[index].1.kill();
        let died = Instant::now();
        loop {
            let now = leader().await;
            if now.as_ref().is_some_and(|now| *now != current) {
                failovers.push(died.elapsed().as_secs_f64() * 1e3);
                break;
            }
            anyhow::ensure!(died.elapsed() < Duration::from_secs(20), "no new leader");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let name = masters[index].0;
        masters[index].1 = fleet.spawn_another_master(provis, name, &[]).await?;
    }
    let (f50, f99) = provis_testkit::p50_p99(failovers.clone());
    println!(
        "leader failover after the leading master's SIGKILL: p50 {f50:.0} ms p99 {f99:.0} ms over {} kills (lease kept {} s by the servers)",
        failovers.len(),
        provis_master::leadership::LEASE_TTL.as_secs()
    );
    Ok(())
}
