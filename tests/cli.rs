//! End-to-end: the `provis` command line itself — its errors, and `provis up`.
#![cfg(test)]

use std::path::Path;
use std::time::Duration;

use provis_testkit::{TestFleet, UpFleet, free_loopback_port, run_to_end};

fn provis() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_provis"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors_are_one_line_that_says_what_to_do() {
    let mut fleet = TestFleet::start().await.expect("fleet");
    fleet.add_minion("m1", &["web"]).await.expect("m1");
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &["call", "--minion", "m1.*", "sys.ping"],
            2,
            "minion id \"m1.*\" may only hold",
        ),
        (
            &["call", "--subject", "web", "sys.ping"],
            2,
            "is not one of 'all', 'role.<role>",
        ),
        (
            &["call", "--subject", "role.Web", "sys.ping"],
            2,
            "role token \"Web\"",
        ),
        (&["call", "--all", "ping"], 2, "is not SERVICE.METHOD"),
        (&["call", "--all", "sys.ping", "{oops"], 2, "are not JSON"),
        (
            &["call", "--subject", "role.nobody", "sys.ping"],
            2,
            "no live minion matches: 0 live in role.nobody",
        ),
        (&["call", "sys.ping"], 2, "--subject"),
        (&["frobnicate"], 2, "unrecognized subcommand"),
        (
            &["call", "--all", "--bogus", "sys.ping"],
            2,
            "unexpected argument '--bogus'",
        ),
    ];
    for (args, expected_code, expected_text) in cases {
        let (code, _, stderr) =
            run_to_end(fleet.provis_command(provis()).args(*args)).expect("provis runs");
        assert_eq!(code, *expected_code, "provis {args:?}: {stderr}");
        assert!(
            stderr.contains(expected_text),
            "provis {args:?} said: {stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_nats_is_a_clear_error_not_a_hang() {
    let fleet = TestFleet::start().await.expect("fleet");
    let port = free_loopback_port().expect("port");
    let started = std::time::Instant::now();
    let (code, _, stderr) = run_to_end(
        fleet
            .provis_command(provis())
            .args(["call", "--all", "sys.ping", "--nats-url"])
            .arg(format!("nats://127.0.0.1:{port}")),
    )
    .expect("provis runs");
    assert_eq!(code, 1);
    assert!(
        stderr.contains("cannot reach NATS at nats://127.0.0.1:"),
        "{stderr}"
    );
    assert!(stderr.contains("provis up"), "it says what to do: {stderr}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_subcommand_has_help() {
    let (code, stdout, _) =
        run_to_end(std::process::Command::new(provis()).arg("--help")).expect("help");
    assert_eq!(code, 0);
    for sub in ["up", "master", "minion", "call", "minions"] {
        assert!(stdout.contains(sub), "--help lists {sub}: {stdout}");
        let (code, stdout, _) =
            run_to_end(std::process::Command::new(provis()).args([sub, "--help"])).expect("help");
        assert_eq!(code, 0, "{sub} --help");
        assert!(stdout.contains("Usage: provis"), "{stdout}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_runs_a_fleet_that_another_shell_can_call_and_stops_it_on_sigterm() {
    let up = UpFleet::start(provis(), 3, &[]).await.expect("provis up");
    let (context, port) = (up.context().to_owned(), up.port());

    // "Another shell": only the context file says where the fleet is.
    let (code, stdout, stderr) = run_to_end(
        std::process::Command::new(provis())
            .args(["call", "--all", "sys.ping", "--output", "json"])
            .env("PROVIS_CONTEXT", &context)
            .env_remove("PROVIS_NATS_URL")
            .env_remove("PROVIS_PREFIX"),
    )
    .expect("provis call");
    assert_eq!(code, 0, "{stdout}{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(report["summary"]["ok"], 3, "{report}");

    // Secured by default: NATS speaks TLS only, and the context says which CA to trust.
    let saved = provis_core::FleetContext::load(&context)
        .expect("context")
        .expect("written");
    assert!(
        saved.tls_ca.is_some(),
        "provis up runs NATS with TLS by default"
    );
    assert!(
        saved.identity.is_some(),
        "provis up gives this shell an operator identity"
    );
    let plain = provis_core::FleetContext {
        tls_ca: None,
        ..saved.clone()
    };
    assert!(
        provis_core::client::connect_nats(&plain, "test")
            .await
            .is_err(),
        "a plaintext client is refused"
    );
    let anonymous = provis_core::FleetContext {
        identity: None,
        ..saved
    };
    assert!(
        provis_core::client::connect_nats(&anonymous, "test")
            .await
            .is_err(),
        "a TLS client without an identity is refused too"
    );

    let (code, stdout, _) = run_to_end(
        std::process::Command::new(provis())
            .args([
                "call",
                "--subject",
                "role.web",
                "sys.ping",
                "--output",
                "json",
            ])
            .env("PROVIS_CONTEXT", &context)
            .env_remove("PROVIS_NATS_URL"),
    )
    .expect("provis call");
    assert_eq!(code, 0, "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(
        report["summary"]["selected"], 2,
        "m1 (web.eu) and m2 (web.us): {report}"
    );

    let output = up.stop().await.expect("up stops in time");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for part in ["nats-server", "master", "m1", "m2", "m3", "web.eu", "db"] {
        assert!(
            stdout.contains(part),
            "the output says what runs where ({part}): {stdout}"
        );
    }
    assert!(
        !context.exists(),
        "the context of a stopped fleet is removed"
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "nats-server is stopped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_list_only_the_flags_that_apply_to_them() {
    let help = |args: &[&str]| {
        let (code, stdout, stderr) =
            run_to_end(std::process::Command::new(provis()).args(args)).expect("help");
        assert_eq!(code, 0, "{args:?}: {stderr}");
        stdout
    };
    // Keys on this machine: no fleet to reach.
    for args in [
        &["keys", "create", "--help"][..],
        &["keys", "list", "--help"],
        &["bundle", "--help"],
    ] {
        let text = help(args);
        assert!(
            !text.contains("--nats-url"),
            "{args:?} lists --nats-url:\n{text}"
        );
        assert!(
            !text.contains("--tls-ca"),
            "{args:?} lists --tls-ca:\n{text}"
        );
    }
    // Commands that talk to a fleet say where it is.
    for args in [
        &["call", "--help"][..],
        &["keys", "pending", "--help"],
        &["master", "sync", "--help"],
        &["status", "--help"],
    ] {
        let text = help(args);
        assert!(
            text.contains("--nats-url"),
            "{args:?} lacks --nats-url:\n{text}"
        );
    }
    // And take them after the subcommand, where they are listed.
    let (code, _, stderr) = run_to_end(
        std::process::Command::new(provis())
            .args([
                "master",
                "sync",
                "--nats-url",
                "nats://127.0.0.1:1",
                "--prefix",
                "x",
            ])
            .env_remove("PROVIS_NATS_URL"),
    )
    .expect("sync");
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("nats://127.0.0.1:1"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_goes_away_ends_a_command_quietly() {
    // `provis bundle DIR | head -0`, without the race: the pipe's reader is
    // gone before provis writes its first line.
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/services/site");
    let output = std::process::Command::new(provis())
        .arg("bundle")
        .arg(&examples)
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("provis bundle")
        .wait_with_output()
        .expect("output");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{:?}: {stderr}", output.status);
    assert!(stderr.is_empty(), "nothing on stderr: {stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provis_minion_runs_a_minion_on_a_secured_fleet_as_provis_minion_does() {
    let lean = Path::new(env!("CARGO_BIN_EXE_provis-minion"));
    let mut fleet = TestFleet::start_secured().await.expect("fleet");
    fleet
        .add_minion_process(lean, "lean", &["web"])
        .await
        .expect("provis-minion joins");
    fleet
        .add_minion_process(provis(), "full", &["web"])
        .await
        .expect("provis minion joins");
    let (code, stdout, stderr) = run_to_end(fleet.provis_command(provis()).args([
        "call",
        "--subject",
        "role.web",
        "sys.ping",
    ]))
    .expect("provis call");
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(
        stdout.contains("lean") && stdout.contains("full"),
        "{stdout}"
    );
    // Its flags are `provis minion`'s, and it says what it is.
    let (code, help, _) = run_to_end(std::process::Command::new(lean).arg("--help")).expect("help");
    assert_eq!(code, 0);
    assert!(
        help.contains("--heartbeat-interval-ms") && help.contains("provis-minion"),
        "{help}"
    );
}
