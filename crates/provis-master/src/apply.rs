//! Writing a validated repository into the fleet's desired state: bundles and
//! service pointers, then role specs; services and roles the repository no
//! longer has are removed. Minions converge by watching these buckets.

use std::collections::BTreeSet;

use crate::repository::ConfigRepository;
use async_nats::jetstream;
use provis_bundle::BundleStore;
use provis_core::storage::BUCKET_ROLES;

pub use provis_core::master_api::ApplySummary;

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Store(#[from] provis_bundle::store::StoreError),
    #[error("cannot read the current {what}")]
    Read {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot write role {role}")]
    Role {
        role: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A failure to write `role`, with its cause.
fn role_error<E>(role: &str) -> impl FnOnce(E) -> ApplyError
where
    E: std::error::Error + Send + Sync + 'static,
{
    let role = role.to_owned();
    move |source| ApplyError::Role {
        role,
        source: Box::new(source),
    }
}

/// A failure to read `what`, with its cause.
fn read_error<E>(what: &'static str) -> impl FnOnce(E) -> ApplyError
where
    E: std::error::Error + Send + Sync + 'static,
{
    move |source| ApplyError::Read {
        what,
        source: Box::new(source),
    }
}

/// Applies `repository`; writes only what differs from the current state.
/// Role entries are signed by `signer` (when given) in leader term `term`
/// (0 outside a leader: `provis apply`, `provis up`).
pub async fn apply(
    js: &jetstream::Context,
    repository: &ConfigRepository,
    signer: Option<&provis_core::identity::Identity>,
    term: u64,
) -> Result<ApplySummary, ApplyError> {
    let store = BundleStore::open(js).await?;
    let roles_kv = js
        .get_key_value(BUCKET_ROLES)
        .await
        .map_err(read_error("roles"))?;
    let mut summary = ApplySummary::default();

    let current_pointers = provis_core::kv_snapshot::read_all(store.pointers())
        .await
        .map_err(read_error("service pointers"))?;
    for (name, bundle) in &repository.services {
        let unchanged = current_pointers
            .get(name)
            .and_then(|v| serde_json::from_slice::<provis_bundle::ServicePointer>(v).ok())
            .is_some_and(|p| p.digest == bundle.digest);
        if !unchanged {
            store.publish(bundle, signer).await?;
            summary.services_changed.push(name.clone());
        }
    }
    for name in current_pointers.keys() {
        if !repository.services.contains_key(name) {
            store.remove_pointer(name).await?;
            summary.services_removed.push(name.clone());
        }
    }

    let current_roles = provis_core::kv_snapshot::read_all(&roles_kv)
        .await
        .map_err(read_error("roles"))?;
    for (role, spec) in &repository.roles {
        let current = current_roles.get(role.as_str()).map(|v| v.as_ref());
        let signer_key = signer.map(provis_core::identity::Identity::public_key);
        if provis_core::signed_entry::holds(BUCKET_ROLES, role.as_str(), current, spec, signer_key)
        {
            continue;
        }
        // Signed for this key when there is a signer: minions that pin it
        // take no role entry copied from elsewhere or put back from before.
        let value = match signer {
            Some(signer) => provis_core::signed_entry::sign(
                BUCKET_ROLES,
                role.as_str(),
                spec,
                signer,
                provis_core::signed_entry::Stamp {
                    term,
                    at_ms: provis_core::signed_entry::next_written_at(
                        current,
                        provis_core::envelope::now_unix_ms(),
                    ),
                },
            )
            .map_err(role_error(role.as_str()))?,
            None => serde_json::to_vec(spec).map_err(role_error(role.as_str()))?,
        };
        roles_kv
            .put(role.as_str(), value.into())
            .await
            .map_err(role_error(role.as_str()))?;
        summary.roles_changed.push(role.to_string());
    }
    let wanted: BTreeSet<&str> = repository.roles.keys().map(|r| r.as_str()).collect();
    for role in current_roles.keys() {
        if !wanted.contains(role.as_str()) {
            roles_kv.delete(role).await.map_err(role_error(role))?;
            summary.roles_removed.push(role.clone());
        }
    }
    Ok(summary)
}
