//! Packing a service folder into a [`Bundle`] and opening a bundle again.
//!
//! A bundle holds the manifest and the ES modules the service needs (see
//! [`crate::module_graph`]: the author's modules, TypeScript and npm packages
//! converted, with source maps), sorted by path. The same folder (and so the
//! same lockfile's `node_modules/`) always gives the same bytes and so the
//! same digest; a minion recomputes the digest of every bundle it fetches and
//! refuses a mismatch.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use prost::Message;
use provis_proto::v1::{Bundle, BundleFile};

use crate::lockfile::{AuditedPackage, LockfileError};
use crate::manifest::{MANIFEST_FILE, ManifestError, ServiceManifest};
use crate::module_graph::{GraphError, GraphRoots};
use crate::source_map::MAP_SUFFIX;

/// The most a bundle may weigh, all files together.
pub const MAX_BUNDLE_BYTES: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}: no {MANIFEST_FILE} here; a service folder needs one")]
    NoManifest(PathBuf),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("{0} is a symbolic link; a bundle holds regular files only (copy the file in)")]
    Symlink(PathBuf),
    #[error("{0} is not UTF-8")]
    NotUtf8(PathBuf),
    #[error("the service is {0} bytes, more than the {MAX_BUNDLE_BYTES} a bundle may hold")]
    TooLarge(usize),
    #[error("entry module {0:?} named in {MANIFEST_FILE} is not in the folder")]
    MissingEntry(String),
    #[error(transparent)]
    Modules(#[from] GraphError),
    #[error(transparent)]
    Lockfile(#[from] LockfileError),
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OpenError {
    #[error("bundle digest is {actual}, not the {expected} it was published under: refused")]
    DigestMismatch { expected: String, actual: String },
    #[error("bundle is not a provis Bundle: {0}")]
    Undecodable(String),
    #[error("bundle manifest: {0}")]
    Manifest(#[from] ManifestError),
    #[error("bundle file {0:?} is not UTF-8")]
    NotUtf8(String),
    #[error("entry module {0:?} is not in the bundle")]
    MissingEntry(String),
}

/// A bundle with its parsed manifest, its encoded bytes and their digest.
#[derive(Debug, Clone)]
pub struct PackedBundle {
    pub manifest: ServiceManifest,
    /// Module sources by path.
    pub files: BTreeMap<String, String>,
    pub bytes: bytes::Bytes,
    pub digest: String,
    /// The npm packages it holds code from, as the lockfile lists them
    /// (known when packed from a folder, empty when opened from bytes).
    pub packages: Vec<AuditedPackage>,
    /// Packing's warnings (see [`crate::module_graph::ModuleGraph::warnings`]).
    pub warnings: Vec<String>,
}

/// `sha256:<hex>` of `bytes`.
pub fn digest_of(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

impl PackedBundle {
    /// Packs the service folder at `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self, PackError> {
        Self::pack(dir, false).map(|(bundle, _)| bundle)
    }

    /// Packs the folder with its tests (`*.test.js`, `*.test.ts`, …), which
    /// may import `provis:test`; for `provis service test`, never to ship.
    /// Returns the test modules too.
    pub fn from_dir_with_tests(dir: &Path) -> Result<(Self, Vec<String>), PackError> {
        Self::pack(dir, true)
    }

    fn pack(dir: &Path, with_tests: bool) -> Result<(Self, Vec<String>), PackError> {
        let manifest_path = dir.join(MANIFEST_FILE);
        let manifest_toml = match std::fs::read_to_string(&manifest_path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Err(PackError::NoManifest(dir.to_owned()));
            }
            Err(source) => {
                return Err(PackError::Read {
                    path: manifest_path,
                    source,
                });
            }
        };
        let manifest = ServiceManifest::parse(&manifest_toml)?;
        let mut own = OwnModules::default();
        collect(dir, dir, &mut own)?;
        if !own.modules.contains(&manifest.entry) {
            return Err(PackError::MissingEntry(manifest.entry.clone()));
        }
        let mut roots = vec![manifest.entry.clone()];
        roots.extend(
            own.modules
                .iter()
                .filter(|m| **m != manifest.entry)
                .cloned(),
        );
        if with_tests {
            roots.extend(own.tests.iter().cloned());
        }
        let graph = crate::module_graph::build(
            dir,
            &GraphRoots {
                modules: roots,
                tests: with_tests,
            },
        )?;
        let packages = crate::lockfile::audit(dir, &graph.packages)?;
        let warnings = graph.warnings;
        let mut files = graph.modules;
        for (module, map) in graph.source_maps {
            files.insert(format!("{module}{MAP_SUFFIX}"), map);
        }
        let bundle = Bundle {
            manifest_toml,
            files: files
                .iter()
                .map(|(path, content)| BundleFile {
                    path: path.clone(),
                    content: content.clone().into_bytes(),
                })
                .collect(),
        };
        let bytes = bundle.encode_to_vec();
        if bytes.len() > MAX_BUNDLE_BYTES {
            return Err(PackError::TooLarge(bytes.len()));
        }
        let packed = Self {
            manifest,
            files,
            digest: digest_of(&bytes),
            bytes: bytes.into(),
            packages,
            warnings,
        };
        Ok((packed, if with_tests { own.tests } else { Vec::new() }))
    }

    /// Opens fetched bytes, refusing them unless they hash to `expected_digest`.
    pub fn from_bytes(bytes: bytes::Bytes, expected_digest: &str) -> Result<Self, OpenError> {
        let actual = digest_of(&bytes);
        if actual != expected_digest {
            return Err(OpenError::DigestMismatch {
                expected: expected_digest.to_owned(),
                actual,
            });
        }
        let bundle = Bundle::decode(bytes.as_ref())
            .map_err(|err| OpenError::Undecodable(err.to_string()))?;
        let manifest = ServiceManifest::parse(&bundle.manifest_toml)?;
        let mut files = BTreeMap::new();
        for file in bundle.files {
            let text = String::from_utf8(file.content)
                .map_err(|_| OpenError::NotUtf8(file.path.clone()))?;
            files.insert(file.path, text);
        }
        if !files.contains_key(&manifest.entry) {
            return Err(OpenError::MissingEntry(manifest.entry.clone()));
        }
        Ok(Self {
            manifest,
            files,
            bytes,
            digest: actual,
            packages: Vec::new(),
            warnings: Vec::new(),
        })
    }
}

/// The author's modules of a folder (outside `node_modules/`), by path.
#[derive(Debug, Default)]
struct OwnModules {
    modules: Vec<String>,
    tests: Vec<String>,
}

/// A module of the author's: JavaScript or TypeScript, not a declaration file.
fn is_own_module(name: &str) -> bool {
    [".js", ".mjs", ".cjs", ".ts", ".mts", ".cts"]
        .iter()
        .any(|ext| name.ends_with(ext))
        && !name.ends_with(".d.ts")
        && !name.ends_with(".d.mts")
        && !name.ends_with(".d.cts")
}

/// A test module: `name.test.js`, `name.test.ts`, ….
fn is_test_module(name: &str) -> bool {
    name.rsplit_once('.')
        .is_some_and(|(stem, _)| stem.ends_with(".test"))
}

/// Adds the author's modules under `dir` to `own`, by path relative to
/// `root` with '/' separators. Hidden entries and `node_modules/` are
/// skipped (packages come in through imports).
fn collect(root: &Path, dir: &Path, own: &mut OwnModules) -> Result<(), PackError> {
    let read = |path: &Path, source| PackError::Read {
        path: path.to_owned(),
        source,
    };
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|err| read(dir, err))?
        .collect::<Result<_, _>>()
        .map_err(|err| read(dir, err))?;
    entries.sort_by_key(std::fs::DirEntry::file_name);
    for entry in entries {
        let path = entry.path();
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            return Err(PackError::NotUtf8(path));
        };
        if name.starts_with('.') || name == "node_modules" {
            continue;
        }
        let kind = entry.file_type().map_err(|err| read(&path, err))?;
        if kind.is_symlink() {
            return Err(PackError::Symlink(path));
        }
        if kind.is_dir() {
            collect(root, &path, own)?;
        } else if kind.is_file() && is_own_module(name) {
            let relative = path.strip_prefix(root).unwrap_or(&path);
            let key = relative
                .components()
                .map(|c| {
                    c.as_os_str()
                        .to_str()
                        .ok_or_else(|| PackError::NotUtf8(path.clone()))
                })
                .collect::<Result<Vec<_>, _>>()?
                .join("/");
            if is_test_module(name) {
                own.tests.push(key);
            } else {
                own.modules.push(key);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(dir: &Path) {
        std::fs::write(
            dir.join(MANIFEST_FILE),
            "name = \"demo\"\nversion = \"1\"\n",
        )
        .unwrap();
        std::fs::write(dir.join("main.js"), "export function hi() { return 1 }").unwrap();
        std::fs::create_dir_all(dir.join("lib")).unwrap();
        std::fs::write(dir.join("lib/util.js"), "export const x = 1").unwrap();
        std::fs::write(dir.join("README.md"), "not bundled").unwrap();
    }

    #[test]
    fn the_same_folder_gives_the_same_digest() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        service(a.path());
        // Written in another order, with other timestamps: same content, same digest.
        std::fs::create_dir_all(b.path().join("lib")).unwrap();
        std::fs::write(b.path().join("lib/util.js"), "export const x = 1").unwrap();
        service(b.path());
        let (a, b) = (
            PackedBundle::from_dir(a.path()).unwrap(),
            PackedBundle::from_dir(b.path()).unwrap(),
        );
        assert_eq!(a.digest, b.digest);
        assert_eq!(
            a.files.keys().collect::<Vec<_>>(),
            ["lib/util.js", "main.js"]
        );
    }

    #[test]
    fn a_changed_byte_changes_the_digest_and_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        service(dir.path());
        let packed = PackedBundle::from_dir(dir.path()).unwrap();
        let reopened = PackedBundle::from_bytes(packed.bytes.clone(), &packed.digest).unwrap();
        assert_eq!(reopened.files, packed.files);
        let mut tampered = packed.bytes.to_vec();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        let err = PackedBundle::from_bytes(tampered.into(), &packed.digest).unwrap_err();
        assert!(matches!(err, OpenError::DigestMismatch { .. }), "{err}");
    }

    #[test]
    fn symlinks_and_missing_entries_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        service(dir.path());
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("lib/passwd.js")).unwrap();
        assert!(matches!(
            PackedBundle::from_dir(dir.path()),
            Err(PackError::Symlink(_))
        ));
        std::fs::remove_file(dir.path().join("lib/passwd.js")).unwrap();
        std::fs::remove_file(dir.path().join("main.js")).unwrap();
        assert!(matches!(
            PackedBundle::from_dir(dir.path()),
            Err(PackError::MissingEntry(_))
        ));
    }
}
