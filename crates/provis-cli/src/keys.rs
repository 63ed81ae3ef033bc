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
use serde_json::json;

use crate::fleet_args::{FleetArgs, operator_identity};
use crate::status::ask_master;

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key NAME.key in the keys directory; print its public key
    Create {
        name: provis_core::MinionId,
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
        /// Every known minion, not only pending ones
        #[arg(long)]
        all: bool,
    },
    /// Admit a pending minion: it connects within seconds
    Accept {
        minion: MinionId,
        /// Only if it asked with this key (as `provis keys pending` shows it)
        #[arg(long)]
        key: Option<String>,
    },
    /// Refuse a pending minion's key for good
    Reject { minion: MinionId },
    /// Cut a minion off: its connections close within seconds and every
    /// attempt after is refused (and an event)
    Revoke { minion: MinionId },
    /// Issue a one-time enrollment token: a new minion started with it
    /// (--enrollment-token) is accepted at once
    Token {
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

pub async fn run(fleet: &FleetArgs, command: KeysCommand) -> anyhow::Result<ExitCode> {
    let decide = |minion: MinionId, decision: &str| json!({ "minion": minion, "decision": decision, "by": operator_identity() });
    match command {
        KeysCommand::Pending { all } => {
            let answer = ask_master(fleet, "enroll.list", &json!({})).await?;
            let minions = answer["minions"].as_array().cloned().unwrap_or_default();
            let shown: Vec<_> = minions
                .iter()
                .filter(|m| all || m["status"] == "pending")
                .collect();
            if shown.is_empty() {
                eprintln!("no {}minions", if all { "" } else { "pending " });
            }
            for minion in shown {
                println!(
                    "{:20}  {:8}  {}  {}",
                    minion["minion"].as_str().unwrap_or_default(),
                    minion["status"].as_str().unwrap_or_default(),
                    minion["key"].as_str().unwrap_or_default(),
                    minion["host"].as_str().unwrap_or_default(),
                );
            }
        }
        KeysCommand::Accept { minion, key } => {
            let mut body = decide(minion.clone(), "accept");
            body["key"] = json!(key);
            ask_master(fleet, "enroll.decide", &body).await?;
            eprintln!("{minion} accepted; it connects at its next attempt");
        }
        KeysCommand::Reject { minion } => {
            ask_master(fleet, "enroll.decide", &decide(minion.clone(), "reject")).await?;
            eprintln!("{minion} rejected");
        }
        KeysCommand::Revoke { minion } => {
            let answer =
                ask_master(fleet, "enroll.decide", &decide(minion.clone(), "revoke")).await?;
            eprintln!(
                "{minion} revoked; {} live connection(s) closed",
                answer["disconnected"].as_u64().unwrap_or(0)
            );
        }
        KeysCommand::Token { ttl, minion } => {
            let ttl_s = ttl.as_secs().max(1);
            let answer = ask_master(
                fleet,
                "enroll.token",
                &json!({ "ttl_s": ttl_s, "minion": minion }),
            )
            .await?;
            println!("{}", answer["token"].as_str().unwrap_or_default());
            eprintln!(
                "one-time enrollment token, valid for {ttl}: start a new minion with --enrollment-token"
            );
        }
        KeysCommand::Create { name, dir } => {
            let path = keys_dir(dir).join(format!("{name}.key"));
            let identity = Identity::create(&path)?;
            println!("{}", identity.public_key());
            eprintln!(
                "private key written to {} (mode 0600); public key in {}",
                path.display(),
                public_path(&path).display()
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
                    Ok(identity) => println!("{name:16}  {}", identity.public_key()),
                    Err(err) => println!("{name:16}  unreadable: {err}"),
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
