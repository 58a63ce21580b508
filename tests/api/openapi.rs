//! The contract integrators build against: the committed OpenAPI document is the served one.

use crate::helpers::{TestApp, assert_problem, repo_path};
use serde_json::Value;

#[tokio::test]
async fn the_committed_openapi_document_is_the_served_one() {
    let app = TestApp::spawn().await;
    let served: Value = app
        .client
        .get(format!("{}/openapi.json", app.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let committed = std::fs::read_to_string(repo_path("openapi/openapi.json"))
        .expect("openapi/openapi.json is committed");
    let committed: Value = serde_json::from_str(&committed).unwrap();
    assert!(
        served == committed,
        "openapi/openapi.json is stale: run `make openapi` and commit it"
    );
    assert!(served["openapi"].as_str().unwrap().starts_with("3.1"));
}

#[tokio::test]
async fn every_documented_response_has_a_description_and_errors_are_problems() {
    let spec: Value = serde_json::from_str(&onkos::http::openapi::document()).unwrap();
    for (path, item) in spec["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            for (status, response) in operation["responses"].as_object().unwrap() {
                assert!(
                    response["description"]
                        .as_str()
                        .is_some_and(|d| !d.is_empty()),
                    "{method} {path} {status}"
                );
                if matches!(status.as_str(), "429" | "503") && !path.ends_with("readyz") {
                    assert!(
                        response["headers"]["Retry-After"].is_object(),
                        "{method} {path} {status} does not declare Retry-After"
                    );
                }
                if status.starts_with('4') || status.starts_with('5') {
                    let problem = &response["content"]["application/problem+json"];
                    assert!(
                        problem.is_object() || path.ends_with("readyz"),
                        "{method} {path} {status} is not problem+json"
                    );
                }
            }
        }
    }
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_problems() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    assert_problem(app.get("/v2/nothing", &token).await, 404).await;
    let delete = app
        .client
        .delete(format!("{}/v1/analyses", app.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_problem(delete, 405).await;
}

#[tokio::test]
async fn the_interactive_docs_are_served_without_a_cdn() {
    let app = TestApp::spawn().await;
    let page = app
        .client
        .get(format!("{}/docs/", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(html.contains("swagger") && !html.contains("cdn."), "{html}");
}
