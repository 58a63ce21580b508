//! The queue: claim with one `FOR UPDATE SKIP LOCKED` statement that sets a lease, heartbeat the
//! lease, and complete, retry or fail in the same transaction that stores the outcome — always
//! fenced on the lease owner and attempt number, so a job whose lease was lost or that was
//! cancelled is never completed by a stale worker.

use super::JsonText;
use chrono::{DateTime, Utc};
use serde_json::Value;
use serde_json::value::RawValue;
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

/// A job this worker now holds, with what it needs to run it.
#[derive(Debug, Clone)]
pub struct ClaimedJob {
    pub analysis_id: Uuid,
    pub tenant_id: String,
    pub attempts: i32,
    pub max_attempts: i32,
    pub model_name: String,
    pub model_version: String,
    pub input: Value,
    /// What its provenance record states: the analysis's input and model digests, and the
    /// digest of the model's manifest as registered (empty if the version is not registered).
    pub input_sha256: String,
    pub model_sha256: String,
    pub manifest_sha256: String,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    /// The W3C traceparent of the request that queued it.
    pub traceparent: Option<String>,
}

/// Claims up to `limit` runnable jobs of one model — the model of the most urgent runnable job —
/// so that they run as one inference batch. Runnable: queued and due, or running with an expired
/// lease (its worker died) and attempts left; such a job is claimed alone. `stat` first, then
/// oldest first.
pub async fn claim(
    db: impl PgExecutor<'_>,
    worker: Uuid,
    limit: i64,
    lease_secs: f64,
    model: Option<&str>,
) -> sqlx::Result<Vec<ClaimedJob>> {
    sqlx::query_as!(
        ClaimedJob,
        r#"with head as (
               select analysis_id, model_name, state, batchable from jobs
               where open
                 and ((state = 'queued' and run_after <= now())
                      or (state = 'running' and lease_expires_at < now() and attempts < max_attempts))
                 and ($4::text is null or model_name = $4)
               order by priority, enqueued_at, analysis_id
               limit 1
               for update skip locked
           ), rest as (
               -- A job whose worker died may be what killed it: it runs alone, so that a poison
               -- input cannot take a whole batch to the dead letter with it.
               select analysis_id from jobs
               where open and model_name = (select model_name from head)
                 and (select state from head) = 'queued'
                 and (select batchable from head) and batchable
                 and state = 'queued' and run_after <= now()
                 and analysis_id <> (select analysis_id from head)
               order by priority, enqueued_at, analysis_id
               limit greatest($1::int8 - 1, 0)
               for update skip locked
           ), picked as (
               select analysis_id from head union all select analysis_id from rest
           ), claimed as (
               update jobs j
               set state = 'running', attempts = j.attempts + 1, lease_owner = $2,
                   lease_expires_at = now() + make_interval(secs => $3),
                   started_at = coalesce(j.started_at, now())
               from picked where j.analysis_id = picked.analysis_id
               returning j.analysis_id, j.tenant_id, j.attempts, j.max_attempts, j.model_name, j.started_at,
                         j.traceparent
           )
           select c.analysis_id as "analysis_id!", c.tenant_id as "tenant_id!", c.attempts as "attempts!",
                  c.max_attempts as "max_attempts!", c.model_name as "model_name!",
                  a.model_version as "model_version!", a.input as "input!",
                  a.input_sha256 as "input_sha256!", a.model_sha256 as "model_sha256!",
                  coalesce(m.manifest_sha256, '') as "manifest_sha256!",
                  a.created_at as "created_at!", c.started_at, c.traceparent
           from claimed c join analyses a on a.id = c.analysis_id
           left join models m on m.name = a.model_name and m.version = a.model_version"#,
        limit,
        worker,
        lease_secs,
        model,
    )
    .fetch_all(db)
    .await
}

/// Fails the jobs whose worker died on every attempt (lease expired, no attempts left): a job that
/// kills its worker must not be retried forever. Returns how many.
pub async fn reap_exhausted(tx: &mut PgConnection) -> sqlx::Result<u64> {
    let ids = sqlx::query_scalar!(
        "update jobs set state = 'failed', lease_owner = null, lease_expires_at = null,
                         last_error = 'the worker stopped responding on every attempt'
         where state = 'running' and lease_expires_at < now() and attempts >= max_attempts
         returning analysis_id"
    )
    .fetch_all(&mut *tx)
    .await?;
    if ids.is_empty() {
        return Ok(0);
    }
    sqlx::query!(
        "update analyses set status = 'failed', finished_at = now(),
                error = 'the worker running this analysis stopped responding on every attempt; it was not retried further'
         where id = any($1)",
        &ids,
    )
    .execute(&mut *tx)
    .await?;
    notify_done(tx, &ids).await?;
    Ok(ids.len() as u64)
}

/// Extends the lease of jobs this worker still holds (same owner, same attempt).
pub async fn heartbeat(
    db: impl PgExecutor<'_>,
    worker: Uuid,
    jobs: &[(Uuid, i32)],
    lease_secs: f64,
) -> sqlx::Result<u64> {
    let (ids, attempts): (Vec<Uuid>, Vec<i32>) = jobs.iter().copied().unzip();
    Ok(sqlx::query!(
        "update jobs set lease_expires_at = now() + make_interval(secs => $4)
         where lease_owner = $1 and state = 'running'
           and (analysis_id, attempts) in (select * from unnest($2::uuid[], $3::int[]))",
        worker,
        &ids,
        &attempts,
        lease_secs,
    )
    .execute(db)
    .await?
    .rows_affected())
}

/// The outcome of one job that did not succeed (successes are stored set-wise, `complete_batch`).
#[derive(Debug)]
pub enum Outcome<'a> {
    /// Worth another attempt after `delay_secs` (a transient failure).
    Retry {
        error: &'a str,
        delay_secs: f64,
    },
    Failed {
        error: &'a str,
    },
}

/// Stores a failure: fails the job for good or requeues it, inside the caller's transaction. Returns
/// false, writing nothing, when this worker no longer holds the job: its lease was taken over, or
/// the analysis was cancelled meanwhile.
pub async fn finish(
    tx: &mut PgConnection,
    job: &ClaimedJob,
    worker: Uuid,
    outcome: Outcome<'_>,
) -> sqlx::Result<bool> {
    let (job_state, status, error, delay) = match outcome {
        Outcome::Retry { error, delay_secs } => ("queued", "queued", Some(error), delay_secs),
        Outcome::Failed { error } => ("failed", "failed", Some(error), 0.0),
    };
    let fenced = sqlx::query!(
        "update jobs set state = $4, lease_owner = null, lease_expires_at = null, last_error = $5,
                         run_after = now() + make_interval(secs => $6)
         where analysis_id = $1 and lease_owner = $2 and attempts = $3 and state = 'running'",
        job.analysis_id,
        worker,
        job.attempts,
        job_state,
        error,
        delay,
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if fenced != 1 {
        return Ok(false);
    }
    // A retried analysis stays `queued`; only a final outcome touches the (wide) analysis row.
    if status != "queued" {
        sqlx::query!(
            "update analyses set status = $2, error = $3, finished_at = now(), started_at = $4 where id = $1",
            job.analysis_id,
            status,
            error,
            job.started_at,
        )
        .execute(&mut *tx)
        .await?;
    }
    Ok(true)
}

/// Tells waiting readers (long polls, other processes) that these analyses changed for good.
pub async fn notify_done(tx: &mut PgConnection, ids: &[Uuid]) -> sqlx::Result<()> {
    // A NOTIFY payload is limited to 8000 bytes: 200 ids of 37 bytes fit.
    for chunk in ids.chunks(200) {
        let payload = chunk
            .iter()
            .map(Uuid::to_string)
            .collect::<Vec<_>>()
            .join(",");
        sqlx::query!("select pg_notify($1, $2)", super::DONE_CHANNEL, payload)
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}

/// One succeeded job of a batch.
#[derive(Debug)]
pub struct Success<'a> {
    pub job: &'a ClaimedJob,
    /// The result document as canonical JSON text ([`crate::domain::provenance::canonical_text`]).
    pub result: Box<RawValue>,
    pub timings: Value,
}

/// Completes a batch of succeeded jobs with three set-based statements instead of three per job,
/// each job fenced as in `finish`. Returns the ids actually completed (the others were cancelled or
/// lost their lease, and get no result); their provenance is the caller's to append, last.
pub async fn complete_batch(
    tx: &mut PgConnection,
    worker: Uuid,
    successes: &[Success<'_>],
    execution_provider: &str,
) -> sqlx::Result<Vec<Uuid>> {
    let ids: Vec<Uuid> = successes.iter().map(|s| s.job.analysis_id).collect();
    let attempts: Vec<i32> = successes.iter().map(|s| s.job.attempts).collect();
    let results: Vec<JsonText<&RawValue>> =
        successes.iter().map(|s| JsonText(&*s.result)).collect();
    let timings: Vec<JsonText<&Value>> = successes.iter().map(|s| JsonText(&s.timings)).collect();
    sqlx::query_scalar!(
        r#"with done as (
               update jobs j set state = 'done', lease_owner = null, lease_expires_at = null, last_error = null
               from unnest($2::uuid[], $3::int[]) as t(id, attempts)
               where j.analysis_id = t.id and j.attempts = t.attempts and j.lease_owner = $1 and j.state = 'running'
               returning j.analysis_id, j.tenant_id, j.started_at
           ), stored as (
               insert into results (analysis_id, tenant_id, result, timings, execution_provider)
               select d.analysis_id, d.tenant_id, r.result, r.timings, $6
               from done d join unnest($2::uuid[], $4::json[], $5::json[]) as r(id, result, timings)
                 on r.id = d.analysis_id
               returning analysis_id
           )
           update analyses a set status = 'succeeded', error = null, finished_at = now(), started_at = d.started_at
           from stored s join done d on d.analysis_id = s.analysis_id
           where a.id = s.analysis_id
           returning a.id"#,
        worker,
        &ids,
        &attempts,
        &results as &[JsonText<&RawValue>],
        &timings as &[JsonText<&Value>],
        execution_provider,
    )
    .fetch_all(&mut *tx)
    .await
}

/// Records a running slide job's progress; false when this worker no longer holds the job
/// (cancelled, or its lease was taken over): the analysis should stop.
pub async fn progress(
    db: impl PgExecutor<'_>,
    job: &ClaimedJob,
    worker: Uuid,
    done: i32,
    total: i32,
) -> sqlx::Result<bool> {
    Ok(sqlx::query!(
        "update jobs set progress_done = $4, progress_total = $5
         where analysis_id = $1 and lease_owner = $2 and attempts = $3 and state = 'running'",
        job.analysis_id,
        worker,
        job.attempts,
        done,
        total,
    )
    .execute(db)
    .await?
    .rows_affected()
        == 1)
}

/// Stores the per-tile scores of finished slide analyses (inside the completing transaction).
pub async fn store_tiles(
    tx: &mut PgConnection,
    analysis: Uuid,
    tenant: &str,
    tiles: &crate::slides::analyse::TileScores,
) -> sqlx::Result<()> {
    sqlx::query!(
        "insert into analysis_tiles (analysis_id, tenant_id, tile_size_level0, xs, ys, tissue, measures, scores)
         values ($1, $2, $3, $4, $5, $6, $7, $8)",
        analysis,
        tenant,
        tiles.tile_size_level0,
        &tiles.xs,
        &tiles.ys,
        &tiles.tissue,
        &tiles.measures,
        &tiles.scores,
    )
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Jobs waiting or running, by state and priority (`stat`, `routine`).
pub async fn depth(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<(String, String, i64)>> {
    Ok(sqlx::query!(
        r#"select state as "state!", case priority when 0 then 'stat' else 'routine' end as "priority!",
                  count(*) as "count!"
           from jobs where open group by 1, 2"#
    )
    .fetch_all(db)
    .await?
    .into_iter()
    .map(|r| (r.state, r.priority, r.count))
    .collect())
}
