//! The audit trail: who read which result, and when.

use crate::domain::ids::TenantId;
use sqlx::PgExecutor;

pub async fn record(
    db: impl PgExecutor<'_>,
    tenant: &TenantId,
    actor: &str,
    action: &str,
    target_type: &str,
    target_id: &str,
) -> sqlx::Result<()> {
    sqlx::query!(
        "insert into audit_events (tenant_id, actor, action, target_type, target_id) values ($1, $2, $3, $4, $5)",
        tenant.as_str(),
        actor,
        action,
        target_type,
        target_id,
    )
    .execute(db)
    .await?;
    Ok(())
}
