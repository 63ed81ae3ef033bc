//! Desired-state entries signed by the master and bound to their bucket and
//! key, so a minion takes a role or an assignment only as the master wrote
//! it for that very key.
//!
//! Why the binding: nats-server does not check the subjects JetStream
//! answers or delivers to against permissions, so whoever may read a stream
//! can have the server copy any stored message onto any subject of the
//! account — another role's or minion's key included. A signature over the
//! value alone would survive that copy; one over bucket, key and value does
//! not.
//!
//! The signature also covers when the entry was written (`_at`, unix ms,
//! never lower than the entry it replaces), so a reader that remembers the
//! latest it took refuses an older value copied back under the same key.
//!
//! The signature travels inside the JSON object as extra fields
//! (`_signer`, `_signature`, `_at`) over the canonical JSON of the rest and
//! `_at`, so readers that do not check see the value they always did once
//! those are removed.

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::identity::{Identity, verify};

const SIGNER: &str = "_signer";
const SIGNATURE: &str = "_signature";
const WRITTEN_AT: &str = "_at";

#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    #[error("not a JSON object: {0}")]
    NotJson(String),
    #[error("not signed, and this minion takes only entries a key it pins signed")]
    Unsigned,
    #[error("signed by {0}, which this minion does not pin")]
    Untrusted(String),
    #[error("the signature does not cover this value under {bucket}/{key} (copied or altered)")]
    BadSignature { bucket: String, key: String },
    #[error("unreadable value: {0}")]
    Value(String),
    #[error("written at {at} ms, before the entry held ({held} ms): an older value put back")]
    Older { at: i64, held: i64 },
}

/// An entry's value and when it was written (None: unsigned).
#[derive(Debug, Clone, PartialEq)]
pub struct Opened<T> {
    pub value: T,
    pub written_at_ms: Option<i64>,
}

impl<T> Opened<T> {
    /// Refuses this entry when it is older than `held` (the latest taken).
    pub fn not_older_than(self, held: Option<i64>) -> Result<Self, EntryError> {
        match (self.written_at_ms, held) {
            (Some(at), Some(held)) if at < held => Err(EntryError::Older { at, held }),
            _ => Ok(self),
        }
    }
}

fn message(bucket: &str, key: &str, value: &Map<String, Value>) -> Vec<u8> {
    let mut message = format!("provis-entry-v1:{bucket}:{key}:").into_bytes();
    message.extend(serde_json::to_vec(value).unwrap_or_default());
    message
}

/// `value` as stored under `bucket`/`key`, signed by `identity`, written at
/// `written_at_ms` (pass [`next_written_at`] of the entry it replaces).
pub fn sign(
    bucket: &str,
    key: &str,
    value: &impl Serialize,
    identity: &Identity,
    written_at_ms: i64,
) -> Result<Vec<u8>, EntryError> {
    let Value::Object(mut object) =
        serde_json::to_value(value).map_err(|err| EntryError::NotJson(err.to_string()))?
    else {
        return Err(EntryError::NotJson("not an object".into()));
    };
    object.insert(WRITTEN_AT.into(), written_at_ms.into());
    let signature = identity.sign(&message(bucket, key, &object));
    object.insert(SIGNER.into(), identity.public_key().into());
    object.insert(SIGNATURE.into(), signature.into());
    serde_json::to_vec(&object).map_err(|err| EntryError::NotJson(err.to_string()))
}

/// The value stored as `bytes` under `bucket`/`key`. With `trusted` keys,
/// only when one of them signed it for this bucket and key; without, as it
/// is (an unsecured fleet).
pub fn open<T: DeserializeOwned>(
    bucket: &str,
    key: &str,
    bytes: &[u8],
    trusted: &[String],
) -> Result<Opened<T>, EntryError> {
    let Value::Object(mut object) =
        serde_json::from_slice(bytes).map_err(|err| EntryError::NotJson(err.to_string()))?
    else {
        return Err(EntryError::NotJson("not an object".into()));
    };
    let signer = object.remove(SIGNER);
    let signature = object.remove(SIGNATURE);
    if !trusted.is_empty() {
        let (Some(Value::String(signer)), Some(Value::String(signature))) = (signer, signature)
        else {
            return Err(EntryError::Unsigned);
        };
        if !trusted.contains(&signer) {
            return Err(EntryError::Untrusted(signer));
        }
        if !verify(&signer, &message(bucket, key, &object), &signature) {
            return Err(EntryError::BadSignature {
                bucket: bucket.to_owned(),
                key: key.to_owned(),
            });
        }
    }
    let written_at_ms = object.remove(WRITTEN_AT).and_then(|at| at.as_i64());
    let value = serde_json::from_value(Value::Object(object))
        .map_err(|err| EntryError::Value(err.to_string()))?;
    Ok(Opened {
        value,
        written_at_ms,
    })
}

/// When to write the entry that replaces `current` (its stored bytes):
/// now, or just after it should the clock have gone back.
pub fn next_written_at(current: Option<&[u8]>, now_ms: i64) -> i64 {
    let previous = current
        .and_then(|bytes| open::<Value>("", "", bytes, &[]).ok())
        .and_then(|opened| opened.written_at_ms);
    previous.map_or(now_ms, |previous| now_ms.max(previous + 1))
}

/// True when the stored bytes hold `value` — signed by `signer` for this
/// bucket and key when one is given — so there is nothing to write.
pub fn holds(
    bucket: &str,
    key: &str,
    current: Option<&[u8]>,
    value: &impl Serialize,
    signer: Option<&str>,
) -> bool {
    let (Some(current), Ok(wanted)) = (current, serde_json::to_value(value)) else {
        return false;
    };
    let trusted: Vec<String> = signer.map(str::to_owned).into_iter().collect();
    open::<Value>(bucket, key, current, &trusted).is_ok_and(|opened| opened.value == wanted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::roles::RoleSpec;

    #[test]
    fn an_entry_opens_only_under_the_key_it_was_signed_for() {
        let dir = tempfile::tempdir().unwrap();
        let master = Identity::create(&dir.path().join("master.key")).unwrap();
        let stranger = Identity::create(&dir.path().join("stranger.key")).unwrap();
        let trusted = vec![master.public_key().to_owned()];
        let spec = RoleSpec {
            services: vec!["site".into()],
            ..RoleSpec::default()
        };
        let stored = sign("provis_roles", "web", &spec, &master, 1_000).unwrap();
        let opened = open::<RoleSpec>("provis_roles", "web", &stored, &trusted).unwrap();
        assert_eq!(opened.value, spec);
        assert_eq!(opened.written_at_ms, Some(1_000));
        // Readers that pin nothing see the plain value.
        let plain = open::<RoleSpec>("provis_roles", "web", &stored, &[]).unwrap();
        assert_eq!(plain.value, spec);
        assert!(holds(
            "provis_roles",
            "web",
            Some(&stored),
            &spec,
            Some(master.public_key())
        ));
        assert!(!holds(
            "provis_roles",
            "db",
            Some(&stored),
            &spec,
            Some(master.public_key())
        ));
        // An older value put back is refused by a reader that took a newer one.
        assert_eq!(next_written_at(Some(&stored), 500), 1_001);
        let newer = sign("provis_roles", "web", &spec, &master, 1_001).unwrap();
        let held = open::<RoleSpec>("provis_roles", "web", &newer, &trusted)
            .unwrap()
            .written_at_ms;
        assert!(matches!(
            opened.not_older_than(held),
            Err(EntryError::Older { .. })
        ));
        // Copied under another key, or another bucket.
        assert!(matches!(
            open::<RoleSpec>("provis_roles", "db", &stored, &trusted),
            Err(EntryError::BadSignature { .. })
        ));
        assert!(matches!(
            open::<RoleSpec>("provis_assignments", "web", &stored, &trusted),
            Err(EntryError::BadSignature { .. })
        ));
        let unsigned = serde_json::to_vec(&spec).unwrap();
        assert!(matches!(
            open::<RoleSpec>("provis_roles", "web", &unsigned, &trusted),
            Err(EntryError::Unsigned)
        ));
        let theirs = sign("provis_roles", "web", &spec, &stranger, 1_000).unwrap();
        assert!(matches!(
            open::<RoleSpec>("provis_roles", "web", &theirs, &trusted),
            Err(EntryError::Untrusted(_))
        ));
        // Signing is deterministic: the same value and time write the same bytes.
        assert_eq!(
            stored,
            sign("provis_roles", "web", &spec, &master, 1_000).unwrap()
        );
    }
}
