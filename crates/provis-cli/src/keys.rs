//! `provis keys`: identities on this machine. A key is an ed25519 private key
//! in a file of its own (mode 0600), with its public half in `<file>.pub`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;
use provis_core::identity::{Identity, public_path};

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

pub fn run(command: KeysCommand) -> anyhow::Result<ExitCode> {
    match command {
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
