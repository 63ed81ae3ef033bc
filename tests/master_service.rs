//! End-to-end: the master as the NATS service `provis-master`. Outside
//! tools discover it through the services protocol; every endpoint answers
//! a bad request with a typed error and keeps serving; subjects it does not
//! serve have no responder; answers that grow with the fleet come in pages
//! that each fit the bus's maximum payload.
#![cfg(test)]

use std::path::Path;
use std::time::Duration;

use provis_core::envelope::now_unix_ms;
use provis_core::master_api::{
    self, ApiError, ApiErrorKind, EnrollmentRecord, EnrollmentStatus, QueryMode, QueryRequest,
};
use provis_core::registry::{self, MinionRecord, MinionStatus};
use provis_testkit::{NatsServer, TestFleet, UpFleet, eventually, python_command, run_to_end};
use serde_json::{Value, json};

fn provis() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_provis"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outside_client_discovers_the_master_through_the_services_protocol() {
    let up = UpFleet::start(provis(), 1, &["--insecure"])
        .await
        .expect("provis up");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/discover_master.py");
    let (code, stdout, stderr) = run_to_end(python_command(&script).arg(up.url()))
        .expect("python3 runs (scripts/test.sh installs nats-py)");
    assert_eq!(code, 0, "{stderr}");
    let found: Value = serde_json::from_str(&stdout).expect("json");

    let pings = found["ping"].as_array().expect("ping answers");
    assert!(
        pings.iter().any(|p| p["name"] == master_api::SERVICE_NAME),
        "$SRV.PING names provis-master: {pings:?}"
    );
    let info = &found["info"];
    assert_eq!(info["name"], master_api::SERVICE_NAME);
    assert_eq!(info["metadata"]["prefix"], "provis");
    let listed: Vec<&str> = info["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .filter_map(|e| e["subject"].as_str())
        .collect();
    for subject in master_api::ENDPOINTS {
        let wanted = format!("provis.master.{subject}");
        assert!(
            listed.contains(&wanted.as_str()),
            "{wanted} is listed: {listed:?}"
        );
    }
    assert_eq!(listed.len(), master_api::ENDPOINTS.len(), "{listed:?}");
    // `provis up` asked the master who it is while it waited for it.
    let stats = found["stats"]["endpoints"].as_array().expect("stats");
    let ping = stats
        .iter()
        .find(|e| e["name"] == "ping")
        .expect("ping's counters");
    assert!(ping["num_requests"].as_u64() >= Some(1), "{ping}");

    let output = up.stop().await.expect("up stops");
    assert!(output.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_answers_a_bad_request_with_a_typed_error_and_goes_on() {
    let mut fleet = TestFleet::start().await.expect("fleet");
    fleet.add_minion("m1", &[]).await.expect("m1");
    let nats = fleet.connect().await.expect("nats");
    let subjects = fleet.subjects();
    // Not JSON, and JSON of the wrong shape, for every endpoint; and a
    // field of the wrong type for those that take fields.
    let wrong_fields: &[(&str, &str)] = &[
        ("minions", r#"{"cursor": 5}"#),
        ("query", r#"{"expression": 7}"#),
        ("stats", r#"{"fingerprint": "yes"}"#),
        ("status", r#"{"limit": "all"}"#),
        ("role", r#"{"op": "promote", "minion": "m1"}"#),
        ("enroll.list", r#"{"status": "sleeping"}"#),
        ("enroll.decide", r#"{"minion": "m1", "decision": "maybe"}"#),
        ("enroll.token", r#"{"ttl_s": -5}"#),
    ];
    let mut cases: Vec<(&str, &str)> = master_api::ENDPOINTS
        .iter()
        .flat_map(|subject| [(*subject, "{not json"), (*subject, "\"a string\"")])
        .collect();
    cases.extend_from_slice(wrong_fields);
    for (subject, payload) in cases {
        let answer = nats
            .request(subjects.master(subject), payload.as_bytes().to_vec().into())
            .await
            .unwrap_or_else(|err| panic!("{subject} answers {payload}: {err}"));
        let error = answer
            .headers
            .as_ref()
            .and_then(ApiError::from_headers)
            .unwrap_or_else(|| panic!("{subject} refuses {payload}: {:?}", answer.payload));
        assert_eq!(
            error.kind,
            ApiErrorKind::Usage,
            "{subject} {payload}: {error}"
        );
        assert!(
            error.message.starts_with(subject),
            "the error names the endpoint: {error}"
        );
    }

    // Typed all the way: a query over a field no minion has is a usage
    // error (the CLI exits 2), an unknown minion is not found (exit 1).
    let master = fleet.master().await.expect("master client");
    let err = master
        .query(QueryRequest {
            expression: "state.nosuch.field > 1.0".into(),
            mode: QueryMode::Latest,
            window_ms: 0,
            page: Default::default(),
        })
        .await
        .expect_err("no minion has that field");
    assert!(err.is_usage(), "{err}");
    let (code, _, stderr) = run_to_end(
        fleet
            .provis_command(provis())
            .args(["query", "state.nosuch.field > 1.0"]),
    )
    .expect("provis query");
    assert_eq!(code, 2, "{stderr}");
    let err = master
        .decide_enrollment(&master_api::EnrollDecision {
            minion: "nobody".parse().expect("id"),
            decision: master_api::Decision::Accept,
            by: None,
            key: None,
        })
        .await
        .expect_err("nobody asked to join");
    assert_eq!(err.kind(), Some(ApiErrorKind::NotFound), "{err}");
    assert!(!err.is_usage());
    let (code, _, stderr) = run_to_end(
        fleet
            .provis_command(provis())
            .args(["keys", "accept", "nobody"]),
    )
    .expect("provis keys accept");
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("no minion nobody asked to join"),
        "{stderr}"
    );

    // Unknown endpoints are not served at all: no responder.
    for subject in ["nope", "enroll", "enroll.nope", "ping.extra"] {
        let err = nats
            .request(subjects.master(subject), "".into())
            .await
            .expect_err("nobody answers");
        assert_eq!(
            err.kind(),
            async_nats::RequestErrorKind::NoResponders,
            "{subject}"
        );
    }
    let typed = master
        .request_within::<master_api::Ping>(&Default::default(), Duration::from_secs(2))
        .await;
    assert!(typed.is_ok(), "the master still answers: {typed:?}");

    // The protocol counts them: requests and errors per endpoint.
    let stats = nats
        .request("$SRV.STATS.provis-master", "".into())
        .await
        .expect("stats");
    let stats: Value = serde_json::from_slice(&stats.payload).expect("json");
    let role = stats["endpoints"]
        .as_array()
        .and_then(|all| all.iter().find(|e| e["name"] == "role"))
        .cloned()
        .expect("role's counters");
    assert_eq!(role["num_errors"], 3, "{role}");
    assert_eq!(role["num_requests"], 3, "{role}");
    assert!(
        role["last_error"]
            .as_str()
            .is_some_and(|e| e.starts_with("400:")),
        "{role}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_that_grow_with_the_fleet_come_in_pages_under_the_max_payload() {
    const MAX_PAYLOAD: usize = 16 * 1024;
    const MINIONS: usize = 300;
    let nats = NatsServer::start_with_settings(&format!("max_payload: {MAX_PAYLOAD}\n"))
        .expect("nats-server");
    let fleet = TestFleet::start_on(nats, |_| {}).await.expect("fleet");
    let client = fleet.connect().await.expect("nats");
    let js = async_nats::jetstream::new(client.clone());
    let store = registry::open_registry(&js).await.expect("registry");
    let enrollment = js
        .get_key_value(provis_core::storage::BUCKET_ENROLLMENT)
        .await
        .expect("enrollment bucket");
    for n in 0..MINIONS {
        let id = format!("r{n:03}");
        let record = MinionRecord {
            id: id.parse().expect("id"),
            hostname: format!("host-{n}"),
            roles: vec!["web".parse().expect("role")],
            version: provis_core::VERSION.into(),
            status: MinionStatus::Online,
            started_unix_ms: now_unix_ms(),
            written_unix_ms: now_unix_ms(),
            // Live for the whole test without beating.
            heartbeat_interval_ms: 600_000,
            services: Default::default(),
            facts: json!({ "os": "debian", "cpus": 2 }),
            state: json!({ "mem": { "free_pct": 5.0 } }),
            converged_commit: None,
            failing: None,
            overlay_roles: Vec::new(),
            grpc_addr: None,
            grpc_tls: false,
            grpc_tls_cert: None,
            public_key: None,
            encryption_key: None,
            encryption_key_signature: None,
        };
        registry::put_record(&store, &record).await.expect("record");
        let enrolled = EnrollmentRecord {
            minion: id.parse().expect("id"),
            key: format!("ed25519:{}", "ab".repeat(32)),
            status: EnrollmentStatus::Pending,
            since_unix_ms: now_unix_ms(),
            by: "minion".into(),
            host: "127.0.0.1".into(),
        };
        enrollment
            .put(&id, serde_json::to_vec(&enrolled).expect("json").into())
            .await
            .expect("enrollment record");
    }
    let master = fleet.master().await.expect("master client");
    eventually(
        "the master's view holds every record",
        Duration::from_secs(20),
        || async { master.minions().await.is_ok_and(|all| all.len() == MINIONS) },
    )
    .await
    .expect("all there");

    // One raw page: under the maximum payload, with more to come.
    let first = client
        .request(client_subject(&fleet, "minions"), "{}".into())
        .await
        .expect("a page");
    assert!(
        first.payload.len() < MAX_PAYLOAD,
        "{} bytes",
        first.payload.len()
    );
    let page: master_api::MinionsPage = serde_json::from_slice(&first.payload).expect("page");
    assert!(page.next.is_some() && page.minions.len() < MINIONS);
    let limited = client
        .request(client_subject(&fleet, "minions"), r#"{"limit": 7}"#.into())
        .await
        .expect("a page");
    let limited: master_api::MinionsPage = serde_json::from_slice(&limited.payload).expect("page");
    assert_eq!(limited.minions.len(), 7);
    assert_eq!(limited.next.as_deref(), Some("r006"));

    // Every page taken: each minion once, in order.
    let all = master.minions().await.expect("minions");
    let ids: Vec<String> = all.iter().map(|m| m.record.id.to_string()).collect();
    let expected: Vec<String> = (0..MINIONS).map(|n| format!("r{n:03}")).collect();
    assert_eq!(ids, expected);
    assert!(all.iter().all(|m| m.live));
    let status = master.status().await.expect("status");
    assert_eq!(status.minions.len(), MINIONS);
    let low = master
        .query(QueryRequest {
            expression: "state.mem.free_pct < 10.0".into(),
            mode: QueryMode::Latest,
            window_ms: 0,
            page: Default::default(),
        })
        .await
        .expect("query");
    assert_eq!(low.matches.len(), MINIONS);
    assert_eq!(low.considered, MINIONS);
    let pending = master
        .enrollments(Some(EnrollmentStatus::Pending))
        .await
        .expect("enrollments");
    assert_eq!(pending.len(), MINIONS);
    // The CLI reads the same pages.
    let (code, stdout, stderr) = run_to_end(
        fleet
            .provis_command(provis())
            .args(["minions", "--output", "json"]),
    )
    .expect("provis minions");
    assert_eq!(code, 0, "{stderr}");
    let listed: Vec<Value> = serde_json::from_str(&stdout).expect("json");
    assert_eq!(listed.len(), MINIONS);
    let err = master
        .request::<master_api::Minions>(&master_api::MinionsRequest {
            page: master_api::PageRequest {
                cursor: Some("r299".into()),
                limit: None,
            },
        })
        .await
        .expect("past the end");
    assert!(err.minions.is_empty() && err.next.is_none());
}

fn client_subject(fleet: &TestFleet, endpoint: &str) -> String {
    fleet.subjects().master(endpoint)
}
