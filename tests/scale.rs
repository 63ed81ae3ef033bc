//! End-to-end: what a large fleet and its scripts do to the servers and to
//! one minion. Calls in a loop leave nothing behind on the server; a minion
//! whose clock is an hour off is selected and answers; a flood of calls to
//! one minion is refused as busy; a registry record of the wrong shape is
//! skipped; a selection of 10,000 ids is delivered.
#![cfg(test)]

use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use provis_core::client::CallPlan;
use provis_core::clock::BusClock;
use provis_core::selection::Pick;
use provis_core::{CallRequest, CallTarget, Client, ReplyStatus};
use provis_testkit::{TestFleet, eventually, run_to_end};
use serde_json::Value;

fn provis() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_provis"))
}

fn ping() -> CallRequest {
    CallRequest::parse_function("sys.ping", Value::Null, Duration::from_secs(5)).expect("request")
}

/// How many JetStream consumers the account holds now.
async fn consumers(fleet: &TestFleet) -> usize {
    let js = async_nats::jetstream::new(fleet.connect().await.expect("nats"));
    js.query_account().await.expect("account").consumers
}

/// Calls everyone `calls` times, `at_once` calls at a time, and counts the
/// calls that did not reach all `minions`.
async fn call_in_a_loop(client: &Client, calls: usize, at_once: usize, minions: usize) -> usize {
    let request = ping();
    futures::stream::iter(0..calls)
        .map(|_| async {
            match client.call(&CallTarget::All, &request).await {
                Ok(report) if report.summary.ok == minions => 0,
                Ok(report) => {
                    eprintln!("a call reached {} of {minions}", report.summary.ok);
                    1
                }
                Err(err) => {
                    eprintln!("a call failed: {}", provis_core::error_chain(&err));
                    1
                }
            }
        })
        .buffer_unordered(at_once)
        .fold(0, |failed, one| async move { failed + one })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_calls_in_a_loop_succeed_and_leave_nothing_on_the_server() {
    let mut fleet = TestFleet::start().await.expect("fleet");
    for id in ["m1", "m2", "m3"] {
        fleet.add_minion(id, &["web"]).await.expect("minion");
    }
    let client = fleet.client().await.expect("client");
    assert_eq!(call_in_a_loop(&client, 1, 1, 3).await, 0);
    let before = consumers(&fleet).await;

    // A shell loop of `provis call`, each a process of its own.
    let command = fleet.provis_command(provis());
    let mut shell = std::process::Command::new("bash");
    for (name, value) in command.get_envs() {
        match value {
            Some(value) => shell.env(name, value),
            None => shell.env_remove(name),
        };
    }
    shell.arg("-c").arg(format!(
        "for i in $(seq 1 200); do {} call --all sys.ping --output json >/dev/null || exit 1; done",
        provis().display()
    ));
    let (code, _, stderr) = run_to_end(&mut shell).expect("bash");
    assert_eq!(code, 0, "every call of the shell loop succeeds: {stderr}");

    // Ten thousand more through the library, as a script in a loop would,
    // a few at a time; the consumers are counted while they run.
    let most = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counting = {
        let js = async_nats::jetstream::new(fleet.connect().await.expect("nats"));
        let most = most.clone();
        tokio::spawn(async move {
            loop {
                if let Ok(account) = js.query_account().await {
                    most.fetch_max(account.consumers, std::sync::atomic::Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    assert_eq!(call_in_a_loop(&client, 10_000, 4, 3).await, 0);
    counting.abort();
    // (One more would be the master's own, recreated; a consumer per call
    // would be thousands.)
    let most = most.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        most <= before + 1,
        "no call creates a consumer while it runs: {most} at most, {before} before"
    );
    assert_eq!(consumers(&fleet).await, before, "no consumer left behind");

    // Without a master the caller reads the registry itself: still nothing
    // left behind (batched direct gets, no consumer).
    fleet.stop_master().await;
    let client = fleet
        .client()
        .await
        .expect("client")
        .with_registry_wait(Duration::from_secs(2));
    assert_eq!(call_in_a_loop(&client, 500, 4, 3).await, 0);
    assert!(
        consumers(&fleet).await <= before,
        "the registry is read without leaving a consumer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minion_whose_clock_is_an_hour_off_is_selected_and_answers() {
    const HOUR_MS: i64 = 3_600_000;
    let mut fleet = TestFleet::start_secured().await.expect("fleet");
    fleet.add_minion("m1", &["web"]).await.expect("minion");
    for (id, skew) in [("ahead", HOUR_MS), ("behind", -HOUR_MS)] {
        let config = fleet.minion_config(id, &["web"]).expect("config");
        fleet
            .add_minion_on_clock(config, BusClock::with_local_skew(skew))
            .await
            .expect("minion with a wrong clock");
    }
    let client = fleet.client().await.expect("client");
    // Signed calls, judged by the time of the bus, not the minion's clock.
    let report = client
        .call(&CallTarget::Role("web".parse().expect("role")), &ping())
        .await
        .expect("call");
    assert_eq!(report.summary.ok, 3, "{report:?}");
    // A heartbeat interval later they are still live, and stay selected.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let minions = fleet
        .master()
        .await
        .expect("master")
        .minions()
        .await
        .expect("minions");
    for id in ["ahead", "behind"] {
        let entry = minions
            .iter()
            .find(|entry| entry.record.id.as_str() == id)
            .unwrap_or_else(|| panic!("{id} listed"));
        assert!(entry.live, "{id} is live: {entry:?}");
    }
    let report = client
        .call(&CallTarget::Role("web".parse().expect("role")), &ping())
        .await
        .expect("call");
    assert_eq!(report.summary.ok, 3, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_calls_to_one_minion_is_refused_as_busy() {
    const FLOOD: usize = 12;
    let mut fleet = TestFleet::start().await.expect("fleet");
    let repo = fleet.workdir().join("repo");
    provis_testkit::write_slow_service(&repo, 300).expect("repository");
    fleet.apply(&repo).await.expect("apply");
    let mut config = fleet.minion_config("m1", &["web"]).expect("config");
    config.max_concurrent_calls = 1;
    config.max_queued_calls = 2;
    fleet.add_minion_with(config).await.expect("minion");
    let client = fleet.client().await.expect("client");
    let expected = [(
        "m1".parse().expect("id"),
        [("slow".to_owned(), None)].into(),
    )]
    .into();
    eventually("m1 runs slow", Duration::from_secs(20), || {
        provis_core::readiness::services_run(&client, &expected)
    })
    .await
    .expect("slow runs");
    let target = CallTarget::Minions(vec!["m1".parse().expect("id")]);
    let request = CallRequest::parse_function("slow.work", Value::Null, Duration::from_secs(10))
        .expect("request");
    let reports =
        futures::future::join_all((0..FLOOD).map(|_| client.call(&target, &request))).await;
    let mut ok = 0;
    let mut busy = 0;
    for report in reports {
        let report = report.expect("call");
        let reply = report.replies.first().expect("a reply");
        match (&reply.status, &reply.error) {
            (ReplyStatus::Ok, _) => ok += 1,
            (ReplyStatus::Error, Some(error)) if error.code == "busy" => busy += 1,
            other => panic!("neither done nor busy: {other:?}"),
        }
    }
    // One running and two queued are done; every other is told at once.
    assert_eq!(ok, 3, "{ok} done, {busy} busy");
    assert_eq!(busy, FLOOD - 3);
    // The minion is none the worse for it.
    let report = client.call(&target, &ping()).await.expect("call");
    assert_eq!(report.summary.ok, 1, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_record_of_the_wrong_shape_is_skipped_with_a_warning() {
    let mut fleet = TestFleet::start().await.expect("fleet");
    for id in ["m1", "m2"] {
        fleet.add_minion(id, &["web"]).await.expect("minion");
    }
    let js = async_nats::jetstream::new(fleet.connect().await.expect("nats"));
    let registry = js
        .get_key_value(provis_core::storage::BUCKET_MINIONS)
        .await
        .expect("registry");
    registry
        .put("bogus", br#"{"id": 5, "roles": "web"}"#.to_vec().into())
        .await
        .expect("put");
    registry
        .put("garbage", b"\xff\x00 not json".to_vec().into())
        .await
        .expect("put");

    // The master skips them and goes on selecting the others.
    let client = fleet.client().await.expect("client");
    let report = client.call(&CallTarget::All, &ping()).await.expect("call");
    assert_eq!(report.summary.ok, 2, "{report:?}");
    assert_eq!(report.summary.selected, 2, "{report:?}");
    // A caller reading the registry itself (no master) skips them too and
    // says so on stderr.
    fleet.stop_master().await;
    let (code, stdout, stderr) = run_to_end(
        fleet
            .provis_command(provis())
            .args(["call", "--all", "sys.ping", "--output", "json"]),
    )
    .expect("provis call");
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(
        stderr.contains("registry entry skipped") && stderr.contains("bogus"),
        "{stderr}"
    );
    let report: Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(report["summary"]["ok"], 2, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_selection_of_ten_thousand_ids_is_delivered() {
    const LIVE: usize = 1_000;
    const NAMED: usize = 10_000;
    let mut fleet = TestFleet::start().await.expect("fleet");
    fleet
        .add_simulated_minions(LIVE, &["web"], 8, Duration::from_secs(5), |_| {})
        .await
        .expect("minions");
    let client = fleet.client().await.expect("client");

    // Ten thousand ids by name: a thousand in the fleet, the rest unknown.
    let ids: Vec<_> = (0..NAMED)
        .map(|n| {
            if n < LIVE {
                format!("sim{n:04}")
            } else {
                format!("nobody{n:05}")
            }
            .parse()
            .expect("id")
        })
        .collect();
    let short = CallRequest::parse_function("sys.ping", Value::Null, Duration::from_secs(2))
        .expect("request");
    let report = client
        .call(&CallTarget::Minions(ids), &short)
        .await
        .expect("call");
    assert_eq!(report.summary.selected, NAMED, "{:?}", report.summary);
    assert_eq!(report.summary.ok, LIVE, "{:?}", report.summary);
    assert_eq!(
        report.summary.no_reply,
        NAMED - LIVE,
        "{:?}",
        report.summary
    );

    // Half the fleet by percent: every chosen one answers, nobody else.
    let target = CallTarget::Role("web".parse().expect("role"));
    let selection = client
        .select(&target, None, Pick::Percent(50.0), None)
        .await
        .expect("selection");
    assert_eq!(selection.chosen.len(), LIVE / 2);
    let report = client
        .call_selected(
            &target,
            &selection,
            &ping(),
            &CallPlan::default(),
            &mut |_| {},
        )
        .await
        .expect("call");
    assert_eq!(report.summary.selected, LIVE / 2, "{:?}", report.summary);
    assert_eq!(report.summary.ok, LIVE / 2, "{:?}", report.summary);
    assert!(
        report.replies.iter().all(|reply| selection
            .chosen
            .contains(&reply.minion.parse().expect("id"))),
        "only the chosen answer"
    );
}
