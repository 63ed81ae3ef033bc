//! `provis secret seal|reseal`: writing sealed secrets into a config
//! repository. A value read on stdin is sealed to each member's encryption
//! key (from the registry, checked against the minion's identity) and to
//! the operator's own key, so that `reseal` can open it again when members
//! change; nothing else can open it. The file is committed like any other.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use provis_core::identity::Identity;
use provis_core::registry::MinionRecord;
use provis_core::sealed_secret::{SECRETS_DIR, SealedCopy, SealedSecret, is_secret_name};

use crate::UsageError;
use crate::fleet_args::FleetArgs;

#[derive(Debug, Args)]
pub struct SecretTarget {
    #[command(flatten)]
    fleet: FleetArgs,
    /// The config repository whose secrets/ to write
    #[arg(long, default_value = ".")]
    repository: PathBuf,
    /// Your key, which keeps a copy for `reseal` [default: the identity this shell connects as]
    #[arg(long, env = "PROVIS_SIGNING_KEY")]
    key: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Seal the value on stdin to the members of --role (and --minion) into
    /// secrets/NAME.toml; commit it, and services granted NAME read it
    Seal {
        #[command(flatten)]
        target: SecretTarget,
        /// The secret's name (lowercase letters, digits, '-', '_')
        name: String,
        /// Members: minions in this role or a sub-role (repeatable)
        #[arg(long = "role")]
        roles: Vec<String>,
        /// Members: this minion (repeatable)
        #[arg(long = "minion")]
        minions: Vec<String>,
    },
    /// Seal secrets again for their members as they are now: new members get
    /// a copy, members with a new key get a new one, former members lose theirs
    Reseal {
        #[command(flatten)]
        target: SecretTarget,
        /// Secrets to reseal [default: every one in secrets/]
        names: Vec<String>,
    },
}

pub async fn run(command: SecretCommand) -> anyhow::Result<ExitCode> {
    match command {
        SecretCommand::Seal {
            target,
            name,
            roles,
            minions,
        } => seal(&target, &name, roles, minions).await,
        SecretCommand::Reseal { target, names } => reseal(&target, names).await,
    }
}

fn secret_path(repository: &Path, name: &str) -> PathBuf {
    repository.join(SECRETS_DIR).join(format!("{name}.toml"))
}

async fn registry(fleet: &FleetArgs) -> anyhow::Result<Vec<MinionRecord>> {
    let client = fleet.client().await?;
    Ok(provis_core::registry::read_all(&client.registry().await?).await?)
}

/// Seals `value` to every member of `secret` among `records`, keeping the
/// copies already sealed to a member's current key; says who got what.
fn seal_to_members(
    secret: &mut SealedSecret,
    value: &[u8],
    records: &[MinionRecord],
) -> anyhow::Result<Vec<String>> {
    let mut sealed = BTreeMap::new();
    let mut report = Vec::new();
    for record in records {
        let id = record.id.as_str();
        if !secret.is_member(id, &record.roles) {
            continue;
        }
        let Some(key) = record.bound_encryption_key() else {
            anyhow::bail!(
                "{id} publishes no encryption key bound to its identity (a minion older than secrets, or one without an identity key): it cannot be a recipient"
            );
        };
        match secret.sealed.get(id) {
            Some(copy) if copy.key == key => {
                sealed.insert(id.to_owned(), copy.clone());
                report.push(format!("{id} (kept)"));
            }
            earlier => {
                let copy = SealedCopy {
                    key: key.to_owned(),
                    value: provis_core::sealing::seal(key, value)?,
                };
                sealed.insert(id.to_owned(), copy);
                report.push(if earlier.is_some() {
                    format!("{id} (new key)")
                } else {
                    id.to_owned()
                });
            }
        }
    }
    for gone in secret.sealed.keys().filter(|id| !sealed.contains_key(*id)) {
        report.push(format!("{gone} (dropped)"));
    }
    secret.sealed = sealed;
    Ok(report)
}

fn escrow(
    secret: &mut SealedSecret,
    operator: Option<&Identity>,
    value: &[u8],
) -> anyhow::Result<()> {
    if let Some(operator) = operator {
        let key = operator.encryption_public_key();
        secret.escrow.insert(
            operator.public_key().to_owned(),
            SealedCopy {
                value: provis_core::sealing::seal(&key, value)?,
                key,
            },
        );
    } else {
        eprintln!(
            "provis: no key of yours (--key): no copy is kept for you, so `reseal` will need the value again"
        );
    }
    Ok(())
}

fn write(repository: &Path, name: &str, secret: &SealedSecret) -> anyhow::Result<PathBuf> {
    let path = secret_path(repository, name);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::write(&path, secret.to_toml(name)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

async fn seal(
    target: &SecretTarget,
    name: &str,
    roles: Vec<String>,
    minions: Vec<String>,
) -> anyhow::Result<ExitCode> {
    if !is_secret_name(name) {
        return Err(UsageError(format!(
            "{name:?} cannot name a secret: lowercase letters, digits, '-' and '_'"
        ))
        .into());
    }
    if roles.is_empty() && minions.is_empty() {
        return Err(
            UsageError("say who may read it: --role ROLE and/or --minion ID".into()).into(),
        );
    }
    let mut value = Vec::new();
    std::io::stdin()
        .read_to_end(&mut value)
        .context("cannot read the value on stdin")?;
    // `echo value |` adds a newline the value does not have.
    if value.ends_with(b"\n") {
        value.pop();
        if value.ends_with(b"\r") {
            value.pop();
        }
    }
    if value.is_empty() {
        return Err(UsageError("the value on stdin is empty".into()).into());
    }
    let operator = target.fleet.operator_key(target.key.as_deref())?;
    let records = registry(&target.fleet).await?;
    let mut secret = SealedSecret {
        roles,
        minions,
        ..SealedSecret::default()
    };
    let recipients = seal_to_members(&mut secret, &value, &records)?;
    if recipients.is_empty() {
        return Err(UsageError(format!(
            "no minion in the registry is a member (roles {:?}, minions {:?}): nobody could read it",
            secret.roles, secret.minions
        ))
        .into());
    }
    escrow(&mut secret, operator.as_ref(), &value)?;
    let path = write(&target.repository, name, &secret)?;
    outln!("sealed {name} to {}", recipients.join(", "));
    outln!("wrote {}: commit it", path.display());
    Ok(ExitCode::SUCCESS)
}

async fn reseal(target: &SecretTarget, names: Vec<String>) -> anyhow::Result<ExitCode> {
    let Some(operator) = target.fleet.operator_key(target.key.as_deref())? else {
        return Err(UsageError(
            "reseal opens your copy of each secret: give your key (--key) or connect with an identity".into(),
        )
        .into());
    };
    let dir = target.repository.join(SECRETS_DIR);
    let names = if names.is_empty() {
        let mut found: Vec<String> = std::fs::read_dir(&dir)
            .with_context(|| format!("cannot read {}", dir.display()))?
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".toml"))
                    .map(str::to_owned)
            })
            .collect();
        found.sort();
        found
    } else {
        names
    };
    let records = registry(&target.fleet).await?;
    for name in names {
        let path = secret_path(&target.repository, &name);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let mut secret = SealedSecret::parse(&text)
            .with_context(|| format!("{} is not a sealed secret", path.display()))?;
        let Some(copy) = secret.escrow.get(operator.public_key()) else {
            anyhow::bail!(
                "{name}: no copy is sealed to your key {}; seal it again with its value (provis secret seal)",
                operator.public_key()
            );
        };
        let value = operator
            .open_sealed(&copy.value)
            .with_context(|| format!("{name}: your copy does not open"))?;
        let report = seal_to_members(&mut secret, &value, &records)?;
        write(&target.repository, &name, &secret)?;
        outln!("resealed {name}: {}", report.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}
