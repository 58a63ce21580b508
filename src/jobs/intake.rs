//! Intake: group commit for submissions. Concurrent submissions queue here and a few writer tasks
//! each take whatever has queued up and write it — one statement, its own transaction — instead
//! of a transaction each. Under load that cuts the database work per analysis several-fold;
//! when idle a group is a single submission, so nothing waits for company.

use crate::repo;
use crate::repo::analyses::{NewAnalysis, Submission};
use sqlx::PgPool;
use std::sync::Arc;
use tokio::sync::{Mutex, mpsc, oneshot};
use uuid::Uuid;

/// Most submissions written by one transaction.
const MAX_GROUP: usize = 256;
/// Transactions in flight at once: while one waits for its commit to reach the disk, the next
/// group is already being written. Two since a group became one statement (BENCHMARKS.md, 2026-12-01):
/// more writers make smaller groups, so more commits and more database CPU per analysis.
const WRITERS: usize = 2;

/// Why a submission was not stored.
#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    /// The database is not reachable (503).
    #[error("the database is not reachable")]
    Unavailable,
    /// The database refused the rows; the error says why (a NUL in a text value is the client's).
    #[error("cannot store the submission: {0}")]
    Refused(#[source] sqlx::Error),
    #[error("cannot store the submission: {0}")]
    Failed(&'static str),
}

impl From<sqlx::Error> for IntakeError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            e if crate::error::database_unreachable(&e) => Self::Unavailable,
            other => Self::Refused(other),
        }
    }
}

/// The stored analyses are handed back, so that the caller can answer from them.
type Reply = oneshot::Sender<Result<Vec<NewAnalysis>, IntakeError>>;
type Entry = (Submission, Vec<NewAnalysis>, Reply);

#[derive(Debug, Clone)]
pub struct Intake {
    queue: mpsc::Sender<Entry>,
}

impl Intake {
    /// Starts the writer task; it ends when the last `Intake` handle is dropped.
    pub fn start(pool: PgPool) -> Self {
        let (queue, incoming) = mpsc::channel(4 * MAX_GROUP);
        let incoming = Arc::new(Mutex::new(incoming));
        for _ in 0..WRITERS {
            tokio::spawn(write_groups(pool.clone(), Arc::clone(&incoming)));
        }
        Self { queue }
    }

    /// Stores the analyses and their jobs; returns them once they are committed.
    pub async fn submit(
        &self,
        submission: Submission,
        analyses: Vec<NewAnalysis>,
    ) -> Result<Vec<NewAnalysis>, IntakeError> {
        let (reply, committed) = oneshot::channel();
        self.queue
            .send((submission, analyses, reply))
            .await
            .map_err(|_| IntakeError::Failed("the intake has stopped"))?;
        committed
            .await
            .map_err(|_| IntakeError::Failed("the intake dropped the submission"))?
    }
}

async fn write_groups(pool: PgPool, incoming: Arc<Mutex<mpsc::Receiver<Entry>>>) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    // A writer takes whatever has queued up while it was busy; the others wait their turn.
    while incoming.lock().await.recv_many(&mut group, MAX_GROUP).await > 0 {
        match write(&pool, &group).await {
            Ok(()) => {
                for (_, analyses, reply) in group.drain(..) {
                    let _ = reply.send(Ok(analyses));
                }
            }
            // The database is gone (its check failed too): storing one by one would only wait for
            // it once per entry.
            Err(Failure::Unreachable(e)) => {
                tracing::warn!(error = %e, submissions = group.len(), "the database is not reachable");
                for (_, _, reply) in group.drain(..) {
                    let _ = reply.send(Err(IntakeError::Unavailable));
                }
            }
            Err(Failure::Refused(e)) if group.len() == 1 => {
                if let Some((_, _, reply)) = group.pop() {
                    let _ = reply.send(Err(e.into()));
                }
            }
            Err(Failure::Refused(e)) => {
                // One bad submission must not fail its neighbours (other tenants' among them):
                // store each on its own, so that only the bad one fails. A connection lost in
                // doubt is settled here too: an entry whose row commits meanwhile fails on its key,
                // and is then found stored.
                tracing::warn!(error = %e, submissions = group.len(), "group commit failed; storing one by one");
                for entry in group.drain(..) {
                    let outcome = write(&pool, std::slice::from_ref(&entry))
                        .await
                        .map(|()| entry.1)
                        .map_err(|failure| match failure {
                            Failure::Unreachable(_) => IntakeError::Unavailable,
                            Failure::Refused(e) => IntakeError::from(e),
                        });
                    // The caller may have gone (client disconnected); the rows are stored regardless.
                    let _ = entry.2.send(outcome);
                }
            }
        }
    }
}

/// Why a group was not stored.
enum Failure {
    /// The statement failed and the database could not be asked whether it had committed.
    Unreachable(sqlx::Error),
    /// The statement failed and the database, asked afterwards, does not hold the group.
    Refused(sqlx::Error),
}

/// Writes a group with one statement. When that fails, the commit may still have happened (the
/// connection was lost after the server committed, before its answer arrived): the group is then
/// looked for, and found stored means stored. The statement is atomic, so the first analysis of
/// each submission stands for all of it; its id is a fresh random UUID, so nothing else stored it.
/// Without this, the retry one by one would fail every submission on its own primary key.
async fn write(pool: &PgPool, group: &[Entry]) -> Result<(), Failure> {
    let error = match write_once(pool, group).await {
        Ok(()) => return Ok(()),
        // No connection was had, so no statement was sent.
        Err(e @ (sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed)) => {
            return Err(Failure::Unreachable(e));
        }
        Err(e) => e,
    };
    let firsts: Vec<Uuid> = group
        .iter()
        .filter_map(|(_, analyses, _)| analyses.first().map(|a| a.id.0))
        .collect();
    match repo::analyses::count_existing(pool, &firsts).await {
        Ok(found) if found == firsts.len() as i64 && found > 0 => {
            tracing::warn!(%error, submissions = group.len(), "the group was committed although its statement failed");
            Ok(())
        }
        Ok(_) => Err(Failure::Refused(error)),
        Err(check) if crate::error::database_unreachable(&check) => {
            Err(Failure::Unreachable(error))
        }
        Err(_) => Err(Failure::Refused(error)),
    }
}

async fn write_once(pool: &PgPool, group: &[Entry]) -> sqlx::Result<()> {
    let rows: Vec<(&Submission, &[NewAnalysis])> =
        group.iter().map(|(s, a, _)| (s, a.as_slice())).collect();
    // One statement, so no transaction block: the statement commits alone.
    let mut db = pool.acquire().await?;
    repo::analyses::insert_with_jobs(&mut db, &rows).await
}
