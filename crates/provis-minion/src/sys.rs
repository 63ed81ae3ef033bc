//! `sys`, the built-in native service every minion answers: `sys.ping`,
//! `sys.facts`, `sys.services` (the last answered by the dispatcher, which
//! knows the injected services). It needs no bundle, so a fleet can be
//! checked before any service has been injected.

use std::time::Instant;

use serde_json::{Value, json};

use crate::dispatch::CallFailure;

pub const NAME: &str = "sys";
pub const METHODS: &[&str] = &["ping", "facts", "services"];

/// What `sys` needs to know about its minion.
#[derive(Debug, Clone)]
pub struct SysService {
    pub minion: String,
    pub roles: Vec<String>,
    /// The machine's facts, gathered at start.
    pub machine_facts: Value,
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
        let mut facts = self.machine_facts.clone();
        facts["id"] = json!(self.minion);
        facts["roles"] = json!(self.roles);
        facts["uptime_s"] = json!(self.started.elapsed().as_secs());
        facts
    }
}
