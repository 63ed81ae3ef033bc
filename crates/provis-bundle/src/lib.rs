//! Services as operators write them (a folder with `service.toml` and ES
//! modules), as they travel (a deterministic bundle named by its digest), and
//! where they live in JetStream (`provis_bundles`, `provis_services`).

pub mod manifest;
pub mod pack;
pub mod resolve;
pub mod store;

pub use manifest::ServiceManifest;
pub use pack::{PackedBundle, digest_of};
pub use resolve::resolve_import;
pub use store::{BundleStore, ServicePointer};
