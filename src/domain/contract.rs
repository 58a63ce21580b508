//! A model's manifest and the input contract it defines. Inputs that do not fit are refused with
//! every offending field named; nothing is silently dropped, filled or coerced.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashSet};

/// The newest manifest format, which this build reads with the one before it.
pub const MANIFEST_SCHEMA: &str = "onkos.manifest/3";
/// The previous format, still read: /3 only added `slide.normalise.space`. A manifest that uses it
/// says /3, so that a build which does not know it refuses the model instead of feeding it RGB.
pub const MANIFEST_SCHEMA_V2: &str = "onkos.manifest/2";

/// What `manifest.json` beside each ONNX file says. It is the model's contract: what goes in (and
/// how onkos encodes it), what comes out and what it means, and what the model was shown to do.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub schema: String,
    pub name: String,
    pub version: String,
    pub modality: String,
    pub task: Task,
    pub title: String,
    pub onnx: OnnxSpec,
    /// Feature models: the inputs a caller sends (empty for slide models).
    #[serde(default)]
    pub inputs: Vec<InputSpec>,
    /// The ONNX input columns, in order: each a numeric input as is, or a categorical indicator.
    #[serde(default)]
    pub encoding: Vec<EncodedColumn>,
    pub classification: Option<ClassificationSpec>,
    pub survival: Option<SurvivalSpec>,
    pub explanation: Option<LinearExplanation>,
    /// The cohort a learned model was fitted on; absent for a fixed measurement.
    pub cohort: Option<Cohort>,
    pub metrics: Value,
    pub hazard_ratios: Option<Value>,
    pub intended_use: String,
    /// Slide models (`modality: "slide"`): how tiles are cut and what the model measures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slide: Option<SlideSpec>,
    /// Embedding models (`modality: "embeddings"`): a MIL head over one slide's tile embeddings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mil: Option<MilSpec>,
}

/// An attention / multiple-instance (MIL) head over one bag of tile embeddings: float32
/// `[N, embedding_dim]` in, one slide-level output (e.g. `[1, C]` probabilities) out, and
/// optionally one attention weight per tile (CLAM, ABMIL, TransMIL exported to ONNX).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MilSpec {
    /// Width of each tile's embedding.
    pub embedding_dim: usize,
    /// The encoder the embeddings must come from, with its tile size and µm/pixel. onkos checks
    /// the width only: embeddings of another encoder give a meaningless answer.
    pub encoder: String,
    /// The output with one attention weight per tile, when the head has one.
    #[serde(default)]
    pub attention: Option<String>,
    /// A registered tile encoder (a slide model with an `embedding` output of this width): with
    /// it, the model also takes a slide, encodes it and classifies the bag in one analysis.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder_model: Option<String>,
}

/// How a slide model sees a slide: square RGB tiles of `tile_size` pixels at `mpp` µm per pixel,
/// given to the ONNX input as float32 `[N, 3, tile_size, tile_size]` with values 0-255.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SlideSpec {
    pub tile_size: u32,
    /// Micrometres per pixel the model expects; tiles are read from the level closest to it at or
    /// above that resolution and resized, never read at another resolution.
    pub mpp: f64,
    /// A grid tile is analysed when at least this fraction of it is tissue in the slide's mask.
    pub min_tissue: f64,
    /// The per-tile output that says how much of the tile is tissue (the weight of its measures);
    /// without one, every analysed tile weighs 1.
    #[serde(default)]
    pub tissue_output: Option<String>,
    /// How RGB 0-255 becomes the model's input: `(f(value) × scale − mean[c]) / std[c]` per
    /// channel, where `f` is the value itself or its optical density (`space`); e.g. ImageNet's
    /// for a timm or torchvision classifier. Absent: the values as they are.
    #[serde(default)]
    pub normalise: Option<Normalise>,
    #[serde(default)]
    pub measures: Vec<Measure>,
    /// The measure the heatmap shows (empty for an encoder without measures).
    #[serde(default)]
    pub heatmap: String,
    /// Stain normalisation (Macenko) of every tile to the target stains, before `normalise`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stain_normalise: Option<crate::slides::stain::StainSpec>,
    /// An encoder's `[N, D]` per-tile output: a slide analysis then also stores the tiles'
    /// embeddings as a bag (`result.slide.embeddings`) for MIL heads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding: Option<String>,
}

/// One per-tile output of a slide model and how it is summed up over the slide.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Measure {
    pub name: String,
    /// The ONNX output: one value per tile, or `[N, C]` with `column` naming the value (a class's
    /// probability).
    pub output: String,
    #[serde(default)]
    pub column: Option<usize>,
    pub unit: String,
    pub description: String,
    pub aggregation: Aggregation,
}

/// Per-channel input normalisation of a slide model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Normalise {
    pub scale: f32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// What each 0-255 value is before `scale`, `mean` and `std` apply.
    #[serde(default, skip_serializing_if = "PixelSpace::is_rgb")]
    pub space: PixelSpace,
}

/// The space a slide model's input values are in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PixelSpace {
    /// The RGB value itself, 0-255 (the default).
    #[default]
    Rgb,
    /// Its optical density, `−log10((value + 1) / 256)`: the Beer–Lambert absorbance that colour
    /// deconvolution and stain normalisation work in (0 for white, 2.41 for black).
    OpticalDensity,
}

impl PixelSpace {
    pub fn is_rgb(&self) -> bool {
        *self == Self::Rgb
    }
}

/// How per-tile values become one slide-level value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Aggregation {
    /// Mean weighted by each tile's tissue output.
    TissueWeightedMean,
    Mean,
    Max,
    /// Mean of the `k` highest tiles.
    TopKMean {
        k: usize,
    },
    /// Share of tiles whose value is above `threshold`.
    FractionAbove {
        threshold: f64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    Classification,
    Survival,
    /// A measurement (slide models), not a prediction.
    Quantification,
    /// A tile encoder (slide models): embeddings for a MIL head, no prediction of its own.
    Embedding,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InputType {
    Float32,
    Float64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OnnxSpec {
    pub file: String,
    pub sha256: String,
    pub input: String,
    pub input_type: InputType,
    pub outputs: OnnxOutputs,
}

/// Graph output names by meaning.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OnnxOutputs {
    pub probabilities: Option<String>,
    pub risk_score: Option<String>,
    pub survival: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InputSpec {
    pub name: String,
    pub description: String,
    #[serde(flatten)]
    pub kind: InputKind,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum InputKind {
    Numeric {
        unit: String,
        /// Values outside this range are impossible and refused; `None` is unbounded.
        physical_range: [Option<f64>; 2],
        /// Values outside this range are accepted but flagged: the model never saw them.
        training_range: [f64; 2],
    },
    Categorical {
        levels: Vec<String>,
        /// The level without an indicator column (the baseline of the coefficients).
        reference: String,
        #[serde(default)]
        training_counts: BTreeMap<String, u32>,
        /// Where the data set's loader codes the levels as numbers: code → level. Either is accepted;
        /// the level is what is stored.
        #[serde(default)]
        codes: BTreeMap<String, String>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EncodedColumn {
    pub input: String,
    /// For a categorical input: 1.0 when the value is this level, else 0.0.
    pub level: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassificationSpec {
    pub labels: Vec<String>,
    pub positive_label: String,
    pub threshold: Threshold,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SurvivalSpec {
    pub event: String,
    pub time_unit: String,
    pub horizons_days: Vec<f64>,
    pub baseline_survival: Vec<f64>,
    /// The 0th…100th percentiles of the training cohort's risk scores.
    pub risk_score_percentiles: Vec<f64>,
}

/// For linear models: per encoded column, the coefficient per raw unit and the training mean.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinearExplanation {
    pub kind: String,
    /// `log-odds` or `log-hazard`.
    pub scale: String,
    pub coefficients: Vec<f64>,
    pub means: Vec<f64>,
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
    pub positives: Option<u32>,
    pub events: Option<u32>,
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
    pub training_range: [f64; 2],
    pub value: f64,
}

/// Features that passed the contract.
#[derive(Debug, Clone)]
pub struct ValidFeatures {
    /// The inputs as accepted (numbers, level strings) as canonical JSON text: an object with its
    /// keys sorted, as serde_json writes a map. Written once, then digested and stored as it is.
    pub canonical: Box<RawValue>,
    /// The ONNX input row, one value per encoded column.
    pub encoded: Vec<f64>,
    pub outside_training_range: Vec<RangeFlag>,
    /// sha256 of the canonical form (keys sorted, numbers as JSON), identical for identical inputs.
    pub digest: String,
}

impl Manifest {
    /// A manifest that contradicts itself would make every result wrong; refuse it at load.
    pub fn check(&self) -> Result<(), String> {
        if self.schema != MANIFEST_SCHEMA && self.schema != MANIFEST_SCHEMA_V2 {
            return Err(format!(
                "schema is {:?}, this build reads {MANIFEST_SCHEMA:?} and {MANIFEST_SCHEMA_V2:?}",
                self.schema
            ));
        }
        let space = self
            .slide
            .as_ref()
            .and_then(|s| s.normalise.as_ref())
            .map_or(PixelSpace::Rgb, |n| n.space);
        if space != PixelSpace::Rgb && self.schema != MANIFEST_SCHEMA {
            return Err(format!(
                "normalise.space is read from {MANIFEST_SCHEMA:?} manifests on: builds that read only {MANIFEST_SCHEMA_V2:?} would ignore it"
            ));
        }
        match (self.modality.as_str(), &self.slide, &self.mil) {
            ("slide", Some(spec), None) => return self.check_slide(spec),
            ("slide", _, _) => return Err("a slide model needs a slide section (only)".into()),
            ("embeddings", None, Some(spec)) => return self.check_mil(spec),
            ("embeddings", _, _) => {
                return Err("an embeddings model needs a mil section (only)".into());
            }
            ("features", None, None) => {}
            ("features", _, _) => {
                return Err("a feature model has no slide or mil section".into());
            }
            (other, _, _) => {
                return Err(format!(
                    "modality {other:?} is not features, slide or embeddings"
                ));
            }
        }
        let mut seen = HashSet::new();
        if let Some(dup) = self.inputs.iter().find(|i| !seen.insert(i.name.as_str())) {
            return Err(format!("input {} is listed twice", dup.name));
        }
        if self.inputs.is_empty() || self.encoding.is_empty() {
            return Err("lists no inputs".into());
        }
        for column in &self.encoding {
            match (self.input(&column.input).map(|i| &i.kind), &column.level) {
                (None, _) => {
                    return Err(format!("encoding names an unknown input {}", column.input));
                }
                (Some(InputKind::Numeric { .. }), None) => {}
                (Some(InputKind::Categorical { levels, .. }), Some(level))
                    if levels.contains(level) => {}
                _ => {
                    return Err(format!(
                        "encoding column {}={:?} does not fit its input",
                        column.input, column.level
                    ));
                }
            }
        }
        for input in &self.inputs {
            let columns: Vec<&EncodedColumn> = self
                .encoding
                .iter()
                .filter(|c| c.input == input.name)
                .collect();
            match &input.kind {
                InputKind::Numeric { .. } if columns.len() != 1 => {
                    return Err(format!(
                        "numeric input {} must have exactly one encoding column",
                        input.name
                    ));
                }
                InputKind::Categorical {
                    levels,
                    reference,
                    codes,
                    ..
                } => {
                    if !levels.contains(reference) {
                        return Err(format!(
                            "input {}: reference level {reference} is not among its levels",
                            input.name
                        ));
                    }
                    // Exactly one indicator per non-reference level: a missing one would silently
                    // encode that level as the reference.
                    let mut encoded: Vec<&str> =
                        columns.iter().filter_map(|c| c.level.as_deref()).collect();
                    let mut expected: Vec<&str> = levels
                        .iter()
                        .map(String::as_str)
                        .filter(|l| l != reference)
                        .collect();
                    encoded.sort_unstable();
                    expected.sort_unstable();
                    if encoded != expected {
                        return Err(format!(
                            "input {}: the encoding must have one indicator for each level but the reference",
                            input.name
                        ));
                    }
                    if let Some((code, level)) =
                        codes.iter().find(|(_, level)| !levels.contains(level))
                    {
                        return Err(format!(
                            "input {}: code {code} maps to {level}, which is not a level",
                            input.name
                        ));
                    }
                }
                InputKind::Numeric { .. } => {}
            }
        }
        if let Some(e) = &self.explanation
            && (e.coefficients.len() != self.encoding.len() || e.means.len() != self.encoding.len())
        {
            return Err(
                "explanation does not have one coefficient and mean per encoded column".into(),
            );
        }
        match (self.task, &self.classification, &self.survival) {
            (Task::Classification, Some(c), None) => {
                if !c.labels.contains(&c.positive_label) {
                    return Err(format!(
                        "positive label {} is not among its labels",
                        c.positive_label
                    ));
                }
                if !(c.threshold.value > 0.0 && c.threshold.value < 1.0) {
                    return Err(format!(
                        "threshold {} is not inside (0, 1)",
                        c.threshold.value
                    ));
                }
                self.onnx
                    .outputs
                    .probabilities
                    .as_ref()
                    .ok_or("a classifier needs a probabilities output")?;
            }
            (Task::Survival, None, Some(s)) => {
                if s.horizons_days.is_empty() || s.horizons_days.len() != s.baseline_survival.len()
                {
                    return Err("survival needs one baseline survival per horizon".into());
                }
                if s.risk_score_percentiles.len() != 101
                    || s.risk_score_percentiles.windows(2).any(|w| w[0] > w[1])
                {
                    return Err("survival needs the 101 risk-score percentiles of the cohort, in increasing order".into());
                }
                if s.horizons_days.windows(2).any(|w| w[0] >= w[1]) {
                    return Err("survival horizons must increase".into());
                }
                self.onnx
                    .outputs
                    .risk_score
                    .as_ref()
                    .ok_or("a survival model needs a risk_score output")?;
                self.onnx
                    .outputs
                    .survival
                    .as_ref()
                    .ok_or("a survival model needs a survival output")?;
            }
            _ => return Err("task must match exactly one of classification / survival".into()),
        }
        Ok(())
    }

    fn check_mil(&self, spec: &MilSpec) -> Result<(), String> {
        if self.task != Task::Classification || self.classification.is_none() {
            return Err(
                "an embeddings model is a classification with a classification section".into(),
            );
        }
        if self.onnx.outputs.probabilities.is_none() {
            return Err("an embeddings model names its probabilities output".into());
        }
        if self.onnx.input_type != InputType::Float32 {
            return Err("an embeddings model takes float32 embeddings".into());
        }
        if !self.inputs.is_empty() || !self.encoding.is_empty() {
            return Err("an embeddings model takes tile embeddings, not listed inputs".into());
        }
        if !(1..=65_536).contains(&spec.embedding_dim) {
            return Err(format!(
                "embedding_dim {} is not within 1-65536",
                spec.embedding_dim
            ));
        }
        if spec.encoder.trim().is_empty() {
            return Err("mil.encoder must say which encoder the embeddings come from".into());
        }
        Ok(())
    }

    /// Values per row of the ONNX input: the encoded columns, or a MIL head's embedding width.
    pub fn input_width(&self) -> usize {
        self.mil
            .as_ref()
            .map_or(self.encoding.len(), |m| m.embedding_dim)
    }

    fn check_slide(&self, spec: &SlideSpec) -> Result<(), String> {
        if self.task == Task::Survival {
            return Err("slide models are quantifications or tile classifiers".into());
        }
        if let Some(n) = &spec.normalise
            && (!n.scale.is_finite() || n.std.iter().any(|s| !s.is_finite() || *s <= 0.0))
        {
            return Err("normalise needs a finite scale and positive standard deviations".into());
        }
        if !self.inputs.is_empty() || !self.encoding.is_empty() {
            return Err("a slide model takes tiles, not listed inputs".into());
        }
        if let Some(stain) = &spec.stain_normalise {
            if stain.method != "macenko" {
                return Err(format!(
                    "stain_normalise method {:?} is not macenko",
                    stain.method
                ));
            }
            let vectors_ok = stain.target_stains.iter().all(|v| {
                v.iter().all(|c| c.is_finite() && *c >= 0.0) && v.iter().any(|c| *c > 0.0)
            });
            if !vectors_ok || stain.target_max.iter().any(|m| !m.is_finite() || *m <= 0.0) {
                return Err(
                    "stain_normalise needs non-negative target stains and positive target maxima"
                        .into(),
                );
            }
        }
        if !(16..=4096).contains(&spec.tile_size) {
            return Err(format!(
                "tile_size {} is not within 16-4096",
                spec.tile_size
            ));
        }
        if !(spec.mpp.is_finite() && spec.mpp > 0.0) {
            return Err(format!("mpp {} is not a positive number", spec.mpp));
        }
        if !(0.0..=1.0).contains(&spec.min_tissue) {
            return Err("min_tissue is a fraction (0-1)".into());
        }
        if spec.measures.is_empty() && spec.embedding.is_none() {
            return Err("a slide model lists at least one measure or an embedding output".into());
        }
        if (self.task == Task::Embedding) != (spec.embedding.is_some() && spec.measures.is_empty())
        {
            return Err(
                "task embedding is for a tile encoder: an embedding output and no measures".into(),
            );
        }
        let mut seen = HashSet::new();
        for m in &spec.measures {
            if !seen.insert(m.name.as_str()) {
                return Err(format!("measure {} is listed twice", m.name));
            }
            match m.aggregation {
                Aggregation::TopKMean { k: 0 } => {
                    return Err(format!("measure {}: top_k_mean needs k >= 1", m.name));
                }
                Aggregation::FractionAbove { threshold } if !threshold.is_finite() => {
                    return Err(format!("measure {}: the threshold is not a number", m.name));
                }
                _ => {}
            }
        }
        if !spec.measures.is_empty() && !seen.contains(spec.heatmap.as_str()) {
            return Err(format!("heatmap names no measure: {}", spec.heatmap));
        }
        if spec.measures.is_empty() && !spec.heatmap.is_empty() {
            return Err("heatmap names a measure, but the model has none".into());
        }
        Ok(())
    }

    /// The per-tile values a slide model gives, as (output, column): its tissue output (if any)
    /// first, then one per measure.
    pub fn slide_outputs(&self) -> Vec<(String, Option<usize>)> {
        self.slide.as_ref().map_or_else(Vec::new, |s| {
            s.tissue_output
                .iter()
                .map(|t| (t.clone(), None))
                .chain(s.measures.iter().map(|m| (m.output.clone(), m.column)))
                .collect()
        })
    }

    pub fn input(&self, name: &str) -> Option<&InputSpec> {
        self.inputs.iter().find(|i| i.name == name)
    }

    /// Checks `features` against the contract and returns every violation, not just the first, so an
    /// integrator fixes a mapping in one round trip.
    pub fn validate_features(
        &self,
        features: &Map<String, Value>,
    ) -> Result<ValidFeatures, Vec<FieldError>> {
        let mut errors = Vec::new();
        let mut accepted: Vec<(&str, Value)> = Vec::with_capacity(self.inputs.len());
        let mut flags = Vec::new();
        let mut known = 0;
        for spec in &self.inputs {
            let field = || format!("features.{}", spec.name);
            let Some(value) = features.get(&spec.name) else {
                errors.push(FieldError::new(
                    field(),
                    "missing",
                    format!("{} is required", spec.name),
                ));
                continue;
            };
            known += 1;
            match check_value(spec, value) {
                Ok((value, flag)) => {
                    flags.extend(flag);
                    accepted.push((spec.name.as_str(), value));
                }
                Err((rule, message)) => errors.push(FieldError::new(field(), rule, message)),
            }
        }
        // Input names are unique, so every given name was an input exactly when all were matched.
        if known < features.len() {
            let unknown = features
                .keys()
                .filter(|k| self.input(k).is_none())
                .map(|k| {
                    FieldError::new(
                        format!("features.{k}"),
                        "unknown",
                        format!(
                            "{k} is not an input of {}; see GET /v1/models/{}",
                            self.name, self.name
                        ),
                    )
                });
            errors.splice(0..0, unknown);
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        // Sorted by name as serde_json's map (no `preserve_order`) keeps its keys: the canonical
        // form, byte for byte what the digests of earlier analyses were taken over.
        accepted.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let encoded = self.encode(&accepted);
        let canonical = serde_json::value::to_raw_value(&SortedObject(&accepted))
            .map_err(|e| vec![FieldError::new("features", "unencodable", e.to_string())])?;
        let digest = hex::encode(Sha256::digest(canonical.get().as_bytes()));
        Ok(ValidFeatures {
            canonical,
            encoded,
            outside_training_range: flags,
            digest,
        })
    }

    /// The ONNX input row for validated inputs (sorted by name).
    fn encode(&self, accepted: &[(&str, Value)]) -> Vec<f64> {
        let get = |name: &str| {
            accepted
                .binary_search_by(|(k, _)| (*k).cmp(name))
                .ok()
                .map(|i| &accepted[i].1)
        };
        self.encoding
            .iter()
            .map(|column| match (&column.level, get(&column.input)) {
                (None, Some(v)) => v.as_f64().unwrap_or(f64::NAN),
                (Some(level), Some(Value::String(v))) => f64::from(u8::from(v == level)),
                _ => f64::NAN,
            })
            .collect()
    }

    /// Labels of the encoded columns, as used in explanations: `age`, `tgrade=III`.
    pub fn column_labels(&self) -> Vec<String> {
        self.encoding
            .iter()
            .map(|c| match &c.level {
                Some(level) => format!("{}={level}", c.input),
                None => c.input.clone(),
            })
            .collect()
    }

    /// The input contract as a JSON Schema (2020-12) for integrators and form generators.
    pub fn input_schema(&self) -> Value {
        if let Some(spec) = &self.mil {
            return serde_json::json!({
                "type": "object",
                "description": format!("A MIL analysis: one slide's tile embeddings, {} wide, from {}", spec.embedding_dim, spec.encoder),
                "properties": {
                    "embeddings": {"type": "string", "format": "uuid", "description": "the id POST /v1/embeddings answered"},
                },
                "required": ["embeddings"],
                "additionalProperties": false,
                "x-embedding-dim": spec.embedding_dim,
            });
        }
        if let Some(spec) = &self.slide {
            return serde_json::json!({
                "type": "object",
                "description": format!("A slide analysis: the uploaded slide, read as {} x {} pixel tiles at {} µm/pixel", spec.tile_size, spec.tile_size, spec.mpp),
                "properties": {
                    "slide": {"type": "string", "format": "uuid", "description": "the id POST /v1/slides answered"},
                    "mpp": {"type": "number", "exclusiveMinimum": 0, "description": "µm per level-0 pixel, for a slide whose file does not state it"},
                },
                "required": ["slide"],
                "additionalProperties": false,
            });
        }
        let properties: Map<String, Value> = self
            .inputs
            .iter()
            .map(|input| {
                let schema = match &input.kind {
                    InputKind::Numeric { unit, physical_range, training_range } => {
                        let mut s = serde_json::json!({
                            "type": "number",
                            "description": input.description,
                            "x-unit": unit,
                            "x-training-range": training_range,
                        });
                        if let Some(lo) = physical_range[0] {
                            s["minimum"] = lo.into();
                        }
                        if let Some(hi) = physical_range[1] {
                            s["maximum"] = hi.into();
                        }
                        s
                    }
                    InputKind::Categorical { levels, reference, codes, .. } => {
                        let mut allowed: Vec<Value> = levels.iter().map(|l| Value::from(l.as_str())).collect();
                        allowed.extend(codes.keys().map(|c| c.parse::<i64>().map_or_else(|_| Value::from(c.as_str()), Value::from)));
                        serde_json::json!({"enum": allowed, "description": input.description, "x-reference-level": reference})
                    }
                };
                (input.name.clone(), schema)
            })
            .collect();
        serde_json::json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": format!("{} {} features", self.name, self.version),
            "type": "object",
            "additionalProperties": false,
            "required": self.inputs.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(),
            "properties": properties,
        })
    }

    pub fn is_categorical(&self, input: &str) -> bool {
        matches!(
            self.input(input).map(|i| &i.kind),
            Some(InputKind::Categorical { .. })
        )
    }
}

/// Name-value pairs, sorted by name and unique, written as one JSON object.
struct SortedObject<'a>(&'a [(&'a str, Value)]);

impl Serialize for SortedObject<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (name, value) in self.0 {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

/// Checks one value against its input's rules; a numeric value outside the training range comes
/// back with a flag.
fn check_value(
    spec: &InputSpec,
    value: &Value,
) -> Result<(Value, Option<RangeFlag>), (&'static str, String)> {
    match &spec.kind {
        InputKind::Numeric {
            unit,
            physical_range,
            training_range,
        } => {
            let v = number(value)?;
            if let [Some(lo), _] = physical_range
                && v < *lo
            {
                return Err((
                    "out_of_range",
                    format!("{} must be at least {lo} {unit}, got {v}", spec.name),
                ));
            }
            if let [_, Some(hi)] = physical_range
                && v > *hi
            {
                return Err((
                    "out_of_range",
                    format!("{} must be at most {hi} {unit}, got {v}", spec.name),
                ));
            }
            // Models take single-precision input; a larger magnitude would become infinity there.
            if v.abs() > f64::from(f32::MAX) {
                return Err((
                    "out_of_range",
                    format!("{} is beyond the range a model input can hold", spec.name),
                ));
            }
            let [lo, hi] = *training_range;
            let flag = (v < lo || v > hi).then(|| RangeFlag {
                feature: spec.name.clone(),
                value: v,
                training_range: [lo, hi],
            });
            Ok((Value::from(v), flag))
        }
        InputKind::Categorical { levels, codes, .. } => match value {
            Value::String(s) if levels.contains(s) => Ok((value.clone(), None)),
            Value::String(_) | Value::Number(_) if codes.contains_key(&code(value)) => {
                Ok((Value::String(codes[&code(value)].clone()), None))
            }
            other => Err((
                "not_a_level",
                format!(
                    "expected one of {}, got {other}",
                    levels
                        .iter()
                        .map(|l| format!("{l:?}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        },
    }
}

/// A level code as the manifest spells it: `1` and `1.0` are both "1".
fn code(value: &Value) -> String {
    match value {
        Value::Number(n) => match n.as_f64() {
            Some(v) if v.fract() == 0.0 && v.abs() < 1e15 => format!("{}", v as i64),
            _ => n.to_string(),
        },
        Value::String(s) => s.trim().to_owned(),
        other => other.to_string(),
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
            "schema": MANIFEST_SCHEMA,
            "name": "m", "version": "1", "modality": "features", "task": "classification", "title": "t",
            "onnx": {"file": "m.onnx", "sha256": "00", "input": "x", "input_type": "float32", "outputs": {"probabilities": "p"}},
            "inputs": [
                {"name": "a", "kind": "numeric", "unit": "mm", "description": "", "physical_range": [0.0, null], "training_range": [1.0, 2.0]},
                {"name": "b", "kind": "numeric", "unit": "1", "description": "", "physical_range": [null, null], "training_range": [0.0, 1.0]},
                {"name": "g", "kind": "categorical", "description": "", "levels": ["I", "II", "III"], "reference": "I"}
            ],
            "encoding": [{"input": "a"}, {"input": "b"}, {"input": "g", "level": "II"}, {"input": "g", "level": "III"}],
            "classification": {"labels": ["neg", "pos"], "positive_label": "pos", "threshold": {"value": 0.5, "source": "s"}},
            "survival": null, "explanation": null, "hazard_ratios": null,
            "cohort": {"name": "c", "loader": "l", "n": 1, "positives": 1, "events": null, "citation": "c", "source": "s", "licence": "l"},
            "metrics": {}, "intended_use": "research"
        }))
        .expect("test manifest")
    }

    #[test]
    fn an_optical_density_input_needs_the_manifest_format_that_has_it() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/models/he-stain-quantification/manifest.json"
        );
        let text = std::fs::read_to_string(path).expect("the bundled stain model's manifest");
        let mut stain: Manifest = serde_json::from_str(&text).expect("it parses");
        assert_eq!(stain.schema, MANIFEST_SCHEMA);
        assert_eq!(stain.check(), Ok(()));
        // A /2 build would ignore `space` and feed the model RGB: a /2 manifest may not use it.
        stain.schema = MANIFEST_SCHEMA_V2.into();
        let refused = stain.check().expect_err("space in a /2 manifest");
        assert!(refused.contains("normalise.space"), "{refused}");
        if let Some(n) = stain.slide.as_mut().and_then(|s| s.normalise.as_mut()) {
            n.space = PixelSpace::Rgb;
        }
        assert_eq!(stain.check(), Ok(()));
        // /2 manifests without it are still read.
        let mut v2 = manifest();
        v2.schema = MANIFEST_SCHEMA_V2.into();
        assert_eq!(v2.check(), Ok(()));
        v2.schema = "onkos.manifest/1".into();
        assert!(v2.check().is_err());
    }

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    fn rules(input: Value) -> Vec<(String, &'static str)> {
        match manifest().validate_features(&map(input)) {
            Ok(_) => vec![],
            Err(errors) => errors.into_iter().map(|e| (e.field, e.rule)).collect(),
        }
    }

    #[test]
    fn the_test_manifest_is_consistent() {
        assert_eq!(manifest().check(), Ok(()));
    }

    #[test]
    fn features_are_encoded_in_model_order_with_indicators() {
        let ok = manifest().validate_features(&map(json!({"g": "III", "b": 0.5, "a": 1.5})));
        assert_eq!(ok.map(|v| v.encoded), Ok(vec![1.5, 0.5, 0.0, 1.0]));
        let reference = manifest().validate_features(&map(json!({"g": "I", "b": 0.5, "a": 1.5})));
        assert_eq!(reference.map(|v| v.encoded), Ok(vec![1.5, 0.5, 0.0, 0.0]));
    }

    #[test]
    fn every_violation_is_named() {
        assert_eq!(
            rules(json!({"a": "1.5", "c": 1, "g": "IV"})),
            vec![
                ("features.c".into(), "unknown"),
                ("features.a".into(), "not_a_number"),
                ("features.b".into(), "missing"),
                ("features.g".into(), "not_a_level")
            ]
        );
    }

    #[test]
    fn a_loaders_numeric_level_codes_are_accepted_and_stored_as_levels() {
        let mut m = manifest();
        if let InputKind::Categorical { codes, .. } = &mut m.inputs[2].kind {
            codes.insert("3".into(), "III".into());
        }
        let valid = m.validate_features(&map(json!({"a": 1.5, "b": 0.5, "g": 3})));
        assert_eq!(
            valid.map(|v| (
                serde_json::from_str::<Value>(v.canonical.get()).expect("JSON")["g"].clone(),
                v.encoded[3]
            )),
            Ok((json!("III"), 1.0))
        );
        let unknown = m.validate_features(&map(json!({"a": 1.5, "b": 0.5, "g": 4})));
        assert!(unknown.is_err());
    }

    #[test]
    fn a_categorical_value_must_be_one_of_its_level_strings() {
        assert_eq!(
            rules(json!({"a": 1.5, "b": 0.5, "g": 2})),
            vec![("features.g".into(), "not_a_level")]
        );
    }

    #[test]
    fn nan_and_infinity_strings_are_not_finite() {
        assert_eq!(
            rules(json!({"a": "NaN", "b": 0.5, "g": "I"})),
            vec![("features.a".into(), "not_finite")]
        );
        assert_eq!(
            rules(json!({"a": 1.5, "b": "-Infinity", "g": "I"})),
            vec![("features.b".into(), "not_finite")]
        );
    }

    #[test]
    fn impossible_values_are_refused_and_unseen_ones_flagged() {
        assert_eq!(
            rules(json!({"a": -1.0, "b": 0.5, "g": "I"})),
            vec![("features.a".into(), "out_of_range")]
        );
        let flagged = manifest().validate_features(&map(json!({"a": 9.0, "b": 0.5, "g": "I"})));
        assert_eq!(flagged.map(|v| v.outside_training_range.len()), Ok(1));
    }

    #[test]
    fn digest_ignores_key_order() {
        let m = manifest();
        let one = m.validate_features(&map(json!({"a": 1.5, "b": 0.5, "g": "II"})));
        let two = m.validate_features(&map(json!({"g": "II", "b": 0.5, "a": 1.5})));
        assert_eq!(one.map(|v| v.digest), two.map(|v| v.digest));
    }

    #[test]
    fn the_canonical_text_is_the_sorted_object_that_is_digested() {
        // Inputs out of name order in the manifest; the text must be what serde_json writes for a
        // map (keys sorted), the form every stored digest was taken over.
        let mut m = manifest();
        m.inputs.reverse();
        let given = json!({"g": "II", "a": 1.5, "b": 0.5});
        let valid = m.validate_features(&map(given.clone())).expect("valid");
        let text = serde_json::to_string(&map(given)).expect("JSON");
        assert_eq!(valid.canonical.get(), text);
        assert_eq!(valid.canonical.get(), r#"{"a":1.5,"b":0.5,"g":"II"}"#);
        assert_eq!(valid.digest, hex::encode(Sha256::digest(text.as_bytes())));
        assert_eq!(valid.encoded, vec![1.5, 0.5, 1.0, 0.0]);
    }

    #[test]
    fn manifest_whose_positive_label_is_missing_is_refused() {
        let mut m = manifest();
        if let Some(c) = m.classification.as_mut() {
            c.positive_label = "other".into();
        }
        assert!(m.check().is_err());
    }

    #[test]
    fn an_encoding_that_misses_a_level_is_refused() {
        let mut m = manifest();
        m.encoding.pop();
        assert!(m.check().is_err_and(|e| e.contains("indicator")));
    }

    #[test]
    fn an_encoding_level_that_its_input_lacks_is_refused() {
        let mut m = manifest();
        m.encoding[2].level = Some("IV".into());
        assert!(m.check().is_err());
    }
}
