//! Provenance records and the per-tenant chain that links them.

use super::JsonText;
use super::jobs::ClaimedJob;
use crate::domain::provenance::{self, GENESIS, ProvenanceRecord};
use serde_json::Value;
use serde_json::value::RawValue;
use sqlx::{PgConnection, PgExecutor, PgPool};
use uuid::Uuid;

/// A result being stored, for its provenance record.
#[derive(Debug)]
pub struct Stored<'a> {
    /// The job whose result it is: its claim read the facts the record states.
    pub job: &'a ClaimedJob,
    /// sha256 of the stored result's canonical JSON ([`provenance::result_digest`]).
    pub result_sha256: String,
    pub execution_provider: &'a str,
}

/// Writes the records of results stored in this transaction, not yet linked: the sealer
/// ([`seal`]) links them into their tenants' chains after commit. No chain head is locked here,
/// so transactions that store results never wait for one another's commit.
pub async fn append(tx: &mut PgConnection, stored: &[Stored<'_>]) -> sqlx::Result<()> {
    if stored.is_empty() {
        return Ok(());
    }
    let rows = Rows::of(stored.iter().map(|s| ProvenanceRecord {
        analysis_id: s.job.analysis_id,
        tenant: s.job.tenant_id.clone(),
        input_sha256: s.job.input_sha256.clone(),
        model_name: s.job.model_name.clone(),
        model_version: s.job.model_version.clone(),
        model_sha256: s.job.model_sha256.clone(),
        manifest_sha256: s.job.manifest_sha256.clone(),
        code_version: provenance::CODE_VERSION.to_owned(),
        execution_provider: s.execution_provider.to_owned(),
        result_sha256: s.result_sha256.clone(),
    }));
    let records: Vec<JsonText<&RawValue>> = rows.records.iter().map(|r| JsonText(&**r)).collect();
    sqlx::query!(
        "insert into provenance (analysis_id, tenant_id, record, record_sha256)
         select * from unnest($1::uuid[], $2::text[], $3::json[], $4::text[])",
        &rows.ids,
        &rows.tenants,
        &records as &[JsonText<&RawValue>],
        &rows.digests,
    )
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Links records not yet sealed into their tenants' chains, oldest first, at most `limit` per
/// tenant, one transaction per tenant; returns how many it linked. A tenant whose chain head
/// another sealer holds (another process) is left to that one. A tenant's chain follows the
/// order in which its records were sealed, which is an order of commits: a record is sealed only
/// once its transaction has committed.
///
/// With `wait`, a held head is waited for instead of skipped: every record committed before the
/// call is sealed when it returns (for tests and shutdown).
pub async fn seal(pool: &PgPool, limit: i64, wait: bool) -> sqlx::Result<u64> {
    let tenants = sqlx::query_scalar!(
        r#"select distinct tenant_id as "tenant_id!" from provenance where seq is null
           order by 1"#
    )
    .fetch_all(pool)
    .await?;
    // One tenant's failure does not keep the others unsealed: each is tried, the first error is
    // returned after.
    let (mut sealed, mut failed) = (0, None);
    for tenant in tenants {
        match seal_tenant(pool, &tenant, limit, wait).await {
            Ok(n) => sealed += n,
            Err(e) => {
                tracing::warn!(tenant, error = %e, "sealing a tenant's provenance records failed");
                failed.get_or_insert(e);
            }
        }
    }
    failed.map_or(Ok(sealed), Err)
}

async fn seal_tenant(pool: &PgPool, tenant: &str, limit: i64, wait: bool) -> sqlx::Result<u64> {
    let mut tx = pool.begin().await?;
    let mut head = lock_head(&mut tx, tenant, wait).await?;
    if head.is_none() {
        // No head row, or another sealer holds it (a plain read does not wait for its lock).
        let exists = sqlx::query_scalar!(
            r#"select exists (select 1 from provenance_heads where tenant_id = $1) as "exists!""#,
            tenant,
        )
        .fetch_one(&mut *tx)
        .await?;
        if exists && !wait {
            return Ok(0);
        }
        sqlx::query!(
            "insert into provenance_heads (tenant_id, seq, chain_sha256) values ($1, 0, $2)
             on conflict (tenant_id) do nothing",
            tenant,
            GENESIS,
        )
        .execute(&mut *tx)
        .await?;
        head = lock_head(&mut tx, tenant, wait).await?;
    }
    let Some(head) = head else {
        return Ok(0);
    };
    let pending = sqlx::query!(
        "select analysis_id, record_sha256 from provenance
         where tenant_id = $1 and seq is null
         order by created_at, analysis_id
         limit $2",
        tenant,
        limit,
    )
    .fetch_all(&mut *tx)
    .await?;
    if pending.is_empty() {
        return Ok(0);
    }
    let (mut seq, mut previous) = (head.seq, head.chain_sha256);
    let (mut ids, mut seqs, mut previouses, mut chained) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for record in pending {
        seq += 1;
        let link = provenance::chain(&previous, &record.record_sha256);
        ids.push(record.analysis_id);
        seqs.push(seq);
        previouses.push(std::mem::replace(&mut previous, link.clone()));
        chained.push(link);
    }
    let updated = sqlx::query!(
        "update provenance p
         set seq = t.seq, previous_sha256 = t.previous, chain_sha256 = t.chained
         from unnest($1::uuid[], $2::int8[], $3::text[], $4::text[]) as t(id, seq, previous, chained)
         where p.analysis_id = t.id and p.seq is null",
        &ids,
        &seqs,
        &previouses,
        &chained,
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if updated != ids.len() as u64 {
        // A record went (its analysis deleted) between the read and the update: linking the
        // others would leave a gap. Rolled back; the next pass reads them again.
        return Ok(0);
    }
    sqlx::query!(
        "update provenance_heads set seq = $2, chain_sha256 = $3 where tenant_id = $1",
        tenant,
        seq,
        previous,
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(updated)
}

/// The tenant's chain head, locked: waiting for another sealer, or `None` when one holds it.
async fn lock_head(tx: &mut PgConnection, tenant: &str, wait: bool) -> sqlx::Result<Option<Head>> {
    if wait {
        sqlx::query_as!(
            Head,
            "select seq, chain_sha256 from provenance_heads where tenant_id = $1 for update",
            tenant,
        )
        .fetch_optional(&mut *tx)
        .await
    } else {
        sqlx::query_as!(
            Head,
            "select seq, chain_sha256 from provenance_heads where tenant_id = $1
             for update skip locked",
            tenant,
        )
        .fetch_optional(&mut *tx)
        .await
    }
}

/// A tenant's chain head.
#[derive(Debug)]
struct Head {
    seq: i64,
    chain_sha256: String,
}

/// Unsealed provenance records as the columns they are inserted as.
#[derive(Debug, Default)]
pub(super) struct Rows {
    pub ids: Vec<Uuid>,
    pub tenants: Vec<String>,
    /// Each record's canonical text, as stored and digested.
    pub records: Vec<Box<RawValue>>,
    pub digests: Vec<String>,
}

impl Rows {
    pub fn of(records: impl Iterator<Item = ProvenanceRecord>) -> Self {
        let mut rows = Self::default();
        for record in records {
            let text = record.canonical_text();
            rows.ids.push(record.analysis_id);
            rows.digests
                .push(provenance::sha256_hex(text.get().as_bytes()));
            rows.tenants.push(record.tenant);
            rows.records.push(text);
        }
        rows
    }
}

/// One link of a chain as stored, with what is stored now for the same analysis.
#[derive(Debug)]
pub struct Link {
    pub analysis_id: Uuid,
    /// `None` (with the two digests) until the sealer links the record.
    pub seq: Option<i64>,
    pub record: Value,
    pub record_sha256: String,
    pub previous_sha256: Option<String>,
    pub chain_sha256: Option<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// The analysis's stored input digest and result now (absent if deleted).
    pub input_sha256: Option<String>,
    pub result: Option<Value>,
}

impl Link {
    /// The link as the chain check reads it.
    pub fn stored(&self) -> provenance::StoredLink<'_> {
        provenance::StoredLink {
            seq: self.seq,
            record: &self.record,
            record_sha256: &self.record_sha256,
            previous_sha256: self.previous_sha256.as_deref(),
            chain_sha256: self.chain_sha256.as_deref(),
            input_sha256: self.input_sha256.as_deref(),
            result: self.result.as_ref(),
        }
    }
}

/// The provenance of one analysis in the caller's tenant.
pub async fn find(
    db: impl PgExecutor<'_>,
    tenant: &str,
    analysis: Uuid,
) -> sqlx::Result<Option<Link>> {
    sqlx::query_as!(
        Link,
        r#"select analysis_id as "analysis_id!", seq, record as "record!",
                  record_sha256 as "record_sha256!", previous_sha256, chain_sha256,
                  created_at as "created_at!", input_sha256 as "input_sha256?", result as "result?"
           from provenance_links p
           where p.tenant_id = $1 and p.analysis_id = $2"#,
        tenant,
        analysis,
    )
    .fetch_optional(db)
    .await
}

/// A page of a tenant's chain in order, from `after_seq` (exclusive) up to `through_seq`: links
/// committed after the walk began are left for the next walk.
pub async fn chain_page(
    db: impl PgExecutor<'_>,
    tenant: &str,
    after_seq: i64,
    through_seq: i64,
    limit: i64,
) -> sqlx::Result<Vec<Link>> {
    sqlx::query_as!(
        Link,
        r#"select analysis_id as "analysis_id!", seq, record as "record!",
                  record_sha256 as "record_sha256!", previous_sha256, chain_sha256,
                  created_at as "created_at!", input_sha256 as "input_sha256?", result as "result?"
           from provenance_links p
           where p.tenant_id = $1 and p.seq > $2 and p.seq <= $3
           order by p.seq
           limit $4"#,
        tenant,
        after_seq,
        through_seq,
        limit,
    )
    .fetch_all(db)
    .await
}

/// A tenant's records not yet sealed, oldest first (checked alone by the audit).
pub async fn unsealed(db: impl PgExecutor<'_>, tenant: &str) -> sqlx::Result<Vec<Link>> {
    sqlx::query_as!(
        Link,
        r#"select analysis_id as "analysis_id!", seq, record as "record!",
                  record_sha256 as "record_sha256!", previous_sha256, chain_sha256,
                  created_at as "created_at!", input_sha256 as "input_sha256?", result as "result?"
           from provenance_links p
           where p.tenant_id = $1 and p.seq is null
           order by p.created_at, p.analysis_id"#,
        tenant,
    )
    .fetch_all(db)
    .await
}

/// Every tenant with provenance records, and its chain's head (seq 0 and the genesis digest when
/// none of its records is sealed yet).
pub async fn tenants(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<(String, i64, String)>> {
    Ok(sqlx::query!(
        r#"select t.tenant_id as "tenant_id!", coalesce(h.seq, 0) as "seq!",
                  coalesce(h.chain_sha256, $1) as "chain_sha256!"
           from (select tenant_id from provenance_heads
                 union select distinct tenant_id from provenance where seq is null) t
           left join provenance_heads h on h.tenant_id = t.tenant_id
           order by t.tenant_id"#,
        GENESIS,
    )
    .fetch_all(db)
    .await?
    .into_iter()
    .map(|r| (r.tenant_id, r.seq, r.chain_sha256))
    .collect())
}
