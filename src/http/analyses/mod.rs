//! `/v1/analyses`: submit analyses (one as JSON, many as CSV), read, wait for, list and cancel them.

pub mod cancel;
pub mod events;
pub mod fhir;
pub mod pictures;
pub mod provenance;
pub mod read;
pub mod submit;

use crate::app::AppState;
use crate::domain::analysis::{Priority, Status};
use crate::domain::ids::AnalysisId;
use crate::domain::result::AnalysisResult;
use crate::repo::analyses::AnalysisRecord;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::collections::BTreeMap;
use uuid::Uuid;

/// One analysis as JSON. (A batch is CSV: see `POST /v1/analyses?model=`.)
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[allow(dead_code)] // Documents the body; it is parsed field by field so that every error is reported.
pub struct CreateAnalysisRequest {
    /// A model name from `GET /v1/models`, e.g. `breast-fna-malignancy`.
    #[schema(pattern = "^[a-z0-9-]{2,64}$")]
    pub model: String,
    /// Feature name → value. Names and units are the model's inputs; no other key is accepted.
    #[schema(value_type = Object, example = json!({"mean_radius": 17.99, "mean_texture": 10.38}))]
    pub features: BTreeMap<String, Value>,
    /// The caller's opaque reference (accession number, specimen id); stored and echoed, never parsed.
    #[schema(max_length = 256, pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*$")]
    pub subject: Option<String>,
    #[schema(default = "routine")]
    pub priority: Option<Priority>,
}

/// A slide analysis: a slide model over an uploaded slide.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SlideAnalysisRequest {
    /// A slide model, e.g. `he-stain-quantification`.
    #[schema(pattern = "^[a-z0-9-]{2,64}$")]
    pub model: String,
    /// The id `POST /v1/slides` answered.
    pub slide: Uuid,
    /// µm per level-0 pixel, only for a slide whose file states none (one that contradicts the
    /// file is refused).
    pub mpp: Option<f64>,
    #[schema(max_length = 256, pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*$")]
    pub subject: Option<String>,
    #[schema(default = "routine")]
    pub priority: Option<Priority>,
}

/// A MIL analysis: a model with a MIL head over an uploaded bag of tile embeddings.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingsAnalysisRequest {
    /// A model whose modality is `embeddings`.
    #[schema(pattern = "^[a-z0-9-]{2,64}$")]
    pub model: String,
    /// The id `POST /v1/embeddings` answered.
    pub embeddings: Uuid,
    #[schema(max_length = 256, pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*$")]
    pub subject: Option<String>,
    #[schema(default = "routine")]
    pub priority: Option<Priority>,
}

/// What `POST /v1/analyses` takes as JSON: features for a feature model, a slide for a slide
/// model, tile embeddings for a MIL model.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum AnalysisRequest {
    Features(CreateAnalysisRequest),
    Slide(SlideAnalysisRequest),
    Embeddings(EmbeddingsAnalysisRequest),
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AnalysisAccepted {
    pub id: AnalysisId,
    pub status: Status,
}

/// The answer to a CSV batch: one analysis per data row, in row order.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BatchAccepted {
    /// Lists the batch with `GET /v1/analyses?batch=`.
    pub batch_id: Uuid,
    pub analyses: Vec<AnalysisAccepted>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ModelRef {
    pub name: String,
    pub version: String,
    /// sha256 of the exact ONNX file that ran.
    pub sha256: String,
}

/// Where the time went, in milliseconds.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Timings {
    /// Checking the input against the model's contract, on submission.
    pub validate_ms: f64,
    /// From submission until a worker claimed the analysis.
    pub queue_wait_ms: Option<f64>,
    /// The inference call of the batch this analysis ran in.
    pub infer_ms: Option<f64>,
    /// How many analyses shared that inference call.
    pub batch_size: Option<u32>,
    /// How the analysis was run: `queue` (claimed from the queue by a worker, batched with others)
    /// or `inline` (run at submission while its submitter waited, and stored finished).
    pub dispatch: Option<String>,
    /// The worker process that ran it from the queue (its id is in that worker's log lines).
    pub worker: Option<Uuid>,
}

/// A result document in an answer: read back from the database, or the canonical JSON text it
/// was just stored as, written into the answer as it is instead of serialised once more.
#[derive(Debug, Clone)]
pub enum ResultDocument {
    Read(Value),
    Stored(Box<RawValue>),
}

impl ResultDocument {
    /// The document as a JSON tree; stored text is parsed for it.
    pub fn tree(&self) -> Cow<'_, Value> {
        match self {
            Self::Read(value) => Cow::Borrowed(value),
            Self::Stored(text) => Cow::Owned(serde_json::from_str(text.get()).unwrap_or_default()),
        }
    }
}

impl Serialize for ResultDocument {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Read(value) => value.serialize(serializer),
            Self::Stored(text) => text.serialize(serializer),
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Progress {
    pub tiles_done: i32,
    pub tiles_total: i32,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AnalysisView {
    pub id: AnalysisId,
    pub status: Status,
    #[schema(max_length = 256, pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*$")]
    pub subject: Option<String>,
    pub priority: Priority,
    /// Set when the analysis came from a CSV batch.
    pub batch_id: Option<Uuid>,
    pub model: ModelRef,
    /// sha256 of the canonical input (features sorted by name).
    pub input_sha256: String,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub timings: Timings,
    /// Slide analyses while they run: tiles analysed so far and in all.
    pub progress: Option<Progress>,
    /// ONNX Runtime execution provider that ran the model.
    pub execution_provider: Option<String>,
    /// Present when `status` is `succeeded`: the versioned result document (classification or survival).
    #[schema(value_type = Option<AnalysisResult>)]
    pub result: Option<ResultDocument>,
    /// Present when `status` is `failed`: what went wrong, for a person to read.
    pub error: Option<String>,
    pub intended_use: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AnalysisSummary {
    pub id: AnalysisId,
    pub status: Status,
    #[schema(max_length = 256, pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*$")]
    pub subject: Option<String>,
    pub priority: Priority,
    pub batch_id: Option<Uuid>,
    #[schema(pattern = "^[a-z0-9-]{2,64}$")]
    pub model: String,
    pub model_version: String,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AnalysisPage {
    pub items: Vec<AnalysisSummary>,
    /// Pass as `before` to get the next (older) page; absent on the last page.
    pub next_before: Option<AnalysisId>,
}

pub(crate) async fn view(state: &AppState, r: AnalysisRecord) -> anyhow::Result<AnalysisView> {
    /// The one field of a stored result read here; the rest is skipped over, not built.
    #[derive(serde::Deserialize)]
    struct Stated {
        intended_use: Option<String>,
    }
    let stored_use = r
        .result
        .as_ref()
        .and_then(|r| serde_json::from_str::<Stated>(r.0.get()).ok())
        .and_then(|s| s.intended_use);
    let intended_use = match stored_use {
        Some(text) => text,
        None => match state
            .registry
            .version(&r.model_name, &r.model_version)
            .await
        {
            Ok(model) => model.manifest.intended_use.clone(),
            Err(_) => "Research use only, not a medical device.".into(),
        },
    };
    view_with(r, intended_use)
}

/// The view of a record whose intended use is known (a result's own, or its model's).
pub(crate) fn view_with(r: AnalysisRecord, intended_use: String) -> anyhow::Result<AnalysisView> {
    // Passed through as stored: it was built from the typed result, and re-parsing it on every read
    // would cost more than the rest of the read.
    let result = r.result;
    let timing = |key: &str| {
        r.timings
            .as_ref()
            .and_then(|t| t.get(key))
            .and_then(Value::as_f64)
    };
    Ok(AnalysisView {
        id: AnalysisId(r.id),
        status: Status::parse(&r.status)
            .ok_or_else(|| anyhow::anyhow!("stored status {:?}", r.status))?,
        subject: r.subject,
        priority: Priority::parse(&r.priority).unwrap_or_default(),
        batch_id: r.batch_id,
        model: ModelRef {
            name: r.model_name,
            version: r.model_version,
            sha256: r.model_sha256,
        },
        input_sha256: r.input_sha256,
        created_at: r.created_at,
        started_at: r.started_at,
        finished_at: r.finished_at,
        timings: Timings {
            validate_ms: r.validate_ms,
            queue_wait_ms: timing("queue_wait_ms"),
            infer_ms: timing("infer_ms"),
            batch_size: timing("batch_size").map(|b| b as u32),
            dispatch: r
                .timings
                .as_ref()
                .and_then(|t| t.get("dispatch"))
                .and_then(Value::as_str)
                .map(str::to_owned),
            worker: r
                .timings
                .as_ref()
                .and_then(|t| t.get("worker"))
                .and_then(Value::as_str)
                .and_then(|w| Uuid::parse_str(w).ok()),
        },
        progress: match (r.progress_done, r.progress_total) {
            (Some(tiles_done), Some(tiles_total))
                if r.status == "queued" || r.status == "running" =>
            {
                Some(Progress {
                    tiles_done,
                    tiles_total,
                })
            }
            _ => None,
        },
        execution_provider: r.execution_provider,
        result: result.map(|text| ResultDocument::Stored(text.0)),
        error: r.error,
        intended_use,
    })
}
