//! The host API: the global `provis` object, the only door from a service to
//! the machine. Everything a service may do goes through a function here;
//! gated functions ask [`crate::capability`] first.
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

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use provis_bundle::manifest::Capabilities;
use rquickjs::function::Opt;
use rquickjs::object::Property;
use rquickjs::{Array, Coerced, Ctx, Exception, Function, Object, Value};
use serde_json::json;

use crate::capability::{self, Access};
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

/// Installs the frozen global `provis` for `host` in `ctx`.
pub fn install<'js>(ctx: &Ctx<'js>, host: &HostContext, deadline: &CallDeadline) -> JsResult<()> {
    let provis = Object::new(ctx.clone())?;
    let mut frozen = Vec::new();

    let minion = Object::new(ctx.clone())?;
    minion.set("id", host.minion_id.as_str())?;
    minion.set("roles", to_js(ctx, &json!(host.roles))?)?;
    provis.set("minion", minion.clone())?;
    frozen.push(minion);
    provis.set("facts", to_js(ctx, &host.facts)?)?;
    provis.set("config", to_js(ctx, &host.config)?)?;

    let state = state_api(ctx, host)?;
    provis.set("state", state.clone())?;
    frozen.push(state);
    let events = events_api(ctx, host)?;
    provis.set("events", events.clone())?;
    frozen.push(events);
    let log = log_api(ctx, host)?;
    provis.set("log", log.clone())?;
    frozen.push(log);
    let fs = fs_api(ctx, host)?;
    provis.set("fs", fs.clone())?;
    frozen.push(fs);
    let exec = exec_api(ctx, host, deadline.clone())?;
    provis.set("exec", exec.clone())?;
    frozen.push(exec);
    let http = http_api(ctx, host, deadline.clone())?;
    provis.set("http", http.clone())?;
    frozen.push(http);
    let fleet = fleet_api(ctx, host, deadline.clone())?;
    provis.set("fleet", fleet.clone())?;
    frozen.push(fleet);

    ctx.globals()
        .prop("provis", Property::from(provis.clone()))?;
    frozen.push(provis);
    // Deep-freeze what a service could otherwise rewire for the services'
    // other modules (facts and config are data, deep-frozen in JS).
    let freeze: Function = ctx.globals().get::<_, Object>("Object")?.get("freeze")?;
    for object in frozen {
        freeze.call::<_, ()>((object,))?;
    }
    ctx.eval::<(), _>(
        "(function deepFreeze(o) { if (o && typeof o === 'object' && !Object.isFrozen(o)) { Object.freeze(o); Object.values(o).forEach(deepFreeze); } })(provis.facts); \
         (function deepFreeze(o) { if (o && typeof o === 'object' && !Object.isFrozen(o)) { Object.freeze(o); Object.values(o).forEach(deepFreeze); } })(provis.config); \
         Object.freeze(provis.minion.roles);",
    )?;
    Ok(())
}

fn state_api<'js>(ctx: &Ctx<'js>, host: &HostContext) -> JsResult<Object<'js>> {
    let api = Object::new(ctx.clone())?;
    let (store, own) = (host.state.clone(), host.service.clone());
    api.set(
        "get",
        Function::new(
            ctx.clone(),
            move |ctx: Ctx<'js>,
                  key: Coerced<String>,
                  service: Opt<String>|
                  -> JsResult<Value<'js>> {
                let namespace = service.0.unwrap_or_else(|| own.clone());
                match store.get(&namespace, &key.0) {
                    Some(value) => to_js(&ctx, &value),
                    None => Ok(Value::new_undefined(ctx)),
                }
            },
        )?,
    )?;
    let (store, own) = (host.state.clone(), host.service.clone());
    api.set(
        "set",
        Function::new(
            ctx.clone(),
            move |ctx: Ctx<'js>, key: Coerced<String>, value: Value<'js>| -> JsResult<()> {
                let value = from_js(&ctx, value)?;
                store
                    .set(&own, &key.0, value)
                    .or_else(|err| throw(&ctx, err))
            },
        )?,
    )?;
    let (store, own) = (host.state.clone(), host.service.clone());
    api.set(
        "delete",
        Function::new(
            ctx.clone(),
            move |ctx: Ctx<'js>, key: Coerced<String>| -> JsResult<bool> {
                store.delete(&own, &key.0).or_else(|err| throw(&ctx, err))
            },
        )?,
    )?;
    let (store, own) = (host.state.clone(), host.service.clone());
    api.set(
        "list",
        Function::new(
            ctx.clone(),
            move |ctx: Ctx<'js>,
                  prefix: Opt<String>,
                  service: Opt<String>|
                  -> JsResult<Value<'js>> {
                let namespace = service.0.unwrap_or_else(|| own.clone());
                let entries: Vec<serde_json::Value> = store
                    .list(&namespace, prefix.0.as_deref().unwrap_or(""))
                    .into_iter()
                    .map(|(key, value)| json!({ "key": key, "value": value }))
                    .collect();
                to_js(&ctx, &serde_json::Value::Array(entries))
            },
        )?,
    )?;
    Ok(api)
}

fn events_api<'js>(ctx: &Ctx<'js>, host: &HostContext) -> JsResult<Object<'js>> {
    let api = Object::new(ctx.clone())?;
    let (sink, service) = (host.events.clone(), host.service.clone());
    api.set(
        "emit",
        Function::new(
            ctx.clone(),
            move |ctx: Ctx<'js>, kind: String, data: Opt<Value<'js>>| -> JsResult<()> {
                provis_core::event::check_kind(&kind).or_else(|err| throw(&ctx, err))?;
                let data = match data.0 {
                    Some(value) => from_js(&ctx, value)?,
                    None => serde_json::Value::Null,
                };
                let Some(sink) = &sink else { return Ok(()) };
                let event = crate::host::ServiceEvent {
                    service: service.clone(),
                    kind,
                    data,
                };
                match sink.try_send(event) {
                    // The queue is bounded, outside the service's memory limit: a
                    // service emitting faster than events can leave is told so.
                    Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => throw(
                        &ctx,
                        "events are emitted faster than they can be sent; slow down",
                    ),
                    // Closed only when the minion stops: nowhere to go.
                    _ => Ok(()),
                }
            },
        )?,
    )?;
    Ok(api)
}

fn log_api<'js>(ctx: &Ctx<'js>, host: &HostContext) -> JsResult<Object<'js>> {
    let api = Object::new(ctx.clone())?;
    for level in ["debug", "info", "warn", "error"] {
        let (minion, service) = (host.minion_id.clone(), host.service.clone());
        api.set(
            level,
            Function::new(ctx.clone(), move |message: Coerced<String>| {
                let message = message.0;
                match level {
                    "debug" => tracing::debug!(%minion, %service, "{message}"),
                    "info" => tracing::info!(%minion, %service, "{message}"),
                    "warn" => tracing::warn!(%minion, %service, "{message}"),
                    _ => tracing::error!(%minion, %service, "{message}"),
                }
            })?,
        )?;
    }
    Ok(api)
}

/// The path to use if the manifest grants `access` to it; a denial otherwise.
fn granted_path(
    ctx: &Ctx<'_>,
    caps: &Capabilities,
    path: &str,
    access: Access,
) -> JsResult<std::path::PathBuf> {
    capability::check_path(caps, path, access).or_else(|err| deny(ctx, err))
}

/// A granted file operation that failed on the machine.
fn io_failed<T>(
    ctx: &Ctx<'_>,
    verb: &str,
    path: &std::path::Path,
    err: std::io::Error,
) -> JsResult<T> {
    throw(ctx, format!("cannot {verb} {}: {err}", path.display()))
}

fn fs_api<'js>(ctx: &Ctx<'js>, host: &HostContext) -> JsResult<Object<'js>> {
    let api = Object::new(ctx.clone())?;
    let caps = host.capabilities.clone();
    api.set(
        "read",
        Function::new(
            ctx.clone(),
            move |ctx: Ctx<'js>, path: String| -> JsResult<String> {
                let path = granted_path(&ctx, &caps, &path, Access::Read)?;
                std::fs::read_to_string(&path).or_else(|err| io_failed(&ctx, "read", &path, err))
            },
        )?,
    )?;
    let caps = host.capabilities.clone();
    api.set(
        "exists",
        Function::new(
            ctx.clone(),
            move |ctx: Ctx<'js>, path: String| -> JsResult<bool> {
                let path = granted_path(&ctx, &caps, &path, Access::Read)?;
                Ok(path.exists())
            },
        )?,
    )?;
    let caps = host.capabilities.clone();
    api.set(
        "list",
        Function::new(
            ctx.clone(),
            move |ctx: Ctx<'js>, path: String| -> JsResult<Vec<String>> {
                let path = granted_path(&ctx, &caps, &path, Access::Read)?;
                let entries =
                    std::fs::read_dir(&path).or_else(|err| io_failed(&ctx, "list", &path, err))?;
                let mut names: Vec<String> = entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                names.sort();
                Ok(names)
            },
        )?,
    )?;
    let caps = host.capabilities.clone();
    api.set(
        "write",
        Function::new(
            ctx.clone(),
            move |ctx: Ctx<'js>, path: String, text: Coerced<String>| -> JsResult<()> {
                let path = granted_path(&ctx, &caps, &path, Access::Write)?;
                std::fs::write(&path, text.0).or_else(|err| io_failed(&ctx, "write", &path, err))
            },
        )?,
    )?;
    let caps = host.capabilities.clone();
    api.set(
        "mkdir",
        Function::new(
            ctx.clone(),
            move |ctx: Ctx<'js>, path: String| -> JsResult<()> {
                let path = granted_path(&ctx, &caps, &path, Access::Write)?;
                std::fs::create_dir_all(&path).or_else(|err| io_failed(&ctx, "create", &path, err))
            },
        )?,
    )?;
    let caps = host.capabilities.clone();
    api.set(
        "remove",
        Function::new(
            ctx.clone(),
            move |ctx: Ctx<'js>, path: String| -> JsResult<bool> {
                let path = granted_path(&ctx, &caps, &path, Access::Write)?;
                match std::fs::remove_file(&path) {
                    Ok(()) => Ok(true),
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(false),
                    Err(err) => throw(&ctx, format!("cannot remove {}: {err}", path.display())),
                }
            },
        )?,
    )?;
    Ok(api)
}

/// Longest a program or an HTTP request may take when the call does not say.
const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(10);

fn exec_api<'js>(
    ctx: &Ctx<'js>,
    host: &HostContext,
    deadline: CallDeadline,
) -> JsResult<Object<'js>> {
    let api = Object::new(ctx.clone())?;
    let caps = host.capabilities.clone();
    api.set(
        "run",
        Function::new(
            ctx.clone(),
            move |ctx: Ctx<'js>,
                  program: String,
                  args: Opt<Array<'js>>,
                  options: Opt<Object<'js>>|
                  -> JsResult<Value<'js>> {
                let program =
                    capability::check_program(&caps, &program).or_else(|err| deny(&ctx, err))?;
                let args: Vec<String> = match args.0 {
                    Some(array) => array
                        .iter::<Coerced<String>>()
                        .map(|a| a.map(|a| a.0))
                        .collect::<JsResult<_>>()?,
                    None => Vec::new(),
                };
                let timeout = options
                    .0
                    .and_then(|o| o.get::<_, Option<f64>>("timeout_ms").ok().flatten())
                    .filter(|ms| ms.is_finite() && *ms > 0.0)
                    .map_or(DEFAULT_EXEC_TIMEOUT, |ms| Duration::from_millis(ms as u64));
                let left = deadline
                    .get()
                    .map_or(timeout, |at| at.saturating_duration_since(Instant::now()));
                let timeout = timeout.min(left);
                let outcome = capability::run_program(&program, &args, timeout).or_else(|err| {
                    throw(&ctx, format!("cannot run {}: {err}", program.display()))
                })?;
                to_js(
                    &ctx,
                    &json!({
                        "code": outcome.code,
                        "stdout": outcome.stdout,
                        "stderr": outcome.stderr,
                        "timed_out": outcome.timed_out,
                    }),
                )
            },
        )?,
    )?;
    Ok(api)
}

fn http_api<'js>(
    ctx: &Ctx<'js>,
    host: &HostContext,
    deadline: CallDeadline,
) -> JsResult<Object<'js>> {
    let api = Object::new(ctx.clone())?;
    let caps = host.capabilities.clone();
    api.set(
        "request",
        Function::new(
            ctx.clone(),
            move |ctx: Ctx<'js>, options: Object<'js>| -> JsResult<Value<'js>> {
                let url: String = options
                    .get("url")
                    .or_else(|_| throw(&ctx, "http.request needs {url: \"http://…\"}"))?;
                let uri = capability::check_http(&caps, &url).or_else(|err| deny(&ctx, err))?;
                let method = options
                    .get::<_, Option<String>>("method")?
                    .unwrap_or_else(|| "GET".to_owned());
                let body = options
                    .get::<_, Option<Coerced<String>>>("body")?
                    .map(|b| b.0.into_bytes())
                    .unwrap_or_default();
                let headers: Vec<(String, String)> =
                    match options.get::<_, Option<Object>>("headers")? {
                        Some(headers) => headers
                            .props::<String, Coerced<String>>()
                            .map(|entry| entry.map(|(k, v)| (k, v.0)))
                            .collect::<JsResult<_>>()?,
                        None => Vec::new(),
                    };
                let timeout = options
                    .get::<_, Option<f64>>("timeout_ms")?
                    .filter(|ms| ms.is_finite() && *ms > 0.0)
                    .map_or(DEFAULT_EXEC_TIMEOUT, |ms| Duration::from_millis(ms as u64));
                let left = deadline
                    .get()
                    .map_or(timeout, |at| at.saturating_duration_since(Instant::now()));
                let outcome =
                    capability::http_request(&method, uri, &headers, body, timeout.min(left))
                        .or_else(|err| throw(&ctx, format!("http {method} {url} failed: {err}")))?;
                let headers: serde_json::Map<String, serde_json::Value> = outcome
                    .headers
                    .into_iter()
                    .map(|(k, v)| (k, serde_json::Value::String(v)))
                    .collect();
                to_js(
                    &ctx,
                    &json!({ "status": outcome.status, "headers": headers, "body": outcome.body }),
                )
            },
        )?,
    )?;
    Ok(api)
}

fn fleet_api<'js>(
    ctx: &Ctx<'js>,
    host: &HostContext,
    deadline: CallDeadline,
) -> JsResult<Object<'js>> {
    let api = Object::new(ctx.clone())?;
    let granted = host.capabilities.fleet_query;
    let fleet = host.fleet.clone();
    api.set(
        "query",
        Function::new(ctx.clone(), move |ctx: Ctx<'js>, expression: String, options: Opt<Object<'js>>| -> JsResult<Value<'js>> {
            if !granted {
                return deny(&ctx, "capability fleet_query is not granted (service.toml: [capabilities] fleet_query = true)");
            }
            let Some(fleet) = &fleet else {
                return throw(&ctx, "this minion cannot reach the fleet's state database");
            };
            use provis_core::master_api::{QueryMode, QueryRequest};
            let (mode, window_ms) = match options.0 {
                Some(o) => match (o.get::<_, Option<f64>>("for_ms")?, o.get::<_, Option<f64>>("any_ms")?) {
                    (Some(ms), _) => (QueryMode::For, ms as i64),
                    (None, Some(ms)) => (QueryMode::Any, ms as i64),
                    (None, None) => (QueryMode::Latest, 0),
                },
                None => (QueryMode::Latest, 0),
            };
            let question = QueryRequest { expression, mode, window_ms, page: Default::default() };
            // Never past the call's own deadline, and never more than 5 s.
            let left = deadline.get().map_or(Duration::from_secs(5), |at| at.saturating_duration_since(Instant::now()));
            let answer = (fleet.0)(question, left.min(Duration::from_secs(5))).or_else(|err| throw(&ctx, err))?;
            let answer = serde_json::to_value(answer).or_else(|err| throw(&ctx, err))?;
            to_js(&ctx, &answer)
        })?,
    )?;
    Ok(api)
}
