//! The one harness every provis test and benchmark uses: a throwaway
//! nats-server with JetStream ([`NatsServer`]) and a fleet on top of it
//! ([`TestFleet`]) whose master and minions run in-process or as real
//! `provis` processes ([`ProvisProcess`]).
//!
//! Everything is on loopback, on ports the server picks itself, with stores
//! in temporary directories; everything is killed on drop, and the logs of
//! nats-server and of every process are printed when a test fails.

pub mod call_rate;
mod fleet;
mod git;
mod nats;
mod process;
mod process_usage;
mod raw;
mod refusals;
mod up;

pub use fleet::TestFleet;
pub use git::GitRepo;
pub use nats::NatsServer;
pub use process::ProvisProcess;
pub use process_usage::ProcessUsage;
pub use raw::{RawResponders, raw_fanout, timed_call};
pub use refusals::ServerRefusals;
pub use up::UpFleet;

/// Waits until `ready` holds, polling every 25 ms, or fails after `timeout`.
pub async fn eventually<F, Fut>(
    what: &str,
    timeout: std::time::Duration,
    mut ready: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = std::time::Instant::now();
    while !ready().await {
        if started.elapsed() > timeout {
            anyhow::bail!("{what} did not happen within {timeout:?}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    Ok(())
}

/// `GET http://<addr><path>` over plain HTTP/1.1: the status code and the
/// body. For the metrics and health endpoints, which serve nothing else.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let response = http_get_with_cookie(addr, path, None).await?;
    Ok((response.status, response.body))
}

/// One HTTP response as a test reads it.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// The header lines, as sent.
    pub head: String,
    pub body: String,
}

impl HttpResponse {
    /// The value of header `name` (case-insensitive), if sent.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }
}

/// `GET http://<addr><path>`, sending `cookie` when given.
pub async fn http_get_with_cookie(
    addr: std::net::SocketAddr,
    path: &str,
    cookie: Option<&str>,
) -> anyhow::Result<HttpResponse> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let cookie = cookie.map_or_else(String::new, |c| format!("Cookie: {c}\r\n"));
    let mut stream = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::net::TcpStream::connect(addr),
    )
    .await??;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{cookie}Connection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut response = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut response),
    )
    .await??;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("no HTTP response: {response}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no status in {head}"))?;
    Ok(HttpResponse {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    })
}

/// The value of the sample `name` (with its labels, as exposed) in a
/// Prometheus text exposition; none when absent.
pub fn metric_value(exposition: &str, name: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let value = line.strip_prefix(name)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

/// A loopback port that was free a moment ago, for the rare test that must
/// name a port before a server starts (`provis up --nats-url`).
pub fn free_loopback_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Sends SIGTERM to process `pid`: the orderly stop a service manager asks for.
pub fn terminate(pid: u32) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    anyhow::ensure!(status.success(), "kill -TERM {pid} failed: {status}");
    Ok(())
}

/// `python3 script` with the project's Python clients (nats-py, installed by
/// `scripts/install-python-clients.sh` into `.provis/python`) importable:
/// a tool outside provis, as an operator would write one.
pub fn python_command(script: &std::path::Path) -> std::process::Command {
    let clients = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.provis/python");
    let mut command = std::process::Command::new("python3");
    command.arg(script).env("PYTHONPATH", clients);
    command
}

/// Runs a command to completion and returns (exit code, stdout, stderr).
/// It blocks its thread: tests with in-process minions run on a
/// multi-threaded runtime so those minions keep answering meanwhile.
pub fn run_to_end(command: &mut std::process::Command) -> anyhow::Result<(i32, String, String)> {
    let output = command.output()?;
    Ok((
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

/// Writes `(relative path, text)` files under `root`, creating directories:
/// service folders and config repositories for a test.
pub fn write_files(root: &std::path::Path, files: &[(&str, &str)]) -> anyhow::Result<()> {
    for (path, text) in files {
        let path = root.join(path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&path, text)?;
    }
    Ok(())
}

/// Copies the folder `from` to `to` (regular files and folders; links are
/// copied as links, as `cp -a` would), e.g. a service with its `node_modules/`.
pub fn copy_folder(from: &std::path::Path, to: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let (source, target) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type()?;
        if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&source)?, &target)?;
        } else if kind.is_dir() {
            copy_folder(&source, &target)?;
        } else {
            std::fs::copy(&source, &target)?;
        }
    }
    Ok(())
}

/// The service under `tests/fixtures/<name>` with the npm packages its
/// lockfile pins installed (`scripts/test.sh` runs `npm ci` there; so may
/// you). Fails, saying so, when they are not installed.
pub fn npm_fixture(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name);
    let dir = dir
        .canonicalize()
        .map_err(|err| anyhow::anyhow!("{}: {err}", dir.display()))?;
    if !dir.join("node_modules").is_dir() {
        anyhow::bail!(
            "{}: its npm packages are not installed; run `npm ci --ignore-scripts` there (scripts/test.sh does)",
            dir.display()
        );
    }
    Ok(dir)
}

/// Benchmark sizes from `PROVIS_BENCH_SIZES` (comma-separated), else `default`.
pub fn bench_sizes(default: &str) -> Vec<usize> {
    std::env::var("PROVIS_BENCH_SIZES")
        .unwrap_or_else(|_| default.to_owned())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

/// Rounds per figure from `PROVIS_BENCH_ROUNDS`, else `default`.
pub fn bench_rounds(default: usize) -> usize {
    std::env::var("PROVIS_BENCH_ROUNDS")
        .ok()
        .and_then(|rounds| rounds.trim().parse().ok())
        .unwrap_or(default)
}

/// Writes a config repository under `root` whose role `web` runs `slow`,
/// a service whose `work` method keeps its minion busy for `work_ms`.
pub fn write_slow_service(root: &std::path::Path, work_ms: u64) -> anyhow::Result<()> {
    write_files(
        root,
        &[
            ("roles/web.toml", "services = [\"slow\"]\n"),
            (
                "services/slow/service.toml",
                "name = \"slow\"\nversion = \"1\"\n[limits]\ncall_timeout_ms = 10000\n",
            ),
            (
                "services/slow/main.js",
                &format!(
                    "export function work() {{ const t = Date.now(); while (Date.now() - t < {work_ms}) {{}} return 'done' }}\n"
                ),
            ),
        ],
    )
}

/// The median and 99th percentile of `samples` (benchmarks' latency figures).
pub fn p50_p99(mut samples: Vec<f64>) -> (f64, f64) {
    if samples.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    (at(0.5), at(0.99))
}
