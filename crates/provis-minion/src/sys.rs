//! `sys`, the built-in native service every minion answers: `sys.ping`,
//! `sys.facts`, `sys.services` (the last answered by the dispatcher, which
//! knows the injected services). It needs no bundle, so a fleet can be
//! checked before any service has been injected.

use std::sync::{Arc, RwLock};
use std::time::Instant;

use serde_json::{Value, json};

use crate::dispatch::CallFailure;

pub const NAME: &str = "sys";
pub const METHODS: &[&str] = &["ping", "facts", "services"];

/// What `sys` needs to know about its minion.
#[derive(Debug, Clone)]
pub struct SysService {
    pub minion: String,
    /// Changes when the master assigns other roles.
    pub roles: Arc<RwLock<Vec<String>>>,
    /// The machine's facts (labels change with the minion's settings).
    pub machine_facts: Arc<RwLock<Value>>,
    pub started: Instant,
}

impl SysService {
    pub fn call(&self, method: &str, args: &Value) -> Result<Value, CallFailure> {
        match method {
            "ping" => Ok(self.ping(args)),
            "facts" => Ok(self.facts()),
            other => Err(CallFailure::unknown_method(NAME, other, METHODS)),
        }
    }

    fn ping(&self, args: &Value) -> Value {
        let mut pong =
            json!({ "pong": true, "minion": self.minion, "version": provis_core::VERSION });
        if !args.is_null() {
            pong["echo"] = args.clone();
        }
        pong
    }

    /// What this minion knows about its machine, as `sys.facts` returns it
    /// and services read it as `provis.facts`.
    pub fn facts(&self) -> Value {
        let mut facts = self
            .machine_facts
            .read()
            .map(|f| f.clone())
            .unwrap_or_default();
        facts["id"] = json!(self.minion);
        facts["roles"] = json!(
            *self
                .roles
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        );
        facts["uptime_s"] = json!(self.started.elapsed().as_secs());
        facts
    }
}
