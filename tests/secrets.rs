//! End-to-end: sealed secrets from git. A value sealed with `provis secret
//! seal` reaches the services of the minions it is sealed to, and nobody
//! else: another minion holding the sealed bytes cannot open them, a commit
//! that leaves a member out is rejected naming it, a service asking for a
//! secret that does not exist is a validation error naming the line, and
//! the value appears in no reply, event, state or log.
#![cfg(test)]

use std::io::Write as _;
use std::path::Path;
use std::time::Duration;

use futures::StreamExt as _;
use provis_core::identity::Identity;
use provis_core::sealed_secret::SealedSecret;
use provis_testkit::{GitRepo, TestFleet, eventually, run_to_end};
use serde_json::{Value, json};

const VALUE: &str = "s3cret-value-42";

fn provis() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_provis"))
}

fn vault_manifest(granted: bool) -> String {
    let grant = if granted {
        "secrets = [\"db_password\"]\n"
    } else {
        ""
    };
    format!("name = \"vault\"\nversion = \"1\"\n[capabilities]\n{grant}")
}

const VAULT: &str = "export function length() { return provis.secrets.get('db_password').length }\nexport function leak() { const v = provis.secrets.get('db_password'); provis.log.warn('the password is ' + v); provis.events.emit('leaked', { v }); provis.state.set('copy', v); return v }\n";

/// Roles web and db both run `vault`; w* are web, d* are db.
fn commit(repo: &GitRepo, message: &str, granted: bool) -> String {
    repo.commit(
        message,
        &[
            ("roles/web.toml", "services = [\"vault\"]\n"),
            ("roles/db.toml", "services = [\"vault\"]\n"),
            ("services/vault/service.toml", &vault_manifest(granted)),
            ("services/vault/main.js", VAULT),
            (
                "assignments.toml",
                "[[assign]]\nminions = \"w*\"\nroles = [\"web\"]\n\n[[assign]]\nminions = \"d*\"\nroles = [\"db\"]\n",
            ),
        ],
    )
    .expect("commit")
}

fn sync(fleet: &TestFleet) -> Value {
    let (code, stdout, stderr) =
        run_to_end(fleet.provis_command(provis()).args(["master", "sync"])).expect("sync");
    serde_json::from_str(&stdout).unwrap_or_else(|_| json!({ "code": code, "stderr": stderr }))
}

/// `provis secret ARGS` with `stdin` on its standard input.
fn secret(fleet: &TestFleet, args: &[&str], stdin: &str) -> (i32, String, String) {
    let mut command = fleet.provis_command(provis());
    command
        .arg("secret")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = command.spawn().expect("provis secret");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write the value");
    let output = child.wait_with_output().expect("wait");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

async fn call(fleet: &TestFleet, minion: &str, function: &str) -> (Option<Value>, Option<String>) {
    let reply = fleet
        .call_one(minion, function, Value::Null)
        .await
        .expect("call");
    (reply.result, reply.error.map(|e| e.message))
}

async fn converged(fleet: &TestFleet, commit: &str, minions: usize) {
    eventually(
        &format!("{minions} minions converged on {commit}"),
        Duration::from_secs(30),
        || fleet.converged_on(commit, minions),
    )
    .await
    .expect("converged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_secret_reaches_its_members_only_and_its_value_never_leaks() {
    let repo = GitRepo::init().expect("git");
    let first = commit(&repo, "vault without secrets", false);
    let mut fleet = TestFleet::start_following(&repo).await.expect("fleet");
    for (id, role) in [("w1", "web"), ("w2", "web"), ("d1", "db")] {
        fleet
            .add_minion_process(provis(), id, &[role])
            .await
            .expect("minion");
    }
    // The master applied the head when it started, or applies it now.
    let answer = sync(&fleet);
    assert!(
        answer["outcome"] == "applied" || answer["outcome"] == "unchanged",
        "{answer}"
    );
    converged(&fleet, &first, 3).await;

    // A service granted a secret that does not exist: rejected, file and line.
    commit(&repo, "grant a secret nobody sealed", true);
    let answer = sync(&fleet);
    assert_eq!(answer["outcome"], "rejected", "{answer}");
    let problems = answer["problems"].to_string();
    assert!(
        problems.contains("services/vault/service.toml")
            && problems.contains("line 4: secret \\\"db_password\\\" is not in secrets/"),
        "{answer}"
    );

    // Seal it to the web role, keeping a copy for alice.
    let alice = fleet.workdir().join("alice.key");
    Identity::create(&alice).expect("alice");
    let repo_dir = repo.path_string();
    let seal = [
        "seal",
        "--role",
        "web",
        "db_password",
        "--repository",
        &repo_dir,
        "--key",
        alice.to_str().expect("utf-8"),
    ];
    let (code, stdout, stderr) = secret(&fleet, &seal, &format!("{VALUE}\n"));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("sealed db_password to w1, w2"), "{stdout}");
    let file = std::fs::read_to_string(repo.path().join("secrets/db_password.toml")).expect("file");
    assert!(!file.contains(VALUE), "the file holds sealed copies only");
    let sealed = SealedSecret::parse(&file).expect("a sealed secret");
    assert_eq!(sealed.sealed.keys().collect::<Vec<_>>(), ["w1", "w2"]);

    let second = commit(&repo, "db_password for web", true);
    assert_eq!(sync(&fleet)["outcome"], "applied");
    converged(&fleet, &second, 3).await;

    let mut events = fleet
        .nats()
        .connect()
        .await
        .expect("nats")
        .subscribe("provis.event.>")
        .await
        .expect("events");
    assert_eq!(
        call(&fleet, "w1", "vault.length").await.0,
        Some(json!(VALUE.len()))
    );
    assert_eq!(
        call(&fleet, "w2", "vault.length").await.0,
        Some(json!(VALUE.len()))
    );
    let (_, error) = call(&fleet, "d1", "vault.length").await;
    assert!(
        error
            .as_deref()
            .is_some_and(|e| e.contains("not sealed to this minion")),
        "{error:?}"
    );
    // A service that tries to leak it hands back, emits, stores and logs the name only.
    assert_eq!(
        call(&fleet, "w1", "vault.leak").await.0,
        Some(json!("[secret db_password]"))
    );
    let leaked = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(event) = events.next().await {
            if event.subject.ends_with(".vault.leaked") {
                return event;
            }
        }
        panic!("the events ended");
    })
    .await
    .expect("the event");
    let payload = String::from_utf8_lossy(&leaked.payload).into_owned();
    assert!(
        payload.contains("[secret db_password]") && !payload.contains(VALUE),
        "{payload}"
    );
    let log = fleet.process_mut("w1").expect("w1").log();
    assert!(
        log.contains("the password is [secret db_password]"),
        "{log}"
    );
    assert!(!log.contains(VALUE), "the value is in w1's log");

    // d1 holds w1's sealed bytes (anyone can read them in git) and cannot open them.
    let d1 = Identity::load(&fleet.minion_data_dir("d1").join("minion.key")).expect("d1's key");
    let w1 = Identity::load(&fleet.minion_data_dir("w1").join("minion.key")).expect("w1's key");
    let w1_copy = &sealed.sealed["w1"].value;
    assert!(d1.open_sealed(w1_copy).is_err(), "d1 opened w1's copy");
    assert_eq!(
        w1.open_sealed(w1_copy).expect("w1 opens it"),
        VALUE.as_bytes()
    );

    // A new web minion is a member the secret is not sealed to: the next
    // commit is rejected, naming it, until the secret is resealed.
    fleet
        .add_minion_process(provis(), "w3", &["web"])
        .await
        .expect("w3");
    commit(&repo, "a commit after w3 joined", true);
    let answer = sync(&fleet);
    assert_eq!(answer["outcome"], "rejected", "{answer}");
    assert!(
        answer["problems"].to_string().contains("missing w3"),
        "{answer}"
    );
    let reseal = [
        "reseal",
        "--repository",
        &repo_dir,
        "--key",
        alice.to_str().expect("utf-8"),
    ];
    let (code, stdout, stderr) = secret(&fleet, &reseal, "");
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("resealed db_password: w1 (kept), w2 (kept), w3"),
        "{stdout}"
    );
    let third = commit(&repo, "db_password resealed for w3", true);
    assert_eq!(sync(&fleet)["outcome"], "applied");
    converged(&fleet, &third, 4).await;
    assert_eq!(
        call(&fleet, "w3", "vault.length").await.0,
        Some(json!(VALUE.len()))
    );
}
