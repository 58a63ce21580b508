//! All SQL. Every function takes an executor and, for tenant-owned rows, the tenant.

pub mod analyses;
pub mod audit;
pub mod embeddings;
pub mod idempotency;
pub mod jobs;
pub mod models;
pub mod provenance;
pub mod slides;
pub mod webhooks;

/// The channel the API notifies when it queues work; workers LISTEN on it.
pub const JOBS_CHANNEL: &str = "onkos_jobs";
/// The channel workers notify, with a comma-separated list of analysis ids, when analyses reach a
/// final state; long polls wait on it.
pub const DONE_CHANNEL: &str = "onkos_done";
