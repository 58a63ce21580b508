//! `POST /v1/analyses`: one analysis as JSON, or a batch as CSV (one analysis per row). Input is
//! checked against the model's contract before anything is stored; a retried request with the same
//! `Idempotency-Key` gets the first answer back instead of a second analysis.

use super::read::{parse_wait, read_when_final};
use super::{AnalysisAccepted, AnalysisRequest, AnalysisView, BatchAccepted, view, view_with};
use crate::app::AppState;
use crate::auth::{Principal, Role};
use crate::domain::analysis::{Priority, Status};
use crate::domain::batch;
use crate::domain::contract::{FieldError, RangeFlag, ValidFeatures};
use crate::domain::ids::AnalysisId;
use crate::error::{ApiError, ApiResult, Problem};
use crate::http::extract::{BodyKind, body_bytes, body_kind, json_object};
use crate::jobs::intake::IntakeError;
use crate::registry::LoadedModel;
use crate::repo;
use crate::repo::analyses::{AnalysisRecord, Finished, NewAnalysis, Submission};
use crate::repo::idempotency::StoredAnswer;
use crate::repo::slides::Key;
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{SubsecRound, Utc};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Instant;
use uuid::Uuid;

const FIELDS: [&str; 4] = ["model", "features", "subject", "priority"];
const SLIDE_FIELDS: [&str; 5] = ["model", "slide", "mpp", "subject", "priority"];
const BAG_FIELDS: [&str; 4] = ["model", "embeddings", "subject", "priority"];

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SubmitParams {
    /// CSV batches only: the model every row is analysed with.
    #[param(pattern = "^[a-z0-9-]{2,64}$")]
    pub model: Option<String>,
    /// CSV batches only: the priority of every row (default routine).
    pub priority: Option<Priority>,
    /// JSON only: wait up to this long (e.g. `10s`) for the result and answer 200 with the finished
    /// analysis, as a synchronous call would; 202 as usual if it is not final by then.
    #[param(pattern = "^[0-9]{1,9}(ms|s|m)?$")]
    pub wait: Option<String>,
}

/// Analyses ready to store.
struct Prepared {
    model: Arc<LoadedModel>,
    priority: Priority,
    batch_id: Option<Uuid>,
    analyses: Vec<NewAnalysis>,
    /// JSON only: the case's model input row and its out-of-training-range flags, to run it inline.
    row: Option<(Vec<f64>, Vec<RangeFlag>)>,
}

/// Queue one analysis (JSON) or a batch (CSV).
///
/// **JSON**: `{"model", "features", "subject"?, "priority"?}` queues one analysis.
/// **CSV** (`Content-Type: text/csv`, `?model=`): a header row of feature names (and optionally a
/// `subject` column), then one analysis per row; the answer lists the ids in row order. Validation
/// is all-or-nothing: one bad cell refuses the whole file, naming row and column.
///
/// Every unknown, missing, non-numeric or non-finite feature is reported in one 422, and nothing is
/// stored. With `Idempotency-Key`, a repeat of the same request returns the first answer; the same
/// key with a different request is a 409.
#[utoipa::path(post, path = "/v1/analyses", tag = "analyses",
    params(SubmitParams, ("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe: the same key and request return the first answer")),
    request_body(content(
        (AnalysisRequest = "application/json"),
        (String = "text/csv", example = "subject,mean_radius,mean_texture,...\nACC-1,17.99,10.38,...")
    )),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "With `wait`: the finished analysis", body = AnalysisView),
        (status = 202, description = "Queued: one analysis (JSON) or a batch (CSV)", body = AnalysisAccepted,
            headers(("Location" = String, description = "The analysis (/v1/analyses/{id}) or the batch (/v1/analyses?batch={id})"))),
        (status = 400, description = "The body is not a JSON object or readable CSV, or a query parameter is wrong", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The token lacks the submitter role", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The Idempotency-Key was used for a different request", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "The body exceeds the limit", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "The body is neither JSON nor CSV", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The input breaks the model's contract; `errors` names each field (and row)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The database is not reachable", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn create(
    State(state): State<AppState>,
    principal: Principal,
    params: Result<Query<SubmitParams>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    principal.require(&[Role::Submitter, Role::Admin])?;
    let Query(params) = params.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let kind = body_kind(&headers)?;
    let bytes = body_bytes(body)?;
    let key = idempotency_key(&headers)?;
    let wait = params
        .wait
        .as_deref()
        .map(parse_wait)
        .transpose()?
        .map(|w| w.min(state.config.max_wait()));
    if wait.is_some() && kind == BodyKind::Csv {
        return Err(ApiError::BadRequest(
            "wait applies to one JSON analysis, not to a CSV batch".into(),
        ));
    }
    // Only a keyed request needs its identity; the common case skips hashing the body.
    let request_sha256 = key
        .as_ref()
        .map(|_| request_digest(kind, &params, &bytes))
        .unwrap_or_default();
    if let Some(key) = &key
        && let Some(stored) = repo::idempotency::find(&state.pool, &principal.tenant, key).await?
    {
        return replay(stored, &request_sha256);
    }

    let mut prepared = match kind {
        BodyKind::Json => {
            if params.model.is_some() || params.priority.is_some() {
                return Err(ApiError::BadRequest("model and priority go in the JSON body; the query parameters are for CSV batches".into()));
            }
            let body = json_object(&bytes)?;
            let model = match body.get("model") {
                Some(Value::String(name)) => Some(find_model(&state, &principal, name).await?),
                _ => None,
            };
            match model {
                Some(Ok(model)) if model.manifest.slide.is_some() => {
                    prepare_slide(&state, &principal, &body, model, None).await?
                }
                Some(Ok(model)) if model.manifest.mil.is_some() && body.contains_key("slide") => {
                    prepare_bag_of_slide(&state, &principal, &body, model).await?
                }
                Some(Ok(model)) if model.manifest.mil.is_some() => {
                    prepare_bag(&state, &principal, &body, model).await?
                }
                model => prepare_json(&body, model)?,
            }
        }
        BodyKind::Csv => {
            let model = match &params.model {
                Some(name) => Some(find_model(&state, &principal, name).await?),
                None => None,
            };
            prepare_csv(&params, model, &bytes)?
        }
    };
    let (answer, location) = answer(&prepared);
    let manifest = &prepared.model.manifest;
    let submission = Submission {
        tenant: principal.tenant.clone(),
        submitted_by: principal.subject.clone(),
        model_name: manifest.name.clone(),
        model_version: manifest.version.clone(),
        model_sha256: manifest.onnx.sha256.clone(),
        manifest_sha256: prepared.model.manifest_sha256.clone(),
        priority: prepared.priority,
        batch_id: prepared.batch_id,
        max_attempts: state.retry_max_attempts(),
        batchable: manifest.slide.is_none() && manifest.mil.is_none(),
        traceparent: crate::telemetry::tracing::current_traceparent(),
    };
    let first_id = prepared.analyses[0].id;
    // A waiting submitter of one case on a process with a worker: run it now (microseconds for a
    // feature model) and store it finished; the answer then needs no queue, wake-up or read.
    let inline = wait.is_some() && state.config.worker && state.config.worker_inline;
    if inline && let Some((encoded, flags)) = prepared.row.take() {
        prepared.analyses[0].finished = run_inline(&state, &prepared.model, encoded, flags).await;
    }
    let finished = prepared.analyses[0].finished.is_some();
    // Subscribed before the commit, so that a worker finishing at once is not missed.
    let done = (wait.is_some() && prepared.batch_id.is_none() && !finished)
        .then(|| state.completions.subscribe());
    let count = prepared.analyses.len();
    let stored = match &key {
        // The common case goes through the group commit.
        None => state
            .intake
            .submit(submission.clone(), prepared.analyses)
            .await
            .map_err(|e| match e {
                IntakeError::Unavailable => {
                    ApiError::Unavailable("the database is not reachable".into())
                }
                // Through `From<sqlx::Error>`, so that a value the database cannot store (a NUL)
                // is the same 400 here as on the keyed path.
                IntakeError::Refused(e) => ApiError::from(e),
                IntakeError::Failed(why) => ApiError::Internal(anyhow::anyhow!(why)),
            })?,
        // A keyed submission commits with its key, so that a concurrent retry sees one or the other.
        Some(key) => {
            let mut tx = state.pool.begin().await?;
            repo::analyses::insert_with_jobs(&mut tx, &[(&submission, &prepared.analyses)]).await?;
            if !repo::idempotency::remember(
                &mut tx,
                &principal.tenant,
                key,
                &request_sha256,
                &answer,
                Some(&location),
            )
            .await?
            {
                // A concurrent retry with the same key committed first: answer as it did.
                tx.rollback().await?;
                let stored = repo::idempotency::find(&state.pool, &principal.tenant, key)
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("idempotency key vanished"))?;
                return replay(stored, &request_sha256);
            }
            tx.commit().await?;
            prepared.analyses
        }
    };
    tracing::debug!(model = %manifest.name, tenant = %principal.tenant, count, finished, "analyses stored");
    if finished {
        state.metrics.outcome("succeeded", 1);
        // Answered from what was just committed, as a read of it would return it; the result
        // as the text it was stored as.
        let analysis = stored.into_iter().next().unwrap_or_else(|| unreachable!());
        let record = finished_record(&submission, analysis);
        // The result's own intended use: it was built from this manifest's.
        let answer = view_with(record, manifest.intended_use.clone())?;
        return Ok(with_location(
            (StatusCode::OK, Json(answer)).into_response(),
            &location,
        ));
    }
    if let (Some(wait), Some(done)) = (wait, done) {
        let record = read_when_final(&state, &principal, first_id, wait, done, true).await?;
        if !matches!(
            Status::parse(&record.status),
            Some(Status::Queued | Status::Running)
        ) {
            let mut response = (StatusCode::OK, Json(view(&state, record).await?)).into_response();
            if let Ok(value) = location.parse() {
                response.headers_mut().insert(header::LOCATION, value);
            }
            return Ok(response);
        }
    }
    Ok(accepted(answer, &location))
}

fn accepted(answer: Value, location: &str) -> Response {
    with_location(
        (StatusCode::ACCEPTED, Json(answer)).into_response(),
        location,
    )
}

fn with_location(mut response: Response, location: &str) -> Response {
    if let Ok(value) = location.parse() {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

/// Runs the case now. `None` when that fails: the analysis is then queued, and the worker's
/// retries and error reporting take over.
async fn run_inline(
    state: &AppState,
    model: &Arc<LoadedModel>,
    encoded: Vec<f64>,
    flags: Vec<RangeFlag>,
) -> Option<Finished> {
    // Postgres keeps microseconds: the answer must show the times a later read will.
    let now = || Utc::now().trunc_subsecs(6);
    let created_at = now();
    let provider = model.onnx.provider;
    let input = Arc::new((encoded, flags));
    let work = move |model: &LoadedModel, input: &(Vec<f64>, Vec<RangeFlag>), wait: bool| {
        let started_at = now();
        crate::jobs::worker::run_inline(model, &input.0, &input.1, wait)
            .map(|outcome| (started_at, outcome, now()))
    };
    // On the CPU, run here, on the request's own thread: one feature row is tens of microseconds
    // of work, less than handing it to the blocking pool and back cost (two thread wake-ups,
    // measured at about 14 % of onkos's CPU under `make bench`). A panic is caught as the pool's
    // join would have. When the session is busy (the worker's batch holds it), or for a GPU
    // session's call (a kernel launch and two copies), it goes to the pool, which may wait.
    let here = if provider == crate::inference::CPU {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(model, &input, false)))
            .map_err(|_| ())
    } else {
        Ok(None)
    };
    let run = match here {
        Ok(Some(done)) => Ok(done),
        Err(()) => Err(()),
        Ok(None) => {
            let model = Arc::clone(model);
            tokio::task::spawn_blocking(move || work(&model, &input, true))
                .await
                .map_err(|_| ())
                .and_then(|done| done.ok_or(()))
        }
    };
    match run {
        Ok((started_at, Ok((result, timings)), finished_at)) => Some({
            if let Some(infer_ms) = timings.get("infer_ms").and_then(Value::as_f64) {
                state.metrics.stage("infer", infer_ms / 1e3);
            }
            state.metrics.batch_size.observe(1.0);
            Finished {
                result,
                timings,
                execution_provider: provider.to_owned(),
                created_at,
                started_at,
                finished_at,
            }
        }),
        Ok((_, Err(e), _)) => {
            tracing::warn!(error = %e, "inline run failed; the analysis goes to the queue");
            None
        }
        Err(()) => {
            tracing::warn!("inline run panicked; the analysis goes to the queue");
            None
        }
    }
}

/// The stored form of an analysis that was stored finished, with its result as the text it was
/// stored as (moved, not copied).
fn finished_record(submission: &Submission, analysis: NewAnalysis) -> AnalysisRecord {
    let (created_at, started_at, finished_at, provider, timings, result) = match analysis.finished {
        Some(f) => (
            f.created_at,
            Some(f.started_at),
            Some(f.finished_at),
            Some(f.execution_provider),
            Some(f.timings),
            Some(sqlx::types::Json(f.result)),
        ),
        None => (Utc::now(), None, None, None, None, None),
    };
    AnalysisRecord {
        id: analysis.id.0,
        subject: analysis.subject,
        model_name: submission.model_name.clone(),
        model_version: submission.model_version.clone(),
        model_sha256: submission.model_sha256.clone(),
        priority: submission.priority.as_str().to_owned(),
        status: Status::Succeeded.as_str().to_owned(),
        input_sha256: analysis.input_sha256,
        error: None,
        validate_ms: analysis.validate_ms,
        created_at,
        started_at,
        finished_at,
        batch_id: submission.batch_id,
        execution_provider: provider,
        progress_done: None,
        progress_total: None,
        timings,
        result,
    }
}

fn replay(stored: StoredAnswer, request_sha256: &str) -> ApiResult<Response> {
    if stored.request_sha256 != request_sha256 {
        return Err(ApiError::Conflict(
            "this Idempotency-Key was already used for a different request".into(),
        ));
    }
    Ok(accepted(
        stored.response,
        stored.location.as_deref().unwrap_or(""),
    ))
}

fn idempotency_key(headers: &HeaderMap) -> ApiResult<Option<String>> {
    let Some(raw) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = raw.to_str().ok().map(str::trim).unwrap_or("");
    if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::BadRequest(
            "Idempotency-Key must be 1-255 visible ASCII characters".into(),
        ));
    }
    Ok(Some(key.to_owned()))
}

/// Identifies "the same request" for idempotency: body kind, batch parameters and the exact bytes.
fn request_digest(kind: BodyKind, params: &SubmitParams, bytes: &[u8]) -> String {
    let mut hash = Sha256::new();
    hash.update(format!(
        "{kind:?}\n{:?}\n{:?}\n",
        params.model,
        params.priority.map(Priority::as_str)
    ));
    hash.update(bytes);
    hex::encode(hash.finalize())
}

fn answer(prepared: &Prepared) -> (Value, String) {
    let accepted = |a: &NewAnalysis| AnalysisAccepted {
        id: a.id,
        status: Status::Queued,
    };
    match prepared.batch_id {
        Some(batch_id) => (
            json!(BatchAccepted {
                batch_id,
                analyses: prepared.analyses.iter().map(accepted).collect()
            }),
            format!("/v1/analyses?batch={batch_id}"),
        ),
        None => {
            let one = &prepared.analyses[0];
            (json!(accepted(one)), format!("/v1/analyses/{}", one.id))
        }
    }
}

fn subject_of(body: &Map<String, Value>) -> Result<Option<&str>, FieldError> {
    match body.get("subject") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => batch::check_subject(s).map(Some),
        Some(_) => Err(FieldError::new(
            "subject",
            "not_a_string",
            "subject must be a string",
        )),
    }
}

fn priority_of(body: &Map<String, Value>) -> Result<Priority, FieldError> {
    match body.get("priority") {
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
    }
}

/// `{"model", "slide", "mpp"?, "subject"?, "priority"?}` for a slide model: the slide must be the
/// tenant's, tiled, and of known resolution — from its file, or stated as `mpp` when the file
/// states none. A stated `mpp` that contradicts the file is refused: a grid at the wrong
/// resolution would measure the wrong thing.
///
/// With `mil`, the analysis is that MIL model's, from this slide: `model` is then the encoder that
/// cuts and embeds the tiles, and the input names its version.
async fn prepare_slide(
    state: &AppState,
    principal: &Principal,
    body: &Map<String, Value>,
    model: Arc<LoadedModel>,
    mil: Option<Arc<LoadedModel>>,
) -> ApiResult<Prepared> {
    let started = Instant::now();
    let spec = model
        .manifest
        .slide
        .clone()
        .ok_or_else(|| anyhow::anyhow!("prepare_slide called for a feature model"))?;
    let mut errors = unknown_fields(body, &SLIDE_FIELDS, "a slide analysis");
    let (subject, priority) = (subject_of(body), priority_of(body));
    let stated = match body.get("mpp") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_f64()
            .filter(|v| v.is_finite() && *v > 0.0 && *v < 1000.0)
            .map(Some)
            .ok_or_else(|| {
                FieldError::new(
                    "mpp",
                    "out_of_range",
                    "mpp is µm per pixel: a positive number below 1000",
                )
            }),
        Some(_) => Err(FieldError::new(
            "mpp",
            "not_a_number",
            "mpp must be a number",
        )),
    };
    let slide = match body.get("slide") {
        None => Err(FieldError::new(
            "slide",
            "missing",
            "slide is required: the id POST /v1/slides answered",
        )),
        Some(Value::String(id)) => match Uuid::parse_str(id) {
            Ok(id) => repo::slides::find(&state.pool, &principal.tenant, Key::Id(id))
                .await?
                .ok_or_else(|| {
                    FieldError::new(
                        "slide",
                        "unknown_slide",
                        format!("no slide {id} in this tenant"),
                    )
                }),
            Err(_) => Err(FieldError::new(
                "slide",
                "unknown_slide",
                "slide must be a slide id",
            )),
        },
        Some(_) => Err(FieldError::new(
            "slide",
            "not_a_string",
            "slide must be a slide id",
        )),
    };
    let (slide, stated, subject, priority) = match (slide, stated, subject, priority) {
        (Ok(sl), Ok(m), Ok(s), Ok(p)) if errors.is_empty() => (sl, m, s, p),
        (sl, m, s, p) => {
            errors.extend([sl.err(), m.err(), s.err(), p.err()].into_iter().flatten());
            return Err(ApiError::Validation(errors));
        }
    };
    let refuse = |field: &str, rule: &'static str, message: String| {
        ApiError::Validation(vec![FieldError::new(field, rule, message)])
    };
    let (mpp, source) = match (slide.mpp_x, stated) {
        (Some(file), Some(request)) if (request / file - 1.0).abs() > 0.02 => {
            return Err(refuse(
                "mpp",
                "contradicts_file",
                format!("the slide's file states {file} µm/pixel; {request} contradicts it"),
            ));
        }
        (Some(file), _) => (file, "file"),
        (None, Some(request)) => (request, "request"),
        (None, None) => {
            return Err(refuse(
                "mpp",
                "missing",
                format!(
                    "slide {} states no µm/pixel: send mpp (µm per level-0 pixel) so that tiles are cut at the right size",
                    slide.id
                ),
            ));
        }
    };
    if mpp > spec.mpp * 1.001 {
        return Err(refuse(
            "slide",
            "too_coarse",
            format!(
                "the slide's finest level has {mpp} µm/pixel; {} needs {} µm/pixel or finer",
                model.manifest.name, spec.mpp
            ),
        ));
    }
    let mut input = json!({"slide": slide.id, "mpp": mpp, "mpp_source": source});
    let mut digest = hex::encode(Sha256::digest(format!("slide:{}:mpp:{mpp}", slide.sha256)));
    let recorded_under = match mil {
        Some(mil) => {
            let m = &model.manifest;
            input["encoder"] = json!({"name": m.name, "version": m.version});
            digest = hex::encode(Sha256::digest(format!(
                "{digest}:encoder:{}@{}",
                m.name, m.onnx.sha256
            )));
            mil
        }
        None => model,
    };
    one_analysis(recorded_under, priority, subject, &input, digest, started)
}

/// Body keys that are not among `allowed`, each named as an error.
fn unknown_fields(body: &Map<String, Value>, allowed: &[&str], what: &str) -> Vec<FieldError> {
    body.keys()
        .filter(|k| !allowed.contains(&k.as_str()))
        .map(|k| {
            FieldError::new(
                k.clone(),
                "unknown",
                format!("{k} is not a field of {what}"),
            )
        })
        .collect()
}

/// A submission of one queued analysis (a slide or a bag of embeddings).
fn one_analysis(
    model: Arc<LoadedModel>,
    priority: Priority,
    subject: Option<&str>,
    input: &Value,
    digest: String,
    started: Instant,
) -> ApiResult<Prepared> {
    Ok(Prepared {
        model,
        priority,
        batch_id: None,
        analyses: vec![NewAnalysis {
            id: AnalysisId::new(),
            subject: subject.map(str::to_owned),
            input: serde_json::value::to_raw_value(input).map_err(anyhow::Error::from)?,
            input_sha256: digest,
            validate_ms: started.elapsed().as_secs_f64() * 1e3,
            finished: None,
        }],
        row: None,
    })
}

/// `{"model", "slide", "mpp"?, "subject"?, "priority"?}` for a MIL model with an encoder: the
/// slide is checked against the encoder (it cuts the tiles), and the analysis, recorded under the
/// MIL model, names the encoder version that will run.
async fn prepare_bag_of_slide(
    state: &AppState,
    principal: &Principal,
    body: &Map<String, Value>,
    model: Arc<LoadedModel>,
) -> ApiResult<Prepared> {
    let refuse = |rule: &'static str, message: String| {
        ApiError::Validation(vec![FieldError::new("model", rule, message)])
    };
    let name = &model.manifest.name;
    let Some(encoder) = model
        .manifest
        .mil
        .as_ref()
        .and_then(|m| m.encoder_model.clone())
    else {
        return Err(refuse(
            "no_encoder",
            format!(
                "{name} takes tile embeddings and names no encoder to make them from a slide: send {{\"model\", \"embeddings\": <embeddings id>}}"
            ),
        ));
    };
    let encoder = match find_model(state, principal, &encoder).await? {
        Ok(found)
            if found
                .manifest
                .slide
                .as_ref()
                .is_some_and(|s| s.embedding.is_some()) =>
        {
            found
        }
        _ => {
            return Err(refuse(
                "no_encoder",
                format!(
                    "{name} needs the tile encoder {encoder}, which is not an active slide encoder here"
                ),
            ));
        }
    };
    prepare_slide(state, principal, body, encoder, Some(model)).await
}

/// `{"model", "embeddings", "subject"?, "priority"?}` for a MIL model: the bag must be the
/// tenant's and as wide as the model's embeddings.
async fn prepare_bag(
    state: &AppState,
    principal: &Principal,
    body: &Map<String, Value>,
    model: Arc<LoadedModel>,
) -> ApiResult<Prepared> {
    let started = Instant::now();
    let spec = model
        .manifest
        .mil
        .clone()
        .ok_or_else(|| anyhow::anyhow!("prepare_bag called for a model without a MIL head"))?;
    let mut errors = unknown_fields(body, &BAG_FIELDS, "an embeddings analysis");
    let (subject, priority) = (subject_of(body), priority_of(body));
    let unknown = |why: String| FieldError::new("embeddings", "unknown_embeddings", why);
    let bag = match body.get("embeddings") {
        None => Err(FieldError::new(
            "embeddings",
            "required",
            format!(
                "embeddings is required: the id POST /v1/embeddings answered ({} analyses tile embeddings)",
                model.manifest.name
            ),
        )),
        Some(Value::String(id)) => match Uuid::parse_str(id) {
            Ok(id) => repo::embeddings::find(&state.pool, &principal.tenant, Key::Id(id))
                .await?
                .ok_or_else(|| unknown(format!("no embeddings {id} in this tenant"))),
            Err(_) => Err(unknown("embeddings must be an embeddings id".into())),
        },
        Some(_) => Err(unknown("embeddings must be an embeddings id".into())),
    };
    let (bag, subject, priority) = match (bag, subject, priority) {
        (Ok(b), Ok(s), Ok(p)) if errors.is_empty() => (b, s, p),
        (b, s, p) => {
            errors.extend([b.err(), s.err(), p.err()].into_iter().flatten());
            return Err(ApiError::Validation(errors));
        }
    };
    if usize::try_from(bag.dim).ok() != Some(spec.embedding_dim) {
        return Err(ApiError::Validation(vec![FieldError::new(
            "embeddings",
            "wrong_width",
            format!(
                "embeddings {} are {} wide; {} takes {} wide embeddings from {}",
                bag.id, bag.dim, model.manifest.name, spec.embedding_dim, spec.encoder
            ),
        )]));
    }
    let input = json!({"embeddings": bag.id});
    let digest = hex::encode(Sha256::digest(format!("embeddings:{}", bag.sha256)));
    one_analysis(model, priority, subject, &input, digest, started)
}

/// Checks the JSON envelope and the features, collecting every error.
fn prepare_json(body: &Map<String, Value>, model: Option<Resolved>) -> ApiResult<Prepared> {
    let started = Instant::now();
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
        Some(Value::String(_)) => model.unwrap_or_else(|| {
            Err(FieldError::new(
                "model",
                "unknown_model",
                "model could not be resolved",
            ))
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
    let (subject, priority) = (subject_of(body), priority_of(body));
    let (model, features, subject, priority) = match (model, features, subject, priority) {
        (Ok(m), Ok(f), Ok(s), Ok(p)) if errors.is_empty() => (m, f, s, p),
        (m, f, s, p) => {
            errors.extend([m.err(), f.err(), s.err(), p.err()].into_iter().flatten());
            return Err(ApiError::Validation(errors));
        }
    };
    features_model(&model)?;
    let mut valid = model
        .manifest
        .validate_features(features)
        .map_err(ApiError::Validation)?;
    let row = (
        std::mem::take(&mut valid.encoded),
        std::mem::take(&mut valid.outside_training_range),
    );
    let analysis = new_analysis(valid, subject, started.elapsed().as_secs_f64() * 1e3);
    Ok(Prepared {
        model,
        priority,
        batch_id: None,
        analyses: vec![analysis],
        row: Some(row),
    })
}

/// Parses a CSV batch: all rows valid, or a 422 naming every bad row and column.
fn prepare_csv(
    params: &SubmitParams,
    model: Option<Resolved>,
    bytes: &[u8],
) -> ApiResult<Prepared> {
    let started = Instant::now();
    let model = match &params.model {
        None => Err(FieldError::new(
            "model",
            "missing",
            "a CSV batch needs ?model=<name>",
        )),
        Some(_) => model.unwrap_or_else(|| {
            Err(FieldError::new(
                "model",
                "unknown_model",
                "model could not be resolved",
            ))
        }),
    }
    .map_err(|e| ApiError::Validation(vec![e]))?;
    features_model(&model)?;
    let valid_rows = batch::csv_rows(&model.manifest, bytes).map_err(|e| match e {
        batch::BatchError::Unreadable(reason) => ApiError::BadRequest(reason),
        batch::BatchError::Invalid(errors) => ApiError::Validation(errors),
    })?;
    let per_row_ms = started.elapsed().as_secs_f64() * 1e3 / valid_rows.len() as f64;
    let analyses = valid_rows
        .into_iter()
        .map(|(valid, subject)| new_analysis(valid, subject.as_deref(), per_row_ms))
        .collect();
    Ok(Prepared {
        model,
        priority: params.priority.unwrap_or_default(),
        batch_id: Some(Uuid::now_v7()),
        analyses,
        row: None,
    })
}

/// The model a submission names: its active version for this tenant, or a contract error.
type Resolved = Result<Arc<LoadedModel>, FieldError>;

/// Features go to feature models only; a slide model is sent `{"model", "slide"}`, a MIL model
/// `{"model", "embeddings"}`.
fn features_model(model: &LoadedModel) -> ApiResult<()> {
    if model.manifest.mil.is_some() {
        return Err(ApiError::Validation(vec![FieldError::new(
            "model",
            "embeddings_model",
            format!(
                "{} analyses tile embeddings: send {{\"model\", \"embeddings\": <embeddings id>}}, not features",
                model.manifest.name
            ),
        )]));
    }
    if model.manifest.slide.is_some() {
        return Err(ApiError::Validation(vec![FieldError::new(
            "model",
            "slide_model",
            format!(
                "{} analyses slides: send {{\"model\", \"slide\": <slide id>}}, not features",
                model.manifest.name
            ),
        )]));
    }
    Ok(())
}

async fn find_model(state: &AppState, principal: &Principal, name: &str) -> ApiResult<Resolved> {
    if let Some(model) = state.registry.active(&principal.tenant, name).await? {
        return Ok(Ok(model));
    }
    let known = state.registry.active_names(&principal.tenant).await?;
    Ok(Err(FieldError::new(
        "model",
        "unknown_model",
        format!("no active model {name:?}; available: {}", known.join(", ")),
    )))
}

/// Stored in the model's input order, exactly as validated.
fn new_analysis(valid: ValidFeatures, subject: Option<&str>, validate_ms: f64) -> NewAnalysis {
    NewAnalysis {
        id: AnalysisId::new(),
        subject: subject.map(str::to_owned),
        input: valid.canonical,
        input_sha256: valid.digest,
        validate_ms,
        finished: None,
    }
}
