//! The modules a service needs, found by following imports and `require()`
//! from its own modules, and printed as the ES modules a minion runs.
//!
//! - The author's TypeScript loses its types here, and keeps a source map.
//! - A CommonJS module becomes an ES module that wraps its code in a
//!   function, run once on first use (as Node does), so circular requires
//!   see the partly filled `module.exports` Node would give; it exports only
//!   that function, which other CommonJS modules call. ES modules import it
//!   through a facade (`<path>?esm`) that runs it and exports `default`
//!   (`module.exports`) and the names it assigns to `exports` (for
//!   `import { x } from`); so a module runs when it is first required or
//!   imported, never earlier. Its code keeps its lines: the wrapper's head
//!   shares the first line.
//! - JSON modules become `export default <json>`.
//! - Every specifier is rewritten to a path relative to its importer, so
//!   the minion loads modules without looking anything up.
//!
//! Only what the service's own modules reach is bundled; a module that
//! needs a Node built-in without a shim is refused with the chain of
//! imports that leads to it.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};

use crate::node_resolve::{
    FolderResolver, ImportKind, NodeResolveError, Resolved, parent_of, relative_specifier,
};
use crate::package_json::PackageJson;
use crate::shims;
use crate::syntax::{self, ModuleSyntax, SyntaxError};

#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is not UTF-8")]
    NotUtf8(String),
    #[error(transparent)]
    Syntax(#[from] SyntaxError),
    #[error("{file}: not valid JSON: {reason}")]
    Json { file: String, reason: String },
    #[error("{chain}: import {error}")]
    Resolve {
        chain: String,
        error: NodeResolveError,
    },
    #[error(
        "{chain} → {builtin}: needs the Node built-in {builtin:?}, which a service's sandbox does not have (shimmed built-ins: {shimmed})"
    )]
    Builtin {
        chain: String,
        builtin: String,
        shimmed: String,
    },
    #[error(
        "{chain}: calls process.binding(), Node's internals, which a service's sandbox does not have"
    )]
    ProcessBinding { chain: String },
}

/// What to start from.
#[derive(Debug, Clone)]
pub struct GraphRoots {
    /// The service's own modules, the entry first.
    pub modules: Vec<String>,
    /// Whether `provis:test` may be imported (local tests only).
    pub tests: bool,
}

/// A package whose code the bundle holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BundledPackage {
    /// Its folder, as npm's lockfile names it (`node_modules/semver`).
    pub path: String,
    pub name: String,
    pub version: Option<String>,
    pub license: Option<String>,
}

/// The printed modules of a service.
#[derive(Debug, Clone, Default)]
pub struct ModuleGraph {
    /// ES module text by bundle path.
    pub modules: BTreeMap<String, String>,
    /// Source maps (JSON) by the path of the module they map.
    pub source_maps: BTreeMap<String, String>,
    /// Packages under `node_modules/` that modules came from.
    pub packages: Vec<BundledPackage>,
    /// What the author should know but need not fix: `require()`s in
    /// packages of packages that are not installed (often optional ones,
    /// inside `try`), which throw `Cannot find module` if they run.
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Module,
    CommonJs,
    Json,
}

/// One module after reading and analysis, before printing.
struct Analyzed {
    kind: Kind,
    code: String,
    syntax: ModuleSyntax,
    /// Each import (ES) or require (CommonJS) specifier → its bundle path.
    targets: HashMap<String, String>,
    /// `require()`s of a package's that name nothing installed, with why.
    unresolved: BTreeMap<String, String>,
}

/// Follows the imports from `roots` through the folder at `root`.
pub fn build(root: &Path, roots: &GraphRoots) -> Result<ModuleGraph, GraphError> {
    let mut resolver = FolderResolver::new(root).map_err(|source| GraphError::Read {
        path: root.to_owned(),
        source,
    })?;
    let mut analyzed: BTreeMap<String, Analyzed> = BTreeMap::new();
    let mut parent: HashMap<String, String> = HashMap::new();
    let mut source_maps = BTreeMap::new();
    let mut warnings = Vec::new();
    let mut queue: VecDeque<String> = roots.modules.iter().cloned().collect();
    let mut queued: BTreeSet<String> = queue.iter().cloned().collect();

    while let Some(path) = queue.pop_front() {
        let chain = || chain_to(&parent, &path);
        let (text, as_module, map) = read_module(&mut resolver, &path)?;
        if let Some(map) = map {
            source_maps.insert(path.clone(), map);
        }
        let (kind, syntax) = if path.ends_with(".json") {
            serde_json::from_str::<serde_json::Value>(&text).map_err(|err| GraphError::Json {
                file: path.clone(),
                reason: err.to_string(),
            })?;
            (Kind::Json, ModuleSyntax::default())
        } else {
            let syntax = syntax::analyze(&path, &text, as_module)?;
            let kind = if syntax.is_module || as_module == Some(true) || !syntax.uses_commonjs {
                Kind::Module
            } else {
                Kind::CommonJs
            };
            (kind, syntax)
        };
        if syntax.uses_process_binding {
            return Err(GraphError::ProcessBinding { chain: chain() });
        }
        let (specifiers, import_kind): (Vec<String>, _) = match kind {
            Kind::Module => (
                syntax.imports.iter().map(|i| i.specifier.clone()).collect(),
                ImportKind::Import,
            ),
            Kind::CommonJs => (syntax.requires.clone(), ImportKind::Require),
            Kind::Json => (Vec::new(), ImportKind::Import),
        };
        let mut targets = HashMap::new();
        let mut unresolved = BTreeMap::new();
        let mut wanted: Vec<String> = Vec::new();
        for specifier in specifiers {
            let target = if specifier == shims::TEST_API_SPECIFIER && roots.tests {
                shims::TEST_API_PATH.to_owned()
            } else {
                match resolver.resolve(&path, &specifier, import_kind) {
                    Ok(Resolved::File(file)) => file,
                    Ok(Resolved::Builtin(name)) => shims::for_builtin(&name)
                        .map(str::to_owned)
                        .ok_or_else(|| GraphError::Builtin {
                            chain: chain(),
                            builtin: name.clone(),
                            shimmed: shims::shimmed().collect::<Vec<_>>().join(", "),
                        })?,
                    // Node throws for these only when the require() runs,
                    // and packages guard optional ones with `try`.
                    Err(
                        error @ (NodeResolveError::NoPackage { .. }
                        | NodeResolveError::Missing { .. }),
                    ) if kind == Kind::CommonJs && package_of(&path).is_some() => {
                        warnings.push(format!(
                            "{}: require {error}; it throws if it runs",
                            chain()
                        ));
                        unresolved.insert(specifier, error.to_string());
                        continue;
                    }
                    Err(error) => {
                        return Err(GraphError::Resolve {
                            chain: chain(),
                            error,
                        });
                    }
                }
            };
            wanted.push(target.clone());
            targets.insert(specifier, target);
        }
        if kind == Kind::CommonJs && syntax.uses_process {
            wanted.push(shims::PROCESS_PATH.to_owned());
        }
        for target in wanted {
            if queued.insert(target.clone()) {
                parent.insert(target.clone(), path.clone());
                queue.push_back(target);
            }
        }
        analyzed.insert(
            path,
            Analyzed {
                kind,
                code: text,
                syntax,
                targets,
                unresolved,
            },
        );
    }

    let mut modules = BTreeMap::new();
    for (path, module) in &analyzed {
        let printed = match module.kind {
            Kind::Json => format!("export default {};\n", module.code.trim_end()),
            Kind::Module => print_module(path, module, &analyzed),
            Kind::CommonJs => {
                modules.insert(facade_of(path), print_facade(path, &analyzed));
                print_commonjs(path, module, &analyzed)
            }
        };
        modules.insert(path.clone(), printed);
    }
    let packages = bundled_packages(&mut resolver, analyzed.keys());
    Ok(ModuleGraph {
        modules,
        source_maps,
        packages,
        warnings,
    })
}

/// The text of the module at `path` as JavaScript, whether it is an ES
/// module (`Some`) or must be told by its content (`None`), and a source
/// map when it was TypeScript.
fn read_module(
    resolver: &mut FolderResolver,
    path: &str,
) -> Result<(String, Option<bool>, Option<String>), GraphError> {
    if let Some(source) = shims::source(path) {
        return Ok((source.to_owned(), None, None));
    }
    let full = resolver.root().join(path);
    let bytes = std::fs::read(&full).map_err(|source| GraphError::Read {
        path: full.clone(),
        source,
    })?;
    let text = String::from_utf8(bytes).map_err(|_| GraphError::NotUtf8(path.to_owned()))?;
    let text = strip_hashbang(text);
    let extension = path.rsplit_once('.').map_or("", |(_, ext)| ext);
    Ok(match extension {
        "ts" | "mts" | "cts" => {
            let out = syntax::transpile_typescript(path, &text)?;
            (out.code, Some(extension != "cts"), Some(out.source_map))
        }
        "mjs" => (text, Some(true), None),
        "cjs" => (text, Some(false), None),
        "json" => (text, None, None),
        _ => {
            let in_module_scope = resolver
                .scope_of(path)
                .is_some_and(|(_, meta)| meta.is_module_scope());
            (text, in_module_scope.then_some(true), None)
        }
    })
}

/// `#!…` on the first line is blanked (kept as a comment, so lines stay put).
fn strip_hashbang(text: String) -> String {
    match text.strip_prefix("#!") {
        Some(rest) => format!("//{rest}"),
        None => text,
    }
}

/// The bundle path of the ES facade of CommonJS module `path`.
fn facade_of(path: &str) -> String {
    format!("{path}?esm")
}

/// An ES module with every specifier rewritten to its bundle path (a
/// CommonJS module's facade for a CommonJS target).
fn print_module(path: &str, module: &Analyzed, all: &BTreeMap<String, Analyzed>) -> String {
    let mut out = String::with_capacity(module.code.len());
    let mut copied = 0usize;
    for import in &module.syntax.imports {
        let (Some((start, end)), Some(target)) =
            (import.span, module.targets.get(&import.specifier))
        else {
            continue;
        };
        let target = match all.get(target).map(|m| m.kind) {
            Some(Kind::CommonJs) => facade_of(target),
            _ => target.clone(),
        };
        let (start, end) = (start as usize, end as usize);
        if start < copied || end > module.code.len() {
            continue;
        }
        out.push_str(&module.code[copied..start]);
        out.push_str(&quoted(&relative_specifier(path, &target)));
        copied = end;
    }
    out.push_str(&module.code[copied..]);
    out
}

/// A CommonJS module as an ES module; see the module docs.
fn print_commonjs(path: &str, module: &Analyzed, all: &BTreeMap<String, Analyzed>) -> String {
    let mut imports = String::new();
    let mut cases = String::new();
    for (n, specifier) in module.syntax.requires.iter().enumerate() {
        let Some(target) = module.targets.get(specifier) else {
            continue;
        };
        let from = quoted(&relative_specifier(path, target));
        let value = match all.get(target).map(|m| m.kind) {
            Some(Kind::CommonJs) => {
                imports.push_str(&format!(
                    "import {{ __provis_cjs as __provis_r{n} }} from {from}; "
                ));
                format!("__provis_r{n}()")
            }
            Some(Kind::Json) => {
                imports.push_str(&format!("import __provis_r{n} from {from}; "));
                format!("__provis_r{n}")
            }
            _ => {
                imports.push_str(&format!("import * as __provis_r{n} from {from}; "));
                format!("__provis_r{n}")
            }
        };
        cases.push_str(&format!("case {}: return {value}; ", quoted(specifier)));
    }
    for (specifier, why) in &module.unresolved {
        let message = quoted(&format!("Cannot find module '{specifier}': {why}"));
        cases.push_str(&format!(
            "case {}: throw new Error({message}); ",
            quoted(specifier)
        ));
    }
    let (process_param, process_arg) = if module.syntax.uses_process {
        let from = quoted(&relative_specifier(path, shims::PROCESS_PATH));
        imports.push_str(&format!(
            "import {{ __provis_cjs as __provis_process }} from {from}; "
        ));
        ("process, ", "__provis_process(), ")
    } else {
        ("", "")
    };
    let file = quoted(path);
    let dir = quoted(parent_of(path));
    let mut out = format!(
        "{imports}var __provis_module; \
         export function __provis_cjs() {{ if (__provis_module) return __provis_module.exports; \
         __provis_module = {{ exports: {{}} }}; \
         __provis_factory.call(__provis_module.exports, __provis_module, __provis_module.exports, __provis_require, {process_arg}globalThis, {file}, {dir}); \
         return __provis_module.exports; }} \
         function __provis_require(id) {{ switch (id) {{ {cases}}} \
         throw new Error(\"Cannot find module '\" + id + \"': a bundle holds only what require() names with a string literal\"); }} \
         function __provis_factory(module, exports, require, {process_param}global, __filename, __dirname) {{"
    );
    out.push_str(&module.code);
    out.push_str("\n}\n");
    out
}

/// The ES face of CommonJS module `path`: runs it when first imported and
/// exports `module.exports` as `default` and by its names.
fn print_facade(path: &str, all: &BTreeMap<String, Analyzed>) -> String {
    let from = quoted(&relative_specifier(&facade_of(path), path));
    let mut out = format!(
        "import {{ __provis_cjs }} from {from};\nvar __provis_exports = __provis_cjs();\nexport default __provis_exports;\n"
    );
    let mut names = BTreeSet::new();
    export_names(path, all, &mut BTreeSet::new(), &mut names);
    for name in names {
        out.push_str(&format!("export var {name} = __provis_exports.{name};\n"));
    }
    out
}

/// The names a CommonJS module exports, its re-exports' included.
fn export_names(
    path: &str,
    all: &BTreeMap<String, Analyzed>,
    seen: &mut BTreeSet<String>,
    names: &mut BTreeSet<String>,
) {
    if !seen.insert(path.to_owned()) {
        return;
    }
    let Some(module) = all.get(path).filter(|m| m.kind == Kind::CommonJs) else {
        return;
    };
    names.extend(
        module
            .syntax
            .export_names
            .iter()
            .filter(|name| is_plain_identifier(name))
            .cloned(),
    );
    for specifier in &module.syntax.reexports {
        if let Some(target) = module.targets.get(specifier) {
            export_names(target, all, seen, names);
        }
    }
}

/// A name that can follow `export var` (no reserved word, none of ours).
fn is_plain_identifier(name: &str) -> bool {
    const RESERVED: &[&str] = &[
        "await",
        "break",
        "case",
        "catch",
        "class",
        "const",
        "continue",
        "debugger",
        "default",
        "delete",
        "do",
        "else",
        "enum",
        "export",
        "extends",
        "false",
        "finally",
        "for",
        "function",
        "if",
        "implements",
        "import",
        "in",
        "instanceof",
        "interface",
        "let",
        "new",
        "null",
        "package",
        "private",
        "protected",
        "public",
        "return",
        "static",
        "super",
        "switch",
        "this",
        "throw",
        "true",
        "try",
        "typeof",
        "var",
        "void",
        "while",
        "with",
        "yield",
        "arguments",
        "eval",
    ];
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == '$')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
        && !RESERVED.contains(&name)
        && !name.starts_with("__provis_")
}

fn quoted(text: &str) -> String {
    serde_json::Value::String(text.to_owned()).to_string()
}

/// `main.ts → pkg-a → pkg-b`: how `path` was reached, one name per package.
fn chain_to(parent: &HashMap<String, String>, path: &str) -> String {
    let mut steps = vec![path.to_owned()];
    let mut at = path;
    while let Some(up) = parent.get(at) {
        if steps.len() > 64 {
            break;
        }
        steps.push(up.clone());
        at = up;
    }
    steps.reverse();
    let mut labels: Vec<String> = Vec::new();
    for step in steps {
        let label = package_of(&step).map_or(step.clone(), |(_, name)| name);
        if labels.last() != Some(&label) {
            labels.push(label);
        }
    }
    labels.join(" → ")
}

/// The package folder and name a bundle path belongs to, if it is under `node_modules/`.
pub fn package_of(path: &str) -> Option<(String, String)> {
    let at = path.rfind("node_modules/")?;
    let rest = &path[at + "node_modules/".len()..];
    let segments = if rest.starts_with('@') { 2 } else { 1 };
    let name: Vec<&str> = rest.split('/').take(segments).collect();
    let name = name.join("/");
    Some((
        format!("{}{name}", &path[..at + "node_modules/".len()]),
        name,
    ))
}

fn bundled_packages<'a>(
    resolver: &mut FolderResolver,
    paths: impl Iterator<Item = &'a String>,
) -> Vec<BundledPackage> {
    let folders: BTreeSet<(String, String)> = paths.filter_map(|path| package_of(path)).collect();
    folders
        .into_iter()
        .map(|(folder, name)| {
            let meta = std::fs::read_to_string(resolver.root().join(&folder).join("package.json"))
                .ok()
                .and_then(|text| PackageJson::parse(&text).ok())
                .unwrap_or_default();
            BundledPackage {
                path: folder,
                name: meta.name.clone().unwrap_or(name),
                version: meta.version.clone(),
                license: meta.license_name(),
            }
        })
        .collect()
}
