//! Services as JavaScript developers write them: real npm packages as
//! `npm ci` installed them (CommonJS, ES modules only, conditional exports,
//! a dependency chain), TypeScript with stacks that name the `.ts` line,
//! packing that is deterministic and refuses Node built-ins with their
//! chain, and `provis service new|run|test` without a fleet.
#![cfg(test)]

use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use provis_bundle::PackedBundle;
use provis_testkit::{TestFleet, copy_folder, npm_fixture, run_to_end, write_files};
use serde_json::{Value, json};

fn provis() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_provis"))
}

/// `provis ARGS` run to its end: (exit code, stdout, stderr).
fn provis_cli(args: &[&str]) -> (i32, String, String) {
    let mut command = std::process::Command::new(provis());
    command.args(args);
    run_to_end(&mut command).expect("provis runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn npm_packages_and_typescript_run_on_a_minion_with_stacks_in_the_authors_lines() {
    let fixture = npm_fixture("npm-service").expect("fixture");
    let mut fleet = TestFleet::start().await.expect("fleet");
    let repo = fleet.workdir().join("repo");
    copy_folder(&fixture, &repo.join("services/packages")).expect("copy the service");
    write_files(&repo, &[("roles/web.toml", "services = [\"packages\"]\n")]).expect("role");
    fleet.apply(&repo).await.expect("apply");
    let digest = PackedBundle::from_dir(&repo.join("services/packages"))
        .expect("pack")
        .digest;
    fleet
        .add_minion_process(provis(), "m1", &["web"])
        .await
        .expect("m1");
    fleet
        .wait_service("m1", "packages", &digest)
        .await
        .expect("loaded");

    let call = |function: &'static str, args: Value| {
        let fleet = &fleet;
        async move {
            let reply = fleet.call_one("m1", function, args).await.expect("call");
            (reply.result, reply.error)
        }
    };
    // semver: CommonJS, `module.exports = {…}`, default and named imports.
    let (result, error) = call(
        "packages.check",
        json!({"version": "1.4.2", "range": "^1.2.0"}),
    )
    .await;
    assert_eq!(
        result,
        Some(json!({"major": 1, "minor": 4, "supported": true})),
        "{error:?}"
    );
    let (result, _) = call(
        "packages.check",
        json!({"version": "2.0.0", "range": "^1.2.0"}),
    )
    .await;
    assert_eq!(
        result,
        Some(json!({"major": 2, "minor": 0, "supported": false}))
    );
    // is-odd → is-number: a chain of CommonJS packages.
    assert_eq!(
        call("packages.parity", json!({"n": 7})).await.0,
        Some(json!("odd"))
    );
    // nanoid/non-secure: ES modules only.
    let (ids, _) = call("packages.ids", json!({"count": 3})).await;
    let ids = ids.expect("ids");
    assert_eq!(ids.as_array().map(Vec::len), Some(3));
    assert!(
        ids.as_array()
            .expect("array")
            .iter()
            .all(|id| id.as_str().is_some_and(|id| id.len() == 8))
    );
    // uuid: its `exports` conditions pick the browser-neutral ES build; v5 of
    // a DNS name is the same everywhere.
    let (result, _) = call("packages.name_id", json!({"name": "example.com"})).await;
    assert_eq!(
        result,
        Some(json!({"id": "cfbff0d1-9375-5685-968c-48ce8b15ae17", "valid": true}))
    );
    // A thrown error's stack names the TypeScript line that threw.
    let (_, error) = call("packages.explode", Value::Null).await;
    let error = error.expect("an error");
    assert_eq!(error.message, "Error: exploded on purpose");
    let stack = error.stack.expect("a stack");
    assert!(stack.contains("at explode (main.ts:43:"), "{stack}");

    // A TypeScript release that throws while loading: `service.failed`
    // says where, in the .ts file, and the old version keeps serving.
    let nats = fleet.nats().connect().await.expect("nats");
    let mut failed = nats
        .subscribe("provis.event.m1.service.failed")
        .await
        .expect("subscribe");
    let broken = fleet.workdir().join("broken");
    write_files(
        &broken,
        &[
            ("service.toml", "name = \"packages\"\nversion = \"2.0.0-broken\"\nentry = \"main.ts\"\n"),
            (
                "main.ts",
                "interface Setting {\n  name: string;\n}\n\nconst setting: Setting = { name: \"x\" };\nexport function name(): string { return setting.name; }\nthrow new Error(\"bad release\");\n",
            ),
        ],
    )
    .expect("write");
    let store = fleet.bundle_store().await.expect("store");
    let broken = PackedBundle::from_dir(&broken).expect("pack");
    store.publish(&broken, None).await.expect("publish");
    let event = tokio::time::timeout(Duration::from_secs(10), failed.next())
        .await
        .expect("service.failed in time")
        .expect("an event");
    let event: Value = serde_json::from_slice(&event.payload).expect("json");
    let reason = event["data"]["reason"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        reason.contains("bad release") && reason.contains("main.ts:7:"),
        "{event}"
    );
    assert_eq!(
        call("packages.parity", json!({"n": 2})).await.0,
        Some(json!("even"))
    );
}

#[test]
fn packing_is_deterministic_lists_packages_and_refuses_node_builtins_with_their_chain() {
    let fixture = npm_fixture("npm-service").expect("fixture");
    let work = tempfile::tempdir().expect("tempdir");
    // Two installs of the same lockfile (copies made at other times): one digest.
    let (a, b) = (work.path().join("a"), work.path().join("b"));
    copy_folder(&fixture, &a).expect("copy");
    std::thread::sleep(Duration::from_millis(20));
    copy_folder(&fixture, &b).expect("copy");
    let (packed_a, packed_b) = (
        PackedBundle::from_dir(&a).expect("pack a"),
        PackedBundle::from_dir(&b).expect("pack b"),
    );
    assert_eq!(packed_a.digest, packed_b.digest);
    // Only what the service reaches: nanoid's crypto-backed entry is not in it.
    assert!(
        packed_a
            .files
            .contains_key("node_modules/nanoid/non-secure/index.js")
    );
    assert!(!packed_a.files.contains_key("node_modules/nanoid/index.js"));
    assert!(packed_a.files.contains_key("main.ts.map"));

    // What a bundle holds, for audit.
    let (code, stdout, stderr) =
        provis_cli(&["bundle", a.to_str().expect("utf-8"), "--output", "json"]);
    assert_eq!(code, 0, "{stderr}");
    let listed: Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(listed["digest"], json!(packed_a.digest));
    let semver = listed["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .find(|p| p["name"] == "semver")
        .expect("semver listed")
        .clone();
    assert_eq!(semver["version"], "7.7.3");
    assert_eq!(semver["license"], "ISC");
    assert!(
        semver["integrity"]
            .as_str()
            .is_some_and(|i| i.starts_with("sha512-")),
        "{semver}"
    );
    let names: Vec<&str> = listed["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(names, ["is-number", "is-odd", "nanoid", "semver", "uuid"]);

    // A module that reaches a Node built-in is refused with the chain to it.
    write_files(
        &a,
        &[(
            "lib/ids.ts",
            "import { nanoid } from \"nanoid\";\nexport const id = (): string => nanoid();\n",
        )],
    )
    .expect("write");
    let err = PackedBundle::from_dir(&a).expect_err("refused").to_string();
    assert!(
        err.starts_with("lib/ids.ts → nanoid → crypto: needs the Node built-in \"crypto\""),
        "{err}"
    );
    std::fs::remove_file(a.join("lib/ids.ts")).expect("remove");

    // node_modules that is not what the lockfile pins is refused.
    let semver_json = b.join("node_modules/semver/package.json");
    let text = std::fs::read_to_string(&semver_json).expect("read");
    std::fs::write(
        &semver_json,
        text.replace("\"version\": \"7.7.3\"", "\"version\": \"7.7.2\""),
    )
    .expect("write");
    let err = PackedBundle::from_dir(&b).expect_err("refused").to_string();
    assert!(
        err.contains("node_modules/semver is 7.7.2 but package-lock.json pins 7.7.3"),
        "{err}"
    );
}

#[test]
fn service_test_and_run_work_without_a_fleet() {
    let fixture = npm_fixture("npm-service").expect("fixture");
    let dir = fixture.to_str().expect("utf-8");
    let (code, stdout, stderr) = provis_cli(&["service", "test", dir]);
    assert_eq!(code, 1, "a failing test fails the run: {stdout}{stderr}");
    assert!(
        stdout.contains("ok   main.test.ts › parity comes from is-odd"),
        "{stdout}"
    );
    assert!(stdout.contains("FAIL main.test.ts › this one fails on purpose: AssertionError: expected \"odd\", got \"even\""), "{stdout}");
    assert!(
        stdout.contains("main.test.ts:18:"),
        "the failure's line: {stdout}"
    );
    assert!(
        stdout.trim_end().ends_with("3 passed, 1 failed"),
        "{stdout}"
    );

    let (code, stdout, stderr) = provis_cli(&[
        "service",
        "run",
        dir,
        "check",
        r#"{"version": "3.1.0", "range": ">=3"}"#,
    ]);
    assert_eq!(code, 0, "{stderr}");
    let result: Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(result, json!({"major": 3, "minor": 1, "supported": true}));
    let (code, _, stderr) = provis_cli(&["service", "run", dir, "explode"]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("Error: exploded on purpose") && stderr.contains("main.ts:43:"),
        "{stderr}"
    );

    // A new service, in TypeScript, passes its own test and runs.
    let work = tempfile::tempdir().expect("tempdir");
    let new = work.path().join("hello");
    let new_dir = new.to_str().expect("utf-8");
    let (code, stdout, stderr) =
        provis_cli(&["service", "new", "hello", "--typescript", "--dir", new_dir]);
    assert_eq!(code, 0, "{stderr}");
    for file in [
        "service.toml",
        "main.ts",
        "main.test.ts",
        "package.json",
        "tsconfig.json",
        "provis.d.ts",
    ] {
        assert!(new.join(file).is_file(), "{file} written: {stdout}");
    }
    let (code, stdout, stderr) = provis_cli(&["service", "test", new_dir]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.trim_end().ends_with("1 passed, 0 failed"),
        "{stdout}"
    );
    let (code, stdout, stderr) =
        provis_cli(&["service", "run", new_dir, "hello", r#"{"name": "ops"}"#]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        serde_json::from_str::<Value>(&stdout).expect("json"),
        json!({"greeting": "hello ops", "minion": "local"})
    );
    let (code, _, stderr) = provis_cli(&["service", "new", "Bad Name", "--dir", new_dir]);
    assert_ne!(code, 0);
    assert!(stderr.contains("lowercase"), "{stderr}");
}
