//! `onkos audit verify`: walks every tenant's provenance chain and checks each link against what
//! is stored now.

use crate::domain::provenance::{self, GENESIS};
use crate::repo;
use sqlx::PgPool;
use uuid::Uuid;

/// What the walk found for one tenant.
#[derive(Debug, serde::Serialize)]
pub struct TenantChain {
    pub tenant: String,
    /// Links checked.
    pub links: i64,
    /// Records not yet sealed into the chain, each checked alone.
    pub pending: usize,
    /// The first broken link, if any: its analysis and why.
    pub broken: Option<(Uuid, String)>,
}

const PAGE: i64 = 1000;

/// Checks every tenant's chain (or one tenant's), link by link, and its head.
pub async fn verify(pool: &PgPool, only: Option<&str>) -> anyhow::Result<Vec<TenantChain>> {
    let mut report = Vec::new();
    for (tenant, head_seq, head_chain) in repo::provenance::tenants(pool).await? {
        if only.is_some_and(|t| t != tenant) {
            continue;
        }
        report.push(verify_tenant(pool, tenant, head_seq, &head_chain).await?);
    }
    Ok(report)
}

async fn verify_tenant(
    pool: &PgPool,
    tenant: String,
    head_seq: i64,
    head_chain: &str,
) -> anyhow::Result<TenantChain> {
    let (mut seq, mut previous) = (0_i64, GENESIS.to_owned());
    let mut last = Uuid::nil();
    loop {
        let page = repo::provenance::chain_page(pool, &tenant, seq, head_seq, PAGE).await?;
        let full = page.len() as i64 == PAGE;
        for link in &page {
            if let Err(why) = provenance::check(&previous, seq + 1, &link.stored()) {
                return Ok(TenantChain {
                    tenant,
                    links: seq,
                    pending: 0,
                    broken: Some((link.analysis_id, why)),
                });
            }
            seq += 1;
            previous = link.chain_sha256.clone().unwrap_or_default();
            last = link.analysis_id;
        }
        if !full {
            break;
        }
    }
    // The head was read first; links appended since are beyond it and checked next time.
    let mut broken = (seq != head_seq || previous != head_chain).then(|| {
        (
            last,
            format!(
                "the chain ends at link {seq} but its head says {head_seq}: links after it were removed or the head was changed"
            ),
        )
    });
    // Records the sealer has not linked yet: each must still describe what is stored.
    let pending = repo::provenance::unsealed(pool, &tenant).await?;
    if broken.is_none() {
        broken = pending.iter().find_map(|link| {
            provenance::check_record(&link.stored())
                .err()
                .map(|why| (link.analysis_id, format!("a record not yet sealed: {why}")))
        });
    }
    Ok(TenantChain {
        tenant,
        links: seq,
        pending: pending.len(),
        broken,
    })
}
