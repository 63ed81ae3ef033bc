//! [`MasterClient`]: the one way every part of provis asks the master.

use std::time::Duration;

use super::error::{ApiError, MasterApiError};
use futures::StreamExt as _;

use super::{
    Endpoint, EnrollDecided, EnrollDecision, EnrollList, EnrollListRequest, EnrollToken,
    EnrollmentRecord, EnrollmentStatus, FleetStatus, IndexStats, MinionEntry, Minions,
    MinionsRequest, Paged, PagedRequest, Parts, Ping, PingAnswer, PingRequest, Query, QueryAnswer,
    QueryRequest, Role, RoleAnswer, RoleRequest, Select, SelectPart, SelectRequest, Stats,
    StatsRequest, Status, StatusRequest, SyncAnswer, SyncNow, SyncRequest, TokenAnswer,
    TokenRequest,
};
use crate::subject::{MinionId, Subjects};

/// How long a request only the leader serves waits for one to lead.
pub const LEADER_WAIT: Duration = Duration::from_secs(10);

/// The most pages one answer may take: far more than any fleet needs, so a
/// master that never ends its pages cannot keep a caller forever.
const MAX_PAGES: usize = 100_000;

/// How long a parted request waits in silence before it is asked again.
pub const RESEND_AFTER: Duration = Duration::from_millis(1_000);

/// How often a parted request checks whether to ask again.
const RESEND_CHECK: Duration = Duration::from_millis(100);

/// Asks the master over NATS, with typed requests and answers.
#[derive(Debug, Clone)]
pub struct MasterClient {
    nats: async_nats::Client,
    subjects: Subjects,
}

impl MasterClient {
    pub fn new(nats: async_nats::Client, subjects: Subjects) -> Self {
        Self { nats, subjects }
    }

    pub fn subjects(&self) -> &Subjects {
        &self.subjects
    }

    /// Asks `E`, waiting as long as the endpoint's own timeout.
    pub async fn request<E: Endpoint>(
        &self,
        request: &E::Request,
    ) -> Result<E::Response, MasterApiError> {
        self.request_within::<E>(request, E::TIMEOUT).await
    }

    /// Asks `E`, waiting at most `timeout`. An endpoint only the leader
    /// serves is asked again while nobody serves it (masters handing the
    /// lease over), for up to [`LEADER_WAIT`].
    pub async fn request_within<E: Endpoint>(
        &self,
        request: &E::Request,
        timeout: Duration,
    ) -> Result<E::Response, MasterApiError> {
        let started = tokio::time::Instant::now();
        loop {
            match self.request_once::<E>(request, timeout).await {
                Err(MasterApiError::NoMaster { .. })
                    if E::LEADER_ONLY && started.elapsed() < LEADER_WAIT =>
                {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                outcome => return outcome,
            }
        }
    }

    async fn request_once<E: Endpoint>(
        &self,
        request: &E::Request,
        timeout: Duration,
    ) -> Result<E::Response, MasterApiError> {
        let subject = self.subjects.master(E::SUBJECT);
        let payload = serde_json::to_vec(request).map_err(|source| MasterApiError::Encode {
            subject: subject.clone(),
            source,
        })?;
        let ask = async_nats::Request::new()
            .payload(payload.into())
            .timeout(Some(timeout));
        let answer = match self.nats.send_request(subject.clone(), ask).await {
            Ok(answer) => answer,
            Err(err) => {
                return Err(match err.kind() {
                    async_nats::RequestErrorKind::NoResponders => {
                        MasterApiError::NoMaster { subject }
                    }
                    async_nats::RequestErrorKind::TimedOut => {
                        MasterApiError::Timeout { subject, timeout }
                    }
                    _ => MasterApiError::Request {
                        subject,
                        source: err,
                    },
                });
            }
        };
        if let Some(error) = answer.headers.as_ref().and_then(ApiError::from_headers) {
            return Err(error.into());
        }
        serde_json::from_slice(&answer.payload)
            .map_err(|source| MasterApiError::Decode { subject, source })
    }

    /// Every part of `E`'s answer to `request`, in order: the master sends
    /// them to one inbox, one after the other, the last saying so. The first
    /// part must come within `timeout`, each next one within `timeout` of
    /// the one before.
    ///
    /// A request published as a node dies is lost with it, and so is one
    /// routed to a master that is reconnecting; waiting out `timeout` then
    /// turns a blip into a slow call. So until the first part comes, the
    /// request is asked again, each time on a fresh inbox, whenever this
    /// client reconnected or [`RESEND_AFTER`] passed in silence; the first
    /// attempt to answer is the one read to its end. `E` must be read-only.
    pub async fn request_parts<E>(
        &self,
        request: &E::Request,
        timeout: Duration,
    ) -> Result<Vec<E::Response>, MasterApiError>
    where
        E: Endpoint,
        E::Response: Parts,
    {
        let subject = self.subjects.master(E::SUBJECT);
        let payload: bytes::Bytes = serde_json::to_vec(request)
            .map_err(|source| MasterApiError::Encode {
                subject: subject.clone(),
                source,
            })?
            .into();
        let failed = |err: async_nats::Error| MasterApiError::Parts {
            subject: subject.clone(),
            source: err,
        };
        let ask = |attempt: usize| {
            let (nats, subject, payload) = (self.nats.clone(), subject.clone(), payload.clone());
            async move {
                let inbox = nats.new_inbox();
                let answers = nats.subscribe(inbox.clone()).await?;
                nats.publish_with_reply(subject, inbox, payload).await?;
                Ok::<_, async_nats::Error>(answers.map(move |answer| (attempt, answer)))
            }
        };
        let connects = || {
            self.nats
                .statistics()
                .connects
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        let started = tokio::time::Instant::now();
        let mut answers = futures::stream::SelectAll::new();
        answers.push(ask(0).await.map_err(&failed)?);
        let (mut asked, mut asked_at, mut seen_connects) = (1, started, connects());
        let mut tick = tokio::time::interval(RESEND_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (mut chosen, mut deadline) = (None, started + timeout);
        let mut parts = Vec::new();
        loop {
            let answer = tokio::select! {
                answer = answers.next() => answer,
                _ = tick.tick(), if chosen.is_none() => {
                    let now = tokio::time::Instant::now();
                    let reconnected = connects() != seen_connects;
                    if reconnected || now - asked_at >= RESEND_AFTER {
                        tracing::debug!(%subject, reconnected, attempt = asked, "asking again");
                        answers.push(ask(asked).await.map_err(&failed)?);
                        (asked, asked_at, seen_connects) = (asked + 1, now, connects());
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(MasterApiError::Timeout { subject, timeout });
                }
            };
            let Some((attempt, answer)) = answer else {
                return Err(failed("the answer's subscription ended".into()));
            };
            if chosen.is_some_and(|chosen| chosen != attempt) {
                continue;
            }
            if answer.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
                return Err(MasterApiError::NoMaster { subject });
            }
            if let Some(error) = answer.headers.as_ref().and_then(ApiError::from_headers) {
                return Err(error.into());
            }
            let part: E::Response = serde_json::from_slice(&answer.payload).map_err(|source| {
                MasterApiError::Decode {
                    subject: subject.clone(),
                    source,
                }
            })?;
            (chosen, deadline) = (Some(attempt), tokio::time::Instant::now() + timeout);
            let last = part.is_last();
            parts.push(part);
            if last {
                return Ok(parts);
            }
            if parts.len() >= MAX_PAGES {
                return Err(failed("the answer never ended".into()));
            }
        }
    }

    /// Whom a call reaches, as the master sees the fleet.
    pub async fn select(
        &self,
        request: &SelectRequest,
        timeout: Duration,
    ) -> Result<crate::selection::Selection, MasterApiError> {
        let parts = self.request_parts::<Select>(request, timeout).await?;
        SelectPart::join(parts)
    }

    /// Every page of `E`'s answer to `request`, in order.
    pub async fn pages<E>(
        &self,
        mut request: E::Request,
    ) -> Result<Vec<E::Response>, MasterApiError>
    where
        E: Endpoint,
        E::Request: PagedRequest,
        E::Response: Paged,
    {
        let mut pages = Vec::new();
        loop {
            let page = self.request::<E>(&request).await?;
            let next = page.next().map(str::to_owned);
            pages.push(page);
            let Some(next) = next else {
                return Ok(pages);
            };
            if request.page_mut().cursor.as_deref() == Some(next.as_str())
                || pages.len() >= MAX_PAGES
            {
                return Err(MasterApiError::PagesStuck {
                    subject: self.subjects.master(E::SUBJECT),
                    cursor: next,
                });
            }
            request.page_mut().cursor = Some(next);
        }
    }

    /// What revision `rev` (none: the branch's head) would change.
    pub async fn plan(&self, rev: Option<String>) -> Result<super::PlanAnswer, MasterApiError> {
        self.request::<super::Plan>(&super::PlanRequest { rev })
            .await
    }

    /// The active rollout, else the last one (none before the first).
    pub async fn rollout(&self) -> Result<Option<super::RolloutRecord>, MasterApiError> {
        Ok(self
            .request::<super::RolloutShow>(&Default::default())
            .await?
            .rollout)
    }

    /// The latest `limit` rollouts, the newest first.
    pub async fn rollout_history(
        &self,
        limit: usize,
    ) -> Result<Vec<super::RolloutRecord>, MasterApiError> {
        let request = super::RolloutHistoryRequest { limit };
        Ok(self
            .request::<super::RolloutHistoryList>(&request)
            .await?
            .rollouts)
    }

    /// Pauses, resumes or aborts the active rollout; returns it after.
    pub async fn control_rollout(
        &self,
        action: super::RolloutAction,
    ) -> Result<Option<super::RolloutRecord>, MasterApiError> {
        let request = super::RolloutControlRequest { action };
        Ok(self
            .request::<super::RolloutControl>(&request)
            .await?
            .rollout)
    }

    /// Who the master is.
    pub async fn ping(&self) -> Result<PingAnswer, MasterApiError> {
        self.request::<Ping>(&PingRequest {}).await
    }

    /// Every registry record, with whether each minion is live.
    pub async fn minions(&self) -> Result<Vec<MinionEntry>, MasterApiError> {
        Ok(self
            .pages::<Minions>(MinionsRequest::default())
            .await?
            .into_iter()
            .flat_map(|page| page.minions)
            .collect())
    }

    /// Which minions match a query, every page taken.
    pub async fn query(&self, request: QueryRequest) -> Result<QueryAnswer, MasterApiError> {
        let mut answer = QueryAnswer {
            matches: Vec::new(),
            short_history: Vec::new(),
            considered: 0,
            counters: Default::default(),
        };
        for page in self.pages::<Query>(request).await? {
            answer.considered = page.considered;
            answer.counters = page.counters;
            answer.matches.extend(page.matches);
            answer.short_history.extend(page.short_history);
        }
        Ok(answer)
    }

    /// The state index in numbers (with a digest of it all when `fingerprint`).
    pub async fn stats(&self, fingerprint: bool) -> Result<IndexStats, MasterApiError> {
        self.request::<Stats>(&StatsRequest { fingerprint }).await
    }

    /// Fetch the config repository now and apply what is new.
    pub async fn sync(&self) -> Result<SyncAnswer, MasterApiError> {
        self.request::<SyncNow>(&SyncRequest {}).await
    }

    /// The applied commit and every registered minion's convergence.
    pub async fn status(&self) -> Result<FleetStatus, MasterApiError> {
        let mut status = FleetStatus {
            masters: Vec::new(),
            applied: None,
            rejected: None,
            minions: Vec::new(),
        };
        for page in self.pages::<Status>(StatusRequest::default()).await? {
            if status.masters.is_empty() {
                status.masters = page.masters;
            }
            status.applied = page.applied;
            status.rejected = page.rejected;
            status.minions.extend(page.minions);
        }
        Ok(status)
    }

    /// Changes a minion's roles over what git assigns.
    pub async fn change_role(&self, request: &RoleRequest) -> Result<RoleAnswer, MasterApiError> {
        self.request::<Role>(request).await
    }

    /// Enrollment records with `status` (none: all).
    pub async fn enrollments(
        &self,
        status: Option<EnrollmentStatus>,
    ) -> Result<Vec<EnrollmentRecord>, MasterApiError> {
        let request = EnrollListRequest {
            status,
            ..EnrollListRequest::default()
        };
        Ok(self
            .pages::<EnrollList>(request)
            .await?
            .into_iter()
            .flat_map(|page| page.minions)
            .collect())
    }

    /// Accepts, rejects or revokes a minion's key.
    pub async fn decide_enrollment(
        &self,
        decision: &EnrollDecision,
    ) -> Result<EnrollDecided, MasterApiError> {
        self.request::<super::EnrollDecide>(decision).await
    }

    /// A one-time enrollment token, valid for `ttl` (for `minion` only, when given).
    pub async fn enrollment_token(
        &self,
        ttl: Duration,
        minion: Option<MinionId>,
    ) -> Result<TokenAnswer, MasterApiError> {
        let request = TokenRequest {
            ttl_s: ttl.as_secs().max(1),
            minion,
        };
        self.request::<EnrollToken>(&request).await
    }

    /// A one-time login token for the dashboard, valid for `ttl`.
    pub async fn dashboard_token(
        &self,
        ttl: Duration,
        by: Option<String>,
    ) -> Result<super::DashboardTokenAnswer, MasterApiError> {
        let request = super::DashboardTokenRequest {
            ttl_s: ttl.as_secs().max(1),
            by,
        };
        self.request::<super::DashboardToken>(&request).await
    }
}
