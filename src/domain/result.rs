//! The structured results, versioned so that clients can rely on their shape: a classification
//! (probabilities and a decision at the documented threshold) or a survival estimate (risk score,
//! hazard ratio, cohort percentile and survival at each horizon), each with an explanation for
//! linear models and a flag for every input outside the training range.

use super::contract::{Manifest, RangeFlag};
use serde::{Deserialize, Serialize};

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
    pub positive_label: String,
    /// Probability of the positive label.
    pub probability: f64,
    pub threshold: f64,
    pub threshold_source: String,
    /// `probability - threshold`: negative below the threshold, small near it.
    pub margin: f64,
}

/// One feature's share of the score: (value − training mean) × coefficient.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Contribution {
    /// The input, or `input=level` for a categorical indicator.
    pub feature: String,
    /// The encoded value (1 or 0 for an indicator).
    pub value: f64,
    pub mean: f64,
    pub coefficient: f64,
    pub contribution: f64,
}

/// Why a linear model scored as it did, largest contributions first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Explanation {
    /// `log-odds` (classification) or `log-hazard` (survival).
    pub scale: String,
    /// The contributions are relative to a patient with the training cohort's mean values.
    pub reference: String,
    pub contributions: Vec<Contribution>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ClassificationResult {
    /// Always `onkos.result.classification/1` for this shape.
    pub schema: String,
    pub predictions: Vec<Prediction>,
    pub decision: Decision,
    /// Present for linear models.
    pub explanation: Option<Explanation>,
    /// Inputs outside the range the model was trained on: the result is an extrapolation there.
    pub out_of_training_range: Vec<RangeFlag>,
    /// MIL models: the bag of tile embeddings that was classified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bag: Option<Box<BagSummary>>,
    /// MIL models run on a slide: what the encoder looked at, and where the time went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slide: Option<Box<SlideSummary>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stages: Option<Box<SlideStages>>,
    /// What the model may be used for; no result claims more than its card.
    pub intended_use: String,
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
    /// The linear predictor: log hazard ratio versus a patient with the cohort's mean covariates.
    pub score: f64,
    /// `exp(score)`: hazard relative to that mean patient.
    pub hazard_ratio: f64,
    /// Percentage of the training cohort with a lower risk score (0–100).
    pub cohort_percentile: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SurvivalPoint {
    pub days: f64,
    /// Estimated probability of being free of the event at `days`.
    pub probability: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SurvivalResult {
    /// Always `onkos.result.survival/1` for this shape.
    pub schema: String,
    /// The event the model estimates, e.g. "recurrence or death".
    pub event: String,
    pub risk: Risk,
    pub survival: Vec<SurvivalPoint>,
    pub explanation: Option<Explanation>,
    pub out_of_training_range: Vec<RangeFlag>,
    pub intended_use: String,
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
    use super::percentile;

    #[test]
    fn percentiles_interpolate_and_clamp() {
        let cohort: Vec<f64> = (0..=100).map(f64::from).collect();
        assert_eq!(percentile(&cohort, 42.5), 42.5);
        assert_eq!(percentile(&cohort, -3.0), 0.0);
        assert_eq!(percentile(&cohort, 1e9), 100.0);
    }
}
