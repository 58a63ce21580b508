//! `/v1/models`: the model catalogue with cards and input contracts, and (admins) registering,
//! activating and retiring versions.

use crate::app::AppState;
use crate::auth::{Principal, Role};
use crate::domain::contract::Manifest;
use crate::error::{ApiError, ApiResult, Problem};
use crate::registry::register::RegisterError;
use crate::repo;
use crate::repo::models::ModelRow;
use axum::Json;
use axum::extract::{Multipart, Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct VersionSummary {
    pub version: String,
    /// `active` (used for new analyses), `staged` (registered, not yet active) or `retired`.
    pub state: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ModelSummary {
    pub name: String,
    pub title: String,
    /// `classification` or `survival`.
    pub task: String,
    pub modality: String,
    /// The version new analyses use; absent when every version is staged or retired.
    pub active_version: Option<String>,
    /// `bundled` with onkos, or `registered` by an admin of this tenant.
    pub source: String,
    pub versions: Vec<VersionSummary>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ModelList {
    pub models: Vec<ModelSummary>,
}

/// One version, with everything a clinician or integrator needs to judge and call it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ModelDetail {
    pub name: String,
    pub version: String,
    pub state: String,
    pub title: String,
    pub task: String,
    pub modality: String,
    pub source: String,
    pub intended_use: String,
    /// sha256 of the ONNX file; every analysis records it.
    pub onnx_sha256: String,
    pub manifest_sha256: String,
    /// The input contract as JSON Schema: names, units, ranges, categorical levels.
    #[schema(value_type = Object)]
    pub input_schema: Value,
    /// The full manifest: outputs, threshold or horizons, cohort, held-out metrics.
    #[schema(value_type = Object)]
    pub manifest: Value,
    /// The model card (Markdown).
    pub card: String,
    pub versions: Vec<VersionSummary>,
    pub created_at: DateTime<Utc>,
}

fn versions_of(rows: &[ModelRow], name: &str) -> Vec<VersionSummary> {
    rows.iter()
        .filter(|r| r.name == name)
        .map(|r| VersionSummary {
            version: r.version.clone(),
            state: r.state.clone(),
            created_at: r.created_at,
        })
        .collect()
}

fn detail(row: ModelRow, versions: Vec<VersionSummary>) -> ApiResult<ModelDetail> {
    let manifest: Manifest =
        serde_json::from_value(row.manifest.clone()).map_err(anyhow::Error::from)?;
    Ok(ModelDetail {
        input_schema: manifest.input_schema(),
        intended_use: manifest.intended_use,
        name: row.name,
        version: row.version,
        state: row.state,
        title: row.title,
        task: row.task,
        modality: row.modality,
        source: row.source,
        onnx_sha256: row.onnx_sha256,
        manifest_sha256: row.manifest_sha256,
        manifest: row.manifest,
        card: row.card,
        versions,
        created_at: row.created_at,
    })
}

const READERS: [Role; 3] = [Role::Submitter, Role::Clinician, Role::Admin];

/// List the models this tenant can use.
#[utoipa::path(get, path = "/v1/models", tag = "models", security(("bearer" = [])), responses(
    (status = 200, description = "The catalogue", body = ModelList),
    (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
    (status = 403, description = "The token has no onkos role", body = Problem, content_type = "application/problem+json"),
))]
pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
) -> ApiResult<Json<ModelList>> {
    principal.require(&READERS)?;
    let rows = repo::models::list_visible(&state.pool, &principal.tenant).await?;
    let mut models: Vec<ModelSummary> = Vec::new();
    for row in &rows {
        if models.iter().any(|m| m.name == row.name) {
            continue;
        }
        let active = rows
            .iter()
            .find(|r| r.name == row.name && r.state == "active");
        let shown = active.unwrap_or(row);
        models.push(ModelSummary {
            name: row.name.clone(),
            title: shown.title.clone(),
            task: shown.task.clone(),
            modality: shown.modality.clone(),
            active_version: active.map(|r| r.version.clone()),
            source: shown.source.clone(),
            versions: versions_of(&rows, &row.name),
        });
    }
    Ok(Json(ModelList { models }))
}

/// The active version of a model: card, input contract (JSON Schema), metrics.
#[utoipa::path(get, path = "/v1/models/{name}", tag = "models", security(("bearer" = [])),
    params(("name" = String, Path, description = "Model name")),
    responses(
        (status = 200, description = "The active version", body = ModelDetail),
        (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The token has no onkos role", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such model, or none of its versions is active", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get(
    State(state): State<AppState>,
    principal: Principal,
    Path(name): Path<String>,
) -> ApiResult<Json<ModelDetail>> {
    principal.require(&READERS)?;
    let row = repo::models::find_active(&state.pool, &principal.tenant, &name)
        .await?
        .ok_or(ApiError::NotFound)?;
    let rows = repo::models::list_visible(&state.pool, &principal.tenant).await?;
    Ok(Json(detail(row, versions_of(&rows, &name))?))
}

/// One version of a model, whatever its state.
#[utoipa::path(get, path = "/v1/models/{name}/versions/{version}", tag = "models", security(("bearer" = [])),
    params(("name" = String, Path, description = "Model name"), ("version" = String, Path, description = "Version")),
    responses(
        (status = 200, description = "The version", body = ModelDetail),
        (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The token has no onkos role", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such version", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn version(
    State(state): State<AppState>,
    principal: Principal,
    Path((name, version)): Path<(String, String)>,
) -> ApiResult<Json<ModelDetail>> {
    principal.require(&READERS)?;
    let row = repo::models::find_visible(&state.pool, &principal.tenant, &name, &version)
        .await?
        .ok_or(ApiError::NotFound)?;
    let rows = repo::models::list_visible(&state.pool, &principal.tenant).await?;
    Ok(Json(detail(row, versions_of(&rows, &name))?))
}

/// Register a model version (admin). Multipart parts: `manifest` (JSON, format `onkos.manifest/3` or `/2`),
/// `onnx` (the file) and optionally `card` (Markdown).
///
/// Nothing is stored unless the manifest is consistent, the file's sha256 matches it, the ONNX loads,
/// has the manifest's input and outputs and answers a probe row with outputs of the promised shape.
/// The new version is `staged`: activate it to use it.
#[utoipa::path(post, path = "/v1/models", tag = "models", security(("bearer" = [])),
    request_body(content_type = "multipart/form-data", description = "Parts: manifest, onnx, card (optional)"),
    responses(
        (status = 201, description = "Registered (staged)", body = ModelDetail,
            headers(("Location" = String, description = "/v1/models/{name}/versions/{version}"))),
        (status = 400, description = "The body is not readable multipart", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The token lacks the admin role", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The name belongs to another model, or the version exists", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "The upload exceeds the limit", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Not a usable model: the reason is in `detail`", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn register(
    State(state): State<AppState>,
    principal: Principal,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> ApiResult<Response> {
    principal.require(&[Role::Admin])?;
    let mut multipart = multipart.map_err(|e| {
        ApiError::BadRequest(format!("expected multipart/form-data: {}", e.body_text()))
    })?;
    let (mut manifest, mut onnx, mut card) = (None, None, String::new());
    while let Some(field) = multipart.next_field().await.map_err(multipart_error)? {
        let name = field.name().unwrap_or_default().to_owned();
        let bytes = field.bytes().await.map_err(multipart_error)?;
        match name.as_str() {
            "manifest" => manifest = Some(bytes),
            "onnx" => onnx = Some(bytes),
            "card" => {
                card = String::from_utf8(bytes.to_vec())
                    .map_err(|_| invalid("card", "the card is not UTF-8 text"))?
            }
            other => {
                return Err(invalid(
                    other,
                    &format!("unexpected part {other:?}; send manifest, onnx and card"),
                ));
            }
        }
    }
    let manifest = manifest.ok_or_else(|| invalid("manifest", "the manifest part is missing"))?;
    let onnx = onnx.ok_or_else(|| invalid("onnx", "the onnx part is missing"))?;
    let row = state
        .registry
        .register(&principal.tenant, &principal.subject, &manifest, onnx, card)
        .await
        .map_err(|e| match e {
            RegisterError::Invalid(why) => invalid("onnx", &why),
            RegisterError::Conflict(why) => ApiError::Conflict(why),
            RegisterError::Internal(e) => ApiError::Internal(e),
        })?;
    repo::audit::record(
        &state.pool,
        &principal.tenant,
        &principal.subject,
        "model.register",
        "model",
        &format!("{}/{}", row.name, row.version),
    )
    .await?;
    let location = format!("/v1/models/{}/versions/{}", row.name, row.version);
    let name = row.name.clone();
    let body = detail(
        row,
        versions_of(
            &repo::models::list_visible(&state.pool, &principal.tenant).await?,
            &name,
        ),
    )?;
    let mut response = (StatusCode::CREATED, Json(body)).into_response();
    if let Ok(value) = location.parse() {
        response.headers_mut().insert(header::LOCATION, value);
    }
    Ok(response)
}

fn multipart_error(e: axum::extract::multipart::MultipartError) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge
    } else {
        ApiError::BadRequest(format!("unreadable multipart body: {}", e.body_text()))
    }
}

fn invalid(field: &str, why: &str) -> ApiError {
    ApiError::Validation(vec![crate::domain::contract::FieldError::new(
        field,
        "invalid_model",
        why,
    )])
}

/// Finds a version this tenant's admin may change: its own, not a bundled one.
async fn own_version(
    state: &AppState,
    principal: &Principal,
    name: &str,
    version: &str,
) -> ApiResult<ModelRow> {
    principal.require(&[Role::Admin])?;
    let row = repo::models::find_visible(&state.pool, &principal.tenant, name, version)
        .await?
        .ok_or(ApiError::NotFound)?;
    if row.tenant_id.is_none() {
        return Err(ApiError::Forbidden(
            "bundled models are managed by the deployment, not by a tenant".into(),
        ));
    }
    Ok(row)
}

/// Make a version the one new analyses use (admin); the previously active version is retired.
#[utoipa::path(post, path = "/v1/models/{name}/versions/{version}/activate", tag = "models", security(("bearer" = [])),
    params(("name" = String, Path, description = "Model name"), ("version" = String, Path, description = "Version")),
    responses(
        (status = 200, description = "Active", body = ModelDetail),
        (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin, or a bundled model", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such version", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn activate(
    State(state): State<AppState>,
    principal: Principal,
    Path((name, version)): Path<(String, String)>,
) -> ApiResult<Json<ModelDetail>> {
    own_version(&state, &principal, &name, &version).await?;
    let mut tx = state.pool.begin().await?;
    repo::models::activate(&mut tx, &name, &version).await?;
    repo::audit::record(
        &mut *tx,
        &principal.tenant,
        &principal.subject,
        "model.activate",
        "model",
        &format!("{name}/{version}"),
    )
    .await?;
    tx.commit().await?;
    state.registry.forget_active();
    changed(&state, &principal, &name, &version).await
}

/// Retire a version (admin): no new analysis uses it; analyses already queued still run on it.
#[utoipa::path(post, path = "/v1/models/{name}/versions/{version}/retire", tag = "models", security(("bearer" = [])),
    params(("name" = String, Path, description = "Model name"), ("version" = String, Path, description = "Version")),
    responses(
        (status = 200, description = "Retired", body = ModelDetail),
        (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin, or a bundled model", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such version", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn retire(
    State(state): State<AppState>,
    principal: Principal,
    Path((name, version)): Path<(String, String)>,
) -> ApiResult<Json<ModelDetail>> {
    own_version(&state, &principal, &name, &version).await?;
    repo::models::retire(&state.pool, &name, &version).await?;
    state.registry.forget_active();
    repo::audit::record(
        &state.pool,
        &principal.tenant,
        &principal.subject,
        "model.retire",
        "model",
        &format!("{name}/{version}"),
    )
    .await?;
    changed(&state, &principal, &name, &version).await
}

async fn changed(
    state: &AppState,
    principal: &Principal,
    name: &str,
    version: &str,
) -> ApiResult<Json<ModelDetail>> {
    let row = repo::models::find_visible(&state.pool, &principal.tenant, name, version)
        .await?
        .ok_or(ApiError::NotFound)?;
    let rows = repo::models::list_visible(&state.pool, &principal.tenant).await?;
    Ok(Json(detail(row, versions_of(&rows, name))?))
}
