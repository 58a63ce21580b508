//! The provenance sealer: links the records that results are stored with into their tenants'
//! chains after commit ([`repo::provenance::seal`]). Every `serve` and `worker` process runs one;
//! they share the work through the chain heads' row locks.

use crate::repo;
use sqlx::PgPool;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Records linked per tenant per transaction.
const BATCH: i64 = 5000;

/// Seals every `every` (at once again while a pass found a full batch) until `shutdown`, then
/// once more. The caller cancels `shutdown` after the process's last results are stored, so a
/// process stopped cleanly leaves nothing of its own unsealed.
pub async fn run(pool: PgPool, every: Duration, shutdown: CancellationToken) {
    while !shutdown.is_cancelled() {
        let pause = match repo::provenance::seal(&pool, BATCH, false).await {
            Ok(sealed) if sealed >= BATCH as u64 => Duration::ZERO,
            Ok(_) => every,
            Err(e) => {
                tracing::warn!(error = %e, "sealing provenance records failed; retrying");
                (every * 20).min(Duration::from_secs(5))
            }
        };
        if !pause.is_zero() {
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = shutdown.cancelled() => break,
            }
        }
    }
    if let Err(e) = repo::provenance::seal(&pool, i64::MAX, true).await {
        tracing::warn!(error = %e, "sealing provenance records at shutdown failed");
    }
}
