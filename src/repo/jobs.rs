//! The queue: claim with one `FOR UPDATE SKIP LOCKED` statement that sets a lease, complete or fail
//! in the same transaction that stores the outcome, fenced on the lease owner and attempt number.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

/// A job this worker now holds, with what it needs to run it.
#[derive(Debug)]
pub struct ClaimedJob {
    pub analysis_id: Uuid,
    pub tenant_id: String,
    pub attempts: i32,
    pub model_name: String,
    pub input: Value,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
}

/// Claims up to `limit` runnable jobs — queued ones, and running ones whose lease expired (their
/// worker died) — `stat` first, oldest first, and marks their analyses running.
pub async fn claim(
    db: impl PgExecutor<'_>,
    worker: Uuid,
    limit: i64,
    lease_secs: f64,
) -> sqlx::Result<Vec<ClaimedJob>> {
    sqlx::query_as!(
        ClaimedJob,
        r#"with picked as (
               select analysis_id from jobs
               where state = 'queued' or (state = 'running' and lease_expires_at < now())
               order by priority, enqueued_at
               limit $1
               for update skip locked
           ), claimed as (
               update jobs j
               set state = 'running', attempts = j.attempts + 1, lease_owner = $2,
                   lease_expires_at = now() + make_interval(secs => $3)
               from picked where j.analysis_id = picked.analysis_id
               returning j.analysis_id, j.tenant_id, j.attempts
           ), started as (
               update analyses a
               set status = 'running', started_at = coalesce(a.started_at, now())
               from claimed where a.id = claimed.analysis_id
               returning a.id, a.model_name, a.input, a.created_at, a.started_at
           )
           select c.analysis_id as "analysis_id!", c.tenant_id as "tenant_id!", c.attempts as "attempts!",
                  s.model_name as "model_name!", s.input as "input!", s.created_at as "created_at!",
                  s.started_at
           from claimed c join started s on s.id = c.analysis_id"#,
        limit,
        worker,
        lease_secs,
    )
    .fetch_all(db)
    .await
}

/// The outcome of one job, stored with the job's completion.
#[derive(Debug)]
pub enum Outcome<'a> {
    Succeeded {
        result: &'a Value,
        timings: &'a Value,
        execution_provider: &'a str,
    },
    Failed {
        error: &'a str,
    },
}

/// Stores `outcome` and closes the job, inside the caller's transaction. Returns false (and writes
/// nothing) when this worker no longer holds the lease, so a job reclaimed by another worker after
/// an expired lease never gets two results.
pub async fn finish(
    tx: &mut PgConnection,
    job: &ClaimedJob,
    worker: Uuid,
    outcome: Outcome<'_>,
) -> sqlx::Result<bool> {
    let (job_state, status, error) = match outcome {
        Outcome::Succeeded { .. } => ("done", "succeeded", None),
        Outcome::Failed { error } => ("failed", "failed", Some(error)),
    };
    let fenced = sqlx::query!(
        "update jobs set state = $4, lease_owner = null, lease_expires_at = null
         where analysis_id = $1 and lease_owner = $2 and attempts = $3 and state = 'running'",
        job.analysis_id,
        worker,
        job.attempts,
        job_state,
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if fenced != 1 {
        return Ok(false);
    }
    if let Outcome::Succeeded {
        result,
        timings,
        execution_provider,
    } = outcome
    {
        sqlx::query!(
            "insert into results (analysis_id, tenant_id, result, timings, execution_provider)
             values ($1, $2, $3, $4, $5)",
            job.analysis_id,
            job.tenant_id,
            result,
            timings,
            execution_provider,
        )
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query!(
        "update analyses set status = $2, error = $3, finished_at = now() where id = $1",
        job.analysis_id,
        status,
        error,
    )
    .execute(&mut *tx)
    .await?;
    Ok(true)
}
