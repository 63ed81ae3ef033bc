//! End-to-end: reactions from git. The leading master calls a restart on
//! the minion whose service failed to load, once per event, up to its rate
//! limit; its own calls never trigger it again; a broken reactions.toml is
//! rejected with the line of each problem.
#![cfg(test)]

use std::path::Path;
use std::time::Duration;

use futures::StreamExt as _;
use provis_testkit::{GitRepo, TestFleet, eventually, run_to_end};
use serde_json::{Value, json};

fn provis() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_provis"))
}

const METHODS: &str = "export function restart() { const n = (provis.state.get('restarts') ?? 0) + 1; provis.state.set('restarts', n); return n }\nexport function restarts() { return provis.state.get('restarts') ?? 0 }\n";

const REACTIONS: &str = r#"[[reaction]]
name = "restart-flaky"
on = "service.failed"
when = 'event.data.service == "flaky"'
call = "flaky.restart"
target = "source"
rate = { count = 2, per_s = 600 }

[[reaction]]
name = "echo-calls"
on = "job.started"
call = "sys.ping"
subject = "all"
rate = { count = 50, per_s = 60 }
"#;

/// A commit of `flaky` whose top-level code does `top` on minions (the
/// master's check runs it as minion `check`, where it does nothing).
fn commit(repo: &GitRepo, message: &str, top: &str, reactions: &str) -> String {
    let main = format!("if (provis.minion.id !== 'check') {{ {top} }}\n{METHODS}");
    repo.commit(
        message,
        &[
            ("roles/web.toml", "services = [\"flaky\"]\n"),
            (
                "services/flaky/service.toml",
                "name = \"flaky\"\nversion = \"1\"\n",
            ),
            ("services/flaky/main.js", &main),
            (
                "assignments.toml",
                "[[assign]]\nminions = \"m*\"\nroles = [\"web\"]\n",
            ),
            ("reactions.toml", reactions),
        ],
    )
    .expect("commit")
}

fn sync(fleet: &TestFleet) -> Value {
    let (code, stdout, stderr) =
        run_to_end(fleet.provis_command(provis()).args(["master", "sync"])).expect("sync");
    serde_json::from_str(&stdout).unwrap_or_else(|_| json!({ "code": code, "stderr": stderr }))
}

async fn restarts(fleet: &TestFleet) -> Value {
    let reply = fleet
        .call_one("m1", "flaky.restarts", Value::Null)
        .await
        .expect("call");
    reply.result.unwrap_or(Value::Null)
}

/// The next event on `events` whose subject ends with `suffix` (and, for
/// the reactor's events, of `reaction`).
async fn next_event(
    events: &mut async_nats::Subscriber,
    suffix: &str,
    reaction: Option<&str>,
) -> Value {
    tokio::time::timeout(Duration::from_secs(15), async {
        while let Some(message) = events.next().await {
            if !message.subject.ends_with(suffix) {
                continue;
            }
            let event: Value = serde_json::from_slice(&message.payload).expect("an event");
            if reaction.is_none_or(|name| event["data"]["reaction"] == name) {
                return event;
            }
        }
        panic!("events ended")
    })
    .await
    .unwrap_or_else(|_| panic!("no {suffix} event in time"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reaction_restarts_once_per_failure_up_to_its_rate_and_never_feeds_itself() {
    let repo = GitRepo::init().expect("git");
    let first = commit(&repo, "flaky that loads", "", REACTIONS);
    let mut fleet = TestFleet::start_following(&repo).await.expect("fleet");
    fleet
        .add_minion_process(provis(), "m1", &["web"])
        .await
        .expect("m1");
    sync(&fleet);
    eventually("m1 runs the first commit", Duration::from_secs(20), || {
        fleet.converged_on(&first, 1)
    })
    .await
    .expect("converged");
    let nats = fleet.nats().connect().await.expect("nats");
    let mut events = nats.subscribe("provis.event.>").await.expect("events");

    // Its own job events do not trigger it again: one call from here is
    // one echo, not a chain of them.
    assert_eq!(restarts(&fleet).await, json!(0));
    let ran = next_event(&mut events, "master.reaction.ran", None).await;
    assert_eq!(ran["data"]["reaction"], "echo-calls", "{ran}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut echoes = 0;
    while let Ok(Some(message)) =
        tokio::time::timeout(Duration::from_millis(100), events.next()).await
    {
        if message.subject.ends_with("reaction.ran") {
            echoes += 1;
        }
    }
    assert_eq!(echoes, 0, "the echo's own call echoed");

    // A release that fails to load on m1: one restart, on m1.
    commit(
        &repo,
        "broken 1",
        "throw new Error('broken release 1')",
        REACTIONS,
    );
    assert_eq!(sync(&fleet)["outcome"], "applied");
    let failed = next_event(&mut events, "m1.service.failed", None).await;
    let ran = next_event(&mut events, "master.reaction.ran", Some("restart-flaky")).await;
    assert_eq!(
        (
            ran["data"]["reaction"].as_str(),
            ran["data"]["event"].as_str(),
            ran["data"]["ok"].as_u64()
        ),
        (Some("restart-flaky"), failed["id"].as_str(), Some(1)),
        "{ran}"
    );
    assert!(
        ran["data"]["job"].as_str().is_some_and(|j| !j.is_empty()),
        "a job: {ran}"
    );
    // The same event delivered again runs nothing.
    nats.publish(
        failed_subject(&failed),
        serde_json::to_vec(&failed).expect("json").into(),
    )
    .await
    .expect("republish");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(restarts(&fleet).await, json!(1), "once per event");

    // Two more failures: the second restart, then the rate limit.
    commit(
        &repo,
        "broken 2",
        "throw new Error('broken release 2')",
        REACTIONS,
    );
    assert_eq!(sync(&fleet)["outcome"], "applied");
    next_event(&mut events, "master.reaction.ran", Some("restart-flaky")).await;
    commit(
        &repo,
        "broken 3",
        "throw new Error('broken release 3')",
        REACTIONS,
    );
    assert_eq!(sync(&fleet)["outcome"], "applied");
    let limited = next_event(
        &mut events,
        "master.reaction.limited",
        Some("restart-flaky"),
    )
    .await;
    assert_eq!(limited["data"]["reaction"], "restart-flaky", "{limited}");
    eventually("two restarts", Duration::from_secs(5), || async {
        restarts(&fleet).await == json!(2)
    })
    .await
    .expect("restarted twice");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(restarts(&fleet).await, json!(2), "the limit holds");

    // A broken reactions.toml: every problem, each with its line.
    let bad = "[[reaction]]\nname = \"bad-cel\"\non = \"service.failed\"\nwhen = 'event.data.service =='\ncall = \"flaky.restart\"\ntarget = \"source\"\n\n[[reaction]]\nname = \"no-such-function\"\non = \"service.failed\"\ncall = \"flaky.reboot\"\ntarget = \"source\"\n";
    commit(&repo, "broken reactions", "", bad);
    let answer = sync(&fleet);
    assert_eq!(answer["outcome"], "rejected", "{answer}");
    let problems = answer["problems"].to_string();
    assert!(problems.contains("reactions.toml"), "{answer}");
    assert!(
        problems.contains("line 4: reaction \\\"bad-cel\\\": when is not CEL"),
        "{answer}"
    );
    assert!(
        problems.contains("line 11: reaction \\\"no-such-function\\\": calls \\\"flaky.reboot\\\": flaky has no method \\\"reboot\\\""),
        "{answer}"
    );
}

/// Where an event like `event` is published: `provis.event.<source>.<kind>`.
fn failed_subject(event: &Value) -> String {
    let source = event["subject"].as_str().unwrap_or("m1");
    let kind = event["type"]
        .as_str()
        .and_then(|t| t.strip_prefix("io.provis."))
        .unwrap_or("service.failed");
    format!("provis.event.{source}.{kind}")
}
