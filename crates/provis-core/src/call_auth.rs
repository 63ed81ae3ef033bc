//! Signed calls: the caller signs its envelope; a minion that pins callers'
//! keys runs only calls signed by one of them, issued within a time window,
//! and never the same call twice.
//!
//! The signature covers the whole envelope as encoded with the `signature`
//! field empty (so every field — service, method, arguments, target,
//! selection, deadline, nonce — is covered). The signer's public key travels
//! in `signer_public_key` as `ed25519:<hex>` text.

use std::time::Duration;

use prost::Message;
use provis_proto::v1::CallEnvelope;

use crate::identity::{Identity, verify};

/// How far an envelope's issue time may be from the minion's clock.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(300);
/// The longest a signed call may stay valid after it was issued.
pub const MAX_CALL_LIFETIME: Duration = Duration::from_secs(3600);

/// Signs `envelope` as `identity`.
pub fn sign(envelope: &mut CallEnvelope, identity: &Identity) {
    envelope.signer_public_key = identity.public_key().as_bytes().to_vec();
    envelope.signature = Vec::new();
    let signature = identity.sign(&envelope.encode_to_vec());
    envelope.signature = signature.into_bytes();
}

/// The header a minion's reply signature travels in.
pub const REPLY_SIGNATURE_HEADER: &str = "Provis-Signature";

fn reply_message(payload: &[u8]) -> Vec<u8> {
    let mut message = b"provis-reply-v1:".to_vec();
    message.extend_from_slice(payload);
    message
}

/// The signature of an encoded reply by the minion holding `identity`.
pub fn sign_reply(payload: &[u8], identity: &Identity) -> String {
    identity.sign(&reply_message(payload))
}

/// True when `signature` is `public_key`'s signature of the encoded reply.
pub fn reply_signed_by(payload: &[u8], signature: &str, public_key: &str) -> bool {
    verify(public_key, &reply_message(payload), signature)
}

/// Metadata of a signed RPC of the minion's gRPC API over TCP (every RPC
/// there but `Call`, whose envelope carries its own signature).
pub const RPC_SIGNER: &str = "provis-signer";
pub const RPC_ISSUED: &str = "provis-issued-ms";
pub const RPC_NONCE: &str = "provis-nonce";
pub const RPC_SIGNATURE: &str = "provis-signature";

/// Who signed an RPC, when, and the signature: the four metadata values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcSignature {
    /// `ed25519:<hex>`.
    pub signer: String,
    pub issued_unix_ms: i64,
    /// Random hex, never used twice by one signer.
    pub nonce: String,
    pub signature: String,
}

/// What an RPC signature covers: the RPC, the minion it is meant for (so it
/// cannot be replayed to another), when, a nonce, and the request's bytes.
fn rpc_message(rpc: &str, minion: &str, issued_unix_ms: i64, nonce: &str, body: &[u8]) -> Vec<u8> {
    let digest = ring::digest::digest(&ring::digest::SHA256, body);
    let body_hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("provis-rpc-v1\n{rpc}\n{minion}\n{issued_unix_ms}\n{nonce}\n{body_hex}").into_bytes()
}

/// Signs the RPC `rpc` (`GetState`, …) with encoded request `body` for `minion`.
pub fn sign_rpc(
    identity: &Identity,
    rpc: &str,
    minion: &str,
    body: &[u8],
    now_unix_ms: i64,
) -> RpcSignature {
    let nonce: String = uuid::Uuid::new_v4().simple().to_string();
    let signature = identity.sign(&rpc_message(rpc, minion, now_unix_ms, &nonce, body));
    RpcSignature {
        signer: identity.public_key().to_owned(),
        issued_unix_ms: now_unix_ms,
        nonce,
        signature,
    }
}

/// Why a signed call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallAuthError {
    #[error("the call is not signed; this minion takes signed calls only")]
    Unsigned,
    #[error("the call is signed by {0}, which this minion does not trust")]
    UntrustedSigner(String),
    #[error("the call's signature does not verify")]
    BadSignature,
    #[error(
        "the call was issued {0} ms away from this minion's clock (more than {MAX_CLOCK_SKEW:?})"
    )]
    OutOfWindow(i64),
    #[error("the call's deadline is more than {MAX_CALL_LIFETIME:?} after it was issued")]
    TooLong,
    #[error("the call has no nonce")]
    NoNonce,
    #[error("this call was seen before: a replay")]
    Replayed,
    #[error("the policy does not let this caller call {0} here")]
    NotAllowed(String),
    #[error(
        "this minion pins no callers' keys (trusted_callers) and has no call policy, so it cannot tell who asks over TCP; use its local socket"
    )]
    NoCallers,
}

/// Checks signed calls for one minion; remembers nonces long enough that a
/// replay inside the time window is caught (a bounded TTL cache).
#[derive(Debug, Clone)]
pub struct CallGuard {
    /// Keys pinned in the minion's own settings: they may call anything.
    trusted: Vec<String>,
    /// The fleet's call policy from git, once the minion has a verified one.
    policy: std::sync::Arc<std::sync::RwLock<Option<CallPolicy>>>,
    seen: moka::sync::Cache<(String, Vec<u8>), ()>,
    /// Issue times are compared with the bus's time, not the machine's.
    clock: crate::clock::BusClock,
}

/// Which operator may call what: `policy.toml` of the config repository.
///
/// ```toml
/// [[operator]]
/// name = "alice"
/// key = "ed25519:…"
/// [[operator.allow]]
/// roles = ["web"]          # a role, its sub-roles included; "*": any minion
/// services = ["site"]      # "*": any service
/// methods = ["enable", "disable"]   # "*": any method
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallPolicy {
    #[serde(default)]
    pub operator: Vec<Operator>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Operator {
    pub name: String,
    /// Public key, `ed25519:<hex>`.
    pub key: String,
    #[serde(default)]
    pub allow: Vec<Grant>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    pub roles: Vec<String>,
    pub services: Vec<String>,
    pub methods: Vec<String>,
}

/// Where the call policy lives in `provis_config`.
pub const POLICY_KEY: &str = "policy";

/// Follows the fleet's call policy (`provis_config/policy`) until
/// `stopping` resolves, handing `take` each policy one of `trusted` signed
/// for that key, none older than the one taken (`None` when the policy is
/// removed). A refused entry (forged, copied, put back) is logged and
/// changes nothing; with no trusted key at all no policy can be told
/// genuine, so only removals are passed on.
pub async fn follow_policy(
    js: async_nats::jetstream::Context,
    trusted: Vec<String>,
    stopping: impl std::future::Future<Output = ()>,
    mut take: impl FnMut(Option<CallPolicy>) + Send,
) {
    use crate::signed_entry::{EntryError, Followed, follow, signed_by_pinned};
    use futures::StreamExt as _;
    let bucket = crate::storage::BUCKET_CONFIG;
    let mut policies = follow(
        js,
        bucket,
        POLICY_KEY,
        signed_by_pinned::<CallPolicy>(bucket, trusted),
    );
    tokio::pin!(stopping);
    loop {
        tokio::select! {
            () = &mut stopping => return,
            followed = policies.next() => match followed {
                Some(Followed::Taken { value, .. }) => take(Some(value)),
                Some(Followed::Removed { .. }) => take(None),
                Some(Followed::Refused { error: EntryError::NothingPinned, .. } | Followed::Current) => {}
                Some(Followed::Refused { error, .. }) => {
                    tracing::warn!(%error, "call policy refused; keeping the previous one");
                }
                None => return,
            },
        }
    }
}

impl CallPolicy {
    /// Checks every key parses; returns the problems.
    pub fn problems(&self) -> Vec<String> {
        self.operator
            .iter()
            .filter(|op| !crate::identity::is_public_key(&op.key))
            .map(|op| {
                format!(
                    "operator {:?}: key {:?} is not ed25519:<64 hex digits>",
                    op.name, op.key
                )
            })
            .collect()
    }

    fn allows(&self, signer: &str, service: &str, method: &str, roles: &[crate::RoleName]) -> bool {
        let any =
            |list: &[String], value: &str| list.iter().any(|item| item == "*" || item == value);
        self.operator
            .iter()
            .filter(|op| op.key == signer)
            .flat_map(|op| &op.allow)
            .any(|grant| {
                any(&grant.services, service)
                    && any(&grant.methods, method)
                    && grant.roles.iter().any(|granted| {
                        granted == "*"
                            || granted.parse::<crate::RoleName>().is_ok_and(|granted| {
                                roles.iter().any(|own| own.is_within(&granted))
                            })
                    })
            })
    }
}

impl CallGuard {
    /// A guard trusting `trusted` keys; with none, every call passes (an unsecured fleet).
    pub fn new(trusted: Vec<String>) -> Self {
        let seen = moka::sync::Cache::builder()
            .max_capacity(1_000_000)
            .time_to_live(MAX_CLOCK_SKEW * 2 + MAX_CALL_LIFETIME)
            .build();
        Self {
            trusted,
            policy: Default::default(),
            seen,
            clock: crate::clock::BusClock::system(),
        }
    }

    /// This guard, judging issue times by `clock`.
    pub fn with_clock(mut self, clock: crate::clock::BusClock) -> Self {
        self.clock = clock;
        self
    }

    pub fn enforcing(&self) -> bool {
        !self.trusted.is_empty() || self.policy().is_some()
    }

    fn policy(&self) -> Option<CallPolicy> {
        self.policy
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Takes up the fleet's (verified) call policy.
    pub fn set_policy(&self, policy: Option<CallPolicy>) {
        *self
            .policy
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = policy;
    }

    /// Whether `signer` (admitted by [`Self::admit`]) may call `service.method`
    /// on a minion with `roles`: keys pinned locally may call anything; the
    /// others only what the policy grants.
    pub fn authorize(
        &self,
        signer: &str,
        service: &str,
        method: &str,
        roles: &[crate::RoleName],
    ) -> Result<(), CallAuthError> {
        if self.trusted.iter().any(|key| key == signer) {
            return Ok(());
        }
        match self.policy() {
            Some(policy) if policy.allows(signer, service, method, roles) => Ok(()),
            _ => Err(CallAuthError::NotAllowed(format!("{service}.{method}"))),
        }
    }

    /// Admits a signed RPC for `minion` (see [`sign_rpc`]) or says why not;
    /// returns the signer. Unlike envelopes, an RPC is never let through
    /// unsigned: with no keys pinned and no policy, every RPC is refused.
    pub fn admit_rpc(
        &self,
        rpc: &str,
        minion: &str,
        body: &[u8],
        signed: Option<&RpcSignature>,
    ) -> Result<String, CallAuthError> {
        if !self.enforcing() {
            return Err(CallAuthError::NoCallers);
        }
        let signed = signed.ok_or(CallAuthError::Unsigned)?;
        let in_policy = self
            .policy()
            .is_some_and(|p| p.operator.iter().any(|op| op.key == signed.signer));
        if !self.trusted.contains(&signed.signer) && !in_policy {
            return Err(CallAuthError::UntrustedSigner(signed.signer.clone()));
        }
        let message = rpc_message(rpc, minion, signed.issued_unix_ms, &signed.nonce, body);
        if !verify(&signed.signer, &message, &signed.signature) {
            return Err(CallAuthError::BadSignature);
        }
        let skew = self.clock.now_ms().saturating_sub(signed.issued_unix_ms);
        if skew.unsigned_abs() > MAX_CLOCK_SKEW.as_millis() as u64 {
            return Err(CallAuthError::OutOfWindow(skew));
        }
        if signed.nonce.is_empty() {
            return Err(CallAuthError::NoNonce);
        }
        let key = (signed.signer.clone(), signed.nonce.clone().into_bytes());
        if !self.seen.entry(key).or_insert(()).is_fresh() {
            return Err(CallAuthError::Replayed);
        }
        Ok(signed.signer.clone())
    }

    /// Admits `envelope` or says why not; returns the signer when there is one.
    pub fn admit(&self, envelope: &CallEnvelope) -> Result<Option<String>, CallAuthError> {
        if !self.enforcing() {
            return Ok(None);
        }
        if envelope.signature.is_empty() || envelope.signer_public_key.is_empty() {
            return Err(CallAuthError::Unsigned);
        }
        let signer = String::from_utf8_lossy(&envelope.signer_public_key).into_owned();
        let in_policy = self
            .policy()
            .is_some_and(|p| p.operator.iter().any(|op| op.key == signer));
        if !self.trusted.contains(&signer) && !in_policy {
            return Err(CallAuthError::UntrustedSigner(signer));
        }
        let mut unsigned = envelope.clone();
        unsigned.signature = Vec::new();
        let signature = String::from_utf8_lossy(&envelope.signature);
        if !verify(&signer, &unsigned.encode_to_vec(), &signature) {
            return Err(CallAuthError::BadSignature);
        }
        let now = self.clock.now_ms();
        let skew = now.saturating_sub(envelope.issued_unix_ms);
        let max_skew = MAX_CLOCK_SKEW.as_millis() as i64;
        let lifetime = MAX_CALL_LIFETIME.as_millis() as i64;
        let queued_until = envelope.queue_until_unix_ms;
        if queued_until > 0 {
            // Queued: it may arrive until then (delivered when an offline
            // minion returns), never more than a lifetime after issue, so
            // the replay cache still holds its nonce when it arrives late.
            if queued_until.saturating_sub(envelope.issued_unix_ms) > lifetime {
                return Err(CallAuthError::TooLong);
            }
            if skew < -max_skew || now > queued_until.saturating_add(max_skew) {
                return Err(CallAuthError::OutOfWindow(skew));
            }
        } else if skew.unsigned_abs() > max_skew.unsigned_abs() {
            return Err(CallAuthError::OutOfWindow(skew));
        }
        if envelope
            .deadline_unix_ms
            .saturating_sub(envelope.issued_unix_ms)
            > lifetime
            || envelope.timeout_ms > lifetime
        {
            return Err(CallAuthError::TooLong);
        }
        if envelope.nonce.is_empty() {
            return Err(CallAuthError::NoNonce);
        }
        let key = (signer.clone(), envelope.nonce.clone());
        // Insert-if-absent in one step, so two copies racing in are not both admitted.
        let entry = self.seen.entry(key).or_insert(());
        if !entry.is_fresh() {
            return Err(CallAuthError::Replayed);
        }
        Ok(Some(signer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_verifies_only_as_its_minion_signed_it() {
        let dir = tempfile::tempdir().unwrap();
        let minion = Identity::create(&dir.path().join("m.key")).unwrap();
        let other = Identity::create(&dir.path().join("o.key")).unwrap();
        let reply = crate::envelope::ok_reply(
            "c1",
            "m1",
            &serde_json::json!({"ok": true}),
            Duration::from_millis(1),
        );
        let payload = reply.encode_to_vec();
        assert!(
            !reply_signed_by(&payload, "", minion.public_key()),
            "unsigned"
        );
        let signature = sign_reply(&payload, &minion);
        assert!(reply_signed_by(&payload, &signature, minion.public_key()));
        assert!(!reply_signed_by(&payload, &signature, other.public_key()));
        let mut changed = reply.clone();
        changed.minion = "m2".into();
        assert!(!reply_signed_by(
            &changed.encode_to_vec(),
            &signature,
            minion.public_key()
        ));
    }
    use crate::envelope::CallRequest;
    use crate::subject::CallTarget;

    fn envelope() -> CallEnvelope {
        CallRequest::parse_function("sys.ping", serde_json::Value::Null, Duration::from_secs(5))
            .unwrap()
            .to_envelope("operator:alice", &CallTarget::All)
    }

    #[test]
    fn only_fresh_calls_signed_by_a_trusted_key_pass() {
        let dir = tempfile::tempdir().unwrap();
        let alice = Identity::create(&dir.path().join("alice.key")).unwrap();
        let mallory = Identity::create(&dir.path().join("mallory.key")).unwrap();
        let guard = CallGuard::new(vec![alice.public_key().to_owned()]);

        let mut call = envelope();
        assert_eq!(guard.admit(&call), Err(CallAuthError::Unsigned));
        sign(&mut call, &alice);
        assert_eq!(guard.admit(&call), Ok(Some(alice.public_key().to_owned())));
        assert_eq!(guard.admit(&call), Err(CallAuthError::Replayed));

        let mut tampered = envelope();
        sign(&mut tampered, &alice);
        tampered.method = "facts".into();
        assert_eq!(guard.admit(&tampered), Err(CallAuthError::BadSignature));

        let mut foreign = envelope();
        sign(&mut foreign, &mallory);
        assert!(matches!(
            guard.admit(&foreign),
            Err(CallAuthError::UntrustedSigner(_))
        ));

        let mut stale = envelope();
        stale.issued_unix_ms -= 600_000;
        stale.deadline_unix_ms -= 600_000;
        sign(&mut stale, &alice);
        assert!(matches!(
            guard.admit(&stale),
            Err(CallAuthError::OutOfWindow(_))
        ));

        assert_eq!(
            CallGuard::new(Vec::new()).admit(&envelope()),
            Ok(None),
            "no trusted keys: unsecured"
        );
    }

    #[test]
    fn a_queued_call_is_admitted_late_only_within_the_queue_it_signed() {
        let dir = tempfile::tempdir().unwrap();
        let alice = Identity::create(&dir.path().join("alice.key")).unwrap();
        let guard = CallGuard::new(vec![alice.public_key().to_owned()]);
        let queued = |issued_ago_ms: i64, queue_ms: i64| {
            let mut call = envelope();
            call.issued_unix_ms -= issued_ago_ms;
            call.deadline_unix_ms -= issued_ago_ms;
            call.queue_until_unix_ms = call.issued_unix_ms + queue_ms;
            sign(&mut call, &alice);
            call
        };
        // Ten minutes late, within its 30-minute queue: admitted, once.
        let late = queued(600_000, 1_800_000);
        assert!(guard.admit(&late).is_ok());
        assert_eq!(guard.admit(&late), Err(CallAuthError::Replayed));
        // Past its queue (plus the clock allowance): refused.
        assert!(matches!(
            guard.admit(&queued(3_000_000, 1_800_000)),
            Err(CallAuthError::OutOfWindow(_))
        ));
        // A queue longer than a call may live: refused.
        assert_eq!(
            guard.admit(&queued(0, 2 * 3_600_000)),
            Err(CallAuthError::TooLong)
        );
        // The queue time is signed: raising it breaks the signature.
        let mut raised = queued(600_000, 60_000);
        raised.queue_until_unix_ms += 3_000_000;
        assert_eq!(guard.admit(&raised), Err(CallAuthError::BadSignature));
    }
}
