//! Whether a fleet is ready: every minion named is live, every service
//! expected runs (at the digest expected). `provis up` and the testkit both
//! wait on these probes, each with its own patience.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::kv::Store;

use crate::client::{Client, ReplyStatus};
use crate::envelope::CallRequest;
use crate::registry::{MinionRecord, RegistryError};
use crate::subject::{CallTarget, MinionId};

/// Whether `nats` is connected now (for a part's `/readyz`), and if not,
/// in which state it is.
pub fn connected(nats: &async_nats::Client) -> Result<(), String> {
    match nats.connection_state() {
        async_nats::connection::State::Connected => Ok(()),
        state => Err(format!("not connected to NATS ({state})")),
    }
}

/// What one minion must run: service name → digest (none: any version).
pub type ExpectedServices = BTreeMap<String, Option<String>>;

/// True when every minion of `ids` is online in the registry. Each entry is
/// read directly by key: no consumer, whatever the size of the fleet.
pub async fn minions_live(registry: &Store, ids: &[MinionId]) -> Result<bool, RegistryError> {
    for id in ids {
        let entry = registry
            .get(id.as_str())
            .await
            .map_err(|err| RegistryError::Read(Box::new(err)))?;
        let live = entry
            .and_then(|bytes| serde_json::from_slice::<MinionRecord>(&bytes).ok())
            .is_some_and(|record| record.id == *id && record.is_online());
        if !live {
            return Ok(false);
        }
    }
    Ok(true)
}

/// True when every minion of `expected` answers `sys.services` with every
/// service it should run (at its digest, where one is given).
pub async fn services_run(
    client: &Client,
    expected: &BTreeMap<MinionId, ExpectedServices>,
) -> bool {
    if expected.is_empty() {
        return true;
    }
    let Ok(ask) = CallRequest::parse_function(
        "sys.services",
        serde_json::Value::Null,
        Duration::from_secs(2),
    ) else {
        return false;
    };
    let target = CallTarget::Minions(expected.keys().cloned().collect());
    let Ok(report) = client.call(&target, &ask).await else {
        return false;
    };
    expected.iter().all(|(id, services)| {
        report.replies.iter().any(|reply| {
            reply.minion == id.as_str()
                && reply.status == ReplyStatus::Ok
                && services.iter().all(|(name, digest)| {
                    reply
                        .result
                        .as_ref()
                        .and_then(|running| running.as_array())
                        .is_some_and(|running| {
                            running.iter().any(|service| {
                                service["name"] == name.as_str()
                                    && digest
                                        .as_ref()
                                        .is_none_or(|digest| service["digest"] == digest.as_str())
                            })
                        })
                })
        })
    })
}
