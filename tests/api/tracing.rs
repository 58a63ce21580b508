//! Traces and logs: the worker's spans join the trace of the request that queued the work, and
//! JSON log lines carry the request id and trace id of their request.

use crate::helpers::{TestApp, reference_rows};
use opentelemetry::trace::{SpanId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use serde_json::{Value, json};
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

/// Log lines of a real `onkos serve` process with `ONKOS_LOG_FORMAT=json`: its own subscriber, as
/// `main` installs it, on a test database.
#[tokio::test]
async fn json_log_lines_carry_the_request_id_and_trace_id() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let app = TestApp::spawn().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_onkos"))
        .arg("api")
        .env("DATABASE_URL", &app.database_url)
        .env("ONKOS_DATA_DIR", &app.config.data_dir)
        .env("ONKOS_MODELS_DIR", &app.config.models_dir)
        .env("ONKOS_LISTEN", format!("127.0.0.1:{port}"))
        .env("ONKOS_EXECUTION_PROVIDER", "cpu")
        .env("ONKOS_WEBHOOKS", "false")
        .env("ONKOS_LOG_FORMAT", "json")
        .env("ONKOS_LOG", "info")
        .env_remove("RUST_LOG")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    // Ready when it says it listens (no polling).
    let mut seen = Vec::new();
    while let Some(line) = lines.next_line().await.unwrap() {
        let listening = line.contains("\"listening\"");
        seen.push(line);
        if listening {
            break;
        }
    }
    let base = format!("http://127.0.0.1:{port}");
    let token = app.token("oslo", "submitter");
    let submitted: Value = app
        .client
        .post(format!("{base}/v1/analyses"))
        .bearer_auth(&token)
        .json(&json!({"model": crate::helpers::MODEL, "features": reference_rows()[0]["features"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = submitted["id"].as_str().unwrap();
    let response = app
        .client
        .delete(format!("{base}/v1/analyses/{id}"))
        .bearer_auth(&token)
        .header("traceparent", TRACEPARENT)
        .header("x-request-id", "req-42")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "req-42");
    let cancel = loop {
        let line = lines
            .next_line()
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("the process ended; it logged {seen:#?}"));
        let parsed: Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        seen.push(line);
        if parsed["fields"]["message"] == "analysis cancelled" {
            break parsed;
        }
    };
    child.kill().await.unwrap();
    assert_eq!(cancel["span"]["name"], "request", "{cancel}");
    assert_eq!(cancel["span"]["request_id"], "req-42", "{cancel}");
    assert_eq!(cancel["span"]["trace_id"], TRACE_ID, "{cancel}");
    assert_eq!(cancel["span"]["route"], "/v1/analyses/{id}", "{cancel}");
    // Every line is JSON.
    for line in &seen {
        serde_json::from_str::<Value>(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    }
}
