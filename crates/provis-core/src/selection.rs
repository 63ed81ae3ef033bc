//! Choosing minions: who a call (or a listing) is about, from one snapshot of
//! the registry, without asking any minion.
//!
//! A selection is the live members of a target, narrowed by a `--where`
//! expression (CEL) over what the registry knows of each minion, then cut to
//! `--percent` or `--count` of them, at random or stably with `--seed`.
//!
//! Expressions see: `id` (string), `roles` (list of strings), `facts` and
//! `state` (maps; see the minion's `machine` module for their fields),
//! `labels` (map, the same as `facts.labels`) and `services` (map of name to
//! version). For example `state.mem.free_pct < 10 && "web" in roles`.
//! A field no minion has is an error naming it; a field only some minions
//! have makes the others not match (test with `has(facts.labels.team)`).

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::presence::Liveness;
use crate::registry::MinionRecord;
use crate::subject::{CallTarget, MinionId};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SelectError {
    #[error("--where {expression:?} does not parse: {reason}")]
    Parse { expression: String, reason: String },
    #[error(
        "--where names {name:?}, which no selected minion has (expressions see id, roles, facts, state, labels, services)"
    )]
    UnknownField { name: String },
    #[error("--where {expression:?} failed on {minion}: {reason}")]
    Evaluation {
        expression: String,
        minion: String,
        reason: String,
    },
    #[error("--where {expression:?} must be true or false, but gave {got} on {minion}")]
    NotBoolean {
        expression: String,
        minion: String,
        got: String,
    },
    #[error("--percent must be more than 0 and at most 100, not {0}")]
    BadPercent(f64),
    #[error("--count must be at least 1")]
    BadCount,
}

/// A compiled `--where` expression.
#[derive(Debug)]
pub struct Filter {
    source: String,
    program: cel::Program,
}

impl Filter {
    pub fn parse(expression: &str) -> Result<Self, SelectError> {
        let program = cel::Program::compile(expression).map_err(|err| SelectError::Parse {
            expression: expression.to_owned(),
            reason: err.to_string().replace("ERROR: <input>:", "at "),
        })?;
        Ok(Self {
            source: expression.to_owned(),
            program,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether `record` matches; `Missing(field)` when the expression reads a
    /// field this minion does not have.
    pub fn evaluate(&self, record: &MinionRecord) -> Result<Verdict, SelectError> {
        self.evaluate_with_state(record, &record.state)
    }

    /// Like [`Self::evaluate`], with `state` in place of the record's
    /// summary (a master's latest sample, say).
    pub fn evaluate_with_state(
        &self,
        record: &MinionRecord,
        state: &Value,
    ) -> Result<Verdict, SelectError> {
        let mut context = cel::Context::default();
        let variables = [
            ("id", json!(record.id)),
            ("roles", json!(record.roles)),
            ("facts", record.facts.clone()),
            ("state", state.clone()),
            (
                "labels",
                record
                    .facts
                    .get("labels")
                    .cloned()
                    .unwrap_or_else(|| json!({})),
            ),
            ("services", json!(record.services)),
        ];
        for (name, value) in variables {
            let value = cel::to_value(value).map_err(|err| self.failed(record, err.to_string()))?;
            context.add_variable_from_value(name, value);
        }
        match self.program.execute(&context) {
            Ok(cel::Value::Bool(true)) => Ok(Verdict::Match),
            Ok(cel::Value::Bool(false)) => Ok(Verdict::NoMatch),
            Ok(other) => Err(SelectError::NotBoolean {
                expression: self.source.clone(),
                minion: record.id.to_string(),
                got: format!("{other:?}"),
            }),
            Err(cel::ExecutionError::NoSuchKey(name)) => Ok(Verdict::Missing(name.to_string())),
            Err(cel::ExecutionError::UndeclaredReference(name)) => Err(SelectError::UnknownField {
                name: name.to_string(),
            }),
            Err(err) => Err(self.failed(record, err.to_string())),
        }
    }

    fn failed(&self, record: &MinionRecord, reason: String) -> SelectError {
        SelectError::Evaluation {
            expression: self.source.clone(),
            minion: record.id.to_string(),
            reason,
        }
    }
}

/// One minion's answer to a filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Match,
    NoMatch,
    /// The expression read a field this minion does not have.
    Missing(String),
}

/// How many of the matching minions to take.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pick {
    All,
    /// This share, rounded up, at least one.
    Percent(f64),
    Count(usize),
}

impl Pick {
    pub fn check(self) -> Result<Self, SelectError> {
        match self {
            Self::Percent(p) if !(p > 0.0 && p <= 100.0) => Err(SelectError::BadPercent(p)),
            Self::Count(0) => Err(SelectError::BadCount),
            other => Ok(other),
        }
    }

    fn take(self, matched: usize) -> usize {
        match self {
            Self::All => matched,
            Self::Percent(p) => ((matched as f64 * p / 100.0).ceil() as usize)
                .clamp(1, matched.max(1))
                .min(matched),
            Self::Count(n) => n.min(matched),
        }
    }
}

/// Who was selected, and the numbers that say why.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Selection {
    /// Selected minions, sorted by id.
    pub chosen: Vec<MinionId>,
    /// Live members of the target.
    pub live: usize,
    /// Of those, how many the filter matched.
    pub matched: usize,
    /// Fields the filter read that some minions lack, with how many lack each.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub missing_fields: BTreeMap<String, usize>,
    /// One line: target, filter, pick.
    pub reason: String,
    /// True when a `--where` filter chose: then the call must name its
    /// minions, since a minion the registry does not list was never checked.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub filtered: bool,
    /// The reply-signing keys of the chosen minions that have one.
    #[serde(skip)]
    pub keys: BTreeMap<String, String>,
    /// Why the registry could not say who all should answer (it could not
    /// be read, or no member has a recent heartbeat): a call to a whole
    /// role or the fleet goes out anyway and reports whoever answers within
    /// its timeout. None when it could.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uncertain: Option<String>,
    /// Members of the target whose heartbeat is late (a server of a cluster
    /// died, say): a call to the whole target reaches them too, and their
    /// replies count, but nobody waits for them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub late: Vec<MinionId>,
}

impl Selection {
    /// Every member of `target`, whoever they are: the registry could not
    /// be read (`why`), so the call reports whoever answers.
    pub fn whoever_answers(target: &CallTarget, why: String) -> Self {
        Self {
            chosen: Vec::new(),
            live: 0,
            matched: 0,
            missing_fields: BTreeMap::new(),
            reason: format!(
                "{}: the registry could not be read ({why}); whoever answers in time is reported",
                target.describe()
            ),
            filtered: false,
            keys: BTreeMap::new(),
            uncertain: Some(why),
            late: Vec::new(),
        }
    }
}

/// What a selection knows of each record beyond the record itself.
pub trait RecordView {
    /// Whether the record's minion should answer now.
    fn liveness(&self, record: &MinionRecord) -> Liveness;
    /// The state `--where` expressions see: the record's summary, unless
    /// the viewer knows a fresher sample.
    fn state<'r>(&'r self, record: &'r MinionRecord) -> &'r Value {
        &record.state
    }
}

/// The view of a caller with nothing but the registry: records are taken
/// at their word (online is live).
#[derive(Debug, Clone, Copy, Default)]
pub struct ByStatus;

impl RecordView for ByStatus {
    fn liveness(&self, record: &MinionRecord) -> Liveness {
        crate::presence::liveness_by_status(record)
    }
}

/// Selects from `records` (one snapshot of the registry) as `view` sees
/// them. With `seed`, the same seed picks the same minions from the same
/// fleet, and adding or removing a minion changes the pick by at most that
/// minion.
pub fn select<'a>(
    records: impl IntoIterator<Item = &'a MinionRecord>,
    target: &CallTarget,
    filter: Option<&Filter>,
    pick: Pick,
    seed: Option<u64>,
    view: &impl RecordView,
) -> Result<Selection, SelectError> {
    let pick = pick.check()?;
    let mut live: Vec<&MinionRecord> = Vec::new();
    let mut late: Vec<&MinionRecord> = Vec::new();
    // Minions named one by one are called whatever their record says; a
    // reply in their name is checked against their key all the same.
    let mut named_keys: BTreeMap<String, String> = BTreeMap::new();
    for record in records {
        if !record.is_addressed_by(target) {
            continue;
        }
        if let (CallTarget::Minions(_), Some(key)) = (target, &record.public_key) {
            named_keys.insert(record.id.to_string(), key.clone());
        }
        match view.liveness(record) {
            Liveness::Live => live.push(record),
            Liveness::Late => late.push(record),
            Liveness::Gone => {}
        }
    }
    let mut matched = Vec::new();
    let mut missing_fields: BTreeMap<String, usize> = BTreeMap::new();
    let mut failures = Vec::new();
    for record in &live {
        let verdict = match filter {
            None => Verdict::Match,
            // A name no minion can have is the expression's fault: stop.
            Some(filter) => match filter.evaluate_with_state(record, view.state(record)) {
                Err(err @ SelectError::UnknownField { .. }) => return Err(err),
                // One minion's odd data (a string where a number was meant)
                // must not hide the rest of the fleet: it just does not match.
                Err(err) => {
                    failures.push(err);
                    continue;
                }
                Ok(verdict) => verdict,
            },
        };
        match verdict {
            Verdict::Match => matched.push(*record),
            Verdict::NoMatch => {}
            Verdict::Missing(field) => *missing_fields.entry(field).or_default() += 1,
        }
    }
    if matched.is_empty() && !live.is_empty() && failures.len() == live.len() {
        return Err(failures.swap_remove(0));
    }
    if matched.is_empty()
        && !live.is_empty()
        && let Some((field, count)) = missing_fields.iter().next()
        && *count == live.len()
    {
        return Err(SelectError::UnknownField {
            name: field.clone(),
        });
    }
    let matched_count = matched.len();
    let take = pick.take(matched_count);
    if take < matched_count {
        let seed = seed.unwrap_or_else(random_seed);
        matched.sort_by_cached_key(|record| rank(seed, record.id.as_str()));
        matched.truncate(take);
    }
    // Only a call to the whole target reaches its late members too.
    if filter.is_some() || pick != Pick::All {
        late.clear();
    }
    let mut keys = named_keys;
    keys.extend(
        matched
            .iter()
            .chain(&late)
            .filter_map(|r| Some((r.id.to_string(), r.public_key.clone()?))),
    );
    let mut chosen: Vec<MinionId> = matched.iter().map(|r| r.id.clone()).collect();
    chosen.sort();
    let mut late: Vec<MinionId> = late.iter().map(|r| r.id.clone()).collect();
    late.sort();
    let mut reason = format!("{} live in {}", live.len(), target.describe());
    if !late.is_empty() {
        reason.push_str(&format!(" ({} late, answering if they can)", late.len()));
    }
    let uncertain = (chosen.is_empty() && !late.is_empty()).then(|| {
        format!(
            "no member of {} has a recent heartbeat; {} late",
            target.describe(),
            late.len()
        )
    });
    if let Some(filter) = filter {
        reason.push_str(&format!(", {matched_count} where {}", filter.source()));
    }
    match pick {
        Pick::All => {}
        Pick::Percent(p) => reason.push_str(&format!(", {p}% of them: {}", chosen.len())),
        Pick::Count(n) => reason.push_str(&format!(", {n} of them: {}", chosen.len())),
    }
    if seed.is_some() && pick != Pick::All {
        reason.push_str(" (stable pick)");
    }
    Ok(Selection {
        uncertain,
        late,
        live: live.len(),
        matched: matched_count,
        chosen,
        missing_fields,
        reason,
        filtered: filter.is_some(),
        keys,
    })
}

fn random_seed() -> u64 {
    let bytes = uuid::Uuid::new_v4();
    let mut seed = [0u8; 8];
    seed.copy_from_slice(&bytes.as_bytes()[..8]);
    u64::from_le_bytes(seed)
}

/// A position for `id` in the order `seed` defines: sha256(seed, id).
fn rank(seed: u64, id: &str) -> Vec<u8> {
    let mut input = seed.to_le_bytes().to_vec();
    input.extend_from_slice(id.as_bytes());
    ring::digest::digest(&ring::digest::SHA256, &input)
        .as_ref()
        .to_vec()
}

/// The fields of a record as expressions see them, for `provis minions --output json`.
pub fn expression_view(record: &MinionRecord) -> Value {
    json!({
        "id": record.id,
        "roles": record.roles,
        "facts": record.facts,
        "state": record.state,
        "services": record.services,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::MinionStatus;

    fn minion(id: &str, roles: &[&str], free_pct: f64, team: Option<&str>) -> MinionRecord {
        let mut labels = serde_json::Map::new();
        if let Some(team) = team {
            labels.insert("team".into(), json!(team));
        }
        MinionRecord {
            id: id.parse().unwrap(),
            hostname: id.into(),
            roles: roles.iter().map(|r| r.parse().unwrap()).collect(),
            version: "0".into(),
            status: MinionStatus::Online,
            started_unix_ms: 0,
            written_unix_ms: 1_000,
            heartbeat_interval_ms: 1_000,
            services: [("sys".to_owned(), "0".to_owned())].into(),
            facts: json!({ "os": "debian", "mem_total_mb": 8000, "labels": labels }),
            state: json!({ "mem": { "free_pct": free_pct } }),
            grpc_addr: None,
            grpc_tls: false,
            grpc_tls_cert: None,
            public_key: None,
            encryption_key: None,
            encryption_key_signature: None,
            converged_commit: None,
            failing: None,
            overlay_roles: Vec::new(),
        }
    }

    fn fleet(n: usize) -> Vec<MinionRecord> {
        (0..n)
            .map(|i| minion(&format!("m{i}"), &["web.eu"], i as f64, None))
            .collect()
    }

    const ALL: CallTarget = CallTarget::All;

    #[test]
    fn where_filters_over_state_facts_and_roles() {
        let records = fleet(20);
        let filter =
            Filter::parse("state.mem.free_pct < 5.0 && 'web.eu' in roles && facts.os == 'debian'")
                .unwrap();
        let selection = select(&records, &ALL, Some(&filter), Pick::All, None, &ByStatus).unwrap();
        assert_eq!(selection.chosen.len(), 5);
        assert_eq!((selection.live, selection.matched), (20, 5));
        assert!(selection.reason.contains("5 where"), "{}", selection.reason);
    }

    #[test]
    fn percent_and_count_pick_exactly_that_many() {
        let records = fleet(10);
        let pick = |p| {
            select(&records, &ALL, None, p, Some(7), &ByStatus)
                .unwrap()
                .chosen
                .len()
        };
        assert_eq!(pick(Pick::Percent(30.0)), 3);
        assert_eq!(pick(Pick::Percent(1.0)), 1, "at least one when P > 0");
        assert_eq!(pick(Pick::Percent(100.0)), 10);
        assert_eq!(pick(Pick::Count(4)), 4);
        assert_eq!(pick(Pick::Count(40)), 10);
        assert!(matches!(
            select(&records, &ALL, None, Pick::Percent(0.0), None, &ByStatus),
            Err(SelectError::BadPercent(_))
        ));
        assert!(matches!(
            select(&records, &ALL, None, Pick::Percent(150.0), None, &ByStatus),
            Err(SelectError::BadPercent(_))
        ));
        assert!(matches!(
            select(&records, &ALL, None, Pick::Count(0), None, &ByStatus),
            Err(SelectError::BadCount)
        ));
    }

    #[test]
    fn a_seed_picks_stably_even_as_the_fleet_changes() {
        let records = fleet(50);
        let a = select(&records, &ALL, None, Pick::Count(10), Some(42), &ByStatus)
            .unwrap()
            .chosen;
        let b = select(&records, &ALL, None, Pick::Count(10), Some(42), &ByStatus)
            .unwrap()
            .chosen;
        assert_eq!(a, b);
        let other = select(&records, &ALL, None, Pick::Count(10), Some(43), &ByStatus)
            .unwrap()
            .chosen;
        assert_ne!(a, other);
        // One more minion changes the pick by at most one.
        let mut grown = records.clone();
        grown.push(minion("extra", &["web"], 50.0, None));
        let c = select(&grown, &ALL, None, Pick::Count(10), Some(42), &ByStatus)
            .unwrap()
            .chosen;
        assert!(a.iter().filter(|id| !c.contains(id)).count() <= 1);
    }

    #[test]
    fn unknown_fields_and_bad_expressions_are_clear_errors() {
        let records = fleet(3);
        let err = Filter::parse("state.mem.free_pct <").unwrap_err();
        assert!(matches!(err, SelectError::Parse { .. }), "{err}");
        let unknown = Filter::parse("state.mem.nosuch < 10.0").unwrap();
        let err = select(&records, &ALL, Some(&unknown), Pick::All, None, &ByStatus).unwrap_err();
        assert_eq!(
            err,
            SelectError::UnknownField {
                name: "nosuch".into()
            }
        );
        let undeclared = Filter::parse("stat.mem.free_pct < 10.0").unwrap();
        let err = select(
            &records,
            &ALL,
            Some(&undeclared),
            Pick::All,
            None,
            &ByStatus,
        )
        .unwrap_err();
        assert!(err.to_string().contains("\"stat\""), "{err}");
        let not_bool = Filter::parse("state.mem.free_pct").unwrap();
        assert!(matches!(
            select(&records, &ALL, Some(&not_bool), Pick::All, None, &ByStatus),
            Err(SelectError::NotBoolean { .. })
        ));
    }

    #[test]
    fn a_field_only_some_minions_have_matches_those() {
        let records = vec![
            minion("a", &["web"], 1.0, Some("pay")),
            minion("b", &["web"], 1.0, None),
        ];
        let filter = Filter::parse("labels.team == 'pay'").unwrap();
        let selection = select(&records, &ALL, Some(&filter), Pick::All, None, &ByStatus).unwrap();
        assert_eq!(selection.chosen, vec!["a".parse::<MinionId>().unwrap()]);
        assert_eq!(selection.missing_fields.get("team"), Some(&1));
        let guarded = Filter::parse("has(labels.team) && labels.team == 'pay'").unwrap();
        assert_eq!(
            select(&records, &ALL, Some(&guarded), Pick::All, None, &ByStatus)
                .unwrap()
                .chosen
                .len(),
            1
        );
    }
}
