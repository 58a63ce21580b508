//! Tenants never see each other's analyses, not even whether they exist.

use crate::helpers::{TestApp, assert_problem, reference_rows};
use serde_json::Value;

#[tokio::test]
async fn another_tenants_analysis_is_indistinguishable_from_a_missing_one() {
    let app = TestApp::spawn().await;
    let oslo = app.token("oslo", "submitter");
    let bergen = app.token("bergen", "admin");
    let id = app.submit(&oslo, &reference_rows()[0]["features"]).await;
    app.step().await;

    let foreign = assert_problem(app.get(&format!("/v1/analyses/{id}"), &bergen).await, 404).await;
    let missing = assert_problem(
        app.get(&format!("/v1/analyses/{}", uuid::Uuid::now_v7()), &bergen)
            .await,
        404,
    )
    .await;
    assert_eq!(foreign, missing);
    assert_eq!(
        app.get(&format!("/v1/analyses/{id}"), &oslo).await.status(),
        200
    );
}

#[tokio::test]
async fn a_listing_shows_only_the_callers_tenant() {
    let app = TestApp::spawn().await;
    let oslo = app.token("oslo", "submitter");
    let bergen = app.token("bergen", "submitter");
    let mine = app.submit(&bergen, &reference_rows()[0]["features"]).await;
    app.submit(&oslo, &reference_rows()[0]["features"]).await;
    let page: Value = app.get("/v1/analyses", &bergen).await.json().await.unwrap();
    let ids: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [mine.as_str()]);
}

#[tokio::test]
async fn another_tenant_leaves_no_trace_in_the_audit_trail_of_a_foreign_read() {
    let app = TestApp::spawn().await;
    let oslo = app.token("oslo", "submitter");
    let id = app.submit(&oslo, &reference_rows()[0]["features"]).await;
    let bergen = app.token("bergen", "clinician");
    assert_eq!(
        app.get(&format!("/v1/analyses/{id}"), &bergen)
            .await
            .status(),
        404
    );
    assert_eq!(
        app.rows("audit_events").await,
        0,
        "a refused read is not a read"
    );
}
