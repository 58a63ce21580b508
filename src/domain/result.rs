//! The structured results, versioned so that clients can rely on their shape: a classification
//! (probabilities and a decision at the documented threshold) or a survival estimate (risk score,
//! hazard ratio, cohort percentile and survival at each horizon), each with an explanation for
//! linear models and a flag for every input outside the training range.

use super::contract::{Manifest, RangeFlag};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// Versions of the result documents; bumped on any change a client could notice.
pub const CLASSIFICATION_SCHEMA: &str = "onkos.result.classification/1";
pub const SURVIVAL_SCHEMA: &str = "onkos.result.survival/1";
pub const SLIDE_SCHEMA: &str = "onkos.result.slide/1";

/// What a slide analysis looked at.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SlideSummary {
    pub id: uuid::Uuid,
    /// Share of the slide's area that the tissue mask counts as tissue.
    pub tissue_fraction: f64,
    /// Grid tiles with enough tissue, each read, run and scored.
    pub tiles_analysed: usize,
    /// All whole tiles of the grid over the slide.
    pub tiles_in_grid: usize,
    /// µm per level-0 pixel used to lay the grid, and where it came from (`file` or `request`).
    pub mpp_used: f64,
    pub mpp_source: String,
    /// The model's resolution: tiles were read at `level_used` and resized to it.
    pub model_mpp: f64,
    pub level_used: usize,
    pub level_downsample: f64,
    pub tile_size: u32,
    pub tile_size_level0: f64,
    /// The reader that read the pixels: `onkos-tiff` or `onkos-dicom` (onkos's own tile reader)
    /// or `openslide-<version>` (OpenSlide, in an isolated process).
    pub reader: String,
    /// Models that stain-normalise: the slide's own stains as estimated from its tissue, which
    /// every tile was re-rendered from into the model's target stains.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stain_normalisation: Option<crate::slides::stain::Estimate>,
    /// Tile encoders: the bag of the analysed tiles' embeddings (`GET /v1/embeddings/{id}`), the
    /// input of MIL models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embeddings: Option<uuid::Uuid>,
}

/// One slide-level measure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Measurement {
    pub name: String,
    /// Absent when no analysed tile had tissue in the model's eyes.
    pub value: Option<f64>,
    pub unit: String,
    pub description: String,
    /// How the tiles were summed up, as the manifest says (`{"kind": "tissue_weighted_mean"}`, …).
    #[schema(value_type = Object)]
    pub aggregation: serde_json::Value,
}

/// Milliseconds per stage (decoding overlaps inference; each is its own total).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SlideStages {
    pub open_ms: f64,
    pub mask_ms: f64,
    pub read_decode_ms: f64,
    pub infer_ms: f64,
    pub aggregate_ms: f64,
    pub total_ms: f64,
    pub tiles_per_second: f64,
}

/// One of the tiles that scored highest on the heatmap measure: where to look.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Evidence {
    /// 1 = highest; its crop is `GET /v1/analyses/{id}/evidence/{rank}.jpg`.
    pub rank: usize,
    /// Top-left corner and side, in level-0 pixels.
    pub x: i32,
    pub y: i32,
    pub size: f64,
    pub measure: String,
    pub value: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SlideResult {
    pub schema: String,
    pub slide: SlideSummary,
    pub measurements: Vec<Measurement>,
    /// The highest-scoring tiles on the heatmap measure, highest first.
    pub evidence: Vec<Evidence>,
    pub stages: SlideStages,
    pub intended_use: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Prediction {
    pub label: String,
    pub probability: f64,
}

/// The decision at the model's documented threshold, and how far from it the probability sits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Decision {
    /// The label reported: the positive label when its probability reaches the threshold.
    pub label: String,
    /// `probability - threshold`: negative below the threshold, small near it.
    pub margin: f64,
    pub positive_label: String,
    /// Probability of the positive label.
    pub probability: f64,
    pub threshold: f64,
    pub threshold_source: String,
}

/// One feature's share of the score: (value − training mean) × coefficient.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Contribution {
    pub coefficient: f64,
    pub contribution: f64,
    /// The input, or `input=level` for a categorical indicator.
    pub feature: String,
    pub mean: f64,
    /// The encoded value (1 or 0 for an indicator).
    pub value: f64,
}

/// Why a linear model scored as it did, largest contributions first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Explanation {
    pub contributions: Vec<Contribution>,
    /// The contributions are relative to a patient with the training cohort's mean values.
    pub reference: String,
    /// `log-odds` (classification) or `log-hazard` (survival).
    pub scale: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ClassificationResult {
    /// MIL models: the bag of tile embeddings that was classified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bag: Option<Box<BagSummary>>,
    pub decision: Decision,
    /// Present for linear models.
    pub explanation: Option<Explanation>,
    /// What the model may be used for; no result claims more than its card.
    pub intended_use: String,
    /// Inputs outside the range the model was trained on: the result is an extrapolation there.
    pub out_of_training_range: Vec<RangeFlag>,
    pub predictions: Vec<Prediction>,
    /// Always `onkos.result.classification/1` for this shape.
    pub schema: String,
    /// MIL models run on a slide: what the encoder looked at, and where the time went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slide: Option<Box<SlideSummary>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stages: Option<Box<SlideStages>>,
}

/// The per-tile measure of a MIL analysis: the head's attention weight.
pub const ATTENTION: &str = "attention";

/// What a MIL analysis looked at: one slide's tile embeddings, and the tiles its head attended to
/// most.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BagSummary {
    pub embeddings: uuid::Uuid,
    pub tiles: usize,
    pub dim: usize,
    /// The encoder the model takes embeddings from (its manifest); onkos checks the width only.
    pub encoder: String,
    /// Highest attention first (at most 8), when the head gives attention.
    pub attention: Vec<AttendedTile>,
}

/// One of the tiles a MIL head attended to most.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AttendedTile {
    pub rank: usize,
    /// Row of the tile in the uploaded `embeddings`.
    pub index: usize,
    /// The tile's level-0 position, when the upload had `coords`.
    pub x: Option<f64>,
    pub y: Option<f64>,
    pub weight: f64,
}

/// The risk score and where it sits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Risk {
    /// Percentage of the training cohort with a lower risk score (0–100).
    pub cohort_percentile: f64,
    /// `exp(score)`: hazard relative to that mean patient.
    pub hazard_ratio: f64,
    /// The linear predictor: log hazard ratio versus a patient with the cohort's mean covariates.
    pub score: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SurvivalPoint {
    pub days: f64,
    /// Estimated probability of being free of the event at `days`.
    pub probability: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SurvivalResult {
    /// The event the model estimates, e.g. "recurrence or death".
    pub event: String,
    pub explanation: Option<Explanation>,
    pub intended_use: String,
    pub out_of_training_range: Vec<RangeFlag>,
    pub risk: Risk,
    /// Always `onkos.result.survival/1` for this shape.
    pub schema: String,
    pub survival: Vec<SurvivalPoint>,
}

/// The result as its canonical JSON text, the form it is stored, digested and answered in
/// ([`crate::domain::provenance::canonical_json`]). A feature model's result (classification or
/// survival) is written straight from the typed result: those types declare their fields in key
/// order, so serde already writes them sorted (a test holds them to it), and no `Value` tree is
/// built. Other shapes, and a result with a number the canonical form writes differently (a
/// negative zero, or an exponent: `1e+16`), take the long way through a sorted `Value`.
pub fn canonical_text(result: &AnalysisResult) -> Result<Box<RawValue>, String> {
    let key_ordered = match result {
        AnalysisResult::Classification(c) => {
            c.bag.is_none() && c.slide.is_none() && c.stages.is_none()
        }
        AnalysisResult::Survival(_) => true,
        AnalysisResult::Slide(_) => false,
    };
    // `to_raw_value` takes what serde_json wrote as it is; `RawValue::from_string` would parse the
    // whole text again to check it.
    let text = serde_json::value::to_raw_value(result).map_err(|e| e.to_string())?;
    if key_ordered && !has_negative_zero(text.get()) && !text.get().contains("e+") {
        return Ok(text);
    }
    let tree = serde_json::to_value(result).map_err(|e| e.to_string())?;
    Ok(crate::domain::provenance::canonical_text(&tree))
}

/// Whether serde_json wrote a negative zero (`-0.0` not followed by more digits) anywhere in
/// `text`; a string that happens to contain one only costs the long way.
fn has_negative_zero(text: &str) -> bool {
    text.match_indices("-0.0")
        .any(|(i, _)| !text.as_bytes().get(i + 4).is_some_and(u8::is_ascii_digit))
}

/// A stored result: one of the two shapes, told apart by their fields (and `schema`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum AnalysisResult {
    Classification(ClassificationResult),
    Survival(SurvivalResult),
    Slide(SlideResult),
}

/// The model's raw outputs for one row, by meaning.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelOutputs {
    pub probabilities: Option<Vec<f64>>,
    pub risk_score: Option<f64>,
    pub survival: Option<Vec<f64>>,
}

/// Builds the result of one row from the model's outputs, its encoded input and its range flags.
pub fn build(
    manifest: &Manifest,
    outputs: &ModelOutputs,
    encoded: &[f64],
    flags: Vec<RangeFlag>,
) -> Result<AnalysisResult, String> {
    // A non-finite output would read as a confident answer (NaN fails every threshold test).
    let mut values = outputs
        .probabilities
        .iter()
        .flatten()
        .chain(&outputs.risk_score)
        .chain(outputs.survival.iter().flatten());
    if values.any(|v| !v.is_finite()) {
        return Err("the model returned a value that is not a finite number for this input".into());
    }
    let explanation = explain(manifest, encoded);
    let intended_use = manifest.intended_use.clone();
    if let Some(spec) = &manifest.classification {
        let row = outputs
            .probabilities
            .as_ref()
            .ok_or("the model returned no probabilities")?;
        if row.len() != spec.labels.len() {
            return Err(format!(
                "model returned {} probabilities for {} labels",
                row.len(),
                spec.labels.len()
            ));
        }
        let predictions: Vec<Prediction> = spec
            .labels
            .iter()
            .zip(row)
            .map(|(label, p)| Prediction {
                label: label.clone(),
                probability: *p,
            })
            .collect();
        let positive = predictions
            .iter()
            .find(|p| p.label == spec.positive_label)
            .map(|p| p.probability)
            .ok_or("positive label missing")?;
        let threshold = spec.threshold.value;
        let label = if positive >= threshold {
            spec.positive_label.clone()
        } else {
            // With two labels the other one is the negative; with more, the most probable non-positive.
            predictions
                .iter()
                .filter(|p| p.label != spec.positive_label)
                .max_by(|a, b| a.probability.total_cmp(&b.probability))
                .map(|p| p.label.clone())
                .unwrap_or_default()
        };
        return Ok(AnalysisResult::Classification(ClassificationResult {
            schema: CLASSIFICATION_SCHEMA.into(),
            predictions,
            decision: Decision {
                label,
                positive_label: spec.positive_label.clone(),
                probability: positive,
                threshold,
                threshold_source: spec.threshold.source.clone(),
                margin: positive - threshold,
            },
            explanation,
            out_of_training_range: flags,
            bag: None,
            slide: None,
            stages: None,
            intended_use,
        }));
    }
    let spec = manifest
        .survival
        .as_ref()
        .ok_or("the manifest has neither classification nor survival")?;
    let score = outputs
        .risk_score
        .ok_or("the model returned no risk score")?;
    let curve = outputs
        .survival
        .as_ref()
        .ok_or("the model returned no survival")?;
    if curve.len() != spec.horizons_days.len() {
        return Err(format!(
            "model returned {} survival values for {} horizons",
            curve.len(),
            spec.horizons_days.len()
        ));
    }
    Ok(AnalysisResult::Survival(SurvivalResult {
        schema: SURVIVAL_SCHEMA.into(),
        event: spec.event.clone(),
        risk: Risk {
            score,
            hazard_ratio: score.exp(),
            cohort_percentile: percentile(&spec.risk_score_percentiles, score),
        },
        survival: spec
            .horizons_days
            .iter()
            .zip(curve)
            .map(|(d, p)| SurvivalPoint {
                days: *d,
                probability: *p,
            })
            .collect(),
        explanation,
        out_of_training_range: flags,
        intended_use,
    }))
}

/// Contributions of a linear model, largest magnitude first; `None` for other models.
fn explain(manifest: &Manifest, encoded: &[f64]) -> Option<Explanation> {
    let linear = manifest
        .explanation
        .as_ref()
        .filter(|e| e.kind == "linear")?;
    let mut contributions: Vec<Contribution> = manifest
        .column_labels()
        .into_iter()
        .zip(encoded)
        .zip(linear.coefficients.iter().zip(&linear.means))
        .map(|((feature, value), (coefficient, mean))| Contribution {
            feature,
            value: *value,
            mean: *mean,
            coefficient: *coefficient,
            contribution: (value - mean) * coefficient,
        })
        .collect();
    contributions.sort_by(|a, b| b.contribution.abs().total_cmp(&a.contribution.abs()));
    Some(Explanation {
        scale: linear.scale.clone(),
        reference: "a patient with the training cohort's mean values".into(),
        contributions,
    })
}

/// Where `score` falls among the cohort's percentiles (101 values, 0th…100th), interpolated.
fn percentile(cohort: &[f64], score: f64) -> f64 {
    let (Some(first), Some(last)) = (cohort.first(), cohort.last()) else {
        return f64::NAN;
    };
    if score <= *first {
        return 0.0;
    }
    if score >= *last {
        return 100.0;
    }
    let step = 100.0 / (cohort.len() - 1) as f64;
    for (i, pair) in cohort.windows(2).enumerate() {
        if score <= pair[1] {
            let span = pair[1] - pair[0];
            let within = if span > 0.0 {
                (score - pair[0]) / span
            } else {
                0.0
            };
            return (i as f64 + within) * step;
        }
    }
    100.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::provenance::canonical_json;

    /// Every field of the feature models' result shapes present, and one without its optional
    /// explanation (written as null).
    fn feature_results() -> Vec<AnalysisResult> {
        let flags = vec![RangeFlag {
            feature: "age".into(),
            training_range: [30.0, 80.0],
            value: 91.5,
        }];
        let explanation = Some(Explanation {
            contributions: vec![Contribution {
                coefficient: -0.5,
                contribution: 0.25,
                feature: "menostat=Post".into(),
                mean: 0.6,
                value: 1.0,
            }],
            reference: "a patient with the training cohort's mean values".into(),
            scale: "log-odds".into(),
        });
        let classification = ClassificationResult {
            bag: None,
            decision: Decision {
                label: "malignant".into(),
                margin: 0.2,
                positive_label: "malignant".into(),
                probability: 0.7,
                threshold: 0.5,
                threshold_source: "card".into(),
            },
            explanation: explanation.clone(),
            intended_use: "Research use only, not a medical device.".into(),
            out_of_training_range: flags.clone(),
            predictions: vec![Prediction {
                label: "benign".into(),
                probability: 0.3,
            }],
            schema: CLASSIFICATION_SCHEMA.into(),
            slide: None,
            stages: None,
        };
        let survival = SurvivalResult {
            event: "death".into(),
            explanation,
            intended_use: "Research use only, not a medical device.".into(),
            out_of_training_range: flags,
            risk: Risk {
                cohort_percentile: 40.0,
                hazard_ratio: 1.2,
                score: 0.18,
            },
            schema: SURVIVAL_SCHEMA.into(),
            survival: vec![SurvivalPoint {
                days: 365.0,
                probability: 0.8,
            }],
        };
        let plain = ClassificationResult {
            explanation: None,
            ..classification.clone()
        };
        vec![
            AnalysisResult::Classification(classification),
            AnalysisResult::Survival(survival),
            AnalysisResult::Classification(plain),
        ]
    }

    #[test]
    fn feature_results_are_written_in_their_canonical_form() {
        for result in feature_results() {
            let sorted = canonical_json(&serde_json::to_value(&result).expect("a result tree"));
            // The types declare their fields in key order: serde writes them sorted already.
            assert_eq!(
                serde_json::to_string(&result).expect("a result text"),
                String::from_utf8(sorted.clone()).expect("UTF-8"),
                "a result type's fields are not declared in key order"
            );
            let text = canonical_text(&result).expect("a canonical text");
            assert_eq!(text.get().as_bytes(), sorted);
        }
    }

    #[test]
    fn a_negative_zero_is_written_as_the_canonical_form_writes_it() {
        let AnalysisResult::Classification(mut c) = feature_results().remove(0) else {
            unreachable!()
        };
        c.explanation
            .as_mut()
            .expect("an explanation")
            .contributions[0]
            .contribution = -0.0;
        let result = AnalysisResult::Classification(c);
        let text = canonical_text(&result).expect("a canonical text");
        assert!(
            text.get().contains(r#""contribution":0.0"#),
            "{}",
            text.get()
        );
        assert_eq!(
            text.get().as_bytes(),
            canonical_json(&serde_json::to_value(&result).expect("a result tree"))
        );
        // A whole float from 1e16 is written with an exponent, and canonically as an integer.
        let AnalysisResult::Classification(mut c) = feature_results().remove(0) else {
            unreachable!()
        };
        c.out_of_training_range[0].value = 2.5e16;
        let result = AnalysisResult::Classification(c);
        let text = canonical_text(&result).expect("a canonical text");
        assert!(
            text.get().contains(r#""value":25000000000000000"#),
            "{}",
            text.get()
        );
        assert!(has_negative_zero("[1,-0.0]") && has_negative_zero(r#"{"a":-0.0}"#));
        assert!(!has_negative_zero("[-0.05,-0.01e-3,10.0]"));
    }

    #[test]
    fn percentiles_interpolate_and_clamp() {
        let cohort: Vec<f64> = (0..=100).map(f64::from).collect();
        assert_eq!(percentile(&cohort, 42.5), 42.5);
        assert_eq!(percentile(&cohort, -3.0), 0.0);
        assert_eq!(percentile(&cohort, 1e9), 100.0);
    }
}
