//! `provis bundle DIR` and `provis service …`: check and pack a service
//! folder, publish it to the fleet, list what is published (`new`, `run`
//! and `test` work locally, in [`crate::service_local`]).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use provis_bundle::{BundleStore, PackedBundle, ServicePointer};
use serde_json::json;

use crate::fleet_args::FleetArgs;
use crate::output::Output;
use crate::service_local;

#[derive(Debug, Args)]
pub struct BundleArgs {
    /// The service folder (service.toml, ES or CommonJS modules, TypeScript, node_modules)
    dir: PathBuf,
    /// `table` for people; `json` for programs: digest, modules, methods,
    /// and every npm package with version, license and integrity
    #[arg(long, value_enum, default_value = "table")]
    output: Output,
    /// The same as `--output json` (kept for scripts written before it)
    #[arg(long, hide = true)]
    json: bool,
}

#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Write a new service folder: service.toml, an entry module, a test,
    /// package.json, provis.d.ts and a tsconfig.json (or jsconfig.json)
    New {
        /// The service's name (a subject token: lowercase, digits, '-', '_')
        name: String,
        /// Write TypeScript (main.ts) instead of JavaScript
        #[arg(long)]
        typescript: bool,
        /// Where to write it [default: ./NAME]
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Run one method of a service folder here, in the minion's sandbox with a
    /// local host (state in memory, events printed, fs/exec/http as granted)
    Run {
        /// The service folder
        dir: PathBuf,
        /// The method (an exported function)
        method: String,
        /// Its argument, as JSON [default: {}]
        args: Option<String>,
        /// The service's config, as JSON, as roles would give it [default: {}]
        #[arg(long)]
        config: Option<String>,
    },
    /// Run the service's *.test.js / *.test.ts modules in the sandbox; prints
    /// `N passed, N failed` and exits 1 on a failure
    Test {
        /// The service folder
        dir: PathBuf,
    },
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
    for warning in &bundle.warnings {
        eprintln!("provis: warning: {}: {warning}", dir.display());
    }
    Ok((bundle, methods))
}

pub async fn run_bundle(args: BundleArgs) -> anyhow::Result<ExitCode> {
    let (bundle, methods) = pack_checked(&args.dir)?;
    if args.json || args.output == Output::Json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "name": bundle.manifest.name,
                "version": bundle.manifest.version,
                "digest": bundle.digest,
                "size": bundle.bytes.len(),
                "files": bundle.files.keys().collect::<Vec<_>>(),
                "methods": methods,
                "packages": bundle.packages,
                "warnings": bundle.warnings,
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
        for package in &bundle.packages {
            outln!(
                "  package {} {} ({})",
                package.name,
                package.version.as_deref().unwrap_or("?"),
                package.license.as_deref().unwrap_or("no license")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn run_service(command: ServiceCommand) -> anyhow::Result<ExitCode> {
    let fleet = match &command {
        ServiceCommand::New {
            name,
            typescript,
            dir,
        } => return service_local::new_service(name, *typescript, dir.as_deref()),
        ServiceCommand::Run {
            dir,
            method,
            args,
            config,
        } => {
            return service_local::run_method(dir, method, args.as_deref(), config.as_deref())
                .await;
        }
        ServiceCommand::Test { dir } => return service_local::run_tests(dir).await,
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
        ServiceCommand::New { .. } | ServiceCommand::Run { .. } | ServiceCommand::Test { .. } => {}
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
