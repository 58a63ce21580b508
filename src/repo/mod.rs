//! All SQL. Every function takes an executor and, for tenant-owned rows, the tenant.

pub mod analyses;
pub mod audit;
pub mod jobs;

/// The channel the API notifies when it queues work; workers LISTEN on it.
pub const JOBS_CHANNEL: &str = "onkos_jobs";
