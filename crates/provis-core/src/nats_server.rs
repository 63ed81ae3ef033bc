//! Finding the nats-server binary, the same way everywhere (`provis up`, the
//! testkit, the scripts): `PROVIS_NATS_SERVER`, then the project-local install
//! that `scripts/install-nats-server.sh` makes (`.provis/bin/nats-server`, looked
//! for above the working directory and above the running executable), then PATH.

use std::path::{Path, PathBuf};

/// Where the install script puts nats-server, relative to the project root.
pub const PROJECT_LOCAL_NATS_SERVER: &str = ".provis/bin/nats-server";

#[derive(Debug, thiserror::Error)]
pub enum LocateError {
    #[error("PROVIS_NATS_SERVER={0} is not an executable file")]
    BadOverride(PathBuf),
    #[error(
        "no nats-server found: run scripts/install-nats-server.sh, or set PROVIS_NATS_SERVER to one"
    )]
    NotFound,
}

/// The nats-server binary to run.
pub fn locate_nats_server() -> Result<PathBuf, LocateError> {
    if let Some(path) = std::env::var_os("PROVIS_NATS_SERVER") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(LocateError::BadOverride(path))
        };
    }
    let starts = [
        std::env::current_dir().ok(),
        std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(Path::to_owned)),
    ];
    for start in starts.into_iter().flatten() {
        if let Some(found) = start
            .ancestors()
            .map(|dir| dir.join(PROJECT_LOCAL_NATS_SERVER))
            .find(|candidate| candidate.is_file())
        {
            return Ok(found);
        }
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file())
        .ok_or(LocateError::NotFound)
}

/// One node of a nats-server cluster on this machine's loopback, as
/// `provis up --cluster` and the testkit run them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNode {
    /// `server_name`, unique in the cluster (JetStream's peers go by it).
    pub name: String,
    pub client_port: u16,
    pub route_port: u16,
}

/// The configuration of `nodes[index]` in a cluster named `cluster`: its
/// name, client listener, route listener and routes to every other node.
/// JetStream, TLS and authorization are the caller's to add.
pub fn cluster_node_config(cluster: &str, nodes: &[ClusterNode], index: usize) -> String {
    let Some(node) = nodes.get(index) else {
        return String::new();
    };
    let routes: Vec<String> = nodes
        .iter()
        .enumerate()
        .filter(|(other, _)| *other != index)
        .map(|(_, peer)| format!("nats-route://127.0.0.1:{}", peer.route_port))
        .collect();
    format!(
        "server_name: {name}\nlisten: 127.0.0.1:{client}\ncluster {{\n  name: {cluster}\n  listen: 127.0.0.1:{route}\n  routes: [{routes}]\n}}\n",
        name = node.name,
        client = node.client_port,
        route = node.route_port,
        routes = routes.join(", "),
    )
}
