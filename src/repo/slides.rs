//! Slides: one row per distinct file per tenant, read back only within the caller's tenant.

use crate::domain::ids::TenantId;
use crate::slides::analyse::TileScores;
use crate::slides::{Level, SlideInfo};
use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

#[derive(Debug)]
pub struct SlideRecord {
    pub id: Uuid,
    pub filename: Option<String>,
    pub sha256: String,
    pub size_bytes: i64,
    pub format: String,
    pub vendor: Option<String>,
    pub width: i64,
    pub height: i64,
    pub levels: Json<Vec<Level>>,
    pub mpp_x: Option<f64>,
    pub mpp_y: Option<f64>,
    pub objective: Option<f64>,
    pub blob_key: String,
    pub created_at: DateTime<Utc>,
}

/// A new slide's row.
#[derive(Debug)]
pub struct NewSlide<'a> {
    pub id: Uuid,
    pub tenant: &'a TenantId,
    pub uploaded_by: &'a str,
    pub filename: Option<&'a str>,
    pub sha256: &'a str,
    pub size_bytes: i64,
    pub info: &'a SlideInfo,
    pub blob_key: &'a str,
}

/// Inserts the slide unless the tenant already has these bytes; returns whether it was inserted.
pub async fn insert(tx: &mut PgConnection, slide: &NewSlide<'_>) -> sqlx::Result<bool> {
    let level0 = &slide.info.levels[0];
    let inserted = sqlx::query!(
        "insert into slides (id, tenant_id, uploaded_by, filename, sha256, size_bytes, format, vendor,
                             width, height, levels, mpp_x, mpp_y, objective, blob_key)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
         on conflict (tenant_id, sha256) do nothing",
        slide.id,
        slide.tenant.as_str(),
        slide.uploaded_by,
        slide.filename,
        slide.sha256,
        slide.size_bytes,
        slide.info.format,
        slide.info.vendor,
        i64::from(level0.width),
        i64::from(level0.height),
        Json(&slide.info.levels) as Json<&Vec<Level>>,
        slide.info.mpp_x,
        slide.info.mpp_y,
        slide.info.objective,
        slide.blob_key,
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();
    Ok(inserted == 1)
}

/// Which slide of a tenant to find.
#[derive(Debug, Clone, Copy)]
pub enum Key<'a> {
    Id(Uuid),
    Digest(&'a str),
}

pub async fn find(
    db: impl PgExecutor<'_>,
    tenant: &TenantId,
    key: Key<'_>,
) -> sqlx::Result<Option<SlideRecord>> {
    let (id, digest) = match key {
        Key::Id(id) => (Some(id), None),
        Key::Digest(digest) => (None, Some(digest)),
    };
    sqlx::query_as!(
        SlideRecord,
        r#"select id, filename, sha256, size_bytes, format, vendor, width, height,
                  levels as "levels: Json<Vec<Level>>", mpp_x, mpp_y, objective, blob_key, created_at
           from slides
           where tenant_id = $1 and (id = $2 or $2 is null) and (sha256 = $3 or $3 is null)"#,
        tenant.as_str(),
        id,
        digest,
    )
    .fetch_optional(db)
    .await
}

/// The per-tile scores of a finished slide analysis of `tenant`.
pub async fn tiles(
    db: impl PgExecutor<'_>,
    tenant: &TenantId,
    analysis: Uuid,
) -> sqlx::Result<Option<TileScores>> {
    sqlx::query_as!(
        TileScores,
        "select tile_size_level0, xs, ys, tissue, measures, scores
         from analysis_tiles where tenant_id = $1 and analysis_id = $2",
        tenant.as_str(),
        analysis,
    )
    .fetch_optional(db)
    .await
}
