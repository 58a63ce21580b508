//! Per-client rate limits: 429 problem+json with Retry-After once a client's burst is spent;
//! other clients and the health probes are not affected.

use crate::helpers::{TestApp, assert_problem};

#[tokio::test]
async fn a_client_past_its_burst_gets_429_with_retry_after_and_others_go_on() {
    let app = TestApp::spawn_with(|c| {
        c.rate_limit_per_second = 1;
        c.rate_limit_burst = 3;
    })
    .await;
    let (busy, other) = (
        app.token("oslo", "submitter"),
        app.token("bergen", "submitter"),
    );
    for _ in 0..3 {
        assert_eq!(app.get("/v1/analyses", &busy).await.status(), 200);
    }
    let response = app.get("/v1/analyses", &busy).await;
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        retry_after, 1,
        "one request per second comes back within a second"
    );
    let problem = assert_problem(response, 429).await;
    assert_eq!(problem["type"], "https://onkos.dev/problems/rate-limited");
    // Another client has its own budget; probes are never limited.
    assert_eq!(app.get("/v1/analyses", &other).await.status(), 200);
    for _ in 0..5 {
        let health = app.client.get(format!("{}/healthz", app.base)).send().await;
        assert_eq!(health.unwrap().status(), 200);
    }
    // Without a token a client is its address: its burst is spent on 401s, then 429.
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let response = app
            .client
            .get(format!("{}/v1/analyses", app.base))
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
    }
    assert_eq!(statuses, [401, 401, 401, 429]);
}
