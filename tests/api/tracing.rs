//! Logs: JSON log lines carry the request id and trace id of their request. (The trace itself is
//! tested in tests/traces.rs, a binary of its own.)

use crate::helpers::{TestApp, reference_rows};
use serde_json::{Value, json};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// Log lines of a real `onkos serve` process with `ONKOS_LOG_FORMAT=json`: its own subscriber, as
/// `main` installs it, on a test database.
#[tokio::test]
async fn json_log_lines_carry_the_request_id_and_trace_id() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let app = TestApp::spawn().await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_onkos"))
        .arg("api")
        .env("DATABASE_URL", &app.database_url)
        .env("ONKOS_DATA_DIR", &app.config.data_dir)
        .env("ONKOS_MODELS_DIR", &app.config.models_dir)
        // Port 0: the process says which port it got (a port picked here and released could be
        // taken by another test's server before the child binds it).
        .env("ONKOS_LISTEN", "127.0.0.1:0")
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
    let mut addr = None;
    while let Some(line) = lines.next_line().await.unwrap() {
        if line.contains("\"listening\"") {
            let event: Value = serde_json::from_str(&line).unwrap();
            addr = event["fields"]["addr"]
                .as_str()
                .or(event["addr"].as_str())
                .map(str::to_owned);
            seen.push(line);
            break;
        }
        seen.push(line);
    }
    let addr = addr.unwrap_or_else(|| panic!("no listening line with its address: {seen:#?}"));
    let base = format!("http://{addr}");
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
