//! CSV batches: one analysis per row, all rows or none, errors naming row and column.

use crate::helpers::{MODEL, TestApp, assert_problem, csv, reference_rows};
use serde_json::Value;

async fn post_csv(app: &TestApp, token: &str, query: &str, body: String) -> reqwest::Response {
    app.client
        .post(format!("{}/v1/analyses?{query}", app.base))
        .bearer_auth(token)
        .header("content-type", "text/csv")
        .body(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_csv_batch_becomes_one_analysis_per_row_in_row_order() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    let rows: Vec<Value> = reference_rows().into_iter().take(5).collect();
    let response = post_csv(
        &app,
        &token,
        &format!("model={MODEL}&priority=stat"),
        csv(&rows, None),
    )
    .await;
    assert_eq!(response.status(), 202);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let batch: Value = response.json().await.unwrap();
    let ids: Vec<&str> = batch["analyses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 5);
    assert_eq!(
        location,
        format!("/v1/analyses?batch={}", batch["batch_id"].as_str().unwrap())
    );
    let listed: Value = app.get(&location, &token).await.json().await.unwrap();
    let mut listed_ids: Vec<&str> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    listed_ids.reverse();
    assert_eq!(listed_ids, ids, "newest first, so reversed it is row order");
    for (i, id) in ids.iter().enumerate() {
        let analysis: Value = app
            .get(&format!("/v1/analyses/{id}"), &token)
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(analysis["subject"], format!("case-{}", i + 1));
        assert_eq!(analysis["priority"], "stat");
    }
}

#[tokio::test]
async fn one_bad_cell_refuses_the_whole_batch_naming_row_and_column() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    let rows: Vec<Value> = reference_rows().into_iter().take(4).collect();
    let problem = assert_problem(
        post_csv(
            &app,
            &token,
            &format!("model={MODEL}"),
            csv(&rows, Some((3, "mean_area", "big"))),
        )
        .await,
        422,
    )
    .await;
    assert_eq!(problem["errors"][0]["field"], "rows[3].mean_area");
    assert_eq!(problem["errors"][0]["rule"], "not_a_number");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("row 3, column mean_area")
    );
    let problem = assert_problem(
        post_csv(
            &app,
            &token,
            &format!("model={MODEL}"),
            csv(&rows, Some((2, "worst_area", ""))),
        )
        .await,
        422,
    )
    .await;
    assert_eq!(
        (
            problem["errors"][0]["field"].as_str(),
            problem["errors"][0]["rule"].as_str()
        ),
        (Some("rows[2].worst_area"), Some("missing"))
    );
    let problem = assert_problem(post_csv(&app, &token, "", csv(&rows, None)).await, 422).await;
    assert_eq!(problem["errors"][0]["field"], "model");
    let header_only = "subject,mean_radius\n".to_owned();
    assert_problem(
        post_csv(&app, &token, &format!("model={MODEL}"), header_only).await,
        422,
    )
    .await;
    assert_eq!(app.rows("analyses").await, 0);
}

#[tokio::test]
async fn listings_filter_by_status_model_and_subject() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    let first = app.submit_to(&token, &serde_json::json!({"model": MODEL, "features": reference_rows()[0]["features"], "subject": "S-1"})).await;
    app.step().await;
    let second = app.submit(&token, &reference_rows()[1]["features"]).await;
    let ids = |page: Value| -> Vec<String> {
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        ids(app
            .get("/v1/analyses?status=succeeded", &token)
            .await
            .json()
            .await
            .unwrap()),
        [first.as_str()]
    );
    assert_eq!(
        ids(app
            .get("/v1/analyses?status=queued", &token)
            .await
            .json()
            .await
            .unwrap()),
        [second.as_str()]
    );
    assert_eq!(
        ids(app
            .get("/v1/analyses?subject=S-1", &token)
            .await
            .json()
            .await
            .unwrap()),
        [first.as_str()]
    );
    assert_eq!(
        ids(app
            .get(&format!("/v1/analyses?model={MODEL}"), &token)
            .await
            .json()
            .await
            .unwrap()),
        [second.as_str(), first.as_str()]
    );
    assert!(
        ids(app
            .get("/v1/analyses?model=lung-survival-va", &token)
            .await
            .json()
            .await
            .unwrap())
        .is_empty()
    );
    assert_problem(app.get("/v1/analyses?status=sleeping", &token).await, 400).await;
}
