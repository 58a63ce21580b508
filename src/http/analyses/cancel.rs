//! `DELETE /v1/analyses/{id}`: cancel a queued or running analysis.

use super::{AnalysisView, view};
use crate::app::AppState;
use crate::auth::{Principal, Role};
use crate::domain::ids::AnalysisId;
use crate::error::{ApiError, ApiResult, Problem};
use crate::repo;
use crate::repo::analyses::Cancelled;
use axum::Json;
use axum::extract::{Path, State};
use uuid::Uuid;

/// Cancel an analysis.
///
/// A queued analysis is never run; a running one is never completed — the worker holding it
/// discards its outcome. Cancelling a cancelled analysis is a no-op; cancelling one that already
/// succeeded or failed is a 409.
#[utoipa::path(delete, path = "/v1/analyses/{id}", tag = "analyses",
    params(("id" = Uuid, Path, description = "The analysis id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Cancelled (now or before)", body = AnalysisView),
        (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The token lacks the submitter role", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such analysis in the caller's tenant", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The analysis already succeeded or failed", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The database is not reachable", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn cancel(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<AnalysisView>> {
    principal.require(&[Role::Submitter, Role::Admin])?;
    let id = Uuid::parse_str(&id)
        .map(AnalysisId)
        .map_err(|_| ApiError::NotFound)?;
    let mut tx = state.pool.begin().await?;
    let outcome = repo::analyses::cancel(&mut tx, &principal.tenant, id).await?;
    match outcome {
        Cancelled::Now => {
            repo::audit::record(
                &mut *tx,
                &principal.tenant,
                &principal.subject,
                "analysis.cancel",
                "analysis",
                &id.to_string(),
            )
            .await?;
            tx.commit().await?;
            tracing::info!(analysis = %id, "analysis cancelled");
        }
        Cancelled::AlreadyFinal(status) if status == "cancelled" => tx.commit().await?,
        Cancelled::AlreadyFinal(status) => {
            return Err(ApiError::Conflict(format!(
                "the analysis already {status}; it cannot be cancelled"
            )));
        }
        Cancelled::NotFound => return Err(ApiError::NotFound),
    }
    let record = repo::analyses::find(&state.pool, &principal.tenant, id, None)
        .await?
        .ok_or(ApiError::NotFound)?;
    Ok(Json(view(&state, record).await?))
}
