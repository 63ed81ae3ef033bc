//! Fan-out at fleet scale, each figure beside the raw NATS figure for the
//! same pattern in the same run:
//!
//! - a call to a whole role of N minions, from publish to the last reply,
//!   against one raw publish answered by N raw subscribers;
//! - the same call including the selection (asked of the master) that
//!   decides whom to wait for;
//! - p50/p99 of a call to one minion, against a raw request/reply.
//!
//! Minions are testkit's simulated minions: the real minion code, many per
//! process on shared connections. Run: `cargo bench --bench fanout`
//! (PROVIS_BENCH_SIZES=100,1000,5000 and PROVIS_BENCH_ROUNDS=20 by default).
// A measurement that cannot take place stops the benchmark: its closures
// return nothing, so a failure there ends it with the reason.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::{Duration, Instant};

use provis_core::client::CallPlan;
use provis_core::selection::Pick;
use provis_core::{CallRequest, CallTarget};
use provis_testkit::{RawResponders, TestFleet, raw_fanout, timed_call};
use serde_json::Value;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let rounds = provis_testkit::bench_rounds(20);
    println!(
        "{rounds} rounds per figure; 2 cores shared by caller, nats-server and every minion\n"
    );
    println!(
        "{:>6}  {:>28}  {:>28}  {:>28}  {:>8}",
        "N",
        "provis: call → last reply",
        "provis incl. selection",
        "raw NATS: 1 pub, N replies",
        "ratio"
    );
    for n in provis_testkit::bench_sizes("100,1000,5000") {
        let mut fleet = TestFleet::start().await?;
        let connections = (n / 250).clamp(1, 16);
        let setup = Instant::now();
        let ids = fleet
            .add_simulated_minions(n, &["web"], connections, Duration::from_secs(30), |_| {})
            .await?;
        let setup = setup.elapsed();

        // Raw responders: N subscribers spread over the same number of connections.
        let _raw = RawResponders::start(fleet.nats(), "bench.raw.fanout", n, connections).await?;
        let nats = fleet.nats().connect().await?;

        let client = fleet.client().await?;
        let target = CallTarget::Role("web".parse()?);
        let request =
            CallRequest::parse_function("sys.ping", Value::Null, Duration::from_secs(30))?;
        let selection = client.select(&target, None, Pick::All, None).await?;
        assert_eq!(selection.chosen.len(), n);
        let (mut provis_ms, mut with_selection_ms, mut raw_ms) =
            (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            provis_ms.push(timed_call(&client, &target, &selection, &request, n).await?);

            let started = Instant::now();
            let report = client.call(&target, &request).await?;
            with_selection_ms.push(started.elapsed().as_secs_f64() * 1e3);
            assert_eq!(report.summary.ok, n);

            raw_ms.push(raw_fanout(&nats, "bench.raw.fanout", n).await?);
        }
        let (p50, p99) = provis_testkit::p50_p99(provis_ms);
        let (r50, r99) = provis_testkit::p50_p99(with_selection_ms);
        let (n50, n99) = provis_testkit::p50_p99(raw_ms);
        println!(
            "{n:>6}  {:>28}  {:>28}  {:>28}  {:>7.2}x",
            format!("p50 {p50:.1} ms p99 {p99:.1} ms"),
            format!("p50 {r50:.1} ms p99 {r99:.1} ms"),
            format!("p50 {n50:.1} ms p99 {n99:.1} ms"),
            p50 / n50
        );

        // One minion: p50/p99 of a single call against a raw request/reply.
        let one = CallTarget::Minions(vec![ids[0].parse()?]);
        let one_selection = client.select(&one, None, Pick::All, None).await?;
        let mut single = Vec::new();
        let mut raw_single = Vec::new();
        // Its own connection, as the minion answering the provis call has.
        let _echo = RawResponders::start(fleet.nats(), "bench.raw.one", 1, 1).await?;
        for _ in 0..(rounds * 25) {
            let started = Instant::now();
            client
                .call_selected(
                    &one,
                    &one_selection,
                    &request,
                    &CallPlan::default(),
                    &mut |_| {},
                )
                .await?;
            single.push(started.elapsed().as_secs_f64() * 1e6);
            let started = Instant::now();
            nats.request("bench.raw.one", "ping".into()).await?;
            raw_single.push(started.elapsed().as_secs_f64() * 1e6);
        }
        let (s50, s99) = provis_testkit::p50_p99(single);
        let (q50, q99) = provis_testkit::p50_p99(raw_single);
        println!(
            "        single call in a fleet of {n}: p50 {s50:.0} µs p99 {s99:.0} µs; raw request/reply p50 {q50:.0} µs p99 {q99:.0} µs ({:.2}x); fleet start {setup:.1?}",
            s50 / q50
        );
        drop(fleet);
    }
    Ok(())
}
