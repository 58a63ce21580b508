//! The FHIR rendering of each kind of result and analysis state. Every coding and UCUM unit is
//! checked against `tests/fhir/codes.json`, the table the external validator uses, and every
//! rendered Bundle is run through that validator, `tests/fhir/validate.py`.
#![allow(clippy::unwrap_used)]

mod fixtures;

use super::codes::{LOCAL, ONKOS, UCUM};
use fixtures::{full_url, observation, read, rendered, report, resources};
use serde_json::{Value, json};

#[test]
fn a_malignant_classification_is_a_final_pathology_report_with_coded_decision() {
    let all = rendered();
    let b = &all[0].1;
    assert_eq!(
        (b["resourceType"].as_str(), b["type"].as_str()),
        (Some("Bundle"), Some("collection"))
    );
    let r = report(b);
    assert_eq!(r["status"], "final");
    assert_eq!(r["subject"], json!({"reference": "Patient/p-17"}));
    assert_eq!(
        r["identifier"][0]["system"],
        "https://onkos.example.org/v1/analyses"
    );
    assert_eq!(
        r["identifier"][0]["value"],
        uuid::Uuid::from_u128(1).to_string()
    );
    assert_eq!(r["code"]["coding"][1]["code"], "11526-1");
    assert_eq!(r["category"][1]["coding"][0]["code"], "PAT");
    assert_eq!(
        (r["effectiveDateTime"].as_str(), r["issued"].as_str()),
        (
            Some("2026-03-01T09:30:00.000Z"),
            Some("2026-03-01T09:30:02.000Z")
        )
    );
    let conclusion = r["conclusion"].as_str().unwrap();
    assert!(
        conclusion.starts_with("Decision: malignant"),
        "{conclusion}"
    );
    assert!(
        conclusion.contains("not a medical device") && conclusion.contains("mean_radius"),
        "{conclusion}"
    );
    assert_eq!(r["conclusionCode"][0]["coding"][0]["code"], "367651003");

    let decision = observation(b, "decision");
    assert_eq!(
        decision["valueCodeableConcept"]["coding"][0]["code"],
        "367651003"
    );
    assert_eq!(decision["interpretation"][0]["coding"][0]["code"], "POS");
    assert_eq!(decision["component"][0]["valueQuantity"]["value"], 0.43);
    let malignant = resources(b, "Observation")[1];
    assert_eq!(
        malignant["component"][0]["valueCodeableConcept"]["text"],
        "malignant"
    );
    assert_eq!(
        decision["derivedFrom"][0]["reference"],
        full_url(b, malignant).as_str()
    );
    assert_eq!(malignant["valueQuantity"]["code"], "1");
    let benign = resources(b, "Observation")[0];
    assert_eq!(
        benign["component"][0]["valueCodeableConcept"]["coding"][0]["code"],
        "3898006"
    );
    // The linear model's explanation: one component per encoded column.
    assert_eq!(
        observation(b, "score-contributions")["component"]
            .as_array()
            .unwrap()
            .len(),
        30
    );
    // Every Observation of the row says it is an extrapolation, names the model and the input.
    for o in resources(b, "Observation") {
        assert_eq!(o["status"], "final");
        assert_eq!(o["subject"], r["subject"]);
        let notes = o["note"].to_string();
        assert!(
            notes.contains("Extrapolation: inputs outside") && notes.contains(&"ab".repeat(32)),
            "{notes}"
        );
    }
    // The report lists every Observation; the model Device has the ONNX digest and the service as parent.
    let listed: Vec<&Value> = r["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| &x["reference"])
        .collect();
    assert_eq!(listed.len(), resources(b, "Observation").len());
    let model = resources(b, "Device")[0];
    assert_eq!(
        model["identifier"][0]["value"],
        "6980f8f3b2a7069c866d8ee14e79f2e37128fb8bc5eb6ee520537ba6db48f726"
    );
    assert_eq!(model["deviceName"][0]["name"], "breast-fna-malignancy");
    assert_eq!(
        model["parent"]["reference"],
        full_url(b, resources(b, "Device")[1]).as_str()
    );
    for o in resources(b, "Observation") {
        assert_eq!(o["device"]["reference"], full_url(b, model).as_str());
    }
}

#[test]
fn a_survival_estimate_has_one_observation_per_horizon_in_days_and_no_pathology_codes() {
    let all = rendered();
    let b = &all[1].1;
    let r = report(b);
    assert_eq!(
        r["code"]["coding"].as_array().unwrap().len(),
        1,
        "no LOINC pathology study"
    );
    assert_eq!(r["category"].as_array().unwrap().len(), 1);
    assert_eq!(r["subject"], json!({"identifier": {"value": "ACC-0001"}}));
    let survival: Vec<&Value> = resources(b, "Observation")
        .into_iter()
        .filter(|o| o["code"]["coding"][0]["code"] == "survival-probability")
        .collect();
    let days: Vec<&Value> = survival
        .iter()
        .map(|o| &o["component"][0]["valueQuantity"]["value"])
        .collect();
    assert_eq!(days, [&json!(90.0), &json!(180.0), &json!(365.0)]);
    assert_eq!(survival[0]["component"][0]["valueQuantity"]["code"], "d");
    assert_eq!(
        observation(b, "cohort-percentile")["valueQuantity"]["code"],
        "%"
    );
    let score = observation(b, "risk-score")["valueQuantity"]["value"]
        .as_f64()
        .unwrap();
    assert!((score - -0.9159890371026673).abs() < 1e-12);
    assert!(
        resources(b, "Observation")
            .iter()
            .all(|o| o.get("interpretation").is_none())
    );
    assert!(r["conclusion"].as_str().unwrap().contains("at 365 days"));
}

#[test]
fn a_slide_quantification_has_units_and_says_why_a_measure_is_absent() {
    let all = rendered();
    let b = &all[2].1;
    let r = report(b);
    assert!(r.get("subject").is_none());
    assert_eq!(r["specimen"], json!([{"reference": "Specimen/s1"}]));
    assert_eq!(
        observation(b, "tissue-fraction")["valueQuantity"]["value"],
        0.42
    );
    let tiles = observation(b, "tiles-analysed");
    assert_eq!(
        (
            &tiles["valueQuantity"]["value"],
            &tiles["valueQuantity"]["code"]
        ),
        (&json!(61.0), &json!("{tiles}"))
    );
    assert_eq!(
        observation(b, "mpp-used")["valueQuantity"]["code"],
        "um/{pixel}"
    );
    let measures: Vec<&Value> = resources(b, "Observation")
        .into_iter()
        .filter(|o| o["code"]["coding"][0]["code"] == "slide-measurement")
        .collect();
    assert_eq!(measures[0]["code"]["text"], "haematoxylin_od");
    assert_eq!(measures[0]["valueQuantity"]["code"], "1");
    assert_eq!(
        measures[1]["dataAbsentReason"]["coding"][0]["code"],
        "not-applicable"
    );
    assert!(measures[1].get("valueQuantity").is_none());
}

#[test]
fn mil_results_carry_the_bag_or_the_slide_and_uncoded_labels_as_text() {
    let all = rendered();
    let bag = &all[3].1;
    assert!(report(bag).get("subject").is_none());
    let decision = observation(bag, "decision");
    assert_eq!(
        decision["valueCodeableConcept"],
        json!({"text": "positive"})
    );
    assert!(report(bag).get("conclusionCode").is_none());
    assert_eq!(
        observation(bag, "tiles-analysed")["valueQuantity"]["value"],
        40.0
    );
    let on_slide = &all[4].1;
    assert_eq!(
        observation(on_slide, "tiles-analysed")["valueQuantity"]["value"],
        61.0
    );
    assert_eq!(
        observation(on_slide, "tissue-fraction")["valueQuantity"]["value"],
        0.42
    );
    // A card without the caveat still gets it.
    assert!(
        report(bag)["conclusion"]
            .as_str()
            .unwrap()
            .contains("Research use only, not a medical device. A test fixture.")
    );
}

#[test]
fn unfinished_and_failed_analyses_have_reports_without_results() {
    let all = rendered();
    let failed = report(&all[5].1);
    assert_eq!(failed["status"], "cancelled");
    assert!(failed.get("result").is_none());
    assert!(failed["conclusion"].as_str().unwrap().contains(
        "failed and has no result: the model returned no probabilities. Research use only"
    ));
    let queued = report(&all[6].1);
    assert_eq!(queued["status"], "registered");
    assert!(queued.get("issued").is_none() && queued.get("subject").is_none());
    assert_eq!(resources(&all[6].1, "Observation").len(), 0);
}

#[test]
fn ids_are_stable_unique_and_shared_by_the_same_model() {
    let (first, again) = (rendered(), rendered());
    assert_eq!(first, again);
    let mut urls: Vec<String> = first
        .iter()
        .flat_map(|(_, b)| b["entry"].as_array().unwrap().iter())
        .filter(|e| e["resource"]["resourceType"] != "Device")
        .map(|e| e["fullUrl"].as_str().unwrap().to_owned())
        .collect();
    let count = urls.len();
    urls.sort();
    urls.dedup();
    assert_eq!(
        urls.len(),
        count,
        "every report and Observation has its own id"
    );
    for (_, b) in &first {
        for e in b["entry"].as_array().unwrap() {
            let url = e["fullUrl"].as_str().unwrap();
            assert_eq!(url.strip_prefix("urn:uuid:"), e["resource"]["id"].as_str());
        }
    }
    // The same model file is the same Device in the Bundles of different analyses.
    let device = |b: &Value| full_url(b, resources(b, "Device")[0]);
    assert_eq!(device(&first[0].1), device(&first[5].1));
    assert_ne!(device(&first[0].1), device(&first[1].1));
}

#[test]
fn subjects_become_references_only_when_they_are_fhir_references() {
    let subject = |raw: Option<&str>| super::subject(raw);
    assert_eq!(
        subject(Some("Group/g.1")).0,
        Some(json!({"reference": "Group/g.1"}))
    );
    let absolute = "https://ehr.example/fhir/Patient/9";
    assert_eq!(
        subject(Some(absolute)).0,
        Some(json!({"reference": absolute}))
    );
    for opaque in [
        "Patient/has space",
        "a/Patient/9",
        "Observation/1",
        "Patient/",
        "ACC 7",
    ] {
        assert_eq!(
            subject(Some(opaque)),
            (Some(json!({"identifier": {"value": opaque}})), None)
        );
    }
    assert_eq!(subject(Some("  ")), (None, None));
}

/// The same check as `tests/fhir/validate.py`, so that `cargo test` alone catches a code that is
/// not in the table: every coding's system and code are listed (display matching), every UCUM
/// code is listed, and every local code is in the table and the other way round.
#[test]
fn every_code_and_unit_is_in_the_validator_table() {
    let table: Value = serde_json::from_str(&read("tests/fhir/codes.json")).unwrap();
    let table = &table["codes"];
    for (name, b) in rendered() {
        let mut problems = Vec::new();
        walk(b, table, &mut problems);
        assert!(problems.is_empty(), "{name}: {problems:#?}");
    }
    let local = table[ONKOS].as_object().unwrap();
    assert_eq!(local.len(), LOCAL.len());
    for (code, display) in LOCAL {
        assert_eq!(local[*code], *display, "{code}");
    }
}

/// Every Bundle these tests render also passes the external validator (`fhir.resources` R4B
/// models and the code table), which `make test` installs in target/fhir-venv.
#[test]
fn every_rendered_bundle_passes_the_fhir_validator() {
    let dir = tempfile::tempdir().unwrap();
    let bundles = rendered();
    for (name, b) in &bundles {
        let path = dir.path().join(format!("{name}.json"));
        std::fs::write(path, serde_json::to_vec_pretty(b).unwrap()).unwrap();
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = std::env::var_os("FHIR_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target/fhir-venv/bin/python"));
    assert!(
        python.exists(),
        "{} is missing: run `make test` (it installs tests/fhir/requirements.txt) or set FHIR_PYTHON",
        python.display()
    );
    let output = std::process::Command::new(python)
        .arg(root.join("tests/fhir/validate.py"))
        .arg(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{text}");
    assert_eq!(text.matches("OK ").count(), bundles.len(), "{text}");
}

fn walk(v: Value, table: &Value, problems: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            let system = map
                .get("system")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if let Some(code) = map.get("code").and_then(Value::as_str) {
                let known = &table[system][code];
                let display = map.get("display");
                if known.is_null() {
                    problems.push(format!("{system}|{code} is not in the table"));
                } else if system != UCUM && display.is_some_and(|d| d != known) {
                    problems.push(format!(
                        "{system}|{code}: display {display:?}, table {known}"
                    ));
                }
            }
            map.into_iter().for_each(|(_, v)| walk(v, table, problems));
        }
        Value::Array(items) => items.into_iter().for_each(|v| walk(v, table, problems)),
        _ => {}
    }
}
