//! The cost of security on the call path, secured against unsecured in the
//! same run: minions that pin the caller's key (every call signed, verified,
//! checked for freshness and replay) against minions that pin nothing.
//!
//! - single-call latency (p50/p99) to one minion;
//! - fan-out time (call → last reply) to 1,000 simulated minions.
//!
//! Then the bus itself secured (nats-server admitting every connection
//! through the master's auth callout, per-identity permissions), against an
//! open server, with minions of their own connection each (simulated ones
//! share connections, which per-identity admission rules out):
//! - connecting (the callout's round trip);
//! - single-call latency, and fan-out to PROVIS_BENCH_OWN (100) minions.
//!
//! Run: `cargo bench --bench security` (PROVIS_BENCH_SIZE=1000, 20 rounds).

use std::time::{Duration, Instant};

use provis_core::client::CallPlan;
use provis_core::identity::Identity;
use provis_core::selection::Pick;
use provis_core::{CallRequest, CallTarget, Client};
use provis_testkit::TestFleet;
use serde_json::Value;

/// A fleet of `n` simulated minions in role `fleet`, pinning `callers`.
async fn fleet(n: usize, callers: &[String]) -> anyhow::Result<TestFleet> {
    let mut fleet = TestFleet::start().await?;
    fleet
        .add_simulated_minions(
            n,
            &["fleet"],
            (n / 250).clamp(1, 16),
            Duration::from_secs(30),
            |config| {
                config.trusted_callers = callers.to_vec();
            },
        )
        .await?;
    Ok(fleet)
}

async fn measure(
    fleet: &TestFleet,
    client: &Client,
    n: usize,
    rounds: usize,
) -> anyhow::Result<((f64, f64), (f64, f64))> {
    let request = CallRequest::parse_function("sys.ping", Value::Null, Duration::from_secs(30))?;
    let one = CallTarget::Minions(vec!["sim0000".parse()?]);
    let one_selection = client.select(&one, None, Pick::All, None).await?;
    let mut single = Vec::new();
    for _ in 0..rounds * 25 {
        let started = Instant::now();
        let report = client
            .call_selected(
                &one,
                &one_selection,
                &request,
                &CallPlan::default(),
                &mut |_| {},
            )
            .await?;
        anyhow::ensure!(
            report.all_ok(),
            "a single call failed: {:?}",
            report.replies
        );
        single.push(started.elapsed().as_secs_f64() * 1e6);
    }
    let all = CallTarget::Role("fleet".parse()?);
    let selection = client.select(&all, None, Pick::All, None).await?;
    anyhow::ensure!(
        selection.chosen.len() == n,
        "{} of {n} minions selected",
        selection.chosen.len()
    );
    let mut fanout = Vec::new();
    for _ in 0..rounds {
        let started = Instant::now();
        let report = client
            .call_selected(
                &all,
                &selection,
                &request,
                &CallPlan::default(),
                &mut |_| {},
            )
            .await?;
        anyhow::ensure!(
            report.summary.ok == n,
            "{} of {n} answered",
            report.summary.ok
        );
        fanout.push(started.elapsed().as_secs_f64() * 1e3);
    }
    let _ = fleet;
    Ok((
        provis_testkit::p50_p99(single),
        provis_testkit::p50_p99(fanout),
    ))
}

/// `n` minions of their own connection (and, secured, their own key) in
/// role `fleet`, pinning `callers`.
async fn own_connection_minions(
    fleet: &mut TestFleet,
    n: usize,
    callers: &[String],
) -> anyhow::Result<()> {
    for i in 0..n {
        let mut config = fleet.minion_config(&format!("sim{i:04}"), &["fleet"])?;
        config.grpc_listen = "off".to_owned();
        config.inject_services = false;
        config.heartbeat_interval_ms = 30_000;
        config.trusted_callers = callers.to_vec();
        fleet.add_minion_with(config).await?;
    }
    Ok(())
}

/// p50/p99 of connecting (to a usable connection) as the fleet's operator, in ms.
async fn connecting(fleet: &TestFleet, rounds: usize) -> anyhow::Result<(f64, f64)> {
    let mut samples = Vec::new();
    for _ in 0..rounds {
        let started = Instant::now();
        let nats = fleet.connect().await?;
        nats.flush().await?;
        samples.push(started.elapsed().as_secs_f64() * 1e3);
    }
    Ok(provis_testkit::p50_p99(samples))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::var("PROVIS_BENCH_SIZE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let rounds = 20;
    let keys = tempfile::tempdir()?;
    let operator = Identity::create(&keys.path().join("operator.key"))?;

    let insecure = fleet(n, &[]).await?;
    let client = insecure.client().await?;
    let ((s50, s99), (f50, f99)) = measure(&insecure, &client, n, rounds).await?;
    drop(insecure);

    let secured = fleet(n, &[operator.public_key().to_owned()]).await?;
    let client = secured
        .client()
        .await?
        .with_signer(Identity::load(&keys.path().join("operator.key"))?);
    let ((ss50, ss99), (sf50, sf99)) = measure(&secured, &client, n, rounds).await?;

    println!(
        "single call      unsecured p50 {s50:.0} µs p99 {s99:.0} µs | signed+verified p50 {ss50:.0} µs p99 {ss99:.0} µs | {:.2}x",
        ss50 / s50
    );
    println!(
        "fan-out to {n:>4}  unsecured p50 {f50:.1} ms p99 {f99:.1} ms | signed+verified p50 {sf50:.1} ms p99 {sf99:.1} ms | {:.2}x",
        sf50 / f50
    );
    drop(secured);

    let own: usize = std::env::var("PROVIS_BENCH_OWN")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    let callers = [operator.public_key().to_owned()];
    let mut open = TestFleet::start().await?;
    own_connection_minions(&mut open, own, &callers).await?;
    let (c50, c99) = connecting(&open, 50).await?;
    let client = open
        .client()
        .await?
        .with_signer(Identity::load(&keys.path().join("operator.key"))?);
    let ((o50, o99), (of50, of99)) = measure(&open, &client, own, rounds).await?;
    drop(open);

    let mut bus = TestFleet::start_secured().await?;
    let bus_operator = Identity::load(&bus.workdir().join("operator.key"))?;
    own_connection_minions(&mut bus, own, &[bus_operator.public_key().to_owned()]).await?;
    let (bc50, bc99) = connecting(&bus, 50).await?;
    let client = bus.client().await?.with_signer(bus_operator);
    let ((b50, b99), (bf50, bf99)) = measure(&bus, &client, own, rounds).await?;
    println!(
        "connect          open bus p50 {c50:.2} ms p99 {c99:.2} ms | admitted by the callout p50 {bc50:.2} ms p99 {bc99:.2} ms | {:.2}x",
        bc50 / c50
    );
    println!(
        "single call      open bus p50 {o50:.0} µs p99 {o99:.0} µs | secured bus p50 {b50:.0} µs p99 {b99:.0} µs | {:.2}x (both signed)",
        b50 / o50
    );
    println!(
        "fan-out to {own:>4}  open bus p50 {of50:.1} ms p99 {of99:.1} ms | secured bus p50 {bf50:.1} ms p99 {bf99:.1} ms | {:.2}x (own connections)",
        bf50 / of50
    );
    Ok(())
}
