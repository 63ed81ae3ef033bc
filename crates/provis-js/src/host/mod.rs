//! The host API: the global `provis` object, the only door from a service to
//! the machine. Everything a service may do goes through a function here;
//! gated functions ask [`crate::capability`] first. Each namespace of
//! `provis.*` is a module of its own with one `install` function, listed in
//! [`NAMESPACES`] (see docs/services.md, "Adding a host function").
//!
//! | call | does |
//! |---|---|
//! | `provis.minion.id`, `provis.minion.roles` | who runs the service |
//! | `provis.facts`, `provis.config` | the minion's facts; this service's config from its roles |
//! | `provis.state.get(key, service?)` | a value of this service's state (or another's, read-only) |
//! | `provis.state.set(key, value)`, `.delete(key)` | write this service's state (persisted) |
//! | `provis.state.list(prefix, service?)` | `[{key, value}]` in key order |
//! | `provis.events.emit(kind, data)` | an event on `provis.event.<minion>.<service>.<kind>` |
//! | `provis.log.debug/info/warn/error(message)` | the minion's log, with minion and service fields |
//! | `provis.fs.read(path)`, `.exists(path)`, `.list(dir)` | needs `fs.read` (or `fs.write`) over the path |
//! | `provis.fs.write(path, text)`, `.mkdir(path)`, `.remove(path)` | needs `fs.write` over the path |
//! | `provis.exec.run(program, args, {timeout_ms})` | needs `exec` to list the program; no shell |
//! | `provis.http.request({method, url, headers, body, timeout_ms})` | needs `http` to list the host |
//! | `provis.fleet.query(expression, {for_ms, any_ms})` | needs `fleet_query`; the master's answer |
//! | `provis.secrets.get(name)` | needs `secrets` to list the name; the value sealed to this minion |

mod config;
mod events;
mod exec;
mod facts;
mod fleet;
mod fs;
mod http;
mod log;
mod minion;
mod secrets;
mod state;

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use provis_bundle::manifest::Capabilities;
use rquickjs::object::Property;
use rquickjs::{Ctx, Exception, Value};
use serde_json::json;

use crate::state::StateStore;

/// An event a service emitted, on its way to NATS.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceEvent {
    pub service: String,
    pub kind: String,
    pub data: serde_json::Value,
}

/// Everything the host API of one service needs; owned data only, so it can
/// cross into the service's own thread.
#[derive(Debug, Clone)]
pub struct HostContext {
    pub service: String,
    pub minion_id: String,
    pub roles: Vec<String>,
    pub facts: serde_json::Value,
    pub config: serde_json::Value,
    pub capabilities: Capabilities,
    pub state: Arc<StateStore>,
    /// Where `provis.events.emit` sends; `None` drops events (bundle checks).
    pub events: Option<tokio::sync::mpsc::Sender<ServiceEvent>>,
    /// How `provis.fleet.query` reaches the master; `None` where there is none.
    pub fleet: Option<FleetQuery>,
    /// The secrets the manifest grants, opened; their values are redacted
    /// from everything the service sends out.
    pub secrets: crate::secrets::ServiceSecrets,
}

/// Asks the fleet's state database a question and waits at most the given
/// time for the master's answer. It blocks the service's own thread only.
#[derive(Clone)]
pub struct FleetQuery(pub Arc<FleetQueryFn>);

/// (the question, how long to wait) → the master's answer, or why there is none.
pub type FleetQueryFn = dyn Fn(
        provis_core::master_api::QueryRequest,
        Duration,
    ) -> Result<provis_core::master_api::QueryAnswer, String>
    + Send
    + Sync;

impl std::fmt::Debug for FleetQuery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FleetQuery")
    }
}

impl HostContext {
    /// A host that grants nothing and keeps nothing: for checking a bundle
    /// before it ships.
    pub fn inert(service: &str) -> Self {
        Self {
            service: service.to_owned(),
            minion_id: "check".to_owned(),
            roles: Vec::new(),
            facts: json!({}),
            config: json!({}),
            capabilities: Capabilities::default(),
            state: Arc::new(StateStore::in_memory()),
            events: None,
            fleet: None,
            secrets: crate::secrets::ServiceSecrets::default(),
        }
    }
}

type JsResult<T> = rquickjs::Result<T>;

fn to_js<'js>(ctx: &Ctx<'js>, value: &serde_json::Value) -> JsResult<Value<'js>> {
    ctx.json_parse(value.to_string())
}

fn from_js<'js>(ctx: &Ctx<'js>, value: Value<'js>) -> JsResult<serde_json::Value> {
    match ctx.json_stringify(value)? {
        None => Ok(serde_json::Value::Null),
        Some(text) => serde_json::from_str(&text.to_string()?)
            .map_err(|err| Exception::throw_type(ctx, &format!("value is not JSON: {err}"))),
    }
}

fn throw<T>(ctx: &Ctx<'_>, message: impl std::fmt::Display) -> JsResult<T> {
    Err(Exception::throw_message(ctx, &message.to_string()))
}

/// The name of the error a capability denial throws, so callers can tell a
/// denial (`denied`) from a failure of the service's own.
pub const DENIED_ERROR_NAME: &str = "PermissionDenied";

/// Throws a `PermissionDenied` error: the manifest does not grant this.
fn deny<T>(ctx: &Ctx<'_>, message: impl std::fmt::Display) -> JsResult<T> {
    let exception = Exception::from_message(ctx.clone(), &message.to_string())?;
    exception.set("name", DENIED_ERROR_NAME)?;
    Err(ctx.throw(exception.into_value()))
}

/// The running call's deadline, shared with the interrupt handler, so that a
/// blocking host call (a program run) never outlives the call.
pub type CallDeadline = Rc<Cell<Option<Instant>>>;

/// Installs one namespace of `provis.*`: its value (an object of
/// functions, or data).
type Install = for<'js> fn(&Ctx<'js>, &HostContext, &CallDeadline) -> JsResult<Value<'js>>;

/// Every namespace of `provis.*` and how it is installed. A new namespace
/// is a module with an `install` function and a line here.
pub const NAMESPACES: &[(&str, Install)] = &[
    ("minion", minion::install),
    ("facts", facts::install),
    ("config", config::install),
    ("state", state::install),
    ("events", events::install),
    ("log", log::install),
    ("fs", fs::install),
    ("exec", exec::install),
    ("http", http::install),
    ("fleet", fleet::install),
    ("secrets", secrets::install),
];

/// Installs the frozen global `provis` for `host` in `ctx`.
pub fn install<'js>(ctx: &Ctx<'js>, host: &HostContext, deadline: &CallDeadline) -> JsResult<()> {
    let provis = rquickjs::Object::new(ctx.clone())?;
    for (name, install) in NAMESPACES {
        provis.set(*name, install(ctx, host, deadline)?)?;
    }
    ctx.globals().prop("provis", Property::from(provis))?;
    // Deep-freeze it all, so no module of a service can rewire what the
    // service's other modules call (or change its facts and config).
    ctx.eval::<(), _>(
        "(function deepFreeze(o) { if (o && (typeof o === 'object' || typeof o === 'function') && !Object.isFrozen(o)) { Object.freeze(o); Object.values(o).forEach(deepFreeze); } })(provis);",
    )?;
    Ok(())
}

/// Longest a program or an HTTP request may take when the call does not say.
const DEFAULT_BLOCKING_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a blocking host call (a program, a request) may take: what the
/// service asked (`timeout_ms`, default 10 s), never past the call's deadline.
fn blocking_timeout(requested_ms: Option<f64>, deadline: &CallDeadline) -> Duration {
    let timeout = requested_ms
        .filter(|ms| ms.is_finite() && *ms > 0.0)
        .map_or(DEFAULT_BLOCKING_TIMEOUT, |ms| {
            Duration::from_millis(ms as u64)
        });
    let left = deadline
        .get()
        .map_or(timeout, |at| at.saturating_duration_since(Instant::now()));
    timeout.min(left)
}
