//! Which injected services this minion runs, kept in step with the desired
//! state: the roles it holds (`provis_roles`) name services, and the service
//! pointers (`provis_services`) name the bundle of each. Both buckets are
//! followed ([`provis_core::signed_entry::follow`]); every change reconciles.
//!
//! Once the master assigns it a commit, the minion runs exactly what its
//! assignment names (service → digest and config), so that a rollout
//! switches it when its stage comes and not before; the role and pointer
//! buckets then only serve minions no master assigns (`provis apply`).
//!
//! A new version is loaded beside the old one and swapped in only once it
//! loaded: calls already running finish on the old sandbox (they hold it),
//! new calls go to the new one. A version that fails to fetch or load
//! leaves the old one serving, emits `service.failed` with the reason, and
//! is tried again with exponential backoff and jitter; the minion reports
//! the commit as failing (with every reason) until it runs. Bundles are
//! kept on disk by digest: a restart loads them without a fetch.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::{FutureExt, Stream, StreamExt};
use provis_bundle::{BundleStore, ServicePointer};
use provis_core::RoleName;
use provis_core::roles::{RoleSpec, services_for};
use provis_core::signed_entry::{
    EntryError, EntryOpener, Followed, Opened, Stamp, follow as follow_entries, signed_by,
};
use provis_core::storage::{BUCKET_ROLES, BUCKET_SERVICES};
use provis_js::{HostContext, ServiceEvent, ServiceSandbox, StateStore};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::events::EventBus;

/// A service running on this minion, with what it was loaded from.
#[derive(Debug)]
pub struct LoadedService {
    pub sandbox: Arc<ServiceSandbox>,
    pub config: Value,
    /// The sealed secrets it was loaded with (name → sealed value).
    pub secrets: BTreeMap<String, String>,
}

/// The running services by name; read by every call, written by the reconciler.
#[derive(Debug, Default)]
pub struct ServiceTable {
    loaded: RwLock<BTreeMap<String, Arc<LoadedService>>>,
}

impl ServiceTable {
    pub fn get(&self, name: &str) -> Option<Arc<LoadedService>> {
        self.read().get(name).cloned()
    }

    pub fn names(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    pub fn all(&self) -> Vec<Arc<LoadedService>> {
        self.read().values().cloned().collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<LoadedService>>> {
        self.loaded
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn insert(&self, name: String, service: Arc<LoadedService>) -> Option<Arc<LoadedService>> {
        self.loaded
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(name, service)
    }

    fn remove(&self, name: &str) -> Option<Arc<LoadedService>> {
        self.loaded
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(name)
    }
}

/// What a service's host API needs from its minion.
#[derive(Debug, Clone)]
pub struct HostTemplate {
    pub minion: String,
    /// Keys one of which must have signed a bundle for it to run (none: any bundle).
    pub trusted_bundle_keys: Vec<String>,
    pub facts: Value,
    pub state: Arc<StateStore>,
    pub service_events: mpsc::Sender<ServiceEvent>,
    pub fleet: provis_js::host::FleetQuery,
    /// Where fetched bundles are kept by digest (none: fetched every load).
    pub bundle_cache: Option<std::path::PathBuf>,
    /// Where loads and failures are counted (the minion's, never a service's).
    pub metrics: Arc<provis_telemetry::Metrics>,
    /// Opens the secrets sealed to this minion (none: it can open none).
    pub identity: Option<Arc<provis_core::identity::Identity>>,
}

/// The roles a minion holds now, and the applied commit they come from
/// (none while no master has assigned it anything).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DesiredRoles {
    pub roles: Vec<RoleName>,
    pub commit: Option<String>,
    /// Service → digest this minion runs once converged on `commit`.
    pub services: BTreeMap<String, String>,
    /// Service → its config, for the services of `commit`.
    pub configs: BTreeMap<String, Value>,
    /// Over how long a first fetch after a change is spread.
    pub fetch_spread: Duration,
    /// Secrets sealed to this minion: name → sealed value.
    pub secrets: BTreeMap<String, String>,
}

/// How far the minion is with its services: the last commit it runs in
/// full, and the one it cannot reach yet, with why.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Convergence {
    pub converged: Option<String>,
    pub failing: Option<provis_core::registry::Failing>,
}

/// The first wait before a failed service is tried again; it doubles with
/// every failure up to [`RETRY_MAX`], each wait drawn from half to one and
/// a half of it so that minions that failed together do not retry together.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// A random duration in `[0, span)`, good enough for spreading load (not
/// for anything secret): `RandomState` is seeded afresh each time.
fn random_below(span: Duration) -> Duration {
    use std::hash::BuildHasher as _;
    let nanos = span.as_nanos().min(u128::from(u64::MAX)) as u64;
    if nanos == 0 {
        return Duration::ZERO;
    }
    let draw = std::collections::hash_map::RandomState::new().hash_one(std::time::Instant::now());
    Duration::from_nanos(draw % nanos)
}

/// How long to wait after the `attempts`-th failure in a row.
fn retry_wait(attempts: u32) -> Duration {
    let base = RETRY_FIRST
        .saturating_mul(1 << attempts.saturating_sub(1).min(16))
        .min(RETRY_MAX);
    base / 2 + random_below(base)
}

/// What should run under one name: which bundle, with which config.
#[derive(Debug, Clone, PartialEq)]
struct Wanted {
    digest: String,
    config: Value,
    /// Secrets sealed to this minion (the service opens those it is granted).
    secrets: BTreeMap<String, String>,
    /// The signed pointer it comes from, when no assignment names it.
    pointer: Option<ServicePointer>,
}

/// A service that did not fetch or load, and when it is tried again.
#[derive(Debug, Clone)]
struct Failure {
    digest: String,
    config: Value,
    reason: String,
    attempts: u32,
    retry_at: tokio::time::Instant,
}

/// Keeps `table` in step with the desired state until `stop` fires (a
/// load under way finishes first), and tells `converged` which commit it
/// has caught up with.
pub async fn reconcile_forever(
    js: async_nats::jetstream::Context,
    table: Arc<ServiceTable>,
    host: HostTemplate,
    events: EventBus,
    desired: watch::Receiver<DesiredRoles>,
    converged: watch::Sender<Convergence>,
    stop: CancellationToken,
) {
    // The master creates the buckets; wait for them as long as it takes.
    let store = loop {
        match BundleStore::open(&js).await {
            Ok(store) => break store,
            Err(err) => {
                tracing::warn!(minion = %host.minion, error = %provis_core::error_chain(&err), "service buckets not reachable yet")
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    };
    let trusted = host.trusted_bundle_keys.clone();
    let roles = follow_entries(
        js.clone(),
        BUCKET_ROLES,
        ">",
        signed_by::<RoleSpec>(BUCKET_ROLES, trusted.clone()),
    );
    let pointers = follow_entries(js, BUCKET_SERVICES, ">", pointer_opener(trusted));
    let reconciler = Reconciler {
        store,
        table,
        host,
        events,
        specs: BTreeMap::new(),
        pointers: BTreeMap::new(),
        failed: BTreeMap::new(),
        desired,
        converged,
    };
    reconciler.run(roles, pointers, stop).await;
}

/// Opens a service pointer: any pointer (its signature is checked when its
/// bundle loads), but with pinned keys not one published before the
/// pointer held under its name (an older one put back).
fn pointer_opener(trusted: Vec<String>) -> impl EntryOpener<ServicePointer> + Send + 'static {
    move |_key: &str, bytes: &[u8], held: Option<Stamp>| {
        let pointer: ServicePointer =
            serde_json::from_slice(bytes).map_err(|err| EntryError::Value(err.to_string()))?;
        let at = pointer.signed_at();
        let held = held.map(|held| held.at_ms);
        let older = match (at, held) {
            (Some(at), Some(held)) => at < held,
            // Validly signed without a time (before version 2), after one
            // signed with it: put back from before.
            (None, Some(_)) => pointer.check_signature(&trusted).is_ok(),
            // Unsigned or forged: the load refuses it, saying why.
            _ => false,
        };
        if !trusted.is_empty() && older {
            return Err(EntryError::Older {
                at: at.unwrap_or_default(),
                term: 0,
                held: held.unwrap_or_default(),
                held_term: 0,
            });
        }
        Ok(Opened {
            value: pointer,
            written: at.map(Stamp::from),
        })
    }
}

struct Reconciler {
    store: BundleStore,
    table: Arc<ServiceTable>,
    host: HostTemplate,
    events: EventBus,
    specs: BTreeMap<String, RoleSpec>,
    pointers: BTreeMap<String, ServicePointer>,
    /// Services that failed to fetch or load, tried again after a wait.
    failed: BTreeMap<String, Failure>,
    desired: watch::Receiver<DesiredRoles>,
    converged: watch::Sender<Convergence>,
}

impl Reconciler {
    async fn run(
        mut self,
        mut roles: impl Stream<Item = Followed<RoleSpec>> + Unpin,
        mut pointers: impl Stream<Item = Followed<ServicePointer>> + Unpin,
        stop: CancellationToken,
    ) {
        let mut desired = self.desired.clone();
        // What is already known (possibly nothing) is worth a first look.
        self.reconcile(false).await;
        loop {
            let retry_at = self.failed.values().map(|f| f.retry_at).min();
            let mut changed_assignment = false;
            tokio::select! {
                () = stop.cancelled() => return,
                changed = desired.changed() => {
                    if changed.is_err() { return }
                    changed_assignment = true;
                }
                () = sleep_until_some(retry_at) => {}
                Some(followed) = roles.next() => self.take_role(followed).await,
                Some(followed) = pointers.next() => self.take_pointer(followed).await,
            }
            // Take in whatever else has already arrived (a whole commit's worth
            // of changes) before acting, so a service loads once, not per key.
            loop {
                if let Some(Some(followed)) = roles.next().now_or_never() {
                    self.take_role(followed).await;
                } else if let Some(Some(followed)) = pointers.next().now_or_never() {
                    self.take_pointer(followed).await;
                } else {
                    break;
                }
            }
            self.reconcile(changed_assignment).await;
        }
    }

    async fn take_role(&mut self, followed: Followed<RoleSpec>) {
        match followed {
            Followed::Taken { key, value, .. } => {
                self.specs.insert(key, value);
            }
            Followed::Removed { key } => {
                self.specs.remove(&key);
            }
            Followed::Refused { key, error } => {
                // The role keeps what it had: a copied or forged entry changes nothing.
                tracing::warn!(role = %key, %error, "role entry refused");
                self.events
                    .desired_refused(BUCKET_ROLES, &key, &error)
                    .await;
            }
            Followed::Current => {}
        }
    }

    async fn take_pointer(&mut self, followed: Followed<ServicePointer>) {
        match followed {
            Followed::Taken { key, value, .. } => {
                self.pointers.insert(key, value);
            }
            Followed::Removed { key } => {
                self.pointers.remove(&key);
            }
            Followed::Refused {
                key,
                error: error @ EntryError::Older { .. },
            } => {
                tracing::warn!(service = %key, "an older service pointer put back refused");
                self.events
                    .desired_refused(BUCKET_SERVICES, &key, &error)
                    .await;
            }
            Followed::Refused { key, error } => {
                tracing::warn!(service = %key, %error, "unreadable service pointer ignored");
            }
            Followed::Current => {}
        }
    }

    /// Loads what should run and is not running, unloads what should not;
    /// then says how far it got. `spread`: a new assignment, whose first
    /// fetch waits a random part of its spread.
    async fn reconcile(&mut self, spread: bool) {
        let desired = self.desired.borrow().clone();
        let wanted = self.wanted(&desired);
        self.unload_unwanted(&wanted).await;
        if spread && !desired.fetch_spread.is_zero() {
            let fetches = wanted
                .iter()
                .any(|(name, w)| !self.runs(name, w) && !self.cached(&w.digest));
            if fetches {
                tokio::time::sleep(random_below(desired.fetch_spread)).await;
            }
        }
        for (name, want) in &wanted {
            self.bring_up(name, want, &desired.roles).await;
        }
        self.failed.retain(|name, _| wanted.contains_key(name));
        let Some(commit) = desired.commit else {
            self.converged.send_replace(Convergence::default());
            return;
        };
        let runs_all = wanted.iter().all(|(name, want)| self.runs(name, want));
        let failures: BTreeMap<String, String> = wanted
            .iter()
            .filter_map(|(name, want)| {
                let failure = self.failed.get(name)?;
                (failure.digest == want.digest).then(|| (name.clone(), failure.reason.clone()))
            })
            .collect();
        if runs_all {
            // Only once it runs an assigned commit in full does the minion
            // know what it needs: before, it may not have heard of it yet.
            self.prune_cache(&wanted);
        }
        self.converged.send_modify(|convergence| {
            if runs_all {
                convergence.converged = Some(commit);
                convergence.failing = None;
            } else if !failures.is_empty() {
                convergence.failing = Some(provis_core::registry::Failing {
                    commit,
                    services: failures,
                });
            }
        });
    }

    /// What should run: with an assigned commit, what the assignment
    /// names; else what the roles' specs and the service pointers say.
    fn wanted(&self, desired: &DesiredRoles) -> BTreeMap<String, Wanted> {
        if desired.commit.is_some() {
            return desired
                .services
                .iter()
                .map(|(name, digest)| {
                    let config = desired.configs.get(name).cloned().unwrap_or(Value::Null);
                    let want = Wanted {
                        digest: digest.clone(),
                        config,
                        secrets: desired.secrets.clone(),
                        pointer: None,
                    };
                    (name.clone(), want)
                })
                .collect();
        }
        services_for(&desired.roles, &self.specs)
            .into_iter()
            .filter_map(|(name, config)| {
                let pointer = self.pointers.get(&name)?.clone();
                let want = Wanted {
                    digest: pointer.digest.clone(),
                    config,
                    secrets: BTreeMap::new(),
                    pointer: Some(pointer),
                };
                Some((name, want))
            })
            .collect()
    }

    /// Whether `name` runs `want`'s bundle already (whatever its config).
    fn runs(&self, name: &str, want: &Wanted) -> bool {
        self.table
            .get(name)
            .is_some_and(|s| s.sandbox.digest() == want.digest)
    }

    async fn unload_unwanted(&mut self, wanted: &BTreeMap<String, Wanted>) {
        for name in self.table.names() {
            if !wanted.contains_key(&name)
                && let Some(old) = self.table.remove(&name)
            {
                tracing::info!(minion = %self.host.minion, service = %name, "service unloaded");
                let data = json!({
                    "service": name,
                    "version": old.sandbox.version(),
                    "digest": old.sandbox.digest(),
                });
                self.events.emit("service.unloaded", data).await;
            }
        }
    }

    /// Loads `want` under `name` unless it runs already or waits for its
    /// next try; a failure is recorded with when to try again.
    async fn bring_up(&mut self, name: &str, want: &Wanted, roles: &[RoleName]) {
        let current = self.table.get(name);
        if current.as_ref().is_some_and(|c| {
            c.sandbox.digest() == want.digest
                && c.config == want.config
                && c.secrets == want.secrets
        }) {
            self.failed.remove(name);
            return;
        }
        let earlier = self
            .failed
            .get(name)
            .filter(|f| f.digest == want.digest && f.config == want.config);
        if earlier.is_some_and(|f| f.retry_at > tokio::time::Instant::now()) {
            return;
        }
        let attempts = earlier.map_or(0, |f| f.attempts) + 1;
        let earlier_reason = earlier.map(|f| f.reason.clone());
        let loaded = self.load(name, want, roles).await;
        provis_telemetry::Metrics::outcome(
            &self.host.metrics.service_loads,
            if loaded.is_ok() { "loaded" } else { "failed" },
        );
        match loaded {
            Ok(loaded) => {
                self.failed.remove(name);
                let kind = if current.is_some() {
                    "service.replaced"
                } else {
                    "service.loaded"
                };
                let methods = loaded.sandbox.methods().to_vec();
                let version = loaded.sandbox.version().to_owned();
                self.table.insert(name.to_owned(), Arc::new(loaded));
                tracing::info!(minion = %self.host.minion, service = %name, %version, digest = %want.digest, "{kind}");
                self.events.emit(kind, json!({
                    "service": name,
                    "version": version,
                    "digest": want.digest,
                    "methods": methods,
                    "attempts": attempts,
                    "previous": current.map(|c| json!({ "version": c.sandbox.version(), "digest": c.sandbox.digest() })),
                })).await;
            }
            Err(reason) => {
                let wait = retry_wait(attempts);
                tracing::warn!(minion = %self.host.minion, service = %name, digest = %want.digest, %reason, attempts, retry_in = ?wait, "service failed to load");
                // Said once per reason: a retry that fails alike is no news.
                if earlier_reason.as_deref() != Some(reason.as_str()) {
                    self.events.emit("service.failed", json!({
                        "service": name,
                        "version": want.pointer.as_ref().map(|p| p.version.clone()),
                        "digest": want.digest,
                        "reason": reason,
                        "attempts": attempts,
                        "retry_in_ms": wait.as_millis() as u64,
                        "still_serving": current.map(|c| json!({ "version": c.sandbox.version(), "digest": c.sandbox.digest() })),
                    })).await;
                }
                self.failed.insert(
                    name.to_owned(),
                    Failure {
                        digest: want.digest.clone(),
                        config: want.config.clone(),
                        reason,
                        attempts,
                        retry_at: tokio::time::Instant::now() + wait,
                    },
                );
            }
        }
    }

    fn cache_path(&self, digest: &str) -> Option<std::path::PathBuf> {
        let dir = self.host.bundle_cache.as_ref()?;
        // `sha256:<hex>`: the hex alone names the file.
        let file = digest
            .rsplit(':')
            .next()
            .filter(|hex| !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()))?;
        Some(dir.join(file))
    }

    fn cached(&self, digest: &str) -> bool {
        self.cache_path(digest).is_some_and(|path| path.is_file())
    }

    /// The bundle `digest`: from the disk cache when it holds it intact,
    /// else fetched and then kept there.
    async fn bundle(&self, digest: &str) -> Result<provis_bundle::PackedBundle, String> {
        let path = self.cache_path(digest);
        if let Some(path) = &path
            && let Ok(bytes) = tokio::fs::read(path).await
        {
            match provis_bundle::PackedBundle::from_bytes(bytes.into(), digest) {
                Ok(bundle) => return Ok(bundle),
                Err(err) => {
                    tracing::warn!(minion = %self.host.minion, %digest, error = %err, "cached bundle unreadable; fetching it again");
                }
            }
        }
        let bundle = self
            .store
            .fetch(digest)
            .await
            .map_err(|err| provis_core::error_chain(&err))?;
        if let Some(path) = &path
            && let Err(err) = write_atomically(path, &bundle.bytes).await
        {
            tracing::warn!(minion = %self.host.minion, %digest, error = %err, "bundle not cached on disk");
        }
        Ok(bundle)
    }

    /// Forgets cached bundles nothing wants or runs any more.
    fn prune_cache(&self, wanted: &BTreeMap<String, Wanted>) {
        let Some(dir) = &self.host.bundle_cache else {
            return;
        };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let keep: std::collections::BTreeSet<String> = wanted
            .values()
            .map(|w| w.digest.clone())
            .chain(
                self.table
                    .all()
                    .iter()
                    .map(|s| s.sandbox.digest().to_owned()),
            )
            .filter_map(|digest| digest.rsplit(':').next().map(str::to_owned))
            .collect();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !keep.contains(&name) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    async fn load(
        &self,
        name: &str,
        want: &Wanted,
        roles: &[RoleName],
    ) -> Result<LoadedService, String> {
        // An assigned digest is trusted as its signed assignment is; a
        // pointer carries a signature of its own.
        if let Some(pointer) = &want.pointer {
            pointer.check_signature(&self.host.trusted_bundle_keys)?;
        }
        let bundle = self.bundle(&want.digest).await?;
        if bundle.manifest.name != name {
            return Err(format!(
                "bundle {} holds service {:?}, not {:?}",
                want.digest, bundle.manifest.name, name
            ));
        }
        let host = HostContext {
            service: name.to_owned(),
            minion_id: self.host.minion.clone(),
            roles: roles.iter().map(ToString::to_string).collect(),
            facts: self.host.facts.clone(),
            config: want.config.clone(),
            capabilities: bundle.manifest.capabilities.clone(),
            state: self.host.state.clone(),
            events: Some(self.host.service_events.clone()),
            fleet: Some(self.host.fleet.clone()),
            secrets: self.open_secrets(&bundle.manifest.capabilities.secrets, &want.secrets),
        };
        let sandbox = ServiceSandbox::start(Arc::new(bundle), host)
            .await
            .map_err(|err| provis_core::error_chain(&err))?;
        Ok(LoadedService {
            sandbox: Arc::new(sandbox),
            config: want.config.clone(),
            secrets: want.secrets.clone(),
        })
    }

    /// Opens the `granted` secrets among those sealed to this minion; one
    /// that does not open is kept with why, for the service to be told.
    fn open_secrets(
        &self,
        granted: &[String],
        sealed: &BTreeMap<String, String>,
    ) -> provis_js::ServiceSecrets {
        let opened = granted
            .iter()
            .filter_map(|name| {
                let value = sealed.get(name)?;
                let opened = match &self.host.identity {
                    None => Err("this minion has no identity key to open secrets with".to_owned()),
                    Some(identity) => identity
                        .open_sealed(value)
                        .map_err(|err| err.to_string())
                        .and_then(|bytes| {
                            String::from_utf8(bytes).map_err(|_| "its value is not UTF-8".to_owned())
                        }),
                };
                if let Err(why) = &opened {
                    tracing::warn!(minion = %self.host.minion, secret = %name, %why, "secret does not open");
                }
                Some((name.clone(), opened))
            })
            .collect();
        provis_js::ServiceSecrets::new(opened)
    }
}

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Writes `bytes` to `path` through a temporary file, so that a crash
/// never leaves half a bundle under a digest's name.
async fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await?;
    }
    let partial = path.with_extension("partial");
    tokio::fs::write(&partial, bytes).await?;
    tokio::fs::rename(&partial, path).await
}

/// Publishes what services emit, as `<minion>.<service>.<kind>` events,
/// until `closing` fires (once the calls in flight are done), then what is
/// still queued.
pub async fn forward_service_events(
    mut events: mpsc::Receiver<ServiceEvent>,
    bus: EventBus,
    closing: CancellationToken,
) {
    loop {
        let event = tokio::select! {
            () = closing.cancelled() => break,
            event = events.recv() => match event {
                Some(event) => event,
                None => return,
            },
        };
        forward(&bus, event).await;
    }
    while let Ok(event) = events.try_recv() {
        forward(&bus, event).await;
    }
}

async fn forward(bus: &EventBus, event: ServiceEvent) {
    bus.emit(&format!("{}.{}", event.service, event.kind), event.data)
        .await;
}
