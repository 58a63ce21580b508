//! `POST /v1/slides`: a whole-slide image streamed to the blob store (never whole in memory),
//! hashed on the way, recognised and inspected before it is kept; `GET /v1/slides/{id}`.

use crate::app::AppState;
use crate::auth::{Principal, Role};
use crate::domain::contract::FieldError;
use crate::error::{ApiError, ApiResult, Problem};
use crate::repo;
use crate::repo::slides::{Key, NewSlide, SlideRecord};
use crate::slides::archive::Contents;
use crate::slides::openslide::OpenSlideSlide;
use crate::slides::{Level, SNIFF_LEN, SlideError, Sniffed};
use axum::Json;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UploadParams {
    /// The file's name as the scanner wrote it (kept for people; the format is read from the bytes).
    #[param(max_length = 255, pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*$")]
    pub filename: Option<String>,
}

/// A slide as onkos read it from its file.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SlideView {
    pub id: Uuid,
    pub filename: Option<String>,
    /// `aperio-svs`, `hamamatsu-ndpi`, `generic-tiff`, `dicom-wsi` or `mirax`.
    pub format: String,
    pub vendor: Option<String>,
    pub size_bytes: i64,
    /// sha256 of the file's bytes: the same bytes in the same tenant are the same slide.
    pub sha256: String,
    /// Level-0 size in pixels.
    pub width: i64,
    pub height: i64,
    /// The pyramid, level 0 (full resolution) first.
    pub levels: Vec<Level>,
    /// Micrometres per level-0 pixel, when the file states it.
    pub mpp_x: Option<f64>,
    pub mpp_y: Option<f64>,
    /// Objective magnification, when the file states it.
    pub objective: Option<f64>,
    pub created_at: DateTime<Utc>,
}

fn view(r: SlideRecord) -> SlideView {
    SlideView {
        id: r.id,
        filename: r.filename,
        format: r.format,
        vendor: r.vendor,
        size_bytes: r.size_bytes,
        sha256: r.sha256,
        width: r.width,
        height: r.height,
        levels: r.levels.0,
        mpp_x: r.mpp_x,
        mpp_y: r.mpp_y,
        objective: r.objective,
        created_at: r.created_at,
    }
}

/// Removes a staged upload however the request ends (error, refusal, client gone).
pub(crate) struct Staged(pub(crate) PathBuf);

impl Drop for Staged {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = std::fs::remove_dir_all(crate::slides::archive::folder_of(&self.0));
    }
}

/// Upload a whole-slide image (raw bytes, `application/octet-stream`).
///
/// The body is streamed to storage and hashed on the way; memory use does not grow with the file.
/// Formats read today: Aperio SVS, Hamamatsu NDPI, generic tiled or pyramidal TIFF, DICOM WSI (one
/// VL Whole Slide Microscopy instance, or a zip of a series' instances) and, through OpenSlide,
/// other TIFF-based vendor formats and MIRAX (a zip of the `.mrxs` file and its folder). The answer is
/// 201 with the new slide, or 200 with the existing one when the tenant already uploaded these bytes.
#[utoipa::path(post, path = "/v1/slides", tag = "slides", security(("bearer" = [])),
    params(UploadParams),
    request_body(content_type = "application/octet-stream", description = "The slide file, as the scanner wrote it"),
    responses(
        (status = 201, description = "Stored", body = SlideView,
            headers(("Location" = String, description = "/v1/slides/{id}"))),
        (status = 200, description = "These bytes were already uploaded in this tenant: that slide", body = SlideView),
        (status = 400, description = "A query parameter is wrong", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The token may not upload", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "The file exceeds ONKOS_SLIDE_UPLOAD_LIMIT_BYTES", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not application/octet-stream, or not a slide format onkos reads", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A supported format, but broken, truncated or not a whole-slide image", body = Problem, content_type = "application/problem+json"),
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
        "a slide",
        state.config.slide_upload_limit_bytes,
    )
    .await?;
    let path = staged.0.clone();
    let limit = state.config.slide_upload_limit_bytes;
    let info = tokio::task::spawn_blocking(move || {
        let mut head = [0_u8; SNIFF_LEN];
        let mut file = std::fs::File::open(&path)?;
        let n = std::io::Read::read(&mut file, &mut head)?;
        let read = match crate::slides::sniff(&head[..n]) {
            Sniffed::Tiff => {
                crate::slides::inspect(std::io::BufReader::new(std::fs::File::open(&path)?))
            }
            Sniffed::Dicom => crate::slides::dicom::inspect(std::slice::from_ref(&path)),
            Sniffed::Zip => match crate::slides::archive::unpacked(&path, limit) {
                Ok(Contents::Dicom(files)) => crate::slides::dicom::inspect(&files),
                Ok(Contents::Mirax(mrxs)) => {
                    OpenSlideSlide::open(&mrxs, 1).map(|s| s.info("mirax"))
                }
                Err(e) => Err(e),
            },
            Sniffed::Unknown => Err(SlideError::Unsupported(
                "not a slide: the bytes are neither TIFF-based (SVS, NDPI, generic TIFF) nor DICOM"
                    .into(),
            )),
        };
        Ok::<_, std::io::Error>(read)
    })
    .await
    .map_err(|e| anyhow::anyhow!("slide inspection died: {e}"))?
    .map_err(|e| anyhow::anyhow!("cannot read the staged upload: {e}"))?
    .map_err(|e| match e {
        SlideError::Unsupported(why) => ApiError::UnsupportedMediaType(why),
        SlideError::Internal(why) => ApiError::from(anyhow::anyhow!("slide inspection: {why}")),
        SlideError::Invalid(why) => {
            ApiError::Validation(vec![FieldError::new("body", "not_a_slide", why)])
        }
    })?;

    if let Some(existing) =
        repo::slides::find(&state.pool, &principal.tenant, Key::Digest(&sha256)).await?
    {
        return Ok(answer(StatusCode::OK, existing));
    }
    let id = Uuid::now_v7();
    let blob_key = format!("slides/{id}");
    state
        .blobs
        .put_file(&blob_key, &staged.0)
        .await
        .map_err(not_stored)?;
    // An archive's extracted files go with it.
    let unpacked = crate::slides::archive::folder_of(&staged.0);
    if unpacked.is_dir() {
        tokio::fs::rename(
            &unpacked,
            crate::slides::archive::folder_of(&state.blobs.local_path(&blob_key)),
        )
        .await
        .map_err(|e| anyhow::anyhow!("cannot store the extracted archive: {e}"))?;
    }
    let slide = NewSlide {
        id,
        tenant: &principal.tenant,
        uploaded_by: &principal.subject,
        filename: filename.as_deref(),
        sha256: &sha256,
        size_bytes: size,
        info: &info,
        blob_key: &blob_key,
    };
    let stored = async {
        let mut tx = state.pool.begin().await?;
        if !repo::slides::insert(&mut tx, &slide).await? {
            return Ok::<_, sqlx::Error>(false);
        }
        repo::audit::record(
            &mut *tx,
            &principal.tenant,
            &principal.subject,
            "slide.upload",
            "slide",
            &id.to_string(),
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }
    .await;
    match stored {
        Ok(true) => {
            tracing::info!(slide = %id, size, format = %info.format, "slide stored");
            let record = repo::slides::find(&state.pool, &principal.tenant, Key::Id(id))
                .await?
                .ok_or_else(|| anyhow::anyhow!("slide {id} vanished after its insert"))?;
            Ok(answer(StatusCode::CREATED, record))
        }
        outcome => {
            // Not stored (a concurrent upload of the same bytes won, or the insert failed): the
            // moved file (and an archive's extracted files) are not referenced by any row.
            state.blobs.delete(&blob_key).await?;
            let _ = tokio::fs::remove_dir_all(crate::slides::archive::folder_of(
                &state.blobs.local_path(&blob_key),
            ))
            .await;
            outcome?;
            let existing = repo::slides::find(&state.pool, &principal.tenant, Key::Digest(&sha256))
                .await?
                .ok_or_else(|| anyhow::anyhow!("slide with digest {sha256} vanished"))?;
            Ok(answer(StatusCode::OK, existing))
        }
    }
}

fn answer(status: StatusCode, record: SlideRecord) -> Response {
    let location = format!("/v1/slides/{}", record.id);
    let mut response = (status, Json(view(record))).into_response();
    if let Ok(value) = location.parse() {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

/// A raw-file upload, staged: removed when dropped unless moved into the blob store first.
pub(crate) struct Upload {
    pub staged: Staged,
    pub filename: Option<String>,
    pub sha256: String,
    pub size: i64,
}

/// Checks a raw-file upload's content type and `filename`, then streams the body to a staging
/// file, hashing it, under `limit` bytes. `what` names the file for the caller ("a slide").
pub(crate) async fn stage(
    state: &AppState,
    params: Result<Query<UploadParams>, QueryRejection>,
    headers: &HeaderMap,
    body: Body,
    what: &str,
    limit: u64,
) -> ApiResult<Upload> {
    let Query(params) = params.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let declared = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !declared.eq_ignore_ascii_case("application/octet-stream") {
        return Err(ApiError::UnsupportedMediaType(format!(
            "{what} is uploaded as application/octet-stream (the raw file), not {declared:?}"
        )));
    }
    let filename = params.filename.filter(|f| !f.trim().is_empty());
    if filename
        .as_ref()
        .is_some_and(|f| f.len() > 255 || f.chars().any(char::is_control))
    {
        return Err(ApiError::BadRequest(
            "filename must be at most 255 characters, without control characters".into(),
        ));
    }
    let staged = Staged(state.blobs.staging_path());
    let (sha256, size) = stream_to(&staged.0, body, limit).await?;
    Ok(Upload {
        staged,
        filename,
        sha256,
        size,
    })
}

/// An upload that could not be written (a full volume, an unreachable object store): 503, and the
/// staged file goes with the request, so nothing is half-kept.
pub(crate) fn not_stored(e: anyhow::Error) -> ApiError {
    tracing::error!(error = format!("{e:#}"), "an upload could not be stored");
    ApiError::Unavailable(
        "the upload could not be stored (storage is full or unreachable); nothing was kept, try again later"
            .into(),
    )
}

/// Streams the body into `path`, hashing it; 413 as soon as it passes `limit`.
async fn stream_to(path: &PathBuf, body: Body, limit: u64) -> ApiResult<(String, i64)> {
    let mut file = tokio::fs::File::create(path).await.map_err(|e| {
        not_stored(anyhow::anyhow!(
            "cannot stage an upload at {}: {e}",
            path.display()
        ))
    })?;
    let mut hash = Sha256::new();
    let mut size: u64 = 0;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::BadRequest(format!("the upload broke off: {e}")))?;
        size += chunk.len() as u64;
        if size > limit {
            return Err(ApiError::PayloadTooLarge);
        }
        hash.update(&chunk);
        file.write_all(&chunk)
            .await
            .map_err(|e| not_stored(anyhow::anyhow!("cannot write the staged upload: {e}")))?;
    }
    file.flush()
        .await
        .map_err(|e| not_stored(anyhow::anyhow!("cannot write the staged upload: {e}")))?;
    if size == 0 {
        return Err(ApiError::Validation(vec![FieldError::new(
            "body",
            "empty",
            "the upload is empty",
        )]));
    }
    let size = i64::try_from(size).map_err(|_| ApiError::PayloadTooLarge)?;
    Ok((hex::encode(hash.finalize()), size))
}

/// A slide of the caller's tenant.
#[utoipa::path(get, path = "/v1/slides/{id}", tag = "slides", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The slide id")),
    responses(
        (status = 200, description = "The slide", body = SlideView),
        (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The token has no onkos role", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such slide in the caller's tenant", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<SlideView>> {
    principal.require(&[Role::Submitter, Role::Clinician, Role::Admin])?;
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::NotFound)?;
    let record = repo::slides::find(&state.pool, &principal.tenant, Key::Id(id))
        .await?
        .ok_or(ApiError::NotFound)?;
    Ok(Json(view(record)))
}

/// The whole slide, small (PNG, long side at most 1024 pixels).
#[utoipa::path(get, path = "/v1/slides/{id}/thumbnail", tag = "slides", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The slide id")),
    responses(
        (status = 200, description = "The thumbnail", content_type = "image/png"),
        (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The token has no onkos role", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such slide in the caller's tenant", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The slide's levels cannot be read for a thumbnail (a damaged file, or a coarsest level too large to read whole)", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn thumbnail(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    principal.require(&[Role::Submitter, Role::Clinician, Role::Admin])?;
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::NotFound)?;
    let record = repo::slides::find(&state.pool, &principal.tenant, Key::Id(id))
        .await?
        .ok_or(ApiError::NotFound)?;
    let path = state.blobs.fetch(&record.blob_key).await?;
    let png = tokio::task::spawn_blocking(move || {
        crate::slides::slide::Slide::open(&path, 1)?
            .overview(1024)?
            .png()
    })
    .await
    .map_err(|e| anyhow::anyhow!("thumbnail rendering died: {e}"))?
    .map_err(|e| match e {
        SlideError::Internal(why) => ApiError::from(anyhow::anyhow!("thumbnail: {why}")),
        e => ApiError::Validation(vec![FieldError::new("slide", "unreadable", e.to_string())]),
    })?;
    Ok(([(header::CONTENT_TYPE, "image/png")], png).into_response())
}
