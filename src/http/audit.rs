//! `GET /v1/audit`: the tenant's audit trail, for its admins.

use crate::app::AppState;
use crate::auth::{Principal, Role};
use crate::error::{ApiError, ApiResult, Problem};
use crate::repo;
use crate::repo::audit::AuditFilter;
use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditParams {
    /// Only events by this actor (the token's `sub`).
    #[param(pattern = "^[^\\u0000]*$")]
    pub actor: Option<String>,
    /// Only this action, e.g. `analysis.read`, `analysis.cancel`, `model.register`, `webhook.create`.
    #[param(pattern = "^[^\\u0000]*$")]
    pub action: Option<String>,
    /// Only this kind of target, e.g. `analysis`, `model`, `slide`.
    #[param(pattern = "^[^\\u0000]*$")]
    pub target_type: Option<String>,
    /// Only this target.
    #[param(pattern = "^[^\\u0000]*$")]
    pub target_id: Option<String>,
    /// Only events at or after this time (RFC 3339).
    pub since: Option<DateTime<Utc>>,
    /// Only events before this time (RFC 3339).
    pub until: Option<DateTime<Utc>>,
    /// The `next_before` of the previous page.
    pub before: Option<i64>,
    /// Page size, 1–500 (default 100).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AuditEventView {
    pub id: i64,
    pub actor: String,
    pub action: String,
    pub target_type: String,
    pub target_id: String,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AuditPage {
    /// Newest first.
    pub items: Vec<AuditEventView>,
    /// Pass as `before` for the next (older) page; absent on the last page.
    pub next_before: Option<i64>,
}

/// List the tenant's audit events (admins only), newest first, with filters.
#[utoipa::path(get, path = "/v1/audit", tag = "audit",
    params(AuditParams),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A page of audit events", body = AuditPage),
        (status = 400, description = "A filter is malformed", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The token lacks the admin role", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The database is not reachable", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
    params: Result<Query<AuditParams>, QueryRejection>,
) -> ApiResult<Json<AuditPage>> {
    principal.require(&[Role::Admin])?;
    let Query(params) = params.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = params.limit.unwrap_or(100);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and 500, got {limit}"
        )));
    }
    let filter = AuditFilter {
        actor: params.actor,
        action: params.action,
        target_type: params.target_type,
        target_id: params.target_id,
        since: params.since,
        until: params.until,
        before: params.before,
    };
    let rows = repo::audit::list(&state.pool, &principal.tenant, &filter, limit).await?;
    let next_before = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|r| r.id))
        .flatten();
    Ok(Json(AuditPage {
        items: rows
            .into_iter()
            .map(|r| AuditEventView {
                id: r.id,
                actor: r.actor,
                action: r.action,
                target_type: r.target_type,
                target_id: r.target_id,
                at: r.at,
            })
            .collect(),
        next_before,
    }))
}
