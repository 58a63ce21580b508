//! Idempotency keys: the first answer to a keyed submission, replayed for retries of it.

use crate::domain::ids::TenantId;
use serde_json::Value;
use sqlx::{PgConnection, PgExecutor};

#[derive(Debug)]
pub struct StoredAnswer {
    pub request_sha256: String,
    pub response: Value,
    pub location: Option<String>,
}

pub async fn find(
    db: impl PgExecutor<'_>,
    tenant: &TenantId,
    key: &str,
) -> sqlx::Result<Option<StoredAnswer>> {
    sqlx::query_as!(
        StoredAnswer,
        "select request_sha256, response, location from idempotency_keys where tenant_id = $1 and key = $2",
        tenant.as_str(),
        key,
    )
    .fetch_optional(db)
    .await
}

/// Records the answer in the submission's own transaction. False when a concurrent request with
/// the same key got there first (the caller rolls back and replays that one).
pub async fn remember(
    tx: &mut PgConnection,
    tenant: &TenantId,
    key: &str,
    request_sha256: &str,
    response: &Value,
    location: Option<&str>,
) -> sqlx::Result<bool> {
    Ok(sqlx::query!(
        "insert into idempotency_keys (tenant_id, key, request_sha256, response, location)
         values ($1, $2, $3, $4, $5) on conflict do nothing",
        tenant.as_str(),
        key,
        request_sha256,
        response,
        location,
    )
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1)
}
