//! Traces and logs: the worker's spans join the trace of the request that queued the work, and
//! JSON log lines carry the request id and trace id of their request.

use crate::helpers::{TestApp, reference_rows};
use onkos::telemetry::tracing::{layers, provider};
use opentelemetry::trace::{SpanId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

// These tests run on tokio's current-thread runtime, so a thread-local subscriber sees the
// server's, the intake's and the worker's spans alike.

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
        .json(&json!({"model": crate::helpers::MODEL, "features": reference_rows()[0]["features"]}))
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

/// A log destination the test reads back.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn json_log_lines_carry_the_request_id_and_trace_id() {
    let captured = Captured::default();
    let sink = captured.clone();
    let config = onkos::config::Config {
        log_format: "json".into(),
        log: "info".into(),
        ..onkos::config::Config::default()
    };
    config.validate().unwrap();
    let provider = provider(&config).unwrap();
    let subscriber =
        tracing_subscriber::registry().with(layers(&config, &provider, move || sink.clone()));
    let _subscriber = tracing::subscriber::set_default(subscriber);

    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    let id = app.submit(&token, &reference_rows()[0]["features"]).await;
    let response = app
        .client
        .delete(format!("{}/v1/analyses/{id}", app.base))
        .bearer_auth(&token)
        .header("traceparent", TRACEPARENT)
        .header("x-request-id", "req-42")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "req-42");

    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let cancel = lines
        .iter()
        .find(|l| l["fields"]["message"] == "analysis cancelled")
        .unwrap_or_else(|| panic!("no cancel line in {text}"));
    assert_eq!(cancel["span"]["request_id"], "req-42", "{cancel}");
    assert_eq!(cancel["span"]["trace_id"], TRACE_ID, "{cancel}");
    // Every line logged inside a request carries both.
    for line in lines.iter().filter(|l| l["span"]["name"] == "request") {
        assert!(line["span"]["request_id"].is_string(), "{line}");
        assert!(line["span"]["trace_id"].is_string(), "{line}");
    }
}
