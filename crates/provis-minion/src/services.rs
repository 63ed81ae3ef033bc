//! Which injected services this minion runs, kept in step with the desired
//! state: the roles it holds (`provis_roles`) name services, and the service
//! pointers (`provis_services`) name the bundle of each. Both buckets are
//! watched; every change reconciles.
//!
//! A new version is loaded beside the old one and swapped in only once it
//! loaded: calls already running finish on the old sandbox (they hold it),
//! new calls go to the new one. A version that fails to load leaves the old
//! one serving and emits `service.failed` with the reason; it is not retried
//! until its pointer or config changes.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::kv;
use futures::{FutureExt, StreamExt};
use provis_bundle::{BundleStore, ServicePointer};
use provis_core::RoleName;
use provis_core::roles::{RoleSpec, services_for};
use provis_core::storage::BUCKET_ROLES;
use provis_js::{HostContext, ServiceEvent, ServiceSandbox, StateStore};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

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

/// Keeps `table` in step with the desired state until the connection ends,
/// and tells `converged` which commit it has caught up with.
pub async fn reconcile_forever(
    nats: async_nats::Client,
    table: Arc<ServiceTable>,
    host: HostTemplate,
    events: EventBus,
    desired: watch::Receiver<DesiredRoles>,
    converged: watch::Sender<Option<String>>,
) {
    let js = async_nats::jetstream::new(nats);
    // The master creates the buckets; wait for them as long as it takes.
    let (store, roles_kv) = loop {
        match (
            BundleStore::open(&js).await,
            js.get_key_value(BUCKET_ROLES).await,
        ) {
            (Ok(store), Ok(roles)) => break (store, roles),
            (Err(err), _) => {
                tracing::warn!(minion = %host.minion, error = %err, "service buckets not reachable yet")
            }
            (_, Err(err)) => {
                tracing::warn!(minion = %host.minion, error = %err, "roles bucket not reachable yet")
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let mut reconciler = Reconciler {
        store,
        table,
        host,
        events,
        specs: BTreeMap::new(),
        role_written_at: BTreeMap::new(),
        pointers: BTreeMap::new(),
        failed: BTreeMap::new(),
        desired,
        converged,
    };
    loop {
        if let Err(err) = reconciler.watch(&roles_kv).await {
            tracing::warn!(minion = %reconciler.host.minion, error = %err, "desired-state watch ended; starting again");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

struct Reconciler {
    store: BundleStore,
    table: Arc<ServiceTable>,
    host: HostTemplate,
    events: EventBus,
    specs: BTreeMap<String, RoleSpec>,
    /// When each role entry taken was written: older ones are refused.
    role_written_at: BTreeMap<String, i64>,
    pointers: BTreeMap<String, ServicePointer>,
    /// Service → (digest, config) that failed to load, so it is not retried in a loop.
    failed: BTreeMap<String, (String, Value)>,
    desired: watch::Receiver<DesiredRoles>,
    converged: watch::Sender<Option<String>>,
}

impl Reconciler {
    async fn watch(&mut self, roles_kv: &kv::Store) -> Result<(), String> {
        let mut roles = roles_kv
            .watch_with_history(">")
            .await
            .map_err(|e| e.to_string())?;
        let mut pointers = self
            .store
            .pointers()
            .watch_with_history(">")
            .await
            .map_err(|e| e.to_string())?;
        let mut desired = self.desired.clone();
        // What is already known (possibly nothing) is worth a first look.
        self.reconcile().await;
        loop {
            tokio::select! {
                changed = desired.changed() => changed.map_err(|_| "the minion stopped".to_owned())?,
                entry = roles.next() => self.apply_role(entry.ok_or("roles watch closed")?.map_err(|e| e.to_string())?).await,
                entry = pointers.next() => self.apply_pointer(entry.ok_or("services watch closed")?.map_err(|e| e.to_string())?).await,
            }
            // Take in whatever else has already arrived (a whole commit's worth
            // of changes) before acting, so a service loads once, not per key.
            loop {
                if let Some(Some(entry)) = roles.next().now_or_never() {
                    self.apply_role(entry.map_err(|e| e.to_string())?).await;
                } else if let Some(Some(entry)) = pointers.next().now_or_never() {
                    self.apply_pointer(entry.map_err(|e| e.to_string())?).await;
                } else {
                    break;
                }
            }
            self.reconcile().await;
        }
    }

    async fn apply_role(&mut self, entry: kv::Entry) {
        if entry.operation != kv::Operation::Put {
            self.specs.remove(&entry.key);
            return;
        }
        let held = self.role_written_at.get(&entry.key).copied();
        match provis_core::signed_entry::open::<RoleSpec>(
            BUCKET_ROLES,
            &entry.key,
            &entry.value,
            &self.host.trusted_bundle_keys,
        )
        .and_then(|opened| opened.not_older_than(held))
        {
            Ok(opened) => {
                if let Some(at) = opened.written_at_ms {
                    self.role_written_at.insert(entry.key.clone(), at);
                }
                self.specs.insert(entry.key, opened.value);
            }
            Err(err) => {
                // The role keeps what it had: a copied or forged entry changes nothing.
                tracing::warn!(role = %entry.key, error = %err, "role entry refused");
                self.events
                    .emit(
                        "desired.refused",
                        json!({ "bucket": BUCKET_ROLES, "key": entry.key, "reason": err.to_string() }),
                    )
                    .await;
            }
        }
    }

    async fn apply_pointer(&mut self, entry: kv::Entry) {
        if entry.operation != kv::Operation::Put {
            self.pointers.remove(&entry.key);
            return;
        }
        match serde_json::from_slice::<ServicePointer>(&entry.value) {
            Ok(pointer) => {
                // Signed pointers carry when they were published: an older
                // one put back under the name is refused (the signature
                // itself is checked when the bundle loads).
                let trusted = &self.host.trusted_bundle_keys;
                let held_at = self
                    .pointers
                    .get(&entry.key)
                    .and_then(ServicePointer::signed_at);
                let older = match (pointer.signed_at(), held_at) {
                    (Some(at), Some(held)) => at < held,
                    // Validly signed without a time (before version 2),
                    // after one signed with it: put back from before.
                    (None, Some(_)) => pointer.check_signature(trusted).is_ok(),
                    // Unsigned or forged: the load refuses it, saying why.
                    _ => false,
                };
                if !trusted.is_empty() && older {
                    tracing::warn!(service = %entry.key, "an older service pointer put back refused");
                    self.events
                        .emit(
                            "desired.refused",
                            json!({ "bucket": provis_core::storage::BUCKET_SERVICES, "key": entry.key, "reason": "an older value put back" }),
                        )
                        .await;
                    return;
                }
                self.pointers.insert(entry.key, pointer);
            }
            Err(err) => {
                tracing::warn!(service = %entry.key, error = %err, "unreadable service pointer ignored")
            }
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
            .map_err(|err| err.to_string())?;
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
            .map_err(|err| err.to_string())?;
        Ok(LoadedService {
            sandbox: Arc::new(sandbox),
            config,
        })
    }
}

/// Publishes what services emit, as `<minion>.<service>.<kind>` events.
pub async fn forward_service_events(mut events: mpsc::Receiver<ServiceEvent>, bus: EventBus) {
    while let Some(event) = events.recv().await {
        bus.emit(&format!("{}.{}", event.service, event.kind), event.data)
            .await;
    }
}
