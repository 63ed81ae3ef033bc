//! Turning one checked call into one reply: find the service (built-in `sys`
//! or an injected one), run the method within the call's deadline, and shape
//! any failure as a structured error. The same path serves NATS and gRPC.

use std::sync::Arc;
use std::time::Instant;

use provis_core::CheckedCall;
use provis_js::JsCallError;
use provis_proto::v1::{CallReply, ErrorCode};
use serde_json::{Value, json};

use crate::services::ServiceTable;
use crate::sys::{self, SysService};

/// A failed call, before it becomes a reply.
#[derive(Debug, Clone, PartialEq)]
pub struct CallFailure {
    pub code: ErrorCode,
    pub message: String,
    pub stack: String,
}

impl CallFailure {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            stack: String::new(),
        }
    }

    pub fn unknown_method(service: &str, method: &str, methods: &[&str]) -> Self {
        Self::new(
            ErrorCode::UnknownMethod,
            format!(
                "service {service} has no method {method:?} (it has: {})",
                methods.join(", ")
            ),
        )
    }
}

impl From<JsCallError> for CallFailure {
    fn from(err: JsCallError) -> Self {
        let code = match &err {
            JsCallError::UnknownMethod { .. } => ErrorCode::UnknownMethod,
            JsCallError::Timeout(_) => ErrorCode::DeadlineExceeded,
            JsCallError::Busy(_) | JsCallError::Stopped(_) => ErrorCode::Internal,
            JsCallError::Denied { .. } => ErrorCode::Denied,
            JsCallError::Exception { .. }
            | JsCallError::OutOfMemory(_)
            | JsCallError::NeverSettles
            | JsCallError::BadResult(_) => ErrorCode::ServiceFailed,
        };
        let stack = match &err {
            JsCallError::Exception { stack, .. } | JsCallError::Denied { stack, .. } => {
                stack.clone()
            }
            _ => String::new(),
        };
        Self {
            code,
            message: err.to_string(),
            stack,
        }
    }
}

/// The services of one minion.
#[derive(Debug, Clone)]
pub struct Dispatcher {
    minion: String,
    sys: SysService,
    services: Arc<ServiceTable>,
}

impl Dispatcher {
    pub fn new(sys: SysService, services: Arc<ServiceTable>) -> Self {
        Self {
            minion: sys.minion.clone(),
            sys,
            services,
        }
    }

    pub fn minion(&self) -> &str {
        &self.minion
    }

    /// Names of the services this minion runs, `sys` first.
    pub fn service_names(&self) -> Vec<String> {
        std::iter::once(sys::NAME.to_owned())
            .chain(self.services.names())
            .collect()
    }

    /// Each service this minion runs with its version, as the registry lists them.
    pub fn service_versions(&self) -> std::collections::BTreeMap<String, String> {
        let injected = self.services.all();
        std::iter::once((sys::NAME.to_owned(), provis_core::VERSION.to_owned()))
            .chain(
                injected
                    .iter()
                    .map(|s| (s.sandbox.name().to_owned(), s.sandbox.version().to_owned())),
            )
            .collect()
    }

    /// Every service with its version, digest and methods.
    pub fn describe_services(&self) -> Vec<Value> {
        let mut all = vec![json!({
            "name": sys::NAME,
            "version": provis_core::VERSION,
            "digest": "",
            "builtin": true,
            "methods": sys::METHODS,
        })];
        for loaded in self.services.all() {
            let sandbox = &loaded.sandbox;
            all.push(json!({
                "name": sandbox.name(),
                "version": sandbox.version(),
                "digest": sandbox.digest(),
                "builtin": false,
                "methods": sandbox.methods(),
            }));
        }
        all
    }

    /// Runs a call and builds its reply; never panics on caller input.
    pub async fn run(&self, call: &CheckedCall) -> CallReply {
        let started = Instant::now();
        let outcome = tokio::time::timeout(call.remaining(), self.invoke(call))
            .await
            .unwrap_or_else(|_| {
                Err(CallFailure::new(
                    ErrorCode::DeadlineExceeded,
                    format!(
                        "{}.{} did not finish before the deadline",
                        call.service, call.method
                    ),
                ))
            });
        match outcome {
            Ok(value) => provis_core::envelope::ok_reply(
                &call.call_id,
                &self.minion,
                &value,
                started.elapsed(),
            ),
            Err(failure) => {
                let mut reply = provis_core::envelope::error_reply(
                    &call.call_id,
                    &self.minion,
                    failure.code,
                    failure.message,
                    started.elapsed(),
                );
                if let Some(provis_proto::v1::call_reply::Outcome::Error(error)) =
                    reply.outcome.as_mut()
                {
                    error.stack = failure.stack;
                }
                reply
            }
        }
    }

    async fn invoke(&self, call: &CheckedCall) -> Result<Value, CallFailure> {
        if call.service == sys::NAME {
            if call.method == "services" {
                return Ok(Value::Array(self.describe_services()));
            }
            return self.sys.call(&call.method, &call.args);
        }
        let Some(service) = self.services.get(&call.service) else {
            return Err(CallFailure::new(
                ErrorCode::UnknownService,
                format!(
                    "minion {} has no service {:?} (it runs: {})",
                    self.minion,
                    call.service,
                    self.service_names().join(", ")
                ),
            ));
        };
        let deadline = Instant::now() + call.remaining();
        // `service` keeps this version alive until the call ends, even if a
        // new version replaces it meanwhile.
        Ok(service
            .sandbox
            .call(&call.method, call.args.clone(), deadline)
            .await?)
    }
}
