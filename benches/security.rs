//! The cost of security on the call path, secured against unsecured in the
//! same run: minions that pin the caller's key (every call signed, verified,
//! checked for freshness and replay) against minions that pin nothing.
//!
//! - single-call latency (p50/p99) to one minion;
//! - fan-out time (call → last reply) to 1,000 simulated minions.
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
    Ok(())
}
