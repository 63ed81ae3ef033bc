//! What every part of provis shares: checked names and subjects, call
//! envelopes, the registry, events, connection settings, and the call client.

pub mod assignment;
pub mod bus_access;
pub mod call_auth;
pub mod client;
pub mod clock;
pub mod context;
pub mod envelope;
pub mod event;
pub mod identity;
pub mod jobs;
pub mod kv_snapshot;
pub mod lifecycle;
pub mod master_api;
pub mod minion_api;
pub mod nats_jwt;
pub mod nats_server;
pub mod outbox;
pub mod presence;
pub mod readiness;
pub mod registry;
pub mod roles;
pub mod sealed_secret;
pub mod sealing;
pub mod selection;
pub mod signed_entry;
pub mod state;
pub mod storage;
pub mod stream_read;
pub mod subject;

pub use client::{CallReport, Client, ClientError, MinionReply, ReplyStatus};
pub use context::FleetContext;
pub use envelope::{CallRequest, CheckedCall};
pub use subject::{CallTarget, MinionId, Prefix, RoleName, Subjects};

/// The version of provis, as minions report it in the registry.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// An error and every cause under it, as one line (`what failed: why:
/// why that`), for logs, events and replies that carry errors as text.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut line = err.to_string();
    let mut cause = err.source();
    while let Some(source) = cause {
        let text = source.to_string();
        // Some errors repeat their cause in their own message.
        if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = source.source();
    }
    line
}
