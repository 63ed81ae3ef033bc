//! The sandbox against real QuickJS: methods, failures, limits and the host API.
#![cfg(test)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use provis_bundle::PackedBundle;
use provis_js::{HostContext, JsCallError, LoadError, ServiceSandbox, StateStore, check_bundle};
use serde_json::json;

/// Packs a service from (path, source) pairs; `service.toml` among them.
fn bundle(files: &[(&str, &str)]) -> PackedBundle {
    let dir = tempfile::tempdir().expect("tempdir");
    for (path, text) in files {
        let path = dir.path().join(path);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, text).expect("write");
    }
    PackedBundle::from_dir(dir.path()).expect("packs")
}

/// A bundle as bytes from elsewhere (not from our packer, which would refuse
/// broken modules first): the sandbox must still say what is wrong.
fn raw_bundle(files: &[(&str, &str)]) -> PackedBundle {
    use prost::Message as _;
    let bundle = provis_proto::v1::Bundle {
        manifest_toml: MANIFEST.to_owned(),
        files: files
            .iter()
            .map(|(path, text)| provis_proto::v1::BundleFile {
                path: (*path).to_owned(),
                content: text.as_bytes().to_vec(),
            })
            .collect(),
    };
    let bytes = bundle.encode_to_vec();
    let digest = provis_bundle::digest_of(&bytes);
    PackedBundle::from_bytes(bytes.into(), &digest).expect("opens")
}

/// The packer's refusal of a folder.
fn pack_error(files: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    for (path, text) in files {
        std::fs::write(dir.path().join(path), text).expect("write");
    }
    PackedBundle::from_dir(dir.path())
        .expect_err("refused")
        .to_string()
}

const MANIFEST: &str =
    "name = \"demo\"\nversion = \"1\"\n[limits]\ncall_timeout_ms = 300\nmemory_mb = 16\n";

async fn start(files: &[(&str, &str)]) -> Result<ServiceSandbox, LoadError> {
    let b = bundle(files);
    ServiceSandbox::start(Arc::new(b.clone()), HostContext::inert(&b.manifest.name)).await
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(5)
}

#[tokio::test]
async fn exported_functions_are_methods_sync_or_async() {
    let service = start(&[
        ("service.toml", MANIFEST),
        ("main.js", "import { double } from './lib/math.js';\nexport function twice(a) { return { n: double(a.n) } }\nexport async function later(a) { await null; return [a, provis.minion.id] }\nexport const notAMethod = 1;"),
        ("lib/math.js", "export const double = (n) => n * 2;"),
    ])
    .await
    .expect("loads");
    assert_eq!(service.methods(), ["later", "twice"]);
    assert_eq!(
        service
            .call("twice", json!({"n": 21}), soon())
            .await
            .unwrap(),
        json!({"n": 42})
    );
    assert_eq!(
        service.call("later", json!("x"), soon()).await.unwrap(),
        json!(["x", "check"])
    );
    let err = service.call("nope", json!(null), soon()).await.unwrap_err();
    assert!(matches!(err, JsCallError::UnknownMethod { .. }), "{err}");
}

#[tokio::test]
async fn load_failures_say_which_file_and_why() {
    let broken = [
        ("service.toml", MANIFEST),
        (
            "main.js",
            "export function f() { return 1 }\nexport function g( {",
        ),
    ];
    let err = pack_error(&broken);
    assert!(err.starts_with("main.js:2:"), "{err}");
    let raw = raw_bundle(&broken[1..]);
    let err = ServiceSandbox::start(Arc::new(raw), HostContext::inert("demo"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, LoadError::Module { message, .. } if message.contains("SyntaxError")),
        "{err}"
    );

    let err = pack_error(&[
        ("service.toml", MANIFEST),
        (
            "main.js",
            "import { x } from './missing.js';\nexport function f() { return x }",
        ),
    ]);
    assert!(
        err.contains("main.js: import \"./missing.js\" names no file"),
        "{err}"
    );

    let err = start(&[
        ("service.toml", MANIFEST),
        ("main.js", "throw new Error('boom at load');"),
    ])
    .await
    .unwrap_err();
    assert!(
        matches!(&err, LoadError::TopLevel { message, .. } if message.contains("boom at load")),
        "{err}"
    );

    let err = start(&[
        ("service.toml", MANIFEST),
        ("main.js", "while (true) {}\nexport function f() {}"),
    ])
    .await
    .unwrap_err();
    assert!(matches!(err, LoadError::Timeout(_)), "{err}");

    let err = start(&[
        ("service.toml", MANIFEST),
        ("main.js", "export const x = 1;"),
    ])
    .await
    .unwrap_err();
    assert!(matches!(err, LoadError::NoMethods(_)), "{err}");
}

#[tokio::test]
async fn a_bundle_check_compiles_every_own_module() {
    let broken_helper = raw_bundle(&[
        ("main.js", "export function f() { return 1 }"),
        ("unused.js", "export function oops( {"),
    ]);
    let err = check_bundle(&broken_helper).unwrap_err();
    assert!(
        matches!(&err, LoadError::Module { file, .. } if file == "unused.js"),
        "{err}"
    );
    let good = bundle(&[
        ("service.toml", MANIFEST),
        ("main.js", "export function f() { return 1 }"),
    ]);
    assert_eq!(check_bundle(&good).unwrap(), ["f"]);
}

#[tokio::test]
async fn a_throwing_method_returns_message_and_stack_and_the_service_goes_on() {
    let service = start(&[
        ("service.toml", MANIFEST),
        ("main.js", "function inner() { throw new TypeError('bad input: ' + 42) }\nexport function fails() { inner() }\nexport function ok() { return 'ok' }"),
    ])
    .await
    .expect("loads");
    match service
        .call("fails", json!(null), soon())
        .await
        .unwrap_err()
    {
        JsCallError::Exception { message, stack } => {
            assert_eq!(message, "TypeError: bad input: 42");
            assert!(
                stack.contains("inner") && stack.contains("main.js"),
                "{stack}"
            );
        }
        other => panic!("expected an exception, got {other}"),
    }
    assert_eq!(
        service.call("ok", json!(null), soon()).await.unwrap(),
        json!("ok")
    );
}

#[tokio::test]
async fn an_infinite_loop_is_interrupted_and_the_service_keeps_serving() {
    let service = start(&[
        ("service.toml", MANIFEST),
        ("main.js", "export function spin() { for (;;) {} }\nexport function guarded() { try { for (;;) {} } finally { return 'escaped' } }\nexport function ok() { return 1 }"),
    ])
    .await
    .expect("loads");
    let started = Instant::now();
    let err = service.call("spin", json!(null), soon()).await.unwrap_err();
    assert!(matches!(err, JsCallError::Timeout(_)), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the manifest's 300 ms limit applies: {:?}",
        started.elapsed()
    );
    let err = service
        .call("guarded", json!(null), soon())
        .await
        .unwrap_err();
    assert!(
        matches!(err, JsCallError::Timeout(_)),
        "try/finally cannot swallow the interrupt: {err}"
    );
    assert_eq!(
        service.call("ok", json!(null), soon()).await.unwrap(),
        json!(1)
    );
}

#[tokio::test]
async fn a_memory_hog_fails_and_the_service_keeps_serving() {
    let service = start(&[
        ("service.toml", MANIFEST),
        ("main.js", "export function hog() { const a = []; for (;;) a.push(new Array(100000).fill(1)) }\nexport function ok() { return 1 }"),
    ])
    .await
    .expect("loads");
    let err = service.call("hog", json!(null), soon()).await.unwrap_err();
    assert!(matches!(err, JsCallError::OutOfMemory(16)), "{err}");
    assert_eq!(
        service.call("ok", json!(null), soon()).await.unwrap(),
        json!(1)
    );
}

#[tokio::test]
async fn a_promise_that_never_settles_is_an_error_not_a_hang() {
    let service = start(&[
        ("service.toml", MANIFEST),
        (
            "main.js",
            "export function wait() { return new Promise(() => {}) }",
        ),
    ])
    .await
    .expect("loads");
    let err = service.call("wait", json!(null), soon()).await.unwrap_err();
    assert_eq!(err, JsCallError::NeverSettles);
}

fn host_with(
    dir: &Path,
    manifest_caps: &str,
) -> (
    PackedBundle,
    HostContext,
    tokio::sync::mpsc::Receiver<provis_js::ServiceEvent>,
) {
    let manifest = format!("name = \"site\"\nversion = \"1\"\n{manifest_caps}");
    let b = bundle(&[
        ("service.toml", &manifest),
        (
            "main.js",
            r#"
            export function remember(a) { provis.state.set(a.key, a.value); return provis.state.get(a.key) }
            export function recall(a) { return { mine: provis.state.list(''), theirs: provis.state.get('k', 'other') ?? null } }
            export function announce(a) { provis.events.emit('site.enabled', { by: provis.minion.id, cfg: provis.config }); return true }
            export function write(a) { provis.fs.write(a.path, a.text); return provis.fs.read(a.path) }
            export function read(a) { return provis.fs.read(a.path) }
            export function run(a) { return provis.exec.run(a.program, a.args) }
            export function tamper() {
                const refused = [];
                for (const attempt of [() => { provis.state = null }, () => { provis.minion.id = 'evil' }, () => { provis.fs.read = () => 'x' }]) {
                    try { attempt() } catch (e) { refused.push(e.constructor.name) }
                }
                return [provis.minion.id, refused, typeof require, typeof process, typeof fetch, typeof setTimeout]
            }
        "#,
        ),
    ]);
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let state = Arc::new(StateStore::open(&dir.join("state")).expect("state"));
    state.set("other", "k", json!("theirs")).expect("set");
    let host = HostContext {
        minion_id: "m1".into(),
        config: json!({"root": dir.display().to_string()}),
        state,
        events: Some(tx),
        ..HostContext::inert("site")
    };
    (b, host, rx)
}

#[tokio::test]
async fn the_host_api_grants_state_events_and_nothing_undeclared() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (b, host, mut events) = host_with(dir.path(), "");
    let service = ServiceSandbox::start(Arc::new(b), host)
        .await
        .expect("loads");

    assert_eq!(
        service
            .call(
                "remember",
                json!({"key": "mode", "value": {"on": true}}),
                soon()
            )
            .await
            .unwrap(),
        json!({"on": true})
    );
    assert_eq!(
        service.call("recall", json!(null), soon()).await.unwrap(),
        json!({"mine": [{"key": "mode", "value": {"on": true}}], "theirs": "theirs"})
    );
    assert_eq!(
        service.call("announce", json!(null), soon()).await.unwrap(),
        json!(true)
    );
    let event = events.recv().await.expect("an event");
    assert_eq!(
        (event.service.as_str(), event.kind.as_str()),
        ("site", "site.enabled")
    );
    assert_eq!(event.data["by"], "m1");

    // The state written survives a new store opened on the same directory (a minion restart).
    let reopened = StateStore::open(&dir.path().join("state")).expect("reopen");
    assert_eq!(reopened.get("site", "mode"), Some(json!({"on": true})));

    let target = dir.path().join("x.txt").display().to_string();
    let err = service
        .call("write", json!({"path": target, "text": "x"}), soon())
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("capability fs.write does not cover"),
        "{err}"
    );
    // A denial is told apart by its kind, not by reading its message.
    assert!(matches!(err, JsCallError::Denied { .. }), "{err:?}");
    let err = service
        .call("read", json!({"path": "/etc/passwd"}), soon())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("capability fs.read"), "{err}");
    let err = service
        .call(
            "run",
            json!({"program": "/bin/echo", "args": ["hi"]}),
            soon(),
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("capability exec does not list /bin/echo"),
        "{err}"
    );
    assert_eq!(
        service.call("tamper", json!(null), soon()).await.unwrap(),
        json!([
            "m1",
            ["TypeError", "TypeError", "TypeError"],
            "undefined",
            "undefined",
            "undefined",
            "undefined"
        ]),
        "the host API is frozen and there is no ambient authority"
    );
    assert!(!Path::new(&target).exists());
}

#[tokio::test]
async fn granted_fs_and_exec_work_and_escapes_fail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let www = dir.path().canonicalize().expect("canonical").join("www");
    std::fs::create_dir_all(&www).expect("mkdir");
    std::fs::write(dir.path().join("secret"), "s3cret").expect("write");
    std::os::unix::fs::symlink(dir.path().join("secret"), www.join("link")).expect("symlink");
    let caps = format!(
        "[capabilities]\nexec = [\"/bin/echo\"]\n[capabilities.fs]\nwrite = [\"{}\"]\n",
        www.display()
    );
    let (b, host, _events) = host_with(dir.path(), &caps);
    let service = ServiceSandbox::start(
        Arc::new(b),
        HostContext {
            capabilities: b_caps(&caps),
            ..host
        },
    )
    .await
    .expect("loads");

    let page = www.join("index.html").display().to_string();
    assert_eq!(
        service
            .call(
                "write",
                json!({"path": page, "text": "<h1>on</h1>"}),
                soon()
            )
            .await
            .unwrap(),
        json!("<h1>on</h1>")
    );
    for escape in [
        format!("{}/../secret", www.display()),
        www.join("link").display().to_string(),
    ] {
        let err = service
            .call("read", json!({"path": escape}), soon())
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("does not cover"),
            "{escape}: {err}"
        );
    }
    let out = service
        .call(
            "run",
            json!({"program": "/bin/echo", "args": ["a; rm -rf /", "$HOME"]}),
            soon(),
        )
        .await
        .unwrap();
    assert_eq!(
        out["stdout"], "a; rm -rf / $HOME\n",
        "arguments are a list, never a shell line"
    );
    assert_eq!(out["code"], 0);
}

fn b_caps(caps: &str) -> provis_bundle::manifest::Capabilities {
    provis_bundle::ServiceManifest::parse(&format!("name = \"x\"\nversion = \"1\"\n{caps}"))
        .expect("manifest")
        .capabilities
}

/// A one-thread HTTP server on loopback answering `hello` on `/`, and a
/// redirect to another host on `/away`.
fn http_server() -> u16 {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut first = String::new();
            let _ = reader.read_line(&mut first);
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) <= 2 {
                    break;
                }
            }
            let mut stream = stream;
            let response = if first.contains("/away") {
                "HTTP/1.1 302 Found\r\nLocation: http://169.254.169.254/\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_owned()
            } else {
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello".to_owned()
            };
            let _ = stream.write_all(response.as_bytes());
        }
    });
    port
}

#[tokio::test]
async fn http_reaches_listed_hosts_only_and_follows_no_redirect() {
    let port = http_server();
    let manifest =
        format!("name = \"web\"\nversion = \"1\"\n[capabilities]\nhttp = [\"127.0.0.1:{port}\"]\n");
    let b = bundle(&[
        ("service.toml", &manifest),
        (
            "main.js",
            "export function get(a) { const r = provis.http.request({ url: a.url }); return { status: r.status, body: r.body } }",
        ),
    ]);
    let service = ServiceSandbox::start(
        Arc::new(b.clone()),
        HostContext {
            capabilities: b.manifest.capabilities.clone(),
            ..HostContext::inert("web")
        },
    )
    .await
    .expect("loads");
    let ok = service
        .call(
            "get",
            json!({"url": format!("http://127.0.0.1:{port}/")}),
            soon(),
        )
        .await
        .unwrap();
    assert_eq!(ok, json!({"status": 200, "body": "hello"}));
    let redirect = service
        .call(
            "get",
            json!({"url": format!("http://127.0.0.1:{port}/away")}),
            soon(),
        )
        .await
        .unwrap();
    assert_eq!(
        redirect["status"], 302,
        "the redirect is handed back, not followed"
    );
    for (url, needle) in [
        (
            format!("http://127.0.0.1:{}/", port.wrapping_add(1)),
            "capability http does not list",
        ),
        (
            "http://localhost/".to_owned(),
            "capability http does not list localhost:80",
        ),
        (format!("https://127.0.0.1:{port}/"), "not an http:// URL"),
        (
            format!("http://user@127.0.0.1:{port}/"),
            "not an http:// URL",
        ),
    ] {
        let err = service
            .call("get", json!({"url": url}), soon())
            .await
            .unwrap_err();
        assert!(err.to_string().contains(needle), "{url}: {err}");
    }
}

#[tokio::test]
async fn commonjs_packages_run_with_nodes_semantics() {
    let service = start(&[
        ("service.toml", MANIFEST),
        (
            "main.js",
            "import circular from 'circ';\nimport answer from 'json-answer';\nimport optional from 'optional-dep';\nimport { fromEsm } from 'uses-esm';\nimport requireOnly from 'require-only';\nimport { greet } from 'shimmed';\nexport function cjs() { return { circular, answer, optional, fromEsm, requireOnly, greet: greet('ops') } }\nexport async function lazy() { const { value } = await import('./lazy.js'); return value }\n",
        ),
        ("lazy.js", "export const value = 'loaded on demand';\n"),
        // Circular requires see the partly filled exports, as in Node.
        ("node_modules/circ/package.json", r#"{"name": "circ", "version": "1.0.0"}"#),
        (
            "node_modules/circ/index.js",
            "exports.loaded = false;\nconst b = require('./b');\nexports.bSawLoaded = b.sawLoaded;\nexports.loaded = true;\n",
        ),
        ("node_modules/circ/b.js", "const a = require('./index');\nexports.sawLoaded = a.loaded;\n"),
        ("node_modules/json-answer/package.json", r#"{"name": "json-answer", "version": "1.0.0", "main": "main.js"}"#),
        ("node_modules/json-answer/main.js", "module.exports = require('./data.json').answer;\n"),
        ("node_modules/json-answer/data.json", r#"{"answer": 42}"#),
        // An optional dependency that is not installed: it throws only if required.
        ("node_modules/optional-dep/package.json", r#"{"name": "optional-dep", "version": "1.0.0"}"#),
        (
            "node_modules/optional-dep/index.js",
            "let found;\ntry { found = require('not-installed'); } catch (err) { found = err.message.split(':')[0]; }\nmodule.exports = found;\n",
        ),
        ("node_modules/uses-esm/package.json", r#"{"name": "uses-esm", "version": "1.0.0"}"#),
        ("node_modules/uses-esm/index.js", "const esm = require('esm-only');\nexports.fromEsm = esm.twice(21);\n"),
        ("node_modules/esm-only/package.json", r#"{"name": "esm-only", "version": "1.0.0", "type": "module", "exports": "./index.js"}"#),
        ("node_modules/esm-only/index.js", "export const twice = (n) => n * 2;\n"),
        ("node_modules/require-only/package.json", r#"{"name": "require-only", "version": "1.0.0", "exports": {".": {"require": "./cjs.js"}}}"#),
        ("node_modules/require-only/cjs.js", "module.exports = 'exported for require only';\n"),
        ("node_modules/shimmed/package.json", r#"{"name": "shimmed", "version": "1.0.0"}"#),
        (
            "node_modules/shimmed/index.js",
            "const EventEmitter = require('events');\nconst util = require('node:util');\nconst bus = new EventEmitter();\nlet heard = '';\nbus.once('hi', (who) => { heard = util.format('hello %s (%d)', who, 1); });\nexports.greet = (who) => { bus.emit('hi', who); bus.emit('hi', 'again'); return heard; };\n",
        ),
    ])
    .await
    .expect("loads");
    let deadline = || Instant::now() + Duration::from_secs(2);
    let result = service
        .call("cjs", json!(null), deadline())
        .await
        .expect("call");
    assert_eq!(
        result,
        json!({
            "circular": {"loaded": true, "bSawLoaded": false},
            "answer": 42,
            "optional": "Cannot find module 'not-installed'",
            "fromEsm": 42,
            "requireOnly": "exported for require only",
            "greet": "hello ops (1)",
        })
    );
    let lazy = service
        .call("lazy", json!(null), deadline())
        .await
        .expect("call");
    assert_eq!(lazy, json!("loaded on demand"));

    // A package that throws while loading: the stack names its file and line.
    let err = start(&[
        ("service.toml", MANIFEST),
        (
            "main.js",
            "import 'thrower';\nexport function f() { return 1 }\n",
        ),
        (
            "node_modules/thrower/package.json",
            r#"{"name": "thrower", "version": "1.0.0"}"#,
        ),
        (
            "node_modules/thrower/index.js",
            "'use strict';\n\nthrow new Error('cannot start');\n",
        ),
    ])
    .await
    .unwrap_err();
    assert!(
        matches!(&err, LoadError::TopLevel { message, at, .. }
            if message.contains("cannot start") && at.starts_with("node_modules/thrower/index.js:3")),
        "{err}"
    );
}

#[tokio::test]
async fn a_granted_secret_reads_and_its_value_never_leaves_the_sandbox() {
    let b = bundle(&[
        (
            "service.toml",
            "name = \"vault\"\nversion = \"1\"\n[capabilities]\nsecrets = [\"db\", \"absent\"]\n",
        ),
        (
            "main.js",
            "export function length() { return provis.secrets.get('db').length }\nexport function leak() { const v = provis.secrets.get('db'); provis.log.info('pw ' + v); provis.events.emit('leaked', { v }); provis.state.set('copy', v); return { v, stored: provis.state.get('copy') } }\nexport function fail() { throw new Error('wrong password ' + provis.secrets.get('db')) }\nexport function other() { return provis.secrets.get('api') }\nexport function absent() { return provis.secrets.get('absent') }\n",
        ),
    ]);
    let (tx, mut events) = tokio::sync::mpsc::channel(16);
    let host = HostContext {
        capabilities: b.manifest.capabilities.clone(),
        events: Some(tx),
        secrets: provis_js::ServiceSecrets::new(std::collections::BTreeMap::from([
            ("db".to_owned(), Ok("hunter2-and-more".to_owned())),
            ("api".to_owned(), Ok("never-granted".to_owned())),
        ])),
        ..HostContext::inert("vault")
    };
    let service = ServiceSandbox::start(Arc::new(b), host)
        .await
        .expect("loads");
    let soon = || Instant::now() + Duration::from_secs(2);
    assert_eq!(
        service
            .call("length", json!(null), soon())
            .await
            .expect("call"),
        json!(16)
    );
    let leaked = service
        .call("leak", json!(null), soon())
        .await
        .expect("call");
    assert_eq!(
        leaked,
        json!({"v": "[secret db]", "stored": "[secret db]"}),
        "the result and the state carry no value"
    );
    let event = events.recv().await.expect("an event");
    assert_eq!(event.data, json!({"v": "[secret db]"}));
    match service.call("fail", json!(null), soon()).await {
        Err(JsCallError::Exception { message, stack }) => {
            assert_eq!(message, "Error: wrong password [secret db]");
            assert!(!stack.contains("hunter2"), "{stack}");
        }
        other => panic!("expected an exception: {other:?}"),
    }
    // Not in the manifest: denied, even though the minion holds it.
    assert!(matches!(
        service.call("other", json!(null), soon()).await,
        Err(JsCallError::Denied { message, .. }) if message.contains("not granted")
    ));
    // Granted but not sealed to this minion: a clear error.
    assert!(matches!(
        service.call("absent", json!(null), soon()).await,
        Err(JsCallError::Exception { message, .. }) if message.contains("not sealed to this minion")
    ));
}
