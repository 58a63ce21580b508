//! `GET /metrics`: Prometheus text with what an operator needs to see where time goes.

use crate::helpers::{TestApp, reference_rows};

fn value_of(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn metrics_count_requests_by_route_template_and_show_the_queue_and_stages() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    let rows = reference_rows();
    let mut ids = Vec::new();
    for row in rows.iter().take(3) {
        ids.push(app.submit(&token, &row["features"]).await);
    }
    let scrape = || async {
        app.client
            .get(format!("{}/metrics", app.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let before = scrape().await;
    assert_eq!(
        value_of(
            &before,
            r#"onkos_queue_depth{state="queued",priority="routine"}"#
        ),
        Some(3.0),
        "{before}"
    );
    assert_eq!(
        value_of(
            &before,
            r#"onkos_queue_depth{state="running",priority="stat"}"#
        ),
        Some(0.0)
    );
    assert_eq!(
        value_of(
            &before,
            r#"onkos_execution_provider{provider="CPUExecutionProvider"}"#
        ),
        Some(1.0)
    );

    assert_eq!(app.step().await, 3);
    for id in &ids {
        app.get_json(&format!("/v1/analyses/{id}"), &token).await;
    }
    let after = scrape().await;
    assert_eq!(
        value_of(
            &after,
            r#"onkos_http_requests_total{method="POST",route="/v1/analyses",status="202"}"#
        ),
        Some(3.0),
        "{after}"
    );
    // Ids are not labels: three reads are one series under the route template.
    assert_eq!(
        value_of(
            &after,
            r#"onkos_http_requests_total{method="GET",route="/v1/analyses/{id}",status="200"}"#
        ),
        Some(3.0)
    );
    assert!(!after.contains(&ids[0]), "no analysis id in any label");
    assert_eq!(
        value_of(
            &after,
            r#"onkos_queue_depth{state="queued",priority="routine"}"#
        ),
        Some(0.0)
    );
    assert_eq!(
        value_of(&after, r#"onkos_analyses_total{outcome="succeeded"}"#),
        Some(3.0)
    );
    assert_eq!(value_of(&after, "onkos_batch_size_count"), Some(1.0));
    assert_eq!(value_of(&after, "onkos_batch_size_sum"), Some(3.0));
    for stage in ["queue_wait", "infer", "store"] {
        let count = value_of(
            &after,
            &format!(r#"onkos_stage_duration_seconds_count{{stage="{stage}"}}"#),
        );
        assert!(count.is_some_and(|c| c >= 1.0), "{stage}: {after}");
    }
    assert!(
        value_of(
            &after,
            r#"onkos_http_request_duration_seconds_count{method="POST",route="/v1/analyses",status="202"}"#
        ) == Some(3.0)
    );
}
