//! FHIR R4 output: every Bundle the tests produce is validated by the `fhir.resources` R4B models
//! and the code table (tests/fhir/validate.py), in the same run.

use crate::helpers::{MODEL, TestApp, assert_problem, model_references, repo_path};
use crate::slides::{STAIN, uploaded};
use serde_json::{Value, json};
use std::path::PathBuf;

/// The validator's Python: `make test` builds target/fhir-venv from tests/fhir/requirements.txt.
fn python() -> PathBuf {
    std::env::var_os("FHIR_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_path("target/fhir-venv/bin/python"))
}

fn validate(bundles: &[(String, Value)]) {
    let dir = tempfile::tempdir().unwrap();
    for (name, bundle) in bundles {
        std::fs::write(dir.path().join(format!("{name}.json")), bundle.to_string()).unwrap();
    }
    let python = python();
    assert!(
        python.exists(),
        "{} is missing: run `make test` (it installs tests/fhir/requirements.txt) or set FHIR_PYTHON",
        python.display()
    );
    let output = std::process::Command::new(python)
        .arg(repo_path("tests/fhir/validate.py"))
        .arg(dir.path())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "FHIR validation failed:\n{text}");
    assert_eq!(text.matches("OK ").count(), bundles.len(), "{text}");
}

async fn fhir(app: &TestApp, token: &str, id: &str) -> Value {
    let response = app.get(&format!("/v1/analyses/{id}/fhir"), token).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/fhir+json");
    response.json().await.unwrap()
}

fn resources<'a>(bundle: &'a Value, kind: &str) -> Vec<&'a Value> {
    bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["resource"])
        .filter(|r| r["resourceType"] == kind)
        .collect()
}

#[tokio::test]
async fn classification_survival_and_slide_results_are_valid_fhir_bundles() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    let breast = &model_references(MODEL)[0];
    let lung = &model_references("lung-survival-va")[0];
    let classified = app
        .submit_to(
            &token,
            &json!({"model": MODEL, "features": breast["features"], "subject": "Patient/p-17"}),
        )
        .await;
    let survival = app
        .submit_to(
            &token,
            &json!({"model": "lung-survival-va", "features": lung["features"], "subject": "ACC-0042"}),
        )
        .await;
    let slide = uploaded(&app, &token, "aperio-cmu1-small-region.svs").await;
    let stained = app
        .submit_to(&token, &json!({"model": STAIN, "slide": slide}))
        .await;
    // Still queued: a registered report with no observations yet.
    let queued = fhir(&app, &token, &classified).await;
    assert_eq!(
        resources(&queued, "DiagnosticReport")[0]["status"],
        "registered"
    );
    assert!(resources(&queued, "Observation").is_empty());
    app.drain().await;

    let mut bundles = vec![("queued".to_owned(), queued)];
    for (name, id) in [
        ("classification", &classified),
        ("survival", &survival),
        ("slide", &stained),
    ] {
        let bundle = fhir(&app, &token, id).await;
        assert_eq!(bundle["resourceType"], "Bundle");
        let report = resources(&bundle, "DiagnosticReport")[0];
        assert_eq!(report["status"], "final", "{name}: {report}");
        let observations = resources(&bundle, "Observation");
        assert!(!observations.is_empty(), "{name}");
        assert_eq!(
            report["result"].as_array().unwrap().len(),
            observations.len()
        );
        let analysis = app.get_json(&format!("/v1/analyses/{id}"), &token).await;
        let model = resources(&bundle, "Device")
            .into_iter()
            .find(|d| d["version"][0]["value"] == analysis["model"]["version"])
            .unwrap_or_else(|| panic!("{name}: no model Device: {bundle}"));
        assert!(
            model
                .to_string()
                .contains(analysis["model"]["sha256"].as_str().unwrap())
        );
        // The same Bundle through content negotiation on the analysis itself.
        let negotiated: Value = app
            .client
            .get(format!("{}/v1/analyses/{id}", app.base))
            .bearer_auth(&token)
            .header("accept", "application/fhir+json")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(negotiated, bundle, "{name}");
        // Every kind of result, slides included, keeps a provenance record that still matches.
        let provenance = app
            .get_json(&format!("/v1/analyses/{id}/provenance"), &token)
            .await;
        assert_eq!(provenance["intact"], true, "{name}: {provenance}");
        bundles.push((name.to_owned(), bundle));
    }
    let classification = &bundles[1].1;
    let report = resources(classification, "DiagnosticReport")[0];
    assert_eq!(report["subject"]["reference"], "Patient/p-17");
    assert!(
        report["conclusion"]
            .as_str()
            .unwrap()
            .contains("not a medical device")
    );
    let survival = resources(&bundles[2].1, "DiagnosticReport")[0];
    assert_eq!(survival["subject"]["identifier"]["value"], "ACC-0042");
    validate(&bundles);

    // FHIR reads are result reads: audited, and tenant-scoped.
    let reads: i64 = sqlx::query_scalar(
        "select count(*) from audit_events where action = 'analysis.read' and target_id = $1",
    )
    .bind(&classified)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(reads >= 3, "{reads}");
    assert_problem(
        app.get(
            &format!("/v1/analyses/{classified}/fhir"),
            &app.token("bergen", "clinician"),
        )
        .await,
        404,
    )
    .await;
}

#[tokio::test]
async fn a_failed_analysis_is_a_cancelled_report_that_says_why() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    let id = app
        .submit(&token, &model_references(MODEL)[0]["features"])
        .await;
    sqlx::query(
        "update analyses set status = 'failed', error = 'the model could not be loaded', finished_at = now() where id = $1::uuid",
    )
    .bind(&id)
    .execute(&app.pool)
    .await
    .unwrap();
    let bundle = fhir(&app, &token, &id).await;
    let report = resources(&bundle, "DiagnosticReport")[0];
    assert_eq!(report["status"], "cancelled");
    assert!(
        report["conclusion"]
            .as_str()
            .unwrap()
            .contains("the model could not be loaded")
    );
    validate(&[("failed".to_owned(), bundle)]);
}
