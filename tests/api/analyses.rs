//! Submitting features, stepping the worker and reading the structured result.

use crate::helpers::{MODEL, TestApp, assert_problem, class_probability, manifest, reference_rows};
use serde_json::{Value, json};

#[tokio::test]
async fn a_json_case_gets_the_training_scripts_probability_and_a_traceable_result() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    let rows: Vec<Value> = reference_rows().into_iter().take(8).collect();
    let mut ids = Vec::new();
    for row in &rows {
        ids.push(app.submit(&token, &row["features"]).await);
    }
    assert_eq!(
        app.step().await,
        rows.len(),
        "one step runs the whole batch"
    );

    let manifest = manifest();
    let threshold = manifest["classification"]["threshold"]["value"]
        .as_f64()
        .unwrap();
    for (id, row) in ids.iter().zip(&rows) {
        let analysis: Value = app
            .get(&format!("/v1/analyses/{id}"), &token)
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(analysis["status"], "succeeded", "{analysis}");
        let malignant = class_probability(&analysis, "malignant");
        let benign = class_probability(&analysis, "benign");
        let expected = row["expected"]["probability"].as_f64().unwrap();
        assert!(
            (malignant - expected).abs() < 1e-5,
            "row {}: onkos {malignant}, scikit-learn {expected}",
            row["row"]
        );
        assert!((malignant + benign - 1.0).abs() < 1e-5);
        let decision = &analysis["result"]["decision"];
        let expected_label = if expected >= threshold {
            "malignant"
        } else {
            "benign"
        };
        assert_eq!(decision["label"], expected_label, "row {}", row["row"]);
        assert_eq!(decision["threshold"], threshold);
        assert_eq!(analysis["model"]["name"], MODEL);
        assert_eq!(analysis["model"]["version"], manifest["version"]);
        assert_eq!(analysis["model"]["sha256"], manifest["onnx"]["sha256"]);
        assert_eq!(analysis["input_sha256"].as_str().map(str::len), Some(64));
        assert_eq!(analysis["execution_provider"], "CPUExecutionProvider");
        assert!(
            analysis["intended_use"]
                .as_str()
                .unwrap()
                .contains("not a medical device")
        );
        let contributions = analysis["result"]["explanation"]["contributions"]
            .as_array()
            .unwrap();
        assert_eq!(contributions.len(), 30);
        let magnitudes: Vec<f64> = contributions
            .iter()
            .map(|c| c["contribution"].as_f64().unwrap().abs())
            .collect();
        assert!(
            magnitudes.windows(2).all(|w| w[0] >= w[1]),
            "contributions are sorted by size"
        );
        for stage in ["validate_ms", "queue_wait_ms", "infer_ms"] {
            assert!(
                analysis["timings"][stage]
                    .as_f64()
                    .is_some_and(|t| t >= 0.0),
                "{stage} in {analysis}"
            );
        }
        assert_eq!(analysis["timings"]["batch_size"], rows.len());
        for stamp in ["created_at", "started_at", "finished_at"] {
            assert!(analysis[stamp].is_string(), "{stamp} in {analysis}");
        }
    }
}

#[tokio::test]
async fn an_analysis_is_queued_until_a_worker_runs_it() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    let response = app.post_json("/v1/analyses", &token, &json!({"model": MODEL, "features": reference_rows()[0]["features"], "priority": "stat", "subject": "ACC-1"})).await;
    assert_eq!(response.status(), 202);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let accepted: Value = response.json().await.unwrap();
    assert_eq!(
        location,
        format!("/v1/analyses/{}", accepted["id"].as_str().unwrap())
    );
    assert_eq!(accepted["status"], "queued");

    let queued: Value = app.get(&location, &token).await.json().await.unwrap();
    assert_eq!(queued["status"], "queued");
    assert!(queued["result"].is_null());
    assert_eq!(
        (queued["subject"].as_str(), queued["priority"].as_str()),
        (Some("ACC-1"), Some("stat"))
    );

    assert_eq!(app.step().await, 1);
    assert_eq!(
        app.step().await,
        0,
        "a finished analysis is never run twice"
    );
    let done: Value = app.get(&location, &token).await.json().await.unwrap();
    assert_eq!(done["status"], "succeeded");
    assert_eq!(app.rows("results").await, 1);
}

#[tokio::test]
async fn stat_analyses_are_claimed_before_routine_ones() {
    let app = TestApp::spawn_with(|c| c.worker_batch_size = 1).await;
    let token = app.token("oslo", "submitter");
    let features = &reference_rows()[0]["features"];
    let routine = app.submit(&token, features).await;
    let stat = app
        .post_json(
            "/v1/analyses",
            &token,
            &json!({"model": MODEL, "features": features, "priority": "stat"}),
        )
        .await;
    let stat = stat.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(app.step().await, 1);
    let status = |id: String| {
        let app = &app;
        let token = &token;
        async move {
            app.get(&format!("/v1/analyses/{id}"), token)
                .await
                .json::<Value>()
                .await
                .unwrap()["status"]
                .clone()
        }
    };
    assert_eq!(status(stat).await, "succeeded");
    assert_eq!(status(routine).await, "queued");
}

#[tokio::test]
async fn every_read_of_a_result_is_audited() {
    let app = TestApp::spawn().await;
    let submitter = app.token("oslo", "submitter");
    let id = app
        .submit(&submitter, &reference_rows()[0]["features"])
        .await;
    app.step().await;
    let clinician = app.token("oslo", "clinician");
    for _ in 0..2 {
        assert_eq!(
            app.get(&format!("/v1/analyses/{id}"), &clinician)
                .await
                .status(),
            200
        );
    }
    let events: Vec<(String, String, String, String)> =
        sqlx::query_as("select tenant_id, actor, action, target_id from audit_events order by id")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(events.len(), 2);
    assert!(events.iter().all(|e| e
        == &(
            "oslo".into(),
            "tester".into(),
            "analysis.read".into(),
            id.clone()
        )));
}

#[tokio::test]
async fn a_listing_pages_through_the_tenants_analyses_newest_first() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(app.submit(&token, &reference_rows()[1]["features"]).await);
    }
    let first: Value = app
        .get("/v1/analyses?limit=2", &token)
        .await
        .json()
        .await
        .unwrap();
    let listed: Vec<&str> = first["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [ids[2].as_str(), ids[1].as_str()]);
    let next = first["next_before"].as_str().unwrap();
    let second: Value = app
        .get(&format!("/v1/analyses?limit=2&before={next}"), &token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(second["items"][0]["id"], ids[0].as_str());
    assert!(second["next_before"].is_null());
}

#[tokio::test]
async fn a_bad_listing_query_is_a_400_problem() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "clinician");
    for query in ["limit=abc", "limit=0", "limit=201", "before=not-a-uuid"] {
        let problem =
            assert_problem(app.get(&format!("/v1/analyses?{query}"), &token).await, 400).await;
        let field = query.split('=').next().unwrap();
        assert!(
            problem["detail"].as_str().unwrap().contains(field),
            "{query}: {problem}"
        );
    }
}

#[tokio::test]
async fn a_malformed_analysis_id_is_a_404_problem() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "clinician");
    assert_problem(app.get("/v1/analyses/12345", &token).await, 404).await;
}

/// Reads that arrive together are served by one statement (jobs/reads.rs): every reader still
/// gets its own analysis, each read is audited once (two reads of one analysis both), and another
/// tenant's analysis stays not found and unaudited.
#[tokio::test]
async fn concurrent_reads_each_get_their_analysis_and_each_is_audited() {
    let app = TestApp::spawn().await;
    let oslo = app.token("oslo", "submitter");
    let bergen = app.token("bergen", "submitter");
    let rows = reference_rows();
    let mut ids = Vec::new();
    for row in rows.iter().take(10) {
        ids.push(app.submit(&oslo, &row["features"]).await);
    }
    let other = app.submit(&bergen, &rows[0]["features"]).await;
    assert_eq!(app.drain().await, 11);
    let alone: Vec<Value> = {
        let mut alone = Vec::new();
        for id in &ids {
            alone.push(app.get_json(&format!("/v1/analyses/{id}"), &oslo).await);
        }
        alone
    };

    // Each analysis three times, and bergen's five times by oslo, all at once.
    let wanted: Vec<&String> = ids
        .iter()
        .cycle()
        .take(30)
        .chain(std::iter::repeat_n(&other, 5))
        .collect();
    let (app_ref, token) = (&app, &oslo);
    let answers = futures_util::future::join_all(wanted.iter().map(|id| async move {
        let response = app_ref.get(&format!("/v1/analyses/{id}"), token).await;
        (
            response.status().as_u16(),
            response.json::<Value>().await.unwrap(),
        )
    }))
    .await;
    for (id, (status, body)) in wanted.iter().zip(&answers) {
        if **id == other {
            assert_eq!(*status, 404, "{body}");
            continue;
        }
        assert_eq!(*status, 200, "{body}");
        let first = ids.iter().position(|i| i == *id).unwrap();
        assert_eq!(body, &alone[first], "the same answer as a read alone");
    }
    let audited: Vec<(String, i64)> = sqlx::query_as(
        "select target_id, count(*) from audit_events where action = 'analysis.read'
         group by 1 order by 1",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    let mut expected: Vec<(String, i64)> = ids.iter().map(|id| (id.clone(), 4)).collect();
    expected.sort();
    assert_eq!(
        audited, expected,
        "one event per read; none for the refused ones"
    );
}
