//! `provis bundle DIR` and `provis service …`: check and pack a service
//! folder, publish it to the fleet, list what is published.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use provis_bundle::{BundleStore, PackedBundle, ServicePointer};
use serde_json::json;

use crate::fleet_args::FleetArgs;

#[derive(Debug, Args)]
pub struct BundleArgs {
    /// The service folder (service.toml and ES modules)
    dir: PathBuf,
    /// Print one JSON document instead of text
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Check, pack and publish service folders; minions whose roles name them load the new version
    Publish {
        #[command(flatten)]
        fleet: FleetArgs,
        /// Service folders
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
        /// Sign the bundles with this private key (see `provis keys create`)
        #[arg(long, env = "PROVIS_SIGNING_KEY")]
        signing_key: Option<PathBuf>,
    },
    /// List the published services
    List {
        #[command(flatten)]
        fleet: FleetArgs,
    },
}

/// Packs and checks a folder: the manifest, every module compiles, every import resolves.
pub fn pack_checked(dir: &std::path::Path) -> anyhow::Result<(PackedBundle, Vec<String>)> {
    let bundle = PackedBundle::from_dir(dir)
        .with_context(|| format!("{} is not a valid service", dir.display()))?;
    let methods = provis_js::check_bundle(&bundle)
        .with_context(|| format!("{} is not a valid service", dir.display()))?;
    Ok((bundle, methods))
}

pub async fn run_bundle(args: BundleArgs) -> anyhow::Result<ExitCode> {
    let (bundle, methods) = pack_checked(&args.dir)?;
    if args.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "name": bundle.manifest.name,
                "version": bundle.manifest.version,
                "digest": bundle.digest,
                "size": bundle.bytes.len(),
                "files": bundle.files.keys().collect::<Vec<_>>(),
                "methods": methods,
            }))?
        );
    } else {
        outln!(
            "{} {} {}",
            bundle.manifest.name,
            bundle.manifest.version,
            bundle.digest
        );
        outln!(
            "  {} files, {} bytes; methods: {}",
            bundle.files.len(),
            bundle.bytes.len(),
            methods.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn run_service(command: ServiceCommand) -> anyhow::Result<ExitCode> {
    let fleet = match &command {
        ServiceCommand::Publish { fleet, .. } | ServiceCommand::List { fleet } => fleet,
    };
    let client = fleet.client().await?;
    let store = BundleStore::open(&async_nats::jetstream::new(client.nats().clone())).await?;
    match command {
        ServiceCommand::Publish {
            dirs, signing_key, ..
        } => {
            let signer = crate::keys::signer(signing_key.as_deref())?;
            // Check every folder before publishing any.
            let bundles = dirs
                .iter()
                .map(|dir| pack_checked(dir))
                .collect::<anyhow::Result<Vec<_>>>()?;
            for (bundle, _) in bundles {
                let pointer = store.publish(&bundle, signer.as_ref()).await?;
                outln!(
                    "published {} {} {}",
                    pointer.name,
                    pointer.version,
                    pointer.digest
                );
            }
        }
        ServiceCommand::List { .. } => {
            let pointers = provis_core::kv_snapshot::read_all(store.pointers()).await?;
            outln!("{:16}  {:10}  {:73}  SIZE", "SERVICE", "VERSION", "DIGEST");
            for value in pointers.values() {
                match serde_json::from_slice::<ServicePointer>(value) {
                    Ok(p) => outln!(
                        "{:16}  {:10}  {:73}  {}",
                        p.name,
                        p.version,
                        p.digest,
                        p.size
                    ),
                    Err(err) => eprintln!("provis: unreadable service pointer: {err}"),
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
