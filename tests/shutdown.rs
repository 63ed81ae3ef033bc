//! End-to-end: orderly shutdown. A minion told to stop in the middle of a
//! fan-out answers every call it took; a master told to stop in the middle
//! of an apply finishes it, or leaves it for its next start, which applies
//! it once. Both exit 0, and their logs in a file carry no colour codes.
#![cfg(test)]

use std::path::Path;
use std::time::Duration;

use provis_core::master_api::SyncOutcome;
use provis_core::{CallRequest, CallTarget, readiness};
use provis_testkit::{GitRepo, TestFleet, eventually};
use serde_json::Value;

fn provis() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_provis"))
}

/// How long the `slow.work` method keeps a minion busy.
const WORK_MS: u64 = 1_500;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_during_a_fan_out_still_answers_every_call_in_flight() {
    let mut fleet = TestFleet::start().await.expect("fleet");
    let repo = fleet.workdir().join("repo");
    provis_testkit::write_slow_service(&repo, WORK_MS).expect("repository");
    fleet.apply(&repo).await.expect("apply");
    let ids = ["m1", "m2", "m3"];
    for id in ids {
        fleet
            .add_minion_process(provis(), id, &["web"])
            .await
            .expect("minion");
    }
    let client = fleet.client().await.expect("client");
    let expected = ids
        .iter()
        .map(|id| {
            let services = [("slow".to_owned(), None)].into();
            (id.parse().expect("id"), services)
        })
        .collect();
    eventually("every minion runs slow", Duration::from_secs(20), || {
        readiness::services_run(&client, &expected)
    })
    .await
    .expect("loaded");

    let request = CallRequest::parse_function("slow.work", Value::Null, Duration::from_secs(10))
        .expect("request");
    let call = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .call(&CallTarget::Role("web".parse().expect("role")), &request)
                .await
        })
    };
    // Every minion has taken the call and is busy with it.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let pids: Vec<u32> = ids
        .iter()
        .map(|id| fleet.process_mut(id).expect("process").pid())
        .collect();
    for pid in pids {
        provis_testkit::terminate(pid).expect("SIGTERM");
    }
    let report = call.await.expect("task").expect("call");
    assert!(report.all_ok(), "every call in flight answered: {report:?}");
    assert_eq!(report.summary.ok, 3);
    assert!(
        report
            .replies
            .iter()
            .all(|reply| reply.result == Some(Value::from("done")))
    );
    for id in ids {
        let process = fleet.process_mut(id).expect("process");
        let status = process
            .terminate(Duration::from_secs(20))
            .expect("the minion ends");
        assert!(
            status.success(),
            "{id} exits 0: {status:?}\n{}",
            process.log()
        );
        let log = process.log();
        assert!(log.contains("minion stopping"), "{log}");
        assert!(log.contains("minion stopped"), "{log}");
        assert!(
            !log.contains('\u{1b}'),
            "no colour codes in a log file: {log}"
        );
    }
    // They left the fleet saying so: stopped, not silent.
    let master = fleet.master().await.expect("master");
    let minions = master.minions().await.expect("minions");
    assert!(
        minions
            .iter()
            .all(|m| m.record.status == provis_core::registry::MinionStatus::Stopped),
        "{minions:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_during_an_apply_finishes_it_or_the_next_start_applies_it_once() {
    let repo = GitRepo::init().expect("repo");
    repo.commit_services(2, "1").expect("commit");
    let mut fleet = TestFleet::start().await.expect("fleet");
    let repository = repo.path_string();
    let extra = [
        "--repository".as_ref(),
        repository.as_ref(),
        "--poll-interval-s".as_ref(),
        "3600".as_ref(),
    ];
    let mut master = fleet
        .spawn_master_process(provis(), &extra)
        .await
        .expect("master");
    let first = repo.head().expect("head");
    applied(&fleet, &first).await;
    let client = fleet.master().await.expect("master client");

    // A commit with many bundles, a sync, and a SIGTERM while it applies.
    let head = repo.commit_services(24, "2").expect("commit");
    let sync = {
        let client = client.clone();
        tokio::spawn(async move { client.sync().await })
    };
    tokio::time::sleep(Duration::from_millis(30)).await;
    let status = master
        .terminate(Duration::from_secs(40))
        .expect("the master ends");
    assert!(status.success(), "exits 0: {status:?}\n{}", master.log());
    assert!(
        !master.log().contains('\u{1b}'),
        "no colour codes in a log file"
    );
    let finished = match sync.await.expect("task") {
        Ok(answer) => answer.outcome == SyncOutcome::Applied,
        // Stopped before it began: the master said so.
        Err(err) => {
            eprintln!("the sync did not run before the stop: {err}");
            false
        }
    };
    let log = master.log();
    let stopped_first = log
        .find("master stopping")
        .zip(log.find(&format!("config applied commit={head}")))
        .is_some_and(|(stopping, applied)| stopping < applied);
    eprintln!(
        "apply finished before the master exited: {finished}; the stop came while it ran: {stopped_first}"
    );

    // The next start completes whatever was left, once.
    let _master = fleet
        .spawn_master_process(provis(), &extra)
        .await
        .expect("master again");
    applied(&fleet, &head).await;
    let applied = fleet
        .applied_events(provis(), &head)
        .expect("provis events");
    assert_eq!(applied.len(), 1, "applied once: {applied:?}");
    assert_eq!(
        applied[0]["data"]["changes"]["services_changed"]
            .as_array()
            .map(Vec::len),
        Some(24),
        "{applied:?}"
    );
}

/// Waits until the master has applied `commit`.
async fn applied(fleet: &TestFleet, commit: &str) {
    eventually(
        &format!("{commit} is applied"),
        Duration::from_secs(20),
        || async { fleet.applied_commit().await.as_deref() == Some(commit) },
    )
    .await
    .expect("applied");
}
