//! A model's manifest and the input contract it defines. Inputs that do not fit are refused with
//! every offending field named; nothing is silently dropped, filled or coerced.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashSet};

/// What `manifest.json` beside each bundled ONNX file says. It is the model's contract.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub name: String,
    pub version: String,
    pub modality: String,
    pub task: String,
    pub title: String,
    pub onnx: OnnxSpec,
    pub inputs: Vec<InputSpec>,
    pub labels: Vec<String>,
    pub positive_label: String,
    pub threshold: Threshold,
    pub cohort: Cohort,
    pub metrics: Value,
    pub intended_use: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OnnxSpec {
    pub file: String,
    pub sha256: String,
    pub input: String,
    pub output: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InputSpec {
    pub name: String,
    pub unit: String,
    pub description: String,
    /// Values outside this range are impossible and refused; `None` is unbounded.
    pub physical_range: [Option<f64>; 2],
    /// Values outside this range are accepted but flagged: the model never saw them.
    pub training_range: [f64; 2],
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Threshold {
    pub value: f64,
    pub source: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cohort {
    pub name: String,
    pub loader: String,
    pub n: u32,
    pub positives: u32,
    pub citation: String,
    pub source: String,
    pub licence: String,
}

/// One way in which a request breaks the contract.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct FieldError {
    /// Dotted path of the offending field, e.g. `features.mean_radius`.
    pub field: String,
    /// Machine-readable rule: `unknown`, `missing`, `not_a_number`, `not_finite`, `out_of_range`, …
    pub rule: &'static str,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, rule: &'static str, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            rule,
            message: message.into(),
        }
    }
}

/// A value the model accepts but was never trained on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RangeFlag {
    pub feature: String,
    pub value: f64,
    pub training_range: [f64; 2],
}

/// Features that passed the contract, in the model's input order.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidFeatures {
    pub values: Vec<f64>,
    pub outside_training_range: Vec<RangeFlag>,
    /// sha256 of the canonical form (keys sorted, numbers as JSON), identical for identical inputs.
    pub digest: String,
}

impl Manifest {
    /// A manifest that contradicts itself would make every result wrong; refuse it at load.
    pub fn check(&self) -> Result<(), String> {
        let mut seen = HashSet::new();
        if let Some(dup) = self.inputs.iter().find(|i| !seen.insert(i.name.as_str())) {
            return Err(format!("input {} is listed twice", dup.name));
        }
        if self.inputs.is_empty() {
            return Err("lists no inputs".into());
        }
        if !self.labels.contains(&self.positive_label) {
            return Err(format!(
                "positive label {} is not among its labels",
                self.positive_label
            ));
        }
        if !(self.threshold.value > 0.0 && self.threshold.value < 1.0) {
            return Err(format!(
                "threshold {} is not inside (0, 1)",
                self.threshold.value
            ));
        }
        Ok(())
    }

    /// Checks `features` against the contract and returns every violation, not just the first, so an
    /// integrator fixes a mapping in one round trip.
    pub fn validate_features(
        &self,
        features: &Map<String, Value>,
    ) -> Result<ValidFeatures, Vec<FieldError>> {
        let mut errors: Vec<FieldError> = features
            .keys()
            .filter(|k| !self.inputs.iter().any(|i| &i.name == *k))
            .map(|k| {
                FieldError::new(
                    format!("features.{k}"),
                    "unknown",
                    format!(
                        "{k} is not an input of {}; see GET /v1/models/{}",
                        self.name, self.name
                    ),
                )
            })
            .collect();
        let mut values = Vec::with_capacity(self.inputs.len());
        let mut flags = Vec::new();
        for spec in &self.inputs {
            let field = format!("features.{}", spec.name);
            match features.get(&spec.name).map(|v| number(v)) {
                None => errors.push(FieldError::new(
                    field,
                    "missing",
                    format!("{} is required", spec.name),
                )),
                Some(Err(e)) => errors.push(FieldError::new(field, e.0, e.1)),
                Some(Ok(v)) => match spec.physical_range {
                    [Some(lo), _] if v < lo => errors.push(FieldError::new(
                        field,
                        "out_of_range",
                        format!("{} must be at least {lo} {}, got {v}", spec.name, spec.unit),
                    )),
                    [_, Some(hi)] if v > hi => errors.push(FieldError::new(
                        field,
                        "out_of_range",
                        format!("{} must be at most {hi} {}, got {v}", spec.name, spec.unit),
                    )),
                    _ => {
                        let [lo, hi] = spec.training_range;
                        if v < lo || v > hi {
                            flags.push(RangeFlag {
                                feature: spec.name.clone(),
                                value: v,
                                training_range: [lo, hi],
                            });
                        }
                        values.push(v);
                    }
                },
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let canonical: BTreeMap<&str, f64> = self
            .inputs
            .iter()
            .map(|i| i.name.as_str())
            .zip(values.iter().copied())
            .collect();
        let bytes = serde_json::to_vec(&canonical).unwrap_or_default();
        Ok(ValidFeatures {
            values,
            outside_training_range: flags,
            digest: hex::encode(Sha256::digest(&bytes)),
        })
    }
}

/// A numeric input must be a JSON number. Strings are refused, even numeric-looking ones, because
/// silently parsing "1,5" or "12 mm" is how unit mistakes get in; "NaN" and "Infinity" get their own rule.
fn number(value: &Value) -> Result<f64, (&'static str, String)> {
    match value {
        Value::Number(n) => match n.as_f64() {
            Some(v) if v.is_finite() => Ok(v),
            _ => Err(("not_finite", format!("{n} is not a finite number"))),
        },
        Value::String(s) if s.trim().parse::<f64>().is_ok_and(|v| !v.is_finite()) => {
            Err(("not_finite", format!("{s:?} is not a finite number")))
        }
        other => Err((
            "not_a_number",
            format!("expected a number, got {}", kind(other)),
        )),
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn manifest() -> Manifest {
        serde_json::from_value(json!({
            "name": "m", "version": "1", "modality": "features", "task": "classification", "title": "t",
            "onnx": {"file": "m.onnx", "sha256": "00", "input": "x", "output": "p"},
            "inputs": [
                {"name": "a", "unit": "mm", "description": "", "physical_range": [0.0, null], "training_range": [1.0, 2.0]},
                {"name": "b", "unit": "1", "description": "", "physical_range": [null, null], "training_range": [0.0, 1.0]}
            ],
            "labels": ["neg", "pos"], "positive_label": "pos",
            "threshold": {"value": 0.5, "source": "s"},
            "cohort": {"name": "c", "loader": "l", "n": 1, "positives": 1, "citation": "c", "source": "s", "licence": "l"},
            "metrics": {}, "intended_use": "research"
        }))
        .expect("test manifest")
    }

    fn rules(input: Value) -> Vec<(String, &'static str)> {
        let map = input.as_object().cloned().unwrap_or_default();
        match manifest().validate_features(&map) {
            Ok(_) => vec![],
            Err(errors) => errors.into_iter().map(|e| (e.field, e.rule)).collect(),
        }
    }

    #[test]
    fn valid_features_come_back_in_model_order() {
        let ok =
            manifest().validate_features(json!({"b": 0.5, "a": 1.5}).as_object().expect("map"));
        assert_eq!(ok.map(|v| v.values), Ok(vec![1.5, 0.5]));
    }

    #[test]
    fn every_violation_is_named() {
        assert_eq!(
            rules(json!({"a": "1.5", "c": 1})),
            vec![
                ("features.c".into(), "unknown"),
                ("features.a".into(), "not_a_number"),
                ("features.b".into(), "missing")
            ]
        );
    }

    #[test]
    fn nan_and_infinity_strings_are_not_finite() {
        assert_eq!(
            rules(json!({"a": "NaN", "b": 0.5})),
            vec![("features.a".into(), "not_finite")]
        );
        assert_eq!(
            rules(json!({"a": 1.5, "b": "-Infinity"})),
            vec![("features.b".into(), "not_finite")]
        );
    }

    #[test]
    fn impossible_values_are_refused_and_unseen_ones_flagged() {
        assert_eq!(
            rules(json!({"a": -1.0, "b": 0.5})),
            vec![("features.a".into(), "out_of_range")]
        );
        let flagged =
            manifest().validate_features(json!({"a": 9.0, "b": 0.5}).as_object().expect("map"));
        assert_eq!(flagged.map(|v| v.outside_training_range.len()), Ok(1));
    }

    #[test]
    fn digest_ignores_key_order() {
        let m = manifest();
        let one = m.validate_features(json!({"a": 1.5, "b": 0.5}).as_object().expect("map"));
        let two = m.validate_features(json!({"b": 0.5, "a": 1.5}).as_object().expect("map"));
        assert_eq!(one.map(|v| v.digest), two.map(|v| v.digest));
    }

    #[test]
    fn manifest_whose_positive_label_is_missing_is_refused() {
        let mut m = manifest();
        m.positive_label = "other".into();
        assert!(m.check().is_err());
    }
}
