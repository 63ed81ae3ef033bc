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
//! The signature travels inside the JSON object as two extra fields
//! (`_signer`, `_signature`) over the canonical JSON of the rest, so readers
//! that do not check see the value they always did once the two are removed.

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::identity::{Identity, verify};

const SIGNER: &str = "_signer";
const SIGNATURE: &str = "_signature";

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
}

fn message(bucket: &str, key: &str, value: &Map<String, Value>) -> Vec<u8> {
    let mut message = format!("provis-entry-v1:{bucket}:{key}:").into_bytes();
    message.extend(serde_json::to_vec(value).unwrap_or_default());
    message
}

/// `value` as stored under `bucket`/`key`, signed by `identity`.
pub fn sign(
    bucket: &str,
    key: &str,
    value: &impl Serialize,
    identity: &Identity,
) -> Result<Vec<u8>, EntryError> {
    let Value::Object(mut object) =
        serde_json::to_value(value).map_err(|err| EntryError::NotJson(err.to_string()))?
    else {
        return Err(EntryError::NotJson("not an object".into()));
    };
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
) -> Result<T, EntryError> {
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
    serde_json::from_value(Value::Object(object)).map_err(|err| EntryError::Value(err.to_string()))
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
        let stored = sign("provis_roles", "web", &spec, &master).unwrap();
        let opened: RoleSpec = open("provis_roles", "web", &stored, &trusted).unwrap();
        assert_eq!(opened, spec);
        // Readers that pin nothing see the plain value.
        let plain: RoleSpec = open("provis_roles", "web", &stored, &[]).unwrap();
        assert_eq!(plain, spec);
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
        let theirs = sign("provis_roles", "web", &spec, &stranger).unwrap();
        assert!(matches!(
            open::<RoleSpec>("provis_roles", "web", &theirs, &trusted),
            Err(EntryError::Untrusted(_))
        ));
        // Signing is deterministic: the same value writes the same bytes.
        assert_eq!(stored, sign("provis_roles", "web", &spec, &master).unwrap());
    }
}
