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

type Reply = oneshot::Sender<Result<(), String>>;

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
    ) -> anyhow::Result<()> {
        let (reply, committed) = oneshot::channel();
        self.queue
            .send((submission, analyses, reply))
            .await
            .map_err(|_| anyhow::anyhow!("the intake has stopped"))?;
        committed
            .await
            .map_err(|_| anyhow::anyhow!("the intake dropped the submission"))?
            .map_err(|e| anyhow::anyhow!("cannot store the submission: {e}"))
    }
}

async fn write_groups(
    pool: PgPool,
    mut incoming: mpsc::Receiver<(Submission, Vec<NewAnalysis>, Reply)>,
) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    while incoming.recv_many(&mut group, MAX_GROUP).await > 0 {
        let outcome = write(&pool, &group).await.map_err(|e| {
            tracing::warn!(error = %e, submissions = group.len(), "group commit failed");
            e.to_string()
        });
        for (_, _, reply) in group.drain(..) {
            // The caller may have gone (client disconnected); the rows are stored regardless.
            let _ = reply.send(outcome.clone());
        }
    }
}

async fn write(pool: &PgPool, group: &[(Submission, Vec<NewAnalysis>, Reply)]) -> sqlx::Result<()> {
    let rows: Vec<(&Submission, &[NewAnalysis])> =
        group.iter().map(|(s, a, _)| (s, a.as_slice())).collect();
    let mut tx = pool.begin().await?;
    repo::analyses::insert_with_jobs(&mut tx, &rows).await?;
    tx.commit().await
}
