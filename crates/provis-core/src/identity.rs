//! Identities: an ed25519 key per master, minion and operator. A private key
//! lives in one file, written with mode 0600 and never logged or sent; its
//! public half is text (`ed25519:<hex>`) that others pin.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

const PUBLIC_PREFIX: &str = "ed25519:";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{0} exists already; a key is never overwritten")]
    Exists(PathBuf),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is not an ed25519 private key (PKCS#8)")]
    NotAKey(PathBuf),
    #[error("cannot generate a key: the system's random source failed")]
    Random,
}

/// A private key and its public half.
pub struct Identity {
    pair: Ed25519KeyPair,
    public_key: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the private key.
        f.debug_struct("Identity")
            .field("public_key", &self.public_key)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Generates a key and writes it to `path` (mode 0600, never over an
    /// existing file), with its public key beside it in `<path>.pub`.
    pub fn create(path: &Path) -> Result<Self, IdentityError> {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| IdentityError::Random)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| IdentityError::Write {
                path: dir.to_owned(),
                source,
            })?;
        }
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| match source.kind() {
                std::io::ErrorKind::AlreadyExists => IdentityError::Exists(path.to_owned()),
                _ => IdentityError::Write {
                    path: path.to_owned(),
                    source,
                },
            })?;
        file.write_all(pkcs8.as_ref())
            .map_err(|source| IdentityError::Write {
                path: path.to_owned(),
                source,
            })?;
        let identity = Self::from_pkcs8(pkcs8.as_ref(), path)?;
        let public = public_path(path);
        std::fs::write(&public, format!("{}\n", identity.public_key)).map_err(|source| {
            IdentityError::Write {
                path: public,
                source,
            }
        })?;
        Ok(identity)
    }

    /// Reads the key at `path`.
    pub fn load(path: &Path) -> Result<Self, IdentityError> {
        let bytes = std::fs::read(path).map_err(|source| IdentityError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_pkcs8(&bytes, path)
    }

    /// Reads the key at `path`, creating it first if there is none.
    pub fn load_or_create(path: &Path) -> Result<Self, IdentityError> {
        if path.exists() {
            Self::load(path)
        } else {
            Self::create(path)
        }
    }

    fn from_pkcs8(bytes: &[u8], path: &Path) -> Result<Self, IdentityError> {
        let pair = Ed25519KeyPair::from_pkcs8(bytes)
            .map_err(|_| IdentityError::NotAKey(path.to_owned()))?;
        let public_key = format!("{PUBLIC_PREFIX}{}", hex(pair.public_key().as_ref()));
        Ok(Self { pair, public_key })
    }

    /// The public key, as others pin it: `ed25519:<hex>`.
    pub fn public_key(&self) -> &str {
        &self.public_key
    }

    /// An ed25519 signature of `message`, in hex.
    pub fn sign(&self, message: &[u8]) -> String {
        hex(self.pair.sign(message).as_ref())
    }
}

/// Where the public half of the key at `path` is written.
pub fn public_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".pub");
    PathBuf::from(name)
}

/// True when `text` is a public key in the form provis writes (`ed25519:<64 hex>`).
pub fn is_public_key(text: &str) -> bool {
    text.strip_prefix(PUBLIC_PREFIX)
        .and_then(unhex)
        .is_some_and(|key| key.len() == 32)
}

/// True when `signature` (hex) is `public_key`'s signature of `message`.
pub fn verify(public_key: &str, message: &[u8], signature: &str) -> bool {
    let (Some(key), Some(signature)) = (
        public_key.strip_prefix(PUBLIC_PREFIX).and_then(unhex),
        unhex(signature),
    ) else {
        return false;
    };
    UnparsedPublicKey::new(&ED25519, key)
        .verify(message, &signature)
        .is_ok()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_key_is_private_signs_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/alice.key");
        let alice = Identity::create(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(matches!(
            Identity::create(&path),
            Err(IdentityError::Exists(_))
        ));
        let again = Identity::load(&path).unwrap();
        assert_eq!(again.public_key(), alice.public_key());
        assert_eq!(
            std::fs::read_to_string(public_path(&path)).unwrap().trim(),
            alice.public_key()
        );
        let signature = alice.sign(b"hello");
        assert!(verify(alice.public_key(), b"hello", &signature));
        assert!(!verify(alice.public_key(), b"hellO", &signature));
        let mallory = Identity::create(&dir.path().join("mallory.key")).unwrap();
        assert!(!verify(mallory.public_key(), b"hello", &signature));
        assert!(!verify("ed25519:zz", b"hello", &signature));
        assert!(!format!("{alice:?}").contains("pair"));
    }
}
