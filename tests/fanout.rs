//! End-to-end: selecting minions and fanning calls out at fleet scale —
//! percent, count, where, batches, and minions that misbehave.
#![cfg(test)]

use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;
use prost::Message;
use provis_core::client::ReplyStatus;
use provis_core::{CallRequest, CallTarget};
use provis_proto::v1::{CallEnvelope, CallReply, call_reply};
use provis_testkit::{TestFleet, eventually, run_to_end, write_files};
use serde_json::{Value, json};

fn provis() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_provis"))
}

fn call_json(fleet: &TestFleet, args: &[&str]) -> (i32, Value, String) {
    let (code, stdout, stderr) = run_to_end(
        fleet
            .provis_command(provis())
            .arg("call")
            .args(args)
            .args(["--output", "json"]),
    )
    .expect("provis call");
    let report = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    (code, report, stderr)
}

fn minions_of(report: &Value) -> Vec<String> {
    report["replies"].as_array().map_or_else(Vec::new, |r| {
        r.iter()
            .map(|r| r["minion"].as_str().unwrap_or_default().to_owned())
            .collect()
    })
}

async fn web_fleet(n: usize) -> TestFleet {
    let mut fleet = TestFleet::start().await.expect("fleet");
    for i in 0..n {
        let mut config = fleet
            .minion_config(&format!("w{i:02}"), &["web"])
            .expect("config");
        config.labels.insert(
            "team".into(),
            if i % 2 == 0 {
                "pay".into()
            } else {
                "search".into()
            },
        );
        fleet.add_minion_with(config).await.expect("minion");
    }
    fleet
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn percent_and_count_reach_exactly_that_many_and_say_why() {
    let fleet = web_fleet(10).await;
    let (code, report, _) = call_json(
        &fleet,
        &["--subject", "role.web", "--percent", "30", "sys.ping"],
    );
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["summary"]["selected"], 3);
    assert_eq!(report["summary"]["ok"], 3);
    assert!(
        report["selection"]["reason"]
            .as_str()
            .expect("reason")
            .contains("10 live in role.web, 30% of them: 3"),
        "{report}"
    );
    assert!(
        report.get("discarded").is_none(),
        "minions left out did not answer: {report}"
    );

    let (_, first, _) = call_json(
        &fleet,
        &[
            "--subject",
            "role.web",
            "--count",
            "4",
            "--seed",
            "9",
            "sys.ping",
        ],
    );
    let (_, second, _) = call_json(
        &fleet,
        &[
            "--subject",
            "role.web",
            "--count",
            "4",
            "--seed",
            "9",
            "sys.ping",
        ],
    );
    assert_eq!(minions_of(&first).len(), 4);
    assert_eq!(
        minions_of(&first),
        minions_of(&second),
        "a seed picks the same minions"
    );

    let (code, report, _) = call_json(&fleet, &["--all", "--percent", "1", "sys.ping"]);
    assert_eq!(
        (code, report["summary"]["selected"].as_u64()),
        (0, Some(1)),
        "at least one when P > 0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn where_selects_over_labels_facts_and_state() {
    let fleet = web_fleet(6).await;
    let (code, report, _) = call_json(
        &fleet,
        &[
            "--all",
            "--where",
            "labels.team == 'pay' && 'web' in roles",
            "sys.ping",
        ],
    );
    assert_eq!(code, 0);
    assert_eq!(minions_of(&report), ["w00", "w02", "w04"]);
    let (code, report, _) = call_json(
        &fleet,
        &[
            "--all",
            "--where",
            "state.mem.free_pct >= 0.0 && facts.cpus > 0",
            "sys.ping",
        ],
    );
    assert_eq!((code, report["summary"]["ok"].as_u64()), (0, Some(6)));

    // `provis minions` takes the same expressions.
    let (code, stdout, _) = run_to_end(fleet.provis_command(provis()).args([
        "minions",
        "--where",
        "labels.team == 'search'",
        "--output",
        "json",
    ]))
    .expect("minions");
    assert_eq!(code, 0);
    let listed: Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(listed.as_array().expect("list").len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_selections_are_clear_errors_with_exit_2() {
    let fleet = web_fleet(2).await;
    let cases: &[(&[&str], &str)] = &[
        (
            &["--all", "--where", "state.mem.free_pct <", "sys.ping"],
            "does not parse",
        ),
        (
            &["--all", "--where", "state.mem.nosuch < 1.0", "sys.ping"],
            "\"nosuch\"",
        ),
        (
            &["--all", "--where", "stat.mem.free_pct < 1.0", "sys.ping"],
            "\"stat\"",
        ),
        (
            &["--all", "--percent", "0", "sys.ping"],
            "--percent must be more than 0",
        ),
        (
            &["--all", "--percent", "150", "sys.ping"],
            "--percent must be more than 0",
        ),
        (
            &["--subject", "role.db", "sys.ping"],
            "no live minion matches: 0 live in role.db",
        ),
        (
            &["--all", "--where", "labels.team == 'nobody'", "sys.ping"],
            "no live minion matches",
        ),
        (&["--all", "--batch", "0", "sys.ping"], "batch size"),
    ];
    for (args, needle) in cases {
        let (code, _, stderr) = run_to_end(fleet.provis_command(provis()).arg("call").args(*args))
            .expect("provis call");
        assert_eq!(code, 2, "provis call {args:?}: {stderr}");
        assert!(stderr.contains(needle), "provis call {args:?}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_roll_and_stop_on_failure() {
    let fleet = web_fleet(6).await;
    let (code, report, _) = call_json(
        &fleet,
        &["--subject", "role.web", "--batch", "2", "sys.ping"],
    );
    assert_eq!(code, 0);
    assert_eq!(
        (report["batches"].as_u64(), report["summary"]["ok"].as_u64()),
        (Some(3), Some(6))
    );

    let (code, report, _) = call_json(
        &fleet,
        &[
            "--subject",
            "role.web",
            "--batch",
            "34%",
            "--stop-on-failure",
            "10",
            "sys.nosuch",
        ],
    );
    assert_eq!(code, 1);
    assert_eq!(report["batches"], 1, "{report}");
    assert_eq!(
        report["summary"],
        json!({"selected": 6, "ok": 0, "error": 3, "no_reply": 0, "skipped": 3})
    );

    // With ndjson, each reply is a line as it arrives, then the summary.
    let (code, stdout, _) = run_to_end(fleet.provis_command(provis()).args([
        "call",
        "--all",
        "--batch",
        "3",
        "--batch-wait",
        "200ms",
        "--output",
        "ndjson",
        "sys.ping",
    ]))
    .expect("call");
    assert_eq!(code, 0);
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 7);
    assert!(lines[..6].iter().all(|l| l["status"] == "ok"));
    assert_eq!(lines[6]["summary"]["ok"], 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minion_that_dies_mid_call_is_reported_as_no_reply() {
    let mut fleet = TestFleet::start().await.expect("fleet");
    let repo = fleet.workdir().join("repo");
    write_files(&repo, &[
        ("roles/web.toml", "services = [\"slow\"]\n"),
        ("services/slow/service.toml", "name = \"slow\"\nversion = \"1\"\n[limits]\ncall_timeout_ms = 5000\n"),
        ("services/slow/main.js", "export function work() { const end = Date.now() + 1500; while (Date.now() < end) {} return 'done' }"),
    ])
    .expect("repo");
    fleet.apply(&repo).await.expect("apply");
    let digest = provis_bundle::PackedBundle::from_dir(&repo.join("services/slow"))
        .expect("pack")
        .digest;
    for id in ["m1", "m2"] {
        fleet
            .add_minion_process(provis(), id, &["web"])
            .await
            .expect("minion");
        fleet
            .wait_service(id, "slow", &digest)
            .await
            .expect("loaded");
    }
    let client = fleet.client().await.expect("client");
    let request = CallRequest::parse_function("slow.work", Value::Null, Duration::from_secs(4))
        .expect("request");
    let started = Instant::now();
    let call = tokio::spawn(async move {
        client
            .call(&CallTarget::Role("web".parse().expect("role")), &request)
            .await
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    fleet.process_mut("m2").expect("m2").kill();
    let report = call.await.expect("task").expect("call");
    let status: Vec<(String, ReplyStatus)> = report
        .replies
        .iter()
        .map(|r| (r.minion.clone(), r.status))
        .collect();
    assert_eq!(
        status,
        [
            ("m1".to_owned(), ReplyStatus::Ok),
            ("m2".to_owned(), ReplyStatus::NoReply)
        ]
    );
    assert!(started.elapsed() < Duration::from_secs(6));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minion_that_replies_twice_or_too_late_counts_once() {
    let fleet = TestFleet::start().await.expect("fleet");
    let nats = fleet.nats().connect().await.expect("nats");
    // A misbehaving minion, straight on NATS: it answers every call twice,
    // and answers "late" calls only after their deadline.
    let mut calls = nats
        .subscribe("provis.minion.rogue.call")
        .await
        .expect("subscribe");
    let rogue = nats.clone();
    tokio::spawn(async move {
        while let Some(message) = calls.next().await {
            let envelope = CallEnvelope::decode(message.payload.as_ref()).expect("envelope");
            let reply = CallReply {
                call_id: envelope.call_id.clone(),
                minion: "rogue".into(),
                outcome: Some(call_reply::Outcome::ResultJson("1".into())),
                duration_us: 1,
            };
            if envelope.method == "late" {
                tokio::time::sleep(Duration::from_millis(800)).await;
            }
            let to = message.reply.expect("reply subject");
            for _ in 0..2 {
                rogue
                    .publish(to.clone(), reply.encode_to_vec().into())
                    .await
                    .expect("reply");
            }
        }
    });
    let client = fleet.client().await.expect("client");
    let target = CallTarget::Minions(vec!["rogue".parse().expect("id")]);
    let twice = client
        .call(
            &target,
            &CallRequest::parse_function("x.twice", Value::Null, Duration::from_secs(2))
                .expect("request"),
        )
        .await
        .expect("call");
    assert_eq!(twice.summary.ok, 1);
    let late = client
        .call(
            &target,
            &CallRequest::parse_function("x.late", Value::Null, Duration::from_millis(300))
                .expect("request"),
        )
        .await
        .expect("call");
    assert_eq!(late.replies[0].status, ReplyStatus::NoReply);
    tokio::time::sleep(Duration::from_secs(1)).await; // the late replies land on a closed inbox, harmlessly
    let again = client
        .call(
            &target,
            &CallRequest::parse_function("x.twice", Value::Null, Duration::from_secs(2))
                .expect("request"),
        )
        .await
        .expect("call");
    assert_eq!((again.summary.ok, again.replies.len()), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_minion_is_marked_offline_with_an_event() {
    let mut fleet = TestFleet::start().await.expect("fleet");
    let nats = fleet.nats().connect().await.expect("nats");
    let mut offline = nats
        .subscribe("provis.event.master.minion.offline")
        .await
        .expect("subscribe");
    fleet
        .add_minion_process(provis(), "m1", &["web"])
        .await
        .expect("m1");
    fleet.process_mut("m1").expect("m1").kill();
    let event = tokio::time::timeout(Duration::from_secs(10), offline.next())
        .await
        .expect("an offline event")
        .expect("message");
    let event: Value = serde_json::from_slice(&event.payload).expect("json");
    assert_eq!(
        (
            event["data"]["minion"].as_str(),
            event["data"]["reason"].as_str()
        ),
        (Some("m1"), Some("missed_heartbeats"))
    );
    eventually(
        "provis minions shows it offline",
        Duration::from_secs(5),
        || async {
            let (_, stdout, _) =
                run_to_end(fleet.provis_command(provis()).arg("minions")).expect("minions");
            stdout
                .lines()
                .any(|l| l.starts_with("m1 ") && l.contains("offline"))
        },
    )
    .await
    .expect("offline in the listing");
}
