//! The options of every subcommand that talks to a fleet: where the fleet
//! is. A flag or env var wins over the context file that `provis up`
//! writes, which wins over defaults. Commands that do not talk to a fleet
//! (`provis bundle`, `provis keys create`) do not take them.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use provis_core::master_api::MasterClient;
use provis_core::{FleetContext, Prefix};

#[derive(Debug, Clone, Args)]
pub struct FleetArgs {
    /// NATS server URL [default: the context file's, else nats://127.0.0.1:4222]
    #[arg(long, env = "PROVIS_NATS_URL", global = true)]
    pub nats_url: Option<String>,
    /// Subject prefix of the fleet [default: the context file's, else provis]
    #[arg(long, env = "PROVIS_PREFIX", global = true)]
    pub prefix: Option<Prefix>,
    /// CA certificate (PEM) of the NATS server's TLS; set, connections use TLS only
    #[arg(long, env = "PROVIS_TLS_CA", global = true)]
    pub tls_ca: Option<PathBuf>,
    /// Private key to connect to NATS as (see `provis keys`) [default: the context file's]
    #[arg(long, env = "PROVIS_IDENTITY", global = true)]
    pub identity: Option<PathBuf>,
    /// Context file [default: ~/.config/provis/context.toml]
    #[arg(long, env = "PROVIS_CONTEXT", global = true)]
    pub context: Option<PathBuf>,
}

impl FleetArgs {
    pub fn context_path(&self) -> PathBuf {
        self.context
            .clone()
            .unwrap_or_else(FleetContext::default_path)
    }

    /// The fleet to talk to: flags and env over the context file over defaults.
    /// The operator's key: `key` when given, else the identity this shell
    /// connects as (none: calls go unsigned, secrets keep no copy).
    pub fn operator_key(
        &self,
        key: Option<&std::path::Path>,
    ) -> anyhow::Result<Option<provis_core::identity::Identity>> {
        let identity = self.resolve()?.identity;
        crate::keys::signer(key.or(identity.as_deref()))
    }

    pub fn resolve(&self) -> anyhow::Result<FleetContext> {
        let mut fleet = self.resolve_file_only()?;
        self.apply(&mut fleet);
        Ok(fleet)
    }

    /// The context file's fleet (or the defaults), without flags applied.
    pub fn resolve_file_only(&self) -> anyhow::Result<FleetContext> {
        let path = self.context_path();
        Ok(FleetContext::load(&path)
            .with_context(|| format!("fix or delete {}", path.display()))?
            .unwrap_or_default())
    }

    /// Overrides `fleet` with whatever was given on the command line or in env.
    pub fn apply(&self, fleet: &mut FleetContext) {
        if let Some(url) = &self.nats_url {
            fleet.nats_url.clone_from(url);
        }
        if let Some(prefix) = &self.prefix {
            fleet.prefix = prefix.clone();
        }
        if let Some(ca) = &self.tls_ca {
            fleet.tls_ca = Some(ca.clone());
        }
        if let Some(identity) = &self.identity {
            fleet.identity = Some(identity.clone());
        }
    }

    /// A call client for the resolved fleet, as this operator.
    pub async fn client(&self) -> anyhow::Result<provis_core::Client> {
        let fleet = self.resolve()?;
        let nats = provis_core::client::connect_nats(&fleet, "provis-cli").await?;
        Ok(provis_core::Client::new(
            nats,
            provis_core::Subjects::new(fleet.prefix),
            operator_identity(),
        ))
    }

    /// A client of the fleet's master, as this operator.
    pub async fn master(&self) -> anyhow::Result<MasterClient> {
        let client = self.client().await?;
        Ok(MasterClient::new(
            client.nats().clone(),
            client.subjects().clone(),
        ))
    }
}

/// Who is calling, as recorded in envelopes: `operator:<login>`.
pub fn operator_identity() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".to_owned());
    format!("operator:{user}")
}
