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
    pub hostname: String,
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
        json!({
            "id": self.minion,
            "hostname": self.hostname,
            "roles": self.roles,
            "os": std::env::consts::OS,
            "arch": std::env::consts::ARCH,
            "cpus": std::thread::available_parallelism().map_or(1, usize::from),
            "version": provis_core::VERSION,
            "uptime_s": self.started.elapsed().as_secs(),
        })
    }
}
