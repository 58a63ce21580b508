//! `POST /v1/embeddings`: one slide's precomputed tile embeddings (a safetensors file), streamed to
//! the blob store, hashed and read before it is kept; `GET /v1/embeddings/{id}`. A MIL model then
//! analyses them with `POST /v1/analyses {"model", "embeddings": <id>}`.

use crate::app::AppState;
use crate::auth::{Principal, Role};
use crate::domain::contract::FieldError;
use crate::error::{ApiError, ApiResult, Problem};
use crate::http::slides::{Upload, UploadParams, stage};
use crate::repo;
use crate::repo::embeddings::{EmbeddingsRecord, Key, NewEmbeddings};
use axum::Json;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

/// A bag of tile embeddings as onkos read it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EmbeddingsView {
    pub id: Uuid,
    pub filename: Option<String>,
    pub size_bytes: i64,
    /// sha256 of the file's bytes: the same bytes in the same tenant are the same bag.
    pub sha256: String,
    /// N: tiles (rows of `embeddings`).
    pub tiles: i32,
    /// D: the width of each embedding.
    pub dim: i32,
    /// Whether the file gives each tile's level-0 position (`coords`).
    pub has_coords: bool,
    /// The file's own string metadata (`__metadata__`), as sent.
    #[schema(value_type = Object)]
    pub metadata: Value,
    pub created_at: DateTime<Utc>,
}

fn view(r: EmbeddingsRecord) -> EmbeddingsView {
    EmbeddingsView {
        id: r.id,
        filename: r.filename,
        size_bytes: r.size_bytes,
        sha256: r.sha256,
        tiles: r.tiles,
        dim: r.dim,
        has_coords: r.has_coords,
        metadata: r.metadata,
        created_at: r.created_at,
    }
}

/// Upload one slide's tile embeddings (a safetensors file, `application/octet-stream`).
///
/// The file holds `embeddings` (float32 or float64, `[N, D]`, one row per tile) and optionally
/// `coords` (`[N, 2]`, each tile's top-left corner in level-0 pixels); any other tensor, and any
/// value that is not a finite number, is refused with 422. 201 with the new bag, or 200 with the
/// existing one when the tenant already uploaded these bytes.
#[utoipa::path(post, path = "/v1/embeddings", tag = "embeddings", security(("bearer" = [])),
    params(UploadParams),
    request_body(content_type = "application/octet-stream", description = "A safetensors file with `embeddings` [N, D] and optionally `coords` [N, 2]"),
    responses(
        (status = 201, description = "Stored", body = EmbeddingsView,
            headers(("Location" = String, description = "/v1/embeddings/{id}"))),
        (status = 200, description = "These bytes were already uploaded in this tenant: that bag", body = EmbeddingsView),
        (status = 400, description = "A query parameter is wrong", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The token may not upload", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "The file exceeds ONKOS_EMBEDDINGS_UPLOAD_LIMIT_BYTES", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not application/octet-stream", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Not a safetensors file of tile embeddings (the reason says what is wrong)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Storage is full or unreachable, or the database is down: nothing was kept", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn upload(
    State(state): State<AppState>,
    principal: Principal,
    params: Result<Query<UploadParams>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    principal.require(&[Role::Submitter, Role::Admin])?;
    let Upload {
        staged,
        filename,
        sha256,
        size,
    } = stage(
        &state,
        params,
        &headers,
        body,
        "a bag of tile embeddings",
        state.config.embeddings_upload_limit_bytes,
    )
    .await?;
    let path = staged.0.clone();
    let bag = tokio::task::spawn_blocking(move || {
        std::fs::read(&path).map(|bytes| crate::slides::embeddings::parse(&bytes))
    })
    .await
    .map_err(|e| anyhow::anyhow!("reading the embeddings died: {e}"))?
    .map_err(|e| anyhow::anyhow!("cannot read the staged upload: {e}"))?
    .map_err(|why| ApiError::Validation(vec![FieldError::new("body", "not_embeddings", why)]))?;

    if let Some(existing) =
        repo::embeddings::find(&state.pool, &principal.tenant, Key::Digest(&sha256)).await?
    {
        return Ok(answer(StatusCode::OK, existing));
    }
    let id = Uuid::now_v7();
    let blob_key = format!("embeddings/{id}");
    state
        .blobs
        .put_file(&blob_key, &staged.0)
        .await
        .map_err(crate::http::slides::not_stored)?;
    let metadata = serde_json::to_value(&bag.metadata)
        .map_err(|e| anyhow::anyhow!("the metadata cannot be kept: {e}"))?;
    let record = NewEmbeddings {
        id,
        tenant: &principal.tenant,
        uploaded_by: &principal.subject,
        filename: filename.as_deref(),
        sha256: &sha256,
        size_bytes: size,
        // parse() caps the tiles; a width past i32 is refused here rather than wrapped.
        tiles: i32::try_from(bag.tiles).map_err(|_| ApiError::PayloadTooLarge)?,
        dim: i32::try_from(bag.dim).map_err(|_| ApiError::PayloadTooLarge)?,
        has_coords: bag.coords.is_some(),
        metadata: &metadata,
        blob_key: &blob_key,
    };
    let stored = async {
        let mut tx = state.pool.begin().await?;
        if !repo::embeddings::insert(&mut tx, &record).await? {
            return Ok::<_, sqlx::Error>(false);
        }
        repo::audit::record(
            &mut *tx,
            &principal.tenant,
            &principal.subject,
            "embeddings.upload",
            "embeddings",
            &id.to_string(),
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }
    .await;
    let (status, key) = match stored {
        Ok(true) => (StatusCode::CREATED, Key::Id(id)),
        outcome => {
            // Not stored (a concurrent upload of the same bytes won, or the insert failed): the
            // moved file is not referenced by any row.
            state.blobs.delete(&blob_key).await?;
            outcome?;
            (StatusCode::OK, Key::Digest(&sha256))
        }
    };
    let found = repo::embeddings::find(&state.pool, &principal.tenant, key)
        .await?
        .ok_or_else(|| anyhow::anyhow!("embeddings {id} vanished after their insert"))?;
    Ok(answer(status, found))
}

fn answer(status: StatusCode, record: EmbeddingsRecord) -> Response {
    let location = format!("/v1/embeddings/{}", record.id);
    let mut response = (status, Json(view(record))).into_response();
    if let Ok(value) = location.parse() {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

/// A bag of tile embeddings of the caller's tenant.
#[utoipa::path(get, path = "/v1/embeddings/{id}", tag = "embeddings", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The embeddings id")),
    responses(
        (status = 200, description = "The bag", body = EmbeddingsView),
        (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The token has no onkos role", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such bag in the caller's tenant", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<EmbeddingsView>> {
    principal.require(&[Role::Submitter, Role::Clinician, Role::Admin])?;
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::NotFound)?;
    let record = repo::embeddings::find(&state.pool, &principal.tenant, Key::Id(id))
        .await?
        .ok_or(ApiError::NotFound)?;
    Ok(Json(view(record)))
}
