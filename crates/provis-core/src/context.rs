//! Where a fleet is: the connection settings every `provis` command shares, and
//! the context file `provis up` writes so that commands in another shell find
//! the fleet it started.
//!
//! Each setting has one name in the file, the CLI flag and the env var:
//! `nats_url` / `--nats-url` / `PROVIS_NATS_URL`, `prefix` / `--prefix` /
//! `PROVIS_PREFIX`, `tls_ca` / `--tls-ca` / `PROVIS_TLS_CA`, `identity` /
//! `--identity` / `PROVIS_IDENTITY`. A flag or env var wins over the context file, which wins
//! over the defaults below.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::subject::Prefix;

/// The NATS URL when nothing else says: a local dev server.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

/// Connection settings of one fleet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FleetContext {
    /// NATS server URL, or several comma-separated (the servers of a
    /// cluster): a connection tries them in turn and fails over to any
    /// server of the cluster, those the servers announce included.
    /// Default: `nats://127.0.0.1:4222`.
    pub nats_url: String,
    /// First token of every subject. Default: `provis`.
    pub prefix: Prefix,
    /// PEM certificate of the authority that signed the NATS server's TLS
    /// certificate; when set, connections use TLS and nothing else.
    /// Default: none (plain connections).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<PathBuf>,
    /// The private key (see `provis keys`) this process connects to NATS as:
    /// a fleet whose nats-server sends connections to the master's auth
    /// callout admits only known identities. Default: none (an operator
    /// without one can use only an open nats-server; the master and minions
    /// use their own keys).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<PathBuf>,
}

impl Default for FleetContext {
    fn default() -> Self {
        Self {
            nats_url: DEFAULT_NATS_URL.to_owned(),
            prefix: Prefix::default(),
            tls_ca: None,
            identity: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("cannot read context file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("context file {path} is not valid")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("cannot use the identity")]
    Identity(#[from] crate::identity::IdentityError),
    #[error("cannot write context file {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl FleetContext {
    /// Connection options for this fleet: TLS, and only TLS, when `tls_ca` is set.
    pub fn connect_options(&self, name: &str) -> async_nats::ConnectOptions {
        let options = async_nats::ConnectOptions::new().name(name);
        match &self.tls_ca {
            Some(ca) => options.add_root_certificates(ca.clone()).require_tls(true),
            None => options,
        }
    }

    /// Connection options as `identity`: NATS sees its nkey (signing the
    /// server's nonce), and replies come to its own inbox prefix, which only
    /// it may read on a fleet with least privilege.
    pub fn connect_options_as(
        &self,
        name: &str,
        identity: &crate::identity::Identity,
    ) -> async_nats::ConnectOptions {
        self.connect_options(name)
            .nkey(identity.nkey_seed().to_owned())
            .custom_inbox_prefix(crate::bus_access::inbox_prefix(&identity.nkey_public()))
    }

    /// Connection options as the `identity` setting says: that key, or no
    /// identity at all.
    pub fn connect_options_as_configured(
        &self,
        name: &str,
    ) -> Result<async_nats::ConnectOptions, ContextError> {
        match &self.identity {
            Some(path) => {
                let identity = crate::identity::Identity::load(path)?;
                Ok(self.connect_options_as(name, &identity))
            }
            None => Ok(self.connect_options(name)),
        }
    }

    /// The servers `nats_url` names, in order.
    pub fn servers(&self) -> Vec<String> {
        server_list(&self.nats_url)
    }

    /// The context file: `PROVIS_CONTEXT`, else `$XDG_CONFIG_HOME/provis/context.toml`,
    /// else `~/.config/provis/context.toml`.
    pub fn default_path() -> PathBuf {
        if let Some(path) = std::env::var_os("PROVIS_CONTEXT") {
            return PathBuf::from(path);
        }
        let config = std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config")))
            .unwrap_or_else(|| PathBuf::from("."));
        config.join("provis").join("context.toml")
    }

    /// Reads a context file; a missing file is `None`, a broken one an error.
    pub fn load(path: &Path) -> Result<Option<Self>, ContextError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(ContextError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        toml::from_str(&text)
            .map(Some)
            .map_err(|source| ContextError::Parse {
                path: path.to_owned(),
                source,
            })
    }

    /// Writes the context file, creating its directory.
    pub fn save(&self, path: &Path) -> Result<(), ContextError> {
        let write = |source| ContextError::Write {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(write)?;
        }
        let text = toml::to_string(self).map_err(|err| write(std::io::Error::other(err)))?;
        std::fs::write(path, text).map_err(write)
    }
}

/// The URLs of a comma-separated list, blanks dropped.
pub fn server_list(urls: &str) -> Vec<String> {
    urls.split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_list_names_every_server() {
        let fleet = FleetContext {
            nats_url: "nats://a:4222, nats://b:4222,,nats://c:4222 ".into(),
            ..FleetContext::default()
        };
        assert_eq!(
            fleet.servers(),
            ["nats://a:4222", "nats://b:4222", "nats://c:4222"]
        );
        assert_eq!(FleetContext::default().servers(), [DEFAULT_NATS_URL]);
    }

    #[test]
    fn a_saved_context_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/context.toml");
        assert_eq!(FleetContext::load(&path).unwrap(), None);
        let context = FleetContext {
            nats_url: "nats://127.0.0.1:5000".into(),
            prefix: "fleet2".parse().unwrap(),
            tls_ca: Some("/etc/provis/ca.pem".into()),
            identity: Some("/etc/provis/alice.key".into()),
        };
        context.save(&path).unwrap();
        assert_eq!(FleetContext::load(&path).unwrap(), Some(context));
        std::fs::write(&path, "nats_url = 3").unwrap();
        assert!(FleetContext::load(&path).is_err());
    }
}
