//! Where an `import` or a `require()` leads at pack time, the way Node and
//! bundlers resolve it, over the service folder on disk.
//!
//! - Relative specifiers (`./x`, `../lib/y.js`) name a file of the folder,
//!   probed with the usual extensions (`.ts` first where the author wrote
//!   `.js`, the TypeScript convention) and `index.*` for a folder.
//! - Bare specifiers (`semver`, `uuid`, `@scope/pkg/sub`) name a package in
//!   the nearest `node_modules/` walking up from the importer, as npm and pnpm
//!   lay them out (pnpm's links are followed, and must stay in the folder).
//!   A package's `exports` map is read in its own key order with the
//!   conditions of the import's kind ([`ImportKind::conditions`]; an import
//!   of a package that exports only for `require` takes that); without
//!   one, `module` (for imports), `main`, then `index.js`.
//! - Node built-ins (`fs`, `node:net`, …) are [`Resolved::Builtin`]: refused
//!   by the packer unless a pure shim stands in ([`crate::shims`]), or the
//!   author installed a package of that name (`npm install events`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::package_json::{OrderedJson, PackageJson};

/// Which syntax asked: the `exports` conditions differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportKind {
    /// `import`, `export … from`, `import()`.
    Import,
    /// `require()` in a CommonJS module.
    Require,
}

impl ImportKind {
    /// The conditions this kind matches in an `exports` map, besides `default`.
    /// Services run neither in Node nor in a browser, so neither is claimed.
    pub fn conditions(self) -> &'static [&'static str] {
        match self {
            Self::Import => &["import", "module", "default"],
            Self::Require => &["require", "default"],
        }
    }
}

/// Where a specifier led.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// A file of the folder, by its '/'-separated path from the folder.
    File(String),
    /// A Node built-in module, by its name without `node:`.
    Builtin(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeResolveError {
    #[error("{specifier:?} leaves the service folder")]
    Escapes { specifier: String },
    #[error("{specifier:?} names no file (looked for {looked_for})")]
    Missing {
        specifier: String,
        looked_for: String,
    },
    #[error(
        "{specifier:?}: package {package:?} is not installed (run npm install where the service is written)"
    )]
    NoPackage { specifier: String, package: String },
    #[error("{specifier:?}: package {package:?} does not export {subpath:?} for {kind}")]
    NotExported {
        specifier: String,
        package: String,
        subpath: String,
        kind: &'static str,
    },
    #[error("{specifier:?}: {path}: {reason}")]
    BadPackageJson {
        specifier: String,
        path: String,
        reason: String,
    },
}

/// The Node built-in modules (as of Node 22), by the name `require` takes.
const BUILTINS: &[&str] = &[
    "assert",
    "async_hooks",
    "buffer",
    "child_process",
    "cluster",
    "console",
    "constants",
    "crypto",
    "dgram",
    "diagnostics_channel",
    "dns",
    "domain",
    "events",
    "fs",
    "http",
    "http2",
    "https",
    "inspector",
    "module",
    "net",
    "os",
    "path",
    "perf_hooks",
    "process",
    "punycode",
    "querystring",
    "readline",
    "repl",
    "stream",
    "string_decoder",
    "sys",
    "timers",
    "tls",
    "trace_events",
    "tty",
    "url",
    "util",
    "v8",
    "vm",
    "wasi",
    "worker_threads",
    "zlib",
];

/// Extensions tried after a specifier that names no file as written.
const PROBED_EXTENSIONS: &[&str] = &[".ts", ".mts", ".cts", ".js", ".mjs", ".cjs", ".json"];

/// Resolves specifiers against one service folder, caching `package.json`s.
#[derive(Debug)]
pub struct FolderResolver {
    root: PathBuf,
    packages: HashMap<String, Option<PackageJson>>,
}

impl FolderResolver {
    /// `root` must exist; it is canonicalised so links can be checked against it.
    pub fn new(root: &Path) -> std::io::Result<Self> {
        Ok(Self {
            root: root.canonicalize()?,
            packages: HashMap::new(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Resolves `specifier`, written in the module at `from` (a folder path).
    pub fn resolve(
        &mut self,
        from: &str,
        specifier: &str,
        kind: ImportKind,
    ) -> Result<Resolved, NodeResolveError> {
        let escapes = || NodeResolveError::Escapes {
            specifier: specifier.to_owned(),
        };
        if let Some(name) = specifier.strip_prefix("node:") {
            return Ok(Resolved::Builtin(name.to_owned()));
        }
        let base = parent_of(from);
        if specifier.starts_with("./") || specifier.starts_with("../") || specifier == "." {
            let joined = join(base, specifier).ok_or_else(escapes)?;
            return self.file_or_folder(&joined, specifier).map(Resolved::File);
        }
        if specifier.starts_with('/') || specifier.contains(':') || specifier.is_empty() {
            return Err(escapes());
        }
        let (package, subpath) = split_package(specifier);
        match self.find_package(base, &package) {
            Some(root) => self
                .package_file(&root, &package, &subpath, specifier, kind)
                .map(Resolved::File),
            None if BUILTINS.contains(&package.as_str()) => {
                Ok(Resolved::Builtin(specifier.to_owned()))
            }
            None => Err(NodeResolveError::NoPackage {
                specifier: specifier.to_owned(),
                package,
            }),
        }
    }

    /// The `package.json` of the package scope `path` is in: the nearest one
    /// walking up, within the folder.
    pub fn scope_of(&mut self, path: &str) -> Option<(String, PackageJson)> {
        let mut dir = parent_of(path).to_owned();
        loop {
            let candidate = if dir.is_empty() {
                "package.json".to_owned()
            } else {
                format!("{dir}/package.json")
            };
            if let Some(Some(meta)) = self.package_json(&candidate) {
                return Some((dir, meta.clone()));
            }
            if dir.is_empty() {
                return None;
            }
            dir = parent_of(&dir).to_owned();
        }
    }

    /// The parsed `package.json` at `path`, cached; `None` when there is none
    /// or it does not parse (the packer reports that where it matters).
    fn package_json(&mut self, path: &str) -> Option<&Option<PackageJson>> {
        if !self.packages.contains_key(path) {
            let parsed = std::fs::read_to_string(self.root.join(path))
                .ok()
                .and_then(|text| PackageJson::parse(&text).ok());
            self.packages.insert(path.to_owned(), parsed);
        }
        self.packages.get(path)
    }

    /// `node_modules/<package>` nearest to `dir`, walking up to the folder's root.
    fn find_package(&self, dir: &str, package: &str) -> Option<String> {
        let mut dir = dir.to_owned();
        loop {
            let candidate = if dir.is_empty() {
                format!("node_modules/{package}")
            } else if dir.ends_with("node_modules") {
                String::new() // never look in node_modules/node_modules
            } else {
                format!("{dir}/node_modules/{package}")
            };
            if !candidate.is_empty() && self.root.join(&candidate).is_dir() {
                return Some(candidate);
            }
            if dir.is_empty() {
                return None;
            }
            dir = parent_of(&dir).to_owned();
        }
    }

    fn package_file(
        &mut self,
        package_root: &str,
        package: &str,
        subpath: &str,
        specifier: &str,
        kind: ImportKind,
    ) -> Result<String, NodeResolveError> {
        let package_json = format!("{package_root}/package.json");
        let text = std::fs::read_to_string(self.root.join(&package_json)).ok();
        let meta = match text.as_deref().map(PackageJson::parse) {
            None => None,
            Some(Ok(meta)) => Some(meta),
            Some(Err(reason)) => {
                return Err(NodeResolveError::BadPackageJson {
                    specifier: specifier.to_owned(),
                    path: package_json,
                    reason,
                });
            }
        };
        let not_exported = || NodeResolveError::NotExported {
            specifier: specifier.to_owned(),
            package: package.to_owned(),
            subpath: subpath.to_owned(),
            kind: match kind {
                ImportKind::Import => "import",
                ImportKind::Require => "require",
            },
        };
        if let Some(exports) = meta.as_ref().and_then(|m| m.exports.as_ref()) {
            let target = exports_target(exports, subpath, kind.conditions())
                // A package that exports only for `require` is still
                // importable: its CommonJS is converted like any other.
                .or_else(|| {
                    (kind == ImportKind::Import)
                        .then(|| exports_target(exports, subpath, ImportKind::Require.conditions()))
                        .flatten()
                })
                .ok_or_else(not_exported)?;
            let joined = join(package_root, &target)
                .filter(|path| inside_package(path, package_root))
                .ok_or_else(|| NodeResolveError::Escapes {
                    specifier: specifier.to_owned(),
                })?;
            return self.file_or_folder(&joined, specifier);
        }
        let entry = if subpath == "." {
            let meta = meta.unwrap_or_default();
            let field = match kind {
                ImportKind::Import => meta.module.or(meta.main),
                ImportKind::Require => meta.main,
            };
            field.unwrap_or_else(|| "index.js".to_owned())
        } else {
            subpath.to_owned()
        };
        let joined = join(package_root, &format!("./{entry}"))
            .filter(|path| inside_package(path, package_root))
            .ok_or_else(|| NodeResolveError::Escapes {
                specifier: specifier.to_owned(),
            })?;
        self.file_or_folder(&joined, specifier)
    }

    /// `path` as a file, with the probed extensions, or as a folder's index.
    fn file_or_folder(&self, path: &str, specifier: &str) -> Result<String, NodeResolveError> {
        let mut candidates = vec![path.to_owned()];
        for (written, typed) in [(".js", ".ts"), (".mjs", ".mts"), (".cjs", ".cts")] {
            if let Some(stem) = path.strip_suffix(written) {
                candidates.push(format!("{stem}{typed}"));
            }
        }
        candidates.extend(PROBED_EXTENSIONS.iter().map(|ext| format!("{path}{ext}")));
        let index = if path.is_empty() {
            "index".to_owned()
        } else {
            format!("{path}/index")
        };
        candidates.extend(PROBED_EXTENSIONS.iter().map(|ext| format!("{index}{ext}")));
        for candidate in &candidates {
            let full = self.root.join(candidate);
            if full.is_file() {
                return self.inside_root(&full, specifier);
            }
        }
        Err(NodeResolveError::Missing {
            specifier: specifier.to_owned(),
            looked_for: path.to_owned(),
        })
    }

    /// The folder path of `full` after following links; links out of the
    /// folder are refused (a bundle holds only what the folder holds).
    fn inside_root(&self, full: &Path, specifier: &str) -> Result<String, NodeResolveError> {
        let escapes = || NodeResolveError::Escapes {
            specifier: specifier.to_owned(),
        };
        let real = full.canonicalize().map_err(|_| escapes())?;
        let relative = real.strip_prefix(&self.root).map_err(|_| escapes())?;
        relative
            .components()
            .map(|c| c.as_os_str().to_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .map(|parts| parts.join("/"))
            .ok_or_else(escapes)
    }
}

/// The target of `subpath` (`.` or `./sub`) in an `exports` value, matching
/// `conditions` in the map's own order; `None` when it is not exported.
pub fn exports_target(exports: &OrderedJson, subpath: &str, conditions: &[&str]) -> Option<String> {
    let is_subpath_map = matches!(exports, OrderedJson::Object(entries)
        if entries.first().is_some_and(|(key, _)| key.starts_with('.')));
    if !is_subpath_map {
        return (subpath == ".")
            .then(|| conditional_target(exports, conditions, None))
            .flatten();
    }
    let OrderedJson::Object(entries) = exports else {
        return None;
    };
    if let Some((_, value)) = entries.iter().find(|(key, _)| key == subpath) {
        return conditional_target(value, conditions, None);
    }
    // Patterns (`./*`, `./features/*.js`): the longest prefix wins.
    let mut best: Option<(&str, &str, &OrderedJson)> = None;
    for (key, value) in entries {
        if let Some((prefix, suffix)) = key.split_once('*')
            && subpath.starts_with(prefix)
            && subpath.ends_with(suffix)
            && subpath.len() >= prefix.len() + suffix.len()
            && best.is_none_or(|(p, _, _)| prefix.len() > p.len())
        {
            best = Some((prefix, suffix, value));
        }
    }
    let (prefix, suffix, value) = best?;
    let star = &subpath[prefix.len()..subpath.len() - suffix.len()];
    conditional_target(value, conditions, Some(star))
}

fn conditional_target(
    value: &OrderedJson,
    conditions: &[&str],
    star: Option<&str>,
) -> Option<String> {
    match value {
        OrderedJson::String(target) if target.starts_with("./") => Some(match star {
            Some(star) => target.replace('*', star),
            None => target.clone(),
        }),
        OrderedJson::Array(items) => items
            .iter()
            .find_map(|item| conditional_target(item, conditions, star)),
        OrderedJson::Object(entries) => entries
            .iter()
            .filter(|(condition, _)| conditions.contains(&condition.as_str()))
            .find_map(|(_, value)| conditional_target(value, conditions, star)),
        _ => None,
    }
}

fn inside_package(path: &str, package_root: &str) -> bool {
    path == package_root || path.starts_with(&format!("{package_root}/"))
}

/// (`pkg` or `@scope/pkg`, `.` or `./sub/path`).
fn split_package(specifier: &str) -> (String, String) {
    let segments = if specifier.starts_with('@') { 2 } else { 1 };
    let mut parts = specifier.splitn(segments + 1, '/');
    let package: Vec<&str> = parts.by_ref().take(segments).collect();
    let subpath = parts
        .next()
        .map_or_else(|| ".".to_owned(), |rest| format!("./{rest}"));
    (package.join("/"), subpath)
}

/// The folder part of a '/'-separated path ("" at the root).
pub fn parent_of(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(dir, _)| dir)
}

/// Joins `relative` onto folder `base`; `None` when it would leave the root.
pub fn join(base: &str, relative: &str) -> Option<String> {
    let mut parts: Vec<&str> = base.split('/').filter(|p| !p.is_empty()).collect();
    for part in relative.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            other => parts.push(other),
        }
    }
    Some(parts.join("/"))
}

/// `to` as a specifier relative to the module `from` (`./x.js`, `../a/b.js`),
/// which the minion's resolver follows without any package lookup.
pub fn relative_specifier(from: &str, to: &str) -> String {
    let from_dir: Vec<&str> = parent_of(from)
        .split('/')
        .filter(|p| !p.is_empty())
        .collect();
    let target: Vec<&str> = to.split('/').collect();
    let common = from_dir
        .iter()
        .zip(&target)
        .take_while(|(a, b)| a == b)
        .count();
    let ups = from_dir.len() - common;
    let rest = target[common..].join("/");
    if ups == 0 {
        format!("./{rest}")
    } else {
        format!("{}{rest}", "../".repeat(ups))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exports(json: &str) -> OrderedJson {
        PackageJson::parse(&format!(r#"{{"exports": {json}}}"#))
            .unwrap()
            .exports
            .unwrap()
    }

    #[test]
    fn exports_follow_conditions_in_the_package_order() {
        let uuid = exports(
            r#"{".": {"node": {"import": "./node.mjs"}, "browser": {"import": "./browser.js"},
                 "default": {"import": "./esm/index.js", "require": "./cjs/index.js"}},
                 "./package.json": "./package.json"}"#,
        );
        let import = ImportKind::Import.conditions();
        let require = ImportKind::Require.conditions();
        assert_eq!(
            exports_target(&uuid, ".", import).unwrap(),
            "./esm/index.js"
        );
        assert_eq!(
            exports_target(&uuid, ".", require).unwrap(),
            "./cjs/index.js"
        );
        assert_eq!(exports_target(&uuid, "./missing", import), None);
        let patterns = exports(r#"{"./*": "./dist/*.js", "./features/*": "./f/*/index.js"}"#);
        assert_eq!(
            exports_target(&patterns, "./features/a", import).unwrap(),
            "./f/a/index.js"
        );
        assert_eq!(
            exports_target(&patterns, "./x", import).unwrap(),
            "./dist/x.js"
        );
        let sugar = exports(r#""./main.js""#);
        assert_eq!(exports_target(&sugar, ".", require).unwrap(), "./main.js");
    }

    #[test]
    fn specifiers_split_and_join() {
        assert_eq!(split_package("semver"), ("semver".into(), ".".into()));
        assert_eq!(
            split_package("@s/p/a/b.js"),
            ("@s/p".into(), "./a/b.js".into())
        );
        assert_eq!(relative_specifier("main.ts", "lib/a.js"), "./lib/a.js");
        assert_eq!(
            relative_specifier("lib/x/a.js", "node_modules/s/i.js"),
            "../../node_modules/s/i.js"
        );
        assert_eq!(relative_specifier("lib/a.js", "lib/b.js"), "./b.js");
        assert_eq!(join("a/b", "../../../x"), None);
    }
}
