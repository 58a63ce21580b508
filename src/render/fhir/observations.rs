//! One Observation per output of a result document: what each says, its code and its unit. The
//! parts every Observation shares (status, subject, times, device, notes) are added by the caller.

use super::codes::{
    class_concept, component, interpretation, local_concept, ucum, unitless, value,
};
use crate::domain::contract::RangeFlag;
use crate::domain::result::{
    ClassificationResult, Explanation, SlideResult, SlideSummary, SurvivalResult,
};
use serde_json::{Value, json};

/// An Observation's own content; `key` names it within the analysis (ids are derived from it) and
/// `derived_from` names the other Observations it was computed from.
#[derive(Debug, Default)]
pub struct Output {
    pub key: String,
    pub code: Value,
    pub value: Option<(&'static str, Value)>,
    pub interpretation: Option<Value>,
    pub components: Vec<Value>,
    pub derived_from: Vec<String>,
    pub notes: Vec<String>,
}

impl Output {
    fn new(key: impl Into<String>, code: Value) -> Self {
        Self {
            key: key.into(),
            code,
            ..Self::default()
        }
    }

    fn with_value(mut self, value: (&'static str, Value)) -> Self {
        self.value = Some(value);
        self
    }
}

pub fn classification(result: &ClassificationResult) -> Vec<Output> {
    let mut outputs: Vec<Output> = result
        .predictions
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut o = Output::new(
                format!("probability/{i}"),
                local_concept("class-probability", format!("Probability of {}", p.label)),
            )
            .with_value(unitless(p.probability));
            o.components.push(json!({
                "code": local_concept("class", "Class"),
                "valueCodeableConcept": class_concept(&p.label),
            }));
            o
        })
        .collect();
    let d = &result.decision;
    let positive_key = result
        .predictions
        .iter()
        .position(|p| p.label == d.positive_label)
        .map(|i| format!("probability/{i}"));
    let mut decision = Output::new(
        "decision",
        local_concept(
            "decision",
            format!("Decision at the threshold for {}", d.positive_label),
        ),
    )
    .with_value(("valueCodeableConcept", class_concept(&d.label)));
    decision.interpretation = Some(interpretation(d.label == d.positive_label));
    decision.components.push(component(
        local_concept(
            "decision-threshold",
            format!("Threshold on the probability of {}", d.positive_label),
        ),
        unitless(d.threshold),
    ));
    decision.derived_from.extend(positive_key);
    decision.notes.push(format!(
        "Probability of {} {:.4} against the threshold {} ({}).",
        d.positive_label, d.probability, d.threshold, d.threshold_source
    ));
    outputs.push(decision);
    if let Some(explanation) = &result.explanation {
        outputs.push(contributions(explanation));
    }
    flag(&mut outputs, &result.out_of_training_range);
    if let Some(slide) = &result.slide {
        outputs.extend(slide_summary(slide));
    } else if let Some(bag) = &result.bag {
        // Uploaded embeddings: the bag's tiles are what the model looked at.
        outputs.push(
            Output::new(
                "slide/tiles-analysed",
                local_concept(
                    "tiles-analysed",
                    "Tiles in the bag of embeddings classified",
                ),
            )
            .with_value(value(Some(bag.tiles as f64), "tiles", Some("{tiles}"))),
        );
    }
    outputs
}

pub fn survival(result: &SurvivalResult) -> Vec<Output> {
    let risk = &result.risk;
    let mut outputs = vec![
        Output::new(
            "risk-score",
            local_concept(
                "risk-score",
                format!("Risk score for {} (log hazard ratio)", result.event),
            ),
        )
        .with_value(unitless(risk.score)),
    ];
    let mut hazard = Output::new(
        "hazard-ratio",
        local_concept(
            "hazard-ratio",
            format!(
                "Hazard ratio for {} versus a patient with the training cohort's mean values",
                result.event
            ),
        ),
    )
    .with_value(unitless(risk.hazard_ratio));
    hazard.derived_from.push("risk-score".into());
    outputs.push(hazard);
    let mut percentile = Output::new(
        "cohort-percentile",
        local_concept(
            "cohort-percentile",
            "Percentage of the training cohort with a lower risk score",
        ),
    )
    .with_value(value(Some(risk.cohort_percentile), "%", Some("%")));
    percentile.derived_from.push("risk-score".into());
    outputs.push(percentile);
    for (i, point) in result.survival.iter().enumerate() {
        let mut o = Output::new(
            format!("survival/{i}"),
            local_concept(
                "survival-probability",
                format!(
                    "Probability of no {} within {} days",
                    result.event, point.days
                ),
            ),
        )
        .with_value(unitless(point.probability));
        // The manifests state horizons in days (`time_unit: days`), so UCUM `d`.
        o.components.push(component(
            local_concept("horizon", "Time from the baseline the inputs describe"),
            value(Some(point.days), "days", Some("d")),
        ));
        o.derived_from.push("risk-score".into());
        outputs.push(o);
    }
    if let Some(explanation) = &result.explanation {
        outputs.push(contributions(explanation));
    }
    flag(&mut outputs, &result.out_of_training_range);
    outputs
}

/// Inputs outside the training range make every output of the row an extrapolation: each says so.
fn flag(outputs: &mut [Output], flags: &[RangeFlag]) {
    if flags.is_empty() {
        return;
    }
    let listed: Vec<String> = flags
        .iter()
        .map(|f| {
            format!(
                "{} = {} (trained on {} to {})",
                f.feature, f.value, f.training_range[0], f.training_range[1]
            )
        })
        .collect();
    let note = format!(
        "Extrapolation: inputs outside the model's training range: {}.",
        listed.join(", ")
    );
    for o in outputs {
        o.notes.push(note.clone());
    }
}

pub fn slide(result: &SlideResult) -> Vec<Output> {
    let mut outputs = slide_summary(&result.slide);
    for (i, m) in result.measurements.iter().enumerate() {
        let mut o = Output::new(
            format!("measurement/{i}"),
            local_concept("slide-measurement", m.name.clone()),
        )
        .with_value(value(m.value, &m.unit, ucum(&m.unit)));
        let kind = m.aggregation.get("kind").and_then(Value::as_str);
        o.notes.push(format!(
            "{}; unit {}; tiles summed up by {}.",
            m.description,
            m.unit,
            kind.unwrap_or("the manifest's aggregation")
        ));
        outputs.push(o);
    }
    outputs
}

fn slide_summary(s: &SlideSummary) -> Vec<Output> {
    let mut tiles = Output::new(
        "slide/tiles-analysed",
        local_concept("tiles-analysed", "Grid tiles with enough tissue, analysed"),
    )
    .with_value(value(
        Some(s.tiles_analysed as f64),
        "tiles",
        Some("{tiles}"),
    ));
    tiles.components.push(component(
        local_concept("tiles-in-grid", "Whole tiles in the grid over the slide"),
        value(Some(s.tiles_in_grid as f64), "tiles", Some("{tiles}")),
    ));
    let mut mpp = Output::new(
        "slide/mpp-used",
        local_concept(
            "mpp-used",
            "Micrometres per level-0 pixel used to lay the grid",
        ),
    )
    .with_value(value(Some(s.mpp_used), "um/pixel", Some("um/{pixel}")));
    mpp.notes.push(format!(
        "Resolution from the {}; tiles read at level {} and resized to the model's {} um/pixel; \
         read by {}. Slide {}.",
        s.mpp_source, s.level_used, s.model_mpp, s.reader, s.id
    ));
    vec![
        Output::new(
            "slide/tissue-fraction",
            local_concept(
                "tissue-fraction",
                "Share of the slide's area the tissue mask counts as tissue",
            ),
        )
        .with_value(unitless(s.tissue_fraction)),
        tiles,
        mpp,
    ]
}

/// A linear model's explanation: one component per feature, on the model's score scale.
fn contributions(explanation: &Explanation) -> Output {
    let mut o = Output::new(
        "contributions",
        local_concept(
            "score-contributions",
            format!(
                "Contributions to the score ({}), relative to {}",
                explanation.scale, explanation.reference
            ),
        ),
    );
    o.components = explanation
        .contributions
        .iter()
        .map(|c| {
            component(
                local_concept("feature-contribution", c.feature.clone()),
                value(Some(c.contribution), &explanation.scale, Some("1")),
            )
        })
        .collect();
    o
}
