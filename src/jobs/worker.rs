//! The worker. `step` claims a batch, runs each model's share of it as one inference call and
//! stores every outcome; `run` repeats that, woken by NOTIFY with polling as the fallback.

use crate::domain::result::ClassificationResult;
use crate::registry::{LoadedModel, Registry};
use crate::repo;
use crate::repo::jobs::{ClaimedJob, Outcome};
use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

/// What one job produced: its result document and timings, or the reason it failed.
type JobOutcome = Result<(serde_json::Value, serde_json::Value), String>;

#[derive(Debug, Clone)]
pub struct Worker {
    pool: PgPool,
    registry: Arc<Registry>,
    id: Uuid,
    batch_size: i64,
    lease_secs: f64,
}

impl Worker {
    pub fn new(pool: PgPool, registry: Arc<Registry>, batch_size: u32, lease_secs: u32) -> Self {
        Self {
            pool,
            registry,
            id: Uuid::now_v7(),
            batch_size: i64::from(batch_size),
            lease_secs: f64::from(lease_secs),
        }
    }

    /// Claims what is runnable now (up to the batch size), runs it and stores the outcomes.
    /// Returns how many analyses were finished.
    pub async fn step(&self) -> anyhow::Result<usize> {
        let jobs = repo::jobs::claim(&self.pool, self.id, self.batch_size, self.lease_secs).await?;
        if jobs.is_empty() {
            return Ok(0);
        }
        let mut by_model: BTreeMap<String, Vec<ClaimedJob>> = BTreeMap::new();
        for job in jobs {
            by_model
                .entry(job.model_name.clone())
                .or_default()
                .push(job);
        }
        let mut finished = 0;
        for (name, jobs) in by_model {
            let span = tracing::info_span!("batch", model = %name, size = jobs.len());
            finished += self.run_batch(&name, jobs).instrument(span).await?;
        }
        Ok(finished)
    }

    async fn run_batch(&self, name: &str, jobs: Vec<ClaimedJob>) -> anyhow::Result<usize> {
        let Some(model) = self.registry.get(name) else {
            let error = format!("model {name} is not loaded in this worker");
            return self
                .store(jobs.iter().map(|j| (j, Err(error.clone()))).collect())
                .await;
        };
        // Inputs were checked on the way in; checking again costs microseconds and guards against
        // a stored row that predates a contract change.
        let mut rows = Vec::with_capacity(jobs.len() * model.manifest.inputs.len());
        let mut checked = Vec::with_capacity(jobs.len());
        for job in &jobs {
            let valid = job
                .input
                .as_object()
                .ok_or_else(|| "stored input is not an object".to_owned())
                .and_then(|features| {
                    model
                        .manifest
                        .validate_features(features)
                        .map_err(|errors| {
                            errors
                                .iter()
                                .map(|e| format!("{}: {}", e.field, e.message))
                                .collect::<Vec<_>>()
                                .join("; ")
                        })
                });
            if let Ok(v) = &valid {
                rows.extend(v.values.iter().map(|x| *x as f32));
            }
            checked.push(valid);
        }
        let started = Instant::now();
        let predictions = if rows.is_empty() {
            Ok(Vec::new())
        } else {
            let model = Arc::clone(&model);
            let span =
                tracing::info_span!("infer", rows = rows.len() / model.manifest.inputs.len());
            tokio::task::spawn_blocking(move || span.in_scope(|| model.onnx.predict(&rows)))
                .await
                .map_err(|e| anyhow::anyhow!("inference task died: {e}"))?
        };
        let infer_ms = started.elapsed().as_secs_f64() * 1e3;
        let batch_size = checked.iter().filter(|c| c.is_ok()).count();
        let mut outputs = match predictions {
            Ok(rows) => rows.into_iter().map(Ok).collect::<Vec<_>>().into_iter(),
            Err(e) => {
                tracing::error!(error = ?e, model = name, "inference failed");
                vec![Err(format!("inference failed: {e}")); batch_size].into_iter()
            }
        };
        let outcomes = jobs
            .iter()
            .zip(checked)
            .map(|(job, valid)| {
                let outcome = valid.and_then(|v| {
                    let row = outputs
                        .next()
                        .unwrap_or_else(|| Err("model returned too few rows".into()))?;
                    result_document(
                        &model,
                        job,
                        &row,
                        v.outside_training_range,
                        infer_ms,
                        batch_size,
                    )
                });
                (job, outcome)
            })
            .collect();
        self.store(outcomes).await
    }

    /// Stores all outcomes of a batch in one transaction; each job is fenced on this worker's lease.
    async fn store(&self, outcomes: Vec<(&ClaimedJob, JobOutcome)>) -> anyhow::Result<usize> {
        let provider = self.registry.provider();
        let mut tx = self.pool.begin().await?;
        let mut finished = 0;
        for (job, outcome) in &outcomes {
            let outcome = match outcome {
                Ok((result, timings)) => Outcome::Succeeded {
                    result,
                    timings,
                    execution_provider: provider,
                },
                Err(error) => Outcome::Failed { error },
            };
            if repo::jobs::finish(&mut tx, job, self.id, outcome).await? {
                finished += 1;
            } else {
                tracing::warn!(analysis = %job.analysis_id, "lease lost before the result was stored; discarded");
            }
        }
        tx.commit().await?;
        Ok(finished)
    }

    /// Steps until `shutdown`, sleeping between empty steps until NOTIFY or `poll` elapses.
    pub async fn run(self, shutdown: CancellationToken, poll: Duration) {
        let mut listener = match PgListener::connect_with(&self.pool).await {
            Ok(mut l) => match l.listen(repo::JOBS_CHANNEL).await {
                Ok(()) => Some(l),
                Err(e) => {
                    tracing::warn!(error = %e, "LISTEN failed; polling only");
                    None
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "no listener connection; polling only");
                None
            }
        };
        tracing::info!(worker = %self.id, "worker started");
        while !shutdown.is_cancelled() {
            let finished = match self.step().await {
                Ok(n) => n,
                Err(e) => {
                    tracing::error!(error = ?e, "worker step failed");
                    0
                }
            };
            if finished > 0 {
                continue;
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(poll) => {}
                notified = async {
                    match listener.as_mut() {
                        Some(l) => l.recv().await.map(|_| ()),
                        None => std::future::pending().await,
                    }
                } => if let Err(e) = notified {
                    tracing::warn!(error = %e, "listener lost; polling until it reconnects");
                }
            }
        }
        tracing::info!(worker = %self.id, "worker stopped");
    }
}

/// The stored result and timings of one job.
fn result_document(
    model: &LoadedModel,
    job: &ClaimedJob,
    row: &[f32],
    flags: Vec<crate::domain::contract::RangeFlag>,
    infer_ms: f64,
    batch_size: usize,
) -> JobOutcome {
    let result = ClassificationResult::from_probabilities(&model.manifest, row, flags)?;
    let queue_wait_ms = job
        .started_at
        .map(|s| (s - job.created_at).num_microseconds().unwrap_or(0) as f64 / 1e3)
        .unwrap_or(0.0);
    let document = serde_json::to_value(result).map_err(|e| e.to_string())?;
    let timings =
        json!({ "queue_wait_ms": queue_wait_ms, "infer_ms": infer_ms, "batch_size": batch_size });
    Ok((document, timings))
}
