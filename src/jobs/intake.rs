//! Intake: group commit for submissions. Concurrent submissions queue here and one task writes
//! whatever has queued up — one transaction, one statement per table — instead of a transaction
//! each. Under load that cuts the database work per analysis several-fold; when idle a batch is a
//! single submission, so nothing waits for company.

use crate::repo;
use crate::repo::analyses::{NewAnalysis, Submission};
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};

/// Most submissions written by one transaction.
const MAX_GROUP: usize = 256;

/// Why a submission was not stored.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IntakeError {
    /// The database is not reachable (503).
    #[error("the database is not reachable")]
    Unavailable,
    #[error("cannot store the submission: {0}")]
    Failed(String),
}

impl From<sqlx::Error> for IntakeError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
                Self::Unavailable
            }
            other => Self::Failed(other.to_string()),
        }
    }
}

type Reply = oneshot::Sender<Result<(), IntakeError>>;

#[derive(Debug, Clone)]
pub struct Intake {
    queue: mpsc::Sender<(Submission, Vec<NewAnalysis>, Reply)>,
}

impl Intake {
    /// Starts the writer task; it ends when the last `Intake` handle is dropped.
    pub fn start(pool: PgPool) -> Self {
        let (queue, incoming) = mpsc::channel(4 * MAX_GROUP);
        tokio::spawn(write_groups(pool, incoming));
        Self { queue }
    }

    /// Stores the analyses and their jobs; returns once they are committed.
    pub async fn submit(
        &self,
        submission: Submission,
        analyses: Vec<NewAnalysis>,
    ) -> Result<(), IntakeError> {
        let (reply, committed) = oneshot::channel();
        self.queue
            .send((submission, analyses, reply))
            .await
            .map_err(|_| IntakeError::Failed("the intake has stopped".into()))?;
        committed
            .await
            .map_err(|_| IntakeError::Failed("the intake dropped the submission".into()))?
    }
}

async fn write_groups(
    pool: PgPool,
    mut incoming: mpsc::Receiver<(Submission, Vec<NewAnalysis>, Reply)>,
) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    while incoming.recv_many(&mut group, MAX_GROUP).await > 0 {
        match write(&pool, &group).await {
            Ok(()) => reply_all(&mut group, &Ok(())),
            Err(e) if group.len() == 1 => reply_all(&mut group, &Err(e.into())),
            Err(e) => {
                // One bad submission must not fail its neighbours (other tenants' among them):
                // store each on its own, so that only the bad one fails.
                tracing::warn!(error = %e, submissions = group.len(), "group commit failed; storing one by one");
                for entry in group.drain(..) {
                    let outcome = write(&pool, std::slice::from_ref(&entry))
                        .await
                        .map_err(IntakeError::from);
                    // The caller may have gone (client disconnected); the rows are stored regardless.
                    let _ = entry.2.send(outcome);
                }
            }
        }
    }
}

fn reply_all(
    group: &mut Vec<(Submission, Vec<NewAnalysis>, Reply)>,
    outcome: &Result<(), IntakeError>,
) {
    for (_, _, reply) in group.drain(..) {
        let _ = reply.send(outcome.clone());
    }
}

async fn write(pool: &PgPool, group: &[(Submission, Vec<NewAnalysis>, Reply)]) -> sqlx::Result<()> {
    let rows: Vec<(&Submission, &[NewAnalysis])> =
        group.iter().map(|(s, a, _)| (s, a.as_slice())).collect();
    let mut tx = pool.begin().await?;
    repo::analyses::insert_with_jobs(&mut tx, &rows).await?;
    tx.commit().await
}
