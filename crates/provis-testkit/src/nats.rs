//! A throwaway nats-server, or a cluster of them: JetStream on every node,
//! loopback only, temporary stores, killed on drop. A single server takes a
//! random port chosen by the server itself (`-p -1`, read back from its
//! ports file, so two tests never race for a port); a cluster's nodes take
//! ports picked for them, since each must name the others' route ports. A
//! secured server (every node of a secured cluster) sends each connection
//! to a master's auth callout.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use provis_core::nats_server::locate_nats_server;

/// The cluster's name in every node's configuration.
const CLUSTER_NAME: &str = "provis-test";

#[derive(Debug)]
pub struct NatsServer {
    nodes: Vec<Node>,
    dir: tempfile::TempDir,
    binary: PathBuf,
}

/// One nats-server process of a [`NatsServer`].
#[derive(Debug)]
struct Node {
    child: Option<Child>,
    /// Known once the node listened (a single server picks its own at first).
    port: Option<u16>,
    /// The node's own directory: store, log, ports file.
    dir: PathBuf,
    config: Option<PathBuf>,
}

impl NatsServer {
    /// Starts a server and waits until it accepts connections.
    pub fn start() -> anyhow::Result<Self> {
        Self::launch(1, None)
    }

    /// Starts a server with `settings` (nats-server configuration text, for
    /// example `max_payload: 32768`) on top of the usual flags.
    pub fn start_with_settings(settings: &str) -> anyhow::Result<Self> {
        Self::launch(1, Some(settings))
    }

    /// Starts a server that admits connections only through the auth callout
    /// of the master holding `master` (see `provis master nats-config`).
    pub fn start_secured(master: &provis_core::identity::Identity) -> anyhow::Result<Self> {
        Self::start_with_settings(&provis_core::bus_access::server_auth_config(master))
    }

    /// Starts a cluster of `size` nodes, routed to each other, JetStream on
    /// each, and waits until JetStream has a leader (it can store).
    pub async fn start_cluster(size: usize) -> anyhow::Result<Self> {
        let cluster = Self::launch(size.max(2), None)?;
        cluster.wait_for_jetstream().await?;
        Ok(cluster)
    }

    /// A cluster of `size` nodes each admitting connections only through
    /// the auth callout of the master holding `master`. JetStream can only
    /// be checked once that master runs.
    pub fn start_secured_cluster(
        size: usize,
        master: &provis_core::identity::Identity,
    ) -> anyhow::Result<Self> {
        Self::launch(
            size.max(2),
            Some(&provis_core::bus_access::server_auth_config(master)),
        )
    }

    fn launch(size: usize, settings: Option<&str>) -> anyhow::Result<Self> {
        let binary = locate_nats_server()?;
        let dir = tempfile::Builder::new().prefix("provis-nats-").tempdir()?;
        let clustered = size > 1;
        // A cluster's ports are fixed up front: every node names the others'.
        let ports: Vec<(u16, u16)> = if clustered {
            (0..size)
                .map(|_| Ok((crate::free_loopback_port()?, crate::free_loopback_port()?)))
                .collect::<anyhow::Result<_>>()?
        } else {
            Vec::new()
        };
        let cluster_nodes: Vec<provis_core::nats_server::ClusterNode> = ports
            .iter()
            .enumerate()
            .map(
                |(index, &(client_port, route_port))| provis_core::nats_server::ClusterNode {
                    name: format!("n{}", index + 1),
                    client_port,
                    route_port,
                },
            )
            .collect();
        let mut nodes = Vec::with_capacity(size);
        for index in 0..size {
            let node_dir = if clustered {
                dir.path().join(format!("n{}", index + 1))
            } else {
                dir.path().to_owned()
            };
            std::fs::create_dir_all(&node_dir)?;
            let mut text = String::new();
            if clustered {
                text.push_str(&provis_core::nats_server::cluster_node_config(
                    CLUSTER_NAME,
                    &cluster_nodes,
                    index,
                ));
            }
            if let Some(settings) = settings {
                text.push_str(settings);
            }
            let config = if text.is_empty() {
                None
            } else {
                let path = node_dir.join("nats-server.conf");
                std::fs::write(&path, text)?;
                Some(path)
            };
            nodes.push(Node {
                child: None,
                port: ports.get(index).map(|&(client, _)| client),
                dir: node_dir,
                config,
            });
        }
        let mut server = Self { nodes, dir, binary };
        for index in 0..size {
            server.start_node(index)?;
        }
        Ok(server)
    }

    fn start_node(&mut self, index: usize) -> anyhow::Result<()> {
        let binary = self.binary.clone();
        let node = self
            .nodes
            .get_mut(index)
            .with_context(|| format!("no node {index}"))?;
        let (child, port) = spawn(&binary, &node.dir, node.port, node.config.as_deref())?;
        node.child = Some(child);
        node.port = Some(port);
        Ok(())
    }

    /// Every node's URL, comma-separated (what `nats_url` takes).
    pub fn url(&self) -> String {
        (0..self.nodes.len())
            .map(|index| self.node_url(index))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `nats://127.0.0.1:<port>` of node `index` (0 for a single server).
    pub fn node_url(&self, index: usize) -> String {
        let port = self.nodes.get(index).and_then(|n| n.port).unwrap_or(0);
        format!("nats://127.0.0.1:{port}")
    }

    /// The client port of the first node.
    pub fn port(&self) -> u16 {
        self.nodes.first().and_then(|n| n.port).unwrap_or(0)
    }

    /// The process id of node `index`, while it runs.
    pub fn pid(&self, index: usize) -> Option<u32> {
        self.nodes.get(index)?.child.as_ref().map(Child::id)
    }

    /// How many nodes run or ran.
    pub fn size(&self) -> usize {
        self.nodes.len()
    }

    /// A plain NATS client of this server (of any node of a cluster).
    pub async fn connect(&self) -> anyhow::Result<async_nats::Client> {
        Ok(async_nats::connect(provis_core::context::server_list(&self.url())).await?)
    }

    /// Everything the server (every node of a cluster) logged so far.
    pub fn log(&self) -> String {
        self.nodes
            .iter()
            .enumerate()
            .map(|(index, node)| {
                let log =
                    std::fs::read_to_string(node.dir.join("nats-server.log")).unwrap_or_default();
                if self.nodes.len() > 1 {
                    format!("---- node n{} ----\n{log}", index + 1)
                } else {
                    log
                }
            })
            .collect()
    }

    /// Kills every node (as a crash would) and starts them again on the
    /// same ports with the same stores: JetStream data survives,
    /// connections drop.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        for index in 0..self.nodes.len() {
            self.start_node(index)?;
        }
        Ok(())
    }

    /// Kills node `index` (SIGKILL); `restart_node` brings it back.
    pub fn kill_node(&mut self, index: usize) {
        if let Some(mut child) = self.nodes.get_mut(index).and_then(|n| n.child.take()) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts node `index` again on its port with its store.
    pub fn restart_node(&mut self, index: usize) -> anyhow::Result<()> {
        self.kill_node(index);
        self.start_node(index)
    }

    /// Kills every node; `restart` brings them back.
    pub fn kill(&mut self) {
        for index in 0..self.nodes.len() {
            self.kill_node(index);
        }
    }

    /// Waits until JetStream answers on every running node (a cluster has
    /// elected its meta leader), at most 30 s.
    pub async fn wait_for_jetstream(&self) -> anyhow::Result<()> {
        let running: Vec<usize> = (0..self.nodes.len())
            .filter(|&index| self.nodes[index].child.is_some())
            .collect();
        for index in running {
            let url = self.node_url(index);
            crate::eventually(
                &format!("JetStream answers on {url}"),
                Duration::from_secs(30),
                || async {
                    match async_nats::connect(&url).await {
                        Ok(client) => async_nats::jetstream::new(client)
                            .query_account()
                            .await
                            .is_ok(),
                        Err(_) => false,
                    }
                },
            )
            .await?;
        }
        Ok(())
    }

    /// Where the nodes keep their stores and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

fn spawn(
    binary: &Path,
    dir: &Path,
    port: Option<u16>,
    config: Option<&Path>,
) -> anyhow::Result<(Child, u16)> {
    let mut command = Command::new(binary);
    if let Some(config) = config {
        command.arg("-c").arg(config);
    }
    // A cluster node's port is in its configuration; a single server's is
    // its own choice the first time and the same one after.
    let port_arg = port.map_or_else(|| "-1".to_owned(), |port| port.to_string());
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
