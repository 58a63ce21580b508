//! Reading analyses: one (optionally waiting for its result), or a filtered page of the tenant's.

use super::{AnalysisPage, AnalysisSummary, AnalysisView, view};
use crate::app::AppState;
use crate::auth::{Principal, Role};
use crate::domain::analysis::{Priority, Status};
use crate::domain::ids::AnalysisId;
use crate::error::{ApiError, ApiResult, Problem};
use crate::repo;
use crate::repo::analyses::{AnalysisRecord, ListFilter};
use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;
use tokio::time::Instant;
use uuid::Uuid;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct GetParams {
    /// Long poll: answer as soon as the analysis is final, or after this long (e.g. `30s`, `1500ms`),
    /// whichever is first. Capped by the server (`ONKOS_MAX_WAIT_SECS`).
    #[param(pattern = "^[0-9]{1,9}(ms|s|m)?$")]
    pub wait: Option<String>,
}

/// Read an analysis and, once it has run, its result.
///
/// Every read is recorded in the audit trail. Another tenant's analysis answers 404, exactly like a
/// missing one. With `?wait=`, the answer comes when the analysis reaches a final state.
#[utoipa::path(get, path = "/v1/analyses/{id}", tag = "analyses",
    params(("id" = Uuid, Path, description = "The analysis id"), GetParams),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The analysis (as a FHIR R4 Bundle with `Accept: application/fhir+json`)", body = AnalysisView),
        (status = 400, description = "`wait` is not a duration", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The token has no onkos role", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such analysis in the caller's tenant", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The database is not reachable", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
    params: Result<Query<GetParams>, QueryRejection>,
) -> ApiResult<axum::response::Response> {
    principal.require(&[Role::Submitter, Role::Clinician, Role::Admin])?;
    let Query(params) = params.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let id = Uuid::parse_str(&id)
        .map(AnalysisId)
        .map_err(|_| ApiError::NotFound)?;
    let wait = params
        .wait
        .as_deref()
        .map(parse_wait)
        .transpose()?
        .unwrap_or_default()
        .min(state.config.max_wait());
    let done = state.completions.subscribe();
    let record = read_when_final(&state, &principal, id, wait, done, false).await?;
    let view = view(&state, record).await?;
    if super::fhir::wants_fhir(&headers) {
        return Ok(super::fhir::fhir_response(&state, &headers, &view));
    }
    Ok(axum::response::IntoResponse::into_response(Json(view)))
}

pub(crate) fn parse_wait(raw: &str) -> Result<Duration, ApiError> {
    raw.parse::<u64>()
        .map(Duration::from_secs)
        .or_else(|_| humantime::parse_duration(raw))
        .map_err(|_| {
            ApiError::BadRequest(format!(
                "wait: {raw:?} is not a duration like 30s or 1500ms"
            ))
        })
}

fn is_final(record: &AnalysisRecord) -> bool {
    !matches!(
        Status::parse(&record.status),
        Some(Status::Queued | Status::Running)
    )
}

/// Reads the analysis once it is final or `wait` has passed, and records the read in the audit
/// trail. Meanwhile it wakes when a worker reports the analysis done — or every second, in case a
/// notification was missed. `pending` says the caller knows it is not final yet (it was just
/// submitted), which spares a read; `done` must have been subscribed before that knowledge.
pub(crate) async fn read_when_final(
    state: &AppState,
    principal: &Principal,
    id: AnalysisId,
    wait: Duration,
    mut done: broadcast::Receiver<Arc<Vec<Uuid>>>,
    mut pending: bool,
) -> ApiResult<AnalysisRecord> {
    let deadline = Instant::now() + wait;
    loop {
        if Instant::now() >= deadline {
            break;
        }
        if !pending {
            let record = repo::analyses::find(&state.pool, &principal.tenant, id, None)
                .await?
                .ok_or(ApiError::NotFound)?;
            if is_final(&record) {
                break;
            }
        }
        pending = false;
        let recheck = (Instant::now() + Duration::from_secs(1)).min(deadline);
        let notified = loop {
            tokio::select! {
                () = tokio::time::sleep_until(recheck) => break false,
                message = done.recv() => match message {
                    Ok(ids) if ids.contains(&id.0) => break true,
                    Ok(_) => continue,
                    // Notifications were missed: read again (the loop re-reads when not notified).
                    Err(broadcast::error::RecvError::Lagged(_)) => break false,
                    // No more notifications in this process: fall back to the timer.
                    Err(broadcast::error::RecvError::Closed) => {
                        tokio::time::sleep_until(recheck).await;
                        break false;
                    }
                }
            }
        };
        if notified {
            break;
        }
    }
    state
        .reads
        .find(&principal.tenant, id, &principal.subject)
        .await?
        .ok_or(ApiError::NotFound)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Page size, 1–200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<i64>,
    /// Only analyses older than this id (the previous page's `next_before`).
    pub before: Option<Uuid>,
    /// Only analyses in this state.
    pub status: Option<Status>,
    /// Only analyses of this model.
    #[param(pattern = "^[^\\u0000]*$")]
    pub model: Option<String>,
    /// Only analyses with this subject.
    #[param(pattern = "^[^\\u0000]*$")]
    pub subject: Option<String>,
    /// Only the analyses of this CSV batch.
    pub batch: Option<Uuid>,
    /// Only analyses submitted at or after this time (RFC 3339).
    pub created_after: Option<DateTime<Utc>>,
    /// Only analyses submitted before this time (RFC 3339).
    pub created_before: Option<DateTime<Utc>>,
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
    params: Result<Query<ListParams>, QueryRejection>,
) -> ApiResult<Json<AnalysisPage>> {
    principal.require(&[Role::Submitter, Role::Clinician, Role::Admin])?;
    let Query(params) = params.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = params.limit.unwrap_or(50);
    if !(1..=200).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and 200, got {limit}"
        )));
    }
    let filter = ListFilter {
        before: params.before.map(AnalysisId),
        status: params.status.map(|s| s.as_str().to_owned()),
        model: params.model,
        subject: params.subject,
        batch: params.batch,
        created_after: params.created_after,
        created_before: params.created_before,
    };
    let rows = repo::analyses::list(&state.pool, &principal.tenant, &filter, limit).await?;
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
            batch_id: r.batch_id,
            model: r.model_name,
            model_version: r.model_version,
            created_at: r.created_at,
            finished_at: r.finished_at,
        })
        .collect();
    Ok(Json(AnalysisPage { items, next_before }))
}
