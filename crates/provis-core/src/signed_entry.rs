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
//!
//! [`follow`] is the one loop that follows keys of a bucket for as long as
//! its reader runs: it subscribes to the keys' changes and reads their
//! current values, opens each entry (verifying it with [`signed_by`], or as
//! the caller says), refuses one older than the entry held under its key,
//! backs off while the bucket is unreachable and reads again after a
//! reconnect.

use std::collections::HashMap;
use std::time::Duration;

use futures::{Stream, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::identity::{Identity, verify};

const SIGNER: &str = "_signer";
const SIGNATURE: &str = "_signature";
const WRITTEN_AT: &str = "_at";
const TERM: &str = "_term";

/// When an entry was written, and in which leader's term: entries compare
/// by term first (a deposed leader's later write loses to its successor's
/// earlier one), then by time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Stamp {
    /// The writing leader's term (the lease revision it led from); 0 for
    /// entries written outside a leader (`provis apply`, older masters).
    pub term: u64,
    pub at_ms: i64,
}

impl From<i64> for Stamp {
    /// Written at `at_ms`, outside any term.
    fn from(at_ms: i64) -> Self {
        Self { term: 0, at_ms }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
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
    #[error(
        "written at {at} ms in term {term}, before the entry held ({held} ms, term {held_term}): an older value put back"
    )]
    Older {
        at: i64,
        term: u64,
        held: i64,
        held_term: u64,
    },
    #[error("no key is pinned, so no entry can be told genuine")]
    NothingPinned,
    #[error("stored under {key} but names {named}")]
    WrongKey { key: String, named: String },
}

impl EntryError {
    /// True when the entry was refused because it is not genuine or not
    /// current (as opposed to not readable): worth an event.
    pub fn is_denial(&self) -> bool {
        matches!(
            self,
            Self::Unsigned
                | Self::Untrusted(_)
                | Self::BadSignature { .. }
                | Self::Older { .. }
                | Self::WrongKey { .. }
        )
    }
}

/// An entry's value and when it was written (None: unsigned).
#[derive(Debug, Clone, PartialEq)]
pub struct Opened<T> {
    pub value: T,
    pub written: Option<Stamp>,
}

impl<T> Opened<T> {
    /// Refuses this entry when it is older than `held` (the latest taken).
    pub fn not_older_than(self, held: Option<Stamp>) -> Result<Self, EntryError> {
        match (self.written, held) {
            (Some(written), Some(held)) if written < held => Err(EntryError::Older {
                at: written.at_ms,
                term: written.term,
                held: held.at_ms,
                held_term: held.term,
            }),
            _ => Ok(self),
        }
    }
}

fn message(bucket: &str, key: &str, value: &Map<String, Value>) -> Vec<u8> {
    let mut message = format!("provis-entry-v1:{bucket}:{key}:").into_bytes();
    message.extend(serde_json::to_vec(value).unwrap_or_default());
    message
}

/// `value` as stored under `bucket`/`key`, signed by `identity`, stamped
/// `written` (pass [`next_written_at`] of the entry it replaces, and the
/// writing leader's term).
pub fn sign(
    bucket: &str,
    key: &str,
    value: &impl Serialize,
    identity: &Identity,
    written: impl Into<Stamp>,
) -> Result<Vec<u8>, EntryError> {
    let written = written.into();
    let Value::Object(mut object) =
        serde_json::to_value(value).map_err(|err| EntryError::NotJson(err.to_string()))?
    else {
        return Err(EntryError::NotJson("not an object".into()));
    };
    object.insert(WRITTEN_AT.into(), written.at_ms.into());
    if written.term > 0 {
        object.insert(TERM.into(), written.term.into());
    }
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
    let term = object
        .remove(TERM)
        .and_then(|term| term.as_u64())
        .unwrap_or(0);
    let value = serde_json::from_value(Value::Object(object))
        .map_err(|err| EntryError::Value(err.to_string()))?;
    Ok(Opened {
        value,
        written: written_at_ms.map(|at_ms| Stamp { term, at_ms }),
    })
}

/// When to write the entry that replaces `current` (its stored bytes):
/// now, or just after it should the clock have gone back.
pub fn next_written_at(current: Option<&[u8]>, now_ms: i64) -> i64 {
    let previous = current
        .and_then(|bytes| open::<Value>("", "", bytes, &[]).ok())
        .and_then(|opened| opened.written);
    previous.map_or(now_ms, |previous| now_ms.max(previous.at_ms + 1))
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

/// What following a bucket yields, key by key.
#[derive(Debug, Clone, PartialEq)]
pub enum Followed<T> {
    /// A value taken: genuine and not older than the one held.
    Taken {
        key: String,
        value: T,
        written: Option<Stamp>,
    },
    /// The key was deleted or purged.
    Removed { key: String },
    /// An entry refused, and why; the value held under the key stays.
    Refused { key: String, error: EntryError },
    /// Every entry the keys held when they were (re)read was delivered:
    /// said after each read (at start, after a reconnect, now and then).
    Current,
}

/// How [`follow`] opens an entry: (key, stored bytes, when the entry held
/// under that key was written) → the value, or why it is refused.
pub trait EntryOpener<T>: Fn(&str, &[u8], Option<Stamp>) -> Result<Opened<T>, EntryError> {}

impl<T, F> EntryOpener<T> for F where
    F: Fn(&str, &[u8], Option<Stamp>) -> Result<Opened<T>, EntryError>
{
}

/// Opens entries of `bucket` that one of `trusted` signed for their key,
/// none older than the one held (any entry as it is when `trusted` is empty:
/// an unsecured fleet).
pub fn signed_by<T: DeserializeOwned>(
    bucket: &'static str,
    trusted: Vec<String>,
) -> impl EntryOpener<T> + Send + 'static {
    move |key: &str, bytes: &[u8], held: Option<Stamp>| {
        open::<T>(bucket, key, bytes, &trusted).and_then(|opened| opened.not_older_than(held))
    }
}

/// Like [`signed_by`], but with no pinned key nothing is taken: for entries
/// that grant rights (the call policy), which an unsigned value must never do.
pub fn signed_by_pinned<T: DeserializeOwned>(
    bucket: &'static str,
    trusted: Vec<String>,
) -> impl EntryOpener<T> + Send + 'static {
    move |key: &str, bytes: &[u8], held: Option<Stamp>| {
        if trusted.is_empty() {
            return Err(EntryError::NothingPinned);
        }
        open::<T>(bucket, key, bytes, &trusted).and_then(|opened| opened.not_older_than(held))
    }
}

/// Opens plain JSON entries, unsigned and untimed.
pub fn plain<T: DeserializeOwned>() -> impl EntryOpener<T> + Send + 'static {
    |_key: &str, bytes: &[u8], _held: Option<Stamp>| {
        serde_json::from_slice(bytes)
            .map(|value| Opened {
                value,
                written: None,
            })
            .map_err(|err| EntryError::Value(err.to_string()))
    }
}

/// The longest wait between two attempts to reach a bucket.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often a follower checks whether its connection came back (and so
/// may have missed changes).
const RECONNECT_CHECK: Duration = Duration::from_millis(500);
/// How often a follower reads its keys again regardless, in case a change
/// went by unseen (a stream that stored a value a subscriber missed).
const RESYNC: Duration = Duration::from_secs(300);

/// Follows `keys` (a key, or `>` for every key) of `bucket` for as long as
/// the stream is polled: the current entry of each key first, then every
/// change, each opened by `open`.
///
/// It costs the servers no JetStream consumer while it follows: it
/// subscribes to the keys' `$KV` subjects (what a put publishes) and reads
/// the current values directly (one key) or in one pass (`>`) at start,
/// after every reconnect and now and then; so a cluster node dying, or a
/// stream electing another leader, never leaves it stalled. Unreachable
/// buckets are waited out with backoff and jitter; an entry older than
/// the one taken under its key is refused. The stream never ends; drop it
/// to stop following.
pub fn follow<T, O>(
    js: async_nats::jetstream::Context,
    bucket: &'static str,
    keys: impl Into<String>,
    open: O,
) -> impl Stream<Item = Followed<T>> + Send + Unpin + 'static
where
    T: Send + 'static,
    O: EntryOpener<T> + Send + 'static,
{
    let follower = Follower {
        nats: js.client(),
        js,
        bucket,
        keys: keys.into(),
        open,
        held: HashMap::new(),
        present: std::collections::HashSet::new(),
        refused: HashMap::new(),
        subscription: None,
        pending: std::collections::VecDeque::new(),
        resync_due: true,
        connects_seen: 0,
        last_resync: tokio::time::Instant::now(),
        failures: 0,
    };
    Box::pin(futures::stream::unfold(
        follower,
        |mut follower| async move {
            let item = follower.next_item().await;
            Some((item, follower))
        },
    ))
}

struct Follower<O, T> {
    nats: async_nats::Client,
    js: async_nats::jetstream::Context,
    bucket: &'static str,
    keys: String,
    open: O,
    /// When the entry taken under each key was written.
    held: HashMap<String, Stamp>,
    /// Keys that hold a value now, as far as this follower knows.
    present: std::collections::HashSet<String>,
    /// The value refused last under each key (a digest): read again, it is
    /// not reported again.
    refused: HashMap<String, u64>,
    subscription: Option<async_nats::Subscriber>,
    /// What a read of the current values found, to be handed out in order.
    pending: std::collections::VecDeque<Followed<T>>,
    /// The current values are to be read (start, reconnect, now and then).
    resync_due: bool,
    /// Connections the client had made when the values were last read.
    connects_seen: u64,
    last_resync: tokio::time::Instant,
    /// Attempts failed in a row, for the backoff.
    failures: u32,
}

impl<O, T> Follower<O, T>
where
    O: EntryOpener<T>,
{
    async fn next_item(&mut self) -> Followed<T> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return item;
            }
            if self.subscription.is_none() {
                let subject = format!("$KV.{}.{}", self.bucket, self.keys);
                match self.nats.subscribe(subject).await {
                    Ok(subscription) => {
                        self.subscription = Some(subscription);
                        self.resync_due = true;
                    }
                    Err(err) => self.back_off(&crate::error_chain(&err)).await,
                }
                continue;
            }
            if self.resync_due {
                // Subscribed first: what changes while the values are read
                // arrives after them, so the newest wins.
                match self.read_current().await {
                    Ok(()) => {
                        self.failures = 0;
                        self.resync_due = false;
                        self.last_resync = tokio::time::Instant::now();
                    }
                    Err(reason) => self.back_off(&reason).await,
                }
                continue;
            }
            let Some(subscription) = self.subscription.as_mut() else {
                continue;
            };
            tokio::select! {
                message = subscription.next() => match message {
                    Some(message) => {
                        if let Some(item) = self.take_message(message) {
                            return item;
                        }
                    }
                    None => self.subscription = None,
                },
                () = tokio::time::sleep(RECONNECT_CHECK) => {
                    let connects = self
                        .nats
                        .statistics()
                        .connects
                        .load(std::sync::atomic::Ordering::Relaxed);
                    if connects != self.connects_seen || self.last_resync.elapsed() > RESYNC {
                        self.resync_due = true;
                    }
                }
            }
        }
    }

    /// Reads what the keys hold now into `pending`, then says Current.
    async fn read_current(&mut self) -> Result<(), String> {
        self.connects_seen = self
            .nats
            .statistics()
            .connects
            .load(std::sync::atomic::Ordering::Relaxed);
        let store = self
            .js
            .get_key_value(self.bucket)
            .await
            .map_err(|err| crate::error_chain(&err))?;
        let values: std::collections::BTreeMap<String, bytes::Bytes> = if self.keys == ">" {
            crate::kv_snapshot::read_all_direct(&self.nats, &store)
                .await
                .map_err(|err| crate::error_chain(&err))?
        } else {
            match store
                .get(&self.keys)
                .await
                .map_err(|err| crate::error_chain(&err))?
            {
                Some(value) => [(self.keys.clone(), value)].into(),
                None => Default::default(),
            }
        };
        let gone: Vec<String> = self
            .present
            .iter()
            .filter(|key| !values.contains_key(*key))
            .cloned()
            .collect();
        for key in gone {
            self.present.remove(&key);
            self.pending.push_back(Followed::Removed { key });
        }
        for (key, value) in values {
            if self.refused.get(&key) == Some(&digest(&value)) {
                continue;
            }
            let item = self.take(key, &value);
            self.pending.push_back(item);
        }
        self.pending.push_back(Followed::Current);
        Ok(())
    }

    /// A change as a put or a delete published it.
    fn take_message(&mut self, message: async_nats::Message) -> Option<Followed<T>> {
        let prefix = format!("$KV.{}.", self.bucket);
        let key = message.subject.as_str().strip_prefix(&prefix)?.to_owned();
        let removed = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get("KV-Operation"))
            .is_some_and(|op| matches!(op.as_str(), "DEL" | "PURGE"));
        if removed {
            // What was held stays remembered: a value put back after a
            // removal is still refused if it is older.
            self.present.remove(&key);
            return Some(Followed::Removed { key });
        }
        Some(self.take(key, &message.payload))
    }

    fn take(&mut self, key: String, value: &[u8]) -> Followed<T> {
        let held = self.held.get(&key).copied();
        match (self.open)(&key, value, held) {
            Ok(opened) => {
                if let Some(written) = opened.written {
                    self.held.insert(key.clone(), written);
                }
                self.present.insert(key.clone());
                Followed::Taken {
                    key,
                    value: opened.value,
                    written: opened.written,
                }
            }
            Err(error) => {
                self.refused.insert(key.clone(), digest(value));
                Followed::Refused { key, error }
            }
        }
    }

    async fn back_off(&mut self, reason: &str) {
        self.failures = self.failures.saturating_add(1);
        if self.failures <= 3 {
            tracing::debug!(bucket = self.bucket, keys = %self.keys, %reason, "bucket not followed yet; retrying");
        } else {
            tracing::warn!(bucket = self.bucket, keys = %self.keys, %reason, attempts = self.failures, "bucket still not followed; retrying");
        }
        let base = Duration::from_millis(100)
            .saturating_mul(1u32 << self.failures.min(10))
            .min(MAX_BACKOFF);
        tokio::time::sleep(base + jitter(base / 4)).await;
    }
}

/// A digest of a stored value, to know it again.
fn digest(value: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

/// A random wait up to `most`, so followers that lost the same server do
/// not come back at the same instant.
fn jitter(most: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(crate::envelope::now_unix_ms().unsigned_abs());
    let fraction = (hasher.finish() % 1_000) as u32;
    most.saturating_mul(fraction) / 1_000
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
        assert_eq!(opened.written, Some(Stamp::from(1_000)));
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
            .written;
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
        // A later term wins over an earlier one, whatever the clocks say: a
        // deposed leader writing late cannot overwrite its successor.
        let successor = sign(
            "provis_roles",
            "web",
            &spec,
            &master,
            Stamp {
                term: 9,
                at_ms: 500,
            },
        )
        .unwrap();
        let successor = open::<RoleSpec>("provis_roles", "web", &successor, &trusted)
            .unwrap()
            .written;
        let deposed = sign(
            "provis_roles",
            "web",
            &spec,
            &master,
            Stamp {
                term: 4,
                at_ms: 9_000,
            },
        )
        .unwrap();
        assert!(matches!(
            open::<RoleSpec>("provis_roles", "web", &deposed, &trusted)
                .unwrap()
                .not_older_than(successor),
            Err(EntryError::Older {
                term: 4,
                held_term: 9,
                ..
            })
        ));
        // Signing is deterministic: the same value and time write the same bytes.
        assert_eq!(
            stored,
            sign("provis_roles", "web", &spec, &master, 1_000).unwrap()
        );
    }
}
