//! Prometheus metrics: one registry per application (passed, not global), served at `/metrics`.
//!
//! Counters and histograms are this process's; queue depth is read from the database at scrape
//! time, so every replica reports the same, shared queue.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::Mutex;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub method: String,
    /// The route template (`/v1/analyses/{id}`), never the raw path.
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    /// `queue_wait`, `read`, `infer` or `store`.
    pub stage: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `succeeded`, `failed`, `retried` or `discarded` (cancelled or lease lost meanwhile).
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabels {
    pub state: String,
    pub priority: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabels {
    pub provider: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 0.1 ms to ~6.5 min.
    Histogram::new(exponential_buckets(0.0001, 2.0, 22))
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RouteLabels, Counter>,
    pub request_seconds: Histograms<RouteLabels>,
    pub stage_seconds: Histograms<StageLabels>,
    pub batch_size: Histogram,
    pub analyses: Family<OutcomeLabels, Counter>,
    pub queue_depth: Family<QueueLabels, Gauge>,
    pub execution_provider: Family<ProviderLabels, Gauge>,
    /// Serialises scrapes: the queue gauges are reset and refilled per scrape.
    scrape: Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("onkos");
        let requests = Family::<RouteLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by method, route template and status",
            requests.clone(),
        );
        let request_seconds: Histograms<RouteLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency by method, route template and status",
            request_seconds.clone(),
        );
        let stage_seconds: Histograms<StageLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "stage_duration_seconds",
            "Time spent per analysis stage: queue_wait (per analysis), read (slide tiles), infer and store (per batch)",
            stage_seconds.clone(),
        );
        let batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 11));
        registry.register(
            "batch_size",
            "Analyses per inference batch",
            batch_size.clone(),
        );
        let analyses = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "analyses",
            "Analyses finished by this process (its worker, or inline at submission), by outcome",
            analyses.clone(),
        );
        let queue_depth = Family::<QueueLabels, Gauge>::default();
        registry.register(
            "queue_depth",
            "Jobs in the shared queue by state and priority (read at scrape time)",
            queue_depth.clone(),
        );
        let execution_provider = Family::<ProviderLabels, Gauge>::default();
        registry.register(
            "execution_provider",
            "The ONNX Runtime execution provider in use (1 for the one in use)",
            execution_provider.clone(),
        );
        Self {
            registry,
            requests,
            request_seconds,
            stage_seconds,
            batch_size,
            analyses,
            queue_depth,
            execution_provider,
            scrape: Mutex::new(()),
        }
    }
}

impl Metrics {
    pub fn stage(&self, stage: &'static str, seconds: f64) {
        self.stage_seconds
            .get_or_create(&StageLabels { stage })
            .observe(seconds);
    }

    pub fn outcome(&self, outcome: &'static str, count: u64) {
        if count > 0 {
            self.analyses
                .get_or_create(&OutcomeLabels { outcome })
                .inc_by(count);
        }
    }

    /// The text exposition, with the queue depth and provider as given.
    pub fn render(&self, queue: &[(String, String, i64)], provider: &str) -> String {
        let _scrape = self.scrape.lock();
        self.queue_depth.clear();
        // Both states and priorities always appear, so a drained queue reads 0, not absent.
        for state in ["queued", "running"] {
            for priority in ["stat", "routine"] {
                self.queue_depth
                    .get_or_create(&QueueLabels {
                        state: state.into(),
                        priority: priority.into(),
                    })
                    .set(0);
            }
        }
        for (state, priority, count) in queue {
            self.queue_depth
                .get_or_create(&QueueLabels {
                    state: state.clone(),
                    priority: priority.clone(),
                })
                .set(*count);
        }
        self.execution_provider.clear();
        self.execution_provider
            .get_or_create(&ProviderLabels {
                provider: provider.to_owned(),
            })
            .set(1);
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        text
    }
}
