//! Call envelopes and replies: building them on the caller's side, and checking
//! them on the minion's side before anything runs.
//!
//! A minion treats every payload on a call subject as hostile: `open_envelope`
//! either returns a [`CheckedCall`] whose every field has been validated, or an
//! [`EnvelopeError`] that maps to a structured reply.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message;
use provis_proto::v1::{CallEnvelope, CallError, CallReply, ErrorCode, call_reply};
use serde_json::Value;

use crate::subject::{CallTarget, MAX_TOKEN_LEN, NameError};

/// Largest envelope a minion decodes; bigger payloads are refused unread.
pub const MAX_ENVELOPE_BYTES: usize = 1024 * 1024;

/// Milliseconds since the Unix epoch, the time unit of envelopes.
pub fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// What a caller wants run: the parts of an envelope a caller chooses.
#[derive(Debug, Clone)]
pub struct CallRequest {
    pub service: String,
    pub method: String,
    pub args: Value,
    pub timeout: Duration,
}

impl CallRequest {
    /// Parses `service.method`, e.g. `sys.ping`.
    pub fn parse_function(
        function: &str,
        args: Value,
        timeout: Duration,
    ) -> Result<Self, EnvelopeError> {
        let (service, method) = function
            .split_once('.')
            .ok_or_else(|| EnvelopeError::BadFunction(function.to_owned()))?;
        check_service(service)?;
        check_method(method)?;
        Ok(Self {
            service: service.to_owned(),
            method: method.to_owned(),
            args,
            timeout,
        })
    }

    /// Seals the request into an envelope with a fresh call id and nonce.
    pub fn to_envelope(&self, caller: &str, target: &CallTarget) -> CallEnvelope {
        let now = now_unix_ms();
        let call_id = uuid::Uuid::new_v4();
        let timeout_ms = i64::try_from(self.timeout.as_millis()).unwrap_or(i64::MAX);
        CallEnvelope {
            call_id: call_id.to_string(),
            caller: caller.to_owned(),
            target: Some(target_to_proto(target)),
            service: self.service.clone(),
            method: self.method.clone(),
            args_json: self.args.to_string(),
            deadline_unix_ms: now.saturating_add(timeout_ms),
            timeout_ms,
            issued_unix_ms: now,
            nonce: uuid::Uuid::new_v4().as_bytes().to_vec(),
            signer_public_key: Vec::new(),
            signature: Vec::new(),
            selected: Vec::new(),
            // The caller says so when it sends to each minion's subject.
            addressed: false,
            job_id: String::new(),
            queue_until_unix_ms: 0,
        }
    }
}

fn target_to_proto(target: &CallTarget) -> provis_proto::v1::Target {
    use provis_proto::v1::target::Kind;
    let kind = match target {
        CallTarget::All => Kind::All(true),
        CallTarget::Role(role) => Kind::Role(role.to_string()),
        // For logs only: a long list is cut, so the envelope every chosen
        // minion receives does not grow with the selection.
        CallTarget::Minions(ids) => {
            const NAMED: usize = 8;
            let mut named: Vec<&str> = ids
                .iter()
                .take(NAMED)
                .map(crate::subject::MinionId::as_str)
                .collect();
            let more = ids.len().saturating_sub(NAMED);
            let more = format!("+{more} more");
            if ids.len() > NAMED {
                named.push(&more);
            }
            Kind::Minion(named.join(","))
        }
    };
    provis_proto::v1::Target { kind: Some(kind) }
}

/// Why an envelope was refused or a call could not run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("payload is {0} bytes, more than the {MAX_ENVELOPE_BYTES} a call may carry")]
    TooLarge(usize),
    #[error("payload is not a provis CallEnvelope: {0}")]
    Undecodable(String),
    #[error("envelope has no {0}")]
    Missing(&'static str),
    #[error("{0:?} is not SERVICE.METHOD (for example sys.ping)")]
    BadFunction(String),
    #[error("bad service name: {0}")]
    BadService(NameError),
    #[error(
        "method {0:?} is not a valid name (letters, digits and '_', not starting with a digit)"
    )]
    BadMethod(String),
    #[error("arguments are not JSON: {0}")]
    BadArguments(String),
    #[error("deadline passed {0} ms before the call could start")]
    Expired(i64),
    #[error("this minion already runs {running} calls and queues {queued}; try again later")]
    Busy { running: usize, queued: usize },
    /// The call's signature, window or policy refused it; the reason is the
    /// variant's own (it travels to the caller as the reply's message).
    #[error("refused: {0}")]
    Denied(crate::call_auth::CallAuthError),
}

impl EnvelopeError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::BadArguments(_) => ErrorCode::BadArguments,
            Self::Expired(_) => ErrorCode::DeadlineExceeded,
            Self::Busy { .. } => ErrorCode::Busy,
            Self::Denied(_) => ErrorCode::Denied,
            _ => ErrorCode::BadEnvelope,
        }
    }
}

fn check_service(service: &str) -> Result<(), EnvelopeError> {
    service
        .parse::<crate::subject::MinionId>()
        .map(drop)
        .map_err(|err| match err {
            NameError::Empty { .. } => NameError::Empty { what: "service" },
            other => other,
        })
        .map_err(EnvelopeError::BadService)
}

fn check_method(method: &str) -> Result<(), EnvelopeError> {
    let mut chars = method.chars();
    let valid = method.len() <= MAX_TOKEN_LEN
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(EnvelopeError::BadMethod(method.to_owned()))
    }
}

/// An envelope whose every field has been checked: safe to dispatch.
#[derive(Debug, Clone)]
pub struct CheckedCall {
    pub call_id: String,
    /// The job it belongs to (the call id when the caller named none, or
    /// named one that cannot be a subject token).
    pub job_id: String,
    pub caller: String,
    pub service: String,
    pub method: String,
    pub args: Value,
    /// When the call must be over, on this process's monotonic clock.
    pub deadline: std::time::Instant,
}

impl CheckedCall {
    /// Time left before the deadline (zero when it has passed).
    pub fn remaining(&self) -> Duration {
        self.deadline
            .saturating_duration_since(std::time::Instant::now())
    }
}

/// When and by what clock a call came in: its timeout counts from `at`.
#[derive(Debug, Clone, Copy)]
pub struct Arrival {
    pub at: std::time::Instant,
    /// The bus's time at arrival, for envelopes with only an absolute deadline.
    pub bus_now_ms: i64,
}

impl Arrival {
    /// A call arriving now, by `clock`.
    pub fn now(clock: &crate::clock::BusClock) -> Self {
        Self {
            at: std::time::Instant::now(),
            bus_now_ms: clock.now_ms(),
        }
    }
}

/// Decodes and checks an envelope that arrived at `arrival`. On error, the
/// call id is returned too when it could be read, so the reply can still be
/// matched by the caller.
pub fn open_envelope(
    payload: &[u8],
    arrival: Arrival,
) -> Result<CheckedCall, (String, EnvelopeError)> {
    let envelope = decode_envelope(payload)?;
    let call_id = envelope.call_id.clone();
    check_envelope(envelope, arrival).map_err(|err| (call_id, err))
}

/// Decodes an envelope without checking its fields.
pub fn decode_envelope(payload: &[u8]) -> Result<CallEnvelope, (String, EnvelopeError)> {
    if payload.len() > MAX_ENVELOPE_BYTES {
        return Err((String::new(), EnvelopeError::TooLarge(payload.len())));
    }
    CallEnvelope::decode(payload)
        .map_err(|err| (String::new(), EnvelopeError::Undecodable(err.to_string())))
}

/// True when the envelope is for `minion`: it names no subset, or names it.
/// `on_own_subject`: the call came on the minion's own call subject (or
/// straight to it, over gRPC).
pub fn is_selected(envelope: &CallEnvelope, minion: &str, on_own_subject: bool) -> bool {
    if envelope.addressed && !on_own_subject {
        return false;
    }
    envelope.selected.is_empty() || envelope.selected.iter().any(|id| id == minion)
}

/// Checks every field of a decoded envelope that arrived at `arrival`.
pub fn check_envelope(
    envelope: CallEnvelope,
    arrival: Arrival,
) -> Result<CheckedCall, EnvelopeError> {
    if envelope.call_id.is_empty() {
        return Err(EnvelopeError::Missing("call_id"));
    }
    if envelope.deadline_unix_ms == 0 && envelope.timeout_ms <= 0 {
        return Err(EnvelopeError::Missing("deadline_unix_ms"));
    }
    check_service(&envelope.service)?;
    check_method(&envelope.method)?;
    let args = if envelope.args_json.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&envelope.args_json)
            .map_err(|err| EnvelopeError::BadArguments(err.to_string()))?
    };
    // A timeout counts from the arrival by this machine's monotonic clock;
    // an absolute deadline (outside tools may send only that) by the bus's.
    let allowed_ms = if envelope.timeout_ms > 0 {
        envelope.timeout_ms
    } else {
        envelope.deadline_unix_ms.saturating_sub(arrival.bus_now_ms)
    };
    let deadline = arrival.at + Duration::from_millis(u64::try_from(allowed_ms).unwrap_or(0));
    let now = std::time::Instant::now();
    if allowed_ms <= 0 || deadline <= now {
        let late = if allowed_ms <= 0 {
            allowed_ms.saturating_neg().max(1)
        } else {
            i64::try_from(now.duration_since(deadline).as_millis())
                .unwrap_or(i64::MAX)
                .max(1)
        };
        return Err(EnvelopeError::Expired(late));
    }
    let job_id = if crate::jobs::valid_job_id(&envelope.job_id) {
        envelope.job_id
    } else {
        envelope.call_id.clone()
    };
    Ok(CheckedCall {
        job_id,
        call_id: envelope.call_id,
        caller: envelope.caller,
        service: envelope.service,
        method: envelope.method,
        args,
        deadline,
    })
}

/// A successful reply carrying `result` as JSON.
pub fn ok_reply(call_id: &str, minion: &str, result: &Value, took: Duration) -> CallReply {
    CallReply {
        call_id: call_id.to_owned(),
        minion: minion.to_owned(),
        outcome: Some(call_reply::Outcome::ResultJson(result.to_string())),
        duration_us: u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
    }
}

/// A failed reply.
pub fn error_reply(
    call_id: &str,
    minion: &str,
    code: ErrorCode,
    message: impl Into<String>,
    took: Duration,
) -> CallReply {
    CallReply {
        call_id: call_id.to_owned(),
        minion: minion.to_owned(),
        outcome: Some(call_reply::Outcome::Error(CallError {
            code: code as i32,
            message: message.into(),
            stack: String::new(),
        })),
        duration_us: u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
    }
}

/// The short name of an error code, as shown to operators (`unknown_service`).
pub fn error_code_name(code: i32) -> &'static str {
    match ErrorCode::try_from(code).unwrap_or(ErrorCode::Unspecified) {
        ErrorCode::Unspecified => "error",
        ErrorCode::BadEnvelope => "bad_envelope",
        ErrorCode::UnknownService => "unknown_service",
        ErrorCode::UnknownMethod => "unknown_method",
        ErrorCode::BadArguments => "bad_arguments",
        ErrorCode::DeadlineExceeded => "deadline_exceeded",
        ErrorCode::Denied => "denied",
        ErrorCode::ServiceFailed => "service_failed",
        ErrorCode::Internal => "internal",
        ErrorCode::Busy => "busy",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> CallRequest {
        CallRequest::parse_function("sys.ping", Value::Null, Duration::from_secs(5)).unwrap()
    }

    fn now() -> Arrival {
        Arrival::now(&crate::clock::BusClock::system())
    }

    #[test]
    fn a_sealed_envelope_opens() {
        let envelope = request().to_envelope("operator:test", &CallTarget::All);
        let call = open_envelope(&envelope.encode_to_vec(), now()).unwrap();
        assert_eq!(
            (call.service.as_str(), call.method.as_str()),
            ("sys", "ping")
        );
        assert_eq!(call.call_id, envelope.call_id);
    }

    #[test]
    fn garbage_is_refused_with_a_reason() {
        let (_, err) = open_envelope(b"\xff\xff\xff not protobuf", now()).unwrap_err();
        assert_eq!(err.code(), ErrorCode::BadEnvelope);
        let (_, err) = open_envelope(&[], now()).unwrap_err();
        assert_eq!(err, EnvelopeError::Missing("call_id"));
    }

    #[test]
    fn an_expired_envelope_is_refused_with_its_call_id() {
        let mut envelope = request().to_envelope("operator:test", &CallTarget::All);
        envelope.timeout_ms = 0;
        envelope.deadline_unix_ms = now_unix_ms() - 1_000;
        let (call_id, err) = open_envelope(&envelope.encode_to_vec(), now()).unwrap_err();
        assert_eq!(call_id, envelope.call_id);
        assert_eq!(err.code(), ErrorCode::DeadlineExceeded);
    }

    #[test]
    fn a_timeout_counts_from_arrival_whatever_the_clocks_say() {
        let mut envelope = request().to_envelope("operator:test", &CallTarget::All);
        // The caller's clock is an hour behind this minion's.
        envelope.deadline_unix_ms -= 3_600_000;
        envelope.issued_unix_ms -= 3_600_000;
        let call = open_envelope(&envelope.encode_to_vec(), now()).unwrap();
        assert!(call.remaining() > Duration::from_secs(4));
        // A call that waited longer than its timeout since it came in is late.
        let arrived = Arrival {
            at: std::time::Instant::now() - Duration::from_secs(10),
            bus_now_ms: now_unix_ms(),
        };
        let (_, err) = open_envelope(&envelope.encode_to_vec(), arrived).unwrap_err();
        assert_eq!(err.code(), ErrorCode::DeadlineExceeded);
    }

    #[test]
    fn names_in_an_envelope_are_checked() {
        let mut envelope = request().to_envelope("operator:test", &CallTarget::All);
        envelope.method = "constructor.call".into();
        assert!(matches!(
            open_envelope(&envelope.encode_to_vec(), now())
                .unwrap_err()
                .1,
            EnvelopeError::BadMethod(_)
        ));
        assert!(CallRequest::parse_function("ping", Value::Null, Duration::ZERO).is_err());
        assert!(CallRequest::parse_function("Sys.ping", Value::Null, Duration::ZERO).is_err());
    }
}
