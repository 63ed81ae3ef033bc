//! Identities: an ed25519 key per master, minion and operator. A private key
//! lives in one file, written with mode 0600 and never logged or sent; its
//! public half is text (`ed25519:<hex>`) that others pin.
//!
//! The same key is the identity NATS sees: [`Identity::nkey`] is its nkey
//! (NATS's encoding of an ed25519 key), so a process connects and signs with
//! one key. Keys the NATS server config needs beside it (the auth callout's
//! issuer and service user) are derived from it, never stored apart.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ring::signature::{Ed25519KeyPair, KeyPair};

const PUBLIC_PREFIX: &str = "ed25519:";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{0} exists already; a key is never overwritten")]
    Exists(PathBuf),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}")]
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
    /// The same key as a NATS user nkey, and its seed in NATS's encoding.
    nkey: nkeys::KeyPair,
    nkey_seed: String,
    /// Keys derived from this one, made once when the key is read.
    callout_issuer: nkeys::KeyPair,
    callout_service: nkeys::KeyPair,
    /// The X25519 key secrets are sealed to (see [`crate::sealing`]).
    encryption: crypto_box::SecretKey,
}

/// What a key derived from an identity is for: each purpose gets its own
/// key, so one cannot stand in for another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DerivedKey {
    /// The account key that signs the users the master's auth callout admits.
    CalloutIssuer,
    /// The user the master's auth callout service connects as (it bypasses the callout).
    CalloutService,
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
        let not_a_key = || IdentityError::NotAKey(path.to_owned());
        let pair = Ed25519KeyPair::from_pkcs8(bytes).map_err(|_| not_a_key())?;
        let seed = pkcs8_seed(bytes).ok_or_else(not_a_key)?;
        // The seed read from the document must be the key ring parsed.
        let nkey = nkeys::KeyPair::new_from_raw(nkeys::KeyPairType::User, seed)
            .map_err(|_| not_a_key())?;
        if public_key_of_nkey(&nkey.public_key()).as_deref()
            != Some(format!("{PUBLIC_PREFIX}{}", hex(pair.public_key().as_ref())).as_str())
        {
            return Err(not_a_key());
        }
        let public_key = format!("{PUBLIC_PREFIX}{}", hex(pair.public_key().as_ref()));
        let nkey_seed = nkey.seed().map_err(|_| not_a_key())?;
        let derive = |purpose| derive_key(&seed, purpose).map_err(|_| not_a_key());
        Ok(Self {
            pair,
            public_key,
            callout_issuer: derive(DerivedKey::CalloutIssuer)?,
            callout_service: derive(DerivedKey::CalloutService)?,
            encryption: crate::sealing::derive_secret_key(&seed),
            nkey,
            nkey_seed,
        })
    }

    /// This identity as a NATS user nkey (same key, NATS's encoding).
    pub fn nkey(&self) -> &nkeys::KeyPair {
        &self.nkey
    }

    /// The nkey seed (`SU…`) NATS clients connect with: as secret as the key.
    pub fn nkey_seed(&self) -> &str {
        &self.nkey_seed
    }

    /// The public nkey (`U…`) NATS sees this identity as.
    pub fn nkey_public(&self) -> String {
        self.nkey.public_key()
    }

    /// The key derived from this one for `purpose`.
    pub fn derived(&self, purpose: DerivedKey) -> &nkeys::KeyPair {
        match purpose {
            DerivedKey::CalloutIssuer => &self.callout_issuer,
            DerivedKey::CalloutService => &self.callout_service,
        }
    }

    /// The public key, as others pin it: `ed25519:<hex>`.
    pub fn public_key(&self) -> &str {
        &self.public_key
    }

    /// An ed25519 signature of `message`, in hex.
    pub fn sign(&self, message: &[u8]) -> String {
        hex(self.pair.sign(message).as_ref())
    }

    /// The public key secrets are sealed to: `x25519:<hex>`.
    pub fn encryption_public_key(&self) -> String {
        crate::sealing::public_text(&self.encryption.public_key())
    }

    /// The signature binding this identity's encryption key to `owner`.
    pub fn bind_encryption_key(&self, owner: &str) -> String {
        self.sign(&crate::sealing::encryption_key_statement(
            owner,
            &self.encryption_public_key(),
        ))
    }

    /// Opens a value sealed (base64) to this identity's encryption key.
    pub fn open_sealed(&self, sealed: &str) -> Result<Vec<u8>, crate::sealing::SealError> {
        crate::sealing::open(&self.encryption, sealed)
    }
}

/// The key for `purpose` derived from `seed`: sha256 of a purpose label and
/// the seed, so it is reproducible and yet a different key.
fn derive_key(seed: &[u8; 32], purpose: DerivedKey) -> Result<nkeys::KeyPair, nkeys::error::Error> {
    let (label, kind): (&[u8], _) = match purpose {
        DerivedKey::CalloutIssuer => (b"provis callout issuer", nkeys::KeyPairType::Account),
        DerivedKey::CalloutService => (b"provis callout service", nkeys::KeyPairType::User),
    };
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    context.update(label);
    context.update(seed);
    let mut derived = [0u8; 32];
    derived.copy_from_slice(context.finish().as_ref());
    nkeys::KeyPair::new_from_raw(kind, derived)
}

/// Where the public half of the key at `path` is written.
pub fn public_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".pub");
    PathBuf::from(name)
}

/// `bytes` bytes from the system's random source, in hex: one-time tokens.
pub fn random_hex(bytes: usize) -> Result<String, IdentityError> {
    use ring::rand::SecureRandom as _;
    let mut buffer = vec![0u8; bytes];
    ring::rand::SystemRandom::new()
        .fill(&mut buffer)
        .map_err(|_| IdentityError::Random)?;
    Ok(hex(&buffer))
}

/// sha256 of `text`, in hex: how one-time tokens are stored.
pub fn sha256_hex(text: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, text.as_bytes()).as_ref())
}

/// The ed25519 seed inside a PKCS#8 document (v1 or v2, as ring writes them):
/// the 32 bytes after the Ed25519 algorithm id and the OCTET STRING headers.
fn pkcs8_seed(document: &[u8]) -> Option<[u8; 32]> {
    const MARKER: [u8; 9] = [0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];
    let at = document.windows(MARKER.len()).position(|w| w == MARKER)? + MARKER.len();
    document.get(at..at + 32)?.try_into().ok()
}

/// `ed25519:<hex>` of a public nkey of any kind (`U…`, `A…`, `N…`), or None
/// when `nkey` is not one.
pub fn public_key_of_nkey(nkey: &str) -> Option<String> {
    let (_, raw) = nkeys::from_public_key(nkey).ok()?;
    Some(format!("{PUBLIC_PREFIX}{}", hex(&raw)))
}

/// True when `text` is a public key in the form provis writes (`ed25519:<64 hex>`).
pub fn is_public_key(text: &str) -> bool {
    text.strip_prefix(PUBLIC_PREFIX)
        .and_then(unhex)
        .is_some_and(|key| key.len() == 32)
}

/// True when `signature` (hex) is `public_key`'s signature of `message`.
///
/// A caller of ten thousand minions checks ten thousand replies per call
/// against the same ten thousand keys: each key is parsed (its point
/// decompressed) once and kept, and checked with ed25519-dalek by RFC 8032
/// (a non-canonical `S` is refused), as ring checked it before.
pub fn verify(public_key: &str, message: &[u8], signature: &str) -> bool {
    let Some(key) = verifying_key(public_key) else {
        return false;
    };
    let Some(signature) = unhex(signature)
        .and_then(|bytes| <[u8; 64]>::try_from(bytes).ok())
        .map(|bytes| ed25519_dalek::Signature::from_bytes(&bytes))
    else {
        return false;
    };
    ed25519_dalek::Verifier::verify(&key, message, &signature).is_ok()
}

/// The parsed key of `public_key` (`ed25519:<hex>`), from the keys seen
/// before when it is one of them.
fn verifying_key(public_key: &str) -> Option<ed25519_dalek::VerifyingKey> {
    static PARSED: std::sync::LazyLock<moka::sync::Cache<String, ed25519_dalek::VerifyingKey>> =
        std::sync::LazyLock::new(|| moka::sync::Cache::new(PARSED_KEYS_KEPT));
    if let Some(key) = PARSED.get(public_key) {
        return Some(key);
    }
    let bytes: [u8; 32] = public_key
        .strip_prefix(PUBLIC_PREFIX)
        .and_then(unhex)?
        .try_into()
        .ok()?;
    let key = ed25519_dalek::VerifyingKey::from_bytes(&bytes).ok()?;
    PARSED.insert(public_key.to_owned(), key);
    Some(key)
}

/// How many parsed public keys are kept: a fleet of 100,000 minions and
/// its operators.
const PARSED_KEYS_KEPT: u64 = 120_000;

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
        assert!(!format!("{alice:?}").contains("seed"));
    }

    #[test]
    fn the_nkey_is_the_same_key_and_derived_keys_differ() {
        let dir = tempfile::tempdir().unwrap();
        let alice = Identity::create(&dir.path().join("alice.key")).unwrap();
        let nkey = alice.nkey();
        assert!(nkey.public_key().starts_with('U'));
        assert_eq!(
            public_key_of_nkey(&nkey.public_key()).as_deref(),
            Some(alice.public_key())
        );
        // A signature by the nkey verifies as the identity's.
        let signature = nkey.sign(b"nonce").unwrap();
        let hex_signature: String = signature.iter().map(|b| format!("{b:02x}")).collect();
        assert!(verify(alice.public_key(), b"nonce", &hex_signature));
        let issuer = alice.derived(DerivedKey::CalloutIssuer);
        let service = alice.derived(DerivedKey::CalloutService);
        assert!(issuer.public_key().starts_with('A'));
        assert!(service.public_key().starts_with('U'));
        assert_ne!(service.public_key(), nkey.public_key());
        let again = Identity::load(&dir.path().join("alice.key")).unwrap();
        assert_eq!(
            again.derived(DerivedKey::CalloutIssuer).public_key(),
            issuer.public_key()
        );
        assert_eq!(public_key_of_nkey("not a key"), None);
    }
}
