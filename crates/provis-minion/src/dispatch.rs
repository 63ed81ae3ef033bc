//! Turning one checked call into one reply: find the service, run the method
//! within the call's deadline, and shape any failure as a structured error.

use std::time::Instant;

use provis_core::CheckedCall;
use provis_proto::v1::{CallReply, ErrorCode};
use serde_json::Value;

use crate::sys::{self, SysService};

/// A failed call, before it becomes a reply.
#[derive(Debug, Clone, PartialEq)]
pub struct CallFailure {
    pub code: ErrorCode,
    pub message: String,
}

impl CallFailure {
    pub fn unknown_method(service: &str, method: &str, methods: &[&str]) -> Self {
        Self {
            code: ErrorCode::UnknownMethod,
            message: format!(
                "service {service} has no method {method:?} (it has: {})",
                methods.join(", ")
            ),
        }
    }
}

/// The services of one minion.
#[derive(Debug, Clone)]
pub struct Dispatcher {
    minion: String,
    sys: SysService,
}

impl Dispatcher {
    pub fn new(sys: SysService) -> Self {
        Self {
            minion: sys.minion.clone(),
            sys,
        }
    }

    /// Names of the services this minion runs.
    pub fn service_names(&self) -> Vec<String> {
        vec![sys::NAME.to_owned()]
    }

    /// Runs a call and builds its reply; never panics on caller input.
    pub async fn run(&self, call: &CheckedCall) -> CallReply {
        let started = Instant::now();
        let outcome = tokio::time::timeout(call.remaining(), self.invoke(call))
            .await
            .unwrap_or_else(|_| {
                Err(CallFailure {
                    code: ErrorCode::DeadlineExceeded,
                    message: format!(
                        "{}.{} did not finish before the deadline",
                        call.service, call.method
                    ),
                })
            });
        match outcome {
            Ok(value) => provis_core::envelope::ok_reply(
                &call.call_id,
                &self.minion,
                &value,
                started.elapsed(),
            ),
            Err(failure) => provis_core::envelope::error_reply(
                &call.call_id,
                &self.minion,
                failure.code,
                failure.message,
                started.elapsed(),
            ),
        }
    }

    async fn invoke(&self, call: &CheckedCall) -> Result<Value, CallFailure> {
        match call.service.as_str() {
            sys::NAME => self.sys.call(&call.method, &call.args),
            other => Err(CallFailure {
                code: ErrorCode::UnknownService,
                message: format!(
                    "minion {} has no service {other:?} (it runs: {})",
                    self.minion,
                    self.service_names().join(", ")
                ),
            }),
        }
    }
}
