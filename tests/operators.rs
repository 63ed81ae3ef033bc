//! End-to-end: what operators and their tools get besides the CLI. An
//! observer key followed by the documented nats-py recipe on the default
//! secured fleet; Prometheus metrics that count exactly the calls made;
//! `/readyz` following nats-server; bunyan JSON logs; completions, man
//! pages and the install script.
#![cfg(test)]

use std::path::Path;
use std::time::Duration;

use provis_core::{CallRequest, CallTarget};
use provis_testkit::{TestFleet, UpFleet, eventually, http_get, metric_value, python_command};
use serde_json::Value;

fn provis() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_provis"))
}

fn repo_file(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The metrics address in what `up` printed (`metrics: http://…/metrics`).
fn printed_addr(printed: &str) -> Option<std::net::SocketAddr> {
    printed
        .lines()
        .find_map(|line| line.strip_prefix("metrics: http://"))
        .and_then(|rest| rest.split('/').next())
        .and_then(|addr| addr.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_observer_follows_the_secured_fleet_with_the_documented_python_and_may_do_nothing_else()
{
    let up = UpFleet::start(provis(), 2, &[]).await.expect("provis up");
    let (seed, ca) = (up.dir().join("observer.nk"), up.dir().join("tls/nats.pem"));
    assert!(
        up.printed().contains(&seed.display().to_string()),
        "{}",
        up.printed()
    );
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&seed).expect("seed").permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the seed is as secret as the key");

    // The recipe in docs/integrations.md is the script the suite runs.
    let doc = std::fs::read_to_string(repo_file("docs/integrations.md")).expect("doc");
    let script = std::fs::read_to_string(repo_file("tests/python/observe_fleet.py")).expect("py");
    assert!(
        doc.contains(&format!("```python\n{script}```")),
        "docs/integrations.md shows tests/python/observe_fleet.py as it is"
    );

    let mut command =
        tokio::process::Command::from(python_command(&repo_file("tests/python/observe_fleet.py")));
    let mut follower = command
        .args(["--server", &up.url(), "--follow", "60"])
        .arg("--ca")
        .arg(&ca)
        .arg("--seed")
        .arg(&seed)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 runs (scripts/test.sh installs nats-py)");
    let printed = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let stdout = follower.stdout.take().expect("stdout");
    let copy = printed.clone();
    tokio::spawn(async move {
        use tokio::io::AsyncBufReadExt as _;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            copy.lock().expect("lock").push_str(&format!("{line}\n"));
        }
    });
    let seen = || printed.lock().expect("lock").clone();
    eventually(
        "the last hour is read from PROVIS_EVENTS",
        Duration::from_secs(30),
        || async { seen().contains("master.started") && seen().contains("minion.online") },
    )
    .await
    .unwrap_or_else(|err| panic!("{err}: {}", seen()));

    let (code, _, stderr) = provis_testkit::run_to_end(
        std::process::Command::new(provis())
            .args(["role", "assign", "m1", "cache"])
            .env("PROVIS_CONTEXT", up.context()),
    )
    .expect("role assign");
    assert_eq!(code, 0, "{stderr}");
    eventually(
        "the observer sees the assignment live",
        Duration::from_secs(15),
        || async { seen().contains("role.assigned") },
    )
    .await
    .unwrap_or_else(|err| panic!("{err}: {}", seen()));
    drop(follower);

    let (code, stdout, stderr) = provis_testkit::run_to_end(
        python_command(&repo_file("tests/python/observer_refused.py"))
            .arg(up.url())
            .arg(&ca)
            .arg(&seed),
    )
    .expect("python3");
    assert_eq!(code, 0, "{stderr}");
    let refused: Value = serde_json::from_str(&stdout).expect("json");
    assert!(
        refused["publish"]
            .as_str()
            .is_some_and(|e| e.contains("permissions violation")),
        "a call is refused: {refused}"
    );
    assert!(
        !refused["request"].is_null(),
        "the master cannot be asked: {refused}"
    );
    up.stop().await.expect("up stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_exactly_the_calls_made_and_readyz_follows_nats_server() {
    let master_addr = provis_testkit::free_loopback_port().expect("port");
    let minion_addr = provis_testkit::free_loopback_port().expect("port");
    let master_addr: std::net::SocketAddr = ([127, 0, 0, 1], master_addr).into();
    let minion_addr: std::net::SocketAddr = ([127, 0, 0, 1], minion_addr).into();
    let mut fleet = TestFleet::start_with(|config| config.metrics_addr = Some(master_addr))
        .await
        .expect("fleet");
    let mut config = fleet.minion_config("m1", &["web"]).expect("config");
    config.metrics_addr = Some(minion_addr);
    fleet.add_minion_with(config).await.expect("m1");
    fleet.add_minion("m2", &["web"]).await.expect("m2");

    let scrape = |addr| async move {
        let (status, body) = http_get(addr, "/metrics").await.expect("scrape");
        assert_eq!(status, 200, "{body}");
        body
    };
    let text = scrape(master_addr).await;
    assert!(text.contains("# TYPE provis_calls counter"), "{text}");
    assert!(text.ends_with("# EOF\n"), "OpenMetrics text: {text}");
    let before = metric_value(&text, "provis_calls_total").expect("calls counted");
    let minion_before = metric_value(
        &scrape(minion_addr).await,
        "provis_calls_total{status=\"ok\"}",
    )
    .unwrap_or(0.0);

    let client = fleet.client().await.expect("client");
    let request = CallRequest::parse_function("sys.ping", Value::Null, Duration::from_secs(3))
        .expect("request");
    for _ in 0..3 {
        let report = client
            .call(
                &CallTarget::parse_subject("role.web").expect("target"),
                &request,
            )
            .await
            .expect("call");
        assert_eq!(report.summary.ok, 2);
    }
    eventually(
        "the master counts 3 calls",
        Duration::from_secs(10),
        || async {
            metric_value(&scrape(master_addr).await, "provis_calls_total") == Some(before + 3.0)
        },
    )
    .await
    .expect("counted");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let text = scrape(master_addr).await;
    assert_eq!(
        metric_value(&text, "provis_calls_total"),
        Some(before + 3.0),
        "exactly the calls made: {text}"
    );
    assert!(
        metric_value(&text, "provis_call_replies_total{status=\"ok\"}").is_some_and(|n| n >= 6.0),
        "{text}"
    );
    let minion = scrape(minion_addr).await;
    assert_eq!(
        metric_value(&minion, "provis_calls_total{status=\"ok\"}"),
        Some(minion_before + 3.0),
        "{minion}"
    );
    assert!(
        minion.contains("provis_heartbeats_total{outcome=\"written\"}"),
        "{minion}"
    );

    for addr in [master_addr, minion_addr] {
        assert_eq!(http_get(addr, "/healthz").await.expect("healthz").0, 200);
        assert_eq!(http_get(addr, "/readyz").await.expect("readyz").0, 200);
    }
    fleet.nats_mut().kill();
    for addr in [master_addr, minion_addr] {
        eventually(
            "unready without nats-server",
            Duration::from_secs(15),
            || async {
                http_get(addr, "/readyz")
                    .await
                    .is_ok_and(|(status, _)| status == 503)
            },
        )
        .await
        .expect("unready");
        assert_eq!(
            http_get(addr, "/healthz").await.expect("healthz").0,
            200,
            "alive all the same"
        );
    }
    let (_, why) = http_get(master_addr, "/readyz").await.expect("readyz");
    assert!(why.contains("not ready"), "{why}");
    fleet.nats_mut().restart().expect("nats back");
    for addr in [master_addr, minion_addr] {
        eventually("ready again", Duration::from_secs(30), || async {
            http_get(addr, "/readyz")
                .await
                .is_ok_and(|(status, _)| status == 200)
        })
        .await
        .expect("ready");
    }
    fleet.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_json_log_line_of_a_fleet_run_carries_the_bunyan_fields() {
    let up = UpFleet::start_with_env(provis(), 2, &[], &[("PROVIS_LOG_FORMAT", "json")])
        .await
        .expect("provis up");
    let metrics = printed_addr(&up.printed()).expect("up prints the metrics URL");
    assert_eq!(http_get(metrics, "/readyz").await.expect("readyz").0, 200);
    let (code, _, stderr) = provis_testkit::run_to_end(
        std::process::Command::new(provis())
            .args(["call", "--all", "sys.ping"])
            .env("PROVIS_CONTEXT", up.context()),
    )
    .expect("call");
    assert_eq!(code, 0, "{stderr}");
    // Read while the fleet runs: its scratch directory goes with it.
    let mut lines = String::new();
    for part in ["master", "m1", "m2"] {
        lines.push_str(
            &std::fs::read_to_string(up.dir().join(format!("{part}.log"))).expect("a part's log"),
        );
    }
    up.stop().await.expect("up stops");
    let mut names = std::collections::BTreeSet::new();
    let mut count = 0;
    for line in lines.lines().filter(|l| !l.trim().is_empty()) {
        let record: Value = serde_json::from_str(line)
            .unwrap_or_else(|err| panic!("not a JSON line ({err}): {line}"));
        for field in ["v", "level", "name", "hostname", "pid", "time", "msg"] {
            assert!(!record[field].is_null(), "{field} missing: {line}");
        }
        assert!(record["level"].is_u64(), "{line}");
        names.insert(record["name"].as_str().unwrap_or_default().to_owned());
        count += 1;
    }
    assert!(count > 10, "a fleet run logs: {count} lines");
    assert!(
        names.contains("provis-master") && names.contains("provis-minion"),
        "{names:?}"
    );
}

#[test]
fn completions_and_man_pages_install_for_every_command() {
    let prefix = tempfile::tempdir().expect("tmp");
    let bin_dir = provis().parent().expect("bin dir");
    let (code, stdout, stderr) = provis_testkit::run_to_end(
        std::process::Command::new(repo_file("scripts/install.sh"))
            .arg("--prefix")
            .arg(prefix.path())
            .arg("--from")
            .arg(bin_dir),
    )
    .expect("install.sh");
    assert_eq!(code, 0, "{stdout}{stderr}");
    let share = prefix.path().join("share");
    for (path, needle) in [
        ("bash-completion/completions/provis", "_provis"),
        ("zsh/site-functions/_provis", "#compdef provis"),
        (
            "fish/vendor_completions.d/provis.fish",
            "complete -c provis",
        ),
    ] {
        let text = std::fs::read_to_string(share.join(path)).expect(path);
        assert!(text.contains(needle), "{path}");
        assert!(
            text.contains("rollout") && text.contains("export"),
            "{path}"
        );
    }
    // A page per command and subcommand, as `provis help` lists them.
    let (_, help, _) =
        provis_testkit::run_to_end(std::process::Command::new(provis()).arg("help")).expect("help");
    let commands: Vec<&str> = help
        .split("Commands:")
        .nth(1)
        .expect("commands")
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .take_while(|word| !word.ends_with(':'))
        .filter(|word| *word != "help")
        .collect();
    assert!(commands.len() > 15, "{commands:?}");
    let man = share.join("man/man1");
    for command in commands {
        assert!(
            man.join(format!("provis-{command}.1")).exists(),
            "provis-{command}.1"
        );
    }
    assert!(man.join("provis-keys-export.1").exists());
    if let Ok(found) = std::process::Command::new("man")
        .arg("-M")
        .arg(share.join("man"))
        .args(["-w", "provis-call"])
        .output()
    {
        assert!(
            found.status.success(),
            "man finds provis-call under the prefix"
        );
    }
}

#[test]
fn the_deploy_examples_are_valid_settings() {
    let master: provis_master::MasterConfig = toml::from_str(
        &std::fs::read_to_string(repo_file("deploy/master.toml.example")).expect("master"),
    )
    .expect("master.toml.example parses");
    assert!(master.metrics_addr.is_some() && !master.observers.is_empty());
    let minion: provis_minion::MinionConfig = toml::from_str(
        &std::fs::read_to_string(repo_file("deploy/minion.toml.example")).expect("minion"),
    )
    .expect("minion.toml.example parses");
    assert_eq!(minion.log_format, provis_telemetry::LogFormat::Json);
}
