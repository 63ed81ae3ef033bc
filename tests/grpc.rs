//! End-to-end: the minion's local gRPC API, every call of it, against a real
//! minion process.
#![cfg(test)]

use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use provis_core::{CallRequest, CallTarget};
use provis_proto::v1::minion_client::MinionClient;
use provis_proto::v1::{
    GetStateRequest, HealthRequest, ListServicesRequest, WatchEventsRequest, call_reply,
};
use provis_testkit::{TestFleet, run_to_end, write_files};
use serde_json::Value;

fn provis() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_provis"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_api_serves_health_services_state_events_and_calls() {
    let mut fleet = TestFleet::start().await.expect("fleet");
    let repo = fleet.workdir().join("repo");
    write_files(&repo, &[
        ("roles/web.toml", "services = [\"note\"]\n"),
        ("services/note/service.toml", "name = \"note\"\nversion = \"2.1\"\n"),
        ("services/note/main.js", "export function keep(a) { provis.state.set(a.key, a.value); provis.events.emit('kept', { key: a.key }); return true }"),
    ])
    .expect("repo");
    fleet.apply(&repo).await.expect("apply");
    fleet
        .add_minion_process(provis(), "m1", &["web"])
        .await
        .expect("m1");
    let digest = provis_bundle::PackedBundle::from_dir(&repo.join("services/note"))
        .expect("pack")
        .digest;
    fleet
        .wait_service("m1", "note", &digest)
        .await
        .expect("loaded");

    let records = provis_core::registry::read_all(
        &fleet
            .client()
            .await
            .expect("client")
            .registry()
            .await
            .expect("registry"),
    )
    .await
    .expect("records");
    let addr = records[0]
        .grpc_addr
        .clone()
        .expect("a gRPC address in the registry");
    assert!(
        addr.starts_with("127.0.0.1:"),
        "loopback by default: {addr}"
    );
    let mut api = MinionClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");

    let health = api
        .health(HealthRequest {})
        .await
        .expect("health")
        .into_inner();
    assert_eq!(
        (
            health.minion.as_str(),
            health.roles.as_slice(),
            health.nats_connected
        ),
        ("m1", &["web".to_owned()][..], true)
    );

    let services = api
        .list_services(ListServicesRequest {})
        .await
        .expect("services")
        .into_inner()
        .services;
    let note = services
        .iter()
        .find(|s| s.name == "note")
        .expect("note listed");
    assert_eq!(
        (note.version.as_str(), note.digest.as_str(), note.builtin),
        ("2.1", digest.as_str(), false)
    );
    assert!(services.iter().any(|s| s.name == "sys" && s.builtin));

    let mut events = api
        .watch_events(WatchEventsRequest {
            type_prefix: "note.".into(),
        })
        .await
        .expect("watch")
        .into_inner();
    let request = CallRequest::parse_function(
        "note.keep",
        serde_json::json!({"key": "k", "value": [1, 2]}),
        Duration::from_secs(5),
    )
    .expect("request");
    let reply = api
        .call(request.to_envelope(
            "operator:test",
            &CallTarget::Minions(vec!["m1".parse().expect("id")]),
        ))
        .await
        .expect("call")
        .into_inner();
    assert_eq!(
        reply.outcome,
        Some(call_reply::Outcome::ResultJson("true".into()))
    );

    let event = tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .expect("an event in time")
        .expect("event")
        .expect("ok");
    assert_eq!(event.r#type, "io.provis.note.kept");
    assert_eq!(
        serde_json::from_str::<Value>(&event.data_json).expect("json")["key"],
        "k"
    );

    let state = api
        .get_state(GetStateRequest {
            service: "note".into(),
            prefix: String::new(),
        })
        .await
        .expect("state")
        .into_inner();
    assert_eq!(state.entries.len(), 1);
    assert_eq!(
        (
            state.entries[0].key.as_str(),
            state.entries[0].value_json.as_str()
        ),
        ("k", "[1,2]")
    );

    // A malformed envelope over gRPC gets the same structured error as over NATS.
    let mut bad = request.to_envelope("operator:test", &CallTarget::All);
    bad.method = "no such".into();
    let reply = api.call(bad).await.expect("call").into_inner();
    assert!(
        matches!(reply.outcome, Some(call_reply::Outcome::Error(ref e)) if e.message.contains("not a valid name")),
        "{reply:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_api_serves_tls_when_configured_and_never_plaintext_off_loopback() {
    let mut fleet = TestFleet::start().await.expect("fleet");
    let issued =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("certificate");
    let (cert, key) = (
        fleet.workdir().join("grpc.pem"),
        fleet.workdir().join("grpc.key"),
    );
    std::fs::write(&cert, issued.cert.pem()).expect("cert");
    std::fs::write(&key, issued.signing_key.serialize_pem()).expect("key");
    let args = [
        "--grpc-tls-cert".as_ref(),
        cert.as_os_str(),
        "--grpc-tls-key".as_ref(),
        key.as_os_str(),
    ];
    fleet
        .add_minion_process_with(provis(), "m1", &["web"], &args)
        .await
        .expect("m1 with TLS");

    let call = |extra: &[&std::ffi::OsStr]| {
        let mut command = fleet.provis_command(provis());
        command
            .args([
                "call", "--via", "grpc", "--minion", "m1", "--output", "json",
            ])
            .args(extra)
            .arg("sys.ping");
        let (code, stdout, _) = run_to_end(&mut command).expect("provis call");
        (
            code,
            serde_json::from_str::<Value>(&stdout).unwrap_or_default(),
        )
    };
    let (code, report) = call(&["--grpc-ca".as_ref(), cert.as_os_str()]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["replies"][0]["result"]["pong"], true);
    let (code, report) = call(&[]);
    assert_eq!(code, 1);
    assert!(
        report["replies"][0]["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("--grpc-ca"),
        "{report}"
    );

    // Plaintext off loopback is refused before anything listens.
    let (code, _, stderr) = run_to_end(
        fleet
            .provis_command(provis())
            .args(["minion", "--id", "m9", "--grpc-listen", "0.0.0.0:0"])
            .arg("--data-dir")
            .arg(fleet.workdir().join("m9")),
    )
    .expect("minion");
    assert_ne!(code, 0);
    assert!(stderr.contains("must serve TLS"), "{stderr}");
}
