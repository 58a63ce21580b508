//! The model registry's rows. Bundled models (no tenant) are visible to all; registered ones only
//! to their tenant.

use crate::domain::ids::TenantId;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, PgExecutor};

#[derive(Debug, Clone)]
pub struct ModelRow {
    pub name: String,
    pub version: String,
    pub tenant_id: Option<String>,
    pub modality: String,
    pub task: String,
    pub title: String,
    pub manifest: Value,
    pub manifest_sha256: String,
    pub onnx_sha256: String,
    pub blob_key: String,
    pub card: String,
    pub state: String,
    pub source: String,
    pub registered_by: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// Inserts a version unless (name, version) exists; returns whether it was inserted.
pub async fn insert(db: impl PgExecutor<'_>, row: &ModelRow) -> sqlx::Result<bool> {
    Ok(sqlx::query!(
        "insert into models (name, version, tenant_id, modality, task, title, manifest, manifest_sha256,
                             onnx_sha256, blob_key, card, state, source, registered_by)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
         on conflict (name, version) do nothing",
        row.name,
        row.version,
        row.tenant_id,
        row.modality,
        row.task,
        row.title,
        row.manifest,
        row.manifest_sha256,
        row.onnx_sha256,
        row.blob_key,
        row.card,
        row.state,
        row.source,
        row.registered_by,
    )
    .execute(db)
    .await?
    .rows_affected()
        == 1)
}

/// One version, whoever owns it (workers run what was recorded at submission).
pub async fn find(
    db: impl PgExecutor<'_>,
    name: &str,
    version: &str,
) -> sqlx::Result<Option<ModelRow>> {
    sqlx::query_as!(
        ModelRow,
        "select * from models where name = $1 and version = $2",
        name,
        version
    )
    .fetch_optional(db)
    .await
}

/// One version as `tenant` may see it.
pub async fn find_visible(
    db: impl PgExecutor<'_>,
    tenant: &TenantId,
    name: &str,
    version: &str,
) -> sqlx::Result<Option<ModelRow>> {
    sqlx::query_as!(
        ModelRow,
        "select * from models where name = $1 and version = $2 and (tenant_id is null or tenant_id = $3)",
        name,
        version,
        tenant.as_str(),
    )
    .fetch_optional(db)
    .await
}

/// The active version of `name` that `tenant` may use.
pub async fn find_active(
    db: impl PgExecutor<'_>,
    tenant: &TenantId,
    name: &str,
) -> sqlx::Result<Option<ModelRow>> {
    sqlx::query_as!(
        ModelRow,
        "select * from models where name = $1 and state = 'active' and (tenant_id is null or tenant_id = $2)",
        name,
        tenant.as_str(),
    )
    .fetch_optional(db)
    .await
}

/// Every version `tenant` may see, by name, newest first.
pub async fn list_visible(
    db: impl PgExecutor<'_>,
    tenant: &TenantId,
) -> sqlx::Result<Vec<ModelRow>> {
    sqlx::query_as!(
        ModelRow,
        "select * from models where tenant_id is null or tenant_id = $1 order by name, created_at desc",
        tenant.as_str(),
    )
    .fetch_all(db)
    .await
}

/// Makes `version` the one new analyses use; the previously active version is retired.
pub async fn activate(tx: &mut PgConnection, name: &str, version: &str) -> sqlx::Result<()> {
    sqlx::query!("update models set state = 'retired' where name = $1 and state = 'active' and version <> $2", name, version)
        .execute(&mut *tx)
        .await?;
    sqlx::query!(
        "update models set state = 'active' where name = $1 and version = $2",
        name,
        version
    )
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Retires a version: no new analysis uses it (queued ones still run on it).
pub async fn retire(db: impl PgExecutor<'_>, name: &str, version: &str) -> sqlx::Result<()> {
    sqlx::query!(
        "update models set state = 'retired' where name = $1 and version = $2",
        name,
        version
    )
    .execute(db)
    .await?;
    Ok(())
}

/// Claims `name` for `tenant` (`None`: bundled) unless it has an owner; returns whether the owner
/// is now `tenant`. Run it in the transaction that inserts the version.
pub async fn claim_name(
    tx: &mut PgConnection,
    name: &str,
    tenant: Option<&str>,
) -> sqlx::Result<bool> {
    sqlx::query!(
        "insert into model_owners (name, tenant_id) values ($1, $2) on conflict (name) do nothing",
        name,
        tenant
    )
    .execute(&mut *tx)
    .await?;
    let owner = sqlx::query_scalar!("select tenant_id from model_owners where name = $1", name)
        .fetch_one(&mut *tx)
        .await?;
    Ok(owner.as_deref() == tenant)
}
