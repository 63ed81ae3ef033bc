//! A throwaway nats-server: JetStream on, a random loopback port chosen by
//! the server itself (`-p -1`, read back from its ports file, so two tests
//! never race for a port), a temporary store, killed on drop. A secured
//! server also sends every connection to a master's auth callout.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use provis_core::nats_server::locate_nats_server;

#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    binary: PathBuf,
    config: Option<PathBuf>,
}

impl NatsServer {
    /// Starts a server and waits until it accepts connections.
    pub fn start() -> anyhow::Result<Self> {
        let binary = locate_nats_server()?;
        let dir = tempfile::Builder::new().prefix("provis-nats-").tempdir()?;
        let (child, port) = spawn(&binary, dir.path(), None, None)?;
        Ok(Self {
            child: Some(child),
            port,
            dir,
            binary,
            config: None,
        })
    }

    /// Starts a server with `settings` (nats-server configuration text, for
    /// example `max_payload: 32768`) on top of the usual flags.
    pub fn start_with_settings(settings: &str) -> anyhow::Result<Self> {
        let binary = locate_nats_server()?;
        let dir = tempfile::Builder::new().prefix("provis-nats-").tempdir()?;
        let config = dir.path().join("nats-server.conf");
        std::fs::write(&config, settings)?;
        let (child, port) = spawn(&binary, dir.path(), None, Some(&config))?;
        Ok(Self {
            child: Some(child),
            port,
            dir,
            binary,
            config: Some(config),
        })
    }

    /// Starts a server that admits connections only through the auth callout
    /// of the master holding `master` (see `provis master nats-config`).
    pub fn start_secured(master: &provis_core::identity::Identity) -> anyhow::Result<Self> {
        Self::start_with_settings(&provis_core::bus_access::server_auth_config(master))
    }

    /// `nats://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A plain NATS client of this server.
    pub async fn connect(&self) -> anyhow::Result<async_nats::Client> {
        Ok(async_nats::connect(self.url()).await?)
    }

    /// Everything the server logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats-server.log")).unwrap_or_default()
    }

    /// Kills the server (as a crash would) and starts it again on the same
    /// port with the same store: JetStream data survives, connections drop.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        let (child, _) = spawn(
            &self.binary,
            self.dir.path(),
            Some(self.port),
            self.config.as_deref(),
        )?;
        self.child = Some(child);
        Ok(())
    }

    /// Kills the server; `restart` brings it back.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn spawn(
    binary: &Path,
    dir: &Path,
    port: Option<u16>,
    config: Option<&Path>,
) -> anyhow::Result<(Child, u16)> {
    let port_arg = port.map_or_else(|| "-1".to_owned(), |port| port.to_string());
    let mut command = Command::new(binary);
    if let Some(config) = config {
        command.arg("-c").arg(config);
    }
    let mut child = command
        .args(["-a", "127.0.0.1", "-p", &port_arg, "-js", "-sd"])
        .arg(dir.join("jetstream"))
        .arg("--ports_file_dir")
        .arg(dir)
        .arg("-l")
        .arg(dir.join("nats-server.log"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))?;
    let ports_file = dir.join(format!("nats-server_{}.ports", child.id()));
    let started = Instant::now();
    loop {
        if let Some(port) = read_port(&ports_file)
            && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        {
            return Ok((child, port));
        }
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(dir.join("nats-server.log")).unwrap_or_default();
            bail!("nats-server exited ({status}) at start:\n{log}");
        }
        if started.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            bail!("nats-server did not listen within 15 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The client port from nats-server's ports file (`{"nats": ["nats://127.0.0.1:PORT"], …}`).
fn read_port(path: &Path) -> Option<u16> {
    let text = std::fs::read_to_string(path).ok()?;
    let ports: serde_json::Value = serde_json::from_str(&text).ok()?;
    let url = ports["nats"][0].as_str()?;
    url.rsplit(':').next()?.parse().ok()
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- nats-server log ----\n{}", self.log());
        }
        self.kill();
    }
}
