//! Names of the JetStream streams, key-value buckets and object store of a
//! fleet (see DESIGN.md). The master creates them; everyone else only opens them.

/// Every event, durable, bounded by age and size.
pub const STREAM_EVENTS: &str = "PROVIS_EVENTS";
/// State samples, kept at least 8 days.
pub const STREAM_STATE: &str = "PROVIS_STATE";
/// Every call as a job (`<prefix>.job.>`): what was asked of whom by whom,
/// and each minion's result (retention: the master's `storage.jobs_*`).
pub const STREAM_JOBS: &str = "PROVIS_JOBS";
/// Service bundles, named by content digest.
pub const BUCKET_BUNDLES: &str = "provis_bundles";
/// Service name → current digest, manifest, signature.
pub const BUCKET_SERVICES: &str = "provis_services";
/// Role → services and role config.
pub const BUCKET_ROLES: &str = "provis_roles";
/// Minion id → roles and per-minion config.
pub const BUCKET_ASSIGNMENTS: &str = "provis_assignments";
/// The registry: live minions, facts, versions loaded, heartbeat.
pub const BUCKET_MINIONS: &str = "provis_minions";
/// The master's own desired-state records: the applied commit (`applied`),
/// the last rejected one (`rejected`) and the role overlay (`overlay`).
pub const BUCKET_CONFIG: &str = "provis_config";
/// Enrollment: minion id → its key and status (pending, accepted, rejected,
/// revoked); `token.<sha256>` → a one-time enrollment token. Only the master
/// reads and writes it, in the auth callout's account when the fleet has one
/// (the master's enrollment module creates it there).
pub const BUCKET_ENROLLMENT: &str = "provis_enrollment";
/// Rollouts: `<commit>` → the rollout of that commit (its stages, gates,
/// who was switched), `active` → the commit being rolled out. The leading
/// master drives it; the next leader resumes it from here.
pub const BUCKET_ROLLOUTS: &str = "provis_rollouts";
/// The leading master's lease (`lease`) and every master's presence
/// (`master.<id>`), each kept a few seconds unless renewed.
pub const BUCKET_LEADER: &str = "provis_leader";
