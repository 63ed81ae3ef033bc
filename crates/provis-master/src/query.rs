//! Questions over the fleet's state, now and over time, answered from the
//! registry (roles, facts) and the state index (samples):
//!
//! - `latest`: the expression holds on each minion's latest sample;
//! - `for` a window: it held at every point of the window. Each numeric
//!   field is taken at its lowest and at its highest over the window and the
//!   expression must hold on both: exact for comparisons joined by `&&`
//!   (each holds at its worst point), stricter than needed for `||`. A
//!   minion whose samples cover less than 90% of the window is reported
//!   apart, as "history short", with its coverage;
//! - `any` a window: it held at least once: on the lowest or highest values
//!   of some history bucket.
//!
//! The expression language is `provis call --where`'s.

use std::collections::BTreeMap;

use provis_core::registry::{MinionRecord, MinionStatus};
use provis_core::selection::{Filter, SelectError, Verdict};
use serde_json::Value;

use crate::state_index::StateIndex;

/// Share of a window a minion's samples must cover for `for` to count it.
pub const MIN_COVERAGE_PCT: f64 = 90.0;

pub use provis_core::master_api::{QueryAnswer, QueryMatch, QueryMode, QueryRequest};

/// Answers `request` at `now_ms`; `is_live` says who is live now.
pub fn answer(
    request: &QueryRequest,
    registry: &BTreeMap<String, MinionRecord>,
    index: &StateIndex,
    now_ms: i64,
    is_live: &dyn Fn(&MinionRecord) -> bool,
) -> Result<QueryAnswer, SelectError> {
    let filter = Filter::parse(&request.expression)?;
    let mut ids: Vec<&str> = registry
        .keys()
        .map(String::as_str)
        .chain(index.minions())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let from = now_ms - request.window_ms.max(0);
    let mut matches = Vec::new();
    let mut short_history = Vec::new();
    let mut missing: BTreeMap<String, usize> = BTreeMap::new();
    let mut considered = 0;
    for id in ids {
        let Some(record) = registry.get(id).cloned().or_else(|| bare_record(id)) else {
            continue;
        };
        let latest = index
            .latest(id)
            .map(|s| s.state.clone())
            .unwrap_or_else(|| record.state.clone());
        if latest.is_null() {
            continue; // nothing known of its state yet
        }
        considered += 1;
        let with_state = |state: &Value| MinionRecord {
            state: state.clone(),
            ..record.clone()
        };
        let mut verdict = |state: &Value| -> Result<bool, SelectError> {
            Ok(match filter.evaluate(&with_state(state)) {
                Ok(Verdict::Match) => true,
                Ok(Verdict::NoMatch) => false,
                Ok(Verdict::Missing(field)) => {
                    *missing.entry(field).or_default() += 1;
                    false
                }
                Err(err @ SelectError::UnknownField { .. }) => return Err(err),
                // One minion's odd data must not hide the fleet: no match.
                Err(err) => {
                    tracing::debug!(minion = %record.id, error = %err, "query failed on one minion");
                    false
                }
            })
        };
        let line = |coverage_pct: Option<f64>, note: Option<String>| QueryMatch {
            minion: id.to_owned(),
            live: is_live(&record),
            coverage_pct,
            note,
            state: latest.clone(),
        };
        match request.mode {
            QueryMode::Latest => {
                if verdict(&latest)? {
                    matches.push(line(None, None));
                }
            }
            QueryMode::For => {
                let Some(view) = index.window(id, from, now_ms) else {
                    continue;
                };
                if verdict(&view.low)? && verdict(&view.high)? {
                    if view.coverage_pct >= MIN_COVERAGE_PCT {
                        matches.push(line(Some(view.coverage_pct), None));
                    } else {
                        let reported = humantime::format_duration(std::time::Duration::from_secs(
                            u64::try_from((now_ms - view.first_ms) / 1000).unwrap_or(0),
                        ));
                        let window = humantime::format_duration(std::time::Duration::from_secs(
                            u64::try_from(request.window_ms / 1000).unwrap_or(0),
                        ));
                        short_history.push(line(Some(view.coverage_pct), Some(format!("history short: samples cover {}% of {window} (first {reported} ago)", view.coverage_pct))));
                    }
                }
            }
            QueryMode::Any => {
                let Some(view) = index.window(id, from, now_ms) else {
                    continue;
                };
                // Cheap test on the window's extremes first; then bucket by bucket.
                if !(verdict(&view.low)? || verdict(&view.high)?) {
                    continue;
                }
                let mut held = false;
                for (low, high) in index.buckets(id, from, now_ms) {
                    if verdict(&low)? || verdict(&high)? {
                        held = true;
                        break;
                    }
                }
                if held {
                    matches.push(line(Some(view.coverage_pct), None));
                }
            }
        }
    }
    if matches.is_empty()
        && short_history.is_empty()
        && considered > 0
        && let Some((field, count)) = missing.iter().max_by_key(|(_, count)| **count)
        && *count >= considered
    {
        return Err(SelectError::UnknownField {
            name: field.clone(),
        });
    }
    Ok(QueryAnswer {
        matches,
        short_history,
        considered,
        counters: index.counters(),
    })
}

/// A registry-less record for a minion known only from its samples.
fn bare_record(id: &str) -> Option<MinionRecord> {
    Some(MinionRecord {
        id: id.parse().ok()?,
        hostname: String::new(),
        roles: Vec::new(),
        version: String::new(),
        status: MinionStatus::Stopped,
        started_unix_ms: 0,
        written_unix_ms: 0,
        heartbeat_interval_ms: 0,
        services: BTreeMap::new(),
        facts: Value::Object(Default::default()),
        state: Value::Null,
        grpc_addr: None,
        grpc_tls: false,
        grpc_tls_cert: None,
        public_key: None,
        encryption_key: None,
        encryption_key_signature: None,
        converged_commit: None,
        failing: None,
        overlay_roles: Vec::new(),
    })
}
