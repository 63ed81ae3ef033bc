//! Services as authors write them (a folder with `service.toml`, ES or
//! CommonJS modules, TypeScript, npm packages), as they travel (a
//! deterministic bundle of ES modules named by its digest), and where
//! bundles live in JetStream (`provis_bundles`, `provis_services`).

pub mod lockfile;
pub mod manifest;
pub mod module_graph;
pub mod node_resolve;
pub mod pack;
pub mod package_json;
pub mod resolve;
pub mod shims;
pub mod source_map;
pub mod store;
pub mod syntax;

pub use manifest::ServiceManifest;
pub use pack::{PackedBundle, digest_of};
pub use resolve::resolve_import;
pub use source_map::SourceMaps;
pub use store::{BundleStore, ServicePointer};
