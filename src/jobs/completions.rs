//! Completions: one LISTEN connection per process that fans the workers' "these analyses are
//! final" notifications out to every long poll waiting in this process.

use crate::repo::DONE_CHANNEL;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(Debug, Clone)]
pub struct Completions {
    sender: broadcast::Sender<Arc<Vec<Uuid>>>,
}

impl Default for Completions {
    fn default() -> Self {
        Self {
            sender: broadcast::channel(1024).0,
        }
    }
}

impl Completions {
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Vec<Uuid>>> {
        self.sender.subscribe()
    }

    /// Forwards notifications until `shutdown`, reconnecting after a lost connection. Readers also
    /// re-check the database on a timer, so a gap here delays them but never loses a result.
    pub async fn run(self, pool: PgPool, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            let listener = async {
                let mut l = PgListener::connect_with(&pool).await?;
                l.listen(DONE_CHANNEL).await?;
                Ok::<_, sqlx::Error>(l)
            };
            let mut listener = match listener.await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for completions; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    message = listener.recv() => match message {
                        Ok(n) => {
                            let ids = n.payload().split(',').filter_map(|s| Uuid::parse_str(s).ok()).collect();
                            // No receiver is fine: nobody is waiting.
                            let _ = self.sender.send(Arc::new(ids));
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "completion listener lost; reconnecting");
                            break;
                        }
                    }
                }
            }
        }
    }
}
