//! Webhooks: signed deliveries from the durable outbox to a real HTTP receiver on 127.0.0.1,
//! retried with backoff, recorded; and the event stream of one analysis.

use crate::helpers::{MODEL, TestApp, assert_problem, csv, reference_rows};
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

const SECRET: &str = "whsec-0123456789abcdef";

/// A real HTTP server that records what it receives and answers from a script (then 200).
#[derive(Clone, Default)]
struct Receiver {
    received: Arc<Mutex<Vec<(HeaderMap, Bytes)>>>,
    answers: Arc<Mutex<VecDeque<u16>>>,
}

impl Receiver {
    async fn start(answers: &[u16]) -> (Self, String) {
        let receiver = Self::default();
        receiver.answers.lock().unwrap().extend(answers);
        let state = receiver.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                let state = state.clone();
                async move {
                    state.received.lock().unwrap().push((headers, body));
                    let code = state.answers.lock().unwrap().pop_front().unwrap_or(200);
                    StatusCode::from_u16(code).unwrap()
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (receiver, url)
    }

    fn received(&self) -> Vec<(HeaderMap, Value)> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .map(|(h, b)| (h.clone(), check_signature(h, b)))
            .collect()
    }
}

/// The receiver's side, written from the documentation: HMAC-SHA256 of "<t>.<raw body>".
fn check_signature(headers: &HeaderMap, body: &[u8]) -> Value {
    let header = headers["onkos-signature"].to_str().unwrap();
    let (t, v1) = header.split_once(',').unwrap();
    let t = t.strip_prefix("t=").unwrap();
    let v1 = v1.strip_prefix("v1=").unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    assert_eq!(hex::encode(mac.finalize().into_bytes()), v1, "signature");
    let age = chrono::Utc::now().timestamp() - t.parse::<i64>().unwrap();
    assert!((0..=onkos::jobs::webhooks::REPLAY_WINDOW_SECS).contains(&age));
    assert_eq!(
        onkos::jobs::webhooks::verify(SECRET, header, body, chrono::Utc::now().timestamp()),
        Ok(())
    );
    serde_json::from_slice(body).unwrap()
}

async fn register(app: &TestApp, token: &str, url: &str, events: &[&str]) -> String {
    let response = app
        .post_json(
            "/v1/webhooks",
            token,
            &json!({"url": url, "secret": SECRET, "events": events}),
        )
        .await;
    assert_eq!(response.status(), 201);
    let hook: Value = response.json().await.unwrap();
    assert!(hook.get("secret").is_none(), "the secret is never shown");
    hook["id"].as_str().unwrap().to_owned()
}

/// Makes every pending retry due now (the test's clock, instead of waiting out the backoff).
async fn retries_due_now(app: &TestApp) {
    sqlx::query("update webhook_deliveries set next_attempt_at = now() where state = 'pending'")
        .execute(&app.pool)
        .await
        .unwrap();
}

#[tokio::test]
async fn each_state_change_is_posted_signed_and_a_failed_delivery_is_retried() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    // The first delivery is refused once.
    let (receiver, url) = Receiver::start(&[503]).await;
    let hook = register(
        &app,
        &token,
        &url,
        &["analysis.queued", "analysis.running", "analysis.succeeded"],
    )
    .await;
    let id = app.submit(&token, &reference_rows()[0]["features"]).await;
    assert_eq!(app.deliverer.step().await.unwrap(), 1, "queued");
    assert_eq!(app.step().await, 1);
    assert_eq!(app.deliverer.step().await.unwrap(), 2, "running, succeeded");
    assert_eq!(
        app.deliverer.step().await.unwrap(),
        0,
        "the retry is not due yet"
    );

    let deliveries = app
        .get_json(&format!("/v1/webhooks/{hook}/deliveries"), &token)
        .await;
    let items = deliveries["items"].as_array().unwrap();
    assert_eq!(items.len(), 3, "{deliveries}");
    let refused: Vec<&Value> = items.iter().filter(|d| d["state"] == "pending").collect();
    assert_eq!(refused.len(), 1, "{deliveries}");
    assert_eq!(refused[0]["last_status"], 503);
    assert_eq!(refused[0]["attempts"], 1);
    assert!(refused[0]["next_attempt_at"].is_string());

    retries_due_now(&app).await;
    assert_eq!(app.deliverer.step().await.unwrap(), 1);
    let deliveries = app
        .get_json(&format!("/v1/webhooks/{hook}/deliveries"), &token)
        .await;
    assert!(
        deliveries["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["state"] == "delivered" && d["last_status"] == 200),
        "{deliveries}"
    );

    let received = receiver.received();
    assert_eq!(received.len(), 4, "three events, one of them twice");
    let mut statuses: Vec<&str> = received[1..]
        .iter()
        .map(|(_, body)| body["status"].as_str().unwrap())
        .collect();
    statuses.sort_unstable();
    assert_eq!(statuses, ["queued", "running", "succeeded"]);
    for (headers, body) in &received {
        assert_eq!(body["id"], json!(id));
        assert_eq!(
            body["type"],
            format!("analysis.{}", body["status"].as_str().unwrap())
        );
        assert_eq!(
            headers["onkos-delivery"].to_str().unwrap(),
            body["delivery"]
        );
        assert_eq!(headers["content-type"], "application/json");
    }
    // The retry is the same event: same delivery id, same body.
    let retried = received[1..]
        .iter()
        .filter(|(_, body)| *body == received[0].1);
    assert_eq!(retried.count(), 1);
}

#[tokio::test]
async fn an_event_survives_a_restart_and_attempts_run_out_into_failed() {
    let app = TestApp::spawn_with(|c| c.webhook_max_attempts = 2).await;
    let token = app.token("oslo", "submitter");
    let (receiver, url) = Receiver::start(&[500, 500]).await;
    let hook = register(&app, &token, &url, &["analysis.cancelled"]).await;
    let id = app.submit(&token, &reference_rows()[0]["features"]).await;
    let cancelled = app
        .client
        .delete(format!("{}/v1/analyses/{id}", app.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(cancelled.status(), 200);
    // The event is in the outbox table, not in any process's memory: a deliverer built afresh
    // (as after a restart) sends it.
    let config = onkos::config::Config {
        webhook_max_attempts: 2,
        ..app.config.clone()
    };
    let restarted = onkos::jobs::webhooks::Deliverer::new(app.pool.clone(), &config).unwrap();
    assert_eq!(restarted.step().await.unwrap(), 1);
    retries_due_now(&app).await;
    assert_eq!(restarted.step().await.unwrap(), 1);
    retries_due_now(&app).await;
    assert_eq!(restarted.step().await.unwrap(), 0, "no attempts left");
    let deliveries = app
        .get_json(&format!("/v1/webhooks/{hook}/deliveries"), &token)
        .await;
    let only = &deliveries["items"][0];
    assert_eq!(only["state"], "failed", "{deliveries}");
    assert_eq!(only["attempts"], 2);
    assert!(only["last_error"].as_str().unwrap().contains("500"));
    assert_eq!(receiver.received().len(), 2);
    assert_eq!(receiver.received()[0].1["status"], "cancelled");
}

#[tokio::test]
async fn an_unreachable_receiver_is_recorded_and_retried() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    // A port nothing listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let hook = register(
        &app,
        &token,
        &format!("http://{closed}/hook"),
        &["analysis.queued"],
    )
    .await;
    app.submit(&token, &reference_rows()[0]["features"]).await;
    assert_eq!(app.deliverer.step().await.unwrap(), 1);
    let deliveries = app
        .get_json(&format!("/v1/webhooks/{hook}/deliveries"), &token)
        .await;
    let only = &deliveries["items"][0];
    assert_eq!(only["state"], "pending");
    assert!(only["last_status"].is_null());
    assert!(
        only["last_error"]
            .as_str()
            .unwrap()
            .contains("cannot deliver"),
        "{only}"
    );
}

#[tokio::test]
async fn endpoints_are_validated_listed_without_secrets_removed_and_tenant_scoped() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    let bad = app
        .post_json(
            "/v1/webhooks",
            &token,
            &json!({"url": "ftp://lis.example/hook", "secret": "short", "events": ["analysis.done"]}),
        )
        .await;
    let problem = assert_problem(bad, 422).await;
    let fields: Vec<&str> = problem["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["url", "secret", "events[0]"], "{problem}");
    assert_problem(
        app.post_json("/v1/webhooks", &token, &json!({"url": "http://x/"}))
            .await,
        422,
    )
    .await;
    assert_eq!(app.rows("webhooks").await, 0, "nothing stored");
    assert_problem(
        app.post_json("/v1/webhooks", &app.token("oslo", "clinician"), &json!({}))
            .await,
        403,
    )
    .await;

    let (receiver, url) = Receiver::start(&[]).await;
    let hook = register(&app, &token, &url, &["analysis.queued"]).await;
    let listed = app.get_json("/v1/webhooks", &token).await;
    assert_eq!(listed["items"][0]["id"], json!(hook));
    assert!(!listed.to_string().contains(SECRET));
    let other = app.token("bergen", "submitter");
    assert_eq!(
        app.get_json("/v1/webhooks", &other).await["items"],
        json!([])
    );
    assert_problem(
        app.get(&format!("/v1/webhooks/{hook}/deliveries"), &other)
            .await,
        404,
    )
    .await;
    // Another tenant's analyses are not sent to this endpoint.
    app.submit(&other, &reference_rows()[0]["features"]).await;
    assert_eq!(app.deliverer.step().await.unwrap(), 0);

    let removed = app
        .client
        .delete(format!("{}/v1/webhooks/{hook}", app.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(removed.status(), 204);
    app.submit(&token, &reference_rows()[0]["features"]).await;
    assert_eq!(
        app.deliverer.step().await.unwrap(),
        0,
        "a removed endpoint gets nothing"
    );
    assert!(receiver.received().is_empty());
    assert_eq!(
        app.get_json("/v1/webhooks", &token).await["items"],
        json!([])
    );
}

/// Opens the event stream of analysis `id`.
async fn open_events(app: &TestApp, token: &str, id: &str) -> reqwest::Response {
    app.client
        .get(format!("{}/v1/analyses/{id}/events", app.base))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

/// Reads server-sent events until the stream ends; each as (event name, data).
async fn read_events(response: reqwest::Response) -> Vec<(String, Value)> {
    let text = response.text().await.unwrap();
    text.split("\n\n")
        .filter_map(|block| {
            let mut name = None;
            let mut data = None;
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event: ") {
                    name = Some(v.to_owned());
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data = Some(serde_json::from_str(v).unwrap());
                }
            }
            Some((name?, data?))
        })
        .collect()
}

#[tokio::test]
async fn the_event_stream_reports_the_current_state_then_each_change_and_ends_when_final() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    let id = app.submit(&token, &reference_rows()[0]["features"]).await;
    let response = open_events(&app, &token, &id).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    // The stream is open; run the analysis, then read the stream to its end.
    assert_eq!(app.step().await, 1);
    let events = read_events(response).await;
    assert_eq!(events.first().map(|e| e.0.as_str()), Some("status"));
    assert_eq!(events[0].1["status"], "queued");
    assert_eq!(events[0].1["id"], json!(id));
    let last = events.last().unwrap();
    assert_eq!(
        (last.0.as_str(), &last.1["status"]),
        ("status", &json!("succeeded"))
    );

    // A finished analysis: one event, then the end.
    let again = open_events(&app, &token, &id).await;
    let events = read_events(again).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_problem(
        app.get(
            &format!("/v1/analyses/{id}/events"),
            &app.token("bergen", "clinician"),
        )
        .await,
        404,
    )
    .await;
}

#[tokio::test]
async fn a_cancel_ends_the_event_stream() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    let id = app.submit(&token, &reference_rows()[0]["features"]).await;
    let response = open_events(&app, &token, &id).await;
    let cancelled = app
        .client
        .delete(format!("{}/v1/analyses/{id}", app.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(cancelled.status(), 200);
    let events = read_events(response).await;
    let statuses: Vec<&str> = events
        .iter()
        .map(|e| e.1["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["queued", "cancelled"]);
}

/// Reads one event from an open stream (waiting for it), skipping keep-alive comments.
async fn next_event(
    stream: &mut (impl futures_util::Stream<Item = reqwest::Result<Bytes>> + Unpin),
    buffer: &mut String,
) -> (String, Value) {
    use futures_util::StreamExt;
    loop {
        if let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let mut name = None;
            let mut data = None;
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event: ") {
                    name = Some(v.to_owned());
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data = Some(serde_json::from_str(v).unwrap());
                }
            }
            if let (Some(name), Some(data)) = (name, data) {
                return (name, data);
            }
            continue;
        }
        let chunk = stream
            .next()
            .await
            .expect("the stream ended early")
            .unwrap();
        buffer.push_str(std::str::from_utf8(&chunk).unwrap());
    }
}

#[tokio::test]
async fn a_slide_analysis_streams_its_progress_between_tile_batches() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    let slide = crate::slides::uploaded(&app, &token, "aperio-cmu1-small-region.svs").await;
    let id = app
        .submit_to(
            &token,
            &json!({"model": crate::slides::STAIN, "slide": slide}),
        )
        .await;
    let response = open_events(&app, &token, &id).await;
    let mut stream = response.bytes_stream();
    let mut buffer = String::new();
    let (kind, first) = next_event(&mut stream, &mut buffer).await;
    assert_eq!(
        (kind.as_str(), &first["status"]),
        ("status", &json!("queued"))
    );

    let claimed = app.worker.claim().await.unwrap();
    let worker = app.worker.id();
    assert!(
        onkos::repo::jobs::progress(&app.pool, &claimed[0], worker, 16, 51)
            .await
            .unwrap()
    );
    let (kind, running) = next_event(&mut stream, &mut buffer).await;
    assert_eq!(kind, "status");
    assert_eq!(running["status"], "running");
    assert_eq!(
        (
            running["tiles_done"].as_i64(),
            running["tiles_total"].as_i64()
        ),
        (Some(16), Some(51))
    );
    assert!(
        onkos::repo::jobs::progress(&app.pool, &claimed[0], worker, 32, 51)
            .await
            .unwrap()
    );
    let (kind, progress) = next_event(&mut stream, &mut buffer).await;
    assert_eq!(kind, "progress");
    assert_eq!(progress["tiles_done"], 32);

    assert_eq!(app.worker.process(claimed).await.unwrap(), 1);
    // The worker's own progress while it ran may be seen on the way (a poll that fell during the
    // run, on a loaded machine), then the final state.
    let done = loop {
        let (kind, event) = next_event(&mut stream, &mut buffer).await;
        if kind == "status" {
            break event;
        }
        assert_eq!(
            (kind.as_str(), &event["tiles_total"]),
            ("progress", &json!(51))
        );
    };
    assert_eq!(done["status"], "succeeded");
}

#[tokio::test]
async fn webhooks_cannot_reach_private_addresses_unless_the_operator_allows_it() {
    let app = TestApp::spawn_with(|c| c.webhook_allow_private_networks = false).await;
    let token = app.token("oslo", "submitter");
    for url in [
        "http://127.0.0.1:9/hook",
        "http://169.254.169.254/latest",
        "http://[::1]/x",
    ] {
        let refused = app
            .post_json(
                "/v1/webhooks",
                &token,
                &json!({"url": url, "secret": SECRET, "events": ["analysis.queued"]}),
            )
            .await;
        let problem = assert_problem(refused, 422).await;
        assert_eq!(
            problem["errors"][0]["rule"], "private_address",
            "{url}: {problem}"
        );
    }
    // A name is checked when it is resolved, at delivery: `localhost` is loopback.
    let (receiver, url) = Receiver::start(&[]).await;
    let by_name = url.replace("127.0.0.1", "localhost");
    let hook = register(&app, &token, &by_name, &["analysis.queued"]).await;
    app.submit(&token, &reference_rows()[0]["features"]).await;
    assert_eq!(app.deliverer.step().await.unwrap(), 1);
    assert!(
        receiver.received().is_empty(),
        "nothing reached the loopback receiver"
    );
    let deliveries = app
        .get_json(&format!("/v1/webhooks/{hook}/deliveries"), &token)
        .await;
    let only = &deliveries["items"][0];
    assert!(
        only["last_error"]
            .as_str()
            .unwrap()
            .contains("ONKOS_WEBHOOK_ALLOW_PRIVATE_NETWORKS"),
        "{only}"
    );
    assert!(
        !only["last_error"].as_str().unwrap().contains("/hook"),
        "no URL in the error: {only}"
    );
}

#[tokio::test]
async fn open_event_streams_end_when_the_server_shuts_down() {
    use futures_util::StreamExt;
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    let id = app.submit(&token, &reference_rows()[0]["features"]).await;
    let response = open_events(&app, &token, &id).await;
    let mut stream = response.bytes_stream();
    let mut buffer = String::new();
    let (_, first) = next_event(&mut stream, &mut buffer).await;
    assert_eq!(first["status"], "queued");
    // The analysis stays queued; without an end on shutdown, graceful shutdown would wait forever.
    app.stop();
    while let Some(chunk) = stream.next().await {
        chunk.expect("the stream closes cleanly, not by the client's timeout");
    }
}

/// The outbox triggers see whole statements: a worker's completion of a batch, a CSV's rows. A
/// statement of one row first, then statements of hundreds (the order in which a connection's
/// cached plans used to be fixed, migration 0013): every row still gets its event, and a tenant
/// without webhooks gets none.
#[tokio::test]
async fn every_row_of_a_large_batch_gets_its_events() {
    let app = TestApp::spawn_with(|c| c.worker_batch_size = 256).await;
    let oslo = app.token("oslo", "submitter");
    let bergen = app.token("bergen", "submitter");
    let (_receiver, url) = Receiver::start(&[]).await;
    register(
        &app,
        &oslo,
        &url,
        &["analysis.queued", "analysis.running", "analysis.succeeded"],
    )
    .await;
    app.submit(&oslo, &reference_rows()[0]["features"]).await;
    assert_eq!(app.step().await, 1);

    let rows: Vec<Value> = reference_rows().into_iter().cycle().take(300).collect();
    let body = csv(&rows, None);
    for token in [&oslo, &bergen] {
        let response = app
            .client
            .post(format!("{}/v1/analyses?model={MODEL}", app.base))
            .bearer_auth(token)
            .header("content-type", "text/csv")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
    }
    assert_eq!(app.drain().await, 600);

    let counts: Vec<(String, String, i64)> = sqlx::query_as(
        "select tenant_id, event, count(*) from webhook_deliveries group by 1, 2 order by 1, 2",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    let expected = ["analysis.queued", "analysis.running", "analysis.succeeded"]
        .map(|event| ("oslo".to_owned(), event.to_owned(), 301));
    assert_eq!(counts, expected, "one event per row and state, oslo only");
    let distinct: i64 =
        sqlx::query_scalar("select count(distinct (analysis_id, event)) from webhook_deliveries")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(distinct, 903, "no analysis's event written twice");
}
