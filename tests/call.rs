//! End-to-end: `provis call` and the minion's call path through a real
//! nats-server, with minions as real `provis` processes.
#![cfg(test)]

use std::path::Path;
use std::time::{Duration, Instant};

use prost::Message;
use provis_core::{CallRequest, CallTarget, ReplyStatus};
use provis_proto::v1::{CallReply, ErrorCode, call_reply};
use provis_testkit::{TestFleet, run_to_end};
use serde_json::Value;

fn provis() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_provis"))
}

/// Runs `provis call …` against the fleet; returns the exit code and the JSON report.
fn call_json(fleet: &TestFleet, args: &[&str]) -> (i32, Value) {
    let (code, stdout, stderr) = run_to_end(
        fleet
            .provis_command(provis())
            .arg("call")
            .args(args)
            .args(["--output", "json"]),
    )
    .expect("provis call runs");
    let report = serde_json::from_str(&stdout)
        .unwrap_or_else(|err| panic!("not JSON ({err}): {stdout}\nstderr: {stderr}"));
    (code, report)
}

fn minions_by_status(report: &Value) -> Vec<(String, String)> {
    report["replies"]
        .as_array()
        .expect("replies")
        .iter()
        .map(|r| {
            (
                r["minion"].as_str().unwrap_or_default().to_owned(),
                r["status"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_to_one_minion_gets_its_reply() {
    let mut fleet = TestFleet::start().await.expect("fleet");
    fleet
        .add_minion_process(provis(), "m1", &["web.eu"])
        .await
        .expect("m1");
    fleet
        .add_minion_process(provis(), "m2", &["db"])
        .await
        .expect("m2");

    let (code, report) = call_json(&fleet, &["--minion", "m1", "sys.ping", r#"{"n": 7}"#]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(minions_by_status(&report), [("m1".into(), "ok".into())]);
    assert_eq!(report["replies"][0]["result"]["minion"], "m1");
    assert_eq!(report["replies"][0]["result"]["echo"]["n"], 7);
    assert!(report["replies"][0]["ms"].as_f64().is_some());
    assert_eq!(
        report["summary"],
        serde_json::json!({"selected": 1, "ok": 1, "error": 0, "no_reply": 0})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_call_reaches_sub_role_members_and_no_one_else() {
    let mut fleet = TestFleet::start().await.expect("fleet");
    fleet
        .add_minion_process(provis(), "m1", &["web.eu"])
        .await
        .expect("m1");
    fleet
        .add_minion_process(provis(), "m2", &["db"])
        .await
        .expect("m2");
    fleet.add_minion("m3", &["webby"]).await.expect("m3");
    fleet.add_minion("m4", &["web"]).await.expect("m4");

    let (code, report) = call_json(&fleet, &["--subject", "role.web", "sys.facts"]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(
        minions_by_status(&report),
        [("m1".into(), "ok".into()), ("m4".into(), "ok".into())]
    );
    assert_eq!(
        report["replies"][0]["result"]["roles"],
        serde_json::json!(["web.eu"])
    );

    let (code, report) = call_json(&fleet, &["--all", "sys.ping"]);
    assert_eq!(code, 0);
    assert_eq!(report["summary"]["ok"], 4);

    let (code, report) = call_json(&fleet, &["--subject", "role.web.eu", "sys.ping"]);
    assert_eq!(code, 0);
    assert_eq!(minions_by_status(&report), [("m1".into(), "ok".into())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_minion_is_reported_as_no_reply_within_the_timeout() {
    let mut fleet = TestFleet::start().await.expect("fleet");
    fleet
        .add_minion_process(provis(), "m1", &["web"])
        .await
        .expect("m1");
    fleet
        .add_minion_process(provis(), "m2", &["web"])
        .await
        .expect("m2");
    fleet.process_mut("m2").expect("m2 process").kill();

    let started = Instant::now();
    let (code, report) = call_json(
        &fleet,
        &["--subject", "role.web", "--timeout", "1s", "sys.ping"],
    );
    let took = started.elapsed();
    assert_eq!(code, 1, "a missing reply fails the call: {report}");
    assert_eq!(
        minions_by_status(&report),
        [("m1".into(), "ok".into()), ("m2".into(), "no_reply".into())]
    );
    assert_eq!(report["summary"]["no_reply"], 1);
    assert!(took < Duration::from_secs(4), "the call waited {took:?}");

    // The table says the same to a person.
    let (code, stdout, _) = run_to_end(fleet.provis_command(provis()).args([
        "call",
        "--subject",
        "role.web",
        "--timeout",
        "500ms",
        "sys.ping",
    ]))
    .expect("provis call");
    assert_eq!(code, 1);
    assert!(stdout.contains("no_reply"), "{stdout}");
    assert!(
        stdout.contains("2 selected (role.web): 1 ok, 0 error, 1 no reply"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_envelopes_get_structured_errors_and_the_minion_keeps_serving() {
    let mut fleet = TestFleet::start().await.expect("fleet");
    fleet
        .add_minion_process(provis(), "m1", &["web"])
        .await
        .expect("m1");
    let nats = fleet.nats().connect().await.expect("nats");
    let subject = fleet.subjects().minion_call(&"m1".parse().expect("id"));
    let ask = |payload: Vec<u8>| {
        let nats = nats.clone();
        let subject = subject.clone();
        async move {
            let reply = tokio::time::timeout(
                Duration::from_secs(5),
                nats.request(subject, payload.into()),
            )
            .await
            .expect("a reply in time")
            .expect("a reply");
            CallReply::decode(reply.payload.as_ref()).expect("a CallReply")
        }
    };
    let code_of = |reply: &CallReply| match &reply.outcome {
        Some(call_reply::Outcome::Error(error)) => (
            ErrorCode::try_from(error.code).expect("code"),
            error.message.clone(),
        ),
        other => panic!("expected an error, got {other:?}"),
    };

    let mut refused = nats
        .subscribe("provis.event.m1.call.refused")
        .await
        .expect("subscribe");
    let garbage = ask(b"\xff\x00 certainly not protobuf".to_vec()).await;
    let event = tokio::time::timeout(
        Duration::from_secs(5),
        futures::StreamExt::next(&mut refused),
    )
    .await
    .expect("a call.refused event")
    .expect("message");
    let event: Value = serde_json::from_slice(&event.payload).expect("json");
    assert!(
        event["data"]["reason"]
            .as_str()
            .expect("reason")
            .contains("not a provis CallEnvelope"),
        "{event}"
    );
    assert_eq!(garbage.minion, "m1");
    assert_eq!(code_of(&garbage).0, ErrorCode::BadEnvelope);

    // A message with no reply subject cannot be answered; it must not hurt either.
    nats.publish(subject.clone(), "fire and forget".into())
        .await
        .expect("publish");

    let envelope = |function: &str| {
        CallRequest::parse_function(function, Value::Null, Duration::from_secs(5))
            .expect("function")
            .to_envelope("operator:test", &CallTarget::All)
    };
    let sent = envelope("nosuch.ping");
    let unknown = ask(sent.encode_to_vec()).await;
    let (code, message) = code_of(&unknown);
    assert_eq!(code, ErrorCode::UnknownService);
    assert!(message.contains("it runs: sys"), "{message}");
    assert_eq!(
        unknown.call_id, sent.call_id,
        "errors carry the call id back"
    );

    let (code, message) = code_of(&ask(envelope("sys.nosuch").encode_to_vec()).await);
    assert_eq!(code, ErrorCode::UnknownMethod);
    assert!(message.contains("ping, facts, services"), "{message}");

    let mut bad_args = envelope("sys.ping");
    bad_args.args_json = "{not json".into();
    assert_eq!(
        code_of(&ask(bad_args.encode_to_vec()).await).0,
        ErrorCode::BadArguments
    );

    // An envelope with only an absolute deadline (as an outside tool may
    // send) that passed.
    let mut expired = envelope("sys.ping");
    expired.timeout_ms = 0;
    expired.deadline_unix_ms = 1;
    assert_eq!(
        code_of(&ask(expired.encode_to_vec()).await).0,
        ErrorCode::DeadlineExceeded
    );

    let mut injected = envelope("sys.ping");
    injected.service = "sys.>".into();
    assert_eq!(
        code_of(&ask(injected.encode_to_vec()).await).0,
        ErrorCode::BadEnvelope
    );

    // After all that, the minion still answers, and is still the same process.
    let client = fleet.client().await.expect("client");
    let request = CallRequest::parse_function("sys.ping", Value::Null, Duration::from_secs(5))
        .expect("request");
    let report = client
        .call(
            &CallTarget::Minions(vec!["m1".parse().expect("id")]),
            &request,
        )
        .await
        .expect("call");
    assert_eq!(report.replies[0].status, ReplyStatus::Ok);
    assert!(fleet.process_mut("m1").expect("m1").is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minions_and_master_come_back_after_nats_server_restarts() {
    let mut fleet = TestFleet::start().await.expect("fleet");
    fleet
        .add_minion_process(provis(), "m1", &["web"])
        .await
        .expect("m1");
    fleet.add_minion("m2", &["web"]).await.expect("m2");

    fleet.nats_mut().restart().expect("restart");

    let request = CallRequest::parse_function("sys.ping", Value::Null, Duration::from_secs(2))
        .expect("request");
    provis_testkit::eventually(
        "both minions answer again",
        Duration::from_secs(20),
        || async {
            let Ok(client) = fleet.client().await else {
                return false;
            };
            match client
                .call(&CallTarget::Role("web".parse().expect("role")), &request)
                .await
            {
                Ok(report) => report.all_ok() && report.summary.selected == 2,
                Err(_) => false,
            }
        },
    )
    .await
    .expect("the fleet recovers");
    let master = fleet.master().await.expect("master client");
    let pong = master.ping().await.expect("the master answers again");
    assert_eq!(pong.version, provis_core::VERSION);
}
