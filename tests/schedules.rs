//! End-to-end: schedules from git with two masters. A schedule every
//! second runs once per slot, whichever master leads and across a
//! failover, never on more minions at once than its concurrency; operators
//! pause it, run it now and list it; a bad cron is rejected with its line.
#![cfg(test)]

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use provis_testkit::{GitRepo, TestFleet, eventually, run_to_end};
use serde_json::{Value, json};

fn provis() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_provis"))
}

/// Each run takes 150 ms and records when it started and ended.
const TICK: &str = "export function run() { const start = Date.now(); const until = start + 150; while (Date.now() < until) {} const runs = provis.state.get('runs') ?? []; runs.push([start, Date.now()]); provis.state.set('runs', runs); return runs.length }\nexport function runs() { return provis.state.get('runs') ?? [] }\n";

fn commit(repo: &GitRepo, message: &str, schedules: &str) -> String {
    repo.commit(
        message,
        &[
            ("roles/web.toml", "services = [\"tick\"]\n"),
            (
                "services/tick/service.toml",
                "name = \"tick\"\nversion = \"1\"\n",
            ),
            ("services/tick/main.js", TICK),
            (
                "assignments.toml",
                "[[assign]]\nminions = \"m*\"\nroles = [\"web\"]\n",
            ),
            ("schedules.toml", schedules),
        ],
    )
    .expect("commit")
}

const EVERY_SECOND: &str = "[[schedule]]\nname = \"tick\"\nevery = \"1s\"\nsubject = \"role.web\"\ncall = \"tick.run\"\nconcurrency = 1\n";

fn provis_cli(fleet: &TestFleet, args: &[&str]) -> (i32, String, String) {
    run_to_end(fleet.provis_command(provis()).args(args)).expect("provis")
}

/// `schedule.ran` events seen on `events` within `within`.
async fn ran_events(events: &mut async_nats::Subscriber, within: Duration) -> Vec<Value> {
    let mut seen = Vec::new();
    let until = tokio::time::Instant::now() + within;
    while let Ok(Some(message)) = tokio::time::timeout_at(until, events.next()).await {
        if message.subject.ends_with("master.schedule.ran") {
            seen.push(serde_json::from_slice(&message.payload).expect("an event"));
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_runs_once_per_slot_across_a_failover_and_never_more_than_n_at_once() {
    let repo = GitRepo::init().expect("git");
    let head = commit(&repo, "tick every second", EVERY_SECOND);
    let source = repo.path_string();
    let mut fleet = TestFleet::start_with(|config| {
        config.repository = Some(source);
        config.poll_interval_s = 3600;
        config.master_id = Some("first".into());
    })
    .await
    .expect("fleet");
    for id in ["m1", "m2", "m3"] {
        fleet.add_minion(id, &["web"]).await.expect("minion");
    }
    let second = fleet
        .start_another_master("second")
        .await
        .expect("a second master");
    eventually(
        "the minions run the commit",
        Duration::from_secs(20),
        || fleet.converged_on(&head, 3),
    )
    .await
    .expect("converged");
    let nats = fleet.nats().connect().await.expect("nats");
    let mut events = nats
        .subscribe("provis.event.master.schedule.>")
        .await
        .expect("events");

    let mut ran = ran_events(&mut events, Duration::from_secs(4)).await;
    assert!(ran.len() >= 2, "runs every second: {ran:?}");
    let stopped = Instant::now();
    fleet.stop_master().await;
    ran.extend(ran_events(&mut events, Duration::from_secs(8)).await);
    eprintln!(
        "{} runs in all; the first master stopped {:?} ago",
        ran.len(),
        stopped.elapsed()
    );

    // Once per slot: no slot ran twice, whichever master took it.
    let dues: Vec<i64> = ran
        .iter()
        .filter_map(|e| e["data"]["due_unix_ms"].as_i64())
        .collect();
    let distinct: BTreeSet<i64> = dues.iter().copied().collect();
    assert_eq!(dues.len(), distinct.len(), "a slot ran twice: {dues:?}");
    // Slots went on after the failover, under the second master.
    let stopped_ms = provis_core::envelope::now_unix_ms()
        - i64::try_from(stopped.elapsed().as_millis()).unwrap_or(0);
    assert!(
        dues.iter().filter(|due| **due > stopped_ms).count() >= 2,
        "the second master runs the schedule: {dues:?} (stopped at {stopped_ms})"
    );
    for event in &ran {
        // A run in flight when its master stopped may end short.
        let due = event["data"]["due_unix_ms"].as_i64().unwrap_or(0);
        if (due - stopped_ms).abs() > 1_500 {
            assert_eq!(
                event["data"]["ok"],
                json!(3),
                "every run reached m1, m2, m3: {event}"
            );
        }
    }

    // Never more than `concurrency` (1) minions running it at once.
    let mut intervals: Vec<(i64, i64)> = Vec::new();
    for id in ["m1", "m2", "m3"] {
        let reply = fleet
            .call_one(id, "tick.runs", Value::Null)
            .await
            .expect("runs");
        for run in reply
            .result
            .unwrap_or_default()
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            intervals.push((run[0].as_i64().unwrap_or(0), run[1].as_i64().unwrap_or(0)));
        }
    }
    assert!(
        intervals.len() >= ran.len(),
        "{} runs recorded, {} announced",
        intervals.len(),
        ran.len()
    );
    intervals.sort_unstable();
    for pair in intervals.windows(2) {
        assert!(pair[1].0 >= pair[0].1, "two minions ran at once: {pair:?}");
    }

    // Operators pause it, run it now, and list it.
    let (code, stdout, stderr) = provis_cli(&fleet, &["schedule", "pause", "tick"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("tick: paused"), "{stdout}");
    ran_events(&mut events, Duration::from_millis(1500)).await; // runs under way end
    let paused = ran_events(&mut events, Duration::from_millis(2500)).await;
    assert!(paused.is_empty(), "a paused schedule ran: {paused:?}");
    let (code, _, stderr) = provis_cli(&fleet, &["schedule", "run-now", "tick"]);
    assert_eq!(code, 0, "{stderr}");
    let now = ran_events(&mut events, Duration::from_secs(3)).await;
    assert_eq!(now.len(), 1, "run-now runs once, paused or not: {now:?}");
    let (code, stdout, stderr) = provis_cli(&fleet, &["schedule", "list"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("tick") && stdout.contains("every 1s") && stdout.contains("paused"),
        "{stdout}"
    );

    // A bad cron is a validation error naming the file and the line.
    commit(
        &repo,
        "a bad cron",
        "[[schedule]]\nname = \"nightly\"\ncron = \"61 * * * *\"\ncall = \"tick.run\"\n",
    );
    let (_, stdout, _) = provis_cli(&fleet, &["master", "sync"]);
    let answer: Value = serde_json::from_str(&stdout).unwrap_or_default();
    assert_eq!(answer["outcome"], "rejected", "{stdout}");
    let problems = answer["problems"].to_string();
    assert!(
        problems.contains("schedules.toml")
            && problems.contains("line 3: schedule \\\"nightly\\\": cron"),
        "{answer}"
    );
    second.stop().await;
}
