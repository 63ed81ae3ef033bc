//! What `reactions.toml` and `schedules.toml` share: a TOML file of named
//! entries that each declare a call, checked with the commit against the
//! services it has, every problem naming its line.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use provis_core::CallRequest;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::repository::RepositoryProblem;

/// The 1-based line of the first line of `text` holding `needle` (0: none).
pub fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|line| line.contains(needle))
        .map_or(0, |at| at + 1)
}

/// `call` (`service.method`) with `args` and a timeout of `timeout_s`
/// (1 s to an hour), checked against `methods` (service → its methods;
/// the built-in `sys` is always there); why not, without a line.
pub fn check_call(
    call: &str,
    args: Option<&Value>,
    timeout_s: u64,
    methods: &BTreeMap<String, Vec<String>>,
) -> Result<CallRequest, String> {
    let request = CallRequest::parse_function(
        call,
        args.cloned().unwrap_or(Value::Null),
        Duration::from_secs(timeout_s.clamp(1, 3600)),
    )
    .map_err(|err| format!("call {call:?}: {err}"))?;
    if request.service == "sys" {
        return Ok(request);
    }
    match methods.get(&request.service) {
        None => Err(format!(
            "calls {call:?}: no service {:?} in services/",
            request.service
        )),
        Some(known) if !known.contains(&request.method) => Err(format!(
            "calls {call:?}: {} has no method {:?} (it has: {})",
            request.service,
            request.method,
            known.join(", ")
        )),
        Some(_) => Ok(request),
    }
}

/// The methods a call checked with its commit may assume: its own.
pub fn assumed_methods(call: &str) -> BTreeMap<String, Vec<String>> {
    call.split_once('.')
        .map(|(service, method)| BTreeMap::from([(service.to_owned(), vec![method.to_owned()])]))
        .unwrap_or_default()
}

/// Reads `file` under `root` (absent: nothing) as `F`, whose entries
/// `entries` takes out; each entry's name (`name_of`) must be unique, and
/// `check` says what else is wrong (naming the line in the text it is
/// given). Problems go to `problems` under the file's name.
pub fn load<F: DeserializeOwned, T>(
    root: &std::path::Path,
    file: &str,
    kind: &str,
    entries: impl FnOnce(F) -> Vec<T>,
    name_of: impl Fn(&T) -> &str,
    check: impl Fn(&T, &str) -> Result<(), String>,
    problems: &mut Vec<RepositoryProblem>,
) -> Vec<T> {
    let Ok(text) = std::fs::read_to_string(root.join(file)) else {
        return Vec::new();
    };
    let mut problem = |reason: String| {
        problems.push(RepositoryProblem {
            file: file.to_owned(),
            reason,
        });
    };
    let parsed: F = match toml::from_str(&text) {
        Ok(parsed) => parsed,
        Err(err) => {
            problem(err.to_string());
            return Vec::new();
        }
    };
    let entries = entries(parsed);
    let mut names = BTreeSet::new();
    for entry in &entries {
        let name = name_of(entry);
        if !names.insert(name.to_owned()) {
            problem(format!(
                "line {}: {kind} {name:?} is named twice",
                line_of(&text, &format!("\"{name}\""))
            ));
        }
        if let Err(reason) = check(entry, &text) {
            problem(reason);
        }
    }
    entries
}
