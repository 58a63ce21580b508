//! `/v1/analyses`: submit an analysis, read one, list the tenant's.

use crate::app::AppState;
use crate::auth::{Principal, Role};
use crate::domain::analysis::{Priority, Status};
use crate::domain::contract::FieldError;
use crate::domain::ids::AnalysisId;
use crate::domain::result::ClassificationResult;
use crate::error::{ApiError, ApiResult, Problem};
use crate::http::extract::JsonObject;
use crate::repo;
use crate::repo::analyses::{AnalysisRecord, NewAnalysis};
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::time::Instant;
use uuid::Uuid;

const FIELDS: [&str; 4] = ["model", "features", "subject", "priority"];
const MAX_SUBJECT: usize = 256;

/// A feature analysis request.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[allow(dead_code)] // Documents the body; it is parsed field by field so that every error is reported.
pub struct CreateAnalysisRequest {
    /// A model name from `GET /v1/models`, e.g. `breast-fna-malignancy`.
    pub model: String,
    /// Feature name → value. Names and units are the model's inputs; no other key is accepted.
    #[schema(value_type = Object, example = json!({"mean_radius": 17.99, "mean_texture": 10.38}))]
    pub features: BTreeMap<String, Value>,
    /// The caller's opaque reference (accession number, specimen id); stored and echoed, never parsed.
    pub subject: Option<String>,
    #[schema(default = "routine")]
    pub priority: Option<Priority>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AnalysisAccepted {
    pub id: AnalysisId,
    pub status: Status,
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
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AnalysisView {
    pub id: AnalysisId,
    pub status: Status,
    pub subject: Option<String>,
    pub priority: Priority,
    pub model: ModelRef,
    /// sha256 of the canonical input (features sorted by name).
    pub input_sha256: String,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub timings: Timings,
    /// ONNX Runtime execution provider that ran the model.
    pub execution_provider: Option<String>,
    /// Present when `status` is `succeeded`.
    pub result: Option<ClassificationResult>,
    /// Present when `status` is `failed`: what went wrong, for a person to read.
    pub error: Option<String>,
    pub intended_use: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AnalysisSummary {
    pub id: AnalysisId,
    pub status: Status,
    pub subject: Option<String>,
    pub priority: Priority,
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

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Page size, 1–200 (default 50).
    pub limit: Option<i64>,
    /// Only analyses older than this id.
    pub before: Option<Uuid>,
}

/// Queue an analysis.
///
/// The input is checked against the model's contract before anything is stored: every unknown,
/// missing, non-numeric or non-finite feature is reported in one 422. On success the analysis and its
/// job are stored together and the answer points at the analysis.
#[utoipa::path(post, path = "/v1/analyses", tag = "analyses",
    request_body = CreateAnalysisRequest,
    security(("bearer" = [])),
    responses(
        (status = 202, description = "Queued", body = AnalysisAccepted,
            headers(("Location" = String, description = "The analysis: /v1/analyses/{id}"))),
        (status = 400, description = "The body is not a JSON object", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The token lacks the submitter role", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "The body exceeds the limit", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "The body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The input breaks the model's contract; `errors` names each field", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The database is not reachable", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn create(
    State(state): State<AppState>,
    principal: Principal,
    JsonObject(body): JsonObject,
) -> ApiResult<(StatusCode, HeaderMap, Json<AnalysisAccepted>)> {
    principal.require(&[Role::Submitter, Role::Admin])?;
    let started = Instant::now();
    let request = parse_request(&state, &body).map_err(ApiError::Validation)?;
    let valid = request
        .model
        .manifest
        .validate_features(request.features)
        .map_err(ApiError::Validation)?;
    let validate_ms = started.elapsed().as_secs_f64() * 1e3;
    let manifest = &request.model.manifest;
    let canonical: Map<String, Value> = manifest
        .inputs
        .iter()
        .zip(&valid.values)
        .map(|(i, v)| (i.name.clone(), Value::from(*v)))
        .collect();
    let id = AnalysisId::new();
    repo::analyses::insert_with_job(
        &state.pool,
        &NewAnalysis {
            id,
            tenant: &principal.tenant,
            submitted_by: &principal.subject,
            subject: request.subject,
            model_name: &manifest.name,
            model_version: &manifest.version,
            model_sha256: &manifest.onnx.sha256,
            priority: request.priority,
            input: &Value::Object(canonical),
            input_sha256: &valid.digest,
            validate_ms,
        },
    )
    .await?;
    tracing::info!(analysis = %id, model = %manifest.name, tenant = %principal.tenant, "analysis queued");
    let mut headers = HeaderMap::new();
    let location =
        HeaderValue::from_str(&format!("/v1/analyses/{id}")).map_err(anyhow::Error::from)?;
    headers.insert(header::LOCATION, location);
    Ok((
        StatusCode::ACCEPTED,
        headers,
        Json(AnalysisAccepted {
            id,
            status: Status::Queued,
        }),
    ))
}

struct ParsedRequest<'a> {
    model: std::sync::Arc<crate::registry::LoadedModel>,
    features: &'a Map<String, Value>,
    subject: Option<&'a str>,
    priority: Priority,
}

/// Checks the envelope (everything but the feature values), collecting every error.
fn parse_request<'a>(
    state: &AppState,
    body: &'a Map<String, Value>,
) -> Result<ParsedRequest<'a>, Vec<FieldError>> {
    let mut errors: Vec<FieldError> = body
        .keys()
        .filter(|k| !FIELDS.contains(&k.as_str()))
        .map(|k| {
            FieldError::new(
                k.clone(),
                "unknown",
                format!("{k} is not a field of this request"),
            )
        })
        .collect();
    let model = match body.get("model") {
        None => Err(FieldError::new("model", "missing", "model is required")),
        Some(Value::String(name)) => state.registry.get(name).ok_or_else(|| {
            let known: Vec<&str> = state.registry.names().collect();
            FieldError::new(
                "model",
                "unknown_model",
                format!("no model {name:?}; available: {}", known.join(", ")),
            )
        }),
        Some(_) => Err(FieldError::new(
            "model",
            "not_a_string",
            "model must be a string",
        )),
    };
    let features = match body.get("features") {
        Some(Value::Object(map)) => Ok(map),
        None => Err(FieldError::new(
            "features",
            "missing",
            "features is required",
        )),
        Some(_) => Err(FieldError::new(
            "features",
            "not_an_object",
            "features must be an object of name → value",
        )),
    };
    let subject = match body.get("subject") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.chars().count() <= MAX_SUBJECT => Ok(Some(s.as_str())),
        Some(Value::String(_)) => Err(FieldError::new(
            "subject",
            "too_long",
            format!("subject is longer than {MAX_SUBJECT} characters"),
        )),
        Some(_) => Err(FieldError::new(
            "subject",
            "not_a_string",
            "subject must be a string",
        )),
    };
    let priority = match body.get("priority") {
        None | Some(Value::Null) => Ok(Priority::Routine),
        Some(Value::String(p)) => Priority::parse(p).ok_or_else(|| {
            FieldError::new(
                "priority",
                "not_allowed",
                format!("priority {p:?} is not routine or stat"),
            )
        }),
        Some(_) => Err(FieldError::new(
            "priority",
            "not_allowed",
            "priority must be \"routine\" or \"stat\"",
        )),
    };
    match (model, features, subject, priority) {
        (Ok(model), Ok(features), Ok(subject), Ok(priority)) if errors.is_empty() => {
            Ok(ParsedRequest {
                model,
                features,
                subject,
                priority,
            })
        }
        (model, features, subject, priority) => {
            errors.extend(
                [model.err(), features.err(), subject.err(), priority.err()]
                    .into_iter()
                    .flatten(),
            );
            Err(errors)
        }
    }
}

/// Read an analysis and, once it has run, its result.
///
/// Every read is recorded in the audit trail. Another tenant's analysis answers 404, exactly like a
/// missing one.
#[utoipa::path(get, path = "/v1/analyses/{id}", tag = "analyses",
    params(("id" = Uuid, Path, description = "The analysis id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The analysis", body = AnalysisView),
        (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The token has no onkos role", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such analysis in the caller's tenant", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The database is not reachable", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<AnalysisView>> {
    principal.require(&[Role::Submitter, Role::Clinician, Role::Admin])?;
    let id = Uuid::parse_str(&id)
        .map(AnalysisId)
        .map_err(|_| ApiError::NotFound)?;
    let record = repo::analyses::find(&state.pool, &principal.tenant, id)
        .await?
        .ok_or(ApiError::NotFound)?;
    repo::audit::record(
        &state.pool,
        &principal.tenant,
        &principal.subject,
        "analysis.read",
        "analysis",
        &id.to_string(),
    )
    .await?;
    Ok(Json(view(&state, record)?))
}

fn view(state: &AppState, r: AnalysisRecord) -> anyhow::Result<AnalysisView> {
    let result: Option<ClassificationResult> = r.result.map(serde_json::from_value).transpose()?;
    let timing = |key: &str| {
        r.timings
            .as_ref()
            .and_then(|t| t.get(key))
            .and_then(Value::as_f64)
    };
    let intended_use = result
        .as_ref()
        .map(|res| res.intended_use.clone())
        .or_else(|| {
            state
                .registry
                .get(&r.model_name)
                .map(|m| m.manifest.intended_use.clone())
        })
        .unwrap_or_else(|| "Research use only, not a medical device.".into());
    Ok(AnalysisView {
        id: AnalysisId(r.id),
        status: Status::parse(&r.status)
            .ok_or_else(|| anyhow::anyhow!("stored status {:?}", r.status))?,
        subject: r.subject,
        priority: Priority::parse(&r.priority).unwrap_or_default(),
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
        },
        execution_provider: r.execution_provider,
        result,
        error: r.error,
        intended_use,
    })
}

/// List the caller's tenant's analyses, newest first.
#[utoipa::path(get, path = "/v1/analyses", tag = "analyses",
    params(ListParams),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A page of analyses", body = AnalysisPage),
        (status = 400, description = "A query parameter is invalid", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The token has no onkos role", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The database is not reachable", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<AnalysisPage>> {
    principal.require(&[Role::Submitter, Role::Clinician, Role::Admin])?;
    let Query(params) = params.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = params.limit.unwrap_or(50);
    if !(1..=200).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and 200, got {limit}"
        )));
    }
    let rows = repo::analyses::list(
        &state.pool,
        &principal.tenant,
        params.before.map(AnalysisId),
        limit,
    )
    .await?;
    let next_before = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|r| AnalysisId(r.id)))
        .flatten();
    let items = rows
        .into_iter()
        .map(|r| AnalysisSummary {
            id: AnalysisId(r.id),
            status: Status::parse(&r.status).unwrap_or(Status::Failed),
            subject: r.subject,
            priority: Priority::parse(&r.priority).unwrap_or_default(),
            model: r.model_name,
            model_version: r.model_version,
            created_at: r.created_at,
            finished_at: r.finished_at,
        })
        .collect();
    Ok(Json(AnalysisPage { items, next_before }))
}
