//! Logs and traces. Every span goes to OpenTelemetry (exported over OTLP/HTTP when
//! `ONKOS_OTLP_ENDPOINT` is set; otherwise only its ids are used, for log correlation) and log lines
//! go to stderr, as JSON when `ONKOS_LOG_FORMAT=json`, carrying the request id and trace id of the
//! span they belong to.
//!
//! A submission's W3C `traceparent` is stored with its job, so that the worker's spans (claim,
//! load, infer, store) join the trace of the request that queued the work, in whatever process.

use crate::config::Config;
use axum::http::HeaderMap;
use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::collections::HashMap;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// Flushes and stops the trace exporter when dropped (at the end of `main`).
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Err(e) = self.provider.shutdown() {
            eprintln!("onkos: traces not flushed at exit: {e}");
        }
    }
}

/// The tracer provider: batch-exports to `otlp_endpoint` when one is configured.
pub fn provider(config: &Config) -> anyhow::Result<SdkTracerProvider> {
    let mut builder = SdkTracerProvider::builder()
        .with_resource(Resource::builder().with_service_name("onkos").build());
    if let Some(endpoint) = &config.otlp_endpoint {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(endpoint.clone())
            .build()?;
        builder = builder.with_batch_exporter(exporter);
    }
    Ok(builder.build())
}

/// The subscriber's layers for a provider: OpenTelemetry, and log lines (JSON or text) written
/// to `writer` (stderr in the service).
pub fn layers<W>(
    config: &Config,
    provider: &SdkTracerProvider,
    writer: W,
) -> Vec<Box<dyn Layer<Registry> + Send + Sync>>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter =
        || EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new(&config.log));
    // Spans below the configured level (libraries' debug and trace spans) cost too much to
    // record on every request.
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("onkos"))
        .with_filter(filter());
    let logs = tracing_subscriber::fmt::layer().with_writer(writer);
    let logs: Box<dyn Layer<Registry> + Send + Sync> = if config.log_format == "json" {
        // Each line carries the fields of the spans it is in: request_id, trace_id, route, …
        logs.json()
            .with_current_span(true)
            .with_span_list(true)
            .boxed()
    } else {
        logs.boxed()
    };
    vec![otel.boxed(), logs.with_filter(filter()).boxed()]
}

/// Installs the global subscriber for the process; keep the guard until exit.
pub fn init(config: &Config) -> anyhow::Result<TelemetryGuard> {
    let provider = provider(config)?;
    tracing_subscriber::registry()
        .with(layers(config, &provider, std::io::stderr))
        .try_init()?;
    Ok(TelemetryGuard { provider })
}

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(axum::http::HeaderName::as_str).collect()
    }
}

/// The trace context a request carries in `traceparent` (empty without one).
pub fn remote_context(headers: &HeaderMap) -> Context {
    TraceContextPropagator::new().extract(&Headers(headers))
}

/// Parents `span` on `parent` when that is a real trace, and records the span's trace id as its
/// `trace_id` field (for log lines).
pub fn join(span: &tracing::Span, parent: Context) {
    if parent.span().span_context().is_valid() {
        // Only fails for a span that was already built, which a fresh span is not.
        let _ = span.set_parent(parent);
    }
    let trace_id = span.context().span().span_context().trace_id();
    if trace_id != opentelemetry::TraceId::INVALID {
        span.record("trace_id", tracing::field::display(trace_id));
    }
}

/// The W3C `traceparent` of the current span, to store with queued work.
pub fn current_traceparent() -> Option<String> {
    let context = tracing::Span::current().context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove("traceparent")
}

/// The context a stored `traceparent` names.
pub fn stored_context(traceparent: &str) -> Context {
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    TraceContextPropagator::new().extract(&carrier)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use opentelemetry_sdk::trace::InMemorySpanExporter;
    use tracing::Instrument;

    #[tokio::test]
    async fn a_span_parented_on_a_stored_traceparent_is_exported_in_that_trace() {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let _guard = tracing::subscriber::set_default(subscriber);
        let span = tracing::info_span!("batch", trace_id = tracing::field::Empty);
        join(
            &span,
            stored_context("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        async {
            tracing::info_span!("claim").in_scope(|| {});
        }
        .instrument(span)
        .await;
        provider.force_flush().unwrap();
        let spans = exporter.get_finished_spans().unwrap();
        let names: Vec<String> = spans.iter().map(|s| s.name.to_string()).collect();
        assert_eq!(names, ["claim", "batch"]);
        assert!(
            spans.iter().all(
                |s| s.span_context.trace_id().to_string() == "4bf92f3577b34da6a3ce929d0e0e4736"
            )
        );
    }
}
