//! Which injected services this minion runs, kept in step with the desired
//! state: the roles it holds (`provis_roles`) name services, and the service
//! pointers (`provis_services`) name the bundle of each. Both buckets are
//! followed ([`provis_core::signed_entry::follow`]); every change reconciles.
//!
//! A new version is loaded beside the old one and swapped in only once it
//! loaded: calls already running finish on the old sandbox (they hold it),
//! new calls go to the new one. A version that fails to load leaves the old
//! one serving and emits `service.failed` with the reason; it is not retried
//! until its pointer or config changes.

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
}

/// The roles a minion holds now, and the applied commit they come from
/// (none while no master has assigned it anything).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DesiredRoles {
    pub roles: Vec<RoleName>,
    pub commit: Option<String>,
    /// Service → digest this minion runs once converged on `commit`.
    pub services: BTreeMap<String, String>,
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
    converged: watch::Sender<Option<String>>,
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
    /// Service → (digest, config) that failed to load, so it is not retried in a loop.
    failed: BTreeMap<String, (String, Value)>,
    desired: watch::Receiver<DesiredRoles>,
    converged: watch::Sender<Option<String>>,
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
        self.reconcile().await;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                changed = desired.changed() => if changed.is_err() { return },
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
            self.reconcile().await;
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

    async fn reconcile(&mut self) {
        let desired = self.desired.borrow().clone();
        self.reconcile_roles(&desired.roles).await;
        // Converged once every expected service runs (or failed) at its
        // expected digest: role specs and pointers may arrive after the
        // assignment, and a later change reconciles again.
        let caught_up = desired.services.iter().all(|(name, digest)| {
            self.table
                .get(name)
                .is_some_and(|s| s.sandbox.digest() == digest)
                || self
                    .failed
                    .get(name)
                    .is_some_and(|(failed, _)| failed == digest)
        });
        if caught_up {
            self.converged.send_replace(desired.commit);
        }
    }

    async fn reconcile_roles(&mut self, roles: &[RoleName]) {
        let wanted = services_for(roles, &self.specs);
        for name in self.table.names() {
            let still_wanted = wanted.contains_key(&name) && self.pointers.contains_key(&name);
            if !still_wanted && let Some(old) = self.table.remove(&name) {
                tracing::info!(minion = %self.host.minion, service = %name, "service unloaded");
                let data = json!({
                    "service": name,
                    "version": old.sandbox.version(),
                    "digest": old.sandbox.digest(),
                });
                self.events.emit("service.unloaded", data).await;
            }
        }
        for (name, config) in wanted {
            let Some(pointer) = self.pointers.get(&name).cloned() else {
                continue;
            };
            let current = self.table.get(&name);
            if current
                .as_ref()
                .is_some_and(|c| c.sandbox.digest() == pointer.digest && c.config == config)
            {
                continue;
            }
            if self.failed.get(&name) == Some(&(pointer.digest.clone(), config.clone())) {
                continue;
            }
            match self.load(&pointer, config.clone(), roles).await {
                Ok(loaded) => {
                    self.failed.remove(&name);
                    let kind = if current.is_some() {
                        "service.replaced"
                    } else {
                        "service.loaded"
                    };
                    let methods = loaded.sandbox.methods().to_vec();
                    self.table.insert(name.clone(), Arc::new(loaded));
                    tracing::info!(minion = %self.host.minion, service = %name, version = %pointer.version, digest = %pointer.digest, "{kind}");
                    self.events.emit(kind, json!({
                        "service": name,
                        "version": pointer.version,
                        "digest": pointer.digest,
                        "methods": methods,
                        "previous": current.map(|c| json!({ "version": c.sandbox.version(), "digest": c.sandbox.digest() })),
                    })).await;
                }
                Err(reason) => {
                    tracing::warn!(minion = %self.host.minion, service = %name, digest = %pointer.digest, %reason, "service failed to load");
                    self.failed
                        .insert(name.clone(), (pointer.digest.clone(), config));
                    self.events.emit("service.failed", json!({
                        "service": name,
                        "version": pointer.version,
                        "digest": pointer.digest,
                        "reason": reason,
                        "still_serving": current.map(|c| json!({ "version": c.sandbox.version(), "digest": c.sandbox.digest() })),
                    })).await;
                }
            }
        }
    }

    async fn load(
        &self,
        pointer: &ServicePointer,
        config: Value,
        roles: &[RoleName],
    ) -> Result<LoadedService, String> {
        pointer.check_signature(&self.host.trusted_bundle_keys)?;
        let bundle = self
            .store
            .fetch(&pointer.digest)
            .await
            .map_err(|err| provis_core::error_chain(&err))?;
        if bundle.manifest.name != pointer.name {
            return Err(format!(
                "bundle {} holds service {:?}, not {:?}",
                pointer.digest, bundle.manifest.name, pointer.name
            ));
        }
        let host = HostContext {
            service: pointer.name.clone(),
            minion_id: self.host.minion.clone(),
            roles: roles.iter().map(ToString::to_string).collect(),
            facts: self.host.facts.clone(),
            config: config.clone(),
            capabilities: bundle.manifest.capabilities.clone(),
            state: self.host.state.clone(),
            events: Some(self.host.service_events.clone()),
            fleet: Some(self.host.fleet.clone()),
        };
        let sandbox = ServiceSandbox::start(Arc::new(bundle), host)
            .await
            .map_err(|err| provis_core::error_chain(&err))?;
        Ok(LoadedService {
            sandbox: Arc::new(sandbox),
            config,
        })
    }
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
