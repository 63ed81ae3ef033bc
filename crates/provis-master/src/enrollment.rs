//! Enrollment: which minion keys the fleet admits, kept in the
//! `provis_enrollment` bucket that only the master writes.
//!
//! A minion asks to join by connecting with its key and its id: an unknown
//! id becomes `pending` until an operator accepts it (`provis keys accept`),
//! or is accepted at once with a one-time token (`provis keys token`). An id
//! is bound to the key that enrolled it: another key presenting it is refused
//! while the id is pending or accepted. Rejected and revoked keys stay
//! refused; a new key for such an id starts a new pending request.

use std::time::Duration;

use async_nats::jetstream::kv;
use provis_core::MinionId;
use provis_core::envelope::now_unix_ms;
use provis_core::storage::BUCKET_ENROLLMENT;
use serde::{Deserialize, Serialize};

pub use provis_core::master_api::{Decision, EnrollmentRecord, EnrollmentStatus};

/// The answer to a minion's connection attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    Admitted,
    /// Accepted now, by a one-time token.
    AdmittedByToken,
    /// Waiting for an operator; `new` on the first attempt.
    Pending {
        new: bool,
    },
    /// Refused, and why (an event says so).
    Refused(String),
}

#[derive(Debug, thiserror::Error)]
pub enum EnrollmentError {
    #[error("the enrollment bucket cannot be {what}")]
    Store {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot make a token")]
    Token(#[source] provis_core::identity::IdentityError),
    #[error("no minion {0} asked to join")]
    Unknown(MinionId),
    #[error("minion {minion} is {status:?}; {decision:?} does not apply")]
    NotApplicable {
        minion: MinionId,
        status: EnrollmentStatus,
        decision: Decision,
    },
    #[error("the enrollment record of {0} changed meanwhile; try again")]
    Conflict(MinionId),
    #[error("minion {minion} asked with key {actual}, not {expected}; nothing changed")]
    KeyMismatch {
        minion: MinionId,
        expected: String,
        actual: String,
    },
}

/// A failure to `what` (`read`, `written`, …) the bucket, with its cause.
fn store_error<E>(what: &'static str) -> impl FnOnce(E) -> EnrollmentError
where
    E: std::error::Error + Send + Sync + 'static,
{
    move |source| EnrollmentError::Store {
        what,
        source: Box::new(source),
    }
}

/// A one-time token as stored: only its digest is kept.
#[derive(Debug, Serialize, Deserialize)]
struct StoredToken {
    expires_unix_ms: i64,
    /// The only id the token enrolls, when it was issued for one.
    #[serde(default)]
    minion: Option<MinionId>,
}

const TOKEN_KEY_PREFIX: &str = "token.";

/// The enrollment bucket.
#[derive(Debug, Clone)]
pub struct Enrollment {
    store: kv::Store,
    /// Requests waiting for an operator, counted so that clients claiming
    /// ever new ids cannot fill the bucket.
    pending: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    max_pending: usize,
    /// Every record, as the bucket's changes say ([`Enrollment::follow`]):
    /// a known minion reconnecting is admitted without a read, so a
    /// reconnect storm costs the bucket nothing.
    known: std::sync::Arc<std::sync::RwLock<std::collections::HashMap<String, EnrollmentRecord>>>,
}

impl Enrollment {
    /// Opens (creating or raising to `replicas`) the bucket; at most
    /// `max_pending` requests wait at once.
    pub async fn open(
        js: &async_nats::jetstream::Context,
        max_pending: usize,
        replicas: usize,
    ) -> Result<Self, EnrollmentError> {
        let store = crate::storage::ensure_bucket(
            js,
            kv::Config {
                bucket: BUCKET_ENROLLMENT.to_owned(),
                description: "minion id → key and enrollment status; one-time tokens".to_owned(),
                history: 5,
                storage: async_nats::jetstream::stream::StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            },
        )
        .await
        .map_err(store_error("created"))?;
        let mut enrollment = Self {
            store,
            pending: Default::default(),
            max_pending,
            known: Default::default(),
        };
        let waiting = enrollment
            .list()
            .await?
            .iter()
            .filter(|r| r.status == EnrollmentStatus::Pending)
            .count();
        enrollment.pending = std::sync::Arc::new(waiting.into());
        Ok(enrollment)
    }

    async fn read(
        &self,
        minion: &MinionId,
    ) -> Result<Option<(EnrollmentRecord, u64)>, EnrollmentError> {
        Ok(self
            .read_entry(minion)
            .await?
            .and_then(|(record, revision)| Some((record?, revision))))
    }

    /// The id's record and its revision; the record is None when the entry
    /// cannot be read (something other than the master wrote it), so a new
    /// request can replace it at that revision.
    async fn read_entry(
        &self,
        minion: &MinionId,
    ) -> Result<Option<(Option<EnrollmentRecord>, u64)>, EnrollmentError> {
        let Some(entry) = self
            .store
            .entry(minion.as_str())
            .await
            .map_err(store_error("read"))?
        else {
            return Ok(None);
        };
        if entry.operation != kv::Operation::Put {
            return Ok(None);
        }
        let record = serde_json::from_slice(&entry.value).ok();
        if record.is_none() {
            tracing::warn!(%minion, "unreadable enrollment record; a new request replaces it");
        }
        Ok(Some((record, entry.revision)))
    }

    /// Writes `record` if the id's entry is still at `revision` (None: absent).
    async fn write(
        &self,
        record: &EnrollmentRecord,
        revision: Option<u64>,
    ) -> Result<(), EnrollmentError> {
        let value = serde_json::to_vec(record).map_err(store_error("written"))?;
        let written = match revision {
            Some(revision) => self
                .store
                .update(record.minion.as_str(), value.into(), revision)
                .await
                .map(drop)
                .map_err(|err| err.to_string()),
            None => self
                .store
                .create(record.minion.as_str(), value.into())
                .await
                .map(drop)
                .map_err(|err| err.to_string()),
        };
        written.map_err(|_| EnrollmentError::Conflict(record.minion.clone()))
    }

    /// Keeps the records in memory, following the bucket's changes on
    /// `js` (the account the bucket lives in) until `stop` fires.
    pub async fn follow(
        self,
        js: async_nats::jetstream::Context,
        stop: tokio_util::sync::CancellationToken,
    ) {
        use futures::StreamExt as _;
        use provis_core::signed_entry::Followed;
        let mut records = provis_core::signed_entry::follow(
            js,
            BUCKET_ENROLLMENT,
            ">",
            provis_core::signed_entry::plain::<serde_json::Value>(),
        );
        loop {
            let followed = tokio::select! {
                () = stop.cancelled() => return,
                followed = records.next() => followed,
            };
            let mut known = self
                .known
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match followed {
                Some(Followed::Taken { key, value, .. }) => {
                    match serde_json::from_value::<EnrollmentRecord>(value) {
                        Ok(record) if record.minion.as_str() == key => {
                            known.insert(key, record);
                        }
                        // Tokens and unreadable entries are read when needed.
                        _ => {
                            known.remove(&key);
                        }
                    }
                }
                Some(Followed::Removed { key }) => {
                    known.remove(&key);
                }
                Some(Followed::Refused { .. } | Followed::Current) => {}
                None => return,
            }
        }
    }

    /// The record of `minion` as last seen, if any.
    fn known(&self, minion: &MinionId) -> Option<EnrollmentRecord> {
        self.known
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(minion.as_str())
            .cloned()
    }

    /// Decides a connection attempt by `minion` with `key`, presenting
    /// `token` if it has one, from `host`.
    pub async fn admit(
        &self,
        minion: &MinionId,
        key: &str,
        token: Option<&str>,
        host: &str,
    ) -> Result<Admission, EnrollmentError> {
        // The common case, a known minion coming back: no read at all.
        if let Some(record) = self.known(minion)
            && record.key == key
        {
            match record.status {
                EnrollmentStatus::Accepted => return Ok(Admission::Admitted),
                EnrollmentStatus::Rejected => {
                    return Ok(Admission::Refused(format!(
                        "minion {minion} was rejected by {}",
                        record.by
                    )));
                }
                EnrollmentStatus::Revoked => {
                    return Ok(Admission::Refused(format!(
                        "minion {minion} was revoked by {}",
                        record.by
                    )));
                }
                EnrollmentStatus::Pending => {}
            }
        }
        let fresh = |status, by: &str| EnrollmentRecord {
            minion: minion.clone(),
            key: key.to_owned(),
            status,
            since_unix_ms: now_unix_ms(),
            by: by.to_owned(),
            host: host.to_owned(),
        };
        let existing = match self.read_entry(minion).await? {
            Some((Some(record), revision)) => Some((record, revision)),
            Some((None, revision)) => {
                let request = fresh(EnrollmentStatus::Pending, "minion");
                return self.request(request, token, Some(revision)).await;
            }
            None => None,
        };
        match existing {
            Some((record, revision)) if record.key != key => match record.status {
                EnrollmentStatus::Pending | EnrollmentStatus::Accepted => {
                    Ok(Admission::Refused(format!(
                        "minion id {minion} belongs to another key ({}); this key ({key}) may not use it",
                        record.key
                    )))
                }
                EnrollmentStatus::Rejected | EnrollmentStatus::Revoked => {
                    self.request(
                        fresh(EnrollmentStatus::Pending, "minion"),
                        token,
                        Some(revision),
                    )
                    .await
                }
            },
            Some((record, revision)) => match record.status {
                EnrollmentStatus::Accepted => Ok(Admission::Admitted),
                EnrollmentStatus::Pending => match self.consume_token(token, minion).await? {
                    true => {
                        self.write(&fresh(EnrollmentStatus::Accepted, "token"), Some(revision))
                            .await?;
                        self.release_pending();
                        Ok(Admission::AdmittedByToken)
                    }
                    false => Ok(Admission::Pending { new: false }),
                },
                EnrollmentStatus::Rejected => Ok(Admission::Refused(format!(
                    "minion {minion} was rejected by {}",
                    record.by
                ))),
                EnrollmentStatus::Revoked => Ok(Admission::Refused(format!(
                    "minion {minion} was revoked by {}",
                    record.by
                ))),
            },
            None => {
                self.request(fresh(EnrollmentStatus::Pending, "minion"), token, None)
                    .await
            }
        }
    }

    /// A new request to join: accepted at once with a valid token, else pending.
    async fn request(
        &self,
        mut record: EnrollmentRecord,
        token: Option<&str>,
        revision: Option<u64>,
    ) -> Result<Admission, EnrollmentError> {
        use std::sync::atomic::Ordering;
        let by_token = self.consume_token(token, &record.minion).await?;
        if by_token {
            record.status = EnrollmentStatus::Accepted;
            "token".clone_into(&mut record.by);
        } else if self
            .pending
            // A slot is taken before writing, so parallel requests cannot
            // all pass the check; it is given back if the write fails.
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_pending).then_some(n + 1)
            })
            .is_err()
        {
            return Ok(Admission::Refused(format!(
                "{} minions are pending already (max_pending_minions): accept or reject some first",
                self.max_pending
            )));
        }
        if let Err(err) = self.write(&record, revision).await {
            if !by_token {
                self.release_pending();
            }
            return Err(err);
        }
        Ok(if by_token {
            Admission::AdmittedByToken
        } else {
            Admission::Pending { new: true }
        })
    }

    /// An operator's decision: accept a pending id, reject a pending one,
    /// revoke an accepted (or pending) one; only for `expected_key` when
    /// given, so an operator accepts the key they checked, not whichever
    /// asked first.
    pub async fn decide(
        &self,
        minion: &MinionId,
        decision: Decision,
        by: &str,
        expected_key: Option<&str>,
    ) -> Result<EnrollmentRecord, EnrollmentError> {
        let (mut record, revision) = self
            .read(minion)
            .await?
            .ok_or_else(|| EnrollmentError::Unknown(minion.clone()))?;
        if let Some(expected) = expected_key
            && expected != record.key
        {
            return Err(EnrollmentError::KeyMismatch {
                minion: minion.clone(),
                expected: expected.to_owned(),
                actual: record.key,
            });
        }
        let status = match (decision, record.status) {
            (Decision::Accept, EnrollmentStatus::Pending) => EnrollmentStatus::Accepted,
            (Decision::Reject, EnrollmentStatus::Pending) => EnrollmentStatus::Rejected,
            (Decision::Revoke, EnrollmentStatus::Accepted | EnrollmentStatus::Pending) => {
                EnrollmentStatus::Revoked
            }
            (decision, status) => {
                return Err(EnrollmentError::NotApplicable {
                    minion: minion.clone(),
                    status,
                    decision,
                });
            }
        };
        let was_pending = record.status == EnrollmentStatus::Pending;
        record.status = status;
        record.since_unix_ms = now_unix_ms();
        by.clone_into(&mut record.by);
        self.write(&record, Some(revision)).await?;
        if was_pending {
            self.release_pending();
        }
        Ok(record)
    }

    /// One request fewer waits.
    fn release_pending(&self) {
        let _ = self.pending.fetch_update(
            std::sync::atomic::Ordering::AcqRel,
            std::sync::atomic::Ordering::Acquire,
            |n| n.checked_sub(1),
        );
    }

    /// Every id the fleet knows, sorted, read in one pass over the bucket.
    pub async fn list(&self) -> Result<Vec<EnrollmentRecord>, EnrollmentError> {
        let entries = provis_core::kv_snapshot::read_all(&self.store)
            .await
            .map_err(store_error("read"))?;
        let mut records: Vec<EnrollmentRecord> = entries
            .into_iter()
            .filter(|(key, _)| !key.starts_with(TOKEN_KEY_PREFIX))
            .filter_map(|(key, value)| {
                let record = serde_json::from_slice::<EnrollmentRecord>(&value).ok()?;
                (record.minion.as_str() == key).then_some(record)
            })
            .collect();
        records.sort_by(|a, b| a.minion.as_str().cmp(b.minion.as_str()));
        Ok(records)
    }

    /// A new one-time token, valid for `ttl`, for `minion` only when given.
    /// Only its digest is stored.
    pub async fn issue_token(
        &self,
        ttl: Duration,
        minion: Option<MinionId>,
    ) -> Result<String, EnrollmentError> {
        let token = provis_core::identity::random_hex(24).map_err(EnrollmentError::Token)?;
        let stored = StoredToken {
            expires_unix_ms: now_unix_ms()
                .saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)),
            minion,
        };
        let key = format!(
            "{TOKEN_KEY_PREFIX}{}",
            provis_core::identity::sha256_hex(&token)
        );
        let value = serde_json::to_vec(&stored).map_err(store_error("written"))?;
        self.store
            .create(&key, value.into())
            .await
            .map_err(store_error("written"))?;
        Ok(token)
    }

    /// Uses up `token` for `minion`: true when it was valid (known,
    /// unexpired, unused, and issued for any id or this one).
    async fn consume_token(
        &self,
        token: Option<&str>,
        minion: &MinionId,
    ) -> Result<bool, EnrollmentError> {
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            return Ok(false);
        };
        let key = format!(
            "{TOKEN_KEY_PREFIX}{}",
            provis_core::identity::sha256_hex(token)
        );
        let Some(entry) = self.store.entry(&key).await.map_err(store_error("read"))? else {
            return Ok(false);
        };
        if entry.operation != kv::Operation::Put {
            return Ok(false);
        }
        let Some(stored) = serde_json::from_slice::<StoredToken>(&entry.value).ok() else {
            return Ok(false);
        };
        if stored.minion.as_ref().is_some_and(|only| only != minion) {
            return Ok(false);
        }
        // Deleting at the revision read makes the token single-use even when
        // two connections present it at once.
        if self
            .store
            .delete_expect_revision(&key, Some(entry.revision))
            .await
            .is_err()
        {
            return Ok(false);
        }
        Ok(stored.expires_unix_ms > now_unix_ms())
    }
}
