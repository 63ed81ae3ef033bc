//! `schedules.toml`: calls the leading master makes on a clock.
//!
//! ```toml
//! [[schedule]]
//! name = "rotate-logs"
//! cron = "0 3 * * *"              # minute hour day month weekday (a 6th field first: seconds)
//! timezone = "Europe/Vienna"      # an IANA zone (the system's tzdb); default UTC
//! # every = "30s"                 # or an interval, instead of cron
//! subject = "role.web"            # whom: role.X, minion.X or all (the default)
//! where = "facts.os == 'debian'"  # and among them, optionally
//! percent = 50                    # a share of them, optionally
//! call = "site.rotate"
//! args = { keep = 7 }
//! concurrency = 5                 # at most 5 minions run it at once (default: all)
//! jitter_s = 30                   # wait up to 30 s, at random, before each run
//! missed = "skip"                 # slots missed while no master led: skip, or run-once
//! timeout_s = 60
//! ```
//!
//! Every master ticks; the leader takes each slot by comparing-and-setting
//! the schedule's state in the config bucket (`schedule.<name>`), so of
//! several masters, and across a failover, exactly one takes each slot.
//! Each run is a call in batches of `concurrency` (the next starts when
//! the last ended), so no more run at once fleet-wide; it is a job (caller
//! `schedule:<name>`) and a `schedule.ran` event. A slot that comes while
//! the last run goes on is skipped (`schedule.skipped`); slots missed
//! (`schedule.missed`) are skipped or run once, as `missed` says.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::kv;
use provis_core::client::{BatchSize, CallPlan};
use provis_core::master_api::{
    ScheduleAction, ScheduleAnswer, ScheduleInfo, ScheduleRequest, ScheduleState,
    schedule_state_key,
};
use provis_core::selection::{Filter, Pick};
use provis_core::{CallRequest, CallTarget, MinionId, Subjects};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::declared_calls::{assumed_methods, check_call, line_of};
use crate::repository::RepositoryProblem;

/// The file's name in a config repository.
pub const SCHEDULES_FILE: &str = "schedules.toml";

/// How often every master looks at the clock.
const TICK: Duration = Duration::from_millis(200);

/// A slot taken later than this after it came is missed, not run late.
const ON_TIME_MS: i64 = 2_000;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulesFile {
    #[serde(default)]
    pub schedule: Vec<ScheduleSpec>,
}

/// One schedule as the file says it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    #[serde(default = "default_subject")]
    pub subject: String,
    #[serde(default, rename = "where", skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u32>,
    pub call: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<usize>,
    #[serde(default)]
    pub jitter_s: u64,
    #[serde(default)]
    pub missed: Missed,
    #[serde(default = "default_timeout_s")]
    pub timeout_s: u64,
}

fn default_subject() -> String {
    "all".to_owned()
}

fn default_timeout_s() -> u64 {
    60
}

/// What happens to slots that went by while no master led.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Missed {
    /// They are skipped; the next slot runs.
    #[default]
    Skip,
    /// One run makes up for all of them.
    RunOnce,
}

/// When a schedule's slots come.
#[derive(Debug)]
enum Clock {
    Cron(Box<jiff_cron::Schedule>, jiff::tz::TimeZone),
    /// Every so many milliseconds, counted from the Unix epoch (so every
    /// master agrees on the slots).
    Every(i64),
}

/// A schedule ready to run.
#[derive(Debug)]
pub struct Schedule {
    spec: ScheduleSpec,
    clock: Clock,
    request: CallRequest,
    target: CallTarget,
    filter: Option<Filter>,
    pick: Pick,
}

impl Schedule {
    /// Checks `spec` against the commit's services (`methods`); says what
    /// is wrong, naming the line of `text`.
    fn compile(
        spec: &ScheduleSpec,
        text: &str,
        methods: &BTreeMap<String, Vec<String>>,
    ) -> Result<Self, String> {
        let at = line_of(text, &format!("\"{}\"", spec.name));
        let line = |needle: &str| {
            let found = line_of(text, needle);
            if found == 0 { at } else { found }
        };
        let problem =
            |line: usize, what: String| format!("line {line}: schedule {:?}: {what}", spec.name);
        if spec.name.parse::<MinionId>().is_err() {
            return Err(problem(
                at,
                "a name is lowercase letters, digits, '-' and '_'".into(),
            ));
        }
        let clock = match (&spec.cron, &spec.every) {
            (Some(cron), None) => {
                // Five fields, as cron writes them; the library wants seconds first.
                let fields = cron.split_whitespace().count();
                let expression = if fields == 5 {
                    format!("0 {cron}")
                } else {
                    cron.clone()
                };
                let schedule = expression
                    .parse::<jiff_cron::Schedule>()
                    .map_err(|err| problem(line(cron), format!("cron {cron:?}: {err}")))?;
                let zone = spec.timezone.as_deref().unwrap_or("UTC");
                let tz = jiff::tz::TimeZone::get(zone)
                    .map_err(|err| problem(line(zone), format!("time zone {zone:?}: {err}")))?;
                Clock::Cron(Box::new(schedule), tz)
            }
            (None, Some(every)) => {
                let period = humantime::parse_duration(every)
                    .map_err(|err| problem(line(every), format!("every {every:?}: {err}")))?;
                let ms = i64::try_from(period.as_millis()).unwrap_or(i64::MAX);
                if ms < 1_000 {
                    return Err(problem(
                        line(every),
                        format!("every {every:?}: at least 1s"),
                    ));
                }
                if spec.timezone.is_some() {
                    return Err(problem(at, "a time zone is for cron, not for every".into()));
                }
                Clock::Every(ms)
            }
            _ => {
                return Err(problem(
                    at,
                    "say when: cron = \"…\" or every = \"…\" (one of them)".into(),
                ));
            }
        };
        let request = check_call(&spec.call, spec.args.as_ref(), spec.timeout_s, methods)
            .map_err(|what| problem(line(&spec.call), what))?;
        let target = CallTarget::parse_subject(&spec.subject).map_err(|err| {
            problem(
                line(&spec.subject),
                format!("subject {:?}: {err}", spec.subject),
            )
        })?;
        let filter = match &spec.filter {
            None => None,
            Some(expression) => Some(
                Filter::parse(expression)
                    .map_err(|err| problem(line(expression), format!("where: {err}")))?,
            ),
        };
        let pick = match spec.percent {
            None => Pick::All,
            Some(percent @ 1..=100) => Pick::Percent(f64::from(percent)),
            Some(other) => {
                return Err(problem(
                    line("percent"),
                    format!("percent {other}: 1 to 100"),
                ));
            }
        };
        if spec.concurrency == Some(0) {
            return Err(problem(
                line("concurrency"),
                "concurrency 0 would run nothing".into(),
            ));
        }
        Ok(Self {
            spec: spec.clone(),
            clock,
            request,
            target,
            filter,
            pick,
        })
    }

    /// [`Self::compile`] for a spec the commit's check passed already.
    fn compile_checked(spec: &ScheduleSpec) -> Option<Self> {
        let methods = assumed_methods(&spec.call);
        Schedule::compile(spec, "", &methods)
            .inspect_err(|err| {
                tracing::error!(schedule = %spec.name, error = %err, "schedule does not compile");
            })
            .ok()
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The first slot after `after_ms` (Unix milliseconds).
    pub fn next_after(&self, after_ms: i64) -> Option<i64> {
        match &self.clock {
            Clock::Every(period) => Some((after_ms.div_euclid(*period) + 1) * period),
            Clock::Cron(schedule, tz) => {
                let zoned = jiff::Timestamp::from_millisecond(after_ms)
                    .ok()?
                    .to_zoned(tz.clone());
                schedule
                    .after(zoned)
                    .map(|slot| slot.timestamp().as_millisecond())
                    .find(|slot| *slot > after_ms)
            }
        }
    }

    fn clock_text(&self) -> String {
        match (&self.spec.cron, &self.spec.every) {
            (Some(cron), _) => format!(
                "cron {cron:?} in {}",
                self.spec.timezone.as_deref().unwrap_or("UTC")
            ),
            (_, Some(every)) => format!("every {every}"),
            _ => String::new(),
        }
    }
}

/// Reads `schedules.toml` under `root` (none: no schedules); what is wrong
/// goes to `problems`, each naming its line.
pub fn load(
    root: &std::path::Path,
    methods: &BTreeMap<String, Vec<String>>,
    problems: &mut Vec<RepositoryProblem>,
) -> Vec<ScheduleSpec> {
    crate::declared_calls::load(
        root,
        SCHEDULES_FILE,
        "schedule",
        |file: SchedulesFile| file.schedule,
        |spec| spec.name.as_str(),
        |spec, text| Schedule::compile(spec, text, methods).map(drop),
        problems,
    )
}

/// What the scheduler needs from its master.
#[derive(Debug, Clone)]
pub struct Scheduler {
    pub subjects: Subjects,
    /// Calls as the master (signed by it); each run names its schedule.
    pub client: provis_core::Client,
    pub outbox: provis_core::outbox::Outbox,
    pub leadership: crate::leadership::Leadership,
    /// `provis_config`, where each schedule's state is kept.
    pub config: kv::Store,
    /// Whom a run reaches is chosen from this master's own view.
    pub view: Arc<crate::fleet_view::FleetView>,
}

fn compile_all(specs: &[ScheduleSpec]) -> Vec<Arc<Schedule>> {
    specs
        .iter()
        .filter_map(|spec| Schedule::compile_checked(spec).map(Arc::new))
        .collect()
}

/// Runs the applied commit's schedules (`schedules`) while this master
/// leads, until `stop`.
pub async fn run(
    scheduler: Scheduler,
    mut schedules: watch::Receiver<Vec<ScheduleSpec>>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut active = compile_all(&schedules.borrow_and_update());
    let mut running: HashMap<String, Arc<AtomicBool>> = HashMap::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            changed = schedules.changed() => {
                if changed.is_err() {
                    return;
                }
                active = compile_all(&schedules.borrow_and_update());
                continue;
            }
            () = tokio::time::sleep(TICK) => {}
        }
        if active.is_empty() || scheduler.leadership.term().is_none() {
            continue;
        }
        let now = provis_core::envelope::now_unix_ms();
        for schedule in &active {
            let busy = running
                .entry(schedule.name().to_owned())
                .or_insert_with(|| Arc::new(AtomicBool::new(false)))
                .clone();
            tick(&scheduler, schedule, now, busy).await;
        }
    }
}

/// Takes `schedule`'s slot if one is due at `now` and no other master took it.
async fn tick(scheduler: &Scheduler, schedule: &Arc<Schedule>, now: i64, busy: Arc<AtomicBool>) {
    let key = schedule_state_key(schedule.name());
    let entry = match scheduler.config.entry(key.as_str()).await {
        Ok(entry) => entry.filter(|e| e.operation == kv::Operation::Put),
        Err(err) => {
            tracing::debug!(schedule = schedule.name(), error = %err, "schedule state unread");
            return;
        }
    };
    let Some(entry) = entry else {
        // First sight: its slots count from now on.
        let state = ScheduleState {
            last_due_unix_ms: now,
            ..ScheduleState::default()
        };
        if let Ok(value) = serde_json::to_vec(&state) {
            let _ = scheduler.config.create(key.as_str(), value.into()).await;
        }
        return;
    };
    let state: ScheduleState = serde_json::from_slice(&entry.value).unwrap_or_default();
    // A run asked for now is not spread (jitter is for slots).
    let jitter = !state.run_now;
    let (next_state, run_at, missed) = if state.run_now {
        let next = ScheduleState {
            run_now: false,
            runs: state.runs + 1,
            ..state.clone()
        };
        (next, Some(now), 0)
    } else {
        if state.paused {
            return;
        }
        let Some(next) = schedule.next_after(state.last_due_unix_ms) else {
            return;
        };
        if next > now {
            return;
        }
        let (mut latest, mut slots) = (next, 1u64);
        while let Some(after) = schedule.next_after(latest) {
            if after > now || slots >= 100_000 {
                break;
            }
            latest = after;
            slots += 1;
        }
        let on_time = slots == 1 && now - latest <= ON_TIME_MS;
        let run = on_time || schedule.spec.missed == Missed::RunOnce;
        let missed = slots - u64::from(run);
        let next = ScheduleState {
            last_due_unix_ms: latest,
            runs: state.runs + u64::from(run),
            missed: state.missed + missed,
            ..state.clone()
        };
        (next, run.then_some(latest), missed)
    };
    let Ok(value) = serde_json::to_vec(&next_state) else {
        return;
    };
    // Compare-and-set: of several masters, one takes the slot.
    if scheduler
        .config
        .update(key.as_str(), value.into(), entry.revision)
        .await
        .is_err()
    {
        return;
    }
    if missed > 0 {
        emit(
            scheduler,
            "schedule.missed",
            json!({ "schedule": schedule.name(), "slots": missed }),
        );
    }
    if let Some(due) = run_at {
        launch(scheduler, schedule.clone(), due, jitter, busy);
    }
}

/// Runs `schedule`'s call for the slot `due` (after a random wait up to its
/// jitter, when `jitter`), unless its last run goes on.
fn launch(
    scheduler: &Scheduler,
    schedule: Arc<Schedule>,
    due: i64,
    jitter: bool,
    busy: Arc<AtomicBool>,
) {
    if busy.swap(true, Ordering::SeqCst) {
        emit(
            scheduler,
            "schedule.skipped",
            json!({ "schedule": schedule.name(), "due_unix_ms": due, "reason": "its last run still goes on" }),
        );
        return;
    }
    let scheduler = scheduler.clone();
    tokio::spawn(async move {
        if jitter && schedule.spec.jitter_s > 0 {
            let jitter = Duration::from_millis(random_below(schedule.spec.jitter_s * 1000));
            tokio::time::sleep(jitter).await;
        }
        let client = scheduler
            .client
            .clone()
            .with_caller(format!("schedule:{}", schedule.name()));
        let plan = CallPlan {
            batch: schedule.spec.concurrency.map(BatchSize::Count),
            ..CallPlan::default()
        };
        let outcome = match scheduler.view.select(
            &schedule.target,
            schedule.filter.as_ref(),
            schedule.pick,
            None,
        ) {
            Ok(selection) => client
                .call_selected(
                    &schedule.target,
                    &selection,
                    &schedule.request,
                    &plan,
                    &mut |_| {},
                )
                .await
                .map_err(|err| provis_core::error_chain(&err)),
            Err(err) => Err(err.to_string()),
        };
        let data = match &outcome {
            Ok(report) => json!({
                "schedule": schedule.name(),
                "due_unix_ms": due,
                "call": schedule.spec.call,
                "job": report.job,
                "ok": report.summary.ok,
                "error": report.summary.error,
                "no_reply": report.summary.no_reply,
            }),
            Err(err) => json!({
                "schedule": schedule.name(),
                "due_unix_ms": due,
                "call": schedule.spec.call,
                "failed": err,
            }),
        };
        emit(&scheduler, "schedule.ran", data);
        busy.store(false, Ordering::SeqCst);
    });
}

fn emit(scheduler: &Scheduler, kind: &str, data: Value) {
    provis_core::event::emit(&scheduler.outbox, &scheduler.subjects, "master", kind, data);
}

/// A random number below `bound`, for spreading runs (not for anything secret).
fn random_below(bound: u64) -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(bound);
    hasher.finish() % bound.max(1)
}

/// Answers `provis schedule …`: applies `request`'s action to the state in
/// `config`, then describes every schedule of `specs`.
pub async fn control(
    config: &kv::Store,
    specs: &[ScheduleSpec],
    request: &ScheduleRequest,
) -> Result<ScheduleAnswer, provis_core::master_api::ApiError> {
    use provis_core::master_api::ApiError;
    if request.action != ScheduleAction::List {
        let Some(name) = request.name.as_deref() else {
            return Err(ApiError::usage("name the schedule"));
        };
        if !specs.iter().any(|s| s.name == name) {
            return Err(ApiError::not_found(format!(
                "no schedule {name:?} in the applied commit"
            )));
        }
        let key = schedule_state_key(name);
        let mut changed = false;
        for _ in 0..5 {
            let entry = config
                .entry(key.as_str())
                .await
                .map_err(|err| ApiError::failed(err.to_string()))?
                .filter(|e| e.operation == kv::Operation::Put);
            let mut state: ScheduleState = entry
                .as_ref()
                .and_then(|e| serde_json::from_slice(&e.value).ok())
                .unwrap_or_else(|| ScheduleState {
                    last_due_unix_ms: provis_core::envelope::now_unix_ms(),
                    ..ScheduleState::default()
                });
            match request.action {
                ScheduleAction::RunNow => state.run_now = true,
                ScheduleAction::Pause => state.paused = true,
                ScheduleAction::Resume => {
                    state.paused = false;
                    // Slots that went by while paused are not owed.
                    state.last_due_unix_ms = provis_core::envelope::now_unix_ms();
                }
                ScheduleAction::List => {}
            }
            let value =
                serde_json::to_vec(&state).map_err(|err| ApiError::failed(err.to_string()))?;
            let written = match &entry {
                Some(entry) => config
                    .update(key.as_str(), value.into(), entry.revision)
                    .await
                    .is_ok(),
                None => config.create(key.as_str(), value.into()).await.is_ok(),
            };
            if written {
                changed = true;
                break;
            }
        }
        if !changed {
            return Err(ApiError::failed(
                "the schedule's state kept changing; try again",
            ));
        }
    }
    let mut schedules = Vec::new();
    for spec in specs {
        let state: Option<ScheduleState> = match config.get(schedule_state_key(&spec.name)).await {
            Ok(Some(value)) => serde_json::from_slice(&value).ok(),
            _ => None,
        };
        let compiled = Schedule::compile_checked(spec);
        let last = state.as_ref().map(|s| s.last_due_unix_ms);
        let next = compiled
            .as_ref()
            .and_then(|c| c.next_after(last.unwrap_or_else(provis_core::envelope::now_unix_ms)));
        schedules.push(ScheduleInfo {
            name: spec.name.clone(),
            clock: compiled
                .as_ref()
                .map(|c| c.clock_text())
                .unwrap_or_default(),
            call: spec.call.clone(),
            subject: spec.subject.clone(),
            paused: state.as_ref().is_some_and(|s| s.paused),
            last_due_unix_ms: last,
            next_due_unix_ms: next,
            runs: state.as_ref().map_or(0, |s| s.runs),
            missed: state.as_ref().map_or(0, |s| s.missed),
        });
    }
    Ok(ScheduleAnswer { schedules })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> Result<Schedule, String> {
        let file: SchedulesFile = toml::from_str(text).unwrap();
        let methods = BTreeMap::from([("site".to_owned(), vec!["rotate".to_owned()])]);
        Schedule::compile(&file.schedule[0], text, &methods)
    }

    #[test]
    fn slots_come_on_the_clock_in_the_time_zone() {
        let every =
            spec("[[schedule]]\nname = \"tick\"\nevery = \"10s\"\ncall = \"site.rotate\"\n")
                .unwrap();
        assert_eq!(every.next_after(1_000), Some(10_000));
        assert_eq!(every.next_after(10_000), Some(20_000));
        let cron = spec(
            "[[schedule]]\nname = \"daily\"\ncron = \"0 3 * * *\"\ntimezone = \"Europe/Vienna\"\ncall = \"site.rotate\"\n",
        )
        .unwrap();
        // 2026-01-10 00:00 UTC: the next 03:00 in Vienna is 02:00 UTC (UTC+1 in winter).
        let start = jiff::Timestamp::from_second(1_768_003_200)
            .unwrap()
            .as_millisecond();
        let next = cron.next_after(start).unwrap();
        assert_eq!(next - start, 2 * 3600 * 1000);
    }

    #[test]
    fn a_bad_schedule_names_its_line() {
        let err =
            spec("[[schedule]]\nname = \"x\"\ncron = \"61 * * * *\"\ncall = \"site.rotate\"\n")
                .unwrap_err();
        assert!(err.starts_with("line 3: schedule \"x\": cron"), "{err}");
        let err = spec("[[schedule]]\nname = \"x\"\nevery = \"1m\"\ncall = \"site.reboot\"\n")
            .unwrap_err();
        assert!(
            err.starts_with("line 4: schedule \"x\": calls \"site.reboot\""),
            "{err}"
        );
        let err = spec("[[schedule]]\nname = \"x\"\ncron = \"0 3 * * *\"\ntimezone = \"Mars/Olympus\"\ncall = \"site.rotate\"\n").unwrap_err();
        assert!(
            err.starts_with("line 4: schedule \"x\": time zone"),
            "{err}"
        );
    }
}
