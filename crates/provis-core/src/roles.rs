//! Roles as desired state (`provis_roles`): which services a role runs and
//! with what configuration. A member of `web.eu` runs the services of `web`
//! and of `web.eu`; where both configure a service, the more specific role's
//! keys win.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::subject::RoleName;

/// What `provis_roles` holds for one role.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleSpec {
    /// Services every member runs.
    #[serde(default)]
    pub services: Vec<String>,
    /// Per service: the configuration its code reads as `provis.config`.
    #[serde(default)]
    pub config: BTreeMap<String, Value>,
}

/// The services a minion with `roles` runs, each with its merged config.
pub fn services_for<K: std::borrow::Borrow<str> + Ord>(
    roles: &[RoleName],
    specs: &BTreeMap<K, RoleSpec>,
) -> BTreeMap<String, Value> {
    let mut levels: Vec<&str> = roles
        .iter()
        .flat_map(RoleName::ancestors_and_self)
        .collect();
    // General before specific, so specific config is applied last.
    levels.sort_by_key(|role| role.matches('.').count());
    levels.dedup();
    let mut services: BTreeMap<String, Value> = BTreeMap::new();
    for role in levels {
        let Some(spec) = specs.get(role) else {
            continue;
        };
        for service in &spec.services {
            services
                .entry(service.clone())
                .or_insert_with(|| Value::Object(Default::default()));
        }
        for (service, config) in &spec.config {
            if let Some(merged) = services.get_mut(service) {
                merge_config(merged, config);
            }
        }
    }
    services
}

fn merge_config(into: &mut Value, from: &Value) {
    match (into, from) {
        (Value::Object(into), Value::Object(from)) => {
            for (key, value) in from {
                into.insert(key.clone(), value.clone());
            }
        }
        (into, from) => *into = from.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sub_roles_inherit_and_specialise() {
        let specs: BTreeMap<String, RoleSpec> = [
            (
                "web".to_owned(),
                RoleSpec {
                    services: vec!["site".into()],
                    config: [("site".to_owned(), json!({"root": "/srv", "mode": "off"}))].into(),
                },
            ),
            (
                "web.eu".to_owned(),
                RoleSpec {
                    services: vec!["health".into()],
                    config: [("site".to_owned(), json!({"mode": "on"}))].into(),
                },
            ),
            (
                "db".to_owned(),
                RoleSpec {
                    services: vec!["backup".into()],
                    config: BTreeMap::new(),
                },
            ),
        ]
        .into();
        let roles = vec!["web.eu".parse().unwrap()];
        let services = services_for(&roles, &specs);
        assert_eq!(services.keys().collect::<Vec<_>>(), ["health", "site"]);
        assert_eq!(services["site"], json!({"root": "/srv", "mode": "on"}));
    }
}
