//! End-to-end: desired state from git. The master follows a real git
//! repository; commits apply, broken commits are rejected, reverts roll back,
//! roles and settings change on the fly.
#![cfg(test)]

use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use provis_core::{CallRequest, CallTarget};
use provis_testkit::{GitRepo, TestFleet, eventually, run_to_end};
use serde_json::{Value, json};

fn provis() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_provis"))
}

fn greeter(version: &str) -> String {
    format!("export function hello() {{ return '{version}' }}\n")
}

/// A valid repository: role web runs `greeter` (answering `version`); every
/// minion named m* is web; every debian machine with memory is also `db`.
fn good_commit(repo: &GitRepo, message: &str, version: &str) -> String {
    repo.commit(message, &[
        ("roles/web.toml", "services = [\"greeter\"]\n"),
        ("roles/db.toml", "services = []\n"),
        ("services/greeter/service.toml", &format!("name = \"greeter\"\nversion = \"{version}\"\n")),
        ("services/greeter/main.js", &greeter(version)),
        ("assignments.toml", "[[assign]]\nminions = \"m*\"\nroles = [\"web\"]\n\n[[rule]]\nwhen = 'facts.mem_total_mb > 0 && facts.cpus > 0'\nroles = [\"db\"]\n"),
        ("minions.toml", "[defaults]\nlabels = { env = \"test\" }\n"),
    ])
    .expect("commit")
}

async fn fleet_following(repo: &GitRepo) -> TestFleet {
    TestFleet::start_following(repo).await.expect("fleet")
}

fn sync(fleet: &TestFleet) -> Value {
    let (code, stdout, stderr) =
        run_to_end(fleet.provis_command(provis()).args(["master", "sync"])).expect("sync");
    let answer: Value =
        serde_json::from_str(&stdout).unwrap_or_else(|_| json!({ "code": code, "stderr": stderr }));
    answer
}

async fn hello(fleet: &TestFleet, minion: &str) -> Option<Value> {
    let client = fleet.client().await.ok()?;
    let request =
        CallRequest::parse_function("greeter.hello", Value::Null, Duration::from_secs(2)).ok()?;
    let report = client
        .call(&CallTarget::Minions(vec![minion.parse().ok()?]), &request)
        .await
        .ok()?;
    report.replies[0].result.clone()
}

async fn converged_on(fleet: &TestFleet, commit: &str) {
    eventually(
        &format!("every minion converged on {commit}"),
        Duration::from_secs(20),
        || fleet.converged_on(commit, 1),
    )
    .await
    .expect("converged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_apply_and_a_revert_rolls_back() {
    let repo = GitRepo::init().expect("repo");
    let first = good_commit(&repo, "greeter v1", "1");
    let mut fleet = fleet_following(&repo).await;
    let nats = fleet.nats().connect().await.expect("nats");
    let mut applied = nats
        .subscribe("provis.event.master.config.applied")
        .await
        .expect("subscribe");
    fleet.add_minion("m1", &[]).await.expect("m1");
    converged_on(&fleet, &first).await;
    assert_eq!(hello(&fleet, "m1").await, Some(json!("1")));

    // m1 took the roles git gives it: web by its name, db by its facts.
    let (_, stdout, _) = run_to_end(
        fleet
            .provis_command(provis())
            .args(["minions", "--output", "json"]),
    )
    .expect("minions");
    let minions: Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(minions[0]["roles"], json!(["db", "web"]));
    assert_eq!(
        minions[0]["facts"]["labels"]["env"], "test",
        "settings from minions.toml"
    );

    let second = good_commit(&repo, "greeter v2", "2");
    let answer = sync(&fleet);
    assert_eq!(
        (answer["commit"].as_str(), answer["outcome"].as_str()),
        (Some(second.as_str()), Some("applied")),
        "{answer}"
    );
    converged_on(&fleet, &second).await;
    assert_eq!(hello(&fleet, "m1").await, Some(json!("2")));

    repo.git(&["revert", "--no-edit", "HEAD"]).expect("revert");
    let reverted = repo.head().expect("head");
    sync(&fleet);
    converged_on(&fleet, &reverted).await;
    assert_eq!(
        hello(&fleet, "m1").await,
        Some(json!("1")),
        "a revert is a rollback"
    );

    let mut seen = Vec::new();
    while let Ok(Some(message)) = tokio::time::timeout(Duration::from_secs(2), applied.next()).await
    {
        let event: Value = serde_json::from_slice(&message.payload).expect("json");
        seen.push(
            event["data"]["commit"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
    }
    assert_eq!(
        seen,
        [first, second, reverted],
        "one config.applied per commit"
    );

    let (code, stdout, _) =
        run_to_end(fleet.provis_command(provis()).arg("status")).expect("status");
    assert_eq!(code, 0);
    assert!(stdout.contains("1 of 1 live minions converged"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_commit_is_rejected_with_every_reason_and_changes_nothing() {
    let repo = GitRepo::init().expect("repo");
    let good = good_commit(&repo, "good", "1");
    let mut fleet = fleet_following(&repo).await;
    fleet.add_minion("m1", &[]).await.expect("m1");
    converged_on(&fleet, &good).await;
    let nats = fleet.nats().connect().await.expect("nats");
    let mut rejected = nats
        .subscribe("provis.event.master.config.rejected")
        .await
        .expect("subscribe");

    let broken = repo
        .commit("four mistakes", &[
            ("services/greeter/main.js", "export function hello( { return 'broken' }\n"),
            ("services/extra/service.toml", "name = \"extra\"\nversion = \"1\"\n[capabilities]\nshell = true\n"),
            ("services/extra/main.js", "export function f() {}\n"),
            ("assignments.toml", "[[assign]]\nminions = \"m*\"\nroles = [\"web\", \"nosuchrole\"]\n\n[[rule]]\nwhen = 'facts.mem_total_mb >'\nroles = [\"db\"]\n"),
        ])
        .expect("commit");
    let answer = sync(&fleet);
    assert_eq!(answer["outcome"], "rejected", "{answer}");
    let event = tokio::time::timeout(Duration::from_secs(10), rejected.next())
        .await
        .expect("an event")
        .expect("message");
    let event: Value = serde_json::from_slice(&event.payload).expect("json");
    assert_eq!(event["data"]["commit"], broken);
    assert_eq!(event["data"]["keeping"], good);
    let problems: Vec<String> = event["data"]["problems"]
        .as_array()
        .expect("problems")
        .iter()
        .map(|p| format!("{}: {}", p["file"], p["reason"]))
        .collect();
    let all = problems.join("\n");
    for needle in [
        "services/greeter",
        "SyntaxError",
        "services/extra",
        "shell",
        "nosuchrole",
        "does not parse",
    ] {
        assert!(all.contains(needle), "{needle} missing from:\n{all}");
    }
    assert_eq!(
        hello(&fleet, "m1").await,
        Some(json!("1")),
        "the fleet keeps the last good state"
    );

    // Fixing it is just another commit.
    let fixed = good_commit(&repo, "fixed", "3");
    repo.remove("drop extra", "services/extra").expect("rm");
    let fixed_head = repo.head().expect("head");
    assert_ne!(fixed, fixed_head);
    sync(&fleet);
    converged_on(&fleet, &fixed_head).await;
    assert_eq!(hello(&fleet, "m1").await, Some(json!("3")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_change_on_the_fly_and_reset_to_git() {
    let repo = GitRepo::init().expect("repo");
    let commit = good_commit(&repo, "roles", "1");
    let mut fleet = fleet_following(&repo).await;
    fleet.add_minion("m1", &[]).await.expect("m1");
    fleet.add_minion("m2", &[]).await.expect("m2");
    converged_on(&fleet, &commit).await;
    let nats = fleet.nats().connect().await.expect("nats");
    let mut role_events = nats
        .subscribe("provis.event.master.role.>")
        .await
        .expect("subscribe");

    let role_members = |role: &'static str| {
        let fleet = &fleet;
        async move {
            let (_, stdout, _) = run_to_end(fleet.provis_command(provis()).args([
                "call",
                "--subject",
                role,
                "sys.ping",
                "--output",
                "json",
            ]))
            .expect("call");
            let report: Value = serde_json::from_str(&stdout).unwrap_or_default();
            report["replies"].as_array().map_or_else(Vec::new, |r| {
                r.iter()
                    .map(|r| r["minion"].as_str().unwrap_or_default().to_owned())
                    .collect::<Vec<_>>()
            })
        }
    };
    let (code, _, stderr) = run_to_end(
        fleet
            .provis_command(provis())
            .args(["role", "assign", "m1", "cache"]),
    )
    .expect("assign");
    assert_eq!(code, 0, "{stderr}");
    eventually(
        "m1 answers on role.cache",
        Duration::from_secs(10),
        || async { role_members("role.cache").await == ["m1"] },
    )
    .await
    .expect("assigned");
    let (_, table, _) = run_to_end(
        fleet
            .provis_command(provis())
            .args(["minions", "--output", "json"]),
    )
    .expect("minions");
    let table: Value = serde_json::from_str(&table).expect("json");
    assert_eq!(
        table[0]["overlay_roles"],
        json!(["cache"]),
        "the overlay shows in provis minions"
    );

    run_to_end(
        fleet
            .provis_command(provis())
            .args(["role", "unassign", "m2", "web"]),
    )
    .expect("unassign");
    eventually("role.web is only m1", Duration::from_secs(10), || async {
        role_members("role.web").await == ["m1"]
    })
    .await
    .expect("unassigned");

    run_to_end(fleet.provis_command(provis()).args(["role", "reset", "m1"])).expect("reset");
    run_to_end(fleet.provis_command(provis()).args(["role", "reset", "m2"])).expect("reset");
    eventually("back to git's roles", Duration::from_secs(10), || async {
        role_members("role.web").await == ["m1", "m2"]
            && role_members("role.cache").await.is_empty()
    })
    .await
    .expect("reset");
    let mut kinds = Vec::new();
    while let Ok(Some(message)) =
        tokio::time::timeout(Duration::from_secs(1), role_events.next()).await
    {
        kinds.push(message.subject.to_string());
    }
    assert_eq!(
        kinds,
        [
            "provis.event.master.role.assigned",
            "provis.event.master.role.unassigned",
            "provis.event.master.role.reset",
            "provis.event.master.role.reset"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_change_without_restart_and_a_master_restart_reapplies_nothing() {
    let repo = GitRepo::init().expect("repo");
    good_commit(&repo, "v1", "1");
    let mut fleet = fleet_following(&repo).await;
    fleet.add_minion("m1", &[]).await.expect("m1");
    let second = repo
        .commit(
            "prod labels",
            &[("minions.toml", "[defaults]\nlabels = { env = \"prod\" }\n")],
        )
        .expect("commit");
    sync(&fleet);
    converged_on(&fleet, &second).await;
    eventually(
        "m1's labels changed without a restart",
        Duration::from_secs(10),
        || async {
            let (_, stdout, _) = run_to_end(fleet.provis_command(provis()).args([
                "minions",
                "--where",
                "labels.env == 'prod'",
                "--output",
                "json",
            ]))
            .expect("minions");
            serde_json::from_str::<Value>(&stdout)
                .is_ok_and(|v| v.as_array().is_some_and(|a| a.len() == 1))
        },
    )
    .await
    .expect("labels");

    let nats = fleet.nats().connect().await.expect("nats");
    let mut events = nats
        .subscribe("provis.event.master.config.>")
        .await
        .expect("subscribe");
    fleet.restart_master().await.expect("restart");
    let answer = sync(&fleet);
    assert_eq!(answer["outcome"], "unchanged", "{answer}");
    converged_on(&fleet, &second).await;
    assert!(
        tokio::time::timeout(Duration::from_secs(2), events.next())
            .await
            .is_err(),
        "nothing re-applied after a restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_repository_or_a_force_push_keep_the_fleet_sane() {
    let repo = GitRepo::init().expect("repo");
    let first = good_commit(&repo, "v1", "1");
    let mut fleet = fleet_following(&repo).await;
    fleet.add_minion("m1", &[]).await.expect("m1");
    converged_on(&fleet, &first).await;
    let nats = fleet.nats().connect().await.expect("nats");
    let mut failed = nats
        .subscribe("provis.event.master.config.source_failed")
        .await
        .expect("subscribe");

    let hidden = repo.hide().expect("hide");
    let answer = sync(&fleet);
    assert!(
        answer["stderr"]
            .as_str()
            .unwrap_or_default()
            .contains("cannot fetch"),
        "{answer}"
    );
    let event = tokio::time::timeout(Duration::from_secs(10), failed.next())
        .await
        .expect("an event")
        .expect("message");
    let event: Value = serde_json::from_slice(&event.payload).expect("json");
    assert_eq!(event["data"]["keeping"], first);
    assert_eq!(
        hello(&fleet, "m1").await,
        Some(json!("1")),
        "the fleet keeps running"
    );
    repo.unhide(&hidden).expect("unhide");

    // A force-push: history rewritten, a new commit on top of the old base.
    good_commit(&repo, "v2, soon gone", "2");
    sync(&fleet);
    repo.git(&["reset", "--hard", "--quiet", &first])
        .expect("reset");
    let rewritten = good_commit(&repo, "v3 after a force-push", "3");
    sync(&fleet);
    converged_on(&fleet, &rewritten).await;
    assert_eq!(hello(&fleet, "m1").await, Some(json!("3")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_process_takes_up_its_settings_file_without_a_restart() {
    let repo = GitRepo::init().expect("repo");
    let commit = good_commit(&repo, "v1", "1");
    let mut fleet = TestFleet::start().await.expect("fleet");
    let settings = fleet.workdir().join("master.toml");
    std::fs::write(&settings, "poll_interval_s = 3600\n").expect("settings");
    let mut master = fleet
        .spawn_master_process(provis(), &["--config".as_ref(), settings.as_os_str()])
        .await
        .expect("master up");
    fleet.add_minion("m1", &[]).await.expect("m1");
    // Nothing to follow yet; then the file names the repository.
    std::fs::write(
        &settings,
        format!(
            "poll_interval_s = 3600\nrepository = {:?}\n",
            repo.path_string()
        ),
    )
    .expect("settings");
    converged_on(&fleet, &commit).await;
    assert!(
        master.log().contains("settings reloaded"),
        "{}",
        master.log()
    );
    assert!(master.is_running());
}
