//! What the FHIR tests render: real result documents (built by `domain::result::build` from the
//! bundled manifests and their reference rows), hand-made slide and MIL results, and the analyses
//! around them; and helpers to find resources in a Bundle.

use super::super::bundle;
use crate::domain::analysis::{Priority, Status};
use crate::domain::contract::Manifest;
use crate::domain::ids::AnalysisId;
use crate::domain::result::{
    BagSummary, ClassificationResult, Decision, Measurement, ModelOutputs, Prediction,
    SLIDE_SCHEMA, SlideResult, SlideStages, SlideSummary, build,
};
use crate::http::analyses::{AnalysisView, ModelRef, Timings};
use chrono::{TimeZone, Utc};
use serde_json::{Value, json};

const BASE: &str = "https://onkos.example.org/";

pub fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// The result of the model `name` on row 0 of its reference predictions, with `tweak` applied to
/// the features first.
fn feature_result(name: &str, tweak: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Value {
    let manifest: Manifest =
        serde_json::from_str(&read(&format!("models/{name}/manifest.json"))).unwrap();
    let rows: Value =
        serde_json::from_str(&read(&format!("models/{name}/reference_predictions.json"))).unwrap();
    let mut features = rows[0]["features"].as_object().unwrap().clone();
    tweak(&mut features);
    let valid = manifest.validate_features(&features).unwrap();
    let expected = &rows[0]["expected"];
    let outputs = ModelOutputs {
        probabilities: expected["probability"].as_f64().map(|p| vec![1.0 - p, p]),
        risk_score: expected["risk_score"].as_f64(),
        survival: serde_json::from_value(expected["survival"].clone()).ok(),
    };
    let result = build(
        &manifest,
        &outputs,
        &valid.encoded,
        valid.outside_training_range,
    )
    .unwrap();
    serde_json::to_value(result).unwrap()
}

fn view(
    id: u128,
    model: &str,
    status: Status,
    result: Option<Value>,
    subject: Option<&str>,
) -> AnalysisView {
    let intended_use = result
        .as_ref()
        .and_then(|r| r["intended_use"].as_str())
        .unwrap_or("Research use only, not a medical device. A test.")
        .to_owned();
    AnalysisView {
        id: AnalysisId(uuid::Uuid::from_u128(id)),
        status,
        subject: subject.map(str::to_owned),
        priority: Priority::Routine,
        batch_id: None,
        model: ModelRef {
            name: model.into(),
            version: "1.0.0".into(),
            sha256: "6980f8f3b2a7069c866d8ee14e79f2e37128fb8bc5eb6ee520537ba6db48f726".into(),
        },
        input_sha256: "ab".repeat(32),
        created_at: Utc.with_ymd_and_hms(2026, 3, 1, 9, 30, 0).unwrap(),
        started_at: None,
        finished_at: matches!(status, Status::Succeeded | Status::Failed)
            .then(|| Utc.with_ymd_and_hms(2026, 3, 1, 9, 30, 2).unwrap()),
        timings: Timings {
            validate_ms: 0.1,
            queue_wait_ms: None,
            infer_ms: None,
            batch_size: None,
            dispatch: None,
            worker: None,
        },
        progress: None,
        execution_provider: None,
        result: result.map(crate::http::analyses::ResultDocument::Read),
        error: (status == Status::Failed).then(|| "the model returned no probabilities".into()),
        intended_use,
    }
}

fn summary() -> SlideSummary {
    SlideSummary {
        id: uuid::Uuid::from_u128(7),
        tissue_fraction: 0.42,
        tiles_analysed: 61,
        tiles_in_grid: 117,
        mpp_used: 0.499,
        mpp_source: "file".into(),
        model_mpp: 0.5,
        level_used: 0,
        level_downsample: 1.0,
        tile_size: 224,
        tile_size_level0: 224.0 * 0.5 / 0.499,
        reader: "onkos-tiff".into(),
        stain_normalisation: None,
        embeddings: None,
    }
}

fn slide_result() -> Value {
    let measure = |name: &str, value| Measurement {
        name: name.into(),
        value,
        unit: "optical density (log10)".into(),
        description: format!("mean {name}"),
        aggregation: json!({"kind": "tissue_weighted_mean"}),
    };
    serde_json::to_value(SlideResult {
        schema: SLIDE_SCHEMA.into(),
        slide: summary(),
        measurements: vec![
            measure("haematoxylin_od", Some(0.61)),
            measure("eosin_od", None),
        ],
        evidence: vec![],
        stages: SlideStages {
            open_ms: 1.0,
            mask_ms: 1.0,
            read_decode_ms: 1.0,
            infer_ms: 1.0,
            aggregate_ms: 1.0,
            total_ms: 5.0,
            tiles_per_second: 12.0,
        },
        intended_use: "Research use only, not a medical device. A quantification.".into(),
    })
    .unwrap()
}

fn mil_result(on_slide: bool) -> Value {
    let bag = BagSummary {
        embeddings: uuid::Uuid::from_u128(9),
        tiles: 40,
        dim: 16,
        encoder: "test".into(),
        attention: vec![],
    };
    serde_json::to_value(ClassificationResult {
        schema: crate::domain::result::CLASSIFICATION_SCHEMA.into(),
        predictions: vec![
            Prediction {
                label: "negative".into(),
                probability: 0.3,
            },
            Prediction {
                label: "positive".into(),
                probability: 0.7,
            },
        ],
        decision: Decision {
            label: "positive".into(),
            positive_label: "positive".into(),
            probability: 0.7,
            threshold: 0.5,
            threshold_source: "test fixture".into(),
            margin: 0.2,
        },
        explanation: None,
        out_of_training_range: vec![],
        bag: Some(Box::new(bag)),
        slide: on_slide.then(|| Box::new(summary())),
        stages: None,
        intended_use: "A test fixture.".into(),
    })
    .unwrap()
}

/// Every Bundle the tests render, by file name.
pub fn rendered() -> Vec<(&'static str, Value)> {
    let fna = feature_result("breast-fna-malignancy", |f| {
        f.insert("mean_radius".into(), json!(30.0));
    });
    let va = feature_result("lung-survival-va", |_| {});
    let cases = [
        (
            "classification",
            view(
                1,
                "breast-fna-malignancy",
                Status::Succeeded,
                Some(fna),
                Some("Patient/p-17"),
            ),
        ),
        (
            "survival",
            view(
                2,
                "lung-survival-va",
                Status::Succeeded,
                Some(va),
                Some("ACC-0001"),
            ),
        ),
        (
            "slide",
            view(
                3,
                "he-stain-quantification",
                Status::Succeeded,
                Some(slide_result()),
                Some("Specimen/s1"),
            ),
        ),
        (
            "mil-bag",
            view(
                4,
                "oslo-abmil",
                Status::Succeeded,
                Some(mil_result(false)),
                None,
            ),
        ),
        (
            "mil-slide",
            view(
                5,
                "oslo-abmil",
                Status::Succeeded,
                Some(mil_result(true)),
                None,
            ),
        ),
        (
            "failed",
            view(
                6,
                "breast-fna-malignancy",
                Status::Failed,
                None,
                Some("Patient/p-17"),
            ),
        ),
        (
            "queued",
            view(7, "lung-survival-va", Status::Queued, None, None),
        ),
    ];
    cases
        .into_iter()
        .map(|(name, v)| (name, bundle(&v, BASE, "0.1.0")))
        .collect()
}

pub fn resources<'a>(b: &'a Value, kind: &str) -> Vec<&'a Value> {
    b["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["resource"])
        .filter(|r| r["resourceType"] == kind)
        .collect()
}

pub fn report(b: &Value) -> &Value {
    resources(b, "DiagnosticReport")[0]
}

/// The Observation whose code is the local `code` (the first, when several).
pub fn observation<'a>(b: &'a Value, code: &str) -> &'a Value {
    resources(b, "Observation")
        .into_iter()
        .find(|o| o["code"]["coding"][0]["code"] == code)
        .unwrap()
}

pub fn full_url(b: &Value, resource: &Value) -> String {
    let entry = b["entry"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| &e["resource"] == resource);
    entry.unwrap()["fullUrl"].as_str().unwrap().to_owned()
}
