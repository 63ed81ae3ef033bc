//! End-to-end: injected services through a real nats-server — publish, load,
//! call over NATS and gRPC, hot reload under load, refusals, persistence.
#![cfg(test)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use provis_bundle::PackedBundle;
use provis_core::{CallRequest, CallTarget, ReplyStatus};
use provis_testkit::{TestFleet, eventually, run_to_end, write_files};
use serde_json::{Value, json};

fn provis() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_provis"))
}

fn request(function: &str, args: Value) -> CallRequest {
    CallRequest::parse_function(function, args, Duration::from_secs(5)).expect("function")
}

fn one(id: &str) -> CallTarget {
    CallTarget::Minions(vec![id.parse().expect("id")])
}

/// Applies a repository whose role `web` runs `counter` 1.0.0; returns the
/// repository's path and the bundle's digest.
async fn apply_counter(fleet: &TestFleet) -> (std::path::PathBuf, String) {
    let repo = fleet.workdir().join("repo");
    repository(&repo, "1.0.0", COUNTER);
    fleet.apply(&repo).await.expect("apply");
    let digest = PackedBundle::from_dir(&repo.join("services/counter"))
        .expect("pack")
        .digest;
    (repo, digest)
}

/// A repository with one service `counter` (version `v`, body `main`) for role `web`.
fn repository(root: &Path, version: &str, main: &str) {
    let manifest =
        format!("name = \"counter\"\nversion = \"{version}\"\n[limits]\ncall_timeout_ms = 500\n");
    write_files(
        root,
        &[
            (
                "roles/web.toml",
                "services = [\"counter\"]\n[config.counter]\nstep = 2\n",
            ),
            ("services/counter/service.toml", &manifest),
            ("services/counter/main.js", main),
        ],
    )
    .expect("write repository");
}

const COUNTER: &str = r#"
export function bump() { const n = (provis.state.get("n") ?? 0) + provis.config.step; provis.state.set("n", n); return { n, version: "1" } }
export function version() { return "1" }
export function spin() { for (;;) {} }
export function fail() { throw new RangeError("out of range") }
export function announce() { provis.events.emit("counted", { n: provis.state.get("n") ?? 0 }); return true }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injected_service_answers_over_nats_and_grpc_alike() {
    let mut fleet = TestFleet::start().await.expect("fleet");
    let (_, digest) = apply_counter(&fleet).await;
    fleet
        .add_minion_process(provis(), "m1", &["web.eu"])
        .await
        .expect("m1");
    fleet
        .wait_service("m1", "counter", &digest)
        .await
        .expect("loaded");

    let call = |via: &'static str| {
        let mut command = fleet.provis_command(provis());
        command.args([
            "call",
            "--minion",
            "m1",
            "--via",
            via,
            "--output",
            "json",
            "counter.bump",
        ]);
        let (code, stdout, stderr) = run_to_end(&mut command).expect("provis call");
        assert_eq!(code, 0, "{stdout}{stderr}");
        serde_json::from_str::<Value>(&stdout).expect("json")
    };
    let over_nats = call("nats");
    let over_grpc = call("grpc");
    assert_eq!(
        over_nats["replies"][0]["result"],
        json!({"n": 2, "version": "1"}),
        "config from the role: step 2"
    );
    assert_eq!(
        over_grpc["replies"][0]["result"],
        json!({"n": 4, "version": "1"}),
        "same service, same state"
    );
    assert_eq!(over_nats["summary"], over_grpc["summary"]);

    // Errors are structured the same way, with the JS stack.
    let client = fleet.client().await.expect("client");
    let report = client
        .call(&one("m1"), &request("counter.fail", Value::Null))
        .await
        .expect("call");
    let error = report.replies[0].error.clone().expect("an error");
    assert_eq!(
        (error.code.as_str(), error.message.as_str()),
        ("service_failed", "RangeError: out of range")
    );
    assert!(error.stack.expect("a stack").contains("main.js"));

    // An infinite loop is cut at the manifest's 500 ms and the service goes on.
    let report = client
        .call(&one("m1"), &request("counter.spin", Value::Null))
        .await
        .expect("call");
    assert_eq!(
        report.replies[0].error.as_ref().expect("an error").code,
        "deadline_exceeded"
    );
    let report = client
        .call(&one("m1"), &request("counter.version", Value::Null))
        .await
        .expect("call");
    assert_eq!(report.replies[0].result, Some(json!("1")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_from_a_service_reach_subscribers() {
    let mut fleet = TestFleet::start().await.expect("fleet");
    let (_, digest) = apply_counter(&fleet).await;
    let nats = fleet.nats().connect().await.expect("nats");
    let mut events = nats.subscribe("provis.event.>").await.expect("subscribe");
    fleet.add_minion("m1", &["web"]).await.expect("m1");
    fleet
        .wait_service("m1", "counter", &digest)
        .await
        .expect("loaded");
    let client = fleet.client().await.expect("client");
    client
        .call(&one("m1"), &request("counter.announce", Value::Null))
        .await
        .expect("call");

    let mut seen = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(message) = events.next().await {
            seen.push(message.subject.to_string());
            if message.subject.as_str() == "provis.event.m1.counter.counted" {
                let event: Value = serde_json::from_slice(&message.payload).expect("json");
                assert_eq!(event["specversion"], "1.0");
                assert_eq!(event["type"], "io.provis.counter.counted");
                assert_eq!(event["source"], "provis/m1");
                return;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no counted event; saw {seen:?}"));
    assert!(
        seen.iter().any(|s| s == "provis.event.m1.service.loaded"),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_reload_under_concurrent_calls_fails_no_call() {
    let mut fleet = TestFleet::start().await.expect("fleet");
    let (repo, digest) = apply_counter(&fleet).await;
    fleet.add_minion("m1", &["web"]).await.expect("m1");
    fleet
        .wait_service("m1", "counter", &digest)
        .await
        .expect("v1 loaded");

    let client = Arc::new(fleet.client().await.expect("client"));
    let (calls, failures) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let versions = Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (client, calls, failures, stop, versions) = (
            client.clone(),
            calls.clone(),
            failures.clone(),
            stop.clone(),
            versions.clone(),
        );
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let report = client
                    .call(&one("m1"), &request("counter.version", Value::Null))
                    .await
                    .expect("call");
                calls.fetch_add(1, Ordering::Relaxed);
                match &report.replies[0] {
                    reply if reply.status == ReplyStatus::Ok => {
                        versions
                            .lock()
                            .expect("lock")
                            .insert(reply.result.clone().expect("result").to_string());
                    }
                    reply => {
                        eprintln!("failed call: {reply:?}");
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }

    // A broken version (it throws while loading) published straight to the
    // store, as a buggy publisher would: the old version must keep serving.
    let nats = fleet.nats().connect().await.expect("nats");
    let mut failed_events = nats
        .subscribe("provis.event.m1.service.failed")
        .await
        .expect("subscribe");
    let store = fleet.bundle_store().await.expect("store");
    let broken_dir = fleet.workdir().join("broken");
    write_files(
        &broken_dir,
        &[
            (
                "service.toml",
                "name = \"counter\"\nversion = \"2.0.0-broken\"\n",
            ),
            (
                "main.js",
                "export function version() { return '2' }\nthrow new Error('bad release');",
            ),
        ],
    )
    .expect("write");
    let broken = PackedBundle::from_dir(&broken_dir).expect("pack");
    store.publish(&broken, None).await.expect("publish broken");
    let failed = tokio::time::timeout(Duration::from_secs(10), failed_events.next())
        .await
        .expect("a service.failed event")
        .expect("message");
    let failed: Value = serde_json::from_slice(&failed.payload).expect("json");
    assert!(
        failed["data"]["reason"]
            .as_str()
            .expect("reason")
            .contains("bad release"),
        "{failed}"
    );
    assert_eq!(failed["data"]["still_serving"]["version"], "1.0.0");

    // Then a good version 3: new calls move to it, none fails on the way.
    repository(
        &repo,
        "3.0.0",
        &COUNTER.replace("return \"1\"", "return \"3\""),
    );
    fleet.apply(&repo).await.expect("apply v3");
    let v3 = PackedBundle::from_dir(&repo.join("services/counter"))
        .expect("pack")
        .digest;
    fleet
        .wait_service("m1", "counter", &v3)
        .await
        .expect("v3 loaded");
    eventually("calls reach version 3", Duration::from_secs(10), || async {
        versions.lock().expect("lock").contains("\"3\"")
    })
    .await
    .expect("v3 answers");
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.expect("load task");
    }
    let calls = calls.load(Ordering::Relaxed);
    assert!(calls > 20, "the load ran ({calls} calls)");
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "no call failed across a broken and a good reload ({calls} calls)"
    );
    assert!(
        !versions.lock().expect("lock").contains("\"2\""),
        "the broken version never served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_that_does_not_match_its_digest_is_refused() {
    let mut fleet = TestFleet::start().await.expect("fleet");
    let (repo, digest) = apply_counter(&fleet).await;
    fleet.add_minion("m1", &["web"]).await.expect("m1");
    fleet
        .wait_service("m1", "counter", &digest)
        .await
        .expect("v1 loaded");

    let nats = fleet.nats().connect().await.expect("nats");
    let mut failed_events = nats
        .subscribe("provis.event.m1.service.failed")
        .await
        .expect("subscribe");
    // Version 2, with one byte changed after its digest was taken.
    repository(
        &repo,
        "2.0.0",
        &COUNTER.replace("return \"1\"", "return \"2\""),
    );
    let v2 = PackedBundle::from_dir(&repo.join("services/counter")).expect("pack");
    let store = fleet.bundle_store().await.expect("store");
    let mut tampered = v2.bytes.to_vec();
    let at = tampered.len() - 3;
    tampered[at] ^= 0x20;
    store
        .overwrite_bytes_for_test(&v2.digest, &tampered)
        .await
        .expect("store tampered bytes");
    store.publish(&v2, None).await.expect("point at v2"); // the object exists, so only the pointer moves

    let failed = tokio::time::timeout(Duration::from_secs(10), failed_events.next())
        .await
        .expect("a service.failed event")
        .expect("message");
    let failed: Value = serde_json::from_slice(&failed.payload).expect("json");
    assert!(
        failed["data"]["reason"]
            .as_str()
            .expect("reason")
            .contains("digest"),
        "{failed}"
    );
    let client = fleet.client().await.expect("client");
    let report = client
        .call(&one("m1"), &request("counter.version", Value::Null))
        .await
        .expect("call");
    assert_eq!(
        report.replies[0].result,
        Some(json!("1")),
        "the old version keeps serving"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_a_minion_that_dies_and_comes_back() {
    let mut fleet = TestFleet::start().await.expect("fleet");
    let (_, digest) = apply_counter(&fleet).await;
    fleet
        .add_minion_process(provis(), "m1", &["web"])
        .await
        .expect("m1");
    fleet
        .wait_service("m1", "counter", &digest)
        .await
        .expect("loaded");
    let client = fleet.client().await.expect("client");
    for _ in 0..2 {
        client
            .call(&one("m1"), &request("counter.bump", Value::Null))
            .await
            .expect("call");
    }
    fleet.process_mut("m1").expect("m1").kill();
    fleet
        .add_minion_process(provis(), "m1", &["web"])
        .await
        .expect("m1 again");
    fleet
        .wait_service("m1", "counter", &digest)
        .await
        .expect("loaded again");
    let report = client
        .call(&one("m1"), &request("counter.bump", Value::Null))
        .await
        .expect("call");
    assert_eq!(
        report.replies[0].result,
        Some(json!({"n": 6, "version": "1"})),
        "2 + 2 before the crash, + 2 after"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provis_bundle_is_deterministic_and_names_broken_modules() {
    let work = tempfile::tempdir().expect("tempdir");
    write_files(
        work.path(),
        &[
            ("ok/service.toml", "name = \"ok\"\nversion = \"1\"\n"),
            (
                "ok/main.js",
                "import { x } from './lib/x.js';\nexport function f() { return x }",
            ),
            ("ok/lib/x.js", "export const x = 1;"),
            (
                "broken/service.toml",
                "name = \"broken\"\nversion = \"1\"\n",
            ),
            ("broken/main.js", "export function f() { return 1 }"),
            ("broken/lib/helper.js", "export function g( {"),
            (
                "missing/service.toml",
                "name = \"missing\"\nversion = \"1\"\n",
            ),
            (
                "missing/main.js",
                "import { y } from './nowhere.js';\nexport function f() { return y }",
            ),
            (
                "badcap/service.toml",
                "name = \"badcap\"\nversion = \"1\"\n[capabilities]\nshell = true\n",
            ),
            ("badcap/main.js", "export function f() {}"),
        ],
    )
    .expect("write");
    let bundle = |dir: &str| {
        run_to_end(
            std::process::Command::new(provis())
                .args(["bundle", "--json"])
                .arg(work.path().join(dir)),
        )
        .expect("provis bundle")
    };
    let (code, first, _) = bundle("ok");
    assert_eq!(code, 0);
    let (_, second, _) = bundle("ok");
    let (first, second): (Value, Value) = (
        serde_json::from_str(&first).expect("json"),
        serde_json::from_str(&second).expect("json"),
    );
    assert_eq!(first["digest"], second["digest"]);
    assert_eq!(first["methods"], json!(["f"]));

    for (dir, needle) in [
        ("broken", "lib/helper.js"),
        ("missing", "nowhere.js"),
        ("badcap", "shell"),
    ] {
        let (code, _, stderr) = bundle(dir);
        assert_ne!(code, 0, "{dir}");
        assert!(stderr.contains(needle), "{dir}: {stderr}");
    }
}
