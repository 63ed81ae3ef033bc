//! `reactions.toml`: calls the leading master makes because something
//! happened. Each reaction names an event type, an optional CEL condition
//! over the event, and a call: on the event's own minion (`target =
//! "source"`) or on a subject (`role.web`, `all`).
//!
//! ```toml
//! [[reaction]]
//! name = "restart-vault"
//! on = "service.failed"                       # the event's type; `*` matches one token
//! when = 'event.data.service == "vault"'      # CEL over `event` (optional)
//! call = "vault.restart"
//! args = { why = "it failed to load" }        # optional
//! target = "source"                           # or: subject = "role.web"
//! # where = "facts.os == 'debian'"             # with a subject: among them (CEL)
//! # percent = 50                               # with a subject: a share of them
//! timeout_s = 10                              # default 10
//! rate = { count = 3, per_s = 60 }            # at most 3 runs a minute (the default)
//! ```
//!
//! Each run is a call, so it is a job (its caller is `reaction:<name>`),
//! and it is announced as a `reaction.ran` event. An event is acted on
//! once (by its id). A run over the rate limit is skipped and told once
//! per window as `reaction.limited`. A reaction never reacts to the
//! reactor's own events (`reaction.*`), nor to the job events of its own
//! calls. Only the leader acts; every master checks the file with the
//! commit.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use provis_core::event::CloudEvent;
use provis_core::{CallRequest, CallTarget, MinionId, Subjects};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::declared_calls::{assumed_methods, check_call, line_of};
use crate::repository::RepositoryProblem;

/// The file's name in a config repository.
pub const REACTIONS_FILE: &str = "reactions.toml";

/// How long event ids are remembered, so a redelivered event runs nothing twice.
const SEEN_FOR: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReactionsFile {
    #[serde(default)]
    pub reaction: Vec<ReactionSpec>,
}

/// One reaction as the file says it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReactionSpec {
    pub name: String,
    /// Event type, short (`service.failed`) or full (`io.provis.service.failed`).
    pub on: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
    /// `service.method`.
    pub call: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Value>,
    /// `source`: the minion the event is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// A call subject (`role.web`, `minion.m1`, `all`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// With a subject: only the minions this CEL expression holds for.
    #[serde(default, rename = "where", skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    /// With a subject: this share of them (1 to 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u32>,
    #[serde(default = "default_timeout_s")]
    pub timeout_s: u64,
    #[serde(default)]
    pub rate: Rate,
}

fn default_timeout_s() -> u64 {
    10
}

/// At most `count` runs in any `per_s` seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    pub count: u32,
    pub per_s: u64,
}

impl Default for Rate {
    fn default() -> Self {
        Self {
            count: 3,
            per_s: 60,
        }
    }
}

/// Where a reaction's call goes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ReactionTarget {
    Source,
    Subject(CallTarget),
}

/// A reaction ready to run: its condition compiled, its call checked.
#[derive(Debug)]
pub struct Reaction {
    spec: ReactionSpec,
    pattern: wildmatch::WildMatch,
    condition: Option<cel::Program>,
    request: CallRequest,
    target: ReactionTarget,
    filter: Option<provis_core::selection::Filter>,
    pick: provis_core::selection::Pick,
}

impl Reaction {
    /// Checks `spec` against the repository's services (`methods`: service →
    /// its methods); says what is wrong, naming the line of `text`.
    fn compile(
        spec: &ReactionSpec,
        text: &str,
        methods: &BTreeMap<String, Vec<String>>,
    ) -> Result<Self, String> {
        let at = line_of(text, &format!("\"{}\"", spec.name));
        let line = |needle: &str| {
            let found = line_of(text, needle);
            if found == 0 { at } else { found }
        };
        let problem =
            |line: usize, what: String| format!("line {line}: reaction {:?}: {what}", spec.name);
        let fail = |line: usize, what: String| Err(problem(line, what));
        if spec.name.parse::<MinionId>().is_err() {
            return fail(
                at,
                "a name is lowercase letters, digits, '-' and '_'".into(),
            );
        }
        let short = spec.on.strip_prefix("io.provis.").unwrap_or(&spec.on);
        let well_formed = !short.is_empty()
            && short
                .split('.')
                .all(|t| t == "*" || t.parse::<MinionId>().is_ok());
        if !well_formed {
            return fail(
                line(&spec.on),
                format!(
                    "on = {:?} is not an event type (tokens of [a-z0-9_-], or *)",
                    spec.on
                ),
            );
        }
        if short.starts_with("reaction.") {
            return fail(line(&spec.on), "reactions do not react to reactions".into());
        }
        let condition = match &spec.when {
            None => None,
            Some(when) => Some(cel::Program::compile(when).map_err(|err| {
                format!(
                    "line {}: reaction {:?}: when is not CEL: {}",
                    line(when),
                    spec.name,
                    err.to_string().replace("ERROR: <input>:", "at ")
                )
            })?),
        };
        let request = check_call(&spec.call, spec.args.as_ref(), spec.timeout_s, methods)
            .map_err(|what| problem(line(&spec.call), what))?;
        let target = match (spec.target.as_deref(), spec.subject.as_deref()) {
            (Some("source"), None) => ReactionTarget::Source,
            (None, Some(subject)) => ReactionTarget::Subject(
                CallTarget::parse_subject(subject)
                    .map_err(|err| problem(line(subject), format!("subject {subject:?}: {err}")))?,
            ),
            _ => {
                return fail(
                    at,
                    "say where the call goes: target = \"source\" or subject = \"role.…\"".into(),
                );
            }
        };
        let selecting = spec.filter.is_some() || spec.percent.is_some();
        if selecting && target == ReactionTarget::Source {
            return fail(
                at,
                "where and percent choose among a subject's minions, not the source".into(),
            );
        }
        let filter = match &spec.filter {
            None => None,
            Some(expression) => Some(
                provis_core::selection::Filter::parse(expression)
                    .map_err(|err| problem(line(expression), format!("where: {err}")))?,
            ),
        };
        let pick = match spec.percent {
            None => provis_core::selection::Pick::All,
            Some(percent @ 1..=100) => provis_core::selection::Pick::Percent(f64::from(percent)),
            Some(other) => return fail(line("percent"), format!("percent {other}: 1 to 100")),
        };
        if spec.rate.count == 0 || spec.rate.per_s == 0 {
            return fail(line("rate"), "rate needs a count and per_s above 0".into());
        }
        Ok(Self {
            pattern: wildmatch::WildMatch::new(short),
            spec: spec.clone(),
            condition,
            request,
            target,
            filter,
            pick,
        })
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Whether `event` triggers this reaction; a condition that cannot be
    /// evaluated on it (a missing field) does not.
    fn matches(&self, event: &CloudEvent) -> bool {
        if !self.pattern.matches(event.short_kind()) {
            return false;
        }
        let Some(condition) = &self.condition else {
            return true;
        };
        let Ok(value) = cel::to_value(json!(event)) else {
            return false;
        };
        let mut context = cel::Context::default();
        context.add_variable_from_value("event", value);
        matches!(condition.execute(&context), Ok(cel::Value::Bool(true)))
    }
}

/// Reads `reactions.toml` under `root` (none: no reactions); what is wrong
/// goes to `problems`, each naming its line.
pub fn load(
    root: &std::path::Path,
    methods: &BTreeMap<String, Vec<String>>,
    problems: &mut Vec<RepositoryProblem>,
) -> Vec<ReactionSpec> {
    crate::declared_calls::load(
        root,
        REACTIONS_FILE,
        "reaction",
        |file: ReactionsFile| file.reaction,
        |spec| spec.name.as_str(),
        |spec, text| Reaction::compile(spec, text, methods).map(drop),
        problems,
    )
}

/// Runs a reaction's calls and remembers what it must not do twice.
#[derive(Debug)]
struct Limiter {
    runs: VecDeque<Instant>,
    /// When it last told that it was limited.
    told: Option<Instant>,
}

/// What the reactor needs from its master.
#[derive(Debug, Clone)]
pub struct Reactor {
    pub nats: async_nats::Client,
    pub subjects: Subjects,
    /// Calls as the master (signed by it); each run names its reaction.
    pub client: provis_core::Client,
    /// Where `reaction.*` events go.
    pub outbox: provis_core::outbox::Outbox,
    pub leadership: crate::leadership::Leadership,
    /// Whom a call on a subject reaches is chosen from this master's view.
    pub view: Arc<crate::fleet_view::FleetView>,
}

/// Reacts to events while this master leads, with the applied commit's
/// reactions (`reactions`), until `stop`.
pub async fn run(
    reactor: Reactor,
    mut reactions: watch::Receiver<Vec<ReactionSpec>>,
    stop: tokio_util::sync::CancellationToken,
) {
    let Reactor {
        nats,
        subjects,
        client,
        outbox,
        leadership,
        view,
    } = reactor;
    let mut events = match nats.subscribe(subjects.wildcard("event")).await {
        Ok(events) => events,
        Err(err) => {
            tracing::error!(error = %err, "reactions cannot follow events; none will run");
            return;
        }
    };
    let compile = |specs: &[ReactionSpec]| -> Vec<Arc<Reaction>> {
        specs
            .iter()
            .filter_map(|spec| Reaction::compile_checked(spec).map(Arc::new))
            .collect()
    };
    let mut active = compile(&reactions.borrow_and_update());
    let seen: moka::sync::Cache<String, ()> = moka::sync::Cache::builder()
        .max_capacity(100_000)
        .time_to_live(SEEN_FOR)
        .build();
    let mut limits: HashMap<String, Limiter> = HashMap::new();
    loop {
        let message = tokio::select! {
            () = stop.cancelled() => return,
            changed = reactions.changed() => {
                if changed.is_err() {
                    return;
                }
                active = compile(&reactions.borrow_and_update());
                limits.retain(|name, _| active.iter().any(|r| r.name() == name));
                continue;
            }
            message = events.next() => match message {
                Some(message) => message,
                None => return,
            },
        };
        if active.is_empty() || leadership.term().is_none() {
            continue;
        }
        let Ok(event) = serde_json::from_slice::<CloudEvent>(&message.payload) else {
            continue;
        };
        // Its own doings are no news: the reactor's events, and the job
        // events of the calls reactions made.
        let caller = event.data["caller"].as_str().unwrap_or_default();
        if event.short_kind().starts_with("reaction.") || caller.starts_with("reaction:") {
            continue;
        }
        if seen.contains_key(&event.id) {
            continue;
        }
        seen.insert(event.id.clone(), ());
        for reaction in active.iter().filter(|r| r.matches(&event)) {
            let now = Instant::now();
            let limiter = limits.entry(reaction.name().to_owned()).or_insert(Limiter {
                runs: VecDeque::new(),
                told: None,
            });
            let window = Duration::from_secs(reaction.spec.rate.per_s);
            while limiter
                .runs
                .front()
                .is_some_and(|at| now.duration_since(*at) >= window)
            {
                limiter.runs.pop_front();
            }
            if limiter.runs.len() >= reaction.spec.rate.count as usize {
                if limiter
                    .told
                    .is_none_or(|at| now.duration_since(at) >= window)
                {
                    limiter.told = Some(now);
                    let data = json!({
                        "reaction": reaction.name(),
                        "event": event.id,
                        "rate": reaction.spec.rate,
                    });
                    provis_core::event::emit(
                        &outbox,
                        &subjects,
                        "master",
                        "reaction.limited",
                        data,
                    );
                }
                tracing::warn!(reaction = reaction.name(), event = %event.id, "reaction over its rate limit; skipped");
                continue;
            }
            limiter.runs.push_back(now);
            let target = match &reaction.target {
                ReactionTarget::Subject(target) => target.clone(),
                ReactionTarget::Source => match event.subject.parse::<MinionId>() {
                    Ok(minion) if event.subject != "master" => CallTarget::Minions(vec![minion]),
                    _ => continue, // not about a minion: nothing to call
                },
            };
            let (reaction, event_id, outbox, subjects) = (
                reaction.clone(),
                event.id.clone(),
                outbox.clone(),
                subjects.clone(),
            );
            let client = client
                .clone()
                .with_caller(format!("reaction:{}", reaction.name()));
            let selection = view.select(&target, reaction.filter.as_ref(), reaction.pick, None);
            tokio::spawn(async move {
                let outcome = match selection {
                    Ok(selection) => client
                        .call_selected(
                            &target,
                            &selection,
                            &reaction.request,
                            &provis_core::client::CallPlan::default(),
                            &mut |_| {},
                        )
                        .await
                        .map_err(|err| provis_core::error_chain(&err)),
                    Err(err) => Err(err.to_string()),
                };
                let data = match &outcome {
                    Ok(report) => json!({
                        "reaction": reaction.name(),
                        "event": event_id,
                        "call": reaction.spec.call,
                        "job": report.job,
                        "ok": report.summary.ok,
                        "error": report.summary.error,
                        "no_reply": report.summary.no_reply,
                    }),
                    Err(err) => json!({
                        "reaction": reaction.name(),
                        "event": event_id,
                        "call": reaction.spec.call,
                        "failed": err,
                    }),
                };
                provis_core::event::emit(&outbox, &subjects, "master", "reaction.ran", data);
            });
        }
    }
}

impl Reaction {
    /// [`Self::compile`] for a spec the commit's check passed already (its
    /// service and method were checked against the commit's services then).
    fn compile_checked(spec: &ReactionSpec) -> Option<Self> {
        let methods = assumed_methods(&spec.call);
        Reaction::compile(spec, "", &methods)
            .inspect_err(|err| {
                tracing::error!(reaction = %spec.name, error = %err, "reaction does not compile");
            })
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(text: &str) -> Result<Reaction, String> {
        let file: ReactionsFile = toml::from_str(text).unwrap();
        let methods = BTreeMap::from([("vault".to_owned(), vec!["restart".to_owned()])]);
        Reaction::compile(&file.reaction[0], text, &methods)
    }

    #[test]
    fn each_bad_field_names_its_line() {
        let base =
            "[[reaction]]\nname = \"r\"\non = \"service.failed\"\ncall = \"vault.restart\"\n";
        assert!(compile(&format!("{base}target = \"source\"\n")).is_ok());
        assert!(
            compile(&format!(
                "{base}subject = \"role.web\"\nwhere = 'facts.os == \"debian\"'\npercent = 50\n"
            ))
            .is_ok()
        );
        let err = compile(&format!(
            "{base}target = \"source\"\nwhen = 'event.data =='\n"
        ))
        .unwrap_err();
        assert!(
            err.starts_with("line 6: reaction \"r\": when is not CEL"),
            "{err}"
        );
        let err = compile(&format!(
            "{base}target = \"source\"\nwhere = 'id == \"m1\"'\n"
        ))
        .unwrap_err();
        assert!(err.contains("not the source"), "{err}");
        let err = compile(&format!("{base}subject = \"role.web\"\nwhere = 'id =='\n")).unwrap_err();
        assert!(err.starts_with("line 6: reaction \"r\": where"), "{err}");
        let err = compile("[[reaction]]\nname = \"r\"\non = \"reaction.ran\"\ncall = \"vault.restart\"\ntarget = \"source\"\n").unwrap_err();
        assert!(err.contains("do not react to reactions"), "{err}");
        let err = compile(
            "[[reaction]]\nname = \"r\"\non = \"service.failed\"\ncall = \"vault.restart\"\n",
        )
        .unwrap_err();
        assert!(err.contains("say where the call goes"), "{err}");
    }

    #[test]
    fn events_match_by_type_and_condition() {
        let reaction = compile("[[reaction]]\nname = \"r\"\non = \"service.*\"\nwhen = 'event.data.service == \"vault\"'\ncall = \"vault.restart\"\ntarget = \"source\"\n").unwrap();
        let event =
            |kind: &str, service: &str| CloudEvent::new("m1", kind, json!({ "service": service }));
        assert!(reaction.matches(&event("service.failed", "vault")));
        assert!(!reaction.matches(&event("service.failed", "site")));
        assert!(!reaction.matches(&event("minion.online", "vault")));
        // A field the event lacks: no match, no error.
        assert!(!reaction.matches(&CloudEvent::new("m1", "service.failed", json!({}))));
    }
}
