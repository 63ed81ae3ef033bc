//! The minion's state database: JSON values by key, one namespace per
//! service. A service writes only its own namespace and reads any. Every write
//! is persisted before it returns (the namespace's file is rewritten and
//! renamed into place), so nothing a service stored is lost when the minion
//! restarts or dies.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::Value;

/// Longest key accepted.
pub const MAX_KEY_LEN: usize = 256;
/// Largest namespace, all values serialized together.
pub const MAX_NAMESPACE_BYTES: usize = 8 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state key must be 1 to {MAX_KEY_LEN} characters")]
    BadKey,
    #[error("state of {0} would exceed {MAX_NAMESPACE_BYTES} bytes")]
    Full(String),
    #[error("cannot persist state of {namespace}")]
    Persist {
        namespace: String,
        source: std::io::Error,
    },
    #[error("cannot load state file {path}: {reason}")]
    Load { path: PathBuf, reason: String },
}

#[derive(Debug, Default)]
pub struct StateStore {
    dir: Option<PathBuf>,
    namespaces: Mutex<BTreeMap<String, BTreeMap<String, Value>>>,
}

impl StateStore {
    /// A store kept only in memory (tests and tools).
    pub fn in_memory() -> Self {
        Self::default()
    }

    /// Opens the store persisted under `dir`, loading every namespace there.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        std::fs::create_dir_all(dir).map_err(|source| StateError::Load {
            path: dir.to_owned(),
            reason: source.to_string(),
        })?;
        let mut namespaces = BTreeMap::new();
        let entries = std::fs::read_dir(dir).map_err(|err| StateError::Load {
            path: dir.to_owned(),
            reason: err.to_string(),
        })?;
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(namespace) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
            else {
                continue;
            };
            let text = std::fs::read_to_string(&path).map_err(|err| StateError::Load {
                path: path.clone(),
                reason: err.to_string(),
            })?;
            let values = serde_json::from_str(&text).map_err(|err| StateError::Load {
                path: path.clone(),
                reason: err.to_string(),
            })?;
            namespaces.insert(namespace.to_owned(), values);
        }
        Ok(Self {
            dir: Some(dir.to_owned()),
            namespaces: Mutex::new(namespaces),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, BTreeMap<String, Value>>> {
        // A panic while holding the lock leaves consistent data (writes are whole), so go on.
        self.namespaces
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn get(&self, namespace: &str, key: &str) -> Option<Value> {
        self.lock()
            .get(namespace)
            .and_then(|values| values.get(key))
            .cloned()
    }

    /// Entries of `namespace` whose key starts with `prefix`, in key order.
    pub fn list(&self, namespace: &str, prefix: &str) -> Vec<(String, Value)> {
        self.lock()
            .get(namespace)
            .map(|values| {
                values
                    .range(prefix.to_owned()..)
                    .take_while(|(key, _)| key.starts_with(prefix))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Namespaces that hold anything.
    pub fn namespaces(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    pub fn set(&self, namespace: &str, key: &str, value: Value) -> Result<(), StateError> {
        if key.is_empty() || key.len() > MAX_KEY_LEN {
            return Err(StateError::BadKey);
        }
        let mut all = self.lock();
        let values = all.entry(namespace.to_owned()).or_default();
        let previous = values.insert(key.to_owned(), value);
        let outcome = self.persist(namespace, values);
        if outcome.is_err() {
            // Keep memory and disk in step: undo what could not be saved.
            match previous {
                Some(previous) => values.insert(key.to_owned(), previous),
                None => values.remove(key),
            };
        }
        outcome
    }

    /// Removes a key; true when it was there.
    pub fn delete(&self, namespace: &str, key: &str) -> Result<bool, StateError> {
        let mut all = self.lock();
        let Some(values) = all.get_mut(namespace) else {
            return Ok(false);
        };
        let Some(previous) = values.remove(key) else {
            return Ok(false);
        };
        let outcome = self.persist(namespace, values);
        if outcome.is_err() {
            values.insert(key.to_owned(), previous);
        }
        outcome.map(|()| true)
    }

    fn persist(&self, namespace: &str, values: &BTreeMap<String, Value>) -> Result<(), StateError> {
        let text = serde_json::to_vec(values).map_err(|err| StateError::Persist {
            namespace: namespace.to_owned(),
            source: std::io::Error::other(err),
        })?;
        if text.len() > MAX_NAMESPACE_BYTES {
            return Err(StateError::Full(namespace.to_owned()));
        }
        let Some(dir) = &self.dir else { return Ok(()) };
        let path = dir.join(format!("{namespace}.json"));
        let partial = dir.join(format!(".{namespace}.json.partial"));
        let write = || -> std::io::Result<()> {
            std::fs::write(&partial, &text)?;
            std::fs::rename(&partial, &path)
        };
        write().map_err(|source| StateError::Persist {
            namespace: namespace.to_owned(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn what_is_stored_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        store.set("site", "mode", json!("on")).unwrap();
        store.set("site", "hits/a", json!(1)).unwrap();
        store.set("site", "hits/b", json!(2)).unwrap();
        store.set("health", "ok", json!(true)).unwrap();
        assert!(store.delete("site", "mode").unwrap());
        drop(store);
        let store = StateStore::open(dir.path()).unwrap();
        assert_eq!(store.get("site", "mode"), None);
        assert_eq!(
            store.list("site", "hits/"),
            [("hits/a".into(), json!(1)), ("hits/b".into(), json!(2))]
        );
        assert_eq!(store.get("health", "ok"), Some(json!(true)));
    }

    #[test]
    fn an_oversized_namespace_is_refused_and_nothing_changes() {
        let store = StateStore::in_memory();
        let big = "x".repeat(MAX_NAMESPACE_BYTES);
        assert!(matches!(
            store.set("s", "k", json!(big)),
            Err(StateError::Full(_))
        ));
        assert_eq!(store.get("s", "k"), None);
        assert!(matches!(
            store.set("s", "", json!(1)),
            Err(StateError::BadKey)
        ));
    }
}
