//! Tile-embedding bags: one row per distinct file per tenant, read back only within the tenant.

use crate::domain::ids::TenantId;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

pub use super::slides::Key;

#[derive(Debug)]
pub struct EmbeddingsRecord {
    pub id: Uuid,
    pub filename: Option<String>,
    pub sha256: String,
    pub size_bytes: i64,
    pub tiles: i32,
    pub dim: i32,
    pub has_coords: bool,
    pub metadata: Value,
    pub blob_key: String,
    pub created_at: DateTime<Utc>,
}

/// A new bag's row.
#[derive(Debug)]
pub struct NewEmbeddings<'a> {
    pub id: Uuid,
    pub tenant: &'a TenantId,
    pub uploaded_by: &'a str,
    pub filename: Option<&'a str>,
    pub sha256: &'a str,
    pub size_bytes: i64,
    pub tiles: i32,
    pub dim: i32,
    pub has_coords: bool,
    pub metadata: &'a Value,
    pub blob_key: &'a str,
}

/// Inserts the bag unless the tenant already has these bytes; returns whether it was inserted.
pub async fn insert(tx: &mut PgConnection, bag: &NewEmbeddings<'_>) -> sqlx::Result<bool> {
    let inserted = sqlx::query!(
        "insert into embeddings (id, tenant_id, uploaded_by, filename, sha256, size_bytes, tiles,
                                 dim, has_coords, metadata, blob_key)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
         on conflict (tenant_id, sha256) do nothing",
        bag.id,
        bag.tenant.as_str(),
        bag.uploaded_by,
        bag.filename,
        bag.sha256,
        bag.size_bytes,
        bag.tiles,
        bag.dim,
        bag.has_coords,
        bag.metadata,
        bag.blob_key,
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();
    Ok(inserted == 1)
}

pub async fn find(
    db: impl PgExecutor<'_>,
    tenant: &TenantId,
    key: Key<'_>,
) -> sqlx::Result<Option<EmbeddingsRecord>> {
    let (id, digest) = match key {
        Key::Id(id) => (Some(id), None),
        Key::Digest(digest) => (None, Some(digest)),
    };
    sqlx::query_as!(
        EmbeddingsRecord,
        "select id, filename, sha256, size_bytes, tiles, dim, has_coords, metadata, blob_key,
                created_at
         from embeddings
         where tenant_id = $1 and (id = $2 or $2 is null) and (sha256 = $3 or $3 is null)",
        tenant.as_str(),
        id,
        digest,
    )
    .fetch_optional(db)
    .await
}
