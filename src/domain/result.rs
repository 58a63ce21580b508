//! The structured result of a classification, versioned so that clients can rely on its shape.

use super::contract::{Manifest, RangeFlag};
use serde::{Deserialize, Serialize};

/// The version of the result document; bumped on any change a client could notice.
pub const CLASSIFICATION_SCHEMA: &str = "onkos.result.classification/1";

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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ClassificationResult {
    /// Always `onkos.result.classification/1` for this shape.
    pub schema: String,
    pub predictions: Vec<Prediction>,
    pub decision: Decision,
    /// Inputs outside the range the model was trained on: the result is an extrapolation there.
    pub out_of_training_range: Vec<RangeFlag>,
    /// What the model may be used for; no result claims more than its card.
    pub intended_use: String,
}

impl ClassificationResult {
    /// Builds the result from the model's probability row (one per label, in manifest order).
    pub fn from_probabilities(
        manifest: &Manifest,
        row: &[f32],
        flags: Vec<RangeFlag>,
    ) -> Result<Self, String> {
        if row.len() != manifest.labels.len() {
            return Err(format!(
                "model returned {} probabilities for {} labels",
                row.len(),
                manifest.labels.len()
            ));
        }
        let predictions: Vec<Prediction> = manifest
            .labels
            .iter()
            .zip(row)
            .map(|(label, p)| Prediction {
                label: label.clone(),
                probability: f64::from(*p),
            })
            .collect();
        let positive = predictions
            .iter()
            .find(|p| p.label == manifest.positive_label)
            .map(|p| p.probability)
            .ok_or("positive label missing from the model's labels")?;
        let threshold = manifest.threshold.value;
        let label = if positive >= threshold {
            manifest.positive_label.clone()
        } else {
            // With two labels the other one is the negative; with more, the most probable non-positive.
            predictions
                .iter()
                .filter(|p| p.label != manifest.positive_label)
                .max_by(|a, b| a.probability.total_cmp(&b.probability))
                .map(|p| p.label.clone())
                .unwrap_or_default()
        };
        Ok(Self {
            schema: CLASSIFICATION_SCHEMA.into(),
            predictions,
            decision: Decision {
                label,
                positive_label: manifest.positive_label.clone(),
                probability: positive,
                threshold,
                threshold_source: manifest.threshold.source.clone(),
                margin: positive - threshold,
            },
            out_of_training_range: flags,
            intended_use: manifest.intended_use.clone(),
        })
    }
}
