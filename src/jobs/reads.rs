//! Audited reads, grouped. Every read of an analysis's result is recorded in the audit trail, so a
//! read is a write: a statement and a commit (an fsync) of its own. Under load that is most of what
//! a waiting submitter on the queue path costs the database: many submitters are woken by one
//! batch's completion and all read at once. Here concurrent reads queue, and a few reader tasks
//! each take whatever has queued up and serve it with one statement (`repo::analyses::find_many`);
//! when idle a group is a single read, so nothing waits for company. The same shape as the intake
//! (`intake.rs`).

use crate::domain::ids::{AnalysisId, TenantId};
use crate::repo;
use crate::repo::analyses::{AnalysisRecord, Read};
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::{Mutex, mpsc, oneshot};
use uuid::Uuid;

/// Most reads served by one statement.
const MAX_GROUP: usize = 256;
/// Statements in flight at once: while one waits for its commit, the next group is being read.
const READERS: usize = 2;

type Reply = oneshot::Sender<sqlx::Result<Option<AnalysisRecord>>>;
type Entry = (Read, Reply);

#[derive(Debug, Clone)]
pub struct Reads {
    queue: mpsc::Sender<Entry>,
}

impl Reads {
    /// Starts the reader tasks; they end when the last `Reads` handle is dropped.
    pub fn start(pool: PgPool) -> Self {
        let (queue, incoming) = mpsc::channel(4 * MAX_GROUP);
        let incoming = Arc::new(Mutex::new(incoming));
        for _ in 0..READERS {
            tokio::spawn(read_groups(pool.clone(), Arc::clone(&incoming)));
        }
        Self { queue }
    }

    /// One analysis of `tenant`, its read by `reader` recorded in the audit trail when it exists
    /// there (a refused read is not a read). As `repo::analyses::find` with a reader.
    pub async fn find(
        &self,
        tenant: &TenantId,
        id: AnalysisId,
        reader: &str,
    ) -> sqlx::Result<Option<AnalysisRecord>> {
        let (reply, answer) = oneshot::channel();
        let read = Read {
            tenant: tenant.clone(),
            id: id.0,
            reader: Some(reader.to_owned()),
        };
        self.queue
            .send((read, reply))
            .await
            .map_err(|_| sqlx::Error::PoolClosed)?;
        answer.await.map_err(|_| sqlx::Error::PoolClosed)?
    }
}

async fn read_groups(pool: PgPool, incoming: Arc<Mutex<mpsc::Receiver<Entry>>>) {
    let mut group: Vec<Entry> = Vec::with_capacity(MAX_GROUP);
    while incoming.lock().await.recv_many(&mut group, MAX_GROUP).await > 0 {
        // A read whose requester has gone (client disconnected) is not delivered, so not audited.
        group.retain(|(_, reply)| !reply.is_closed());
        if group.is_empty() {
            continue;
        }
        let reads: Vec<Read> = group.iter().map(|(read, _)| read.clone()).collect();
        match repo::analyses::find_many(&pool, &reads).await {
            Ok(found) => {
                let found: HashMap<(String, Uuid), AnalysisRecord> = found
                    .into_iter()
                    .map(|(tenant, record)| ((tenant, record.id), record))
                    .collect();
                // Each read gets its own copy: two reads of one analysis in a group are two reads.
                for (read, (_, reply)) in reads.iter().zip(group.drain(..)) {
                    let _ = reply.send(Ok(found.get(&key(read)).cloned()));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, reads = group.len(), "grouped read failed");
                let entries: Vec<(Read, Reply)> = reads
                    .into_iter()
                    .zip(group.drain(..).map(|(_, reply)| reply))
                    .collect();
                settle(&pool, &e, entries).await;
            }
        }
    }
}

/// Answers the reads of a group whose statement failed, by what the failure says about it.
/// - The statement was refused (an error from the database itself, not a lost connection):
///   nothing of it was committed, so each read is tried on its own, all at once, and only a read
///   that fails again fails.
/// - A row could not be decoded: the statement ran and its audit events are committed, so the
///   reads are tried again without a reader (not audited twice).
/// - Anything else (the database unreachable, a connection lost in doubt): each read gets that
///   error at once (503), instead of each waiting out its own connection timeout in turn.
async fn settle(pool: &PgPool, error: &sqlx::Error, entries: Vec<(Read, Reply)>) {
    let retry_audited =
        matches!(error, sqlx::Error::Database(_)) && !crate::error::database_unreachable(error);
    let retry_unaudited = matches!(
        error,
        sqlx::Error::Decode(_) | sqlx::Error::ColumnDecode { .. }
    );
    if !(retry_audited || retry_unaudited) {
        let unreachable = crate::error::database_unreachable(error);
        for (_, reply) in entries {
            let _ = reply.send(Err(if unreachable {
                sqlx::Error::PoolTimedOut
            } else {
                sqlx::Error::Protocol(format!("the grouped read failed: {error}"))
            }));
        }
        return;
    }
    futures_util::future::join_all(entries.into_iter().map(|(read, reply)| async move {
        let reader = if retry_audited {
            read.reader.as_deref()
        } else {
            None
        };
        let outcome = repo::analyses::find(pool, &read.tenant, AnalysisId(read.id), reader).await;
        let _ = reply.send(outcome);
    }))
    .await;
}

fn key(read: &Read) -> (String, Uuid) {
    (read.tenant.as_str().to_owned(), read.id)
}
