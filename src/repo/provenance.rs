//! Provenance records and the per-tenant chain that links them.

use crate::domain::provenance::{self, GENESIS, ProvenanceRecord};
use serde_json::Value;
use sqlx::types::Json;
use sqlx::{PgConnection, PgExecutor};
use std::collections::BTreeMap;
use uuid::Uuid;

/// A result being stored, for its provenance record.
#[derive(Debug)]
pub struct Stored<'a> {
    pub analysis_id: Uuid,
    /// sha256 of the stored result's canonical JSON ([`provenance::result_digest`]).
    pub result_sha256: String,
    pub execution_provider: &'a str,
}

/// Appends the records of results stored in this transaction to their tenants' chains. Each
/// tenant's head row stays locked until commit; tenants are locked in name order, so two
/// transactions never wait on each other in a cycle.
pub async fn append(tx: &mut PgConnection, stored: &[Stored<'_>]) -> sqlx::Result<()> {
    if stored.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = stored.iter().map(|s| s.analysis_id).collect();
    let facts = sqlx::query!(
        r#"select a.id as "id!", a.tenant_id as "tenant_id!", a.input_sha256 as "input_sha256!",
                  a.model_name as "model_name!", a.model_version as "model_version!",
                  a.model_sha256 as "model_sha256!",
                  coalesce(m.manifest_sha256, '') as "manifest_sha256!"
           from analyses a left join models m on m.name = a.model_name and m.version = a.model_version
           where a.id = any($1)"#,
        &ids,
    )
    .fetch_all(&mut *tx)
    .await?;
    let by_id: BTreeMap<Uuid, &Stored> = stored.iter().map(|s| (s.analysis_id, s)).collect();
    let mut by_tenant: BTreeMap<String, Vec<ProvenanceRecord>> = BTreeMap::new();
    for f in facts {
        let Some(s) = by_id.get(&f.id) else { continue };
        by_tenant
            .entry(f.tenant_id.clone())
            .or_default()
            .push(ProvenanceRecord {
                analysis_id: f.id,
                tenant: f.tenant_id,
                input_sha256: f.input_sha256,
                model_name: f.model_name,
                model_version: f.model_version,
                model_sha256: f.model_sha256,
                manifest_sha256: f.manifest_sha256,
                code_version: provenance::CODE_VERSION.to_owned(),
                execution_provider: s.execution_provider.to_owned(),
                result_sha256: s.result_sha256.clone(),
            });
    }
    for (tenant, mut records) in by_tenant {
        records.sort_by_key(|r| r.analysis_id);
        let head = sqlx::query!(
            "insert into provenance_heads (tenant_id, seq, chain_sha256) values ($1, 0, $2)
             on conflict (tenant_id) do update set tenant_id = excluded.tenant_id
             returning seq, chain_sha256",
            tenant,
            GENESIS,
        )
        .fetch_one(&mut *tx)
        .await?;
        let (mut seq, mut previous) = (head.seq, head.chain_sha256);
        let mut rows = Rows::default();
        for record in records {
            seq += 1;
            let digest = record.digest();
            let chained = provenance::chain(&previous, &digest);
            rows.ids.push(record.analysis_id);
            rows.seqs.push(seq);
            rows.records
                .push(serde_json::to_value(&record).unwrap_or(Value::Null));
            rows.digests.push(digest);
            rows.previous
                .push(std::mem::replace(&mut previous, chained.clone()));
            rows.chained.push(chained);
        }
        let records: Vec<Json<&Value>> = rows.records.iter().map(Json).collect();
        sqlx::query!(
            "insert into provenance (analysis_id, tenant_id, seq, record, record_sha256, previous_sha256, chain_sha256)
             select t.id, $1, t.seq, t.record, t.digest, t.previous, t.chained
             from unnest($2::uuid[], $3::int8[], $4::jsonb[], $5::text[], $6::text[], $7::text[])
                  as t(id, seq, record, digest, previous, chained)",
            tenant,
            &rows.ids,
            &rows.seqs,
            &records as &[Json<&Value>],
            &rows.digests,
            &rows.previous,
            &rows.chained,
        )
        .execute(&mut *tx)
        .await?;
        sqlx::query!(
            "update provenance_heads set seq = $2, chain_sha256 = $3 where tenant_id = $1",
            tenant,
            seq,
            previous,
        )
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

#[derive(Debug, Default)]
struct Rows {
    ids: Vec<Uuid>,
    seqs: Vec<i64>,
    records: Vec<Value>,
    digests: Vec<String>,
    previous: Vec<String>,
    chained: Vec<String>,
}

/// One link of a chain as stored, with what is stored now for the same analysis.
#[derive(Debug)]
pub struct Link {
    pub analysis_id: Uuid,
    pub seq: i64,
    pub record: Value,
    pub record_sha256: String,
    pub previous_sha256: String,
    pub chain_sha256: String,
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
            previous_sha256: &self.previous_sha256,
            chain_sha256: &self.chain_sha256,
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
        r#"select p.analysis_id, p.seq, p.record, p.record_sha256, p.previous_sha256, p.chain_sha256,
                  p.created_at, a.input_sha256 as "input_sha256?", r.result as "result?"
           from provenance p
           left join analyses a on a.id = p.analysis_id
           left join results r on r.analysis_id = p.analysis_id
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
        r#"select p.analysis_id, p.seq, p.record, p.record_sha256, p.previous_sha256, p.chain_sha256,
                  p.created_at, a.input_sha256 as "input_sha256?", r.result as "result?"
           from provenance p
           left join analyses a on a.id = p.analysis_id
           left join results r on r.analysis_id = p.analysis_id
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

/// Every tenant with a chain, and its head.
pub async fn heads(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<(String, i64, String)>> {
    Ok(
        sqlx::query!(
            "select tenant_id, seq, chain_sha256 from provenance_heads order by tenant_id"
        )
        .fetch_all(db)
        .await?
        .into_iter()
        .map(|r| (r.tenant_id, r.seq, r.chain_sha256))
        .collect(),
    )
}
