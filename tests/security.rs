//! End-to-end: identities and signed bundles. A minion that pins keys runs
//! only bundles one of them signed; anything else is refused, an event says
//! why, and the version it had keeps serving.

use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use provis_bundle::{PackedBundle, ServicePointer};
use provis_core::identity::Identity;
use provis_core::{CallRequest, CallTarget};
use provis_testkit::{GitRepo, TestFleet, run_to_end, write_files};
use serde_json::{Value, json};

fn provis() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_provis"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_created_private_and_listed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = |args: &[&str]| {
        run_to_end(
            std::process::Command::new(provis())
                .arg("keys")
                .args(args)
                .arg("--dir")
                .arg(dir.path()),
        )
        .expect("provis keys")
    };
    let (code, public, _) = keys(&["create", "alice"]);
    assert_eq!(code, 0);
    assert!(public.trim().starts_with("ed25519:"), "{public}");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.path().join("alice.key"))
            .expect("key")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "private keys are 0600");
    let (code, _, stderr) = keys(&["create", "alice"]);
    assert_eq!(code, 1, "a key is never overwritten");
    assert!(stderr.contains("exists already"), "{stderr}");
    let (_, listed, _) = keys(&["list"]);
    assert!(
        listed.contains("alice") && listed.contains(public.trim()),
        "{listed}"
    );
}

fn counter(root: &Path, version: &str) {
    write_files(
        root,
        &[
            ("roles/web.toml", "services = [\"counter\"]\n"),
            (
                "services/counter/service.toml",
                &format!("name = \"counter\"\nversion = \"{version}\"\n"),
            ),
            (
                "services/counter/main.js",
                &format!("export function version() {{ return '{version}' }}\n"),
            ),
        ],
    )
    .expect("repo");
}

async fn version(fleet: &TestFleet, minion: &str) -> Option<Value> {
    let client = fleet.client().await.ok()?;
    let request =
        CallRequest::parse_function("counter.version", Value::Null, Duration::from_secs(2)).ok()?;
    client
        .call(&CallTarget::Minions(vec![minion.parse().ok()?]), &request)
        .await
        .ok()?
        .replies[0]
        .result
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minion_runs_only_bundles_signed_by_a_key_it_pins() {
    let mut fleet = TestFleet::start().await.expect("fleet");
    let signer = Identity::create(&fleet.workdir().join("keys/release.key")).expect("key");
    let stranger = Identity::create(&fleet.workdir().join("keys/stranger.key")).expect("key");
    let repo = fleet.workdir().join("repo");
    counter(&repo, "1");
    fleet
        .apply_signed(&repo, Some(&signer))
        .await
        .expect("apply");
    let v1 = PackedBundle::from_dir(&repo.join("services/counter")).expect("pack");

    let nats = fleet.nats().connect().await.expect("nats");
    let mut failed_m2 = nats
        .subscribe("provis.event.m2.service.failed")
        .await
        .expect("subscribe");
    let mut failed = nats
        .subscribe("provis.event.m1.service.failed")
        .await
        .expect("subscribe");
    let mut trusting = fleet.minion_config("m1", &["web"]).expect("config");
    trusting.trusted_bundle_keys = vec![signer.public_key().to_owned()];
    fleet.add_minion_with(trusting).await.expect("m1");
    fleet
        .wait_service("m1", "counter", &v1.digest)
        .await
        .expect("a signed bundle runs");

    let mut wary = fleet.minion_config("m2", &["web"]).expect("config");
    wary.trusted_bundle_keys = vec![stranger.public_key().to_owned()];
    fleet.add_minion_with(wary).await.expect("m2");
    let event = tokio::time::timeout(Duration::from_secs(10), failed_m2.next())
        .await
        .expect("an event")
        .expect("message");
    let event: Value = serde_json::from_slice(&event.payload).expect("json");
    assert_eq!(event["source"], "provis/m2");
    assert!(
        event["data"]["reason"]
            .as_str()
            .expect("reason")
            .contains("does not trust"),
        "{event}"
    );
    assert_eq!(version(&fleet, "m2").await, None, "m2 never ran it");

    // An unsigned version 2, published as an attacker with store access would.
    let store = fleet.bundle_store().await.expect("store");
    counter(&repo, "2");
    let v2 = PackedBundle::from_dir(&repo.join("services/counter")).expect("pack");
    store.publish(&v2, None).await.expect("publish unsigned");
    let event = tokio::time::timeout(Duration::from_secs(10), failed.next())
        .await
        .expect("an event")
        .expect("message");
    let event: Value = serde_json::from_slice(&event.payload).expect("json");
    assert!(
        event["data"]["reason"]
            .as_str()
            .expect("reason")
            .contains("not signed"),
        "{event}"
    );
    assert_eq!(
        version(&fleet, "m1").await,
        Some(json!("1")),
        "the signed version keeps serving"
    );

    // Version 3 under version 1's signature: the signature covers the digest, so it fails.
    counter(&repo, "3");
    let v3 = PackedBundle::from_dir(&repo.join("services/counter")).expect("pack");
    store.put_bundle(&v3).await.expect("bytes");
    let signed_v1: ServicePointer = {
        let js = async_nats::jetstream::new(nats.clone());
        let kv = js.get_key_value("provis_services").await.expect("kv");
        let history: Vec<_> = kv
            .history("counter")
            .await
            .expect("history")
            .collect()
            .await;
        history
            .iter()
            .filter_map(|e| e.as_ref().ok())
            .find_map(|e| {
                serde_json::from_slice::<ServicePointer>(&e.value)
                    .ok()
                    .filter(|p| p.signature.is_some())
            })
            .expect("v1 pointer")
    };
    let forged = ServicePointer {
        digest: v3.digest.clone(),
        version: "3".into(),
        ..signed_v1
    };
    store.put_pointer(&forged).await.expect("forged pointer");
    let event = tokio::time::timeout(Duration::from_secs(10), failed.next())
        .await
        .expect("an event")
        .expect("message");
    let event: Value = serde_json::from_slice(&event.payload).expect("json");
    assert!(
        event["data"]["reason"]
            .as_str()
            .expect("reason")
            .contains("does not verify"),
        "{event}"
    );
    assert_eq!(version(&fleet, "m1").await, Some(json!("1")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_master_signs_what_it_applies_from_git() {
    let repo = GitRepo::init().expect("repo");
    let commit = repo
        .commit("counter", &counter_repository(&[]))
        .expect("commit");
    let source = repo.path_string();
    let mut fleet = TestFleet::start_with(|config| config.repository = Some(source))
        .await
        .expect("fleet");
    let ping = fleet.ask_master("ping", &json!({})).await.expect("ping");
    let master_key = ping["public_key"]
        .as_str()
        .expect("the master's public key")
        .to_owned();
    let mut config = fleet.minion_config("m1", &[]).expect("config");
    config.trusted_bundle_keys = vec![master_key];
    fleet.add_minion_with(config).await.expect("m1");
    provis_testkit::eventually(
        "m1 runs the signed bundle",
        Duration::from_secs(20),
        || async {
            let status = fleet
                .ask_master("status", &json!({}))
                .await
                .unwrap_or_default();
            status["applied"]["commit"] == commit && version(&fleet, "m1").await == Some(json!("1"))
        },
    )
    .await
    .expect("signed and running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minion_that_pins_callers_runs_only_their_fresh_signed_calls() {
    use prost::Message;
    use provis_proto::v1::{CallReply, call_reply};

    let mut fleet = TestFleet::start().await.expect("fleet");
    let keys = fleet.workdir().join("keys");
    let alice = Identity::create(&keys.join("alice.key")).expect("alice");
    let mallory = Identity::create(&keys.join("mallory.key")).expect("mallory");
    let trusted = alice.public_key().to_owned();
    fleet
        .add_minion_process_with(
            provis(),
            "m1",
            &["web"],
            &["--trusted-callers".as_ref(), trusted.as_ref()],
        )
        .await
        .expect("m1");
    let nats = fleet.nats().connect().await.expect("nats");
    let mut refused = nats
        .subscribe("provis.event.m1.call.refused")
        .await
        .expect("subscribe");

    let call = |key: Option<&Path>, via: &str| {
        let mut command = fleet.provis_command(provis());
        command.args(["call", "--minion", "m1", "--via", via, "--output", "json"]);
        if let Some(key) = key {
            command.arg("--key").arg(key);
        }
        let (code, stdout, _) = run_to_end(command.arg("sys.ping")).expect("provis call");
        (
            code,
            serde_json::from_str::<Value>(&stdout).unwrap_or_default(),
        )
    };
    let (code, report) = call(Some(&keys.join("alice.key")), "nats");
    assert_eq!(code, 0, "{report}");
    for (key, via, needle) in [
        (None, "nats", "not signed"),
        (Some(keys.join("mallory.key")), "nats", "does not trust"),
        (None, "grpc", "not signed"),
    ] {
        let (code, report) = call(key.as_deref(), via);
        assert_eq!(code, 1, "{report}");
        let error = &report["replies"][0]["error"];
        assert_eq!(error["code"], "denied", "{report}");
        assert!(
            error["message"]
                .as_str()
                .unwrap_or_default()
                .contains(needle),
            "{needle}: {report}"
        );
    }
    let event = tokio::time::timeout(Duration::from_secs(5), refused.next())
        .await
        .expect("a call.refused event")
        .expect("message");
    assert!(String::from_utf8_lossy(&event.payload).contains("not signed"));

    // A replayed envelope and a stale one, straight on NATS.
    let subject = fleet.subjects().minion_call(&"m1".parse().expect("id"));
    let ask = |envelope: &provis_proto::v1::CallEnvelope| {
        let (nats, subject, payload) = (nats.clone(), subject.clone(), envelope.encode_to_vec());
        async move {
            let reply = nats.request(subject, payload.into()).await.expect("reply");
            CallReply::decode(reply.payload.as_ref()).expect("a reply")
        }
    };
    let request = CallRequest::parse_function("sys.ping", Value::Null, Duration::from_secs(5))
        .expect("request");
    let mut envelope = request.to_envelope("operator:alice", &CallTarget::All);
    provis_core::call_auth::sign(&mut envelope, &alice);
    assert!(matches!(
        ask(&envelope).await.outcome,
        Some(call_reply::Outcome::ResultJson(_))
    ));
    match ask(&envelope).await.outcome {
        Some(call_reply::Outcome::Error(error)) => {
            assert!(error.message.contains("replay"), "{error:?}")
        }
        other => panic!("a replay ran: {other:?}"),
    }
    let mut stale = request.to_envelope("operator:alice", &CallTarget::All);
    stale.issued_unix_ms -= 600_000;
    provis_core::call_auth::sign(&mut stale, &alice);
    match ask(&stale).await.outcome {
        Some(call_reply::Outcome::Error(error)) => {
            assert!(error.message.contains("clock"), "{error:?}")
        }
        other => panic!("a stale call ran: {other:?}"),
    }
    drop(mallory);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_call_policy_from_git_says_which_operator_may_call_what() {
    let keys = tempfile::tempdir().expect("keys");
    let alice = Identity::create(&keys.path().join("alice.key")).expect("alice");
    let bob = Identity::create(&keys.path().join("bob.key")).expect("bob");
    let mallory = Identity::create(&keys.path().join("mallory.key")).expect("mallory");
    let policy = format!(
        "[[operator]]\nname = \"alice\"\nkey = \"{}\"\n[[operator.allow]]\nroles = [\"web\"]\nservices = [\"counter\"]\nmethods = [\"version\"]\n\n\
         [[operator]]\nname = \"bob\"\nkey = \"{}\"\n[[operator.allow]]\nroles = [\"*\"]\nservices = [\"sys\"]\nmethods = [\"ping\"]\n",
        alice.public_key(),
        bob.public_key()
    );
    let repo = GitRepo::init().expect("repo");
    let commit = repo
        .commit("policy", &counter_repository(&[("policy.toml", &policy)]))
        .expect("commit");
    let source = repo.path_string();
    let mut fleet = TestFleet::start_with(|config| config.repository = Some(source))
        .await
        .expect("fleet");
    let master_key = fleet.ask_master("ping", &json!({})).await.expect("ping")["public_key"]
        .as_str()
        .expect("key")
        .to_owned();
    let mut config = fleet.minion_config("m1", &[]).expect("config");
    config.trusted_bundle_keys = vec![master_key];
    fleet.add_minion_with(config).await.expect("m1");

    let nats = fleet.nats().connect().await.expect("nats");
    // Callers by the name of their key file (none: an unsigned caller).
    let as_caller = |name: Option<&str>| {
        let client = provis_core::Client::new(nats.clone(), fleet.subjects(), "operator:test");
        match name {
            Some(name) => client.with_signer(
                Identity::load(&keys.path().join(format!("{name}.key"))).expect("key"),
            ),
            None => client,
        }
    };
    let outcome = |client: provis_core::Client, function: &'static str| async move {
        let request = CallRequest::parse_function(function, Value::Null, Duration::from_secs(2))
            .expect("request");
        let report = client
            .call(
                &CallTarget::Minions(vec!["m1".parse().expect("id")]),
                &request,
            )
            .await
            .expect("call");
        let reply = report.replies[0].clone();
        match (reply.result, reply.error) {
            (Some(result), _) => Ok(result),
            (_, Some(error)) => Err(format!("{}: {}", error.code, error.message)),
            _ => Err("no reply".to_owned()),
        }
    };
    provis_testkit::eventually(
        "m1 converged and follows the policy",
        Duration::from_secs(20),
        || async {
            let status = fleet
                .ask_master("status", &json!({}))
                .await
                .unwrap_or_default();
            status["applied"]["commit"] == commit
                && outcome(as_caller(Some("alice")), "counter.version").await == Ok(json!("1"))
        },
    )
    .await
    .expect("alice may call counter.version");

    assert_eq!(
        outcome(as_caller(Some("bob")), "sys.ping")
            .await
            .map(|r| r["pong"].clone()),
        Ok(json!(true))
    );
    for (caller, function, needle) in [
        (Some("alice"), "sys.ping", "policy does not let"),
        (Some("bob"), "counter.version", "policy does not let"),
        (Some("mallory"), "sys.ping", "does not trust"),
        (None, "sys.ping", "not signed"),
    ] {
        let err = outcome(as_caller(caller), function)
            .await
            .expect_err("refused");
        assert!(
            err.starts_with("denied: ") && err.contains(needle),
            "{function}: {err}"
        );
    }

    // A policy written straight into the bucket, signed by mallory, is not taken up.
    let forged = provis_core::call_auth::SignedPolicy::sign(
        toml::from_str(&format!("[[operator]]\nname = \"m\"\nkey = \"{}\"\n[[operator.allow]]\nroles = [\"*\"]\nservices = [\"*\"]\nmethods = [\"*\"]\n", mallory.public_key())).expect("policy"),
        &mallory,
    );
    let kv = async_nats::jetstream::new(nats.clone())
        .get_key_value("provis_config")
        .await
        .expect("kv");
    kv.put("policy", serde_json::to_vec(&forged).expect("json").into())
        .await
        .expect("put");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let err = outcome(as_caller(Some("mallory")), "sys.ping")
        .await
        .expect_err("still refused");
    assert!(err.contains("does not trust"), "{err}");
}

/// A config repository whose every minion holds `web`, which runs `counter`
/// 1 (answering `version`), plus `extra` files.
fn counter_repository<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut files = vec![
        ("roles/web.toml", "services = [\"counter\"]\n"),
        (
            "assignments.toml",
            "[[assign]]\nminions = \"*\"\nroles = [\"web\"]\n",
        ),
        (
            "services/counter/service.toml",
            "name = \"counter\"\nversion = \"1\"\n",
        ),
        (
            "services/counter/main.js",
            "export function version() { return '1' }\n",
        ),
    ];
    files.extend_from_slice(extra);
    files
}
