//! Analyses: written with their job in one transaction, read back only within the caller's tenant.

use crate::domain::analysis::Priority;
use crate::domain::ids::{AnalysisId, TenantId};
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgExecutor, PgPool};
use uuid::Uuid;

#[derive(Debug)]
pub struct NewAnalysis<'a> {
    pub id: AnalysisId,
    pub tenant: &'a TenantId,
    pub submitted_by: &'a str,
    pub subject: Option<&'a str>,
    pub model_name: &'a str,
    pub model_version: &'a str,
    pub model_sha256: &'a str,
    pub priority: Priority,
    pub input: &'a Value,
    pub input_sha256: &'a str,
    pub validate_ms: f64,
}

/// Writes the analysis and its job atomically and wakes the workers: either both rows exist and a
/// worker will see them, or neither does.
pub async fn insert_with_job(pool: &PgPool, new: &NewAnalysis<'_>) -> sqlx::Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query!(
        "insert into analyses (id, tenant_id, submitted_by, subject, model_name, model_version, model_sha256,
                               priority, input, input_sha256, validate_ms)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        new.id.0,
        new.tenant.as_str(),
        new.submitted_by,
        new.subject,
        new.model_name,
        new.model_version,
        new.model_sha256,
        new.priority.as_str(),
        new.input,
        new.input_sha256,
        new.validate_ms,
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query!(
        "insert into jobs (analysis_id, tenant_id, priority) values ($1, $2, $3)",
        new.id.0,
        new.tenant.as_str(),
        new.priority.queue_rank(),
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query!("select pg_notify($1, '')", super::JOBS_CHANNEL)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// An analysis with its result, as stored.
#[derive(Debug)]
pub struct AnalysisRecord {
    pub id: Uuid,
    pub subject: Option<String>,
    pub model_name: String,
    pub model_version: String,
    pub model_sha256: String,
    pub priority: String,
    pub status: String,
    pub input_sha256: String,
    pub error: Option<String>,
    pub validate_ms: f64,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub result: Option<Value>,
    pub timings: Option<Value>,
    pub execution_provider: Option<String>,
}

/// One analysis of `tenant`; another tenant's analysis is indistinguishable from a missing one.
pub async fn find(
    db: impl PgExecutor<'_>,
    tenant: &TenantId,
    id: AnalysisId,
) -> sqlx::Result<Option<AnalysisRecord>> {
    sqlx::query_as!(
        AnalysisRecord,
        r#"select a.id, a.subject, a.model_name, a.model_version, a.model_sha256, a.priority, a.status,
                  a.input_sha256, a.error, a.validate_ms, a.created_at, a.started_at, a.finished_at,
                  r.result as "result?", r.timings as "timings?", r.execution_provider as "execution_provider?"
           from analyses a left join results r on r.analysis_id = a.id
           where a.tenant_id = $1 and a.id = $2"#,
        tenant.as_str(),
        id.0,
    )
    .fetch_optional(db)
    .await
}

#[derive(Debug)]
pub struct AnalysisSummary {
    pub id: Uuid,
    pub subject: Option<String>,
    pub model_name: String,
    pub model_version: String,
    pub priority: String,
    pub status: String,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// The tenant's analyses, newest first, `limit` at a time, continuing below `before` (ids are UUIDv7).
pub async fn list(
    db: impl PgExecutor<'_>,
    tenant: &TenantId,
    before: Option<AnalysisId>,
    limit: i64,
) -> sqlx::Result<Vec<AnalysisSummary>> {
    sqlx::query_as!(
        AnalysisSummary,
        "select id, subject, model_name, model_version, priority, status, created_at, finished_at
         from analyses
         where tenant_id = $1 and ($2::uuid is null or id < $2)
         order by id desc
         limit $3",
        tenant.as_str(),
        before.map(|b| b.0),
        limit,
    )
    .fetch_all(db)
    .await
}
