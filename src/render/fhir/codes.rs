//! The code systems, codes and units the FHIR rendering uses, and small builders for codings and
//! quantities. Every code emitted is listed here or in `LOCAL`; `tests/fhir/codes.json` lists the
//! same codes for the external validator, and a unit test keeps the two in step.

use serde_json::{Value, json};

pub const LOINC: &str = "http://loinc.org";
pub const SNOMED: &str = "http://snomed.info/sct";
pub const UCUM: &str = "http://unitsofmeasure.org";
pub const DIAGNOSTIC_SERVICE: &str = "http://terminology.hl7.org/CodeSystem/v2-0074";
pub const OBSERVATION_CATEGORY: &str = "http://terminology.hl7.org/CodeSystem/observation-category";
pub const INTERPRETATION: &str =
    "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation";
pub const DATA_ABSENT: &str = "http://terminology.hl7.org/CodeSystem/data-absent-reason";
/// onkos's own code system, for the outputs no standard terminology has a concept for.
pub const ONKOS: &str = "https://onkos.dev/fhir/CodeSystem/onkos";
/// Identifier system of a model's ONNX file digest (lower-case hex sha256).
pub const ONNX_SHA256: &str = "https://onkos.dev/fhir/sid/onnx-sha256";

/// The local codes and their displays.
pub const LOCAL: &[(&str, &str)] = &[
    ("model-analysis", "Analysis by an onkos model"),
    ("model-output", "Output of an onkos model (research use)"),
    ("inference-service", "onkos inference service"),
    ("ai-model", "AI model"),
    ("class-probability", "Class probability"),
    ("class", "Class"),
    ("decision", "Decision at the model's threshold"),
    ("decision-threshold", "Decision threshold"),
    (
        "score-contributions",
        "Score contributions of a linear model",
    ),
    ("feature-contribution", "Feature contribution"),
    ("risk-score", "Risk score (log hazard ratio)"),
    ("hazard-ratio", "Hazard ratio"),
    (
        "cohort-percentile",
        "Percentile of the risk score in the training cohort",
    ),
    (
        "survival-probability",
        "Event-free probability at a horizon",
    ),
    ("horizon", "Horizon"),
    ("tissue-fraction", "Tissue fraction of the slide"),
    ("tiles-analysed", "Tiles analysed"),
    ("tiles-in-grid", "Tiles in the grid"),
    ("mpp-used", "Resolution used (micrometres per pixel)"),
    ("slide-measurement", "Slide measurement"),
];

pub fn coding(system: &str, code: &str, display: &str) -> Value {
    json!({"system": system, "code": code, "display": display})
}

/// A local code; its display comes from `LOCAL` (a code missing there is a bug the tests catch).
pub fn local(code: &str) -> Value {
    let display = LOCAL
        .iter()
        .find(|(c, _)| *c == code)
        .map_or(code, |(_, d)| d);
    coding(ONKOS, code, display)
}

/// A CodeableConcept of one local code and a text saying what exactly was observed.
pub fn local_concept(code: &str, text: impl Into<String>) -> Value {
    json!({"coding": [local(code)], "text": text.into()})
}

/// `laboratory` fits outputs computed from pathology material (FNA images, slides); every output
/// also carries the local `model-output` category, so a reader can tell model outputs apart.
pub fn observation_categories(pathology: bool) -> Value {
    let mut categories = vec![json!({"coding": [local("model-output")]})];
    if pathology {
        categories
            .push(json!({"coding": [coding(OBSERVATION_CATEGORY, "laboratory", "Laboratory")]}));
    }
    Value::Array(categories)
}

pub fn report_categories(pathology: bool) -> Value {
    let mut categories = vec![json!({"coding": [local("model-output")]})];
    if pathology {
        categories.push(json!({"coding": [coding(
            DIAGNOSTIC_SERVICE,
            "PAT",
            "Pathology (gross & histopath, not surgical)"
        )]}));
    }
    Value::Array(categories)
}

/// A class label as a concept: SNOMED CT morphologies for the labels that name one (the WDBC
/// models' `malignant`/`benign`), the label as text otherwise.
pub fn class_concept(label: &str) -> Value {
    let coded = match label.to_ascii_lowercase().as_str() {
        "malignant" => Some((
            "367651003",
            "Malignant neoplasm of primary, secondary, or uncertain origin (morphologic abnormality)",
        )),
        "benign" => Some(("3898006", "Neoplasm, benign (morphologic abnormality)")),
        _ => None,
    };
    match coded {
        Some((code, display)) => json!({"coding": [coding(SNOMED, code, display)], "text": label}),
        None => json!({"text": label}),
    }
}

/// `POS` when the decision is the positive label, `NEG` otherwise.
pub fn interpretation(positive: bool) -> Value {
    let (code, display) = if positive {
        ("POS", "Positive")
    } else {
        ("NEG", "Negative")
    };
    json!([{"coding": [coding(INTERPRETATION, code, display)]}])
}

/// The UCUM code of a manifest's free-text unit, when it is one onkos knows to be dimensionless
/// or a plain UCUM unit; other units are rendered as text only.
pub fn ucum(unit: &str) -> Option<&'static str> {
    let unit = unit.trim().to_ascii_lowercase();
    match unit.as_str() {
        "1" | "probability" | "fraction" | "fraction of tiles" | "ratio" => Some("1"),
        "%" | "percent" => Some("%"),
        "um" | "µm" | "micrometre" | "micrometer" => Some("um"),
        // An optical density is the log of a ratio of intensities: dimensionless.
        u if u.starts_with("optical density") => Some("1"),
        _ => None,
    }
}

/// The value of an Observation or component: a Quantity, or a `dataAbsentReason` when there is no
/// finite number (FHIR decimals cannot say NaN, and a missing value must say why).
pub fn value(number: Option<f64>, unit: &str, code: Option<&str>) -> (&'static str, Value) {
    match number.filter(|v| v.is_finite()) {
        Some(v) => {
            let mut quantity = json!({"value": v, "unit": unit});
            if let Some(code) = code {
                quantity["system"] = json!(UCUM);
                quantity["code"] = json!(code);
            }
            ("valueQuantity", quantity)
        }
        None => (
            "dataAbsentReason",
            json!({"coding": [coding(DATA_ABSENT, "not-applicable", "Not Applicable")]}),
        ),
    }
}

/// A probability or other dimensionless number, UCUM `1`.
pub fn unitless(number: f64) -> (&'static str, Value) {
    value(Some(number), "1", Some("1"))
}

pub fn component(code: Value, value: (&'static str, Value)) -> Value {
    let mut component = json!({"code": code});
    component[value.0] = value.1;
    component
}
