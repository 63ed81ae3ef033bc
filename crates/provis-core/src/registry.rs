//! The minion registry (`provis_minions`): what each minion says about
//! itself, written when it changes (start, roles, services, facts, the state
//! summary, stop), and how callers read it.
//!
//! Liveness is not in the record: heartbeats are small core NATS messages
//! (see [`crate::presence`]) that masters judge by their own clock when
//! they arrive, never by the minion's. The record's `status` says what the
//! minion or the leading master last decided: online, stopped cleanly, or
//! offline after missed heartbeats.

use std::collections::BTreeMap;

use async_nats::jetstream::kv::Store;
use serde::{Deserialize, Serialize};

use crate::subject::{CallTarget, MinionId, RoleName};

/// A minion counts as live while its last heartbeat is younger than this many
/// of its own heartbeat intervals.
pub const MISSED_HEARTBEATS_OFFLINE: u32 = 3;

/// Whether the minion is running, stopped cleanly, or went silent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MinionStatus {
    Online,
    /// It stopped cleanly and said so.
    Stopped,
    /// It missed its heartbeats; the master marked it so.
    Offline,
}

/// A commit a minion cannot converge on yet, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failing {
    pub commit: String,
    /// Service → why its bundle did not fetch or load.
    pub services: BTreeMap<String, String>,
}

/// One minion's registry entry, keyed by its id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MinionRecord {
    pub id: MinionId,
    pub hostname: String,
    pub roles: Vec<RoleName>,
    /// The provis version the minion runs.
    pub version: String,
    pub status: MinionStatus,
    pub started_unix_ms: i64,
    /// When the minion wrote this record, by its own clock (for display
    /// only: nothing judges liveness by it).
    #[serde(alias = "heartbeat_unix_ms")]
    pub written_unix_ms: i64,
    /// How often it sends a heartbeat.
    pub heartbeat_interval_ms: i64,
    /// Services the minion runs, built-in ones included: name → version.
    pub services: BTreeMap<String, String>,
    /// What the machine is (see the minion's `machine` module for the fields).
    #[serde(default)]
    pub facts: serde_json::Value,
    /// A summary of the latest state sample (numbers rounded, so it
    /// changes, and is written, only when the machine's state really does).
    #[serde(default)]
    pub state: serde_json::Value,
    /// The applied commit whose assignment this minion has converged on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub converged_commit: Option<String>,
    /// The commit it tries to converge on and cannot, with why: service →
    /// the reason its bundle did not fetch or load (retried with backoff).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failing: Option<Failing>,
    /// Roles it holds only through `provis role assign`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overlay_roles: Vec<RoleName>,
    /// Address of the minion's local gRPC API, when it serves one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_addr: Option<String>,
    /// Whether that API speaks TLS.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub grpc_tls: bool,
    /// The API's TLS certificate (PEM), which callers pin when they are
    /// given no authority of their own: the record is the minion's own
    /// (no one else may write it), so a caller reaches that minion's API
    /// and no impostor's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_tls_cert: Option<String>,
    /// The key the minion signs its replies with (`ed25519:<hex>`); callers
    /// discard replies in its name that this key did not sign.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    /// The key secrets are sealed to (`x25519:<hex>`), derived from the
    /// minion's identity key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption_key: Option<String>,
    /// `public_key`'s signature binding `encryption_key` to this id
    /// ([`crate::sealing::is_bound`]): sealers check it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption_key_signature: Option<String>,
}

impl MinionRecord {
    /// The encryption key, if the record has one its identity bound to it.
    pub fn bound_encryption_key(&self) -> Option<&str> {
        let (identity, key, signature) = (
            self.public_key.as_deref()?,
            self.encryption_key.as_deref()?,
            self.encryption_key_signature.as_deref()?,
        );
        crate::sealing::is_bound(identity, self.id.as_str(), key, signature).then_some(key)
    }
}

impl MinionRecord {
    /// True when the record says the minion runs (neither stopped nor
    /// marked offline): all a caller without a master can go by.
    pub fn is_online(&self) -> bool {
        self.status == MinionStatus::Online
    }

    /// Its heartbeat period.
    pub fn heartbeat_interval(&self) -> std::time::Duration {
        std::time::Duration::from_millis(u64::try_from(self.heartbeat_interval_ms).unwrap_or(0))
    }

    /// True when a call to `target` reaches this minion.
    pub fn is_addressed_by(&self, target: &CallTarget) -> bool {
        match target {
            CallTarget::All => true,
            CallTarget::Role(role) => self.roles.iter().any(|own| own.is_within(role)),
            CallTarget::Minions(ids) => ids.contains(&self.id),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot open bucket {bucket} (is a provis master running on this NATS?)")]
    Open {
        bucket: &'static str,
        source: async_nats::jetstream::context::KeyValueError,
    },
    #[error("cannot read the minion registry")]
    Read(#[source] async_nats::Error),
    #[error("cannot write the minion registry")]
    Write(#[source] async_nats::Error),
}

/// Opens the registry bucket, which the master creates.
pub async fn open_registry(js: &async_nats::jetstream::Context) -> Result<Store, RegistryError> {
    js.get_key_value(crate::storage::BUCKET_MINIONS)
        .await
        .map_err(|source| RegistryError::Open {
            bucket: crate::storage::BUCKET_MINIONS,
            source,
        })
}

/// Writes a minion's own record.
/// Returns the revision the bucket stored it under.
pub async fn put_record(store: &Store, record: &MinionRecord) -> Result<u64, RegistryError> {
    let value = serde_json::to_vec(record).map_err(|err| RegistryError::Write(Box::new(err)))?;
    store
        .put(record.id.as_str(), value.into())
        .await
        .map_err(|err| RegistryError::Write(Box::new(err)))
}

/// Reads every record in one pass over the bucket, not one request per
/// minion. Entries that do not parse are skipped with a warning: one bad
/// record must not hide the fleet.
pub async fn read_all(store: &Store) -> Result<Vec<MinionRecord>, RegistryError> {
    let values = crate::kv_snapshot::read_all(store)
        .await
        .map_err(|err| RegistryError::Read(Box::new(err)))?;
    Ok(values
        .into_iter()
        .filter_map(
            |(key, value)| match serde_json::from_slice::<MinionRecord>(&value) {
                // A minion may write only its own key: a record naming
                // another id is someone speaking for that minion.
                Ok(record) if record.id.as_str() == key => Some(record),
                Ok(record) => {
                    tracing::warn!(%key, claimed = %record.id, "registry entry under another minion's key skipped");
                    None
                }
                Err(err) => {
                    tracing::warn!(%key, error = %err, "unreadable registry entry skipped");
                    None
                }
            },
        )
        .collect())
}

/// The online minions a call to `target` reaches, sorted by id.
pub async fn live_members(
    store: &Store,
    target: &CallTarget,
) -> Result<Vec<MinionRecord>, RegistryError> {
    let mut members: Vec<MinionRecord> = read_all(store)
        .await?
        .into_iter()
        .filter(|record| record.is_online() && record.is_addressed_by(target))
        .collect();
    members.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(members)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(roles: &[&str], heartbeat: i64) -> MinionRecord {
        MinionRecord {
            id: "m1".parse().unwrap(),
            hostname: "h".into(),
            roles: roles.iter().map(|r| r.parse().unwrap()).collect(),
            version: "0".into(),
            status: MinionStatus::Online,
            started_unix_ms: 0,
            written_unix_ms: heartbeat,
            heartbeat_interval_ms: 1_000,
            services: BTreeMap::new(),
            facts: serde_json::Value::Null,
            state: serde_json::Value::Null,
            grpc_addr: None,
            grpc_tls: false,
            grpc_tls_cert: None,
            public_key: None,
            encryption_key: None,
            encryption_key_signature: None,
            converged_commit: None,
            failing: None,
            overlay_roles: Vec::new(),
        }
    }

    #[test]
    fn records_of_older_minions_still_read() {
        let mut json = serde_json::to_value(record(&[], 10_000)).unwrap();
        let written = json
            .as_object_mut()
            .unwrap()
            .remove("written_unix_ms")
            .unwrap();
        json["heartbeat_unix_ms"] = written;
        let old: MinionRecord = serde_json::from_value(json).unwrap();
        assert_eq!(old.written_unix_ms, 10_000);
        assert!(old.is_online());
    }

    #[test]
    fn a_role_call_reaches_sub_role_members() {
        let r = record(&["web.eu"], 0);
        assert!(r.is_addressed_by(&CallTarget::Role("web".parse().unwrap())));
        assert!(!r.is_addressed_by(&CallTarget::Role("db".parse().unwrap())));
        assert!(r.is_addressed_by(&CallTarget::All));
    }
}
