//! One service, one QuickJS runtime, one thread. The thread owns the runtime
//! (QuickJS is single-threaded) and takes calls from a queue; callers get a
//! handle they can share and drop. A call that runs past its deadline is
//! interrupted and fails with a timeout; a call that exhausts the memory limit
//! fails; either way the runtime is then rebuilt from the bundle so that the
//! next call meets a clean service.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use provis_bundle::{PackedBundle, SourceMaps, resolve_import};
use rquickjs::loader::{ImportAttributes, Loader, Resolver};
use rquickjs::promise::PromiseState;
use rquickjs::{
    CatchResultExt, CaughtError, Context, Ctx, Function, Module, Object, Persistent, Runtime, Value,
};
use tokio::sync::oneshot;

use crate::host::{self, CallDeadline, HostContext};

/// Calls waiting for one service beyond this many are refused as busy.
pub const MAX_QUEUED_CALLS: usize = 1024;
/// Stack of each service thread; QuickJS's own stack limit stays well below it.
const THREAD_STACK_BYTES: usize = 16 << 20;
const JS_STACK_BYTES: usize = 1 << 20;

/// Why a service could not be loaded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LoadError {
    #[error("{file}: {message}")]
    Module {
        file: String,
        message: String,
        stack: String,
    },
    #[error("top-level code of {file} threw: {message} (at {at})")]
    TopLevel {
        file: String,
        message: String,
        /// Where it threw, in the author's source (`main.ts:12:5`).
        at: String,
        stack: String,
    },
    #[error("loading took longer than {0:?} (a loop in top-level code?)")]
    Timeout(Duration),
    #[error("loading ran out of memory (limit {0} MiB)")]
    OutOfMemory(u32),
    #[error("{0} exports no function; a service's methods are its exported functions")]
    NoMethods(String),
    #[error("the JavaScript engine failed: {0}")]
    Engine(String),
}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JsCallError {
    #[error("service {service} has no method {method:?} (it has: {methods})")]
    UnknownMethod {
        service: String,
        method: String,
        methods: String,
    },
    #[error("{message}")]
    Exception { message: String, stack: String },
    /// The host API refused what the manifest does not grant.
    #[error("{message}")]
    Denied { message: String, stack: String },
    #[error("interrupted: the call ran longer than its {0:?} deadline")]
    Timeout(Duration),
    #[error("out of memory: the service exceeded its {0} MiB limit")]
    OutOfMemory(u32),
    #[error("the method returned a promise that can never settle (nothing left to run)")]
    NeverSettles,
    #[error("the result is not JSON: {0}")]
    BadResult(String),
    #[error("service {0} has {MAX_QUEUED_CALLS} calls waiting; try again later")]
    Busy(String),
    #[error("service {0} stopped")]
    Stopped(String),
}

impl JsCallError {
    /// The error with secret values replaced (see [`crate::secrets`]).
    fn redacted(self, secrets: &crate::secrets::ServiceSecrets) -> Self {
        let clean = |text: String| secrets.redact(&text).into_owned();
        match self {
            Self::Exception { message, stack } => Self::Exception {
                message: clean(message),
                stack: clean(stack),
            },
            Self::Denied { message, stack } => Self::Denied {
                message: clean(message),
                stack: clean(stack),
            },
            Self::BadResult(message) => Self::BadResult(clean(message)),
            other => other,
        }
    }
}

impl LoadError {
    /// The error with secret values replaced (see [`crate::secrets`]).
    fn redacted(self, secrets: &crate::secrets::ServiceSecrets) -> Self {
        let clean = |text: String| secrets.redact(&text).into_owned();
        match self {
            Self::Module {
                file,
                message,
                stack,
            } => Self::Module {
                file,
                message: clean(message),
                stack: clean(stack),
            },
            Self::TopLevel {
                file,
                message,
                at,
                stack,
            } => Self::TopLevel {
                file,
                message: clean(message),
                at,
                stack: clean(stack),
            },
            Self::Engine(message) => Self::Engine(clean(message)),
            other => other,
        }
    }
}

/// A loaded service: a handle to its thread. Cheap to share; the thread ends
/// once every handle is gone and the queued calls are answered.
#[derive(Debug)]
pub struct ServiceSandbox {
    name: String,
    digest: String,
    version: String,
    methods: Vec<String>,
    jobs: SyncSender<Job>,
    /// QuickJS heap in use, as the service's thread last measured it
    /// (after loading and after each call).
    memory: Arc<std::sync::atomic::AtomicU64>,
}

struct Job {
    method: String,
    args: serde_json::Value,
    deadline: Instant,
    reply: oneshot::Sender<Result<serde_json::Value, JsCallError>>,
}

impl ServiceSandbox {
    /// Loads `bundle` on a thread of its own; returns once its top-level code
    /// ran and its methods are known, or why it could not load.
    pub async fn start(bundle: Arc<PackedBundle>, host: HostContext) -> Result<Self, LoadError> {
        let (jobs, queue) = std::sync::mpsc::sync_channel(MAX_QUEUED_CALLS);
        let (ready, loaded) = oneshot::channel();
        let name = bundle.manifest.name.clone();
        let meta = (bundle.digest.clone(), bundle.manifest.version.clone());
        let memory = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let measured = memory.clone();
        std::thread::Builder::new()
            .name(format!("js-{name}"))
            .stack_size(THREAD_STACK_BYTES)
            .spawn(move || serve(&bundle, &host, ready, &queue, &measured))
            .map_err(|err| LoadError::Engine(err.to_string()))?;
        let methods = loaded
            .await
            .map_err(|_| LoadError::Engine("the service thread died".into()))??;
        Ok(Self {
            name,
            digest: meta.0,
            version: meta.1,
            methods,
            jobs,
            memory,
        })
    }

    /// Bytes of QuickJS heap the service uses, as last measured.
    pub fn memory_bytes(&self) -> u64 {
        self.memory.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn digest(&self) -> &str {
        &self.digest
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    /// Exported functions, sorted.
    pub fn methods(&self) -> &[String] {
        &self.methods
    }

    /// Runs `method(args)`; it must finish before `deadline` (and within the
    /// manifest's per-call limit).
    pub async fn call(
        &self,
        method: &str,
        args: serde_json::Value,
        deadline: Instant,
    ) -> Result<serde_json::Value, JsCallError> {
        if !self.methods.iter().any(|m| m == method) {
            return Err(JsCallError::UnknownMethod {
                service: self.name.clone(),
                method: method.to_owned(),
                methods: self.methods.join(", "),
            });
        }
        let (reply, answer) = oneshot::channel();
        let job = Job {
            method: method.to_owned(),
            args,
            deadline,
            reply,
        };
        match self.jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(JsCallError::Busy(self.name.clone())),
            Err(TrySendError::Disconnected(_)) => {
                return Err(JsCallError::Stopped(self.name.clone()));
            }
        }
        answer
            .await
            .unwrap_or_else(|_| Err(JsCallError::Stopped(self.name.clone())))
    }
}

/// Checks a bundle before it ships: every module of the service's own (not
/// vendored) compiles, every import resolves, the entry's top-level code runs
/// against a host that grants nothing, and it exports at least one function.
/// Returns the methods.
pub fn check_bundle(bundle: &PackedBundle) -> Result<Vec<String>, LoadError> {
    let host = HostContext::inert(&bundle.manifest.name);
    let engine = Engine::load(bundle, &host)?;
    for file in bundle.files.keys() {
        let own_module = [".js", ".mjs", ".cjs", ".ts", ".mts", ".cts"]
            .iter()
            .any(|ext| file.ends_with(ext))
            && !file.starts_with("node_modules/")
            && !file.starts_with(provis_bundle::shims::SHIM_DIR);
        if own_module && *file != bundle.manifest.entry {
            engine.compile_only(file, bundle)?;
        }
    }
    Ok(engine.methods.clone())
}

/// The body of a service's thread.
fn serve(
    bundle: &PackedBundle,
    host: &HostContext,
    ready: oneshot::Sender<Result<Vec<String>, LoadError>>,
    queue: &Receiver<Job>,
    memory: &std::sync::atomic::AtomicU64,
) {
    let measure = |engine: &Engine| {
        let used = engine.runtime.memory_usage().memory_used_size;
        memory.store(
            u64::try_from(used).unwrap_or(0),
            std::sync::atomic::Ordering::Relaxed,
        );
    };
    let mut engine = match Engine::load(bundle, host) {
        Ok(engine) => {
            measure(&engine);
            let _ = ready.send(Ok(engine.methods.clone()));
            engine
        }
        Err(err) => {
            let _ = ready.send(Err(err.redacted(&host.secrets)));
            return;
        }
    };
    let limit = Duration::from_millis(bundle.manifest.limits.call_timeout_ms);
    while let Ok(job) = queue.recv() {
        if job.reply.is_closed() {
            continue; // the caller gave up waiting
        }
        let now = Instant::now();
        if now >= job.deadline {
            let _ = job.reply.send(Err(JsCallError::Timeout(Duration::ZERO)));
            continue;
        }
        let deadline = job.deadline.min(now + limit);
        let outcome = engine.call(
            &job.method,
            &job.args,
            deadline,
            bundle.manifest.limits.memory_mb,
        );
        measure(&engine);
        let poisoned = matches!(
            outcome,
            Err(JsCallError::Timeout(_) | JsCallError::OutOfMemory(_))
        );
        // What the service hands back never carries a secret's value.
        let outcome = outcome
            .map(|value| host.secrets.redact_json(value))
            .map_err(|err| match err {
                JsCallError::Timeout(_) => JsCallError::Timeout(deadline - now),
                other => other.redacted(&host.secrets),
            });
        let _ = job.reply.send(outcome);
        if poisoned {
            // An interrupted or starved heap may hold half-done work: start over.
            drop(engine);
            engine = match Engine::load(bundle, host) {
                Ok(engine) => engine,
                Err(err) => {
                    tracing::error!(service = %bundle.manifest.name, error = %err, "service could not restart; it stops");
                    return;
                }
            };
        }
    }
}

/// Modules of one bundle, for QuickJS's resolver and loader.
#[derive(Clone)]
struct BundleModules(Rc<BTreeMap<String, String>>);

impl Resolver for BundleModules {
    fn resolve<'js>(
        &mut self,
        _ctx: &Ctx<'js>,
        base: &str,
        name: &str,
        _: Option<ImportAttributes<'js>>,
    ) -> rquickjs::Result<String> {
        if base.is_empty() && self.0.contains_key(name) {
            return Ok(name.to_owned()); // the entry, imported by the host
        }
        resolve_import(&self.0, base, name)
            .map_err(|err| rquickjs::Error::new_resolving_message(base, name, err.to_string()))
    }
}

impl Loader for BundleModules {
    fn load<'js>(
        &mut self,
        ctx: &Ctx<'js>,
        name: &str,
        _: Option<ImportAttributes<'js>>,
    ) -> rquickjs::Result<Module<'js>> {
        let source = self
            .0
            .get(name)
            .cloned()
            .ok_or_else(|| rquickjs::Error::new_loading_message(name, "not in the bundle"))?;
        Module::declare(ctx.clone(), name, source)
    }
}

/// A loaded runtime. Field order is drop order: the saved namespace must go
/// before the context and runtime that own it.
struct Engine {
    namespace: Persistent<Object<'static>>,
    context: Context,
    runtime: Runtime,
    deadline: CallDeadline,
    fired: Rc<Cell<bool>>,
    methods: Vec<String>,
    /// Maps stacks back to the author's TypeScript.
    sources: Rc<SourceMaps>,
}

/// What went wrong inside QuickJS, before it is told as a load or call error.
enum Failure {
    Exception {
        message: String,
        stack: String,
    },
    /// A `PermissionDenied` from the host API (or rethrown by the service).
    Denied {
        message: String,
        stack: String,
    },
    Interrupted,
    OutOfMemory,
    NeverSettles,
    Engine(String),
}

impl Engine {
    fn load(bundle: &PackedBundle, host: &HostContext) -> Result<Self, LoadError> {
        let limits = &bundle.manifest.limits;
        let engine_err = |err: rquickjs::Error| LoadError::Engine(err.to_string());
        let runtime = Runtime::new().map_err(engine_err)?;
        runtime.set_memory_limit((limits.memory_mb as usize) << 20);
        runtime.set_max_stack_size(JS_STACK_BYTES);
        let deadline: CallDeadline = Rc::new(Cell::new(None));
        let fired = Rc::new(Cell::new(false));
        let (watch, flag) = (deadline.clone(), fired.clone());
        runtime.set_interrupt_handler(Some(Box::new(move || {
            let late = watch.get().is_some_and(|at| Instant::now() >= at);
            if late {
                flag.set(true);
            }
            late
        })));
        let sources = Rc::new(SourceMaps::from_files(&bundle.files));
        let modules = BundleModules(Rc::new(bundle.files.clone()));
        runtime.set_loader(modules.clone(), modules);
        let context = Context::full(&runtime).map_err(engine_err)?;

        let budget = Duration::from_millis(limits.call_timeout_ms);
        deadline.set(Some(Instant::now() + budget));
        let entry = bundle.manifest.entry.clone();
        let loaded = context.with(
            |ctx| -> Result<(Persistent<Object<'static>>, Vec<String>), Failure> {
                host::install(&ctx, host, &deadline)
                    .catch(&ctx)
                    .map_err(|err| failure(err, &fired))?;
                let promise = Module::import(&ctx, entry.as_str())
                    .catch(&ctx)
                    .map_err(|err| failure(err, &fired))?;
                let namespace = settle(&ctx, promise.into_value(), &fired)?;
                let namespace = namespace
                    .into_object()
                    .ok_or_else(|| Failure::Engine("module namespace is not an object".into()))?;
                let mut methods = Vec::new();
                for key in namespace.keys::<String>() {
                    let key = key.map_err(|err| Failure::Engine(err.to_string()))?;
                    if namespace
                        .get::<_, Value>(key.as_str())
                        .is_ok_and(|v| v.is_function())
                    {
                        methods.push(key);
                    }
                }
                methods.sort();
                Ok((Persistent::save(&ctx, namespace), methods))
            },
        );
        deadline.set(None);
        let loaded = loaded.map_err(|failure| failure.remapped(&sources));
        let (namespace, methods) = loaded.map_err(|failure| match failure {
            Failure::Exception { message, stack } if is_compile_error(&message, &stack) => {
                LoadError::Module {
                    file: location(&stack).unwrap_or_else(|| entry.clone()),
                    message,
                    stack,
                }
            }
            Failure::Exception { message, stack } | Failure::Denied { message, stack } => {
                LoadError::TopLevel {
                    file: entry.clone(),
                    at: location(&stack).unwrap_or_else(|| entry.clone()),
                    message,
                    stack,
                }
            }
            Failure::Interrupted | Failure::NeverSettles => LoadError::Timeout(budget),
            Failure::OutOfMemory => LoadError::OutOfMemory(limits.memory_mb),
            Failure::Engine(message) => LoadError::Engine(message),
        })?;
        if methods.is_empty() {
            return Err(LoadError::NoMethods(entry));
        }
        Ok(Self {
            namespace,
            context,
            runtime,
            deadline,
            fired,
            methods,
            sources,
        })
    }

    /// Compiles `file` (and loads its imports) without running it, in a
    /// throwaway context so nothing it declares lingers.
    fn compile_only(&self, file: &str, bundle: &PackedBundle) -> Result<(), LoadError> {
        let context =
            Context::full(&self.runtime).map_err(|err| LoadError::Engine(err.to_string()))?;
        let source = bundle.files.get(file).cloned().unwrap_or_default();
        context.with(|ctx| {
            Module::declare(ctx.clone(), file, source)
                .catch(&ctx)
                .map(drop)
                .map_err(|err| {
                    let (message, stack) = match failure(err, &self.fired) {
                        Failure::Exception { message, stack }
                        | Failure::Denied { message, stack } => (message, stack),
                        _ => ("cannot be compiled".to_owned(), String::new()),
                    };
                    LoadError::Module {
                        file: file.to_owned(),
                        message,
                        stack,
                    }
                })
        })
    }

    fn call(
        &self,
        method: &str,
        args: &serde_json::Value,
        deadline: Instant,
        memory_mb: u32,
    ) -> Result<serde_json::Value, JsCallError> {
        self.fired.set(false);
        self.deadline.set(Some(deadline));
        let started = Instant::now();
        let outcome = self
            .context
            .with(|ctx| -> Result<serde_json::Value, Failure> {
                let namespace = self
                    .namespace
                    .clone()
                    .restore(&ctx)
                    .map_err(|err| Failure::Engine(err.to_string()))?;
                let function: Function = namespace
                    .get(method)
                    .map_err(|err| Failure::Engine(err.to_string()))?;
                let arg = ctx
                    .json_parse(args.to_string())
                    .catch(&ctx)
                    .map_err(|err| failure(err, &self.fired))?;
                let value = function
                    .call::<_, Value>((arg,))
                    .catch(&ctx)
                    .map_err(|err| failure(err, &self.fired))?;
                let value = settle(&ctx, value, &self.fired)?;
                let text = ctx
                    .json_stringify(value)
                    .catch(&ctx)
                    .map_err(|err| failure(err, &self.fired))?;
                match text {
                    None => Ok(serde_json::Value::Null),
                    Some(text) => {
                        let text = text
                            .to_string()
                            .map_err(|err| Failure::Engine(err.to_string()))?;
                        serde_json::from_str(&text).map_err(|err| Failure::Engine(err.to_string()))
                    }
                }
            });
        self.deadline.set(None);
        outcome.map_err(|failure| match failure.remapped(&self.sources) {
            Failure::Exception { message, stack } => JsCallError::Exception { message, stack },
            Failure::Denied { message, stack } => JsCallError::Denied { message, stack },
            Failure::Interrupted => JsCallError::Timeout(started.elapsed()),
            Failure::OutOfMemory => JsCallError::OutOfMemory(memory_mb),
            Failure::NeverSettles => JsCallError::NeverSettles,
            Failure::Engine(message) => JsCallError::BadResult(message),
        })
    }
}

impl Failure {
    /// The failure with its stack pointing at the author's source.
    fn remapped(self, sources: &SourceMaps) -> Self {
        match self {
            Self::Exception { message, stack } => Self::Exception {
                message,
                stack: sources.remap(&stack),
            },
            Self::Denied { message, stack } => Self::Denied {
                message,
                stack: sources.remap(&stack),
            },
            other => other,
        }
    }
}

/// Drives `value` to completion if it is a promise.
fn settle<'js>(
    ctx: &Ctx<'js>,
    value: Value<'js>,
    fired: &Cell<bool>,
) -> Result<Value<'js>, Failure> {
    let Some(promise) = value.as_promise().cloned() else {
        return Ok(value);
    };
    loop {
        match promise.state() {
            PromiseState::Resolved => {
                return promise
                    .result::<Value>()
                    .unwrap_or_else(|| Err(rquickjs::Error::Unknown))
                    .catch(ctx)
                    .map_err(|err| failure(err, fired));
            }
            PromiseState::Rejected => {
                let rejected = promise
                    .result::<Value>()
                    .unwrap_or(Err(rquickjs::Error::Unknown));
                return Err(match rejected.catch(ctx) {
                    Err(err) => failure(err, fired),
                    Ok(_) => Failure::Engine("a rejected promise without a reason".into()),
                });
            }
            PromiseState::Pending => {
                if fired.get() {
                    return Err(Failure::Interrupted);
                }
                if !ctx.execute_pending_job() {
                    // No timers, no host async work: nothing can settle it any more.
                    return Err(if fired.get() {
                        Failure::Interrupted
                    } else {
                        Failure::NeverSettles
                    });
                }
            }
        }
    }
}

fn failure(err: CaughtError<'_>, fired: &Cell<bool>) -> Failure {
    if fired.get() {
        return Failure::Interrupted;
    }
    match err {
        CaughtError::Exception(exception) if exception.as_value().is_uncatchable_error() => {
            Failure::Interrupted
        }
        CaughtError::Exception(exception) => {
            let message = exception.message().unwrap_or_default();
            if message == "out of memory" {
                return Failure::OutOfMemory;
            }
            let name: String = exception.get("name").unwrap_or_else(|_| "Error".to_owned());
            let (message, stack) = (
                format!("{name}: {message}"),
                exception.stack().unwrap_or_default(),
            );
            if name == crate::host::DENIED_ERROR_NAME {
                Failure::Denied { message, stack }
            } else {
                Failure::Exception { message, stack }
            }
        }
        CaughtError::Value(value) if value.is_uncatchable_error() => Failure::Interrupted,
        CaughtError::Value(value) if value.is_null() => Failure::OutOfMemory,
        CaughtError::Value(value) => {
            let shown = value
                .ctx()
                .json_stringify(value.clone())
                .ok()
                .flatten()
                .and_then(|s| s.to_string().ok())
                .unwrap_or_else(|| format!("{value:?}"));
            Failure::Exception {
                message: format!("uncaught {shown}"),
                stack: String::new(),
            }
        }
        CaughtError::Error(err) => Failure::Engine(err.to_string()),
    }
}

/// True when an exception comes from compiling or linking rather than running.
fn is_compile_error(message: &str, _stack: &str) -> bool {
    message.starts_with("SyntaxError")
        || message.contains("Error resolving module")
        || message.contains("Error loading module")
        || message.contains("could not find export")
        || message.contains("circular reference")
}

/// The first `file:line:col` of a stack, if any (`at f (main.ts:3:5)` and
/// `at main.ts:3:5` alike).
fn location(stack: &str) -> Option<String> {
    let line = stack.lines().find(|l| !l.trim().is_empty())?;
    let at = line.trim().trim_start_matches("at ");
    let inside = match (at.rfind('('), at.rfind(')')) {
        (Some(open), Some(close)) if open < close => &at[open + 1..close],
        _ => at,
    };
    Some(inside.to_owned())
}
