//! How an `import` inside a bundle finds its module on the minion.
//!
//! - `./x.js`, `../lib/y.js`: relative to the importing module; it must stay
//!   inside the bundle and name a file exactly. The packer rewrites every
//!   specifier to this form ([`crate::module_graph`]), so bundles packed now
//!   need nothing else.
//! - `pkg`, `pkg/sub.js`, `@scope/pkg`: bundles packed by earlier versions
//!   still name vendored ES module packages under `node_modules/`; the
//!   package's entry is found as the packer finds it for an `import`
//!   ([`crate::node_resolve::exports_target`], then `module`, `main`,
//!   `index.js`). CommonJS packages in such bundles are refused.

use std::collections::BTreeMap;

use crate::node_resolve::{ImportKind, exports_target, join};
use crate::package_json::PackageJson;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ResolveError {
    #[error("{from}: import {specifier:?} leaves the service folder")]
    Escapes { from: String, specifier: String },
    #[error(
        "{from}: import {specifier:?} names no module in the bundle (looked for {looked_for:?})"
    )]
    Missing {
        from: String,
        specifier: String,
        looked_for: String,
    },
    #[error(
        "{from}: import {specifier:?}: package {package:?} is not vendored under node_modules/"
    )]
    NoPackage {
        from: String,
        specifier: String,
        package: String,
    },
    #[error(
        "{from}: import {specifier:?}: package {package:?} is CommonJS; only ES module packages can be vendored (use its ESM build)"
    )]
    CommonJs {
        from: String,
        specifier: String,
        package: String,
    },
    #[error("{from}: import {specifier:?}: node_modules/{package}/package.json is not valid JSON")]
    BadPackageJson {
        from: String,
        specifier: String,
        package: String,
    },
}

/// Resolves `specifier` imported from module `from` against the bundle's files.
pub fn resolve_import(
    files: &BTreeMap<String, String>,
    from: &str,
    specifier: &str,
) -> Result<String, ResolveError> {
    let err_missing = |looked_for: String| ResolveError::Missing {
        from: from.to_owned(),
        specifier: specifier.to_owned(),
        looked_for,
    };
    if specifier.starts_with("./") || specifier.starts_with("../") {
        let base = from.rsplit_once('/').map_or("", |(dir, _)| dir);
        let joined = join(base, specifier).ok_or_else(|| ResolveError::Escapes {
            from: from.to_owned(),
            specifier: specifier.to_owned(),
        })?;
        return if files.contains_key(&joined) {
            Ok(joined)
        } else {
            Err(err_missing(joined))
        };
    }
    if specifier.starts_with('/') || specifier.contains(':') || specifier.is_empty() {
        return Err(ResolveError::Escapes {
            from: from.to_owned(),
            specifier: specifier.to_owned(),
        });
    }
    // A bare specifier: a package, maybe scoped, maybe with a subpath.
    let mut parts = specifier.splitn(if specifier.starts_with('@') { 3 } else { 2 }, '/');
    let package = if specifier.starts_with('@') {
        let scope = parts.next().unwrap_or_default();
        format!("{scope}/{}", parts.next().unwrap_or_default())
    } else {
        parts.next().unwrap_or_default().to_owned()
    };
    let subpath = parts.next();
    let root = format!("node_modules/{package}");
    let package_json = format!("{root}/package.json");
    let Some(text) = files.get(&package_json) else {
        return Err(ResolveError::NoPackage {
            from: from.to_owned(),
            specifier: specifier.to_owned(),
            package,
        });
    };
    let meta = PackageJson::parse(text).map_err(|_| ResolveError::BadPackageJson {
        from: from.to_owned(),
        specifier: specifier.to_owned(),
        package: package.clone(),
    })?;
    let entry = match subpath {
        Some(sub) => sub.to_owned(),
        None => package_entry(&meta),
    };
    let esm = meta.is_module_scope() || meta.module.is_some() || entry.ends_with(".mjs");
    if !esm {
        return Err(ResolveError::CommonJs {
            from: from.to_owned(),
            specifier: specifier.to_owned(),
            package,
        });
    }
    let path = join(&root, &format!("./{entry}"))
        .filter(|path| path.starts_with(&format!("{root}/")))
        .ok_or_else(|| ResolveError::Escapes {
            from: from.to_owned(),
            specifier: specifier.to_owned(),
        })?;
    if files.contains_key(&path) {
        Ok(path)
    } else {
        Err(err_missing(path))
    }
}

fn package_entry(meta: &PackageJson) -> String {
    meta.exports
        .as_ref()
        .and_then(|exports| exports_target(exports, ".", ImportKind::Import.conditions()))
        .or_else(|| meta.module.clone())
        .or_else(|| meta.main.clone())
        .unwrap_or_else(|| "index.js".to_owned())
        .trim_start_matches("./")
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(entries: &[(&str, &str)]) -> BTreeMap<String, String> {
        entries
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn relative_imports_resolve_inside_the_bundle() {
        let f = files(&[("main.js", ""), ("lib/a.js", ""), ("lib/b.js", "")]);
        assert_eq!(
            resolve_import(&f, "main.js", "./lib/a.js").unwrap(),
            "lib/a.js"
        );
        assert_eq!(
            resolve_import(&f, "lib/a.js", "./b.js").unwrap(),
            "lib/b.js"
        );
        assert_eq!(
            resolve_import(&f, "lib/a.js", "../main.js").unwrap(),
            "main.js"
        );
        assert!(matches!(
            resolve_import(&f, "main.js", "../etc/passwd"),
            Err(ResolveError::Escapes { .. })
        ));
        assert!(matches!(
            resolve_import(&f, "main.js", "./nope.js"),
            Err(ResolveError::Missing { .. })
        ));
        assert!(matches!(
            resolve_import(&f, "main.js", "/etc/passwd"),
            Err(ResolveError::Escapes { .. })
        ));
    }

    #[test]
    fn packages_resolve_from_node_modules_and_commonjs_is_refused() {
        let f = files(&[
            ("main.js", ""),
            (
                "node_modules/esm/package.json",
                r#"{"type": "module", "exports": {".": {"import": "./dist/index.js"}}}"#,
            ),
            ("node_modules/esm/dist/index.js", ""),
            ("node_modules/esm/extra.js", ""),
            ("node_modules/@s/p/package.json", r#"{"module": "m.js"}"#),
            ("node_modules/@s/p/m.js", ""),
            ("node_modules/cjs/package.json", r#"{"main": "index.js"}"#),
            ("node_modules/cjs/index.js", ""),
        ]);
        assert_eq!(
            resolve_import(&f, "main.js", "esm").unwrap(),
            "node_modules/esm/dist/index.js"
        );
        assert_eq!(
            resolve_import(&f, "main.js", "esm/extra.js").unwrap(),
            "node_modules/esm/extra.js"
        );
        assert_eq!(
            resolve_import(&f, "main.js", "@s/p").unwrap(),
            "node_modules/@s/p/m.js"
        );
        assert!(matches!(
            resolve_import(&f, "main.js", "cjs"),
            Err(ResolveError::CommonJs { .. })
        ));
        assert!(matches!(
            resolve_import(&f, "main.js", "left-pad"),
            Err(ResolveError::NoPackage { .. })
        ));
        assert!(matches!(
            resolve_import(&f, "main.js", "esm/../../main.js"),
            Err(ResolveError::Escapes { .. })
        ));
    }
}
