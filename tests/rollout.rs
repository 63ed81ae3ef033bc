//! End-to-end: staged rollouts from git. A commit reaches a canary, then
//! the rest, each stage gated by a health call; a failing gate rolls the
//! fleet back by itself; a new leader resumes at the same stage; a bundle
//! that cannot be fetched is `failed` with its reason until it can.
#![cfg(test)]

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use provis_core::master_api::{RolloutRecord, RolloutStatus};
use provis_core::{CallRequest, CallTarget};
use provis_testkit::{GitRepo, TestFleet, eventually};
use serde_json::Value;

const MINIONS: usize = 4;

/// Role web runs `greeter` at `version`; its `check` (the gate) fails when
/// `healthy` is false. Commits are staged: one canary, then the rest.
fn commit(repo: &GitRepo, version: &str, healthy: bool, wait_s: u64) -> String {
    let check = if healthy {
        "export function check() { return 'ok' }".to_owned()
    } else {
        "export function check() { throw new Error('unhealthy on purpose') }".to_owned()
    };
    repo.commit(
        &format!("greeter {version}"),
        &[
            ("roles/web.toml", "services = [\"greeter\"]\n"),
            (
                "services/greeter/service.toml",
                &format!("name = \"greeter\"\nversion = \"{version}\"\n"),
            ),
            (
                "services/greeter/main.js",
                &format!("export function hello() {{ return '{version}' }}\n{check}\n"),
            ),
            (
                "assignments.toml",
                "[[assign]]\nminions = \"m*\"\nroles = [\"web\"]\n",
            ),
            (
                "rollout.toml",
                &format!(
                    "wait_s = {wait_s}\nconverge_timeout_s = 20\n\
                     [[stages]]\nname = \"canary\"\ncount = 1\n\
                     [gate]\ncall = \"greeter.check\"\ntimeout_s = 3\n"
                ),
            ),
        ],
    )
    .expect("commit")
}

async fn fleet_following(repo: &GitRepo) -> TestFleet {
    let mut fleet = TestFleet::start_following(repo).await.expect("fleet");
    for n in 1..=MINIONS {
        fleet
            .add_minion(&format!("m{n}"), &["web"])
            .await
            .expect("minion");
    }
    fleet
}

async fn sync(fleet: &TestFleet) {
    eventually("the master applies", Duration::from_secs(20), || async {
        match fleet.master().await {
            Ok(master) => master.sync().await.is_ok(),
            Err(_) => false,
        }
    })
    .await
    .expect("sync");
}

/// The active rollout, else the last one, if the master answers.
async fn current_rollout(fleet: &TestFleet) -> Option<RolloutRecord> {
    fleet.master().await.ok()?.rollout().await.ok().flatten()
}

async fn rollout_ends(fleet: &TestFleet, commit: &str) -> RolloutRecord {
    let current = || current_rollout(fleet);
    let ended = eventually(
        &format!("the rollout of {commit} ends"),
        Duration::from_secs(60),
        || async {
            current()
                .await
                .is_some_and(|r| r.commit == commit && !r.status.active())
        },
    )
    .await;
    let last = current().await;
    ended.unwrap_or_else(|err| panic!("{err}: {last:#?}"));
    last.expect("a rollout")
}

async fn versions(fleet: &TestFleet) -> BTreeMap<String, Value> {
    let client = fleet.client().await.expect("client");
    let request = CallRequest::parse_function("greeter.hello", Value::Null, Duration::from_secs(3))
        .expect("request");
    let report = client.call(&CallTarget::All, &request).await.expect("call");
    report
        .replies
        .into_iter()
        .map(|r| (r.minion, r.result.unwrap_or(Value::Null)))
        .collect()
}

/// Who loaded (or replaced to) greeter `version`, from the minions' events.
fn loaded(events: &[Value], version: &str) -> Vec<String> {
    let mut who: Vec<String> = events
        .iter()
        .filter(|e| {
            e["type"].as_str().is_some_and(|kind| {
                kind.ends_with(".service.loaded") || kind.ends_with(".service.replaced")
            })
        })
        .filter(|e| e["data"]["version"] == version)
        .filter_map(|e| e["subject"].as_str().map(str::to_owned))
        .collect();
    who.sort();
    who
}

/// A fleet following `repo`, every minion converged on its first commit
/// (version 1), and that commit.
async fn fleet_on_first_commit(repo: &GitRepo) -> (TestFleet, String) {
    let first = commit(repo, "1", true, 0);
    let fleet = fleet_following(repo).await;
    sync(&fleet).await;
    eventually("all on 1", Duration::from_secs(20), || {
        fleet.converged_on(&first, MINIONS)
    })
    .await
    .expect("converged");
    (fleet, first)
}

/// Every event from now on, as it comes.
async fn record_events(fleet: &TestFleet) -> std::sync::Arc<std::sync::Mutex<Vec<Value>>> {
    let nats = fleet.connect().await.expect("nats");
    let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let subscription = nats
        .subscribe(format!("{}.event.>", fleet.subjects().prefix()))
        .await
        .expect("subscribe");
    tokio::spawn(collect_events(subscription, events.clone()));
    events
}

async fn collect_events(
    mut events: async_nats::Subscriber,
    sink: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
) {
    while let Some(message) = events.next().await {
        if let Ok(event) = serde_json::from_slice::<Value>(&message.payload) {
            sink.lock().expect("events").push(event);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_canary_is_rolled_back_and_the_rest_never_runs_the_bad_digest() {
    let repo = GitRepo::init().expect("repo");
    let (fleet, _) = fleet_on_first_commit(&repo).await;
    let events = record_events(&fleet).await;

    // A good commit goes out: a canary, then the rest, each gated.
    let second = commit(&repo, "2", true, 0);
    sync(&fleet).await;
    let rollout = rollout_ends(&fleet, &second).await;
    assert_eq!(rollout.status, RolloutStatus::Done, "{rollout:#?}");
    assert_eq!(rollout.stages.len(), 2);
    assert_eq!(rollout.stages[0].name, "canary");
    assert_eq!(rollout.stages[0].len(), 1);
    assert_eq!(rollout.stages[1].len(), MINIONS - 1);
    assert!(
        rollout
            .stages
            .iter()
            .all(|s| s.results.values().all(|o| o.ok))
    );
    eventually("all on 2", Duration::from_secs(20), || {
        fleet.converged_on(&second, MINIONS)
    })
    .await
    .expect("converged");

    // A commit whose health check fails on the canary is rolled back.
    let third = commit(&repo, "3", false, 0);
    sync(&fleet).await;
    let rollout = rollout_ends(&fleet, &third).await;
    assert_eq!(rollout.status, RolloutStatus::RolledBack, "{rollout:#?}");
    let reason = rollout.reason.clone().unwrap_or_default();
    assert!(reason.contains("unhealthy on purpose"), "{reason}");
    let canary3 = rollout.stages[0]
        .minions()
        .next()
        .expect("canary")
        .to_string();
    eventually(
        "every minion back on 2",
        Duration::from_secs(20),
        || async {
            versions(&fleet).await.values().all(|v| v == "2")
                && versions(&fleet).await.len() == MINIONS
        },
    )
    .await
    .expect("back on 2");
    let seen = events.lock().expect("events").clone();
    assert_eq!(
        loaded(&seen, "3"),
        vec![canary3.clone()],
        "only the canary ran 3"
    );
    assert_eq!(
        loaded(&seen, "2").len(),
        MINIONS + 1,
        "all took 2, the canary twice"
    );
    assert!(
        seen.iter().any(|e| e["type"]
            .as_str()
            .is_some_and(|k| k.ends_with(".rollout.rolled_back"))),
        "the rollback is an event"
    );
    let status = fleet
        .master()
        .await
        .expect("master")
        .status()
        .await
        .expect("status");
    assert_eq!(status.applied.map(|a| a.commit), Some(second.clone()));
    assert_eq!(status.rejected, Some(third.clone()));
    fleet.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_master_resumes_the_rollout_at_the_same_stage() {
    let repo = GitRepo::init().expect("repo");
    let (mut fleet, _) = fleet_on_first_commit(&repo).await;
    let events = record_events(&fleet).await;
    let following = [
        "--repository".as_ref(),
        repo.path().as_os_str(),
        "--poll-interval-s".as_ref(),
        "3600".as_ref(),
    ];
    let mut master = fleet
        .spawn_master_process(provis(), &following)
        .await
        .expect("master process");

    // Eight seconds between the canary and the rest: the master is killed
    // there, as a crashed machine would be, and another takes the lease.
    let second = commit(&repo, "2", true, 8);
    sync(&fleet).await;
    eventually("the canary passes", Duration::from_secs(30), || async {
        current_rollout(&fleet)
            .await
            .is_some_and(|r| r.commit == second && r.stage == 1)
    })
    .await
    .expect("canary passed");
    master.kill();
    let _successor = fleet
        .spawn_another_master(provis(), "successor", &following)
        .await
        .expect("successor");
    let rollout = rollout_ends(&fleet, &second).await;
    assert_eq!(rollout.status, RolloutStatus::Done, "{rollout:#?}");
    eventually("all on 2", Duration::from_secs(20), || {
        fleet.converged_on(&second, MINIONS)
    })
    .await
    .expect("converged");
    let seen = events.lock().expect("events").clone();
    let switched = loaded(&seen, "2");
    let mut once = switched.clone();
    once.dedup();
    assert_eq!(switched, once, "no minion switched twice: {switched:?}");
    assert_eq!(switched.len(), MINIONS, "none skipped: {switched:?}");
    fleet.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_that_cannot_be_fetched_is_failed_with_its_reason_until_it_can() {
    let repo = GitRepo::init().expect("repo");
    let (mut fleet, first) = fleet_on_first_commit(&repo).await;
    // The bundle goes missing from the object store; a new minion, with
    // nothing cached, cannot fetch it.
    let js = async_nats::jetstream::new(fleet.connect().await.expect("nats"));
    let store = provis_bundle::BundleStore::open(&js).await.expect("store");
    let pointer: provis_bundle::ServicePointer = serde_json::from_slice(
        &store
            .pointers()
            .get("greeter")
            .await
            .expect("get")
            .expect("pointer"),
    )
    .expect("pointer");
    let bundle = store.fetch(&pointer.digest).await.expect("bundle");
    let objects = js
        .get_object_store(provis_core::storage::BUCKET_BUNDLES)
        .await
        .expect("objects");
    objects.delete(&pointer.digest).await.expect("delete");
    fleet.add_minion("m9", &["web"]).await.expect("m9");
    let m9_failed = || async {
        let status = fleet.master().await.ok()?.status().await.ok()?;
        status
            .minions
            .into_iter()
            .find(|m| m.minion.as_str() == "m9" && !m.failed.is_empty())
    };
    eventually(
        "m9 is failed with a reason",
        Duration::from_secs(20),
        || async { m9_failed().await.is_some() },
    )
    .await
    .expect("failed");
    let failed = m9_failed().await;
    let failed = failed.expect("m9");
    assert!(!failed.converged);
    assert!(failed.failed.contains_key("greeter"), "{failed:?}");
    assert!(!fleet.converged_on(&first, MINIONS + 1).await);
    // Back in the store: the retries (with backoff) find it.
    store
        .overwrite_bytes_for_test(&pointer.digest, &bundle.bytes)
        .await
        .expect("put back");
    eventually("m9 converges", Duration::from_secs(30), || {
        fleet.converged_on(&first, MINIONS + 1)
    })
    .await
    .expect("converged");
    // A restart loads it from the disk cache, with the store empty again.
    objects.delete(&pointer.digest).await.expect("delete");
    fleet.stop_minion("m9").await;
    fleet.add_minion("m9", &["web"]).await.expect("m9 again");
    eventually(
        "m9 runs greeter from its cache",
        Duration::from_secs(20),
        || async { versions(&fleet).await.get("m9") == Some(&Value::from("1")) },
    )
    .await
    .expect("cached");
    fleet.shut_down().await;
}

fn provis() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_BIN_EXE_provis"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provis_plan_says_what_a_revision_would_change_and_exits_0_2_or_1() {
    let repo = GitRepo::init().expect("repo");
    let (fleet, first) = fleet_on_first_commit(&repo).await;
    let plan = |args: &[&str]| {
        provis_testkit::run_to_end(fleet.provis_command(provis()).arg("plan").args(args))
            .expect("plan")
    };
    let (code, stdout, stderr) = plan(&[]);
    assert_eq!(
        code, 0,
        "the head is applied: nothing changes: {stdout}{stderr}"
    );
    assert!(stdout.contains("no change"), "{stdout}");

    // A new version, committed but not applied.
    let second = commit(&repo, "2", true, 0);
    let (code, stdout, _) = plan(&[]);
    assert_eq!(code, 2, "{stdout}");
    assert!(stdout.contains("~ greeter"), "{stdout}");
    assert!(
        stdout.contains(&format!("minions ({MINIONS} would change)")),
        "{stdout}"
    );
    let (code, stdout, _) = plan(&["--output", "json"]);
    assert_eq!(code, 2);
    let answer: Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(answer["commit"], second.as_str());
    assert_eq!(answer["current"], first.as_str());
    assert_eq!(answer["services"][0]["change"], "replaced");
    assert_eq!(
        answer["minions"][0]["minions"].as_array().map(Vec::len),
        Some(MINIONS)
    );
    // An older revision by id: what is applied.
    let (code, stdout, _) = plan(&[&first[..10]]);
    assert_eq!(code, 0, "{stdout}");
    // Nothing was applied by planning.
    assert_eq!(fleet.applied_commit().await, Some(first.clone()));

    // A broken commit: every problem, exit 1.
    repo.commit(
        "broken",
        &[
            ("services/greeter/main.js", "export function hello( {\n"),
            ("rollout.toml", "[[stages]]\npercent = 150\n"),
        ],
    )
    .expect("broken");
    let (code, stdout, _) = plan(&[]);
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("services/greeter"), "{stdout}");
    assert!(stdout.contains("rollout.toml"), "{stdout}");
    let (code, _, stderr) = plan(&["no-such-revision"]);
    assert_eq!(code, 2, "an unknown revision is a usage error: {stderr}");
    fleet.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minion_offline_during_a_rollout_takes_the_commit_and_is_gated_when_it_returns() {
    let repo = GitRepo::init().expect("repo");
    let (mut fleet, _) = fleet_on_first_commit(&repo).await;
    fleet.stop_minion("m4").await;
    fleet.wait_until_away("m4").await.expect("away");
    let second = commit(&repo, "2", true, 0);
    sync(&fleet).await;
    let rollout = rollout_ends(&fleet, &second).await;
    assert_eq!(rollout.status, RolloutStatus::Done, "{rollout:#?}");
    assert!(rollout.staged("m4"), "an offline minion is planned too");
    assert!(
        rollout.stages.iter().all(|s| !s.results.contains_key("m4")),
        "and not gated while away"
    );
    assert_ne!(
        rollout.stages[0].minions().next().map(|m| m.as_str()),
        Some("m4"),
        "an offline minion is never the canary"
    );

    fleet.add_minion("m4", &["web"]).await.expect("m4 back");
    eventually(
        "m4 is gated on its return",
        Duration::from_secs(30),
        || async {
            current_rollout(&fleet)
                .await
                .is_some_and(|r| r.late.get("m4").is_some_and(|o| o.ok))
        },
    )
    .await
    .expect("gated");
    assert_eq!(versions(&fleet).await.get("m4"), Some(&Value::from("2")));
    eventually("all on 2", Duration::from_secs(20), || {
        fleet.converged_on(&second, MINIONS)
    })
    .await
    .expect("converged");
    fleet.shut_down().await;
}
