//! End-to-end: several masters. All answer reads and admit connections;
//! one leads (the lease in `provis_leader`) and does the writing; when it
//! stops or dies another leads within seconds and finishes what was left,
//! once. With every master down the fleet keeps answering on the
//! connections it has.
#![cfg(test)]

use std::path::Path;
use std::time::{Duration, Instant};

use provis_core::{CallRequest, CallTarget};
use provis_testkit::{GitRepo, TestFleet, eventually, run_to_end};
use serde_json::Value;

fn provis() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_provis"))
}

/// The id of the master that leads now, per `provis status`'s source.
async fn leader(fleet: &TestFleet) -> Option<String> {
    let status = fleet.master().await.ok()?.status().await.ok()?;
    let leaders: Vec<_> = status.masters.iter().filter(|m| m.leading).collect();
    (leaders.len() == 1).then(|| leaders[0].id.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn masters_elect_one_leader_and_another_leads_when_it_stops() {
    let repo = GitRepo::init().expect("repo");
    repo.commit_services(1, "1").expect("commit");
    let source = repo.path_string();
    let mut fleet = TestFleet::start_with(|config| {
        config.repository = Some(source);
        config.poll_interval_s = 3600;
        config.master_id = Some("first".into());
    })
    .await
    .expect("fleet");
    fleet.add_minion("m1", &["web"]).await.expect("m1");
    let second = fleet
        .start_another_master("second")
        .await
        .expect("a second master");
    eventually(
        "both masters run, one leads",
        Duration::from_secs(10),
        || async {
            let Ok(master) = fleet.master().await else {
                return false;
            };
            master.status().await.is_ok_and(|status| {
                status.masters.len() == 2
                    && status.masters.iter().filter(|m| m.leading).count() == 1
            })
        },
    )
    .await
    .expect("one leader of two");
    assert_eq!(leader(&fleet).await.as_deref(), Some("first"));
    // `provis status` says who runs and who leads.
    let (code, stdout, stderr) =
        run_to_end(fleet.provis_command(provis()).arg("status")).expect("status");
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("first") && stdout.contains("leads"),
        "{stdout}"
    );
    assert!(stdout.contains("second"), "{stdout}");

    let stopped = Instant::now();
    fleet.stop_master().await;
    eventually(
        "the second master leads",
        Duration::from_secs(5),
        || async { leader(&fleet).await.as_deref() == Some("second") },
    )
    .await
    .expect("a new leader within 5 s");
    eprintln!(
        "the lease moved {:?} after the leader stopped",
        stopped.elapsed()
    );

    // The new leader writes: a commit reaches the minion through it.
    let head = repo.commit_services(1, "2").expect("commit");
    fleet
        .master()
        .await
        .expect("master")
        .sync()
        .await
        .expect("the new leader syncs");
    eventually(
        "m1 converges through the new leader",
        Duration::from_secs(20),
        || fleet.converged_on(&head, 1),
    )
    .await
    .expect("converged");
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_killed_during_an_apply_hands_over_within_5_s_and_it_completes_once() {
    let repo = GitRepo::init().expect("repo");
    repo.commit_services(2, "1").expect("commit");
    let mut fleet = TestFleet::start().await.expect("fleet");
    fleet.stop_master().await;
    let source = repo.path_string();
    let extra = [
        "--repository".as_ref(),
        source.as_ref(),
        "--poll-interval-s".as_ref(),
        "3600".as_ref(),
    ];
    let mut alpha = fleet
        .spawn_another_master(provis(), "alpha", &extra)
        .await
        .expect("alpha");
    let mut beta = fleet
        .spawn_another_master(provis(), "beta", &extra)
        .await
        .expect("beta");
    fleet.add_minion("m1", &["web"]).await.expect("m1");
    let first = repo.head().expect("head");
    eventually(
        "one of them applied the first commit",
        Duration::from_secs(20),
        || fleet.converged_on(&first, 1),
    )
    .await
    .expect("converged");
    let leading = leader(&fleet).await.expect("a leader");

    // A commit of many bundles, a sync, and the leader killed while it applies.
    let head = repo.commit_services(24, "2").expect("commit");
    let master = fleet.master().await.expect("master client");
    let sync = tokio::spawn(async move {
        master
            .request_within::<provis_core::master_api::SyncNow>(
                &Default::default(),
                Duration::from_secs(5),
            )
            .await
    });
    tokio::time::sleep(Duration::from_millis(30)).await;
    let (killed, survivor) = if leading == "alpha" {
        (&mut alpha, "beta")
    } else {
        (&mut beta, "alpha")
    };
    killed.kill();
    let died = Instant::now();
    eventually(
        &format!("{survivor} leads"),
        Duration::from_secs(5),
        || async { leader(&fleet).await.as_deref() == Some(survivor) },
    )
    .await
    .expect("a new leader within 5 s of the old one's death");
    eprintln!("{survivor} led {:?} after {leading} died", died.elapsed());
    // The sync asked of the dead leader may have gone with it.
    let _ = sync.await;
    eventually("the apply completes", Duration::from_secs(30), || {
        fleet.converged_on(&head, 1)
    })
    .await
    .expect("the new leader finishes the apply");
    let applied = fleet
        .applied_events(provis(), &head)
        .expect("provis events")
        .len();
    // Once: by the new leader, or by the dead one before it died (whose
    // event then waits in its outbox on disk until it starts again).
    assert!(applied <= 1, "applied {applied} times");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_master_down_the_fleet_answers_and_one_back_admits_new_minions() {
    let mut fleet = TestFleet::start_secured().await.expect("fleet");
    fleet.add_minion("m1", &["web"]).await.expect("m1");
    // Connected before the masters go: established connections stay.
    let client = fleet.client().await.expect("client");
    let token = fleet.enrollment_token().await.expect("token");
    fleet.stop_master().await;

    let ping = CallRequest::parse_function("sys.ping", Value::Null, Duration::from_secs(2))
        .expect("request");
    let report = client
        .call(&CallTarget::Minions(vec!["m1".parse().expect("id")]), &ping)
        .await
        .expect("call");
    assert!(report.all_ok(), "m1 answers with no master: {report:?}");

    // A new minion cannot be admitted while no master runs…
    let mut config = fleet.minion_config("m2", &["web"]).expect("config");
    config.enrollment_token = Some(token);
    let m2 = provis_minion::start(config).await.expect("m2 starts");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let registry = client.registry().await.expect("registry");
    assert!(
        !provis_core::readiness::minions_live(&registry, &["m2".parse().expect("id")])
            .await
            .expect("registry read"),
        "no master, no admission"
    );
    // …and is, once one is back.
    fleet.restart_master().await.expect("a master again");
    fleet.wait_live(&["m2"]).await.expect("m2 is admitted");
    let report = client
        .call(&CallTarget::Minions(vec!["m2".parse().expect("id")]), &ping)
        .await
        .expect("call");
    assert!(report.all_ok(), "{report:?}");
    m2.stop().await;
}
