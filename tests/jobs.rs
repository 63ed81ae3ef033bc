//! End-to-end: every call is a job in `PROVIS_JOBS`. `provis job ID` shows
//! each minion's result after the caller has gone and after the master
//! restarted; `provis jobs` lists calls by caller and function.
#![cfg(test)]

use std::path::Path;

use provis_testkit::{TestFleet, run_to_end};
use serde_json::Value;

fn provis() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_provis"))
}

/// The job id at the end of `provis call`'s summary line.
fn job_of(stdout: &str) -> String {
    stdout
        .lines()
        .rev()
        .find_map(|line| line.split("; job ").nth(1))
        .map(|id| id.trim().to_owned())
        .unwrap_or_else(|| panic!("no job in {stdout}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_s_results_outlive_its_caller_and_a_master_restart() {
    let mut fleet = TestFleet::start().await.expect("fleet");
    for id in ["m1", "m2", "m3"] {
        fleet.add_minion(id, &["web"]).await.expect("minion");
    }
    let (code, stdout, stderr) = run_to_end(fleet.provis_command(provis()).args([
        "call",
        "--subject",
        "role.web",
        "sys.ping",
        r#"{"n": 7}"#,
    ]))
    .expect("call");
    assert_eq!(code, 0, "{stdout}{stderr}");
    let job = job_of(&stdout);

    // The caller has gone; the master restarts; the job is still there.
    fleet.restart_master().await.expect("restart");
    let (code, stdout, stderr) =
        run_to_end(fleet.provis_command(provis()).args(["job", &job, "--json"])).expect("job");
    assert_eq!(code, 0, "{stdout}{stderr}");
    let recorded: Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(recorded["request"]["function"], "sys.ping");
    assert_eq!(recorded["request"]["target"], "role.web");
    assert_eq!(
        recorded["request"]["selected"].as_array().map(Vec::len),
        Some(3)
    );
    assert!(
        recorded["request"]["args_digest"]
            .as_str()
            .is_some_and(|d| d.starts_with("sha256:"))
    );
    for id in ["m1", "m2", "m3"] {
        let result = &recorded["results"][id];
        assert_eq!(result["status"], "ok", "{id}: {recorded}");
        assert_eq!(result["result"]["echo"]["n"], 7, "{id}: {recorded}");
    }
    assert_eq!(recorded["summary"]["ok"], 3);

    // A call with an error shows it, and the listing filters by function.
    let (code, stdout, _) = run_to_end(fleet.provis_command(provis()).args([
        "call",
        "--minion",
        "m2",
        "nosuch.method",
    ]))
    .expect("failing call");
    assert_eq!(code, 1, "{stdout}");
    let failed = job_of(&stdout);
    let (code, stdout, _) =
        run_to_end(fleet.provis_command(provis()).args(["job", &failed])).expect("job");
    assert_eq!(code, 1, "a job with an error exits 1: {stdout}");
    assert!(
        stdout.contains("m2") && stdout.contains("error"),
        "{stdout}"
    );
    let (code, stdout, stderr) =
        run_to_end(
            fleet
                .provis_command(provis())
                .args(["jobs", "--function", "sys.*"]),
        )
        .expect("jobs");
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains(&job), "{stdout}");
    assert!(!stdout.contains(&failed), "filtered out: {stdout}");

    // Bad input: an id that cannot be a job, and one never recorded.
    let (code, _, stderr) =
        run_to_end(fleet.provis_command(provis()).args(["job", "not.a.job"])).expect("bad id");
    assert_ne!(code, 0);
    assert!(stderr.contains("not a job id"), "{stderr}");
    let (code, _, stderr) = run_to_end(
        fleet
            .provis_command(provis())
            .args(["job", "0b1c6f1e-58f4-4a3b-9b61-1f7a2b3c4d5e"]),
    )
    .expect("unknown id");
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("no job"), "{stderr}");
    fleet.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_call_reaches_a_minion_that_comes_back_and_its_result_joins_the_job() {
    let mut fleet = TestFleet::start().await.expect("fleet");
    for id in ["m1", "m2", "m3"] {
        fleet.add_minion(id, &["web"]).await.expect("minion");
    }
    fleet.stop_minion("m3").await;
    fleet.wait_until_away("m3").await.expect("away");
    let (code, stdout, stderr) = run_to_end(fleet.provis_command(provis()).args([
        "call",
        "--subject",
        "role.web",
        "--queue",
        "10m",
        "--timeout",
        "2s",
        "sys.ping",
        r#"{"queued": true}"#,
    ]))
    .expect("call");
    assert_eq!(code, 0, "the live ones answer: {stdout}{stderr}");
    let job = job_of(&stdout);

    // Someone follows the job from another shell while m3 is away.
    let follower = fleet
        .provis_command(provis())
        .args(["job", &job, "--follow"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("follower");
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;

    fleet.add_minion("m3", &["web"]).await.expect("m3 back");
    let job_json = || {
        let (_, stdout, _) =
            run_to_end(fleet.provis_command(provis()).args(["job", &job, "--json"])).expect("job");
        serde_json::from_str::<Value>(&stdout).unwrap_or(Value::Null)
    };
    provis_testkit::eventually(
        "m3's result joins the job",
        std::time::Duration::from_secs(30),
        || async { job_json()["results"]["m3"]["status"] == "ok" },
    )
    .await
    .expect("delivered");
    let recorded = job_json();
    assert_eq!(recorded["results"]["m3"]["result"]["echo"]["queued"], true);
    assert_eq!(recorded["results"].as_object().map(|r| r.len()), Some(3));
    let (code, _, _) = run_to_end(fleet.provis_command(provis()).args(["job", &job])).expect("job");
    assert_eq!(code, 0, "every member answered in the end");
    let followed = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        tokio::task::spawn_blocking(move || follower.wait_with_output()),
    )
    .await
    .expect("the follower ends once every member answered")
    .expect("join")
    .expect("output");
    let printed = String::from_utf8_lossy(&followed.stdout);
    assert!(followed.status.success(), "{printed}");
    assert!(
        printed
            .lines()
            .any(|l| l.starts_with("m3") && l.contains("ok")),
        "m3's result printed as it came: {printed}"
    );

    // Bad input: a queue longer than a call may live is refused up front.
    let (code, _, stderr) = run_to_end(
        fleet
            .provis_command(provis())
            .args(["call", "--all", "--queue", "2h", "sys.ping"]),
    )
    .expect("call");
    assert_eq!(code, 2, "{stderr}");
    fleet.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_call_goes_on_after_its_caller_and_its_master_are_killed() {
    let mut fleet = TestFleet::start().await.expect("fleet");
    let minions = ["m1", "m2", "m3", "m4"];
    for id in minions {
        fleet.add_minion(id, &["web"]).await.expect("minion");
    }
    let mut master = fleet
        .spawn_master_process(provis(), &[])
        .await
        .expect("master process");
    let log = fleet.workdir().join("rolling-call.log");
    let mut command = fleet.provis_command(provis());
    command.args([
        "call",
        "--subject",
        "role.web",
        "--batch",
        "1",
        "--batch-wait",
        "2s",
        "sys.ping",
        r#"{"rolling": true}"#,
    ]);
    let mut caller =
        provis_testkit::ProvisProcess::spawn("rolling call", command, &log).expect("caller");
    let job_json = |job: &str| {
        let (_, stdout, _) =
            run_to_end(fleet.provis_command(provis()).args(["job", job, "--json"])).expect("job");
        serde_json::from_str::<Value>(&stdout).unwrap_or(Value::Null)
    };
    let mut job = String::new();
    provis_testkit::eventually(
        "the caller names the job",
        std::time::Duration::from_secs(10),
        || {
            job = caller
                .log()
                .split("as job ")
                .nth(1)
                .and_then(|rest| rest.split(':').next())
                .unwrap_or_default()
                .to_owned();
            let named = !job.is_empty();
            async move { named }
        },
    )
    .await
    .expect("job id");
    provis_testkit::eventually(
        "the first batch ends",
        std::time::Duration::from_secs(15),
        || async { job_json(&job)["batch_ends"]["0"].is_object() },
    )
    .await
    .expect("first batch");

    // The caller and then its master vanish mid-call; another master
    // takes the lease and resumes the call at the batch it had reached.
    caller.kill();
    master.kill();
    let _successor = fleet
        .spawn_another_master(provis(), "successor", &[])
        .await
        .expect("successor");
    let (code, stdout, stderr) = run_to_end(
        fleet
            .provis_command(provis())
            .args(["job", &job, "--follow", "--json"]),
    )
    .expect("follow");
    assert_eq!(code, 0, "{stdout}{stderr}");
    let recorded: Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(recorded["summary"]["batches"], 4, "{recorded}");
    assert_eq!(recorded["summary"]["ok"], 4, "{recorded}");
    let ends = recorded["batch_ends"].as_object().expect("batch ends");
    let mut called: Vec<&str> = ends
        .values()
        .flat_map(|end| end["replies"].as_array().into_iter().flatten())
        .map(|reply| {
            assert_eq!(reply["status"], "ok", "called once, answered: {recorded}");
            reply["minion"].as_str().unwrap_or_default()
        })
        .collect();
    called.sort_unstable();
    assert_eq!(called, minions, "each minion called once: {recorded}");
    for id in minions {
        assert_eq!(
            recorded["results"][id]["result"]["echo"]["rolling"], true,
            "{id}: {recorded}"
        );
    }

    // With no master to take it, a rolling call is refused with the reason.
    drop(_successor);
    let (code, _, stderr) = run_to_end(fleet.provis_command(provis()).args([
        "call",
        "--subject",
        "role.web",
        "--batch",
        "2",
        "sys.ping",
    ]))
    .expect("call");
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("master"), "{stderr}");
    fleet.shut_down().await;
}
