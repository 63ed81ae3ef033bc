//! The pages: each handler reads the master's view (or the fleet's
//! streams), shapes what its template shows, and renders it.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::{Duration, SystemTime};

use askama::Template;
use axum::Extension;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use futures::StreamExt as _;
use provis_core::event::CloudEvent;
use provis_core::master_api::{MasterClient, QueryMode, QueryRequest};
use provis_core::presence::Liveness;
use provis_core::selection::{Filter, Verdict};
use serde::Deserialize;
use serde_json::Value;

use crate::chart::{Point, line_chart};
use crate::{App, Session};

const PAGE_SIZE: usize = 100;
const MOST_PAGE_SIZE: usize = 500;
/// Events shown on a page before live ones come.
const RECENT_EVENTS: usize = 50;
/// Stream records read for one page at most.
const MOST_RECORDS: usize = 5_000;

fn render(page: &impl Template) -> Response {
    match page.render() {
        Ok(html) => Html(html).into_response(),
        Err(err) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("page not rendered: {err}"),
        )
            .into_response(),
    }
}

#[derive(Template)]
#[template(path = "refused.html")]
struct Refused {
    reason: String,
}

/// A page saying why the request was refused.
pub fn refused(status: StatusCode, reason: String) -> Response {
    let mut response = render(&Refused { reason });
    *response.status_mut() = status;
    response
}

fn number(value: Option<&Value>, unit: &str) -> String {
    value
        .and_then(Value::as_f64)
        .map_or_else(|| "-".to_owned(), |n| format!("{n:.1}{unit}"))
}

fn ago(ms: Option<u64>) -> String {
    match ms {
        None => "not since this master started".to_owned(),
        Some(ms) if ms < 1_000 => "now".to_owned(),
        Some(ms) => format!(
            "{} ago",
            humantime::format_duration(Duration::from_secs(ms / 1000))
        ),
    }
}

fn clock_time(unix_ms: i64) -> String {
    let at = SystemTime::UNIX_EPOCH + Duration::from_millis(u64::try_from(unix_ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(at).to_string()
}

// ---- the fleet ----

#[derive(Debug, Deserialize)]
pub struct FleetQuery {
    #[serde(rename = "where", default)]
    filter: String,
    #[serde(default)]
    page: usize,
    size: Option<usize>,
}

struct FleetRow {
    id: String,
    roles: String,
    live: bool,
    services: String,
    mem_free: String,
    disk_free: String,
    load: String,
    last_seen: String,
}

#[derive(Template)]
#[template(path = "fleet.html")]
struct FleetPage {
    who: String,
    filter: String,
    problem: Option<String>,
    rows: Vec<FleetRow>,
    matched: usize,
    total: usize,
    live: usize,
    first: usize,
    last: usize,
    prev: Option<String>,
    next: Option<String>,
}

/// Every minion, filtered on the server by a `--where` expression, one
/// page at a time: the page's rows are the only ones built.
pub async fn fleet(
    State(app): State<App>,
    Extension(session): Extension<Session>,
    Query(query): Query<FleetQuery>,
) -> Response {
    let size = query.size.unwrap_or(PAGE_SIZE).clamp(1, MOST_PAGE_SIZE);
    let (filter, mut problem) = match query.filter.trim() {
        "" => (None, None),
        text => match Filter::parse(text) {
            Ok(filter) => (Some(filter), None),
            Err(err) => (None, Some(err.to_string())),
        },
    };
    let view = &app.feed.view;
    let registry = view.registry();
    let presence = view.presence();
    let index = view.index();
    let now = std::time::Instant::now();
    let skip = query.page.saturating_mul(size);
    let (mut matched, mut live_count) = (0, 0);
    let mut rows = Vec::new();
    for (id, record) in registry.iter() {
        let live = presence.liveness(record, now) == Liveness::Live;
        live_count += usize::from(live);
        let state = index
            .latest(id)
            .map_or(&record.state, |sample| &sample.state);
        if let Some(filter) = &filter {
            match filter.evaluate_with_state(record, state) {
                Ok(Verdict::Match) => {}
                Ok(_) => continue,
                Err(err) => {
                    problem.get_or_insert_with(|| err.to_string());
                    continue;
                }
            }
        }
        matched += 1;
        if matched <= skip || rows.len() >= size {
            continue;
        }
        let heard = presence
            .last_heard(id)
            .map(|at| u64::try_from(now.saturating_duration_since(at).as_millis()).unwrap_or(0));
        rows.push(FleetRow {
            id: id.clone(),
            roles: record
                .roles
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            live,
            services: record
                .services
                .iter()
                .filter(|(name, _)| name.as_str() != "sys")
                .map(|(name, version)| format!("{name} {version}"))
                .collect::<Vec<_>>()
                .join(", "),
            mem_free: number(state.pointer("/mem/free_pct"), "%"),
            disk_free: number(state.pointer("/disk/free_pct"), "%"),
            load: number(state.pointer("/load/one"), ""),
            last_seen: ago(heard),
        });
    }
    let total = registry.len();
    drop((registry, presence, index));
    let link = |page: usize| {
        format!(
            "/?where={}&page={page}&size={size}",
            urlencode(&query.filter)
        )
    };
    let first = if rows.is_empty() { 0 } else { skip + 1 };
    let page = FleetPage {
        who: session.who,
        filter: query.filter.clone(),
        problem,
        last: skip + rows.len(),
        first,
        prev: (query.page > 0).then(|| link(query.page - 1)),
        next: (skip + rows.len() < matched).then(|| link(query.page + 1)),
        rows,
        matched,
        total,
        live: live_count,
    };
    render(&page)
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

// ---- one minion ----

#[derive(Debug, Deserialize)]
pub struct MinionQuery {
    #[serde(default)]
    range: Option<String>,
}

struct EventRow {
    time: String,
    source: String,
    kind: String,
    data: String,
}

impl EventRow {
    fn of(event: &CloudEvent) -> Self {
        Self {
            time: event.time.clone(),
            source: event.source.clone(),
            kind: event.kind.clone(),
            data: event.data.to_string(),
        }
    }
}

#[derive(Template)]
#[template(path = "minion.html")]
struct MinionPage {
    who: String,
    id: String,
    live: bool,
    roles: String,
    version: String,
    converged: String,
    failing: Option<String>,
    ranges: Vec<(&'static str, String, bool)>,
    charts: Vec<String>,
    services: Vec<(String, String)>,
    events: Vec<EventRow>,
    facts: String,
}

/// The windows a minion's charts span.
const RANGES: [(&str, u64); 3] = [("hour", 3_600), ("day", 86_400), ("week", 7 * 86_400)];

/// The numbers charted: (title, unit, path in a state sample, the worse
/// end of a bucket: high for used and busy, low for free).
const CHARTED: [(&str, &str, &str, bool); 3] = [
    ("memory used", "%", "/mem/used_pct", true),
    ("disk free (/)", "%", "/disk/free_pct", false),
    ("cpu busy", "%", "/cpu_pct", true),
];

pub async fn minion(
    State(app): State<App>,
    Extension(session): Extension<Session>,
    Path(id): Path<String>,
    Query(query): Query<MinionQuery>,
) -> Response {
    let Some(record) = app.feed.view.registry().get(&id).cloned() else {
        return refused(
            StatusCode::NOT_FOUND,
            format!("No minion {id} in the registry."),
        );
    };
    let live = app.feed.view.is_live(&record);
    let range = query.range.as_deref().unwrap_or("hour");
    let seconds = RANGES
        .iter()
        .find(|(name, _)| *name == range)
        .map_or(3_600, |(_, s)| *s);
    let to_ms = provis_core::envelope::now_unix_ms();
    let from_ms = to_ms - i64::try_from(seconds * 1000).unwrap_or(0);
    // The last hour from every sample in the state stream; longer windows
    // from the master's hourly buckets (each drawn at its worse end).
    let series: Vec<Vec<Point>> = if seconds <= 3_600 {
        let samples = recent_samples(&app, &id, from_ms).await;
        CHARTED
            .iter()
            .map(|(_, _, path, _)| {
                samples
                    .iter()
                    .filter_map(|(at, state)| Some((*at, state.pointer(path)?.as_f64()?)))
                    .collect()
            })
            .collect()
    } else {
        let buckets = app.feed.view.index().bucket_series(&id, from_ms, to_ms);
        CHARTED
            .iter()
            .map(|(_, _, path, high)| {
                buckets
                    .iter()
                    .filter_map(|(at, low_sample, high_sample)| {
                        let sample = if *high { high_sample } else { low_sample };
                        Some((*at, sample.pointer(path)?.as_f64()?))
                    })
                    .collect()
            })
            .collect()
    };
    let charts = CHARTED
        .iter()
        .zip(&series)
        .map(|((title, unit, _, _), points)| line_chart(title, unit, points, from_ms, to_ms, 100.0))
        .collect();
    let events = recent_events(&app, &format!("{id}.>"), 20)
        .await
        .iter()
        .map(EventRow::of)
        .collect();
    let page = MinionPage {
        who: session.who,
        live,
        roles: record
            .roles
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        version: record.version.clone(),
        converged: record.converged_commit.as_deref().map_or_else(
            || "nothing yet".to_owned(),
            |c| c.chars().take(12).collect(),
        ),
        failing: record.failing.as_ref().map(|failing| {
            failing
                .services
                .iter()
                .map(|(service, why)| format!("{service}: {why}"))
                .collect::<Vec<_>>()
                .join("; ")
        }),
        ranges: RANGES
            .iter()
            .map(|(name, _)| (*name, format!("/minion/{id}?range={name}"), *name == range))
            .collect(),
        charts,
        services: record.services.clone().into_iter().collect(),
        events,
        facts: serde_json::to_string_pretty(&record.facts).unwrap_or_default(),
        id,
    };
    render(&page)
}

/// `id`'s state samples since `from_ms`, from the state stream.
async fn recent_samples(app: &App, id: &str, from_ms: i64) -> Vec<(i64, Value)> {
    let since = SystemTime::UNIX_EPOCH + Duration::from_millis(u64::try_from(from_ms).unwrap_or(0));
    let subject = format!("{}.state.{id}", app.feed.subjects.prefix());
    match provis_core::stream_read::read_since(
        &app.feed.nats,
        provis_core::storage::STREAM_STATE,
        subject,
        Some(since),
        Some(MOST_RECORDS),
    )
    .await
    {
        Ok(messages) => messages
            .iter()
            .filter_map(|m| {
                serde_json::from_slice::<provis_core::state::StateSample>(&m.payload).ok()
            })
            .map(|sample| (sample.at_unix_ms, sample.state))
            .collect(),
        Err(err) => {
            tracing::debug!(error = %err, "state samples not read");
            Vec::new()
        }
    }
}

/// The last `most` events of the past hour on `<prefix>.event.<tail>`,
/// the newest first.
async fn recent_events(app: &App, tail: &str, most: usize) -> Vec<CloudEvent> {
    let since = SystemTime::now()
        .checked_sub(Duration::from_secs(3_600))
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let subject = format!("{}.event.{tail}", app.feed.subjects.prefix());
    let messages = provis_core::stream_read::read_since(
        &app.feed.nats,
        provis_core::storage::STREAM_EVENTS,
        subject,
        Some(since),
        Some(MOST_RECORDS),
    )
    .await
    .unwrap_or_default();
    messages
        .iter()
        .rev()
        .filter_map(|m| serde_json::from_slice(&m.payload).ok())
        .take(most)
        .collect()
}

// ---- roles ----

struct RoleRow {
    name: String,
    /// Its indent, in em: deeper roles sit under their parents.
    indent: String,
    members: usize,
    live: usize,
    filter: String,
}

#[derive(Template)]
#[template(path = "roles.html")]
struct RolesPage {
    who: String,
    roles: Vec<RoleRow>,
}

/// Every role and its ancestors (`web.eu` counts for `web` too), with how
/// many minions hold it and how many of those are live.
pub async fn roles(State(app): State<App>, Extension(session): Extension<Session>) -> Response {
    let mut counts: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for (_, (roles, live)) in app.feed.view.map_records(|record, live, _| {
        (
            record
                .roles
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            live,
        )
    }) {
        let mut held = std::collections::BTreeSet::new();
        for role in roles {
            let parts: Vec<&str> = role.split('.').collect();
            for end in 1..=parts.len() {
                held.insert(parts[..end].join("."));
            }
        }
        for role in held {
            let entry = counts.entry(role).or_default();
            entry.0 += 1;
            entry.1 += usize::from(live);
        }
    }
    let roles = counts
        .into_iter()
        .map(|(name, (members, live))| RoleRow {
            indent: format!("{:.1}", name.matches('.').count() as f64 * 1.5),
            filter: format!("'{name}' in roles"),
            name,
            members,
            live,
        })
        .collect();
    render(&RolesPage {
        who: session.who,
        roles,
    })
}

// ---- convergence ----

#[derive(Template)]
#[template(path = "convergence.html")]
struct ConvergencePage {
    who: String,
    applied: Option<String>,
    converged: usize,
    live: usize,
    failed: Vec<(String, String)>,
    behind: Vec<String>,
}

pub async fn convergence(
    State(app): State<App>,
    Extension(session): Extension<Session>,
) -> Response {
    let applied = app
        .feed
        .published
        .as_ref()
        .and_then(|published| published.borrow().applied.clone());
    let commit = applied.as_ref().map(|a| a.commit.clone());
    let lines = app.feed.view.map_records(|record, live, _| {
        let converged = commit.is_some() && record.converged_commit == commit;
        let failed = record
            .failing
            .as_ref()
            .filter(|failing| Some(&failing.commit) == commit.as_ref())
            .map(|failing| {
                failing
                    .services
                    .iter()
                    .map(|(service, why)| format!("{service}: {why}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            });
        (live, converged, failed)
    });
    let live = lines.iter().filter(|(_, (live, _, _))| *live).count();
    let converged = lines
        .iter()
        .filter(|(_, (live, converged, _))| *live && *converged)
        .count();
    let failed = lines
        .iter()
        .filter_map(|(id, (_, _, failed))| Some((id.clone(), failed.clone()?)))
        .collect();
    let behind = lines
        .iter()
        .filter(|(_, (live, converged, failed))| *live && !converged && failed.is_none())
        .map(|(id, _)| id.clone())
        .collect();
    render(&ConvergencePage {
        who: session.who,
        applied: applied.map(|a| {
            format!(
                "{} ({})",
                a.commit.chars().take(12).collect::<String>(),
                a.summary
            )
        }),
        converged,
        live,
        failed,
        behind,
    })
}

// ---- rollouts ----

struct RolloutView {
    commit: String,
    status: String,
    summary: String,
    stages: Vec<(String, String, String, String)>,
}

#[derive(Template)]
#[template(path = "rollouts.html")]
struct RolloutsPage {
    who: String,
    problem: Option<String>,
    rollouts: Vec<RolloutView>,
}

pub async fn rollouts(State(app): State<App>, Extension(session): Extension<Session>) -> Response {
    let js = async_nats::jetstream::new(app.feed.nats.clone());
    let read = async {
        let kv = js
            .get_key_value(provis_core::storage::BUCKET_ROLLOUTS)
            .await
            .map_err(|err| err.to_string())?;
        provis_master::rollout::RolloutStore::new(kv)
            .history()
            .await
            .map_err(|err| provis_core::error_chain(&err))
    };
    let (records, problem) = match read.await {
        Ok(records) => (records, None),
        Err(err) => (Vec::new(), Some(format!("rollouts not readable: {err}"))),
    };
    let rollouts = records
        .into_iter()
        .take(20)
        .map(|record| RolloutView {
            commit: record.commit.chars().take(12).collect(),
            status: api_name(&record.status),
            summary: match &record.reason {
                Some(reason) => format!("{} · {reason}", record.summary),
                None => record.summary.clone(),
            },
            stages: record
                .stages
                .iter()
                .map(|stage| {
                    let ok = stage.results.values().filter(|o| o.ok).count();
                    (
                        stage.name.clone(),
                        api_name(&stage.state),
                        stage.len().to_string(),
                        if stage.results.is_empty() {
                            "-".to_owned()
                        } else {
                            format!("{ok} of {} ok", stage.results.len())
                        },
                    )
                })
                .collect(),
        })
        .collect();
    render(&RolloutsPage {
        who: session.who,
        problem,
        rollouts,
    })
}

/// A status or state as the API names it (`rolled_back`).
fn api_name<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

// ---- jobs ----

struct JobRow {
    id: String,
    short: String,
    started: String,
    caller: String,
    function: String,
    target: String,
    result: String,
}

#[derive(Template)]
#[template(path = "jobs.html")]
struct JobsPage {
    who: String,
    problem: Option<String>,
    jobs: Vec<JobRow>,
}

pub async fn jobs(State(app): State<App>, Extension(session): Extension<Session>) -> Response {
    let since = SystemTime::now()
        .checked_sub(Duration::from_secs(86_400))
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let (listed, problem) =
        match provis_core::jobs::list_jobs(&app.feed.nats, &app.feed.subjects, since).await {
            Ok(listed) => (listed, None),
            Err(err) => (Vec::new(), Some(provis_core::error_chain(&err))),
        };
    let jobs = listed
        .into_iter()
        .rev()
        .take(MOST_PAGE_SIZE)
        .map(|job| JobRow {
            short: job.request.job.chars().take(8).collect(),
            started: clock_time(job.request.started_unix_ms),
            caller: job.request.caller.clone(),
            function: job.request.function.clone(),
            target: job.request.target.clone(),
            result: job.summary.map_or_else(
                || format!("{} selected, not ended", job.request.selected.len()),
                |s| format!("{} ok, {} error, {} no reply", s.ok, s.failed, s.no_reply),
            ),
            id: job.request.job,
        })
        .collect();
    render(&JobsPage {
        who: session.who,
        problem,
        jobs,
    })
}

#[derive(Template)]
#[template(path = "job.html")]
struct JobPage {
    who: String,
    id: String,
    request: String,
    results: Vec<(String, String, String, String)>,
    missing: String,
}

pub async fn job(
    State(app): State<App>,
    Extension(session): Extension<Session>,
    Path(id): Path<String>,
) -> Response {
    let job = match provis_core::jobs::read_job(&app.feed.nats, &app.feed.subjects, &id).await {
        Ok(job) if job.request.is_some() || !job.results.is_empty() => job,
        Ok(_) => return refused(StatusCode::NOT_FOUND, format!("No job {id} is recorded.")),
        Err(err) => return refused(StatusCode::BAD_REQUEST, provis_core::error_chain(&err)),
    };
    let request = job.request.as_ref().map_or_else(
        || "its request is not recorded".to_owned(),
        |r| {
            format!(
                "{} called {} on {} at {} ({} selected, arguments {})",
                r.caller,
                r.function,
                r.target,
                clock_time(r.started_unix_ms),
                r.selected.len(),
                r.args_digest
            )
        },
    );
    let results = job
        .results
        .values()
        .map(|r| {
            let detail = match (&r.result, &r.error) {
                (Some(value), _) => value.to_string(),
                (None, Some(error)) => format!("{}: {}", error.code, error.message),
                (None, None) => String::new(),
            };
            (
                r.minion.clone(),
                r.status.clone(),
                format!("{:.1} ms", r.ms),
                detail,
            )
        })
        .collect();
    render(&JobPage {
        who: session.who,
        missing: job.without_result().join(", "),
        id,
        request,
        results,
    })
}

// ---- events ----

#[derive(Debug, Deserialize)]
pub struct EventsQuery {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    minion: String,
}

impl EventsQuery {
    /// The subject filter after `<prefix>.event.`: a minion's, or all.
    fn subject_tail(&self) -> String {
        match self.minion.trim() {
            "" => ">".to_owned(),
            minion => format!("{minion}.>"),
        }
    }

    /// Whether `event` is of the asked type (a glob over the type without
    /// its `io.provis.` namespace, or with it).
    fn wants(&self, event: &CloudEvent) -> bool {
        let pattern = self.kind.trim();
        pattern.is_empty()
            || wildmatch::WildMatch::new(pattern).matches(event.short_kind())
            || wildmatch::WildMatch::new(pattern).matches(&event.kind)
    }
}

#[derive(Template)]
#[template(path = "events.html")]
struct EventsPage {
    who: String,
    kind: String,
    minion: String,
    stream: String,
    recent: Vec<EventRow>,
}

pub async fn events(
    State(app): State<App>,
    Extension(session): Extension<Session>,
    Query(query): Query<EventsQuery>,
) -> Response {
    let recent = recent_events(&app, &query.subject_tail(), MOST_RECORDS)
        .await
        .iter()
        .filter(|event| query.wants(event))
        .take(RECENT_EVENTS)
        .map(EventRow::of)
        .collect();
    render(&EventsPage {
        who: session.who,
        stream: format!(
            "/events/stream?type={}&minion={}",
            urlencode(&query.kind),
            urlencode(&query.minion)
        ),
        kind: query.kind,
        minion: query.minion,
        recent,
    })
}

/// Every new event as it is published, as server-sent events, filtered
/// like the page.
pub async fn event_stream(State(app): State<App>, Query(query): Query<EventsQuery>) -> Response {
    let subject = format!(
        "{}.event.{}",
        app.feed.subjects.prefix(),
        query.subject_tail()
    );
    let subscription = match app.feed.nats.subscribe(subject).await {
        Ok(subscription) => subscription,
        Err(err) => return refused(StatusCode::SERVICE_UNAVAILABLE, err.to_string()),
    };
    let stream = subscription.filter_map(move |message| {
        let wanted = serde_json::from_slice::<CloudEvent>(&message.payload)
            .ok()
            .filter(|event| query.wants(event))
            .and_then(|event| serde_json::to_string(&event).ok())
            .map(|json| Ok::<_, Infallible>(SseEvent::default().data(json)));
        async move { wanted }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

// ---- queries ----

#[derive(Debug, Deserialize)]
pub struct QueryForm {
    #[serde(default)]
    expression: String,
    #[serde(default)]
    mode: String,
    #[serde(default)]
    window: String,
}

#[derive(Template)]
#[template(path = "query.html")]
struct QueryPage {
    who: String,
    expression: String,
    window: String,
    modes: Vec<(&'static str, &'static str, bool)>,
    problem: Option<String>,
    summary: Option<String>,
    matches: Vec<(String, String)>,
}

/// `provis query`: now, for a whole window (`--for`), or at least once in
/// it (`--any`), answered by the master.
pub async fn query(
    State(app): State<App>,
    Extension(session): Extension<Session>,
    Query(form): Query<QueryForm>,
) -> Response {
    let mode = match form.mode.as_str() {
        "for" => QueryMode::For,
        "any" => QueryMode::Any,
        _ => QueryMode::Latest,
    };
    let modes = [
        ("latest", "now", QueryMode::Latest),
        ("for", "for the whole window (--for)", QueryMode::For),
        ("any", "at least once in it (--any)", QueryMode::Any),
    ]
    .into_iter()
    .map(|(value, label, m)| (value, label, m == mode))
    .collect();
    let mut page = QueryPage {
        who: session.who,
        expression: form.expression.clone(),
        window: form.window.clone(),
        modes,
        problem: None,
        summary: None,
        matches: Vec::new(),
    };
    if form.expression.trim().is_empty() {
        return render(&page);
    }
    let window_ms = match (mode, form.window.trim()) {
        (QueryMode::Latest, _) => Ok(0),
        (_, "") => Err("a window is needed, e.g. 7d".to_owned()),
        (_, text) => humantime::parse_duration(text)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .map_err(|err| format!("window {text:?}: {err}")),
    };
    let window_ms = match window_ms {
        Ok(ms) => ms,
        Err(problem) => {
            page.problem = Some(problem);
            return render(&page);
        }
    };
    let master = MasterClient::new(app.feed.nats.clone(), app.feed.subjects.clone());
    let request = QueryRequest {
        expression: form.expression.clone(),
        mode,
        window_ms,
        page: Default::default(),
    };
    match master.query(request).await {
        Ok(answer) => {
            page.summary = Some(format!(
                "{} of {} minions match",
                answer.matches.len(),
                answer.considered
            ));
            page.matches = answer
                .matches
                .iter()
                .map(|m| {
                    let why = m.note.clone().unwrap_or_else(|| {
                        m.coverage_pct
                            .map_or_else(String::new, |c| format!("{c}% of the window covered"))
                    });
                    (m.minion.clone(), why)
                })
                .collect();
        }
        Err(err) => page.problem = Some(provis_core::error_chain(&err)),
    }
    render(&page)
}
