//! End-to-end: identities and signed bundles. A minion that pins keys runs
//! only bundles one of them signed; anything else is refused, an event says
//! why, and the version it had keeps serving.
#![cfg(test)]

use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use prost::Message as _;
use provis_bundle::{PackedBundle, ServicePointer};
use provis_core::identity::Identity;
use provis_core::{CallRequest, CallTarget};
use provis_testkit::{GitRepo, ServerRefusals, TestFleet, run_to_end, write_files};
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
    // m2 pins another key: it takes not even the role entries that key did
    // not sign, so the service never reaches it.
    let mut failed_m2 = nats
        .subscribe("provis.event.m2.desired.refused")
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
            .contains("does not pin"),
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
    let master = fleet.master().await.expect("master client");
    let master_key = master.ping().await.expect("ping").public_key;
    let mut config = fleet.minion_config("m1", &[]).expect("config");
    config.trusted_bundle_keys = vec![master_key];
    fleet.add_minion_with(config).await.expect("m1");
    provis_testkit::eventually(
        "m1 runs the signed bundle",
        Duration::from_secs(20),
        || async {
            let applied = fleet.applied_commit().await;
            applied.as_deref() == Some(commit.as_str())
                && version(&fleet, "m1").await == Some(json!("1"))
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
    fleet
        .add_minion_pinning_master("m1", &[])
        .await
        .expect("m1");

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
            fleet.applied_commit().await.as_deref() == Some(commit.as_str())
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
    let forged_policy: provis_core::call_auth::CallPolicy = toml::from_str(&format!("[[operator]]\nname = \"m\"\nkey = \"{}\"\n[[operator.allow]]\nroles = [\"*\"]\nservices = [\"*\"]\nmethods = [\"*\"]\n", mallory.public_key())).expect("policy");
    let forged = provis_core::signed_entry::sign(
        "provis_config",
        "policy",
        &forged_policy,
        &mallory,
        i64::MAX / 2,
    )
    .expect("signed");
    let kv = async_nats::jetstream::new(nats.clone())
        .get_key_value("provis_config")
        .await
        .expect("kv");
    kv.put("policy", forged.into()).await.expect("put");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let err = outcome(as_caller(Some("mallory")), "sys.ping")
        .await
        .expect_err("still refused");
    assert!(err.contains("does not trust"), "{err}");

    // A newer policy drops bob; the older one, put back by having JetStream
    // copy it (as any reader can), is not taken up again.
    let genuine = kv.history("policy").await.expect("history");
    let genuine: Vec<_> = futures::TryStreamExt::try_collect(genuine)
        .await
        .expect("history");
    // The oldest revision is the master's first policy (mallory's came after).
    let first = genuine.first().expect("the master's first policy").revision;
    let alice_only = policy
        .split("\n\n")
        .next()
        .expect("alice's part")
        .to_owned();
    let newer = repo
        .commit(
            "bob leaves",
            &counter_repository(&[("policy.toml", &alice_only)]),
        )
        .expect("commit");
    sync(&fleet).await;
    provis_testkit::eventually("bob is refused", Duration::from_secs(20), || async {
        fleet.applied_commit().await.as_deref() == Some(newer.as_str())
            && outcome(as_caller(Some("bob")), "sys.ping").await.is_err()
    })
    .await
    .expect("the newer policy is taken up");
    nats.publish_with_reply(
        "$JS.API.DIRECT.GET.KV_provis_config",
        "$KV.provis_config.policy",
        json!({ "seq": first }).to_string().into(),
    )
    .await
    .expect("sent");
    nats.flush().await.expect("flush");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let err = outcome(as_caller(Some("bob")), "sys.ping")
        .await
        .expect_err("the older policy is not taken up again");
    assert!(
        err.contains("does not trust"),
        "bob is no longer known: {err}"
    );
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

/// Waits for an event of `kind` from the master whose data satisfies `matches`.
async fn master_event(
    events: &mut async_nats::Subscriber,
    kind: &str,
    matches: impl Fn(&Value) -> bool,
) -> Value {
    let wanted = format!("provis.event.master.{kind}");
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(message) = events.next().await {
            let event: Value = serde_json::from_slice(&message.payload).unwrap_or_default();
            if message.subject.as_str() == wanted && matches(&event["data"]) {
                return Some(event["data"].clone());
            }
        }
        None
    })
    .await;
    found
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("no {kind} event matched"))
}

fn run_provis(fleet: &TestFleet, args: &[&str]) -> (i32, String, String) {
    run_to_end(fleet.provis_command(provis()).args(args)).expect("provis runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minions_join_only_when_accepted_or_holding_a_token() {
    let mut fleet = TestFleet::start_secured().await.expect("fleet");
    let operator = fleet.connect().await.expect("the operator connects");
    let mut events = operator
        .subscribe("provis.event.master.>")
        .await
        .expect("subscribe");
    operator.flush().await.expect("flush");
    let url = fleet.nats().url();

    // CVE-2020-11651: a client without an identity reaches nothing, the
    // master's functions included: the server refuses the connection.
    let anonymous = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(2))
        .connect(&url)
        .await;
    assert!(anonymous.is_err(), "an anonymous client is refused");
    let stranger = Identity::create(&fleet.workdir().join("stranger.key")).expect("key");
    let refused = fleet
        .context()
        .connect_options_as("stranger", &stranger)
        .connection_timeout(Duration::from_secs(2))
        .connect(&url)
        .await;
    assert!(refused.is_err(), "an unknown key is refused");
    master_event(&mut events, "auth.refused", |data| {
        data["key"] == stranger.public_key()
    })
    .await;

    // A new minion waits, pending, until an operator accepts it.
    fleet
        .spawn_minion_process(provis(), "web-1", &["web"], &[])
        .expect("spawn");
    let pending = master_event(&mut events, "minion.pending", |data| {
        data["minion"] == "web-1"
    })
    .await;
    assert!(
        pending["key"]
            .as_str()
            .is_some_and(|k| k.starts_with("ed25519:"))
    );
    let (code, listed, stderr) = run_provis(&fleet, &["keys", "pending"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        listed.contains("web-1") && listed.contains("pending"),
        "{listed}"
    );
    // An operator who checked the key accepts only that key.
    let other_key = format!("ed25519:{}", "00".repeat(32));
    let (code, _, stderr) = run_provis(&fleet, &["keys", "accept", "web-1", "--key", &other_key]);
    assert_ne!(
        code, 0,
        "accepting a key other than the one asking is refused"
    );
    assert!(stderr.contains("not ed25519:00"), "{stderr}");
    let pending_key = pending["key"].as_str().expect("key");
    let (code, _, stderr) = run_provis(&fleet, &["keys", "accept", "web-1", "--key", pending_key]);
    assert_eq!(code, 0, "{stderr}");
    master_event(&mut events, "minion.accepted", |data| {
        data["minion"] == "web-1"
    })
    .await;
    fleet.wait_live(&["web-1"]).await.expect("web-1 joins");
    let (code, answered, stderr) = run_provis(&fleet, &["call", "--all", "sys.ping"]);
    assert_eq!(code, 0, "{answered}{stderr}");
    assert!(answered.contains("web-1"), "{answered}");

    // A one-time token admits a new minion at once, and only once.
    let token = fleet.enrollment_token().await.expect("token");
    let with_token = [
        std::ffi::OsStr::new("--enrollment-token"),
        std::ffi::OsStr::new(&token),
    ];
    fleet
        .spawn_minion_process(provis(), "web-2", &["web"], &with_token)
        .expect("spawn");
    fleet
        .wait_live(&["web-2"])
        .await
        .expect("web-2 joins by token");
    let accepted = master_event(&mut events, "minion.accepted", |data| {
        data["minion"] == "web-2"
    })
    .await;
    assert_eq!(accepted["by"], "token");
    fleet
        .spawn_minion_process(provis(), "web-3", &["web"], &with_token)
        .expect("spawn");
    master_event(&mut events, "minion.pending", |data| {
        data["minion"] == "web-3"
    })
    .await;

    // A token issued for one id enrolls no other.
    let (code, bound, stderr) = run_provis(&fleet, &["keys", "token", "--minion", "web-9"]);
    assert_eq!(code, 0, "{stderr}");
    let bound = [
        std::ffi::OsStr::new("--enrollment-token"),
        std::ffi::OsStr::new(bound.trim()),
    ];
    fleet
        .spawn_minion_process(provis(), "web-4", &["web"], &bound)
        .expect("spawn");
    master_event(&mut events, "minion.pending", |data| {
        data["minion"] == "web-4"
    })
    .await;
    // The master's own event source is no minion's id.
    let squatter = Identity::create(&fleet.workdir().join("squatter.key")).expect("key");
    let fresh = fleet.enrollment_token().await.expect("token");
    let squats = fleet
        .context()
        .connect_options_as("squatter", &squatter)
        .user_and_password("master".into(), String::new())
        .token(fresh)
        .connection_timeout(Duration::from_secs(2))
        .connect(&url)
        .await;
    assert!(squats.is_err(), "no minion may enroll as `master`");

    // Rejected: each attempt after is refused, and an event.
    let (code, _, stderr) = run_provis(&fleet, &["keys", "reject", "web-3"]);
    assert_eq!(code, 0, "{stderr}");
    let refused = master_event(&mut events, "auth.refused", |data| {
        data["minion"] == "web-3"
    })
    .await;
    assert!(
        refused["reason"]
            .as_str()
            .is_some_and(|r| r.contains("rejected")),
        "{refused}"
    );
    let (code, _, stderr) = run_provis(&fleet, &["keys", "accept", "web-3"]);
    assert_ne!(code, 0, "a rejected key is not accepted later");
    assert!(stderr.contains("Rejected"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_refuses_what_an_identity_has_no_right_to() {
    let mut fleet = TestFleet::start_secured().await.expect("fleet");
    fleet.add_minion("web-1", &["web"]).await.expect("web-1");
    fleet.add_minion("web-2", &["web"]).await.expect("web-2");
    let operator = fleet.connect().await.expect("the operator connects");
    let mut watched = futures::stream::select(
        operator
            .subscribe("provis.state.>")
            .await
            .expect("subscribe"),
        operator
            .subscribe("provis.event.>")
            .await
            .expect("subscribe"),
    );
    let mut master_events = operator
        .subscribe("provis.event.master.>")
        .await
        .expect("subscribe");
    operator.flush().await.expect("flush");

    // Someone holding web-1's key (web-1 compromised) connects as web-1.
    let (options, mut refusals) =
        ServerRefusals::watch(fleet.minion_options("web-1").expect("web-1's key"));
    let rogue = options
        .connect(fleet.nats().url())
        .await
        .expect("web-1's key is admitted as web-1");

    // CVE-2024-38822 / CVE-2025-22236: state and events as another minion
    // or as the master, a registry entry of another minion.
    for subject in [
        "provis.state.web-2",
        "provis.event.master.minion.accepted",
        "provis.event.web-2.service.failed",
        "$KV.provis_minions.web-2",
    ] {
        rogue
            .publish(subject, r#"{"forged":true}"#.into())
            .await
            .expect("publish is sent; the server drops it");
    }
    // Reading another minion's calls, or anyone's replies.
    let _theirs = rogue
        .subscribe("provis.minion.web-2.call")
        .await
        .expect("sub");
    let _replies = rogue.subscribe("_INBOX.>").await.expect("sub");
    // The master's functions (CVE-2020-11651) are not a minion's to call.
    let asked = tokio::time::timeout(
        Duration::from_secs(3),
        rogue.request("provis.master.enroll.token", "{}".into()),
    )
    .await;
    assert!(
        !matches!(asked, Ok(Ok(_))),
        "a minion cannot ask the master for a token"
    );
    // A rollup on its own registry key would wipe everyone's entries: the
    // registry stream takes no rollups.
    let mut rollup = async_nats::HeaderMap::new();
    rollup.insert("Nats-Rollup", "all");
    rogue
        .publish_with_headers("$KV.provis_minions.web-1", rollup, "{}".into())
        .await
        .expect("publish");
    // What web-1 may do goes through: its own state.
    rogue
        .publish("provis.state.web-1", r#"{"marker":true}"#.into())
        .await
        .expect("publish");
    rogue.flush().await.expect("flush");

    refusals
        .expect(&[
            "provis.state.web-2",
            "provis.event.master.minion.accepted",
            "provis.event.web-2.service.failed",
            "$KV.provis_minions.web-2",
            "provis.minion.web-2.call",
            "_INBOX.>",
        ])
        .await
        .expect("nats-server itself refuses each");
    // Nothing forged arrived: the marker (sent last) came, nothing before it from the rogue.
    let seen = tokio::time::timeout(Duration::from_secs(5), async {
        let mut forged = Vec::new();
        while let Some(message) = watched.next().await {
            if message.payload.as_ref() == br#"{"marker":true}"# {
                return forged;
            }
            if message.payload.as_ref() == br#"{"forged":true}"# {
                forged.push(message.subject.to_string());
            }
        }
        forged
    })
    .await
    .expect("the allowed publish arrives");
    assert!(seen.is_empty(), "forged messages got through: {seen:?}");

    let registry = fleet
        .client()
        .await
        .expect("client")
        .registry()
        .await
        .expect("registry");
    let records = provis_core::registry::read_all(&registry)
        .await
        .expect("registry");
    assert!(
        records.iter().any(|r| r.id.as_str() == "web-2"),
        "web-2's registry entry survives a rollup attempt: {records:?}"
    );

    // Answering a call to everyone in web-2's name: the caller discards the
    // reply, as web-2's registry key did not sign it.
    // It receives calls to everyone, and calls naming it (beside others).
    let mut everyone = futures::stream::select(
        rogue.subscribe("provis.all.call").await.expect("sub"),
        rogue
            .subscribe("provis.minion.web-1.call")
            .await
            .expect("sub"),
    );
    let forger = rogue.clone();
    tokio::spawn(async move {
        while let Some(message) = everyone.next().await {
            let envelope =
                provis_proto::v1::CallEnvelope::decode(message.payload.as_ref()).expect("envelope");
            let forged = provis_proto::v1::CallReply {
                call_id: envelope.call_id,
                minion: "web-2".into(),
                outcome: Some(provis_proto::v1::call_reply::Outcome::ResultJson(
                    r#"{"forged":true}"#.into(),
                )),
                duration_us: 1,
            };
            if let Some(reply) = message.reply {
                let _ = forger.publish(reply, forged.encode_to_vec().into()).await;
            }
        }
    });
    rogue.flush().await.expect("flush");
    let client = fleet.client().await.expect("client");
    let ping = CallRequest::parse_function("sys.ping", Value::Null, Duration::from_secs(1))
        .expect("request");
    // web-2 selected (its key read from the registry), then stopped: only
    // the forged reply comes in its name, and it must not count.
    let selection = client
        .select(
            &CallTarget::All,
            None,
            provis_core::selection::Pick::All,
            None,
        )
        .await
        .expect("select");
    assert!(selection.keys.contains_key("web-2"), "{selection:?}");
    fleet.stop_minion("web-2").await;
    let report = client
        .call_selected(
            &CallTarget::All,
            &selection,
            &ping,
            &provis_core::client::CallPlan::default(),
            &mut |_| {},
        )
        .await
        .expect("call");
    let web2 = report
        .replies
        .iter()
        .find(|r| r.minion == "web-2")
        .expect("web-2's line");
    assert_eq!(
        web2.status,
        provis_core::ReplyStatus::NoReply,
        "a reply web-2's key did not sign is not web-2's: {report:?}"
    );
    assert!(
        report.discarded >= 1,
        "the forged reply is discarded: {report:?}"
    );
    // A call naming web-1 and web-2 reaches web-1's subject, where the
    // rogue listens too: its answer in web-2's name is checked as well.
    let named = client
        .call(
            &CallTarget::Minions(vec!["web-1".parse().unwrap(), "web-2".parse().unwrap()]),
            &ping,
        )
        .await
        .expect("call");
    let web2 = named
        .replies
        .iter()
        .find(|r| r.minion == "web-2")
        .expect("web-2's line");
    assert_eq!(
        web2.status,
        provis_core::ReplyStatus::NoReply,
        "a named call takes no reply web-2's key did not sign: {named:?}"
    );

    // Another key presenting web-1's id is refused, and web-1 keeps serving.
    let impostor = Identity::create(&fleet.workdir().join("impostor.key")).expect("key");
    let impostor_connects = fleet
        .context()
        .connect_options_as("impostor", &impostor)
        .user_and_password("web-1".into(), String::new())
        .connection_timeout(Duration::from_secs(2))
        .connect(fleet.nats().url())
        .await;
    assert!(impostor_connects.is_err());
    let refused = master_event(&mut master_events, "auth.refused", |data| {
        data["key"] == impostor.public_key()
    })
    .await;
    assert!(
        refused["reason"]
            .as_str()
            .is_some_and(|r| r.contains("belongs to another key")),
        "{refused}"
    );
    let client = fleet.client().await.expect("client");
    let ping = CallRequest::parse_function("sys.ping", Value::Null, Duration::from_secs(3))
        .expect("request");
    let report = client
        .call(&CallTarget::Minions(vec!["web-1".parse().unwrap()]), &ping)
        .await
        .expect("call");
    assert!(
        report.all_ok() && report.replies.len() == 1,
        "web-1 still answers: {report:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_minion_is_cut_off_within_seconds() {
    let mut fleet = TestFleet::start_secured().await.expect("fleet");
    fleet
        .add_minion_process(provis(), "web-1", &["web"])
        .await
        .expect("web-1");
    let operator = fleet.connect().await.expect("the operator connects");
    let mut events = operator
        .subscribe("provis.event.master.>")
        .await
        .expect("subscribe");
    operator.flush().await.expect("flush");

    // The master that revokes need not be the one that admitted: it finds
    // the minion's connections on the server.
    fleet.restart_master().await.expect("the master restarts");
    let revoked_at = std::time::Instant::now();
    let (code, _, stderr) = run_provis(&fleet, &["keys", "revoke", "web-1"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("1 live connection(s) closed"), "{stderr}");
    // Its reconnection is refused, and says so.
    let refused = master_event(&mut events, "auth.refused", |data| {
        data["minion"] == "web-1"
    })
    .await;
    assert!(
        refused["reason"]
            .as_str()
            .is_some_and(|r| r.contains("revoked")),
        "{refused}"
    );
    let cut_off = revoked_at.elapsed();
    assert!(
        cut_off < Duration::from_secs(10),
        "cut off after {cut_off:?}"
    );
    let client = fleet.client().await.expect("client");
    let ping = CallRequest::parse_function("sys.ping", Value::Null, Duration::from_secs(1))
        .expect("request");
    let report = client
        .call(&CallTarget::Minions(vec!["web-1".parse().unwrap()]), &ping)
        .await
        .expect("call");
    assert!(
        !report.all_ok() && report.replies.iter().all(|r| r.result.is_none()),
        "a revoked minion answers nothing: {report:?}"
    );
    assert!(
        fleet.process_mut("web-1").expect("process").is_running(),
        "the process still runs, cut off"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secured_fleet_works_within_its_permissions() {
    let mut fleet = TestFleet::start_secured().await.expect("fleet");
    let repo = fleet.workdir().join("repo");
    counter(&repo, "1");
    fleet.apply(&repo).await.expect("the operator applies");
    let v1 = PackedBundle::from_dir(&repo.join("services/counter")).expect("pack");
    let mut config = fleet.minion_config("web-1", &["web"]).expect("config");
    config.state_interval_ms = 200;
    fleet.add_minion_with(config).await.expect("web-1");
    fleet
        .wait_service("web-1", "counter", &v1.digest)
        .await
        .expect("the minion fetches and runs the bundle");
    assert_eq!(version(&fleet, "web-1").await, Some(json!("1")));
    // Its state reaches the master's index; the operator queries it.
    provis_testkit::eventually(
        "web-1's state is indexed",
        Duration::from_secs(10),
        || async {
            let (code, out, _) = run_provis(&fleet, &["query", "true"]);
            code == 0 && out.contains("web-1")
        },
    )
    .await
    .expect("query");
    // A restarted nats-server, then a restarted master: the minion is
    // admitted again each time (the callout reconnects first) and serves.
    fleet.nats_mut().restart().expect("nats-server restarts");
    provis_testkit::eventually(
        "web-1 serves after the server restart",
        Duration::from_secs(20),
        || async { version(&fleet, "web-1").await == Some(json!("1")) },
    )
    .await
    .expect("web-1 is back");
    fleet.restart_master().await.expect("the master restarts");
    fleet
        .nats_mut()
        .restart()
        .expect("nats-server restarts again");
    provis_testkit::eventually(
        "web-1 serves after both restarts",
        Duration::from_secs(20),
        || async { version(&fleet, "web-1").await == Some(json!("1")) },
    )
    .await
    .expect("web-1 is back");
    let log = fleet.nats().log();
    assert!(
        !log.contains("Violation"),
        "everything a minion, the master and an operator do is within their permissions:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_claiming_new_ids_cannot_fill_the_enrollment_bucket() {
    let fleet = TestFleet::start_secured_with(|config| config.max_pending_minions = 1)
        .await
        .expect("fleet");
    let operator = fleet.connect().await.expect("the operator connects");
    let mut events = operator
        .subscribe("provis.event.master.>")
        .await
        .expect("subscribe");
    operator.flush().await.expect("flush");
    let ask_to_join = |name: &'static str| {
        let key = Identity::create(&fleet.workdir().join(format!("{name}.key"))).expect("key");
        let options = fleet
            .context()
            .connect_options_as(name, &key)
            .user_and_password(name.into(), String::new())
            .connection_timeout(Duration::from_secs(2));
        let url = fleet.nats().url();
        async move { options.connect(url).await.is_ok() }
    };
    assert!(!ask_to_join("new-1").await, "pending, not connected");
    master_event(&mut events, "minion.pending", |data| {
        data["minion"] == "new-1"
    })
    .await;
    assert!(!ask_to_join("new-2").await);
    let refused = master_event(&mut events, "auth.refused", |data| {
        data["minion"] == "new-2"
    })
    .await;
    assert!(
        refused["reason"]
            .as_str()
            .is_some_and(|r| r.contains("pending already")),
        "{refused}"
    );
    let (code, _, stderr) = run_provis(&fleet, &["keys", "reject", "new-1"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(!ask_to_join("new-3").await);
    master_event(&mut events, "minion.pending", |data| {
        data["minion"] == "new-3"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_known_only_from_the_policy_may_call_but_not_change_the_fleet() {
    let keys = tempfile::tempdir().expect("keys");
    let bob_key = keys.path().join("bob.key");
    let bob = Identity::create(&bob_key).expect("bob");
    let policy = format!(
        "[[operator]]\nname = \"bob\"\nkey = \"{}\"\n[[operator.allow]]\nroles = [\"*\"]\nservices = [\"sys\"]\nmethods = [\"ping\"]\n",
        bob.public_key()
    );
    let repo = GitRepo::init().expect("repo");
    repo.commit("policy", &counter_repository(&[("policy.toml", &policy)]))
        .expect("commit");
    let source = repo.path_string();
    let mut fleet = TestFleet::start_secured_with(|config| config.repository = Some(source))
        .await
        .expect("fleet");
    fleet
        .add_minion_pinning_master("m1", &[])
        .await
        .expect("m1");

    let as_bob = provis_core::FleetContext {
        identity: Some(bob_key.clone()),
        ..fleet.context().clone()
    };
    // Admitted once the master has taken up the policy from git.
    let mut admitted = None;
    for _ in 0..100 {
        let (options, refusals) = ServerRefusals::watch(
            as_bob
                .connect_options_as("bob", &Identity::load(&bob_key).expect("key"))
                .connection_timeout(Duration::from_secs(2)),
        );
        if let Ok(connection) = options.connect(fleet.nats().url()).await {
            admitted = Some((connection, refusals));
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (nats, mut refusals) = admitted.expect("bob is admitted once the policy is taken up");
    let client = provis_core::Client::new(nats.clone(), fleet.subjects(), "operator:bob")
        .with_signer(Identity::load(&bob_key).expect("key"));
    let ping = CallRequest::parse_function("sys.ping", Value::Null, Duration::from_secs(2))
        .expect("request");
    provis_testkit::eventually(
        "bob's ping is answered",
        Duration::from_secs(20),
        || async {
            client
                .call(&CallTarget::All, &ping)
                .await
                .is_ok_and(|report| report.all_ok())
        },
    )
    .await
    .expect("bob calls what the policy allows");
    let status = nats
        .request("provis.master.status", "{}".into())
        .await
        .expect("bob reads the status");
    assert!(!status.payload.is_empty());

    // Bob may discover the master's endpoints, but a discovery request
    // naming a bucket's subject as reply does not make the master write
    // there: its API connection publishes to inboxes only.
    let info = nats
        .request("$SRV.INFO.provis-master", "".into())
        .await
        .expect("bob discovers the master's endpoints");
    assert!(String::from_utf8_lossy(&info.payload).contains("provis.master.status"));
    for verb in [
        "$SRV.PING",
        "$SRV.INFO.provis-master",
        "$SRV.STATS.provis-master",
    ] {
        nats.publish_with_reply(verb, "$KV.provis_config.overlay", "".into())
            .await
            .expect("sent");
    }
    nats.publish_with_reply("provis.master.ping", "$KV.provis_config.overlay", "".into())
        .await
        .expect("sent");
    nats.flush().await.expect("flush");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let admin = fleet.connect().await.expect("admin");
    let config = async_nats::jetstream::new(admin)
        .get_key_value("provis_config")
        .await
        .expect("config bucket");
    let overlay = config.get("overlay").await.expect("read");
    assert!(
        overlay.is_none(),
        "nothing written as the overlay: {overlay:?}"
    );

    // Reading the fleet with the CLI works as bob.
    let bob_path = bob_key.to_str().expect("utf-8");
    for args in [
        &["minions"][..],
        &["events", "--since", "1h"][..],
        &["query", "true"][..],
        &["status"][..],
    ] {
        let (code, out, err) = run_to_end(
            fleet
                .provis_command(provis())
                .args(args)
                .args(["--identity", bob_path]),
        )
        .expect("provis runs");
        assert_eq!(code, 0, "provis {args:?} as bob: {out}{err}");
    }

    // Changing the fleet is an admin's: refused by nats-server.
    nats.publish("$KV.provis_assignments.m1", "{}".into())
        .await
        .expect("sent");
    nats.publish("$O.provis_bundles.C.x", "{}".into())
        .await
        .expect("sent");
    let token = tokio::time::timeout(
        Duration::from_secs(3),
        nats.request("provis.master.enroll.token", "{}".into()),
    )
    .await;
    assert!(!matches!(token, Ok(Ok(_))), "bob cannot issue tokens");
    nats.flush().await.expect("flush");
    refusals
        .expect(&[
            "$KV.provis_assignments.m1",
            "$O.provis_bundles.C.x",
            "provis.master.enroll.token",
        ])
        .await
        .expect("nats-server itself refuses each");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_desired_state_entry_copied_under_another_key_is_refused() {
    let repo = GitRepo::init().expect("repo");
    let mut files = counter_repository(&[("roles/db.toml", "services = []\n")]);
    files.retain(|(path, _)| *path != "assignments.toml");
    files.push((
        "assignments.toml",
        "[[assign]]\nminions = \"web-*\"\nroles = [\"web\"]\n\n[[assign]]\nminions = \"db-*\"\nroles = [\"db\"]\n",
    ));
    repo.commit("two roles", &files).expect("commit");
    let source = repo.path_string();
    let mut fleet = TestFleet::start_secured_with(|config| config.repository = Some(source))
        .await
        .expect("fleet");
    for id in ["web-1", "web-3", "db-1"] {
        fleet
            .add_minion_pinning_master(id, &[])
            .await
            .expect("minion");
    }
    provis_testkit::eventually("web-3 runs counter", Duration::from_secs(20), || async {
        version(&fleet, "web-3").await == Some(json!("1"))
    })
    .await
    .expect("web-3 converges");
    let operator = fleet.connect().await.expect("operator");
    // The assignment the master signed for web-3, as it is now.
    let assignments = async_nats::jetstream::new(operator.clone())
        .get_key_value("provis_assignments")
        .await
        .expect("bucket");
    let first = assignments
        .entry("web-3")
        .await
        .expect("read")
        .expect("web-3's assignment")
        .revision;
    let mut refused = operator
        .subscribe("provis.event.web-3.desired.refused")
        .await
        .expect("subscribe");
    operator.flush().await.expect("flush");

    // web-1, compromised, has the server copy db-1's assignment (signed by
    // the master, for db-1) under web-3's key: a read it may make, with a
    // reply subject nats-server does not check.
    let rogue = fleet
        .minion_options("web-1")
        .expect("web-1's key")
        .connect(fleet.nats().url())
        .await
        .expect("web-1's key is admitted");
    let refusal = copy_and_expect_refusal(
        &rogue,
        "KV_provis_assignments",
        json!({ "last_by_subj": "$KV.provis_assignments.db-1" }),
        "$KV.provis_assignments.web-3",
        &mut refused,
    )
    .await;
    assert_eq!(refusal["bucket"], "provis_assignments", "{refusal}");
    // web-3 keeps its own assignment and its service.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(version(&fleet, "web-3").await, Some(json!("1")));

    // Rolled back: web-3 gets a newer assignment (role db added), then the
    // rogue has the older one, signed for web-3 itself, put back.
    fleet
        .master()
        .await
        .expect("master client")
        .change_role(&provis_core::master_api::RoleRequest {
            op: provis_core::master_api::RoleOp::Assign,
            minion: "web-3".parse().expect("id"),
            role: Some("db".parse().expect("role")),
        })
        .await
        .expect("role assign");
    provis_testkit::eventually("web-3 holds db too", Duration::from_secs(20), || async {
        assignments
            .entry("web-3")
            .await
            .ok()
            .flatten()
            .is_some_and(|entry| entry.revision > first)
    })
    .await
    .expect("newer assignment");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let refusal = copy_and_expect_refusal(
        &rogue,
        "KV_provis_assignments",
        json!({ "seq": first }),
        "$KV.provis_assignments.web-3",
        &mut refused,
    )
    .await;
    assert!(
        refusal["reason"]
            .as_str()
            .is_some_and(|r| r.contains("older value put back")),
        "{refusal}"
    );

    // The same for a service: version 2 published, version 1's pointer (as
    // signed by the master) put back under its name.
    let services = async_nats::jetstream::new(operator.clone())
        .get_key_value("provis_services")
        .await
        .expect("bucket");
    let v1 = services
        .entry("counter")
        .await
        .expect("read")
        .expect("counter's pointer")
        .revision;
    let mut v2_files = files.clone();
    for (path, text) in v2_files.iter_mut() {
        match *path {
            "services/counter/service.toml" => *text = "name = \"counter\"\nversion = \"2\"\n",
            "services/counter/main.js" => *text = "export function version() { return '2' }\n",
            _ => {}
        }
    }
    repo.commit("counter 2", &v2_files).expect("commit");
    sync(&fleet).await;
    provis_testkit::eventually("web-3 runs counter 2", Duration::from_secs(20), || async {
        version(&fleet, "web-3").await == Some(json!("2"))
    })
    .await
    .expect("web-3 takes version 2");
    let refusal = copy_and_expect_refusal(
        &rogue,
        "KV_provis_services",
        json!({ "seq": v1 }),
        "$KV.provis_services.counter",
        &mut refused,
    )
    .await;
    assert_eq!(refusal["bucket"], "provis_services", "{refusal}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(version(&fleet, "web-3").await, Some(json!("2")));
}

/// Has JetStream copy the message `which` picks from `stream` onto the
/// subject `onto` — a read `rogue` may make, with a reply subject nats-server
/// does not check — and returns the data of the `desired.refused` event that
/// follows on `refused`.
async fn copy_and_expect_refusal(
    rogue: &async_nats::Client,
    stream: &str,
    which: Value,
    onto: &str,
    refused: &mut async_nats::Subscriber,
) -> Value {
    rogue
        .publish_with_reply(
            format!("$JS.API.DIRECT.GET.{stream}"),
            onto.to_owned(),
            which.to_string().into(),
        )
        .await
        .expect("sent");
    rogue.flush().await.expect("flush");
    let event = tokio::time::timeout(Duration::from_secs(10), refused.next())
        .await
        .unwrap_or_else(|_| panic!("no desired.refused after a copy onto {onto}"))
        .expect("message");
    let event: Value = serde_json::from_slice(&event.payload).expect("json");
    event["data"].clone()
}

/// Asks the master to fetch its repository and apply what is new.
async fn sync(fleet: &TestFleet) {
    let master = fleet.master().await.expect("master client");
    master.sync().await.expect("sync");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_subset_republished_on_its_role_runs_on_no_one_else() {
    let mut fleet = TestFleet::start_secured().await.expect("fleet");
    for id in ["web-1", "web-2", "web-3"] {
        fleet.add_minion(id, &["web"]).await.expect("minion");
    }
    let client = fleet.client().await.expect("client");
    let nats = client.nats().clone();
    let target = CallTarget::Role("web".parse().expect("role"));
    let request = CallRequest::parse_function("sys.ping", Value::Null, Duration::from_secs(2))
        .expect("request");
    // Replies to one signed envelope published on the role's subject.
    let replies_on_role = |addressed: bool| {
        let mut envelope = request.to_envelope("operator:test", &target);
        envelope.addressed = addressed;
        client.seal(&mut envelope);
        let nats = nats.clone();
        let subject = client.subjects().role_call("web");
        async move {
            let inbox = nats.new_inbox();
            let mut replies = nats.subscribe(inbox.clone()).await.expect("subscribe");
            nats.publish_with_reply(subject, inbox, envelope.encode_to_vec().into())
                .await
                .expect("publish");
            let mut count = 0;
            while let Ok(Some(_)) =
                tokio::time::timeout(Duration::from_millis(1_500), replies.next()).await
            {
                count += 1;
            }
            count
        }
    };
    // An envelope sent to the whole role runs on all three.
    assert_eq!(replies_on_role(false).await, 3);
    // One that was sent to a chosen minion's own subject (a subset), put on
    // the role's subject by whoever captured it: nobody runs it.
    assert_eq!(replies_on_role(true).await, 0);
    // The subset itself still reaches the chosen.
    let selection = client
        .select(
            &target,
            None,
            provis_core::selection::Pick::Count(1),
            Some(3),
        )
        .await
        .expect("selection");
    let report = client
        .call_selected(
            &target,
            &selection,
            &request,
            &provis_core::client::CallPlan::default(),
            &mut |_| {},
        )
        .await
        .expect("call");
    assert_eq!(report.summary.ok, 1, "{report:?}");
}
