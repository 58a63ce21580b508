//! Traces: the worker's spans join the trace of the request that queued the work.
//!
//! A binary of its own, with this one test: the test installs a thread-local subscriber (tokio's
//! current-thread runtime runs the server, the intake and the worker on the test's thread), and
//! other tests' subscribers on other threads of the same process made tracing's per-callsite
//! caches miss spans now and then.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "api/helpers.rs"]
#[allow(dead_code)]
mod helpers;

use helpers::{TestApp, reference_rows};
use opentelemetry::trace::{SpanId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use serde_json::json;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[tokio::test]
async fn the_workers_spans_join_the_trace_of_the_submitting_request() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry().with(
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("test"))
            .with_filter(tracing_subscriber::filter::LevelFilter::INFO),
    );
    let _subscriber = tracing::subscriber::set_default(subscriber);

    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    let response = app
        .client
        .post(format!("{}/v1/analyses", app.base))
        .bearer_auth(&token)
        .header("traceparent", TRACEPARENT)
        .json(&json!({"model": helpers::MODEL, "features": reference_rows()[0]["features"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let stored: Option<String> = sqlx::query_scalar("select traceparent from jobs")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let stored = stored.expect("the job keeps the request's trace context");
    assert!(stored.contains(TRACE_ID), "{stored}");
    assert_eq!(app.step().await, 1);
    provider.force_flush().unwrap();

    let spans = exporter.get_finished_spans().unwrap();
    let named = |name: &str| -> Vec<&SpanData> {
        spans
            .iter()
            .filter(|s| s.name == name && s.span_context.trace_id().to_string() == TRACE_ID)
            .collect()
    };
    let request = named("request");
    assert_eq!(request.len(), 1, "the POST is in the caller's trace");
    assert_eq!(
        request[0].parent_span_id,
        SpanId::from_hex("00f067aa0ba902b7").unwrap()
    );
    let batch = named("batch");
    assert_eq!(
        batch.len(),
        1,
        "the worker's batch joins the same trace: {:?}",
        spans
            .iter()
            .map(|s| (
                &s.name,
                s.span_context.trace_id().to_string(),
                s.parent_span_id
            ))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        batch[0].parent_span_id,
        request[0].span_context.span_id(),
        "the batch follows the request that queued it"
    );
    for stage in ["claim", "load", "infer", "store"] {
        let found = named(stage);
        assert_eq!(
            found.len(),
            1,
            "{stage}: {:?}",
            spans.iter().map(|s| &s.name).collect::<Vec<_>>()
        );
        assert_eq!(
            found[0].parent_span_id,
            batch[0].span_context.span_id(),
            "{stage}"
        );
    }
}
