//! End-to-end: the minion's local gRPC API, every call of it, against a real
//! minion process.
#![cfg(test)]

use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use provis_core::identity::Identity;
use provis_core::minion_api::{connect_unix, signed_request};
use provis_core::{CallRequest, CallTarget};
use provis_proto::v1::minion_client::MinionClient;
use provis_proto::v1::{
    GetStateRequest, HealthRequest, ListServicesRequest, WatchEventsRequest, call_reply,
};
use provis_testkit::{TestFleet, run_to_end, write_files};
use serde_json::Value;
use std::os::unix::fs::PermissionsExt as _;

fn provis() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_provis"))
}

/// Another local user (`nobody`) trying the socket is refused by the
/// kernel. Needs root to act as another user; as anyone else there is no
/// other user to be, and the check says so.
fn another_user_cannot_open(socket: &Path) {
    use std::os::unix::fs::MetadataExt as _;
    use std::os::unix::process::CommandExt as _;
    // /proc/self belongs to this process's effective user.
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    if !root {
        eprintln!(
            "not root: cannot act as another user to try {}",
            socket.display()
        );
        return;
    }
    let output = std::process::Command::new("python3")
        .args([
            "-c",
            "import socket, sys\ns = socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\nprint('connected')",
        ])
        .arg(socket)
        .uid(65534)
        .gid(65534)
        .output()
        .expect("python3 runs as nobody");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("PermissionError"),
        "nobody reached {}: {stderr}",
        socket.display()
    );
}

/// The API address of `id` in the registry.
async fn advertised(fleet: &TestFleet, id: &str) -> String {
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
    records
        .into_iter()
        .find(|r| r.id.as_str() == id)
        .and_then(|r| r.grpc_addr)
        .expect("a gRPC address in the registry")
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

    let addr = advertised(&fleet, "m1").await;
    // A Unix socket by default: the minion's user and group only.
    let Some(socket) = addr.strip_prefix("unix:") else {
        panic!("a Unix socket by default: {addr}");
    };
    let mode = std::fs::metadata(socket)
        .expect("the socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660, "owner and group only: {mode:o}");
    another_user_cannot_open(Path::new(socket));
    let mut api = connect_unix(socket.into()).await.expect("connect");

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
    let alice_key = fleet.workdir().join("alice.key");
    let alice = Identity::create(&alice_key).expect("alice");
    let args = [
        "--grpc-listen".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--trusted-callers".as_ref(),
        alice.public_key().as_ref(),
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
            .arg("--key")
            .arg(&alice_key)
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
    // Without an authority of its own, the caller pins the certificate the
    // minion's registry entry holds (its own: nobody else may write it).
    let (code, report) = call(&[]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["replies"][0]["result"]["pong"], true);
    // Another certificate than the one the API serves is refused.
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("other");
    let other_pem = fleet.workdir().join("other.pem");
    std::fs::write(&other_pem, other.cert.pem()).expect("other cert");
    let (code, report) = call(&["--grpc-ca".as_ref(), other_pem.as_os_str()]);
    assert_eq!(code, 1, "{report}");

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tcp_every_rpc_needs_the_signature_of_a_trusted_caller() {
    let mut fleet = TestFleet::start().await.expect("fleet");
    let keys = fleet.workdir().join("keys");
    let alice = Identity::create(&keys.join("alice.key")).expect("alice");
    let mallory = Identity::create(&keys.join("mallory.key")).expect("mallory");
    let tcp = ["--grpc-listen".as_ref(), "127.0.0.1:0".as_ref()];
    fleet
        .add_minion_process_with(provis(), "open", &["web"], &tcp)
        .await
        .expect("a minion that pins no caller");
    let pinned = [
        "--grpc-listen".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--trusted-callers".as_ref(),
        alice.public_key().as_ref(),
    ];
    fleet
        .add_minion_process_with(provis(), "m1", &["web"], &pinned)
        .await
        .expect("a minion that pins alice");
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64)
    };

    // Pinning nobody, a minion cannot tell who asks over TCP: it refuses all.
    let addr = advertised(&fleet, "open").await;
    let mut open = MinionClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let refused = open.health(HealthRequest {}).await.expect_err("refused");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    assert!(refused.message().contains("pins no callers"), "{refused:?}");
    let signed = signed_request(HealthRequest {}, "Health", "open", &alice, now());
    assert!(
        open.health(signed).await.is_err(),
        "nobody is trusted there"
    );

    let addr = advertised(&fleet, "m1").await;
    let mut api = MinionClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    // Unsigned: refused, every RPC alike.
    let unsigned = [
        api.health(HealthRequest {}).await.err(),
        api.list_services(ListServicesRequest {}).await.err(),
        api.get_state(GetStateRequest {
            service: "note".into(),
            prefix: String::new(),
        })
        .await
        .err(),
        api.watch_events(WatchEventsRequest {
            type_prefix: String::new(),
        })
        .await
        .err(),
    ];
    for status in unsigned {
        let status = status.expect("refused");
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
        assert!(status.message().contains("not signed"), "{status:?}");
    }
    // Signed by the pinned caller: answered.
    let health = api
        .health(signed_request(
            HealthRequest {},
            "Health",
            "m1",
            &alice,
            now(),
        ))
        .await
        .expect("alice may ask")
        .into_inner();
    assert_eq!(health.minion, "m1");
    let state = signed_request(
        GetStateRequest {
            service: "note".into(),
            prefix: String::new(),
        },
        "GetState",
        "m1",
        &alice,
        now(),
    );
    api.get_state(state).await.expect("alice may read state");
    // Replayed, meant for another minion, another RPC, or by an unknown key: refused.
    let once = signed_request(HealthRequest {}, "Health", "m1", &alice, now());
    let copy = {
        let mut copy = tonic::Request::new(HealthRequest {});
        *copy.metadata_mut() = once.metadata().clone();
        copy
    };
    api.health(once).await.expect("first use");
    let replayed = api.health(copy).await.expect_err("a replay");
    assert!(replayed.message().contains("replay"), "{replayed:?}");
    let elsewhere = signed_request(HealthRequest {}, "Health", "open", &alice, now());
    let wrong = api
        .health(elsewhere)
        .await
        .expect_err("meant for another minion");
    assert!(wrong.message().contains("does not verify"), "{wrong:?}");
    let as_health = signed_request(ListServicesRequest {}, "Health", "m1", &alice, now());
    let wrong = api
        .list_services(as_health)
        .await
        .expect_err("signed as another RPC");
    assert!(wrong.message().contains("does not verify"), "{wrong:?}");
    let stranger = signed_request(HealthRequest {}, "Health", "m1", &mallory, now());
    let wrong = api.health(stranger).await.expect_err("an unknown key");
    assert!(wrong.message().contains("does not trust"), "{wrong:?}");

    // A call through TCP is signed in its envelope, as over NATS.
    let call = |key: Option<&Path>| {
        let mut command = fleet.provis_command(provis());
        command.args([
            "call", "--via", "grpc", "--minion", "m1", "--output", "json",
        ]);
        if let Some(key) = key {
            command.arg("--key").arg(key);
        }
        let (code, stdout, _) = run_to_end(command.arg("sys.ping")).expect("provis call");
        (
            code,
            serde_json::from_str::<Value>(&stdout).unwrap_or_default(),
        )
    };
    let (code, report) = call(Some(&keys.join("alice.key")));
    assert_eq!(code, 0, "{report}");
    let (code, report) = call(None);
    assert_eq!(code, 1, "{report}");
}
