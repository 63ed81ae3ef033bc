//! Injected services on a minion: each runs in a QuickJS runtime of its own,
//! on a thread of its own, with a memory limit and a per-call deadline, and
//! reaches the machine only through the host API its manifest grants.

pub mod capability;
pub mod host;
pub mod sandbox;
pub mod secrets;
pub mod state;

pub use host::{HostContext, ServiceEvent};
pub use sandbox::{JsCallError, LoadError, ServiceSandbox, check_bundle};
pub use secrets::ServiceSecrets;
pub use state::StateStore;
