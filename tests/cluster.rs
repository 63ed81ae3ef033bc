//! End-to-end: a fleet on a 3-node NATS cluster with replicated storage
//! (replicas = 3). Any one node may die: the minions answer through the
//! others, an apply completes, every event acknowledged is stored once, and
//! a whole cluster that restarts brings the fleet back by itself.
#![cfg(test)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use provis_core::lifecycle::Lifecycle;
use provis_core::outbox::Outbox;
use provis_core::{CallRequest, CallTarget, Client};
use provis_testkit::{GitRepo, NatsServer, TestFleet, UpFleet, eventually, run_to_end};
use serde_json::Value;

const MINIONS: usize = 6;

fn provis() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_BIN_EXE_provis"))
}

/// Six minions, two on each node, each given only its own node's URL (it
/// learns the others from the cluster), and the master following `repo`.
async fn fleet_on_three_nodes(repo: Option<&GitRepo>) -> TestFleet {
    let cluster = NatsServer::start_cluster(3).await.expect("cluster");
    let source = repo.map(GitRepo::path_string);
    let mut fleet = TestFleet::start_on(cluster, |config| {
        config.replicas = 3;
        config.repository = source;
        config.poll_interval_s = 3600;
    })
    .await
    .expect("fleet");
    for n in 0..MINIONS {
        let id = format!("m{}", n + 1);
        let mut config = fleet.minion_config(&id, &["web"]).expect("config");
        config.fleet.nats_url = fleet.nats().node_url(n % 3);
        fleet.add_minion_with(config).await.expect("minion");
    }
    fleet
}

/// How long after `since` a call to the whole fleet got every minion's
/// answer (calls go on until one does, for at most 30 s).
async fn every_minion_answers(client: &Client, since: Instant) -> Duration {
    let ping = CallRequest::parse_function("sys.ping", Value::Null, Duration::from_secs(1))
        .expect("request");
    loop {
        let call_started = Instant::now();
        let answered = match client.call(&CallTarget::All, &ping).await {
            Ok(report) => {
                eprintln!(
                    "{:.2}s: {} ok in {:?} ({})",
                    since.elapsed().as_secs_f64(),
                    report.summary.ok,
                    call_started.elapsed(),
                    report
                        .selection
                        .as_ref()
                        .map(|s| s.reason.as_str())
                        .unwrap_or("")
                );
                report.summary.ok
            }
            Err(err) => {
                eprintln!(
                    "{:.2}s: call failed in {:?}: {}",
                    since.elapsed().as_secs_f64(),
                    call_started.elapsed(),
                    provis_core::error_chain(&err)
                );
                0
            }
        };
        if answered == MINIONS {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < Duration::from_secs(30),
            "only {answered} of {MINIONS} answer 30 s after the kill"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The node (index) that leads stream `stream`, per JetStream.
async fn stream_leader(fleet: &TestFleet, stream: &str) -> Option<usize> {
    let js = async_nats::jetstream::new(fleet.connect().await.ok()?);
    let info = js.get_stream(stream).await.ok()?.info().await.ok()?.clone();
    let leader = info.cluster?.leader?;
    leader
        .strip_prefix('n')?
        .parse::<usize>()
        .ok()?
        .checked_sub(1)
}

/// Every id of the events `source` emitted that `PROVIS_EVENTS` holds, with
/// how many times each is there. A node that just came back may still be
/// electing the stream's leader, so reading is retried for a while.
async fn stored_event_ids(fleet: &TestFleet, source: &str) -> BTreeMap<String, usize> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match read_event_ids(fleet, source).await {
            Ok(ids) => return ids,
            Err(err) if Instant::now() < deadline => {
                eprintln!("events not readable yet: {err}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(err) => panic!("events stream not readable in 30 s: {err}"),
        }
    }
}

async fn read_event_ids(
    fleet: &TestFleet,
    source: &str,
) -> Result<BTreeMap<String, usize>, String> {
    let nats = fleet.connect().await.map_err(|err| err.to_string())?;
    let js = async_nats::jetstream::new(nats);
    let stream = js
        .get_stream(provis_core::storage::STREAM_EVENTS)
        .await
        .map_err(|err| format!("events stream: {err}"))?;
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            filter_subject: format!("provis.event.{source}.>"),
            ..Default::default()
        })
        .await
        .map_err(|err| format!("consumer: {err}"))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|err| format!("messages: {err}"))?;
    let mut ids = BTreeMap::new();
    // The stream is read to its end: two quiet seconds end it, an error retries.
    while let Ok(Some(message)) =
        tokio::time::timeout(Duration::from_secs(2), messages.next()).await
    {
        let message = message.map_err(|err| format!("reading: {err}"))?;
        let event: Value =
            serde_json::from_slice(&message.payload).map_err(|err| err.to_string())?;
        let id = event["id"].as_str().ok_or("event without id")?.to_owned();
        *ids.entry(id).or_default() += 1;
    }
    Ok(ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_node_may_die_and_the_fleet_answers_through_the_others_within_5_s() {
    let mut fleet = fleet_on_three_nodes(None).await;
    let client = fleet
        .client()
        .await
        .expect("client")
        .with_registry_wait(Duration::from_secs(1));
    assert!(every_minion_answers(&client, Instant::now()).await < Duration::from_secs(2));

    // Events keep coming from a tool of our own while nodes die.
    let publisher = fleet.connect().await.expect("publisher");
    let tools = Lifecycle::new();
    let outbox = Outbox::start(
        publisher,
        None,
        provis_core::outbox::DEFAULT_MAX_BYTES,
        &tools,
    );
    let emitting = {
        let (outbox, subjects) = (outbox.clone(), fleet.subjects());
        tokio::spawn(async move {
            let mut sent = 0usize;
            for n in 0..300 {
                provis_core::event::emit(
                    &outbox,
                    &subjects,
                    "tester",
                    "tick",
                    serde_json::json!({ "n": n }),
                );
                sent += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            sent
        })
    };

    // The node leading the registry, then the one the caller uses, then
    // whichever is left: each killed, measured, brought back.
    let registry_leader = stream_leader(&fleet, "KV_provis_minions")
        .await
        .expect("the registry has a leader");
    let callers_node = client
        .nats()
        .server_info()
        .server_name
        .strip_prefix('n')
        .and_then(|n| n.parse::<usize>().ok())
        .and_then(|n| n.checked_sub(1))
        .expect("the caller's node");
    let mut order = vec![registry_leader];
    for node in [callers_node, 0, 1, 2] {
        if !order.contains(&node) {
            order.push(node);
        }
    }
    for node in order {
        fleet.nats_mut().kill_node(node);
        let took = every_minion_answers(&client, Instant::now()).await;
        eprintln!(
            "node n{} killed: every minion answered after {took:?}",
            node + 1
        );
        assert!(
            took < Duration::from_secs(5),
            "every minion answers within 5 s of n{}'s death, not {took:?}",
            node + 1
        );
        fleet.nats_mut().restart_node(node).expect("node back");
        fleet.nats().wait_for_jetstream().await.expect("jetstream");
    }

    let sent = emitting.await.expect("emitter");
    eventually(
        "every event is acknowledged",
        Duration::from_secs(30),
        || async { outbox.stats().waiting == 0 },
    )
    .await
    .expect("acknowledged");
    assert_eq!(outbox.stats().acknowledged, sent as u64);
    let stored = stored_event_ids(&fleet, "tester").await;
    assert_eq!(stored.len(), sent, "every event is stored");
    assert!(
        stored.values().all(|&count| count == 1),
        "each once: {:?}",
        stored
            .iter()
            .filter(|(_, count)| **count > 1)
            .collect::<Vec<_>>()
    );
    tools.drain(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apply_completes_through_a_node_s_death_and_a_whole_cluster_restart_heals_itself() {
    let repo = GitRepo::init().expect("repo");
    repo.commit(
        "greeter 1",
        &[
            ("roles/web.toml", "services = [\"greeter\"]\n"),
            (
                "services/greeter/service.toml",
                "name = \"greeter\"\nversion = \"1\"\n",
            ),
            (
                "services/greeter/main.js",
                "export function hello() { return '1' }\n",
            ),
        ],
    )
    .expect("commit");
    let mut fleet = fleet_on_three_nodes(Some(&repo)).await;
    let first = repo.head().expect("head");
    eventually("converged", Duration::from_secs(30), || {
        fleet.converged_on(&first, MINIONS)
    })
    .await
    .expect("converged on the first commit");

    // A new commit applied while the node leading the desired state dies.
    repo.commit(
        "greeter 2",
        &[
            ("roles/web.toml", "services = [\"greeter\"]\n"),
            (
                "services/greeter/service.toml",
                "name = \"greeter\"\nversion = \"2\"\n",
            ),
            (
                "services/greeter/main.js",
                "export function hello() { return '2' }\n",
            ),
        ],
    )
    .expect("commit");
    let second = repo.head().expect("head");
    let leader = stream_leader(&fleet, "KV_provis_roles")
        .await
        .expect("roles have a leader");
    let master = fleet.master().await.expect("master client");
    // A reply in flight through the dying node may be lost: wait a while,
    // not the endpoint's whole timeout, then ask again.
    let sync = tokio::spawn(async move {
        master
            .request_within::<provis_core::master_api::SyncNow>(
                &Default::default(),
                Duration::from_secs(15),
            )
            .await
    });
    fleet.nats_mut().kill_node(leader);
    if let Err(err) = sync.await.expect("task") {
        // The apply stopped at the dead node: the next sync completes it.
        eprintln!("sync during the kill: {}", provis_core::error_chain(&err));
        eventually("a sync goes through", Duration::from_secs(30), || async {
            match fleet.master().await {
                Ok(master) => master
                    .request_within::<provis_core::master_api::SyncNow>(
                        &Default::default(),
                        Duration::from_secs(5),
                    )
                    .await
                    .is_ok(),
                Err(_) => false,
            }
        })
        .await
        .expect("synced");
    }
    let converged = eventually(
        "converged on the new commit",
        Duration::from_secs(30),
        || fleet.converged_on(&second, MINIONS),
    )
    .await;
    if let Err(err) = converged {
        let status = fleet.master().await.expect("master").status().await;
        let client = fleet.client().await.expect("client");
        let records = provis_core::registry::read_all(&client.registry().await.expect("registry"))
            .await
            .map(|records| {
                records
                    .iter()
                    .map(|r| {
                        (
                            r.id.to_string(),
                            provis_core::envelope::now_unix_ms() - r.written_unix_ms,
                            r.converged_commit.clone(),
                        )
                    })
                    .collect::<Vec<_>>()
            });
        panic!("{err}: {status:?}\nregistry: {records:?}");
    }

    // Every node down at once, then up again: nobody intervenes.
    fleet.nats_mut().restart().expect("the cluster restarts");
    let client = fleet.client().await.expect("client");
    let took = every_minion_answers(&client, Instant::now()).await;
    eprintln!("whole cluster restarted: every minion answered after {took:?}");
    eventually("the registry is back", Duration::from_secs(30), || async {
        fleet.converged_on(&second, MINIONS).await
    })
    .await
    .expect("the fleet returns with its state");
}

/// A selection that needs someone who knows the fleet (a filter).
async fn select_with_a_filter(
    client: &Client,
) -> Result<provis_core::selection::Selection, provis_core::ClientError> {
    let filter = provis_core::selection::Filter::parse("true").expect("filter");
    client
        .select(
            &CallTarget::All,
            Some(&filter),
            provis_core::selection::Pick::All,
            None,
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_without_quorum_is_a_clear_error_and_recovers() {
    let mut fleet = fleet_on_three_nodes(None).await;
    fleet.nats_mut().kill_node(1);
    fleet.nats_mut().kill_node(2);
    let client = fleet
        .client()
        .await
        .expect("client")
        .with_registry_wait(Duration::from_secs(1));
    // The master still selects from what it holds in memory: calls reach
    // the minions that can reach the surviving node, filters work.
    let ping = CallRequest::parse_function("sys.ping", Value::Null, Duration::from_secs(1))
        .expect("request");
    // (Once the master's connection, and the caller's, have moved to the
    // surviving node.)
    eventually(
        "the master selects without quorum",
        Duration::from_secs(15),
        || async {
            client
                .call(&CallTarget::All, &ping)
                .await
                .is_ok_and(|report| {
                    report
                        .selection
                        .as_ref()
                        .is_some_and(|s| s.uncertain.is_none())
                })
        },
    )
    .await
    .expect("certain calls");
    let filtered = select_with_a_filter(&client)
        .await
        .expect("the master selects without quorum");
    assert!(!filtered.chosen.is_empty(), "{filtered:?}");
    // Without a master either, nothing can say who is in the fleet: a call
    // to everyone reports whoever answers, a selection says why it cannot
    // be made.
    fleet.stop_master().await;
    let report = client.call(&CallTarget::All, &ping).await.expect("a call");
    assert!(
        report
            .selection
            .as_ref()
            .is_some_and(|s| s.uncertain.is_some()),
        "{report:?}"
    );
    let err = select_with_a_filter(&client)
        .await
        .expect_err("no master, no registry, no filter");
    assert!(
        err.to_string().contains("registry could not be read"),
        "{err}"
    );

    fleet.nats_mut().restart_node(1).expect("n2 back");
    fleet.nats_mut().restart_node(2).expect("n3 back");
    fleet
        .nats()
        .wait_for_jetstream()
        .await
        .expect("quorum again");
    let took = every_minion_answers(&client, Instant::now()).await;
    eprintln!("quorum back: every minion answered after {took:?}");
    fleet.restart_master().await.expect("the master again");
    // And the master knows the whole fleet again: nobody late.
    eventually(
        "calls are certain again",
        Duration::from_secs(30),
        || async {
            client
                .call(&CallTarget::All, &ping)
                .await
                .is_ok_and(|report| report.all_ok() && report.summary.ok == MINIONS)
        },
    )
    .await
    .expect("the fleet recovers by itself");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provis_up_runs_a_cluster_that_outlives_any_node() {
    let up = UpFleet::start(provis(), 6, &["--cluster", "3", "--insecure"])
        .await
        .expect("provis up --cluster 3");
    let call_all = || {
        run_to_end(
            std::process::Command::new(provis())
                .args([
                    "call",
                    "--all",
                    "sys.ping",
                    "--timeout",
                    "2s",
                    "--output",
                    "json",
                ])
                .env("PROVIS_CONTEXT", up.context())
                .env_remove("PROVIS_NATS_URL"),
        )
        .expect("provis call")
    };
    let (code, stdout, stderr) = call_all();
    assert_eq!(code, 0, "{stdout}{stderr}");
    // The node the first minions and (likely) the master use.
    {
        let node = "nats-1";
        let pid = up.pid_of(node).unwrap_or_else(|| panic!("{node} runs"));
        let killed = Instant::now();
        let status = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        let mut answered = false;
        while killed.elapsed() < Duration::from_secs(5) && !answered {
            let (_, stdout, stderr) = call_all();
            answered = serde_json::from_str::<Value>(&stdout)
                .is_ok_and(|report| report["summary"]["ok"] == 6);
            if !answered {
                eprintln!("{:?}: {stdout} {stderr}", killed.elapsed());
            }
        }
        assert!(
            answered,
            "every minion answers within 5 s of {node}'s death"
        );
        eprintln!(
            "{node} killed: every minion answered after {:?}",
            killed.elapsed()
        );
    }
    // Every event once.
    let (code, stdout, stderr) = run_to_end(
        std::process::Command::new(provis())
            .args(["events", "--since", "5m", "--output", "json"])
            .env("PROVIS_CONTEXT", up.context())
            .env_remove("PROVIS_NATS_URL"),
    )
    .expect("provis events");
    assert_eq!(code, 0, "{stderr}");
    let ids: Vec<String> = stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter_map(|event| event["id"].as_str().map(str::to_owned))
        .collect();
    let unique: std::collections::BTreeSet<&String> = ids.iter().collect();
    assert!(ids.len() > 6, "events are there: {stdout}");
    assert_eq!(unique.len(), ids.len(), "each event once");
    let output = up.stop().await.expect("up stops");
    assert!(output.status.success());
}
