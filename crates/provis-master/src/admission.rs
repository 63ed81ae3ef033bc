//! The master's auth callout: nats-server (configured by
//! [`provis_core::bus_access::server_auth_config`]) asks the master about
//! every connection on `$SYS.REQ.USER.AUTH`, and the master answers with who
//! the connection is and what it may do on the bus, or a refusal that
//! nats-server turns into an authorization error.
//!
//! A connection proves its key by the nonce signature nats-server checks
//! the shape of and the master verifies. The master's own key gets
//! everything; the keys of the settings' `operators` get
//! [`BusPermissions::admin`], those only in the call policy
//! [`BusPermissions::caller`]; anyone else is a minion claiming the id
//! in its user name, admitted only as [`Enrollment`] says, with
//! [`BusPermissions::minion`] for that id. Every refusal is an event.
//! Revoking a minion kicks its live connections through the system account.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use futures::StreamExt as _;
use provis_core::bus_access::{
    API_USER, BusPermissions, CALLOUT_SUBJECT, FLEET_ACCOUNT, SYSTEM_ACCOUNT, SYSTEM_USER,
};
use provis_core::identity::{DerivedKey, Identity, public_key_of_nkey};
use provis_core::{MinionId, Subjects, event, nats_jwt};
use serde_json::{Value, json};

use crate::enrollment::{Admission, Enrollment};

/// How long nats-server waits for the master is its own `auth_timeout`;
/// the master answers well within it or not at all.
const QUEUE_GROUP: &str = "provis-master";

/// The id events of the master are published under: no minion may take it.
const RESERVED_ID: &str = "master";

/// How long an admitted minion's or operator's connection lasts before
/// nats-server sends it back through the callout: the backstop for a
/// revocation whose kick failed, and how soon an operator removed from the
/// policy or settings loses a connection it holds.
const SESSION_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Up to this much is added to each session's lifetime, so the sessions of
/// a fleet admitted at once (after a restart) do not all end in one minute.
const SESSION_SPREAD: Duration = Duration::from_secs(2 * 3600);

/// A session's lifetime: [`SESSION_LIFETIME`] and a random part of
/// [`SESSION_SPREAD`].
fn session_lifetime() -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(provis_core::envelope::now_unix_ms().unsigned_abs());
    let spread = hasher.finish() % SESSION_SPREAD.as_secs().max(1);
    SESSION_LIFETIME + Duration::from_secs(spread)
}

/// Who a connection turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Admitted {
    Master(MasterConnection),
    /// In the master's `operators`: may change the fleet.
    Admin(String),
    /// Only in the call policy: may call (as the policy says) and read.
    Caller(String),
    /// In the master's `observers`: may read events, state and the registry.
    Observer(String),
    Minion(MinionId),
}

/// Which of the master's own connections is asking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MasterConnection {
    /// The fleet's account: everything.
    Fleet,
    /// The system account: kicks and server queries.
    System,
    /// The one that answers the master's API: replies to `_INBOX.>` only,
    /// whatever reply subject a request (or a `$SRV` verb) names.
    Api,
}

/// The callout's state: keys, the enrollment bucket once storage is up, the
/// system-account connection that kicks revoked minions.
#[derive(Debug)]
pub struct Gatekeeper {
    master_nkey: String,
    master_key: String,
    issuer: nkeys::KeyPair,
    subjects: Subjects,
    configured_operators: Vec<String>,
    observers: Vec<String>,
    policy_operators: RwLock<HashMap<String, String>>,
    metrics: Arc<provis_telemetry::Metrics>,
    enrollment: OnceLock<Enrollment>,
    events: OnceLock<provis_core::outbox::Outbox>,
    system: OnceLock<async_nats::Client>,
}

impl Gatekeeper {
    pub fn new(
        master: &Identity,
        subjects: Subjects,
        grants: Grants,
        metrics: Arc<provis_telemetry::Metrics>,
    ) -> Self {
        Self {
            master_nkey: master.nkey_public(),
            master_key: master.public_key().to_owned(),
            issuer: master.derived(DerivedKey::CalloutIssuer).clone(),
            subjects,
            configured_operators: grants.operators,
            observers: grants.observers,
            policy_operators: RwLock::default(),
            metrics,
            enrollment: OnceLock::new(),
            events: OnceLock::new(),
            system: OnceLock::new(),
        }
    }

    /// Once storage exists: minions can be admitted, refusals become events.
    pub fn ready(&self, enrollment: Enrollment, fleet: provis_core::outbox::Outbox) {
        let _ = self.enrollment.set(enrollment);
        let _ = self.events.set(fleet);
    }

    /// The master's connection to the system account, for kicking revoked
    /// minions (absent on a nats-server without the callout).
    pub fn set_system(&self, system: async_nats::Client) {
        let _ = self.system.set(system);
    }

    /// Subscribes to nats-server's questions; returns once the server has
    /// the subscription, so connections after this are answered.
    pub async fn listen(
        callout: &async_nats::Client,
    ) -> Result<async_nats::Subscriber, async_nats::Error> {
        let requests = callout
            .queue_subscribe(CALLOUT_SUBJECT, QUEUE_GROUP.to_owned())
            .await?;
        callout.flush().await?;
        Ok(requests)
    }

    /// Answers nats-server's questions until the master's work in flight is
    /// done (it admits the fleet's reconnections while the master drains),
    /// then unsubscribes: another master of the queue group answers.
    pub async fn serve(
        self: Arc<Self>,
        callout: async_nats::Client,
        mut requests: async_nats::Subscriber,
        lifecycle: provis_core::lifecycle::Lifecycle,
    ) {
        loop {
            let request = tokio::select! {
                () = lifecycle.closing() => break,
                request = requests.next() => match request {
                    Some(request) => request,
                    None => break,
                },
            };
            let (gatekeeper, callout) = (self.clone(), callout.clone());
            // Background, not work: admissions go on while the work drains.
            lifecycle.spawn_background(async move {
                let Some(reply) = request.reply.clone() else {
                    return;
                };
                let answer = gatekeeper.answer(&request.payload).await;
                if let Err(err) = callout.publish(reply, answer.into()).await {
                    tracing::warn!(error = %err, "auth callout answer not sent");
                }
            });
        }
        if let Err(err) = requests.unsubscribe().await {
            tracing::debug!(error = %err, "auth callout not unsubscribed");
        }
    }

    /// The signed answer to one authorization request.
    async fn answer(&self, payload: &[u8]) -> String {
        let request = match self.read_request(payload) {
            Ok(request) => request,
            Err(reason) => {
                // Not from a server: nothing to answer to.
                tracing::warn!(%reason, "auth callout request ignored");
                return String::new();
            }
        };
        let nats = &request["nats"];
        let user_nkey = nats["user_nkey"].as_str().unwrap_or_default();
        let server = nats["server_id"]["id"].as_str().unwrap_or_default();
        let mut response = json!({
            "sub": user_nkey,
            "aud": server,
            "nats": { "type": "authorization_response", "version": 2 },
        });
        let deciding = std::time::Instant::now();
        let decided = self.decide(nats).await;
        self.metrics
            .admission_duration
            .observe(deciding.elapsed().as_secs_f64());
        provis_telemetry::Metrics::outcome(
            &self.metrics.admissions,
            if decided.is_ok() {
                "admitted"
            } else {
                "refused"
            },
        );
        match decided {
            Ok(admitted) => {
                let (account, name, permissions) = self.grant(&admitted, nats);
                let mut claims = json!({
                    "sub": user_nkey,
                    "aud": account,
                    "name": name,
                    "nats": permissions.user_claims(),
                });
                if !matches!(admitted, Admitted::Master(_)) {
                    let expires = provis_core::envelope::now_unix_ms() / 1000
                        + i64::try_from(session_lifetime().as_secs()).unwrap_or(i64::MAX);
                    claims["exp"] = json!(expires);
                }
                match nats_jwt::encode(claims, &self.issuer) {
                    Ok(user) => response["nats"]["jwt"] = json!(user),
                    Err(err) => response["nats"]["error"] = json!(err.to_string()),
                }
            }
            Err(reason) => response["nats"]["error"] = json!(reason),
        }
        nats_jwt::encode(response, &self.issuer).unwrap_or_else(|err| {
            tracing::error!(error = %err, "auth callout answer cannot be signed");
            String::new()
        })
    }

    /// The request's claims, when a NATS server signed them for the callout.
    fn read_request(&self, payload: &[u8]) -> Result<Value, String> {
        let token = std::str::from_utf8(payload).map_err(|err| err.to_string())?;
        let claims = nats_jwt::decode(token).map_err(|err| err.to_string())?;
        let issuer = claims["iss"].as_str().unwrap_or_default();
        let from_server = nkeys::KeyPair::from_public_key(issuer)
            .is_ok_and(|key| key.key_pair_type() == nkeys::KeyPairType::Server);
        if !from_server || claims["aud"] != "nats-authorization-request" {
            return Err(format!(
                "not an authorization request from a server ({issuer})"
            ));
        }
        Ok(claims)
    }

    /// Who the connection is, or why it is refused.
    async fn decide(&self, request: &Value) -> Result<Admitted, String> {
        let options = &request["connect_opts"];
        let client = &request["client_info"];
        let host = client["host"].as_str().unwrap_or_default();
        let Some(nkey) = options["nkey"].as_str().filter(|k| !k.is_empty()) else {
            let reason =
                "no identity: connect with a provis key (identity / --identity / PROVIS_IDENTITY)";
            self.refused(None, "", host, reason).await;
            return Err(reason.into());
        };
        let key = public_key_of_nkey(nkey).unwrap_or_default();
        if let Err(reason) = verify_nonce(nkey, client, options) {
            self.refused(None, &key, host, &reason).await;
            return Err(reason);
        }
        if nkey == self.master_nkey {
            let connection = match options["user"].as_str() {
                Some(SYSTEM_USER) => MasterConnection::System,
                Some(API_USER) => MasterConnection::Api,
                _ => MasterConnection::Fleet,
            };
            return Ok(Admitted::Master(connection));
        }
        if self.configured_operators.contains(&key) {
            return Ok(Admitted::Admin(short_key(&key)));
        }
        if let Some(name) = self.policy_operator(&key) {
            return Ok(Admitted::Caller(name));
        }
        if self.observers.contains(&key) {
            return Ok(Admitted::Observer(short_key(&key)));
        }
        let claimed = options["user"].as_str().unwrap_or_default();
        let Some(minion) = claimed
            .parse::<MinionId>()
            .ok()
            .filter(|id| id.as_str() != RESERVED_ID)
        else {
            let reason = format!(
                "unknown key {key}, and its user name {claimed:?} is not a minion id (or is reserved): operators are listed in the master's `operators` or the call policy"
            );
            self.refused(None, &key, host, &reason).await;
            return Err(reason);
        };
        let Some(enrollment) = self.enrollment.get() else {
            return Err("the master is starting; try again".into());
        };
        let token = options["auth_token"].as_str();
        match enrollment.admit(&minion, &key, token, host).await {
            Ok(Admission::Admitted) => Ok(Admitted::Minion(minion)),
            Ok(Admission::AdmittedByToken) => {
                self.emit(
                    "minion.accepted",
                    json!({ "minion": minion, "key": key, "by": "token", "host": host }),
                )
                .await;
                Ok(Admitted::Minion(minion))
            }
            Ok(Admission::Pending { new }) => {
                if new {
                    self.emit(
                        "minion.pending",
                        json!({ "minion": minion, "key": key, "host": host }),
                    )
                    .await;
                }
                Err(format!(
                    "minion {minion} is pending: an operator accepts it with `provis keys accept {minion}`"
                ))
            }
            Ok(Admission::Refused(reason)) => {
                self.refused(Some(&minion), &key, host, &reason).await;
                Err(reason)
            }
            Err(err) => {
                tracing::warn!(error = %err, "enrollment not readable");
                Err(err.to_string())
            }
        }
    }

    /// The account, display name and permissions of an admitted connection.
    fn grant(
        &self,
        admitted: &Admitted,
        request: &Value,
    ) -> (&'static str, String, BusPermissions) {
        let nkey = request["connect_opts"]["nkey"].as_str().unwrap_or_default();
        match admitted {
            Admitted::Master(MasterConnection::System) => (
                SYSTEM_ACCOUNT,
                "master-system".into(),
                BusPermissions::everything(),
            ),
            Admitted::Master(MasterConnection::Fleet) => {
                (FLEET_ACCOUNT, "master".into(), BusPermissions::everything())
            }
            Admitted::Master(MasterConnection::Api) => (
                FLEET_ACCOUNT,
                "master-api".into(),
                BusPermissions::master_api(&self.subjects),
            ),
            Admitted::Admin(name) => (
                FLEET_ACCOUNT,
                format!("operator:{name}"),
                BusPermissions::admin(&self.subjects, nkey),
            ),
            Admitted::Caller(name) => (
                FLEET_ACCOUNT,
                format!("operator:{name}"),
                BusPermissions::caller(&self.subjects, nkey),
            ),
            Admitted::Observer(name) => (
                FLEET_ACCOUNT,
                format!("observer:{name}"),
                BusPermissions::observer(&self.subjects, nkey),
            ),
            Admitted::Minion(minion) => (
                FLEET_ACCOUNT,
                minion_user(minion),
                BusPermissions::minion(&self.subjects, minion, nkey),
            ),
        }
    }

    /// The name the call policy gives `key`, if it lists it.
    fn policy_operator(&self, key: &str) -> Option<String> {
        self.policy_operators
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(key)
            .cloned()
    }

    /// Disconnects every connection admitted as `minion`, on every server
    /// (found by the user name the callout gave them); they cannot come
    /// back, as the enrollment record now refuses them. Stateless, so it
    /// works for connections admitted before a master restart too.
    pub async fn kick(&self, minion: &MinionId) -> usize {
        let Some(system) = self.system.get() else {
            return 0;
        };
        let mut kicked = self.kick_round(system, minion).await;
        // A connection admitted just before the revocation was written may
        // register after the first look: look again once admissions in
        // flight are over.
        tokio::time::sleep(Duration::from_millis(500)).await;
        kicked += self.kick_round(system, minion).await;
        kicked
    }

    async fn kick_round(&self, system: &async_nats::Client, minion: &MinionId) -> usize {
        let user = minion_user(minion);
        let mut kicked = 0;
        for (server, client) in connections_of(system, &user).await {
            let subject = format!("$SYS.REQ.SERVER.{server}.KICK");
            let body = json!({ "cid": client }).to_string();
            match tokio::time::timeout(Duration::from_secs(2), system.request(subject, body.into()))
                .await
            {
                Ok(Ok(reply)) => {
                    let answer: Value = serde_json::from_slice(&reply.payload).unwrap_or_default();
                    if answer["error"].is_null() {
                        kicked += 1;
                    } else {
                        tracing::debug!(%minion, error = %answer["error"], "connection not kicked (gone already?)");
                    }
                }
                Ok(Err(err)) => tracing::warn!(%minion, error = %err, "kick not sent"),
                Err(_) => tracing::warn!(%minion, "kick not answered"),
            }
        }
        kicked
    }

    async fn refused(&self, minion: Option<&MinionId>, key: &str, host: &str, reason: &str) {
        tracing::info!(minion = ?minion.map(MinionId::as_str), %key, %host, %reason, "connection refused");
        self.emit(
            "auth.refused",
            json!({ "minion": minion, "key": key, "host": host, "reason": reason }),
        )
        .await;
    }

    async fn emit(&self, kind: &str, data: Value) {
        if let Some(outbox) = self.events.get() {
            event::emit(outbox, &self.subjects, "master", kind, data);
        }
    }

    /// Keeps the operators of the applied call policy (signed by this
    /// master) admitted as operators, for as long as the master runs.
    pub async fn follow_policy(
        self: Arc<Self>,
        js: async_nats::jetstream::Context,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let trusted = vec![self.master_key.clone()];
        let gatekeeper = self.clone();
        provis_core::call_auth::follow_policy(js, trusted, stop.cancelled_owned(), move |policy| {
            let operators: HashMap<String, String> = policy
                .unwrap_or_default()
                .operator
                .into_iter()
                .map(|operator| (operator.key, operator.name))
                .collect();
            *gatekeeper
                .policy_operators
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = operators;
        })
        .await;
    }
}

/// A short, recognisable form of a public key for names in server logs.
fn short_key(key: &str) -> String {
    key.chars().skip(8).take(12).collect()
}

/// The user name nats-server knows an admitted minion's connections by.
fn minion_user(minion: &MinionId) -> String {
    format!("minion:{minion}")
}

/// (server id, client id) of every open connection of `user` in the fleet's
/// account, from every server that answers within a moment.
async fn connections_of(system: &async_nats::Client, user: &str) -> Vec<(String, u64)> {
    let inbox = system.new_inbox();
    let Ok(mut answers) = system.subscribe(inbox.clone()).await else {
        return Vec::new();
    };
    // One page holds every connection a server could have for one user.
    let request = json!({ "user": user, "acc": FLEET_ACCOUNT, "limit": 1_000_000 }).to_string();
    if system
        .publish_with_reply("$SYS.REQ.SERVER.PING.CONNZ", inbox, request.into())
        .await
        .is_err()
    {
        return Vec::new();
    }
    let mut found = Vec::new();
    // Every server answers; a cluster's last answer comes within a moment.
    let mut wait = Duration::from_secs(2);
    while let Ok(Some(answer)) = tokio::time::timeout(wait, answers.next()).await {
        wait = Duration::from_millis(250);
        let answer: Value = serde_json::from_slice(&answer.payload).unwrap_or_default();
        let server = answer["server"]["id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        for connection in answer["data"]["connections"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if let Some(client) = connection["cid"].as_u64() {
                found.push((server.clone(), client));
            }
        }
    }
    found
}

/// Checks the connection signed the nonce nats-server gave it with `nkey`.
fn verify_nonce(nkey: &str, client: &Value, options: &Value) -> Result<(), String> {
    let nonce = client["nonce"].as_str().unwrap_or_default();
    let signature = options["sig"].as_str().unwrap_or_default();
    if nonce.is_empty() || signature.is_empty() {
        return Err(
            "no signed nonce: the server must issue nonces (an nkey user in its config does)"
                .into(),
        );
    }
    let signature = data_encoding::BASE64URL_NOPAD
        .decode(signature.trim_end_matches('=').as_bytes())
        .or_else(|_| data_encoding::BASE64.decode(signature.as_bytes()))
        .map_err(|_| "the nonce signature is not base64".to_owned())?;
    let key = nkeys::KeyPair::from_public_key(nkey)
        .map_err(|_| format!("{nkey:?} is not a public nkey"))?;
    key.verify(nonce.as_bytes(), &signature)
        .map_err(|_| "the nonce signature does not match the key".to_owned())
}

/// Who the master's settings admit besides minions and the call policy's
/// operators.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    /// Admin operators: may change the fleet.
    pub operators: Vec<String>,
    /// Observers: may read events, state and the registry, nothing else.
    pub observers: Vec<String>,
}

impl Grants {
    /// Checks every key is a public key, and none is both.
    pub fn check(&self) -> Result<(), String> {
        for (grant, keys) in [("operator", &self.operators), ("observer", &self.observers)] {
            if let Some(key) = keys
                .iter()
                .find(|key| !provis_core::identity::is_public_key(key))
            {
                return Err(format!(
                    "{grant} key {key:?} is not a public key (ed25519:<64 hex>, as `provis keys create` prints)"
                ));
            }
        }
        if let Some(key) = self
            .observers
            .iter()
            .find(|key| self.operators.contains(key))
        {
            return Err(format!(
                "key {key} is both an operator and an observer: list it once"
            ));
        }
        Ok(())
    }
}
