//! Telemetry: Prometheus metrics (and, with them, what an operator needs to see where time goes).

pub mod metrics;
pub mod tracing;
