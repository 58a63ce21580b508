//! Analyses: written with their job in one transaction, read back only within the caller's tenant.

use super::JsonText;
use crate::domain::analysis::Priority;
use crate::domain::ids::{AnalysisId, TenantId};
use crate::domain::provenance::{CODE_VERSION, ProvenanceRecord};
use chrono::{DateTime, Utc};
use serde_json::Value;
use serde_json::value::RawValue;
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

/// One analysis to queue; many are written with one statement each for analyses and jobs.
#[derive(Debug)]
pub struct NewAnalysis {
    pub id: AnalysisId,
    pub subject: Option<String>,
    /// The input as the JSON text stored (for feature models, the canonical text its digest is of).
    pub input: Box<RawValue>,
    pub input_sha256: String,
    pub validate_ms: f64,
    /// Set when the analysis was run while its submitter waited: it is stored finished, with no job.
    pub finished: Option<Finished>,
}

/// An analysis run inline, before it was stored: stored already succeeded, with its result, and
/// the delivery of that result to the waiting submitter recorded as a read.
#[derive(Debug)]
pub struct Finished {
    /// The result document as canonical JSON text ([`crate::domain::provenance::canonical_json`]):
    /// serialised once, then stored, digested and answered as it is.
    pub result: Box<RawValue>,
    pub timings: Value,
    pub execution_provider: String,
    pub created_at: DateTime<Utc>,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
}

/// What all analyses of one submission share.
#[derive(Debug, Clone)]
pub struct Submission {
    pub tenant: TenantId,
    pub submitted_by: String,
    pub model_name: String,
    pub model_version: String,
    pub model_sha256: String,
    /// sha256 of the model's manifest as registered (for the provenance record).
    pub manifest_sha256: String,
    pub priority: Priority,
    pub batch_id: Option<Uuid>,
    pub max_attempts: i32,
    /// False for slide analyses: their jobs are claimed one at a time, never batched.
    pub batchable: bool,
    /// The W3C traceparent of the submitting request, stored with the jobs.
    pub traceparent: Option<String>,
}

/// Writes the analyses of one or more submissions with one statement: either every row exists, or
/// none does. Queued analyses get a job and the workers are woken at commit; finished ones (run
/// inline) get their result, the read by their submitter in the audit trail, and their provenance
/// record (linked into the chain later, by the sealer).
///
/// One statement, not one per table: outside a transaction (the intake's group commit) it is its
/// own transaction, so a group costs one round trip and one commit.
pub async fn insert_with_jobs(
    db: &mut PgConnection,
    groups: &[(&Submission, &[NewAnalysis])],
) -> sqlx::Result<()> {
    let rows: Vec<(&Submission, &NewAnalysis)> = groups
        .iter()
        .flat_map(|(s, analyses)| analyses.iter().map(move |a| (*s, a)))
        .collect();
    let column = |f: &dyn Fn(&Submission, &NewAnalysis) -> String| {
        rows.iter().map(|(s, a)| f(s, a)).collect::<Vec<String>>()
    };
    let ids: Vec<Uuid> = rows.iter().map(|(_, a)| a.id.0).collect();
    let subjects: Vec<Option<String>> = rows.iter().map(|(_, a)| a.subject.clone()).collect();
    let batches: Vec<Option<Uuid>> = rows.iter().map(|(s, _)| s.batch_id).collect();
    let inputs: Vec<JsonText<&RawValue>> = rows.iter().map(|(_, a)| JsonText(&*a.input)).collect();
    let validate_ms: Vec<f64> = rows.iter().map(|(_, a)| a.validate_ms).collect();
    let finished = |f: &dyn Fn(&Finished) -> DateTime<Utc>| {
        rows.iter()
            .map(|(_, a)| a.finished.as_ref().map(f))
            .collect::<Vec<Option<DateTime<Utc>>>>()
    };
    let statuses = column(&|_, a| {
        if a.finished.is_some() {
            "succeeded"
        } else {
            "queued"
        }
        .to_owned()
    });
    let queued = Queued::of(&rows);
    let done: Vec<(&Submission, &NewAnalysis, &Finished)> = rows
        .iter()
        .filter_map(|(s, a)| a.finished.as_ref().map(|f| (*s, *a, f)))
        .collect();
    let done_ids: Vec<Uuid> = done.iter().map(|(_, a, _)| a.id.0).collect();
    let done_tenants: Vec<String> = done
        .iter()
        .map(|(s, _, _)| s.tenant.as_str().to_owned())
        .collect();
    let readers: Vec<String> = done
        .iter()
        .map(|(s, _, _)| s.submitted_by.clone())
        .collect();
    let results: Vec<JsonText<&RawValue>> =
        done.iter().map(|(_, _, f)| JsonText(&*f.result)).collect();
    let timings: Vec<JsonText<&Value>> =
        done.iter().map(|(_, _, f)| JsonText(&f.timings)).collect();
    let providers: Vec<String> = done
        .iter()
        .map(|(_, _, f)| f.execution_provider.clone())
        .collect();
    let records = super::provenance::Rows::of(done.iter().map(|(s, a, f)| ProvenanceRecord {
        analysis_id: a.id.0,
        tenant: s.tenant.as_str().to_owned(),
        input_sha256: a.input_sha256.clone(),
        model_name: s.model_name.clone(),
        model_version: s.model_version.clone(),
        model_sha256: s.model_sha256.clone(),
        manifest_sha256: s.manifest_sha256.clone(),
        code_version: CODE_VERSION.to_owned(),
        execution_provider: f.execution_provider.clone(),
        result_sha256: crate::domain::provenance::text_digest(&f.result),
    }));
    let record_texts: Vec<JsonText<&RawValue>> =
        records.records.iter().map(|r| JsonText(&**r)).collect();
    // Foreign keys are checked at the end of the statement, when the analyses are there. The
    // workers are woken only when there is a job: NOTIFY is delivered at commit.
    sqlx::query!(
        "with stored as (
             insert into analyses (id, tenant_id, submitted_by, subject, model_name, model_version, model_sha256,
                                   priority, input, input_sha256, validate_ms, batch_id, status,
                                   created_at, started_at, finished_at)
             select t.id, t.tenant_id, t.submitted_by, t.subject, t.model_name, t.model_version, t.model_sha256,
                    t.priority, t.input, t.input_sha256, t.validate_ms, t.batch_id, t.status,
                    coalesce(t.created_at, now()), t.started_at, t.finished_at
             from unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                         $8::text[], $9::json[], $10::text[], $11::float8[], $12::uuid[], $13::text[],
                         $14::timestamptz[], $15::timestamptz[], $16::timestamptz[])
                  as t(id, tenant_id, submitted_by, subject, model_name, model_version, model_sha256,
                       priority, input, input_sha256, validate_ms, batch_id, status,
                       created_at, started_at, finished_at)
         ),
         new_jobs as (
             insert into jobs (analysis_id, tenant_id, model_name, priority, max_attempts, batchable, traceparent)
             select * from unnest($17::uuid[], $18::text[], $19::text[], $20::int2[], $21::int4[], $22::bool[], $23::text[])
         ),
         new_results as (
             insert into results (analysis_id, tenant_id, result, timings, execution_provider)
             select * from unnest($24::uuid[], $25::text[], $26::json[], $27::json[], $28::text[])
         ),
         reads as (
             insert into audit_events (tenant_id, actor, action, target_type, target_id)
             select t.tenant_id, t.actor, 'analysis.read', 'analysis', t.id::text
             from unnest($24::uuid[], $25::text[], $29::text[]) as t(id, tenant_id, actor)
         ),
         new_records as (
             insert into provenance (analysis_id, tenant_id, record, record_sha256)
             select * from unnest($30::uuid[], $31::text[], $32::json[], $33::text[])
         )
         select pg_notify($34, '') where cardinality($17::uuid[]) > 0",
        &ids,
        &column(&|s, _| s.tenant.as_str().to_owned()),
        &column(&|s, _| s.submitted_by.clone()),
        &subjects as &[Option<String>],
        &column(&|s, _| s.model_name.clone()),
        &column(&|s, _| s.model_version.clone()),
        &column(&|s, _| s.model_sha256.clone()),
        &column(&|s, _| s.priority.as_str().to_owned()),
        &inputs as &[JsonText<&RawValue>],
        &column(&|_, a| a.input_sha256.clone()),
        &validate_ms,
        &batches as &[Option<Uuid>],
        &statuses,
        &finished(&|f| f.created_at) as &[Option<DateTime<Utc>>],
        &finished(&|f| f.started_at) as &[Option<DateTime<Utc>>],
        &finished(&|f| f.finished_at) as &[Option<DateTime<Utc>>],
        &queued.ids,
        &queued.tenants,
        &queued.models,
        &queued.ranks,
        &queued.attempts,
        &queued.batchable,
        &queued.traceparents as &[Option<String>],
        &done_ids,
        &done_tenants,
        &results as &[JsonText<&RawValue>],
        &timings as &[JsonText<&Value>],
        &providers,
        &readers,
        &records.ids,
        &records.tenants,
        &record_texts as &[JsonText<&RawValue>],
        &records.digests,
        super::JOBS_CHANNEL,
    )
    .execute(&mut *db)
    .await?;
    Ok(())
}

/// The job columns of the analyses that are queued, not run inline.
#[derive(Debug, Default)]
struct Queued {
    ids: Vec<Uuid>,
    tenants: Vec<String>,
    models: Vec<String>,
    ranks: Vec<i16>,
    attempts: Vec<i32>,
    batchable: Vec<bool>,
    traceparents: Vec<Option<String>>,
}

impl Queued {
    fn of(rows: &[(&Submission, &NewAnalysis)]) -> Self {
        let mut queued = Self::default();
        for (s, a) in rows.iter().filter(|(_, a)| a.finished.is_none()) {
            queued.ids.push(a.id.0);
            queued.tenants.push(s.tenant.as_str().to_owned());
            queued.models.push(s.model_name.clone());
            queued.ranks.push(s.priority.queue_rank());
            queued.attempts.push(s.max_attempts);
            queued.batchable.push(s.batchable);
            queued.traceparents.push(s.traceparent.clone());
        }
        queued
    }
}

/// An analysis with its result, as stored.
#[derive(Debug, Clone)]
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
    pub batch_id: Option<Uuid>,
    /// The result as the text it was stored as: passed on without being parsed into a tree.
    pub result: Option<sqlx::types::Json<Box<RawValue>>>,
    pub timings: Option<Value>,
    pub execution_provider: Option<String>,
    /// Slide analyses while they run: tiles done and in all.
    pub progress_done: Option<i32>,
    pub progress_total: Option<i32>,
}

/// One analysis of `tenant`; another tenant's analysis is indistinguishable from a missing one.
/// With a `reader`, the read is recorded in the audit trail by the same statement (one round
/// trip), and only when the analysis exists in the tenant, since a refused read is not a read.
pub async fn find(
    db: impl PgExecutor<'_>,
    tenant: &TenantId,
    id: AnalysisId,
    reader: Option<&str>,
) -> sqlx::Result<Option<AnalysisRecord>> {
    let read = Read {
        tenant: tenant.clone(),
        id: id.0,
        reader: reader.map(str::to_owned),
    };
    Ok(find_many(db, std::slice::from_ref(&read))
        .await?
        .into_iter()
        .next()
        .map(|(_, record)| record))
}

/// A read of one analysis: which analysis of which tenant, and who reads it (`None`: a look
/// that is not a delivery, such as a long poll's check, and is not audited).
#[derive(Debug, Clone)]
pub struct Read {
    pub tenant: TenantId,
    pub id: Uuid,
    pub reader: Option<String>,
}

/// Several reads in one statement: each read with a reader of an analysis that exists in its
/// tenant is recorded in the audit trail, and the analyses found are returned with their tenants
/// (once each, in no particular order; another tenant's analysis is not found).
pub async fn find_many(
    db: impl PgExecutor<'_>,
    reads: &[Read],
) -> sqlx::Result<Vec<(String, AnalysisRecord)>> {
    let tenants: Vec<&str> = reads.iter().map(|r| r.tenant.as_str()).collect();
    let ids: Vec<Uuid> = reads.iter().map(|r| r.id).collect();
    let readers: Vec<Option<&str>> = reads.iter().map(|r| r.reader.as_deref()).collect();
    let rows = sqlx::query!(
        r#"with wanted as (
               select * from unnest($1::text[], $2::uuid[], $3::text[]) as w(tenant_id, id, actor)
           ), audit as (
               insert into audit_events (tenant_id, actor, action, target_type, target_id)
               select w.tenant_id, w.actor, 'analysis.read', 'analysis', w.id::text
               from wanted w
               where w.actor is not null
                 and exists (select 1 from analyses a where a.tenant_id = w.tenant_id and a.id = w.id)
           )
           select a.tenant_id, a.id, a.subject, a.model_name, a.model_version, a.model_sha256, a.priority,
                  case when a.status = 'queued' and j.state = 'running' then 'running' else a.status end as "status!",
                  a.input_sha256, a.error, a.validate_ms, a.created_at,
                  coalesce(a.started_at, j.started_at) as started_at, a.finished_at,
                  a.batch_id, r.result as "result?: sqlx::types::Json<Box<RawValue>>", r.timings as "timings?", r.execution_provider as "execution_provider?",
                  j.progress_done as "progress_done?", j.progress_total as "progress_total?"
           from analyses a
           left join jobs j on j.analysis_id = a.id
           left join results r on r.analysis_id = a.id
           where (a.tenant_id, a.id) in (select tenant_id, id from wanted)"#,
        &tenants as &[&str],
        &ids,
        &readers as &[Option<&str>],
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let record = AnalysisRecord {
                id: r.id,
                subject: r.subject,
                model_name: r.model_name,
                model_version: r.model_version,
                model_sha256: r.model_sha256,
                priority: r.priority,
                status: r.status,
                input_sha256: r.input_sha256,
                error: r.error,
                validate_ms: r.validate_ms,
                created_at: r.created_at,
                started_at: r.started_at,
                finished_at: r.finished_at,
                batch_id: r.batch_id,
                result: r.result,
                timings: r.timings,
                execution_provider: r.execution_provider,
                progress_done: r.progress_done,
                progress_total: r.progress_total,
            };
            (r.tenant_id, record)
        })
        .collect())
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
    pub batch_id: Option<Uuid>,
}

/// Filters for a listing; every one is optional.
#[derive(Debug, Default)]
pub struct ListFilter {
    pub before: Option<AnalysisId>,
    pub status: Option<String>,
    pub model: Option<String>,
    pub subject: Option<String>,
    pub batch: Option<Uuid>,
    pub created_after: Option<DateTime<Utc>>,
    pub created_before: Option<DateTime<Utc>>,
}

/// The tenant's analyses matching `filter`, newest first, `limit` at a time, continuing below
/// `filter.before` (ids are UUIDv7, so id order is submission order).
pub async fn list(
    db: impl PgExecutor<'_>,
    tenant: &TenantId,
    filter: &ListFilter,
    limit: i64,
) -> sqlx::Result<Vec<AnalysisSummary>> {
    sqlx::query_as!(
        AnalysisSummary,
        r#"select a.id, a.subject, a.model_name, a.model_version, a.priority,
                  case when a.status = 'queued' and j.state = 'running' then 'running' else a.status end as "status!",
                  a.created_at, a.finished_at, a.batch_id
         from analyses a left join jobs j on j.analysis_id = a.id
         where a.tenant_id = $1
           and ($2::uuid is null or a.id < $2)
           and ($3::text is null or (case when a.status = 'queued' and j.state = 'running' then 'running' else a.status end) = $3)
           and ($4::text is null or a.model_name = $4)
           and ($5::text is null or a.subject = $5)
           and ($6::uuid is null or a.batch_id = $6)
           and ($7::timestamptz is null or a.created_at >= $7)
           and ($8::timestamptz is null or a.created_at < $8)
         order by a.id desc
         limit $9"#,
        tenant.as_str(),
        filter.before.map(|b| b.0),
        filter.status,
        filter.model,
        filter.subject,
        filter.batch,
        filter.created_after,
        filter.created_before,
        limit,
    )
    .fetch_all(db)
    .await
}

/// What a cancel request found.
#[derive(Debug, PartialEq, Eq)]
pub enum Cancelled {
    Now,
    /// Already in a final state (which one).
    AlreadyFinal(String),
    NotFound,
}

/// Cancels a queued or running analysis: its job is marked cancelled first (the same lock order as
/// the worker's completion), so a worker holding it can no longer complete it.
pub async fn cancel(
    tx: &mut PgConnection,
    tenant: &TenantId,
    id: AnalysisId,
) -> sqlx::Result<Cancelled> {
    let job = sqlx::query_scalar!(
        "update jobs set state = 'cancelled', lease_owner = null, lease_expires_at = null
         where analysis_id = $1 and tenant_id = $2 and state in ('queued', 'running')
         returning analysis_id",
        id.0,
        tenant.as_str(),
    )
    .fetch_optional(&mut *tx)
    .await?;
    if job.is_some() {
        sqlx::query!(
            "update analyses set status = 'cancelled', finished_at = now() where id = $1 and tenant_id = $2",
            id.0,
            tenant.as_str(),
        )
        .execute(&mut *tx)
        .await?;
        super::jobs::notify_done(tx, &[id.0]).await?;
        return Ok(Cancelled::Now);
    }
    let status = sqlx::query_scalar!(
        "select status from analyses where id = $1 and tenant_id = $2",
        id.0,
        tenant.as_str()
    )
    .fetch_optional(&mut *tx)
    .await?;
    Ok(status.map_or(Cancelled::NotFound, Cancelled::AlreadyFinal))
}

/// Where an analysis stands, without its input or result: what a progress stream polls.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Standing {
    pub status: String,
    pub attempt: Option<i32>,
    pub tiles_done: Option<i32>,
    pub tiles_total: Option<i32>,
    pub error: Option<String>,
}

pub async fn standing(
    db: impl PgExecutor<'_>,
    tenant: &TenantId,
    id: AnalysisId,
) -> sqlx::Result<Option<Standing>> {
    sqlx::query_as!(
        Standing,
        r#"select case when a.status = 'queued' and j.state = 'running' then 'running' else a.status end as "status!",
                  j.attempts as "attempt?", j.progress_done as "tiles_done?", j.progress_total as "tiles_total?",
                  a.error
           from analyses a left join jobs j on j.analysis_id = a.id
           where a.tenant_id = $1 and a.id = $2"#,
        tenant.as_str(),
        id.0,
    )
    .fetch_optional(db)
    .await
}

/// How many of these analyses are stored (in any tenant): the intake's check of whether a group
/// whose statement failed had committed after all.
pub async fn count_existing(db: impl PgExecutor<'_>, ids: &[Uuid]) -> sqlx::Result<i64> {
    sqlx::query_scalar!(
        r#"select count(*) as "count!" from analyses where id = any($1)"#,
        ids
    )
    .fetch_one(db)
    .await
}
