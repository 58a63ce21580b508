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

/// One recorded event.
#[derive(Debug)]
pub struct AuditEvent {
    pub id: i64,
    pub actor: String,
    pub action: String,
    pub target_type: String,
    pub target_id: String,
    pub at: chrono::DateTime<chrono::Utc>,
}

/// Which events to list; `None` means any.
#[derive(Debug, Default)]
pub struct AuditFilter {
    pub actor: Option<String>,
    pub action: Option<String>,
    pub target_type: Option<String>,
    pub target_id: Option<String>,
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    pub until: Option<chrono::DateTime<chrono::Utc>>,
    /// Only events older than this one (the previous page's last id).
    pub before: Option<i64>,
}

/// A tenant's events, newest first.
pub async fn list(
    db: impl PgExecutor<'_>,
    tenant: &TenantId,
    filter: &AuditFilter,
    limit: i64,
) -> sqlx::Result<Vec<AuditEvent>> {
    sqlx::query_as!(
        AuditEvent,
        "select id, actor, action, target_type, target_id, at from audit_events
         where tenant_id = $1
           and ($2::text is null or actor = $2)
           and ($3::text is null or action = $3)
           and ($4::text is null or target_type = $4)
           and ($5::text is null or target_id = $5)
           and ($6::timestamptz is null or at >= $6)
           and ($7::timestamptz is null or at < $7)
           and ($8::int8 is null or id < $8)
         order by id desc
         limit $9",
        tenant.as_str(),
        filter.actor,
        filter.action,
        filter.target_type,
        filter.target_id,
        filter.since,
        filter.until,
        filter.before,
        limit,
    )
    .fetch_all(db)
    .await
}
