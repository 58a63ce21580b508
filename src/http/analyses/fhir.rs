//! `GET /v1/analyses/{id}/fhir`: the analysis as a FHIR R4 Bundle (DiagnosticReport, Observations,
//! Devices); also what `GET /v1/analyses/{id}` answers to `Accept: application/fhir+json`.

use super::view;
use crate::app::AppState;
use crate::auth::{Principal, Role};
use crate::domain::ids::AnalysisId;
use crate::error::{ApiError, ApiResult, Problem};
use crate::render;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::http::header::{ACCEPT, CONTENT_TYPE, HOST};
use axum::response::{IntoResponse, Response};
use uuid::Uuid;

pub const FHIR_JSON: &str = "application/fhir+json";

/// True when the client asked for FHIR JSON.
pub fn wants_fhir(headers: &HeaderMap) -> bool {
    headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|part| {
            part.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case(FHIR_JSON))
        })
}

/// The analysis as a FHIR R4 Bundle.
///
/// A `collection` Bundle with a DiagnosticReport (status, code, subject as given at submission,
/// effective and issued times, conclusion, result references), one Observation per output
/// (class probabilities, decision with its interpretation, risk score, hazard ratio, survival at
/// each horizon, tissue fraction, …) with UCUM units, and Devices for the model (name, version,
/// ONNX sha256) and the service. Codes: `docs/FHIR.md`. Reading it is recorded in the audit trail.
#[utoipa::path(get, path = "/v1/analyses/{id}/fhir", tag = "analyses",
    params(("id" = Uuid, Path, description = "The analysis id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A FHIR R4 Bundle", content_type = "application/fhir+json", body = Object),
        (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The token has no onkos role", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such analysis in the caller's tenant", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The database is not reachable", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    principal.require(&[Role::Submitter, Role::Clinician, Role::Admin])?;
    let id = Uuid::parse_str(&id)
        .map(AnalysisId)
        .map_err(|_| ApiError::NotFound)?;
    let record =
        crate::repo::analyses::find(&state.pool, &principal.tenant, id, Some(&principal.subject))
            .await?
            .ok_or(ApiError::NotFound)?;
    let mut view = view(&state, record).await?;
    // Parsed once here: the Bundle's parts each read the result as a tree.
    view.result = view
        .result
        .map(|result| super::ResultDocument::Read(result.tree().into_owned()));
    Ok(fhir_response(&state, &headers, &view))
}

/// Renders `view` as a Bundle response.
pub fn fhir_response(
    state: &AppState,
    headers: &HeaderMap,
    view: &super::AnalysisView,
) -> Response {
    let base = base_url(state, headers);
    let bundle = render::fhir::bundle(view, &base, env!("CARGO_PKG_VERSION"));
    ([(CONTENT_TYPE, FHIR_JSON)], bundle.to_string()).into_response()
}

/// Where clients reach this API: the configured public URL, else the request's Host.
fn base_url(state: &AppState, headers: &HeaderMap) -> String {
    if let Some(url) = &state.config.public_url {
        return url.trim_end_matches('/').to_owned();
    }
    let host = headers
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            !h.is_empty()
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c))
        })
        .map_or_else(|| state.config.listen.clone(), str::to_owned);
    format!("http://{host}")
}
