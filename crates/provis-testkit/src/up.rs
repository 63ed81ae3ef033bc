//! `provis up` as a test runs it: a whole local fleet started by the real
//! binary on a free loopback port, in a scratch directory, with a context
//! file of its own; stopped with SIGTERM, killed on drop.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;

use crate::{eventually, free_loopback_port};

#[derive(Debug)]
pub struct UpFleet {
    /// Taken by `stop`; killed on drop otherwise.
    child: Option<tokio::process::Child>,
    /// What `up` printed on stdout so far (read as it comes).
    printed: std::sync::Arc<std::sync::Mutex<String>>,
    reader: Option<tokio::task::JoinHandle<()>>,
    context: PathBuf,
    port: u16,
    // Last: removed after the processes are gone.
    work: tempfile::TempDir,
}

impl UpFleet {
    /// Runs `provis up --minions N --repository <examples>` plus `extra`
    /// and waits until the fleet is up (its context file is written).
    pub async fn start(provis_bin: &Path, minions: u16, extra: &[&str]) -> anyhow::Result<Self> {
        Self::start_with_env(provis_bin, minions, extra, &[]).await
    }

    /// Like [`UpFleet::start`], with `env` set for `up` and so for every
    /// process it starts.
    pub async fn start_with_env(
        provis_bin: &Path,
        minions: u16,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let work = tempfile::Builder::new().prefix("provis-up-").tempdir()?;
        let context = work.path().join("context.toml");
        let port = free_loopback_port()?;
        let examples = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../examples")
            .canonicalize()?;
        let mut child = tokio::process::Command::new(provis_bin)
            .args(["up", "--minions", &minions.to_string(), "--repository"])
            .arg(&examples)
            .arg("--dir")
            .arg(work.path().join("up"))
            .arg("--nats-url")
            .arg(format!("nats://127.0.0.1:{port}"))
            .args(extra)
            .env("PROVIS_CONTEXT", &context)
            .env_remove("PROVIS_NATS_URL")
            .env_remove("PROVIS_LOG")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("provis up starts")?;
        let printed = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let reader = child.stdout.take().map(|stdout| {
            let printed = printed.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncBufReadExt as _;
                let mut lines = tokio::io::BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Ok(mut printed) = printed.lock() {
                        printed.push_str(&line);
                        printed.push('\n');
                    }
                }
            })
        });
        let up = Self {
            child: Some(child),
            printed,
            reader,
            context,
            port,
            work,
        };
        eventually(
            "provis up writes its context",
            Duration::from_secs(60),
            || async { up.context.exists() },
        )
        .await?;
        Ok(up)
    }

    /// What `up` printed on stdout so far.
    pub fn printed(&self) -> String {
        self.printed
            .lock()
            .map(|printed| printed.clone())
            .unwrap_or_default()
    }

    /// The context file another shell would read.
    pub fn context(&self) -> &Path {
        &self.context
    }

    /// `nats://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Where `up` keeps its processes' logs and data.
    pub fn dir(&self) -> PathBuf {
        self.work.path().join("up")
    }

    /// The process id of the part `up` runs under `name` (`nats-1`, `master`,
    /// `m1`), found by its log or configuration file in `up`'s directory.
    pub fn pid_of(&self, name: &str) -> Option<u32> {
        let marks = [
            format!("{}/{name}.conf", self.dir().display()),
            format!("--id\0{name}\0"),
        ];
        std::fs::read_dir("/proc")
            .ok()?
            .flatten()
            .find_map(|entry| {
                let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
                let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
                let cmdline = String::from_utf8_lossy(&cmdline);
                let ours = cmdline.contains(&self.dir().display().to_string())
                    || cmdline.contains(&format!("{}", self.dir().display()));
                (ours && marks.iter().any(|mark| cmdline.contains(mark.as_str()))).then_some(pid)
            })
    }

    /// SIGTERM, then everything `up` printed once it stopped.
    pub async fn stop(mut self) -> anyhow::Result<std::process::Output> {
        let child = self.child.take().context("provis up was stopped already")?;
        let pid = child.id().context("provis up has exited already")?;
        crate::terminate(pid)?;
        let mut output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .context("provis up did not stop within 60 s")?
            .context("provis up's output")?;
        if let Some(reader) = self.reader.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
        }
        output.stdout = self.printed().into_bytes();
        Ok(output)
    }
}

impl Drop for UpFleet {
    /// A fleet left behind (a failed test) is stopped in order, so `up`
    /// stops its parts rather than leaving them running without it.
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pid) = child.id()
            && crate::terminate(pid).is_ok()
        {
            let started = std::time::Instant::now();
            while started.elapsed() < Duration::from_secs(30) {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = child.start_kill();
    }
}
