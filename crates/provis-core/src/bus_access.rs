//! Least privilege on the bus: what each identity may publish and subscribe,
//! as the master's auth callout grants it and nats-server enforces it, and the
//! nats-server configuration that sends every connection to that callout.
//!
//! | identity | publishes | subscribes |
//! |---|---|---|
//! | master | everything | everything |
//! | the master's API connection | `_INBOX.>` only | `master.>`, `$SRV.>` |
//! | admin operator (the master's `operators`) | calls and their job records, `master.>`, `$SRV.>`, JetStream API | its inbox, events, state |
//! | calling operator (the call policy's) | calls and their job records, the master's read-only requests, the hand-over of its rolling calls and `$SRV.>`, reads of the registry, services, events and jobs | its inbox, events, state |
//! | observer (the master's `observers`) | reads of the events, state and registry streams | its inbox, events, state |
//! | minion `<id>` | `heartbeat.<id>`, `state.<id>`, `event.<id>.>`, `job.*.result.<id>`, `master.query`, its registry key (and reads it back), replies; reads its buckets | its own call subject, `all.call`, `role.>`, its inbox, the changes of what it follows (its assignment, the call policy, roles, service pointers) |
//!
//! Every identity's replies come to `_INBOX.<its nkey>.>`, which only it may
//! subscribe to, so no identity reads another's replies.

use serde_json::{Value, json};

use crate::identity::{DerivedKey, Identity};
use crate::storage::{
    BUCKET_ASSIGNMENTS, BUCKET_BUNDLES, BUCKET_CONFIG, BUCKET_ENROLLMENT, BUCKET_MINIONS,
    BUCKET_ROLES, BUCKET_SERVICES,
};
use crate::subject::{MinionId, Subjects};

/// The account fleet traffic lives in.
pub const FLEET_ACCOUNT: &str = "PROVIS";
/// The account the auth callout service connects in.
pub const CALLOUT_ACCOUNT: &str = "AUTH";
/// nats-server's system account (the master kicks revoked connections there).
pub const SYSTEM_ACCOUNT: &str = "SYS";
/// The user name the master's system-account connection gives.
pub const SYSTEM_USER: &str = "system";
/// The user name the connection that serves the master's API gives.
pub const API_USER: &str = "api";
/// Where nats-server sends each connection's credentials.
pub const CALLOUT_SUBJECT: &str = "$SYS.REQ.USER.AUTH";

/// The inbox prefix of the identity with this public nkey.
pub fn inbox_prefix(nkey: &str) -> String {
    format!("_INBOX.{nkey}")
}

/// Subjects an identity may publish and subscribe to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusPermissions {
    pub publish: Vec<String>,
    /// Exceptions to `publish`.
    pub publish_deny: Vec<String>,
    pub subscribe: Vec<String>,
    /// May answer requests it received (one reply each), wherever they point.
    pub responses: bool,
}

impl BusPermissions {
    /// The master: everything.
    pub fn everything() -> Self {
        Self {
            publish: vec![">".into()],
            publish_deny: Vec::new(),
            subscribe: vec![">".into()],
            responses: false,
        }
    }

    /// The master's API connection: it takes requests on the master's
    /// subjects and the services protocol's, and may publish only to
    /// inboxes, so a request naming another reply subject (a bucket's, say)
    /// cannot make the master write there.
    pub fn master_api(subjects: &Subjects) -> Self {
        Self {
            publish: vec!["_INBOX.>".into()],
            publish_deny: Vec::new(),
            subscribe: vec![subjects.wildcard("master"), "$SRV.>".into()],
            responses: false,
        }
    }

    /// An admin operator: calls anywhere, the master's requests, JetStream
    /// (to publish bundles and read the fleet's buckets), events and state;
    /// not the enrollment bucket (only through the master) nor the streams'
    /// existence and configuration (the master's).
    pub fn admin(subjects: &Subjects, nkey: &str) -> Self {
        let prefix = subjects.prefix();
        Self {
            publish: vec![
                format!("{prefix}.minion.*.call"),
                format!("{prefix}.all.call"),
                format!("{prefix}.role.>"),
                format!("{prefix}.master.>"),
                // Its calls as jobs (what it asked, how it ended).
                format!("{prefix}.job.*.request"),
                format!("{prefix}.job.*.summary"),
                format!("{prefix}.job.*.queue"),
                // Discovery of the master's endpoints (`nats micro ls|info|stats`).
                "$SRV.>".into(),
                "$JS.API.>".into(),
                "$KV.>".into(),
                "$O.>".into(),
            ],
            publish_deny: vec![
                format!("$KV.{BUCKET_ENROLLMENT}.>"),
                format!("$JS.API.*.*.KV_{BUCKET_ENROLLMENT}"),
                format!("$JS.API.*.*.KV_{BUCKET_ENROLLMENT}.>"),
                format!("$JS.API.*.*.*.KV_{BUCKET_ENROLLMENT}"),
                "$JS.API.STREAM.CREATE.>".into(),
                "$JS.API.STREAM.UPDATE.>".into(),
                "$JS.API.STREAM.DELETE.>".into(),
                "$JS.API.STREAM.PURGE.>".into(),
            ],
            subscribe: vec![
                format!("{}.>", inbox_prefix(nkey)),
                format!("{prefix}.event.>"),
                format!("{prefix}.state.>"),
                // Liveness as the masters hear it, for the operator's tools.
                format!("{prefix}.heartbeat.>"),
            ],
            responses: true,
        }
    }

    /// A calling operator (known only from the call policy): calls (which
    /// minions check against the policy), the master's read-only requests,
    /// and reads of the registry (to select), the services and the events;
    /// no desired state, no enrollment.
    pub fn caller(subjects: &Subjects, nkey: &str) -> Self {
        let prefix = subjects.prefix();
        let mut publish = vec![
            format!("{prefix}.minion.*.call"),
            format!("{prefix}.all.call"),
            format!("{prefix}.role.>"),
            format!("{prefix}.job.*.request"),
            format!("{prefix}.job.*.summary"),
            format!("{prefix}.job.*.queue"),
        ];
        for endpoint in crate::master_api::READ_ONLY_ENDPOINTS
            .iter()
            .chain(crate::master_api::CALLER_ENDPOINTS)
        {
            publish.push(subjects.master(endpoint));
        }
        publish.push("$SRV.>".into());
        for stream in [
            format!("KV_{BUCKET_MINIONS}"),
            format!("KV_{BUCKET_SERVICES}"),
            crate::storage::STREAM_EVENTS.to_owned(),
            crate::storage::STREAM_JOBS.to_owned(),
        ] {
            publish.extend(stream_reads(&stream));
        }
        Self {
            publish,
            publish_deny: Vec::new(),
            subscribe: vec![
                format!("{}.>", inbox_prefix(nkey)),
                format!("{prefix}.event.>"),
                format!("{prefix}.state.>"),
            ],
            responses: true,
        }
    }

    /// An observer (the master's `observers`): reads of events, state and
    /// the registry, live and from their streams; nothing it could change
    /// the fleet with, no calls, no requests to the master.
    pub fn observer(subjects: &Subjects, nkey: &str) -> Self {
        let prefix = subjects.prefix();
        let mut publish = Vec::new();
        for stream in [
            format!("KV_{BUCKET_MINIONS}"),
            crate::storage::STREAM_EVENTS.to_owned(),
            crate::storage::STREAM_STATE.to_owned(),
        ] {
            publish.extend(stream_reads(&stream));
        }
        // What client libraries ask before they use JetStream.
        publish.push("$JS.API.INFO".into());
        Self {
            publish,
            publish_deny: Vec::new(),
            subscribe: vec![
                format!("{}.>", inbox_prefix(nkey)),
                format!("{prefix}.event.>"),
                format!("{prefix}.state.>"),
            ],
            responses: false,
        }
    }

    /// Minion `id`: its own state, events and registry entry; reads of the
    /// buckets it follows; calls to it, to everyone and to roles.
    pub fn minion(subjects: &Subjects, id: &MinionId, nkey: &str) -> Self {
        let prefix = subjects.prefix();
        let mut publish = vec![
            subjects.heartbeat(id),
            format!("{prefix}.state.{id}"),
            format!("{prefix}.event.{id}.>"),
            // Its results of calls, recorded as jobs.
            format!("{prefix}.job.*.result.{id}"),
            subjects.master(<crate::master_api::Query as crate::master_api::Endpoint>::SUBJECT),
            format!("$KV.{BUCKET_MINIONS}.{id}"),
            format!("$JS.API.STREAM.INFO.KV_{BUCKET_MINIONS}"),
            // Its own record read back: the time the server stored it
            // corrects the minion's clock.
            format!("$JS.API.DIRECT.GET.KV_{BUCKET_MINIONS}.$KV.{BUCKET_MINIONS}.{id}"),
        ];
        let read = [
            format!("KV_{BUCKET_ROLES}"),
            format!("KV_{BUCKET_SERVICES}"),
            format!("KV_{BUCKET_ASSIGNMENTS}"),
            format!("KV_{BUCKET_CONFIG}"),
            format!("OBJ_{BUCKET_BUNDLES}"),
        ];
        for stream in read {
            publish.extend(stream_reads(&stream));
        }
        Self {
            publish,
            publish_deny: Vec::new(),
            subscribe: vec![
                subjects.minion_call(id),
                subjects.all_call(),
                format!("{prefix}.role.>"),
                format!("{}.>", inbox_prefix(nkey)),
                // What it follows (signed_entry::follow): changes as
                // published, its own assignment only.
                format!("$KV.{BUCKET_ASSIGNMENTS}.{id}"),
                format!("$KV.{BUCKET_CONFIG}.{}", crate::call_auth::POLICY_KEY),
                format!("$KV.{BUCKET_ROLES}.>"),
                format!("$KV.{BUCKET_SERVICES}.>"),
            ],
            responses: true,
        }
    }

    /// The permission part of a NATS user JWT's `nats` claims.
    pub fn user_claims(&self) -> Value {
        let mut claims = json!({
            "pub": { "allow": self.publish, "deny": self.publish_deny },
            "sub": { "allow": self.subscribe },
            "subs": -1,
            "data": -1,
            "payload": -1,
            "type": "user",
            "version": 2,
        });
        if self.responses {
            // A reply may come as late as a call may live.
            let ttl_ns = u64::try_from(
                crate::call_auth::MAX_CALL_LIFETIME
                    .saturating_add(std::time::Duration::from_secs(60))
                    .as_nanos(),
            )
            .unwrap_or(u64::MAX);
            claims["resp"] = json!({ "max": 1, "ttl": ttl_ns });
        }
        claims
    }
}

/// The JetStream API requests that read `stream`: its info, single
/// messages, and consumers on it (ordered consumers are recreated by name
/// after a reconnect); a consumer is deleted by its random name, which only
/// its creator knows (listing consumers is not granted).
fn stream_reads(stream: &str) -> Vec<String> {
    [
        "STREAM.INFO.{}",
        "STREAM.MSG.GET.{}",
        "DIRECT.GET.{}",
        "DIRECT.GET.{}.>",
        "CONSUMER.CREATE.{}",
        "CONSUMER.CREATE.{}.>",
        "CONSUMER.DELETE.{}.*",
        "CONSUMER.INFO.{}.*",
        "CONSUMER.MSG.NEXT.{}.*",
    ]
    .iter()
    .map(|api| format!("$JS.API.{}", api.replace("{}", stream)))
    .collect()
}

/// The part of a nats-server configuration that sends every connection to
/// the auth callout of the master holding `master`: the accounts, the
/// callout service's user and the key its answers must be signed with. The
/// rest (listen, TLS, JetStream store) is the deployment's.
pub fn server_auth_config(master: &Identity) -> String {
    let issuer = master.derived(DerivedKey::CalloutIssuer).public_key();
    let service = master.derived(DerivedKey::CalloutService).public_key();
    format!(
        "# Generated by provis for the master with key {master_key}.\n\
         # Every connection is admitted (or not) by that master's auth callout.\n\
         accounts {{\n  \
           {FLEET_ACCOUNT} {{ jetstream: enabled }}\n  \
           {CALLOUT_ACCOUNT} {{ jetstream: enabled, users: [ {{ nkey: \"{service}\" }} ] }}\n  \
           {SYSTEM_ACCOUNT} {{ }}\n\
         }}\n\
         system_account: {SYSTEM_ACCOUNT}\n\
         authorization {{\n  \
           auth_callout {{\n    \
             issuer: \"{issuer}\"\n    \
             account: {CALLOUT_ACCOUNT}\n    \
             auth_users: [ \"{service}\" ]\n  \
           }}\n\
         }}\n",
        master_key = master.public_key(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minion_may_publish_only_as_itself() {
        let subjects = Subjects::new("provis".parse().unwrap());
        let id: MinionId = "web-1".parse().unwrap();
        let granted = BusPermissions::minion(&subjects, &id, "UABC");
        assert!(granted.publish.contains(&"provis.state.web-1".to_owned()));
        assert!(granted.publish.contains(&"provis.event.web-1.>".to_owned()));
        assert!(granted.subscribe.contains(&"_INBOX.UABC.>".to_owned()));
        for theirs in [
            "provis.state.*",
            "provis.event.>",
            "provis.master.>",
            "$KV.provis_minions.*",
            "$JS.API.>",
        ] {
            assert!(!granted.publish.contains(&theirs.to_owned()), "{theirs}");
        }
        assert!(
            !granted
                .subscribe
                .iter()
                .any(|s| s.starts_with("provis.minion.*"))
        );
        let claims = granted.user_claims();
        assert_eq!(claims["resp"]["max"], 1);
        assert_eq!(claims["pub"]["allow"][0], "provis.heartbeat.web-1");
    }

    #[test]
    fn the_server_config_names_the_derived_keys() {
        let dir = tempfile::tempdir().unwrap();
        let master = Identity::create(&dir.path().join("master.key")).unwrap();
        let config = server_auth_config(&master);
        let issuer = master.derived(DerivedKey::CalloutIssuer).public_key();
        assert!(config.contains(&format!("issuer: \"{issuer}\"")));
        assert!(!config.contains(&master.nkey_public()));
    }
}
