//! Sealed secrets: a value encrypted to one recipient's X25519 key with
//! libsodium's sealed boxes (`crypto_box`: X25519, XSalsa20-Poly1305), so
//! that only that recipient opens it; anyone else holding the bytes (another
//! minion reading the bucket, a reader of the git repository) cannot.
//!
//! Each identity's X25519 key is derived from its ed25519 seed, as the
//! auth callout's keys are, so no second private key is stored. Its public
//! half (`x25519:<hex>`) travels in the minion's registry entry with a
//! signature by the identity that binds it to the minion's id
//! ([`encryption_key_statement`]); sealers check that binding.

/// How X25519 public keys are written.
pub const ENCRYPTION_PREFIX: &str = "x25519:";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("{0:?} is not an encryption key (x25519:<64 hex digits>)")]
    BadKey(String),
    #[error("the value could not be sealed")]
    Seal,
    #[error(
        "the sealed value does not open with this key (sealed to another recipient, or altered)"
    )]
    Open,
    #[error("the sealed value is not base64")]
    NotBase64,
}

/// The X25519 secret key derived from an ed25519 `seed`: sha256 of a
/// purpose label and the seed.
pub(crate) fn derive_secret_key(seed: &[u8; 32]) -> crypto_box::SecretKey {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    context.update(b"provis encryption x25519");
    context.update(seed);
    let mut derived = [0u8; 32];
    derived.copy_from_slice(context.finish().as_ref());
    crypto_box::SecretKey::from_bytes(derived)
}

/// `x25519:<hex>` of a public key.
pub(crate) fn public_text(key: &crypto_box::PublicKey) -> String {
    let hex: String = key.as_bytes().iter().map(|b| format!("{b:02x}")).collect();
    format!("{ENCRYPTION_PREFIX}{hex}")
}

fn public_key(text: &str) -> Result<crypto_box::PublicKey, SealError> {
    let bad = || SealError::BadKey(text.to_owned());
    let hex = text.strip_prefix(ENCRYPTION_PREFIX).ok_or_else(bad)?;
    if hex.len() != 64 {
        return Err(bad());
    }
    let mut bytes = [0u8; 32];
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(i * 2..i * 2 + 2).ok_or_else(bad)?, 16)
            .map_err(|_| bad())?;
    }
    Ok(crypto_box::PublicKey::from_bytes(bytes))
}

/// True when `text` is an encryption key as provis writes them.
pub fn is_encryption_key(text: &str) -> bool {
    public_key(text).is_ok()
}

/// `plaintext` sealed to `recipient` (`x25519:<hex>`), as base64.
pub fn seal(recipient: &str, plaintext: &[u8]) -> Result<String, SealError> {
    let key = public_key(recipient)?;
    let sealed = key
        .seal(&mut crypto_box::aead::OsRng, plaintext)
        .map_err(|_| SealError::Seal)?;
    Ok(data_encoding::BASE64.encode(&sealed))
}

/// Opens base64 `sealed` with `secret`.
pub(crate) fn open(secret: &crypto_box::SecretKey, sealed: &str) -> Result<Vec<u8>, SealError> {
    let bytes = data_encoding::BASE64
        .decode(sealed.trim().as_bytes())
        .map_err(|_| SealError::NotBase64)?;
    secret.unseal(&bytes).map_err(|_| SealError::Open)
}

/// What an identity signs to bind its encryption key to `owner` (a minion id).
pub fn encryption_key_statement(owner: &str, encryption_key: &str) -> Vec<u8> {
    format!("provis-encryption-key-v1\n{owner}\n{encryption_key}").into_bytes()
}

/// True when `signature` is `identity_key`'s binding of `encryption_key` to `owner`.
pub fn is_bound(identity_key: &str, owner: &str, encryption_key: &str, signature: &str) -> bool {
    crate::identity::verify(
        identity_key,
        &encryption_key_statement(owner, encryption_key),
        signature,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;

    #[test]
    fn only_the_recipient_opens_a_sealed_value() {
        let dir = tempfile::tempdir().unwrap();
        let web = Identity::create(&dir.path().join("web.key")).unwrap();
        let db = Identity::create(&dir.path().join("db.key")).unwrap();
        let sealed = seal(&web.encryption_public_key(), b"s3cret").unwrap();
        assert_eq!(web.open_sealed(&sealed).unwrap(), b"s3cret");
        assert_eq!(db.open_sealed(&sealed), Err(SealError::Open));
        // The same key again after a restart: derived, not stored.
        let again = Identity::load(&dir.path().join("web.key")).unwrap();
        assert_eq!(again.encryption_public_key(), web.encryption_public_key());
        assert_eq!(again.open_sealed(&sealed).unwrap(), b"s3cret");
        // The binding holds for its owner only, and for its key only.
        let bound = web.bind_encryption_key("m1");
        assert!(is_bound(
            web.public_key(),
            "m1",
            &web.encryption_public_key(),
            &bound
        ));
        assert!(!is_bound(
            web.public_key(),
            "m2",
            &web.encryption_public_key(),
            &bound
        ));
        assert!(!is_bound(
            web.public_key(),
            "m1",
            &db.encryption_public_key(),
            &bound
        ));
        assert!(matches!(seal("x25519:zz", b"x"), Err(SealError::BadKey(_))));
    }
}
