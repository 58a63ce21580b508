//! What a slide analysis looked at, as pictures: the tile scores as a heatmap over the slide
//! (`heatmap.png`) and as GeoJSON polygons in level-0 pixels that QuPath imports (`tiles.geojson`).

use crate::app::AppState;
use crate::auth::{Principal, Role};
use crate::domain::analysis::Status;
use crate::domain::contract::FieldError;
use crate::domain::ids::AnalysisId;
use crate::error::{ApiError, ApiResult, Problem};
use crate::repo;
use crate::repo::slides::Key;
use crate::slides::analyse::TileScores;
use crate::slides::heatmap::{Layer, render};
use crate::slides::slide::Slide;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use uuid::Uuid;

/// Long side of the heatmap, in pixels.
const HEATMAP_SIDE: u32 = 1024;

/// The finished slide analysis `id` of the caller's tenant, its tiles, and the read audited.
async fn finished(
    state: &AppState,
    principal: &Principal,
    id: &str,
    action: &str,
) -> ApiResult<(repo::analyses::AnalysisRecord, TileScores)> {
    principal.require(&[Role::Submitter, Role::Clinician, Role::Admin])?;
    let id = Uuid::parse_str(id)
        .map(AnalysisId)
        .map_err(|_| ApiError::NotFound)?;
    let record = repo::analyses::find(&state.pool, &principal.tenant, id, None)
        .await?
        .ok_or(ApiError::NotFound)?;
    if matches!(
        Status::parse(&record.status),
        Some(Status::Queued | Status::Running)
    ) {
        return Err(ApiError::Conflict(
            "the analysis is not finished yet; wait for it with GET /v1/analyses/{id}?wait=30s"
                .into(),
        ));
    }
    let tiles = repo::slides::tiles(&state.pool, &principal.tenant, id.0)
        .await?
        .ok_or(ApiError::NotFound)?;
    repo::audit::record(
        &state.pool,
        &principal.tenant,
        &principal.subject,
        action,
        "analysis",
        &id.to_string(),
    )
    .await?;
    Ok((record, tiles))
}

/// The tile scores of a slide analysis over the slide (PNG), with a colour bar.
///
/// The measure shown is the model's `heatmap` measure; the colour bar spans its minimum (left) to
/// its maximum (right) over the analysed tiles, as also stated in the `X-Onkos-Heatmap-*` headers.
#[utoipa::path(get, path = "/v1/analyses/{id}/heatmap.png", tag = "analyses", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "A finished slide analysis")),
    responses(
        (status = 200, description = "The heatmap", content_type = "image/png",
            headers(("X-Onkos-Heatmap-Measure" = String, description = "The measure shown"),
                    ("X-Onkos-Heatmap-Min" = f64, description = "Value at the colour bar's left end"),
                    ("X-Onkos-Heatmap-Max" = f64, description = "Value at the colour bar's right end"))),
        (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The token has no onkos role", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such slide analysis with tile scores in the caller's tenant", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The analysis is not finished", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The slide cannot give an overview to paint on", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn heatmap(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let (record, tiles) = finished(&state, &principal, &id, "analysis.heatmap").await?;
    let model = state
        .registry
        .version(&record.model_name, &record.model_version)
        .await?;
    // A MIL model's tiles carry the head's attention.
    let measure = match (&model.manifest.slide, &model.manifest.mil) {
        (Some(s), _) => s.heatmap.clone(),
        (None, Some(_)) => crate::domain::result::ATTENTION.to_owned(),
        (None, None) => return Err(ApiError::NotFound),
    };
    if measure.is_empty() {
        return Err(ApiError::Validation(vec![FieldError::new(
            "model",
            "no_heatmap",
            format!(
                "{} measures nothing per tile (a tile encoder): there is no heatmap",
                record.model_name
            ),
        )]));
    }
    let column = tiles
        .measures
        .iter()
        .position(|m| *m == measure)
        .ok_or_else(|| anyhow::anyhow!("stored tiles lack the heatmap measure {measure}"))?;
    let result = stored_tree(&record);
    let slide_id = result["slide"]["id"]
        .as_str()
        .and_then(|s| Uuid::parse_str(s).ok())
        .ok_or_else(|| {
            ApiError::Validation(vec![FieldError::new(
                "analysis",
                "no_slide",
                "the analysis classified uploaded tile embeddings: there is no slide to paint on",
            )])
        })?;
    let slide = repo::slides::find(&state.pool, &principal.tenant, Key::Id(slide_id))
        .await?
        .ok_or(ApiError::NotFound)?;
    let path = state.blobs.fetch(&slide.blob_key).await?;
    let (width, height) = (slide.width, slide.height);
    let (png, scale) = tokio::task::spawn_blocking(move || {
        let overview = Slide::open(&path, 1)?.overview(HEATMAP_SIDE)?;
        let stride = tiles.measures.len();
        let layer = Layer {
            width: u32::try_from(width).unwrap_or(u32::MAX),
            height: u32::try_from(height).unwrap_or(u32::MAX),
            tile_size_level0: tiles.tile_size_level0,
            xs: &tiles.xs,
            ys: &tiles.ys,
            values: tiles.scores.chunks(stride).map(|row| row[column]).collect(),
        };
        let (picture, scale) = render(&overview, &layer);
        Ok::<_, crate::slides::SlideError>((picture.png()?, scale))
    })
    .await
    .map_err(|e| anyhow::anyhow!("heatmap rendering died: {e}"))?
    .map_err(|e| {
        // The slide cannot give an overview (e.g. no level small enough): say so, as a 422.
        ApiError::Validation(vec![crate::domain::contract::FieldError::new(
            "slide",
            "unreadable",
            format!("no heatmap: {e}"),
        )])
    })?;
    let mut response = ([(header::CONTENT_TYPE, "image/png")], png).into_response();
    let headers = response.headers_mut();
    for (name, value) in [
        ("x-onkos-heatmap-measure", measure),
        ("x-onkos-heatmap-min", scale.min.to_string()),
        ("x-onkos-heatmap-max", scale.max.to_string()),
    ] {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    }
    Ok(response)
}

/// The analysed tiles as a GeoJSON FeatureCollection: one square polygon per tile, in level-0
/// pixel coordinates (x right, y down, as QuPath uses them), with the tile's measures.
#[utoipa::path(get, path = "/v1/analyses/{id}/tiles.geojson", tag = "analyses", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "A finished slide analysis")),
    responses(
        (status = 200, description = "The tiles", content_type = "application/geo+json", body = Object),
        (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The token has no onkos role", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such slide analysis with tile scores in the caller's tenant", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The analysis is not finished", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn geojson(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let (record, tiles) = finished(&state, &principal, &id, "analysis.tiles").await?;
    // A model without a tissue output weighs every tile 1: that is not a tissue fraction.
    let has_tissue = state
        .registry
        .version(&record.model_name, &record.model_version)
        .await
        .ok()
        .and_then(|m| m.manifest.slide.as_ref().map(|s| s.tissue_output.is_some()))
        .unwrap_or(false);
    let side = tiles.tile_size_level0;
    let stride = tiles.measures.len().max(1);
    let features: Vec<Value> = tiles
        .xs
        .iter()
        .zip(&tiles.ys)
        .zip(&tiles.tissue)
        .enumerate()
        .map(|(i, ((&x, &y), &tissue))| {
            // A tile encoder measures nothing per tile: its rows are empty.
            let row = tiles
                .scores
                .get(i * stride..(i + 1) * stride)
                .unwrap_or(&[]);
            let (x, y) = (f64::from(x), f64::from(y));
            let mut measurements = Map::new();
            if has_tissue {
                measurements.insert("tissue_fraction".into(), json!(tissue));
            }
            for (name, value) in tiles.measures.iter().zip(row) {
                measurements.insert(name.clone(), json!(value));
            }
            json!({
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [[
                    [x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]
                ]]},
                "properties": {"objectType": "tile", "measurements": measurements},
            })
        })
        .collect();
    let body = json!({
        "type": "FeatureCollection",
        "properties": {
            "analysis": record.id,
            "model": record.model_name,
            "model_version": record.model_version,
            "coordinates": "level-0 pixels of the slide, x right, y down",
            "tile_size_level0": side,
        },
        "features": features,
    });
    Ok((
        [(header::CONTENT_TYPE, "application/geo+json")],
        serde_json::to_vec(&body).map_err(anyhow::Error::from)?,
    )
        .into_response())
}

/// One evidence tile of a slide analysis as a JPEG crop, read at the resolution the model saw it
/// (`result.evidence[rank - 1]` says where it is on the slide).
#[utoipa::path(get, path = "/v1/analyses/{id}/evidence/{rank}.jpg", tag = "analyses", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "A finished slide analysis"),
           ("rank" = usize, Path, description = "1 = the highest-scoring tile")),
    responses(
        (status = 200, description = "The tile", content_type = "image/jpeg"),
        (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The token has no onkos role", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such slide analysis, or no evidence tile of that rank", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The analysis is not finished", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn evidence(
    State(state): State<AppState>,
    principal: Principal,
    Path((id, file)): Path<(String, String)>,
) -> ApiResult<Response> {
    let rank: usize = file
        .strip_suffix(".jpg")
        .and_then(|r| r.parse().ok())
        .ok_or(ApiError::NotFound)?;
    let (record, _) = finished(&state, &principal, &id, "analysis.evidence").await?;
    let result = stored_tree(&record);
    let tile = rank
        .checked_sub(1)
        .and_then(|i| result["evidence"].get(i))
        .ok_or(ApiError::NotFound)?;
    let number = |v: &Value| v.as_f64().ok_or(ApiError::NotFound);
    let (x, y, size) = (
        number(&tile["x"])?,
        number(&tile["y"])?,
        number(&tile["size"])?,
    );
    let level = result["slide"]["level_used"].as_u64().unwrap_or(0) as usize;
    let downsample = number(&result["slide"]["level_downsample"])?;
    let slide_id = result["slide"]["id"]
        .as_str()
        .and_then(|s| Uuid::parse_str(s).ok())
        .ok_or(ApiError::NotFound)?;
    let slide = repo::slides::find(&state.pool, &principal.tenant, Key::Id(slide_id))
        .await?
        .ok_or(ApiError::NotFound)?;
    let path = state.blobs.fetch(&slide.blob_key).await?;
    let jpeg = tokio::task::spawn_blocking(move || {
        let side = (size / downsample).round() as u32;
        let crop = Slide::open(&path, 1)?.region(
            level,
            (x / downsample).round() as u32,
            (y / downsample).round() as u32,
            side,
            side,
        )?;
        let mut out = std::io::Cursor::new(Vec::new());
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
            .encode(
                &crop.pixels,
                crop.width,
                crop.height,
                image::ExtendedColorType::Rgb8,
            )
            .map_err(|e| crate::slides::SlideError::Invalid(e.to_string()))?;
        Ok::<_, crate::slides::SlideError>(out.into_inner())
    })
    .await
    .map_err(|e| anyhow::anyhow!("evidence crop died: {e}"))?
    .map_err(|e| anyhow::anyhow!("evidence crop: {e}"))?;
    Ok(([(header::CONTENT_TYPE, "image/jpeg")], jpeg).into_response())
}

/// A stored result as a JSON tree (null when there is none).
fn stored_tree(record: &repo::analyses::AnalysisRecord) -> serde_json::Value {
    record
        .result
        .as_ref()
        .and_then(|text| serde_json::from_str(text.0.get()).ok())
        .unwrap_or_default()
}
