//! `provis apply DIR`: validate a config repository as a whole and write it
//! into the fleet's desired state.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use provis_master::repository::ConfigRepository;

use crate::UsageError;
use crate::fleet_args::FleetArgs;

#[derive(Debug, Args)]
pub struct ApplyArgs {
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// The config repository (roles/, services/, assignments.toml)
    dir: PathBuf,
    /// Sign the bundles with this private key (see `provis keys create`)
    #[arg(long, env = "PROVIS_SIGNING_KEY")]
    signing_key: Option<PathBuf>,
}

pub async fn run(fleet: &FleetArgs, args: ApplyArgs) -> anyhow::Result<ExitCode> {
    let repository = ConfigRepository::load(&args.dir)
        .map_err(|invalid| UsageError(format!("{}: {invalid}", args.dir.display())))?;
    let client = fleet.client().await?;
    let signer = crate::keys::signer(args.signing_key.as_deref())?;
    let summary = provis_master::apply::apply(
        &async_nats::jetstream::new(client.nats().clone()),
        &repository,
        signer.as_ref(),
        0,
    )
    .await?;
    outln!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(ExitCode::SUCCESS)
}
