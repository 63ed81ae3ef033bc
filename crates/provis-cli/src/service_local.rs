//! `provis service new|run|test`: writing and trying a service on the
//! author's machine, without a fleet. `run` and `test` use the minion's own
//! sandbox with a local host: state in memory, events printed, facts of
//! this machine, and fs/exec/http exactly as the manifest grants them.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use provis_bundle::{PackedBundle, SourceMaps};
use provis_js::{HostContext, ServiceEvent, ServiceSandbox, StateStore};
use serde_json::{Value, json};

use crate::UsageError;

/// The host API's declarations, for editors (kept in step with the host by
/// a test in provis-js).
pub const PROVIS_DTS: &str = include_str!("../../provis-js/provis.d.ts");

/// `provis service new NAME [--typescript] [--dir DIR]`.
pub fn new_service(name: &str, typescript: bool, dir: Option<&Path>) -> anyhow::Result<ExitCode> {
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if !valid {
        return Err(UsageError(format!(
            "service name {name:?}: use lowercase letters, digits, '-' and '_' (it is a subject token)"
        ))
        .into());
    }
    let dir = dir.map_or_else(|| PathBuf::from(name), Path::to_owned);
    if dir.exists() {
        return Err(UsageError(format!(
            "{} exists already; pick another --dir",
            dir.display()
        ))
        .into());
    }
    let ext = if typescript { "ts" } else { "js" };
    let (args_type, returns) = if typescript {
        (
            ": { name?: string }",
            ": { greeting: string; minion: string }",
        )
    } else {
        ("", "")
    };
    let files: Vec<(String, String)> = vec![
        (
            "service.toml".into(),
            format!(
                "name = \"{name}\"\nversion = \"0.1.0\"\nentry = \"main.{ext}\"\n\n# What the service may touch; nothing unless listed.\n[capabilities]\n# fs = {{ read = [\"/srv\"], write = [] }}\n# exec = [\"/usr/bin/systemctl\"]\n# http = [\"127.0.0.1:8080\"]\n\n[limits]\nmemory_mb = 32\ncall_timeout_ms = 5000\n"
            ),
        ),
        (
            format!("main.{ext}"),
            format!(
                "// Each exported function is a method: `provis call --all {name}.hello '{{\"name\": \"you\"}}'`.\nexport function hello(args{args_type}){returns} {{\n  const greeting = `hello ${{args.name ?? \"world\"}}`;\n  provis.log.info(greeting);\n  return {{ greeting, minion: provis.minion.id }};\n}}\n"
            ),
        ),
        (
            format!("main.test.{ext}"),
            format!(
                "import {{ test, assert }} from \"provis:test\";\nimport {{ hello }} from \"./main.{ext}\";\n\ntest(\"hello greets by name\", () => {{\n  assert.equal(hello({{ name: \"you\" }}).greeting, \"hello you\");\n}});\n"
            ),
        ),
        (
            "package.json".into(),
            serde_json::to_string_pretty(&json!({
                "name": name,
                "version": "0.1.0",
                "private": true,
                "type": "module",
                "scripts": {
                    "test": "provis service test .",
                    "bundle": "provis bundle ."
                }
            }))? + "\n",
        ),
        ("provis.d.ts".into(), PROVIS_DTS.to_owned()),
        (
            if typescript {
                "tsconfig.json"
            } else {
                "jsconfig.json"
            }
            .into(),
            serde_json::to_string_pretty(&json!({
                "compilerOptions": {
                    "target": "ES2023",
                    "module": "ESNext",
                    "moduleResolution": "Bundler",
                    "strict": true,
                    "noEmit": true,
                    "allowImportingTsExtensions": true,
                    "checkJs": !typescript,
                    "types": []
                },
                "include": ["**/*.ts", "**/*.js", "provis.d.ts"],
                "exclude": ["node_modules"]
            }))? + "\n",
        ),
        (".gitignore".into(), "node_modules/\n".into()),
    ];
    for (file, text) in &files {
        let path = dir.join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    outln!("created service {name} in {}", dir.display());
    for (file, _) in &files {
        outln!("  {file}");
    }
    outln!(
        "try it: provis service run {} hello '{{\"name\": \"you\"}}'; provis service test {}",
        dir.display(),
        dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// A host for one local run: this machine's facts, state in memory, the
/// manifest's grants, events printed to stderr as they come.
fn local_host(bundle: &PackedBundle, config: Value) -> HostContext {
    let mut machine = provis_minion::machine::Machine::new();
    let facts = machine.facts(&std::collections::BTreeMap::new());
    let (events, mut printed) = tokio::sync::mpsc::channel::<ServiceEvent>(1024);
    tokio::spawn(async move {
        while let Some(event) = printed.recv().await {
            eprintln!("event {}.{} {}", event.service, event.kind, event.data);
        }
    });
    HostContext {
        service: bundle.manifest.name.clone(),
        minion_id: "local".to_owned(),
        roles: Vec::new(),
        facts,
        config,
        capabilities: bundle.manifest.capabilities.clone(),
        state: Arc::new(StateStore::in_memory()),
        events: Some(events),
        fleet: None,
        // Sealed secrets open only on their minions.
        secrets: provis_js::ServiceSecrets::default(),
    }
}

fn parse_json(what: &str, text: Option<&str>) -> anyhow::Result<Value> {
    match text {
        None => Ok(json!({})),
        Some(text) => serde_json::from_str(text)
            .map_err(|err| UsageError(format!("{what} must be JSON: {err}")).into()),
    }
}

/// `provis service run DIR METHOD [ARGS] [--config JSON]`.
pub async fn run_method(
    dir: &Path,
    method: &str,
    args: Option<&str>,
    config: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let args = parse_json("ARGS", args)?;
    let config = parse_json("--config", config)?;
    let (bundle, _) = crate::bundle::pack_checked(dir)?;
    let bundle = Arc::new(bundle);
    let host = local_host(&bundle, config);
    let sandbox = ServiceSandbox::start(bundle.clone(), host)
        .await
        .with_context(|| format!("{} does not load", dir.display()))?;
    let deadline = Instant::now() + Duration::from_millis(bundle.manifest.limits.call_timeout_ms);
    let outcome = sandbox.call(method, args, deadline).await;
    // Let printed events reach stderr before the result.
    tokio::task::yield_now().await;
    match outcome {
        Ok(value) => {
            outln!("{}", serde_json::to_string_pretty(&value)?);
            Ok(ExitCode::SUCCESS)
        }
        Err(err) => {
            eprintln!("provis: {}.{method} failed: {err}", bundle.manifest.name);
            if let provis_js::JsCallError::Exception { stack, .. }
            | provis_js::JsCallError::Denied { stack, .. } = &err
                && !stack.is_empty()
            {
                eprintln!("{}", stack.trim_end());
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

/// `provis service test DIR`: every `*.test.{js,ts,…}` module, each in a
/// fresh sandbox, its tests in order; `N passed, N failed`.
pub async fn run_tests(dir: &Path) -> anyhow::Result<ExitCode> {
    let (bundle, tests) = PackedBundle::from_dir_with_tests(dir)
        .with_context(|| format!("{} is not a valid service", dir.display()))?;
    if tests.is_empty() {
        outln!(
            "no test modules (name.test.js or name.test.ts) in {}",
            dir.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let maps = SourceMaps::from_files(&bundle.files);
    let (mut passed, mut failed) = (0usize, 0usize);
    for test_module in &tests {
        let runner = test_bundle(&bundle, test_module)?;
        let host = local_host(&runner, json!({}));
        let sandbox = match ServiceSandbox::start(Arc::new(runner), host).await {
            Ok(sandbox) => sandbox,
            Err(err) => {
                outln!("FAIL {test_module}: does not load: {err}");
                failed += 1;
                continue;
            }
        };
        // A whole module's tests share the call's deadline: a minute.
        let deadline = Instant::now() + Duration::from_secs(60);
        let results = match sandbox.call(RUN_TESTS, json!({}), deadline).await {
            Ok(Value::Array(results)) => results,
            Ok(other) => anyhow::bail!("{test_module}: the test runner answered {other}"),
            Err(err) => {
                outln!("FAIL {test_module}: {err}");
                failed += 1;
                continue;
            }
        };
        for result in results {
            let name = result["name"].as_str().unwrap_or("?");
            let ms = result["ms"].as_u64().unwrap_or(0);
            if result["ok"] == json!(true) {
                passed += 1;
                outln!("ok   {test_module} › {name} ({ms} ms)");
            } else {
                failed += 1;
                outln!(
                    "FAIL {test_module} › {name}: {}",
                    result["error"].as_str().unwrap_or("failed")
                );
                let stack = maps.remap(result["stack"].as_str().unwrap_or_default());
                for line in stack.lines().filter(|l| !l.contains("__provis__/")) {
                    outln!("     {}", line.trim());
                }
            }
        }
    }
    outln!("{passed} passed, {failed} failed");
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The method of the generated test entry that runs the registered tests.
const RUN_TESTS: &str = "__provisRunTests";

/// The bundle with an entry that loads `test_module` and exports the runner.
fn test_bundle(bundle: &PackedBundle, test_module: &str) -> anyhow::Result<PackedBundle> {
    let entry = "__provis__/run-tests.js";
    let mut runner = bundle.clone();
    runner.files.insert(
        entry.to_owned(),
        format!(
            "import {};\nexport {{ {RUN_TESTS} }} from \"./test.js\";\n",
            serde_json::Value::String(provis_bundle::node_resolve::relative_specifier(
                entry,
                test_module
            ))
        ),
    );
    runner.manifest.entry = entry.to_owned();
    Ok(runner)
}
