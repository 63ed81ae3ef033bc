//! The cost of a call, layer by layer, each beside its physical limit measured
//! in the same run:
//!
//! - raw QuickJS: the same function called with rquickjs directly, in-process;
//! - the sandbox: that call through provis-js (queue, thread hop, JSON in/out);
//! - raw NATS: a request/reply to a subscriber that answers at once;
//! - the whole path: Client → NATS → minion → QuickJS → reply, in-process minion;
//! - the CLI: one `provis call` process per call.
//!
//! Run: `cargo bench --bench call_path` (PROVIS_BENCH_SECONDS sets each
//! measurement's length, default 3).
// A measurement that cannot take place stops the benchmark: its closures
// return nothing, so a failure there ends it with the reason.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use provis_bundle::PackedBundle;
use provis_core::{CallRequest, CallTarget};
use provis_js::{HostContext, ServiceSandbox};
use provis_testkit::call_rate::{CallRate, measurement_time, print_row, sequential, summarize};
use provis_testkit::{TestFleet, write_files};
use serde_json::{Value, json};

const SOURCE: &str = "export function add(a) { return { sum: a.x + a.y } }";

/// Runs `op` from `workers` concurrent tasks; returns calls/s.
async fn concurrent<F, Fut>(workers: usize, op: F) -> f64
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let started = Instant::now();
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let op = op.clone();
            tokio::spawn(async move {
                let mut n = 0u64;
                while started.elapsed() < measurement_time() {
                    op().await;
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut total = 0;
    for task in tasks {
        total += task.await.expect("worker");
    }
    total as f64 / started.elapsed().as_secs_f64()
}

fn raw_quickjs() -> CallRate {
    use rquickjs::{Context, Function, Module, Object, Runtime};
    let runtime = Runtime::new().expect("runtime");
    let context = Context::full(&runtime).expect("context");
    context.with(|ctx| {
        let (module, done) = Module::declare(ctx.clone(), "main.js", SOURCE)
            .expect("declare")
            .eval()
            .expect("eval");
        done.finish::<()>().expect("evaluated");
        let add: Function = module.get("add").expect("add");
        let args = json!({"x": 1, "y": 2}).to_string();
        let mut samples = Vec::new();
        let started = Instant::now();
        while started.elapsed() < measurement_time() {
            let t = Instant::now();
            // The same work the sandbox does per call: JSON in, call, JSON out.
            let arg = ctx.json_parse(args.as_str()).expect("parse");
            let result: rquickjs::Value = add.call((arg,)).expect("call");
            let text = ctx
                .json_stringify(result)
                .expect("stringify")
                .expect("json")
                .to_string()
                .expect("string");
            let _: Value = serde_json::from_str(&text).expect("json");
            let _ = Object::new(ctx.clone());
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
        summarize(samples, started)
    })
}

fn rate_row(name: &str, rate: f64, limit: Option<(&str, f64)>) {
    let ratio = limit.map_or_else(String::new, |(what, l)| {
        format!("  {:.2}x of {what}", rate / l)
    });
    println!("{name:44} {rate:>10.0} calls/s{ratio}");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    println!(
        "measuring {:?} each; 2 cores shared by caller, nats-server and minion\n",
        measurement_time()
    );
    let quickjs = raw_quickjs();
    print_row("raw QuickJS call (in-process)", quickjs, None);

    let dir = tempfile::tempdir()?;
    write_files(
        dir.path(),
        &[
            ("adder/service.toml", "name = \"adder\"\nversion = \"1\"\n"),
            ("adder/main.js", SOURCE),
        ],
    )?;
    let bundle = PackedBundle::from_dir(&dir.path().join("adder"))?;
    let sandbox =
        Arc::new(ServiceSandbox::start(Arc::new(bundle), HostContext::inert("adder")).await?);
    let s = sandbox.clone();
    let through_sandbox = sequential(50, move || {
        let s = s.clone();
        async move {
            s.call(
                "add",
                json!({"x": 1, "y": 2}),
                Instant::now() + Duration::from_secs(5),
            )
            .await
            .expect("call");
        }
    })
    .await;
    print_row(
        "provis-js sandbox call",
        through_sandbox,
        Some(("raw QuickJS", quickjs.0)),
    );

    let mut fleet = TestFleet::start().await?;
    let nats = fleet.nats().connect().await?;
    let mut echo = nats.subscribe("bench.echo").await?;
    let responder = nats.clone();
    tokio::spawn(async move {
        while let Some(message) = echo.next().await {
            if let Some(reply) = message.reply {
                let _ = responder.publish(reply, message.payload).await;
            }
        }
    });
    let payload = bytes::Bytes::from(vec![0u8; 120]);
    let (client, p) = (nats.clone(), payload.clone());
    let raw_nats = sequential(50, move || {
        let (client, p) = (client.clone(), p.clone());
        async move {
            client.request("bench.echo", p).await.expect("request");
        }
    })
    .await;
    print_row("raw NATS request/reply", raw_nats, None);
    let (client, p) = (nats.clone(), payload.clone());
    let raw_nats_16 = concurrent(16, move || {
        let (client, p) = (client.clone(), p.clone());
        async move {
            client.request("bench.echo", p).await.expect("request");
        }
    })
    .await;
    rate_row("raw NATS request/reply, 16 in flight", raw_nats_16, None);

    let repo = fleet.workdir().join("repo");
    write_files(
        &repo,
        &[
            ("roles/bench.toml", "services = [\"adder\"]\n"),
            (
                "services/adder/service.toml",
                "name = \"adder\"\nversion = \"1\"\n",
            ),
            ("services/adder/main.js", SOURCE),
        ],
    )?;
    fleet.apply(&repo).await?;
    fleet.add_minion("m1", &["bench"]).await?;
    let digest = PackedBundle::from_dir(&repo.join("services/adder"))?.digest;
    fleet.wait_service("m1", "adder", &digest).await?;
    let client = Arc::new(fleet.client().await?);
    let target = CallTarget::Minions(vec!["m1".parse()?]);
    let request =
        CallRequest::parse_function("adder.add", json!({"x": 1, "y": 2}), Duration::from_secs(5))?;
    let (c, t, r) = (client.clone(), target.clone(), request.clone());
    let whole = sequential(50, move || {
        let (c, t, r) = (c.clone(), t.clone(), r.clone());
        async move {
            let report = c.call(&t, &r).await.expect("call");
            assert!(report.all_ok());
        }
    })
    .await;
    print_row(
        "whole path: Client → NATS → minion → QuickJS",
        whole,
        Some(("raw NATS", raw_nats.0)),
    );
    let (c, t, r) = (client.clone(), target.clone(), request.clone());
    let whole_16 = concurrent(16, move || {
        let (c, t, r) = (c.clone(), t.clone(), r.clone());
        async move {
            assert!(c.call(&t, &r).await.expect("call").all_ok());
        }
    })
    .await;
    rate_row(
        "whole path, 16 in flight",
        whole_16,
        Some(("raw NATS 16 in flight", raw_nats_16)),
    );

    let provis = Path::new(env!("CARGO_BIN_EXE_provis"));
    let cli = sequential(50, || async {
        let status = fleet
            .provis_command(provis)
            .args(["call", "--minion", "m1", "adder.add", r#"{"x": 1, "y": 2}"#])
            .stdout(std::process::Stdio::null())
            .status()
            .expect("provis call");
        assert!(status.success());
    })
    .await;
    print_row(
        "CLI: one `provis call` process per call",
        cli,
        Some(("raw NATS", raw_nats.0)),
    );
    fleet.stop_master().await;
    Ok(())
}
