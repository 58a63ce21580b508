//! Input that breaks the model's contract is refused with every offending field named, and
//! nothing is stored.

use crate::helpers::{MODEL, TestApp, assert_problem, reference_rows};
use serde_json::{Value, json};

fn features() -> serde_json::Map<String, Value> {
    reference_rows()[0]["features"].as_object().unwrap().clone()
}

fn with(change: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Value {
    let mut f = features();
    change(&mut f);
    json!({"model": MODEL, "features": f})
}

/// (body, offending field, rule)
fn violations() -> Vec<(Value, &'static str, &'static str)> {
    vec![
        (
            with(|f| {
                f.insert("tumour_size".into(), json!(2.0));
            }),
            "features.tumour_size",
            "unknown",
        ),
        (
            with(|f| {
                f.remove("mean_radius");
            }),
            "features.mean_radius",
            "missing",
        ),
        (
            with(|f| {
                f.insert("mean_texture".into(), json!("10.4"));
            }),
            "features.mean_texture",
            "not_a_number",
        ),
        (
            with(|f| {
                f.insert("mean_texture".into(), json!(null));
            }),
            "features.mean_texture",
            "not_a_number",
        ),
        (
            with(|f| {
                f.insert("mean_area".into(), json!("NaN"));
            }),
            "features.mean_area",
            "not_finite",
        ),
        (
            with(|f| {
                f.insert("worst_area".into(), json!("Infinity"));
            }),
            "features.worst_area",
            "not_finite",
        ),
        (
            with(|f| {
                f.insert("mean_radius".into(), json!(-3.0));
            }),
            "features.mean_radius",
            "out_of_range",
        ),
        (
            json!({"model": "lung-magic", "features": features()}),
            "model",
            "unknown_model",
        ),
        (json!({"features": features()}), "model", "missing"),
        (json!({"model": MODEL}), "features", "missing"),
        (
            json!({"model": MODEL, "features": [1, 2]}),
            "features",
            "not_an_object",
        ),
        (
            json!({"model": MODEL, "features": features(), "priority": "urgent"}),
            "priority",
            "not_allowed",
        ),
        (
            json!({"model": MODEL, "features": features(), "subject": 42}),
            "subject",
            "not_a_string",
        ),
        (
            json!({"model": MODEL, "features": features(), "subject": "ACC\u{0}1"}),
            "subject",
            "control_character",
        ),
        (
            json!({"model": MODEL, "features": features(), "callback": "http://x"}),
            "callback",
            "unknown",
        ),
    ]
}

#[tokio::test]
async fn each_contract_rule_answers_422_naming_the_field_and_stores_nothing() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    for (body, field, rule) in violations() {
        let problem = assert_problem(app.post_json("/v1/analyses", &token, &body).await, 422).await;
        let errors = problem["errors"].as_array().unwrap();
        assert!(
            errors
                .iter()
                .any(|e| e["field"] == field && e["rule"] == rule),
            "expected {field}/{rule}, got {problem}"
        );
        assert!(problem["detail"].as_str().unwrap().contains(field));
    }
    assert_eq!((app.rows("analyses").await, app.rows("jobs").await), (0, 0));
}

#[tokio::test]
async fn all_violations_are_reported_at_once() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    let body = with(|f| {
        f.remove("mean_radius");
        f.insert("mean_area".into(), json!("NaN"));
        f.insert("bmi".into(), json!(22));
    });
    let problem = assert_problem(app.post_json("/v1/analyses", &token, &body).await, 422).await;
    let mut fields: Vec<&str> = problem["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        ["features.bmi", "features.mean_area", "features.mean_radius"]
    );
}

#[tokio::test]
async fn a_body_that_is_not_json_is_a_400_and_another_media_type_a_415() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    let url = format!("{}/v1/analyses", app.base);
    let broken = app
        .client
        .post(&url)
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body("{\"model\": ")
        .send()
        .await
        .unwrap();
    assert_problem(broken, 400).await;
    let xml = app
        .client
        .post(&url)
        .bearer_auth(&token)
        .header("content-type", "application/xml")
        .body("<a/>")
        .send()
        .await
        .unwrap();
    assert_problem(xml, 415).await;
    let huge = app
        .client
        .post(&url)
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body(vec![b' '; 2 << 20])
        .send()
        .await
        .unwrap();
    assert_problem(huge, 413).await;
    assert_eq!(app.rows("analyses").await, 0);
}

#[tokio::test]
async fn curls_default_form_content_type_is_read_as_json() {
    // `curl -d @case.json` sends application/x-www-form-urlencoded; the README's walk-through relies on it.
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    let body = serde_json::to_vec(&with(|_| {})).unwrap();
    let response = app
        .client
        .post(format!("{}/v1/analyses", app.base))
        .bearer_auth(&token)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
}

#[tokio::test]
async fn values_outside_the_training_range_are_accepted_and_flagged() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    let body = with(|f| {
        f.insert("mean_radius".into(), json!(60.0));
    });
    let response = app.post_json("/v1/analyses", &token, &body).await;
    assert_eq!(response.status(), 202);
    let id = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.step().await;
    let analysis: Value = app
        .get(&format!("/v1/analyses/{id}"), &token)
        .await
        .json()
        .await
        .unwrap();
    let flags = analysis["result"]["out_of_training_range"]
        .as_array()
        .unwrap();
    assert_eq!(flags.len(), 1);
    assert_eq!(flags[0]["feature"], "mean_radius");
    assert_eq!(flags[0]["value"], 60.0);
}
