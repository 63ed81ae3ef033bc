//! What packing npm packages and TypeScript costs, and whether a converted
//! CommonJS package costs anything per call, each beside its limit measured
//! in the same run:
//!
//! - pack: `PackedBundle::from_dir` of `tests/fixtures/npm-service`
//!   (TypeScript, semver, is-odd → is-number, nanoid, uuid) against reading
//!   and hashing the same source files (the least packing can do);
//! - call: one sandbox method calling a function of a CommonJS package
//!   (converted at pack time) against the same function written as ES
//!   modules, and a raw QuickJS call of that function without any sandbox;
//! - call: `semver.satisfies` through the converted real package.
//!
//! Run: `cargo bench --bench bundle` after `scripts/install-npm-packages.sh`
//! (PROVIS_BENCH_SECONDS sets each call measurement's length, default 3).
// A measurement that cannot take place stops the benchmark.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use provis_bundle::PackedBundle;
use provis_js::{HostContext, ServiceSandbox};
use provis_testkit::call_rate::{CallRate, measurement_time, print_row, sequential, summarize};
use provis_testkit::{npm_fixture, write_files};
use serde_json::{Value, json};

/// The same arithmetic, as a CommonJS package and as an ES module package.
const COMMONJS_INDEX: &str = "const { scale } = require('./scale');\nexports.weigh = function weigh(xs) { let total = 0; for (const x of xs) total += scale(x); return total; };\n";
const COMMONJS_SCALE: &str = "module.exports = { scale: (x) => x * 3 + 1 };\n";
const ESM_INDEX: &str = "import { scale } from './scale.js';\nexport function weigh(xs) { let total = 0; for (const x of xs) total += scale(x); return total; }\n";
const ESM_SCALE: &str = "export const scale = (x) => x * 3 + 1;\n";
const MAIN: &str = "import { weigh as cjs } from 'weigh-cjs';\nimport { weigh as esm } from 'weigh-esm';\nexport function viaCommonJs(args) { return cjs(args.xs); }\nexport function viaEsm(args) { return esm(args.xs); }\n";

fn raw_quickjs(args: &Value) -> CallRate {
    use rquickjs::{Context, Function, Module, Runtime};
    let runtime = Runtime::new().expect("runtime");
    let context = Context::full(&runtime).expect("context");
    let source = format!(
        "{}\n{}",
        ESM_SCALE,
        ESM_INDEX.lines().nth(1).expect("weigh")
    );
    context.with(|ctx| {
        let (module, done) = Module::declare(ctx.clone(), "main.js", source)
            .expect("declare")
            .eval()
            .expect("eval");
        done.finish::<()>().expect("evaluated");
        let weigh: Function = module.get("weigh").expect("weigh");
        let xs = args["xs"].to_string();
        let mut samples = Vec::new();
        let started = Instant::now();
        while started.elapsed() < measurement_time() {
            let t = Instant::now();
            let arg = ctx.json_parse(xs.as_str()).expect("parse");
            let result: rquickjs::Value = weigh.call((arg,)).expect("call");
            let text = ctx
                .json_stringify(result)
                .expect("stringify")
                .expect("json");
            let _: Value = serde_json::from_str(&text.to_string().expect("text")).expect("json");
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
        summarize(samples, started)
    })
}

fn pack_figures(dir: &std::path::Path) -> anyhow::Result<()> {
    let rounds = 20;
    let started = Instant::now();
    let mut packed = None;
    for _ in 0..rounds {
        packed = Some(PackedBundle::from_dir(dir)?);
    }
    let pack = started.elapsed() / rounds;
    let packed = packed.expect("packed");
    // The least a packer does: read each source file it bundles and hash it all.
    let sources: Vec<std::path::PathBuf> = packed
        .files
        .keys()
        .filter(|path| !path.ends_with(".map") && !path.starts_with("__provis__/"))
        .map(|path| dir.join(path))
        .collect();
    let started = Instant::now();
    for _ in 0..rounds {
        let mut all = Vec::new();
        for path in &sources {
            all.extend(std::fs::read(path)?);
        }
        let _ = provis_bundle::digest_of(&all);
    }
    let read = started.elapsed() / rounds;
    println!(
        "pack npm-service ({} modules, {} packages, {} bytes): {:.2} ms; read+hash of its sources {:.3} ms ({:.0}x)",
        packed.files.len(),
        packed.packages.len(),
        packed.bytes.len(),
        pack.as_secs_f64() * 1e3,
        read.as_secs_f64() * 1e3,
        pack.as_secs_f64() / read.as_secs_f64()
    );
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let fixture = npm_fixture("npm-service")?;
    pack_figures(&fixture)?;

    let dir = tempfile::tempdir()?;
    write_files(
        dir.path(),
        &[
            ("service.toml", "name = \"weigh\"\nversion = \"1\"\n"),
            ("main.js", MAIN),
            (
                "node_modules/weigh-cjs/package.json",
                r#"{"name": "weigh-cjs", "version": "1.0.0", "main": "index.js"}"#,
            ),
            ("node_modules/weigh-cjs/index.js", COMMONJS_INDEX),
            ("node_modules/weigh-cjs/scale.js", COMMONJS_SCALE),
            (
                "node_modules/weigh-esm/package.json",
                r#"{"name": "weigh-esm", "version": "1.0.0", "type": "module", "exports": "./index.js"}"#,
            ),
            ("node_modules/weigh-esm/index.js", ESM_INDEX),
            ("node_modules/weigh-esm/scale.js", ESM_SCALE),
        ],
    )?;
    let args = json!({"xs": (0..16).collect::<Vec<u32>>()});
    let quickjs = raw_quickjs(&args);
    println!("\nmeasuring {:?} each", measurement_time());
    print_row(
        "raw QuickJS call of weigh (ES module, no sandbox)",
        quickjs,
        None,
    );
    let bundle = Arc::new(PackedBundle::from_dir(dir.path())?);
    let sandbox = Arc::new(ServiceSandbox::start(bundle, HostContext::inert("weigh")).await?);
    let mut figures = Vec::new();
    for method in ["viaEsm", "viaCommonJs"] {
        let (s, a) = (sandbox.clone(), args.clone());
        let figure = sequential(100, move || {
            let (s, a) = (s.clone(), a.clone());
            async move {
                let value = s
                    .call(method, a, Instant::now() + Duration::from_secs(5))
                    .await
                    .expect("call");
                assert_eq!(value, json!(376));
            }
        })
        .await;
        print_row(
            &format!("sandbox call {method}"),
            figure,
            Some(("raw QuickJS", quickjs.0)),
        );
        figures.push(figure);
    }
    println!(
        "converted CommonJS vs the same code as ES modules: {:.3}x the calls/s",
        figures[1].0 / figures[0].0
    );

    let packages = Arc::new(PackedBundle::from_dir(&fixture)?);
    let sandbox = Arc::new(ServiceSandbox::start(packages, HostContext::inert("packages")).await?);
    let s = sandbox.clone();
    let figure = sequential(100, move || {
        let s = s.clone();
        async move {
            s.call(
                "check",
                json!({"version": "1.4.2", "range": "^1.2.0"}),
                Instant::now() + Duration::from_secs(5),
            )
            .await
            .expect("call");
        }
    })
    .await;
    print_row(
        "sandbox call packages.check (semver, converted)",
        figure,
        Some(("raw QuickJS", quickjs.0)),
    );
    Ok(())
}
