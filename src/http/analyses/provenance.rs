//! `GET /v1/analyses/{id}/provenance`: what produced a result, and whether it still matches.

use crate::app::AppState;
use crate::auth::{Principal, Role};
use crate::domain::provenance::{self, ProvenanceRecord};
use crate::error::{ApiError, ApiResult, Problem};
use crate::repo;
use axum::Json;
use axum::extract::{Path, State};
use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Provenance {
    pub record: ProvenanceRecord,
    /// sha256 of the record's canonical JSON (sorted keys, no whitespace).
    pub record_sha256: String,
    /// Whether the record is linked into the tenant's chain yet. Records are written with their
    /// result and linked after commit by a sealer, normally within a fraction of a second; until
    /// then `seq`, `previous_sha256` and `chain_sha256` are null.
    pub sealed: bool,
    /// Position in the tenant's chain, from 1.
    pub seq: Option<i64>,
    /// The chain digest of the tenant's result before this one (64 zeros for the first).
    pub previous_sha256: Option<String>,
    /// sha256 of `previous_sha256 ++ record_sha256` (the hex strings).
    pub chain_sha256: Option<String>,
    pub recorded_at: DateTime<Utc>,
    /// True when the record's digests hold and the stored input digest and result still match
    /// it. The whole chain is checked by `onkos audit verify`.
    pub intact: bool,
    /// Why `intact` is false.
    pub problem: Option<String>,
}

/// The provenance of an analysis's result.
///
/// Present once the analysis has succeeded: input digest, model name, version and sha256,
/// manifest digest, code version and execution provider, chained with the tenant's previous result.
#[utoipa::path(get, path = "/v1/analyses/{id}/provenance", tag = "analyses",
    params(("id" = Uuid, Path, description = "The analysis id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The provenance record", body = Provenance),
        (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The token has no onkos role", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such analysis in the caller's tenant, or it has no result yet", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The database is not reachable", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<Provenance>> {
    principal.require(&[Role::Submitter, Role::Clinician, Role::Admin])?;
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::NotFound)?;
    let link = repo::provenance::find(&state.pool, principal.tenant.as_str(), id)
        .await?
        .ok_or(ApiError::NotFound)?;
    let record: ProvenanceRecord = serde_json::from_value(link.record.clone())
        .map_err(|e| anyhow::anyhow!("stored provenance record of {id}: {e}"))?;
    let checked = match (link.seq, link.previous_sha256.as_deref()) {
        (Some(seq), Some(previous)) => provenance::check(previous, seq, &link.stored()),
        _ => provenance::check_record(&link.stored()),
    };
    Ok(Json(Provenance {
        record,
        record_sha256: link.record_sha256,
        sealed: link.seq.is_some(),
        seq: link.seq,
        previous_sha256: link.previous_sha256,
        chain_sha256: link.chain_sha256,
        recorded_at: link.created_at,
        intact: checked.is_ok(),
        problem: checked.err(),
    }))
}
