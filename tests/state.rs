//! End-to-end: state samples, the master's index, `provis query` and
//! `provis events`, through a real nats-server and JetStream.
#![cfg(test)]

use std::path::Path;
use std::time::Duration;

use provis_core::envelope::now_unix_ms;
use provis_testkit::{TestFleet, eventually, run_to_end, write_files};
use serde_json::{Value, json};

fn provis() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_provis"))
}

/// A fleet whose master keeps 1-second history buckets, so windows of
/// seconds can be asked.
async fn fleet() -> TestFleet {
    TestFleet::start_with(|config| config.state_bucket_s = 1)
        .await
        .expect("fleet")
}

fn mem(free_pct: f64) -> Value {
    json!({ "mem": { "free_pct": free_pct, "total_mb": 1000 }, "disk": { "mount": "/", "free_pct": 40.0 }, "load": { "one": 0.5 } })
}

/// One sample a second over the last `seconds` seconds, ending `end_ago` seconds ago.
fn series(seconds: i64, end_ago: i64, free: impl Fn(i64) -> f64) -> Vec<(i64, Value)> {
    let now = now_unix_ms();
    (0..seconds)
        .map(|i| (now - (end_ago + i) * 1000, mem(free(i))))
        .collect()
}

fn query(fleet: &TestFleet, args: &[&str]) -> (i32, Value, String) {
    let (code, stdout, stderr) = run_to_end(
        fleet
            .provis_command(provis())
            .arg("query")
            .args(args)
            .args(["--output", "json"]),
    )
    .expect("provis query");
    (
        code,
        serde_json::from_str(&stdout).unwrap_or(Value::Null),
        stderr,
    )
}

fn ids(list: &Value) -> Vec<String> {
    list.as_array().map_or_else(Vec::new, |l| {
        l.iter()
            .map(|m| m["minion"].as_str().unwrap_or_default().to_owned())
            .collect()
    })
}

async fn wait_indexed(fleet: &TestFleet, accepted: u64) {
    eventually(
        &format!("{accepted} samples indexed"),
        Duration::from_secs(15),
        || async {
            stats(fleet, false)
                .await
                .is_some_and(|s| s.counters.accepted >= accepted)
        },
    )
    .await
    .expect("indexed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_memory_now_for_a_whole_window_and_at_least_once() {
    let fleet = fleet().await;
    fleet
        .publish_samples("always", &series(40, 0, |_| 5.0))
        .await
        .expect("publish");
    fleet
        .publish_samples("once", &series(40, 0, |i| if i == 20 { 5.0 } else { 50.0 }))
        .await
        .expect("publish");
    fleet
        .publish_samples("never", &series(40, 0, |_| 50.0))
        .await
        .expect("publish");
    fleet
        .publish_samples("newcomer", &series(10, 0, |_| 5.0))
        .await
        .expect("publish");
    fleet
        .publish_samples(
            "recovered",
            &series(40, 0, |i| if i < 5 { 50.0 } else { 5.0 }),
        )
        .await
        .expect("publish");
    wait_indexed(&fleet, 170).await;

    let (code, now, _) = query(&fleet, &["state.mem.free_pct < 10.0"]);
    assert_eq!(code, 0);
    assert_eq!(ids(&now["matches"]), ["always", "newcomer"]);

    let (_, whole, _) = query(&fleet, &["state.mem.free_pct < 10.0", "--for", "30s"]);
    assert_eq!(ids(&whole["matches"]), ["always"]);
    assert_eq!(
        ids(&whole["short_history"]),
        ["newcomer"],
        "held, but reported for a third of the window"
    );
    assert!(
        whole["short_history"][0]["note"]
            .as_str()
            .expect("note")
            .contains("history short")
    );

    let (_, once, _) = query(&fleet, &["state.mem.free_pct < 10.0", "--any", "30s"]);
    assert_eq!(
        ids(&once["matches"]),
        ["always", "newcomer", "once", "recovered"]
    );

    let (code, none, _) = query(&fleet, &["state.mem.free_pct < 1.0"]);
    assert_eq!(
        (code, none["matches"].as_array().map(Vec::len)),
        (1, Some(0)),
        "nothing matched: exit 1"
    );

    // The table says the same to a person.
    let (_, table, _) = run_to_end(fleet.provis_command(provis()).args([
        "query",
        "state.mem.free_pct < 10.0",
        "--for",
        "30s",
    ]))
    .expect("query");
    assert!(
        table.contains("1 of 5 minions match for all of the past 30s (1 more held"),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_samples_are_kept_out_counted_and_harm_nothing() {
    let fleet = fleet().await;
    let nats = fleet.nats().connect().await.expect("nats");
    let js = async_nats::jetstream::new(nats);
    for payload in [
        b"not json".to_vec(),
        b"{\"minion\": \"other\", \"at_unix_ms\": 1, \"state\": {}}".to_vec(),
    ] {
        js.publish("provis.state.liar", payload.into())
            .await
            .expect("publish")
            .await
            .expect("ack");
    }
    let now = now_unix_ms();
    fleet
        .publish_samples(
            "clock",
            &[
                (now + 3_600_000, mem(5.0)),
                (now - 30 * 86_400_000, mem(5.0)),
                (now, mem(50.0)),
            ],
        )
        .await
        .expect("publish");
    // A minion sending far too fast: 50 samples in 50 ms.
    fleet
        .publish_samples(
            "chatty",
            &(0..50).map(|i| (now - i, mem(50.0))).collect::<Vec<_>>(),
        )
        .await
        .expect("publish");
    wait_indexed(&fleet, 2).await;
    let stats = stats(&fleet, false).await.expect("stats");
    assert_eq!(
        stats.counters,
        provis_core::master_api::IndexCounters {
            accepted: 2,
            malformed: 2,
            out_of_window: 2,
            rate_limited: 49
        },
        "{stats:?}"
    );

    // The far-future sample is kept out of windows: "clock" never had low memory.
    let (_, any, _) = query(&fleet, &["state.mem.free_pct < 10.0", "--any", "2h"]);
    assert!(ids(&any["matches"]).is_empty(), "{any}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_naming_an_unknown_field_says_which() {
    let fleet = fleet().await;
    fleet
        .publish_samples("m1", &series(3, 0, |_| 50.0))
        .await
        .expect("publish");
    wait_indexed(&fleet, 3).await;
    for (expression, needle) in [
        ("state.mem.nosuch < 1.0", "\"nosuch\""),
        ("stat.mem.free_pct < 1.0", "\"stat\""),
        ("state.mem.free_pct <", "does not parse"),
    ] {
        let (code, _, stderr) = query(&fleet, &[expression]);
        assert_eq!(code, 2, "{expression}: {stderr}");
        assert!(stderr.contains(needle), "{expression}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_restart_rebuilds_the_same_index() {
    let mut fleet = fleet().await;
    for minion in ["a", "b", "c"] {
        fleet
            .publish_samples(minion, &series(30, 0, |i| i as f64))
            .await
            .expect("publish");
    }
    wait_indexed(&fleet, 90).await;
    let before = stats(&fleet, true).await.expect("stats");
    let (_, answer_before, _) = query(&fleet, &["state.mem.free_pct < 10.0", "--any", "40s"]);
    fleet.restart_master().await.expect("restart");
    eventually("the index is rebuilt", Duration::from_secs(15), || async {
        stats(&fleet, false)
            .await
            .is_some_and(|s| s.rebuild.is_some())
    })
    .await
    .expect("rebuilt");
    let after = stats(&fleet, true).await.expect("stats");
    assert!(before.fingerprint.is_some());
    assert_eq!(before.fingerprint, after.fingerprint);
    assert_eq!(before.counters, after.counters);
    let (_, answer_after, _) = query(&fleet, &["state.mem.free_pct < 10.0", "--any", "40s"]);
    assert_eq!(
        ids(&answer_before["matches"]),
        ids(&answer_after["matches"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minions_sample_their_machine_and_services_can_query_the_fleet() {
    let mut fleet = fleet().await;
    let repo = fleet.workdir().join("repo");
    write_files(&repo, &[
        ("roles/web.toml", "services = [\"watch\", \"blind\"]\n"),
        ("services/watch/service.toml", "name = \"watch\"\nversion = \"1\"\n[capabilities]\nfleet_query = true\n"),
        ("services/watch/main.js", "export function busy() { return provis.fleet.query('state.mem.total_mb > 0').matches.map((m) => m.minion) }"),
        ("services/blind/service.toml", "name = \"blind\"\nversion = \"1\"\n"),
        ("services/blind/main.js", "export function peek() { return provis.fleet.query('true') }"),
    ])
    .expect("repo");
    fleet.apply(&repo).await.expect("apply");
    let mut config = fleet.minion_config("m1", &["web"]).expect("config");
    config.state_interval_ms = 200;
    fleet.add_minion_with(config).await.expect("m1");
    let client = fleet.client().await.expect("client");
    let target = provis_core::CallTarget::Minions(vec!["m1".parse().expect("id")]);
    eventually(
        "the watch service sees m1 in the fleet's state",
        Duration::from_secs(20),
        || async {
            let request = provis_core::CallRequest::parse_function(
                "watch.busy",
                Value::Null,
                Duration::from_secs(5),
            )
            .expect("request");
            client
                .call(&target, &request)
                .await
                .is_ok_and(|r| r.replies[0].result == Some(json!(["m1"])))
        },
    )
    .await
    .expect("fleet query from a service");
    let request =
        provis_core::CallRequest::parse_function("blind.peek", Value::Null, Duration::from_secs(5))
            .expect("request");
    let report = client.call(&target, &request).await.expect("call");
    let error = report.replies[0].error.as_ref().expect("denied");
    assert!(
        error
            .message
            .contains("capability fleet_query is not granted"),
        "{error:?}"
    );
    assert_eq!(
        error.code, "denied",
        "a capability denial is told apart from a failure"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provis_events_lists_and_follows_the_fleet_s_events() {
    let mut fleet = fleet().await;
    fleet.add_minion("m1", &["web"]).await.expect("m1");
    fleet.add_minion("m2", &["db"]).await.expect("m2");
    eventually(
        "both online events are stored",
        Duration::from_secs(10),
        || async {
            let (_, stdout, _) = run_to_end(fleet.provis_command(provis()).args([
                "events",
                "--since",
                "5m",
                "--type",
                "minion.online",
            ]))
            .expect("events");
            stdout.lines().count() == 2
        },
    )
    .await
    .expect("events listed");
    let (code, stdout, _) = run_to_end(
        fleet
            .provis_command(provis())
            .args(["events", "--minion", "m2", "--output", "json"]),
    )
    .expect("events");
    assert_eq!(code, 0);
    let events: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("a CloudEvent"))
        .collect();
    assert!(
        !events.is_empty()
            && events
                .iter()
                .all(|e| e["source"] == "provis/m2" && e["specversion"] == "1.0"),
        "{stdout}"
    );

    // --follow prints what happens after it started.
    let mut follow = fleet.provis_command(provis());
    follow
        .args([
            "events",
            "--follow",
            "--since",
            "30s",
            "--type",
            "minion.offline",
        ])
        .stdout(std::process::Stdio::piped());
    let mut follower = tokio::process::Command::from(follow)
        .kill_on_drop(true)
        .spawn()
        .expect("follow");
    tokio::time::sleep(Duration::from_millis(500)).await;
    fleet.stop_minion("m1").await;
    let stdout = follower.stdout.take().expect("stdout");
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    // Generous: a follower whose first pull got lost recovers only after its
    // consumer misses heartbeats (seconds); a healthy run takes well under one.
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("an event in time")
        .expect("read")
        .expect("a line");
    assert!(
        line.contains("m1") && line.contains("minion.offline"),
        "{line}"
    );
}

/// The master's state index in numbers, if it answers.
async fn stats(
    fleet: &TestFleet,
    fingerprint: bool,
) -> Option<provis_core::master_api::IndexStats> {
    fleet.master().await.ok()?.stats(fingerprint).await.ok()
}
