//! `provis keys`: identities on this machine (a key is an ed25519 private
//! key in a file of its own, mode 0600, with its public half in
//! `<file>.pub`) and the fleet's enrollment, which the master keeps: which
//! minion keys are pending, accepted, rejected or revoked.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;
use provis_core::MinionId;
use provis_core::identity::{Identity, public_path};
use provis_core::master_api::{Decision, EnrollDecision, EnrollmentStatus};

use crate::fleet_args::{FleetArgs, operator_identity};

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key NAME.key in the keys directory; print its public key
    Create {
        name: provis_core::MinionId,
        /// Where keys live [default: ~/.config/provis/keys]
        #[arg(long, env = "PROVIS_KEYS_DIR")]
        dir: Option<PathBuf>,
    },
    /// Write a key's NATS nkey seed (mode 0600) for other tools: the `nats`
    /// CLI (`--nkey`) and any NATS client library
    Export {
        /// A key in the keys directory, or the path of a key file
        name: String,
        /// Export as an nkey seed (`SU…`), the form NATS clients read
        #[arg(long, required = true)]
        nkey: bool,
        /// Where to write it [default: NAME.nk beside the key]
        #[arg(long)]
        output: Option<PathBuf>,
        /// Where keys live [default: ~/.config/provis/keys]
        #[arg(long, env = "PROVIS_KEYS_DIR")]
        dir: Option<PathBuf>,
    },
    /// List the keys in the keys directory with their public keys
    List {
        /// Where keys live [default: ~/.config/provis/keys]
        #[arg(long, env = "PROVIS_KEYS_DIR")]
        dir: Option<PathBuf>,
    },
    /// The fleet's minions by enrollment status (pending ones wait for `accept`)
    Pending {
        #[command(flatten)]
        fleet: FleetArgs,
        /// Every known minion, not only pending ones
        #[arg(long)]
        all: bool,
    },
    /// Admit a pending minion: it connects within seconds
    Accept {
        #[command(flatten)]
        fleet: FleetArgs,
        minion: MinionId,
        /// Only if it asked with this key (as `provis keys pending` shows it)
        #[arg(long)]
        key: Option<String>,
    },
    /// Refuse a pending minion's key for good
    Reject {
        #[command(flatten)]
        fleet: FleetArgs,
        minion: MinionId,
    },
    /// Cut a minion off: its connections close within seconds and every
    /// attempt after is refused (and an event)
    Revoke {
        #[command(flatten)]
        fleet: FleetArgs,
        minion: MinionId,
    },
    /// Issue a one-time enrollment token: a new minion started with it
    /// (--enrollment-token) is accepted at once
    Token {
        #[command(flatten)]
        fleet: FleetArgs,
        /// How long the token is valid, e.g. 1h, 30m
        #[arg(long, default_value = "1h")]
        ttl: humantime::Duration,
        /// Valid for this minion id only [default: any new id]
        #[arg(long)]
        minion: Option<MinionId>,
    },
}

fn keys_dir(dir: Option<PathBuf>) -> PathBuf {
    dir.unwrap_or_else(|| {
        std::env::var_os("HOME")
            .map_or_else(
                || PathBuf::from(".provis"),
                |home| PathBuf::from(home).join(".config"),
            )
            .join("provis/keys")
    })
}

/// The signing identity at `path`, when one is given.
pub fn signer(path: Option<&Path>) -> anyhow::Result<Option<Identity>> {
    path.map(|path| {
        Identity::load(path).with_context(|| format!("cannot use signing key {}", path.display()))
    })
    .transpose()
}

/// Writes `secret` to `path`, readable by its owner only (also when the
/// file was there before).
pub(crate) fn write_secret(path: &Path, secret: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    writeln!(file, "{secret}").with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// An operator's decision on `minion`, recorded as made by this operator.
fn decision(minion: MinionId, decision: Decision, key: Option<String>) -> EnrollDecision {
    EnrollDecision {
        minion,
        decision,
        by: Some(operator_identity()),
        key,
    }
}

pub async fn run(command: KeysCommand) -> anyhow::Result<ExitCode> {
    match command {
        KeysCommand::Pending { fleet, all } => {
            let status = (!all).then_some(EnrollmentStatus::Pending);
            let records = fleet.master().await?.enrollments(status).await?;
            if records.is_empty() {
                eprintln!("no {}minions", if all { "" } else { "pending " });
            }
            for record in records {
                let status = serde_json::to_value(record.status)?;
                outln!(
                    "{:20}  {:8}  {}  {}",
                    record.minion,
                    status.as_str().unwrap_or_default(),
                    record.key,
                    record.host,
                );
            }
        }
        KeysCommand::Accept { fleet, minion, key } => {
            let master = fleet.master().await?;
            master
                .decide_enrollment(&decision(minion.clone(), Decision::Accept, key))
                .await?;
            eprintln!("{minion} accepted; it connects at its next attempt");
        }
        KeysCommand::Reject { fleet, minion } => {
            let master = fleet.master().await?;
            master
                .decide_enrollment(&decision(minion.clone(), Decision::Reject, None))
                .await?;
            eprintln!("{minion} rejected");
        }
        KeysCommand::Revoke { fleet, minion } => {
            let master = fleet.master().await?;
            let decided = master
                .decide_enrollment(&decision(minion.clone(), Decision::Revoke, None))
                .await?;
            eprintln!(
                "{minion} revoked; {} live connection(s) closed",
                decided.disconnected
            );
        }
        KeysCommand::Token { fleet, ttl, minion } => {
            let answer = fleet
                .master()
                .await?
                .enrollment_token(ttl.into(), minion)
                .await?;
            outln!("{}", answer.token);
            eprintln!(
                "one-time enrollment token, valid for {ttl}: start a new minion with --enrollment-token"
            );
        }
        KeysCommand::Create { name, dir } => {
            let path = keys_dir(dir).join(format!("{name}.key"));
            let identity = Identity::create(&path)?;
            outln!("{}", identity.public_key());
            eprintln!(
                "private key written to {} (mode 0600); public key in {}",
                path.display(),
                public_path(&path).display()
            );
        }
        KeysCommand::Export {
            name,
            nkey: _,
            output,
            dir,
        } => {
            let path = if name.contains('/') || name.ends_with(".key") {
                PathBuf::from(&name)
            } else {
                keys_dir(dir).join(format!("{name}.key"))
            };
            let identity = Identity::load(&path)
                .with_context(|| format!("cannot read key {}", path.display()))?;
            let output = output.unwrap_or_else(|| path.with_extension("nk"));
            write_secret(&output, identity.nkey_seed())?;
            let public = identity.nkey_public();
            outln!("nkey seed: {}", output.display());
            outln!("public nkey: {public}");
            outln!(
                "inbox prefix: {}",
                provis_core::bus_access::inbox_prefix(&public)
            );
            eprintln!(
                "written with mode 0600; it is as secret as the key. NATS clients connect with it and must use the inbox prefix above for requests"
            );
        }
        KeysCommand::List { dir } => {
            let dir = keys_dir(dir);
            let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)
                .with_context(|| format!("cannot list {}", dir.display()))?
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "key"))
                .collect();
            entries.sort();
            for path in entries {
                let name = path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                match Identity::load(&path) {
                    Ok(identity) => outln!("{name:16}  {}", identity.public_key()),
                    Err(err) => outln!("{name:16}  unreadable: {}", provis_core::error_chain(&err)),
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
