//! `provis.d.ts` declares every `provis.*` the host installs: a host
//! function added without its declaration fails here, so editors never lag
//! behind the sandbox.
#![cfg(test)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use provis_bundle::PackedBundle;
use provis_js::{HostContext, ServiceSandbox};
use serde_json::Value;

const DECLARATIONS: &str = include_str!("../provis.d.ts");

/// The text of `namespace NAME { … }` inside `text`, braces balanced.
fn namespace_block<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    let start = text.find(&format!("namespace {name} {{"))?;
    let open = start + text[start..].find('{')?;
    let mut depth = 0usize;
    for (offset, c) in text[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(&text[open..=open + offset]);
                }
            }
            _ => {}
        }
    }
    None
}

#[tokio::test]
async fn every_host_function_is_declared() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("service.toml"),
        "name = \"shape\"\nversion = \"1\"\n",
    )
    .expect("write");
    std::fs::write(
        dir.path().join("main.js"),
        "export function shape() {\n  const out = {};\n  for (const [ns, value] of Object.entries(provis)) {\n    out[ns] = Object.entries(value).map(([name, member]) => [name, typeof member]);\n  }\n  return out;\n}\n",
    )
    .expect("write");
    let bundle = Arc::new(PackedBundle::from_dir(dir.path()).expect("packs"));
    let sandbox = ServiceSandbox::start(bundle, HostContext::inert("shape"))
        .await
        .expect("loads");
    let shape = sandbox
        .call(
            "shape",
            Value::Null,
            Instant::now() + Duration::from_secs(5),
        )
        .await
        .expect("answers");
    let provis = namespace_block(DECLARATIONS, "provis").expect("namespace provis in provis.d.ts");
    let mut missing = Vec::new();
    let namespaces = shape.as_object().expect("an object");
    assert!(namespaces.len() >= 10, "{shape}");
    for (namespace, members) in namespaces {
        let members = members.as_array().expect("members");
        let functions: Vec<&str> = members
            .iter()
            .filter(|m| m[1] == "function")
            .filter_map(|m| m[0].as_str())
            .collect();
        if functions.is_empty() && namespace != "minion" {
            // Data (facts, config): declared as a constant of `provis`.
            if !provis.contains(&format!("const {namespace}:")) {
                missing.push(format!("provis.{namespace}"));
            }
            continue;
        }
        let Some(block) = namespace_block(provis, namespace) else {
            missing.push(format!("namespace provis.{namespace}"));
            continue;
        };
        for member in members {
            let (name, kind) = (
                member[0].as_str().unwrap_or(""),
                member[1].as_str().unwrap_or(""),
            );
            let declared = if kind == "function" {
                block.contains(&format!("function {name}("))
                    || block.contains(&format!(" as {name} }}"))
            } else {
                block.contains(&format!("const {name}:"))
            };
            if !declared {
                missing.push(format!("provis.{namespace}.{name} ({kind})"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "provis.d.ts lacks declarations for: {}",
        missing.join(", ")
    );
}
