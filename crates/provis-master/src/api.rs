//! The master's endpoints (see [`provis_core::master_api`]) served as the
//! NATS service `provis-master`: one subscription per endpoint, in the
//! queue group every master shares, each request answered on a work task
//! of its own so a slow sync never holds up a ping.
//!
//! Registering an endpoint is one line in [`serve`]; its handler takes the
//! endpoint's request type and returns its response type or an
//! [`ApiError`], which travels as the services protocol's error headers.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::service::{Service, ServiceExt as _};
use futures::StreamExt as _;
use provis_core::envelope::now_unix_ms;
use provis_core::lifecycle::Lifecycle;
use provis_core::master_api::{
    self as api, ApiError, Endpoint, EnrollDecided, EnrollDecision, EnrollListRequest,
    EnrollmentPage, IndexStats, MinionConvergence, MinionEntry, MinionsPage, MinionsRequest,
    PingAnswer, PingRequest, QueryPage, QueryRequest, RoleAnswer, RoleRequest, SelectPart,
    SelectRequest, StatsRequest, StatusPage, StatusRequest, SyncAnswer, SyncRequest, TokenAnswer,
    TokenRequest, take_page,
};
use provis_core::selection::Filter;
use provis_core::{CallTarget, Subjects, event};
use serde_json::json;

use crate::MasterError;
use crate::desired::{DesiredRequest, PublishedConfig};
use crate::enrollment::{Enrollment, EnrollmentError};
use crate::fleet_view::FleetView;

/// How long a request may wait for the desired-state loop (a sync fetches).
const DESIRED_WAIT: Duration = Duration::from_secs(120);

/// How long a request right after a start waits for the registry to load.
const REGISTRY_WAIT: Duration = Duration::from_secs(5);

/// What requests are answered from.
#[derive(Debug)]
pub struct Served {
    pub public_key: String,
    pub nats: async_nats::Client,
    /// The master's events leave by it.
    pub outbox: provis_core::outbox::Outbox,
    pub subjects: Subjects,
    pub view: Arc<FleetView>,
    pub desired: tokio::sync::mpsc::Sender<DesiredRequest>,
    pub config: tokio::sync::watch::Receiver<PublishedConfig>,
    /// The applied commit's schedules.
    pub schedules: tokio::sync::watch::Receiver<Vec<crate::schedules::ScheduleSpec>>,
    pub enrollment: Enrollment,
    pub gatekeeper: Arc<crate::admission::Gatekeeper>,
    /// Whether this master leads (leader-only endpoints follow it).
    pub leadership: crate::leadership::Leadership,
    /// The lease bucket, where every master says it runs.
    pub leader_bucket: Option<async_nats::jetstream::kv::Store>,
    /// Where this master's dashboard is served, when it is.
    pub http_addr: Option<std::net::SocketAddr>,
}

impl Served {
    /// Bytes of items one page may hold: well under the bus's maximum
    /// payload, leaving room for the rest of the answer.
    fn page_budget(&self) -> usize {
        self.nats.server_info().max_payload.max(4_096) * 3 / 4
    }
}

/// The running service, shared by the endpoints (the leader-only ones add
/// themselves while their master leads); taken out to stop it.
pub type SharedService = Arc<std::sync::Mutex<Option<Service>>>;

/// Starts the `provis-master` service with every endpoint on `connection`
/// (one that may publish only to inboxes, on a secured fleet); the
/// endpoints stop taking requests when `lifecycle` stops, and answer those
/// they took. Endpoints only the leader serves are served while this
/// master leads.
pub async fn serve(
    served: Arc<Served>,
    connection: &async_nats::Client,
    lifecycle: &Lifecycle,
) -> Result<SharedService, MasterError> {
    let metadata = [
        ("prefix".to_owned(), served.subjects.prefix().to_string()),
        ("public_key".to_owned(), served.public_key.clone()),
    ]
    .into();
    let service = connection
        .service_builder()
        .description("the provis master: fleet, queries, desired state, enrollment")
        .metadata(metadata)
        .start(api::SERVICE_NAME, provis_core::VERSION)
        .await
        .map_err(|source| MasterError::Serve {
            what: api::SERVICE_NAME.to_owned(),
            source,
        })?;
    let service: SharedService = Arc::new(std::sync::Mutex::new(Some(service)));
    let endpoints = Endpoints {
        service: &service,
        served: &served,
        lifecycle,
        connection,
    };
    endpoints.add::<api::Ping, _, _>(ping).await?;
    endpoints.add_parts::<api::Select, _, _>(select).await?;
    endpoints.add::<api::Minions, _, _>(minions).await?;
    endpoints.add::<api::Query, _, _>(query).await?;
    endpoints.add::<api::Stats, _, _>(stats).await?;
    endpoints.add::<api::SyncNow, _, _>(sync).await?;
    endpoints.add::<api::Status, _, _>(status).await?;
    endpoints.add::<api::Role, _, _>(role).await?;
    endpoints.add::<api::EnrollList, _, _>(enroll_list).await?;
    endpoints
        .add::<api::EnrollDecide, _, _>(enroll_decide)
        .await?;
    endpoints
        .add::<api::EnrollToken, _, _>(enroll_token)
        .await?;
    endpoints.add::<api::Plan, _, _>(plan).await?;
    endpoints
        .add::<api::RolloutShow, _, _>(rollout_status)
        .await?;
    endpoints
        .add::<api::RolloutHistoryList, _, _>(rollout_history)
        .await?;
    endpoints
        .add::<api::RolloutControl, _, _>(rollout_control)
        .await?;
    endpoints.add::<api::RunBatches, _, _>(run_batches).await?;
    endpoints
        .add::<api::DashboardToken, _, _>(dashboard_token)
        .await?;
    endpoints.add::<api::Schedules, _, _>(schedule).await?;
    Ok(service)
}

struct Endpoints<'a> {
    service: &'a SharedService,
    served: &'a Arc<Served>,
    lifecycle: &'a Lifecycle,
    /// The connection answers go out on (parts before the last one too).
    connection: &'a async_nats::Client,
}

/// An endpoint's handler, its request decoded and its answer encoded: one
/// payload, or several parts sent in order.
type Handler = Arc<
    dyn Fn(Arc<Served>, bytes::Bytes) -> BoxFuture<'static, Result<Vec<Vec<u8>>, ApiError>>
        + Send
        + Sync,
>;

type BoxFuture<'a, T> = std::pin::Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Subscribes endpoint `E` on `service` (none once the service stopped).
async fn subscribe<E: Endpoint>(
    service: &SharedService,
    subject: &str,
) -> Result<Option<async_nats::service::endpoint::Endpoint>, MasterError> {
    let builder = service
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .as_ref()
        .map(|service| service.endpoint_builder());
    let Some(builder) = builder else {
        return Ok(None);
    };
    builder
        .name(E::NAME)
        .add(subject.to_owned())
        .await
        .map(Some)
        .map_err(|source| MasterError::Serve {
            what: subject.to_owned(),
            source,
        })
}

fn decoded<E: Endpoint>(payload: &[u8]) -> Result<E::Request, ApiError> {
    api::decode_request::<E::Request>(payload)
        .map_err(|err| ApiError::usage(format!("{} {}", E::SUBJECT, err.message)))
}

fn encoded<T: serde::Serialize>(response: &T) -> Result<Vec<u8>, ApiError> {
    serde_json::to_vec(response)
        .map_err(|err| ApiError::failed(format!("cannot encode the answer: {err}")))
}

impl Endpoints<'_> {
    /// Serves `E` with `handler`, one answer per request.
    async fn add<E, H, F>(&self, handler: H) -> Result<(), MasterError>
    where
        E: Endpoint + 'static,
        H: Fn(Arc<Served>, E::Request) -> F + Send + Sync + 'static,
        F: Future<Output = Result<E::Response, ApiError>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let handler: Handler = Arc::new(move |served, payload| {
            let handler = handler.clone();
            Box::pin(async move {
                let response = handler(served, decoded::<E>(&payload)?).await?;
                Ok(vec![encoded(&response)?])
            })
        });
        self.serve::<E>(handler).await
    }

    /// Serves `E` with `handler`, whose answer comes in parts (see
    /// [`api::Parts`]): each but the last is published to the request's
    /// inbox, the last is the reply.
    async fn add_parts<E, H, F>(&self, handler: H) -> Result<(), MasterError>
    where
        E: Endpoint + 'static,
        H: Fn(Arc<Served>, E::Request) -> F + Send + Sync + 'static,
        F: Future<Output = Result<Vec<E::Response>, ApiError>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let handler: Handler = Arc::new(move |served, payload| {
            let handler = handler.clone();
            Box::pin(async move {
                let parts = handler(served, decoded::<E>(&payload)?).await?;
                parts.iter().map(encoded).collect()
            })
        });
        self.serve::<E>(handler).await
    }

    /// Serves `E` from now on, or, for an endpoint only the leader serves,
    /// whenever this master leads.
    async fn serve<E: Endpoint + 'static>(&self, handler: Handler) -> Result<(), MasterError> {
        let subject = self.served.subjects.master(E::SUBJECT);
        let taker = Taker {
            endpoint: E::SUBJECT,
            served: self.served.clone(),
            handler,
            lifecycle: self.lifecycle.clone(),
            connection: self.connection.clone(),
        };
        let service = self.service.clone();
        if !E::LEADER_ONLY {
            let Some(endpoint) = subscribe::<E>(&service, &subject).await? else {
                return Ok(());
            };
            self.lifecycle.spawn_background(async move {
                taker.take_requests(endpoint, &subject, None).await;
            });
            return Ok(());
        }
        let lifecycle = self.lifecycle.clone();
        self.lifecycle.spawn_background(async move {
            let mut leading = taker.served.leadership.watch();
            loop {
                // Wait to lead.
                loop {
                    if leading.borrow_and_update().leading() {
                        break;
                    }
                    tokio::select! {
                        () = lifecycle.stopping() => return,
                        changed = leading.changed() => if changed.is_err() { return },
                    }
                }
                let endpoint = match subscribe::<E>(&service, &subject).await {
                    Ok(Some(endpoint)) => endpoint,
                    Ok(None) => return,
                    Err(err) => {
                        tracing::warn!(error = %provis_core::error_chain(&err), "leader endpoint not served; trying again");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                tracing::debug!(%subject, "serving while leading");
                if taker
                    .take_requests(endpoint, &subject, Some(&mut leading))
                    .await
                {
                    return;
                }
            }
        });
        Ok(())
    }
}

/// Takes the requests of one endpoint and answers each on a task of its own.
struct Taker {
    endpoint: &'static str,
    served: Arc<Served>,
    handler: Handler,
    lifecycle: Lifecycle,
    connection: async_nats::Client,
}

impl Taker {
    /// Answers requests on `endpoint` until the master stops (true) or, for a
    /// leader-only endpoint, stops leading (false); then unsubscribes and
    /// answers what the subscription still held.
    async fn take_requests(
        &self,
        mut endpoint: async_nats::service::endpoint::Endpoint,
        subject: &str,
        // Some for an endpoint only the leader serves.
        mut leading: Option<&mut tokio::sync::watch::Receiver<crate::leadership::LeaderState>>,
    ) -> bool {
        let take = |request| {
            self.lifecycle.spawn_work(answer(
                self.endpoint,
                self.served.clone(),
                request,
                self.handler.clone(),
                self.connection.clone(),
            ));
        };
        let stopped = loop {
            tokio::select! {
                () = self.lifecycle.stopping() => break true,
                still_leading = async {
                    match leading.as_deref_mut() {
                        Some(leading) => match leading.changed().await {
                            Ok(()) => leading.borrow_and_update().leading(),
                            Err(_) => false,
                        },
                        None => std::future::pending().await,
                    }
                } => {
                    if !still_leading {
                        break false;
                    }
                }
                request = endpoint.next() => match request {
                    Some(request) => take(request),
                    None => break true,
                },
            }
        };
        // Stop taking requests, then answer those the subscription already
        // holds: it ends once the server has the unsubscribe.
        if let Err(err) = endpoint.stop().await {
            tracing::debug!(%subject, error = %err, "endpoint not unsubscribed");
        }
        while let Ok(Some(request)) =
            tokio::time::timeout(Duration::from_secs(2), endpoint.next()).await
        {
            take(request);
        }
        stopped
    }
}

async fn answer(
    endpoint: &'static str,
    served: Arc<Served>,
    request: async_nats::service::Request,
    handler: Handler,
    connection: async_nats::Client,
) {
    let Some(reply) = request.message.reply.clone() else {
        return;
    };
    // The master may publish anywhere; a reply subject chosen by the asker
    // must not make it write somewhere else (a bucket, another's subject).
    if !reply.starts_with("_INBOX.") {
        tracing::warn!(subject = %request.message.subject, %reply, "request with a reply subject outside _INBOX ignored");
        return;
    }
    let max_payload = served.nats.server_info().max_payload;
    let outcome = handler(served, request.message.payload.clone()).await;
    // An answer the bus cannot carry is an error the caller sees, not a
    // silence it waits out.
    let outcome = outcome.and_then(|parts: Vec<Vec<u8>>| {
        match parts.iter().map(Vec::len).max() {
            Some(largest) if max_payload > 0 && largest > max_payload => Err(ApiError::failed(format!(
                "the answer takes {largest} bytes, more than the bus carries ({max_payload}); ask for smaller pages (limit)"
            ))),
            _ => Ok(parts),
        }
    });
    let response = match outcome {
        Ok(mut parts) => {
            let last = parts.pop().unwrap_or_default();
            let mut unsent = None;
            for part in parts {
                if let Err(err) = connection.publish(reply.clone(), part.into()).await {
                    unsent = Some(err);
                    break;
                }
            }
            match unsent {
                // The caller must not take what came for the whole answer.
                Some(err) => {
                    tracing::warn!(endpoint, error = %err, "part of an answer not sent");
                    Err(
                        ApiError::failed(format!("part of the answer not sent: {err}"))
                            .to_service_error(),
                    )
                }
                None => Ok(last.into()),
            }
        }
        Err(err) => {
            tracing::debug!(endpoint, kind = ?err.kind, error = %err.message, "request answered with an error");
            Err(err.to_service_error())
        }
    };
    if let Err(err) = request.respond(response).await {
        tracing::warn!(endpoint, error = %err, "answer not sent");
    }
}

/// Whom a call reaches, from this master's view; the selection travels in
/// parts that each fit the bus.
async fn select(served: Arc<Served>, request: SelectRequest) -> Result<Vec<SelectPart>, ApiError> {
    wait_for_registry(&served.view).await?;
    let target = CallTarget::parse_subject(&request.target)
        .map_err(|err| ApiError::usage(format!("select: {err}")))?;
    let filter = request
        .filter
        .as_deref()
        .map(Filter::parse)
        .transpose()
        .map_err(|err| ApiError::usage(err.to_string()))?;
    let selection = served
        .view
        .select(&target, filter.as_ref(), request.pick, request.seed)
        .map_err(|err| ApiError::usage(err.to_string()))?;
    Ok(SelectPart::split(&selection, served.page_budget()))
}

async fn ping(served: Arc<Served>, _: PingRequest) -> Result<PingAnswer, ApiError> {
    Ok(PingAnswer {
        version: provis_core::VERSION.to_owned(),
        public_key: served.public_key.clone(),
    })
}

async fn minions(served: Arc<Served>, request: MinionsRequest) -> Result<MinionsPage, ApiError> {
    wait_for_registry(&served.view).await?;
    let entries = served
        .view
        .map_records(|record, live, heard_ms_ago| MinionEntry {
            live,
            heard_ms_ago,
            record: record.clone(),
        });
    let (minions, next) = take_page(entries, &request.page, served.page_budget());
    Ok(MinionsPage { minions, next })
}

async fn query(served: Arc<Served>, request: QueryRequest) -> Result<QueryPage, ApiError> {
    if !served.view.rebuilt() {
        return Err(ApiError::unavailable(
            "the state index is still being rebuilt from the stream; try again in a moment",
        ));
    }
    wait_for_registry(&served.view).await?;
    let answer = {
        let registry = served.view.registry().clone();
        let presence = served.view.presence();
        let index = served.view.index();
        let now = std::time::Instant::now();
        let is_live = |record: &provis_core::registry::MinionRecord| {
            presence.liveness(record, now) == provis_core::presence::Liveness::Live
        };
        crate::query::answer(&request, &registry, &index, now_unix_ms(), &is_live)
    }
    .map_err(|err| ApiError::usage(err.to_string()))?;
    // Matches and short histories share one order (by minion), so a page
    // boundary cuts both at the same minion.
    let lines = answer
        .matches
        .into_iter()
        .map(|m| (m.minion.clone(), (true, m)))
        .chain(
            answer
                .short_history
                .into_iter()
                .map(|m| (m.minion.clone(), (false, m))),
        );
    let mut lines: Vec<_> = lines.collect();
    lines.sort_by(|a, b| a.0.cmp(&b.0));
    let (page, next) = take_page(lines, &request.page, served.page_budget());
    let (matches, short_history) = page.into_iter().partition::<Vec<_>, _>(|(full, _)| *full);
    Ok(QueryPage {
        matches: matches.into_iter().map(|(_, m)| m).collect(),
        short_history: short_history.into_iter().map(|(_, m)| m).collect(),
        considered: answer.considered,
        counters: answer.counters,
        next,
    })
}

async fn stats(served: Arc<Served>, request: StatsRequest) -> Result<IndexStats, ApiError> {
    Ok(served.view.stats(request.fingerprint))
}

async fn sync(served: Arc<Served>, _: SyncRequest) -> Result<SyncAnswer, ApiError> {
    ask_desired(&served, DesiredRequest::Sync).await
}

async fn status(served: Arc<Served>, request: StatusRequest) -> Result<StatusPage, ApiError> {
    wait_for_registry(&served.view).await?;
    let published = served.config.borrow().clone();
    let applied = published.applied.as_ref().map(|a| a.commit.clone());
    let minions = served
        .view
        .map_records(|record, live, _| MinionConvergence {
            minion: record.id.clone(),
            live,
            converged: applied.is_some() && record.converged_commit == applied,
            commit: record.converged_commit.clone(),
            failed: record
                .failing
                .as_ref()
                .filter(|failing| Some(&failing.commit) == applied.as_ref())
                .map(|failing| failing.services.clone())
                .unwrap_or_default(),
        });
    let (minions, next) = take_page(minions, &request.page, served.page_budget());
    let masters = match (&served.leader_bucket, &request.page.cursor) {
        (Some(bucket), None) => crate::leadership::masters(bucket).await,
        _ => Vec::new(),
    };
    Ok(StatusPage {
        masters,
        applied: published.applied,
        rejected: published.rejected,
        minions,
        next,
    })
}

/// The rollouts bucket, read by any master (the leader writes it).
async fn rollouts(served: &Served) -> Result<crate::rollout::RolloutStore, ApiError> {
    let js = async_nats::jetstream::new(served.nats.clone());
    js.get_key_value(provis_core::storage::BUCKET_ROLLOUTS)
        .await
        .map(crate::rollout::RolloutStore::new)
        .map_err(|err| ApiError::failed(format!("cannot open the rollouts: {err}")))
}

async fn rollout_status(
    served: Arc<Served>,
    _: api::RolloutStatusRequest,
) -> Result<api::RolloutAnswer, ApiError> {
    let store = rollouts(&served).await?;
    let read =
        |err: crate::rollout::RolloutStoreError| ApiError::failed(provis_core::error_chain(&err));
    let rollout = match store.active().await.map_err(read)? {
        Some(active) => Some(active),
        None => store.history().await.map_err(read)?.into_iter().next(),
    };
    Ok(api::RolloutAnswer { rollout })
}

async fn rollout_history(
    served: Arc<Served>,
    request: api::RolloutHistoryRequest,
) -> Result<api::RolloutHistory, ApiError> {
    let store = rollouts(&served).await?;
    let rollouts = store
        .history()
        .await
        .map_err(|err| ApiError::failed(provis_core::error_chain(&err)))?
        .into_iter()
        .take(request.limit.clamp(1, 200))
        .map(|record| record.summarized())
        .collect();
    Ok(api::RolloutHistory { rollouts })
}

async fn plan(served: Arc<Served>, request: api::PlanRequest) -> Result<api::PlanAnswer, ApiError> {
    ask_desired(&served, |reply| DesiredRequest::Plan {
        rev: request.rev,
        reply,
    })
    .await
}

async fn rollout_control(
    served: Arc<Served>,
    request: api::RolloutControlRequest,
) -> Result<api::RolloutAnswer, ApiError> {
    ask_desired(&served, |reply| DesiredRequest::Rollout {
        action: request.action,
        reply,
    })
    .await
}

async fn schedule(
    served: Arc<Served>,
    request: api::ScheduleRequest,
) -> Result<api::ScheduleAnswer, ApiError> {
    let js = async_nats::jetstream::new(served.nats.clone());
    let config = js
        .get_key_value(provis_core::storage::BUCKET_CONFIG)
        .await
        .map_err(|err| ApiError::failed(format!("the config bucket: {err}")))?;
    let specs = served.schedules.borrow().clone();
    crate::schedules::control(&config, &specs, &request).await
}

async fn dashboard_token(
    served: Arc<Served>,
    request: api::DashboardTokenRequest,
) -> Result<api::DashboardTokenAnswer, ApiError> {
    if request.ttl_s == 0 || request.ttl_s > api::MAX_DASHBOARD_TOKEN_TTL_S {
        return Err(ApiError::usage(format!(
            "a dashboard token lives 1 s to a day, not {} s",
            request.ttl_s
        )));
    }
    let token = provis_core::identity::random_hex(32)
        .map_err(|err| ApiError::failed(format!("no token: {err}")))?;
    let record = api::DashboardTokenRecord {
        expires_unix_ms: provis_core::envelope::now_unix_ms()
            .saturating_add(i64::try_from(request.ttl_s.saturating_mul(1000)).unwrap_or(i64::MAX)),
        by: request.by,
    };
    let js = async_nats::jetstream::new(served.nats.clone());
    let stored = async {
        let kv = js
            .get_key_value(provis_core::storage::BUCKET_CONFIG)
            .await
            .map_err(|err| err.to_string())?;
        let value = serde_json::to_vec(&record).map_err(|err| err.to_string())?;
        kv.put(
            api::dashboard_token_key(&provis_core::identity::sha256_hex(&token)),
            value.into(),
        )
        .await
        .map_err(|err| err.to_string())
    };
    stored
        .await
        .map_err(|err| ApiError::failed(format!("cannot record the token: {err}")))?;
    let url = served
        .http_addr
        .map(|addr| format!("http://{addr}/login?token={token}"));
    Ok(api::DashboardTokenAnswer {
        token,
        ttl_s: request.ttl_s,
        url,
    })
}

async fn run_batches(
    served: Arc<Served>,
    request: provis_core::jobs::JobBatches,
) -> Result<api::BatchesTaken, ApiError> {
    crate::rolling_calls::take(&served.nats, &served.subjects, &request).await?;
    Ok(api::BatchesTaken { job: request.job })
}

async fn role(served: Arc<Served>, request: RoleRequest) -> Result<RoleAnswer, ApiError> {
    ask_desired(&served, |reply| DesiredRequest::Role { request, reply }).await
}

async fn enroll_list(
    served: Arc<Served>,
    request: EnrollListRequest,
) -> Result<EnrollmentPage, ApiError> {
    let records = served
        .enrollment
        .list()
        .await
        .map_err(|err| enrollment_error(&err))?;
    let records = records
        .into_iter()
        .filter(|record| request.status.is_none_or(|status| record.status == status))
        .map(|record| (record.minion.to_string(), record));
    let (minions, next) = take_page(records, &request.page, served.page_budget());
    Ok(EnrollmentPage { minions, next })
}

async fn enroll_decide(
    served: Arc<Served>,
    request: EnrollDecision,
) -> Result<EnrollDecided, ApiError> {
    let by = request.by.unwrap_or_else(|| "operator".to_owned());
    let record = served
        .enrollment
        .decide(
            &request.minion,
            request.decision,
            &by,
            request.key.as_deref(),
        )
        .await
        .map_err(|err| enrollment_error(&err))?;
    let disconnected = if request.decision == api::Decision::Revoke {
        served.gatekeeper.kick(&request.minion).await
    } else {
        0
    };
    let kind = match request.decision {
        api::Decision::Accept => "minion.accepted",
        api::Decision::Reject => "minion.rejected",
        api::Decision::Revoke => "minion.revoked",
    };
    event::emit(
        &served.outbox,
        &served.subjects,
        "master",
        kind,
        json!({ "minion": record.minion, "key": record.key, "by": by, "disconnected": disconnected }),
    );
    Ok(EnrollDecided {
        record,
        disconnected,
    })
}

async fn enroll_token(served: Arc<Served>, request: TokenRequest) -> Result<TokenAnswer, ApiError> {
    if request.ttl_s == 0 || request.ttl_s > api::MAX_TOKEN_TTL_S {
        return Err(ApiError::usage(format!(
            "a token lives 1 s to {} days, not {} s",
            api::MAX_TOKEN_TTL_S / 86_400,
            request.ttl_s
        )));
    }
    let token = served
        .enrollment
        .issue_token(Duration::from_secs(request.ttl_s), request.minion)
        .await
        .map_err(|err| enrollment_error(&err))?;
    Ok(TokenAnswer {
        token,
        ttl_s: request.ttl_s,
    })
}

fn enrollment_error(err: &EnrollmentError) -> ApiError {
    match err {
        EnrollmentError::Unknown(_) => ApiError::not_found(err.to_string()),
        EnrollmentError::Store { .. } | EnrollmentError::Token(_) => {
            ApiError::failed(provis_core::error_chain(err))
        }
        EnrollmentError::NotApplicable { .. }
        | EnrollmentError::Conflict(_)
        | EnrollmentError::KeyMismatch { .. } => ApiError::conflict(err.to_string()),
    }
}

/// Hands a request to the desired-state loop and waits for its answer.
async fn ask_desired<T>(
    served: &Served,
    make: impl FnOnce(tokio::sync::oneshot::Sender<Result<T, ApiError>>) -> DesiredRequest,
) -> Result<T, ApiError> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    let stopped = || {
        ApiError::unavailable(
            "the master is stopping; ask another master or again after its restart",
        )
    };
    served
        .desired
        .send(make(reply))
        .await
        .map_err(|_| stopped())?;
    match tokio::time::timeout(DESIRED_WAIT, answer).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(_)) => Err(stopped()),
        Err(_) => Err(ApiError::unavailable(format!(
            "the master's desired-state loop did not answer within {DESIRED_WAIT:?}"
        ))),
    }
}

/// Waits until the master's view holds the registry (right after a start).
async fn wait_for_registry(view: &FleetView) -> Result<(), ApiError> {
    tokio::time::timeout(REGISTRY_WAIT, view.registry_loaded())
        .await
        .map_err(|_| ApiError::unavailable("the master is still reading the registry; try again"))
}
