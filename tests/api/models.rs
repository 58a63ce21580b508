//! Every bundled model, through the HTTP API, on its whole cohort: the answers equal the training
//! script's outputs, and the metric recomputed from the answers equals the one on the card.

use crate::helpers::{TestApp, model_manifest, model_references};
use serde_json::Value;

const MODELS: [&str; 6] = [
    "breast-fna-malignancy",
    "breast-fna-malignancy-gb",
    "breast-recurrence-gbsg2",
    "breast-metastasis-76gene",
    "lung-survival-va",
    "lung-survival-ncctg",
];

/// The cohort as a CSV batch: a subject column, then every input in manifest order.
fn cohort_csv(manifest: &Value, rows: &[Value]) -> String {
    let inputs: Vec<&str> = manifest["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    let mut csv = format!("subject,{}\n", inputs.join(","));
    for row in rows {
        let cells: Vec<String> = inputs
            .iter()
            .map(|name| match &row["features"][*name] {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect();
        csv.push_str(&format!("row-{},{}\n", row["row"], cells.join(",")));
    }
    csv
}

/// Area under the ROC curve by pair counting (ties count half).
fn roc_auc(scores: &[(f64, bool)]) -> f64 {
    let (mut wins, mut pairs) = (0.0, 0.0);
    for (p, positive) in scores.iter().filter(|s| s.1) {
        let _ = positive;
        for (n, _) in scores.iter().filter(|s| !s.1) {
            pairs += 1.0;
            wins += if p > n {
                1.0
            } else if p == n {
                0.5
            } else {
                0.0
            };
        }
    }
    wins / pairs
}

/// Harrell's C as scikit-survival computes it: a pair is comparable when the earlier time is an
/// event (or both times are equal and only the first is an event); tied risks count half.
fn harrell_c(rows: &[(f64, f64, bool)]) -> f64 {
    let (mut concordant, mut comparable) = (0.0, 0.0);
    for (risk_i, time_i, event_i) in rows {
        if !event_i {
            continue;
        }
        for (risk_j, time_j, event_j) in rows {
            if time_j > time_i || (time_j == time_i && !event_j) {
                comparable += 1.0;
                concordant += if (risk_i - risk_j).abs() <= 1e-8 {
                    0.5
                } else if risk_i > risk_j {
                    1.0
                } else {
                    0.0
                };
            }
        }
    }
    concordant / comparable
}

async fn check_model(name: &str) {
    let app = TestApp::spawn_with(|c| c.worker_batch_size = 256).await;
    let token = app.token("oslo", "submitter");
    let manifest = model_manifest(name);
    let rows = model_references(name);
    let response = app
        .client
        .post(format!("{}/v1/analyses?model={name}", app.base))
        .bearer_auth(&token)
        .header("content-type", "text/csv")
        .body(cohort_csv(&manifest, &rows))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        202,
        "{name}: {:?}",
        response.text().await
    );
    let batch: Value = response.json().await.unwrap();
    let ids: Vec<String> = batch["analyses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), rows.len());
    assert_eq!(app.drain().await, rows.len());

    let mut classification = Vec::new();
    let mut survival = Vec::new();
    for (id, row) in ids.iter().zip(&rows) {
        let analysis: Value = app
            .get(&format!("/v1/analyses/{id}"), &token)
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(
            analysis["status"], "succeeded",
            "{name} row {}: {analysis}",
            row["row"]
        );
        assert_eq!(analysis["subject"], format!("row-{}", row["row"]));
        let result = &analysis["result"];
        let expected = &row["expected"];
        if manifest["task"] == "classification" {
            let positive = manifest["classification"]["positive_label"]
                .as_str()
                .unwrap();
            let p = result["predictions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["label"] == positive)
                .unwrap()["probability"]
                .as_f64()
                .unwrap();
            let want = expected["probability"].as_f64().unwrap();
            assert!(
                (p - want).abs() < 1e-5,
                "{name} row {}: {p} vs {want}",
                row["row"]
            );
            classification.push((p, row["outcome"]["label"] == 1));
        } else {
            let score = result["risk"]["score"].as_f64().unwrap();
            let want = expected["risk_score"].as_f64().unwrap();
            assert!(
                (score - want).abs() < 1e-5,
                "{name} row {}: risk {score} vs {want}",
                row["row"]
            );
            assert!((result["risk"]["hazard_ratio"].as_f64().unwrap() - score.exp()).abs() < 1e-9);
            let curve = result["survival"].as_array().unwrap();
            let horizons = manifest["survival"]["horizons_days"].as_array().unwrap();
            assert_eq!(curve.len(), horizons.len());
            for ((point, want), days) in curve
                .iter()
                .zip(expected["survival"].as_array().unwrap())
                .zip(horizons)
            {
                assert_eq!(point["days"].as_f64(), days.as_f64());
                let (got, want) = (
                    point["probability"].as_f64().unwrap(),
                    want.as_f64().unwrap(),
                );
                assert!(
                    (got - want).abs() < 1e-5,
                    "{name} row {}: S({days}) {got} vs {want}",
                    row["row"]
                );
            }
            let percentile = result["risk"]["cohort_percentile"].as_f64().unwrap();
            assert!((0.0..=100.0).contains(&percentile));
            let outcome = &row["outcome"];
            survival.push((
                score,
                outcome["time"].as_f64().unwrap(),
                outcome["event"] == 1,
            ));
        }
        let linear = !manifest["explanation"].is_null();
        assert_eq!(
            result["explanation"].is_object(),
            linear,
            "{name}: an explanation exactly for linear models"
        );
    }
    let apparent = &manifest["metrics"]["apparent"];
    if manifest["task"] == "classification" {
        let auc = roc_auc(&classification);
        let card = apparent["roc_auc"].as_f64().unwrap();
        assert!(
            (auc - card).abs() < 1e-3,
            "{name}: AUC from the API {auc:.4}, card {card}"
        );
    } else {
        let c = harrell_c(&survival);
        let card = apparent["c_index"].as_f64().unwrap();
        assert!(
            (c - card).abs() < 1e-3,
            "{name}: C-index from the API {c:.4}, card {card}"
        );
    }
}

#[tokio::test]
async fn breast_fna_malignancy_reproduces_its_cohort_and_card() {
    check_model(MODELS[0]).await;
}

#[tokio::test]
async fn breast_fna_malignancy_gb_reproduces_its_cohort_and_card() {
    check_model(MODELS[1]).await;
}

#[tokio::test]
async fn breast_recurrence_gbsg2_reproduces_its_cohort_and_card() {
    check_model(MODELS[2]).await;
}

#[tokio::test]
async fn breast_metastasis_76gene_reproduces_its_cohort_and_card() {
    check_model(MODELS[3]).await;
}

#[tokio::test]
async fn lung_survival_va_reproduces_its_cohort_and_card() {
    check_model(MODELS[4]).await;
}

#[tokio::test]
async fn lung_survival_ncctg_reproduces_its_cohort_and_card() {
    check_model(MODELS[5]).await;
}
