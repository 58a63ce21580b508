//! The worker. `step` = `claim` a batch of one model's jobs + `process` it: one inference call for
//! the batch, every outcome stored in one transaction, the lease heartbeated meanwhile. `run`
//! repeats that, woken by NOTIFY with polling as the fallback.

use crate::config::Config;
use crate::domain::contract::RangeFlag;
use crate::domain::ids::TenantId;
use crate::domain::result::ModelOutputs;
use crate::domain::result::{
    ATTENTION, AnalysisResult, AttendedTile, BagSummary, Evidence, Measurement, SLIDE_SCHEMA,
    SlideResult, SlideStages, SlideSummary,
};
use crate::inference::Provider;
use crate::jobs::retry::{RetryPolicy, unit_random};
use crate::registry::{LoadedModel, Registry};
use crate::repo;
use crate::repo::jobs::{ClaimedJob, Outcome, Success};
use crate::repo::slides::Key;
use crate::slides::analyse::{Analysed, Plan, Stopped, TileScores, analyse};
use crate::telemetry;
use crate::telemetry::metrics::Metrics;
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

/// A stored input checked again: its encoded row and its out-of-training-range flags.
type Checked = (Vec<f64>, Vec<RangeFlag>);

/// What one attempt at a job produced.
#[derive(Debug, Clone)]
enum Attempt {
    Done {
        result: Document,
        timings: Value,
        /// Slide analyses: the per-tile scores.
        tiles: Option<Box<TileScores>>,
    },
    /// Might succeed if tried again (inference error, model not loaded here).
    Transient(String),
    /// Will never succeed (the stored input breaks the contract).
    Permanent(String),
}

/// A result as it comes out of a run: a tree (slides and bags, assembled in parts), or already
/// its canonical text (feature rows, written straight from the typed result, as the inline path
/// does: no tree is built).
#[derive(Debug, Clone)]
enum Document {
    Tree(Value),
    Canonical(Box<serde_json::value::RawValue>),
}

impl Document {
    /// The canonical text that is stored and digested.
    fn canonical(self) -> Box<serde_json::value::RawValue> {
        match self {
            Self::Tree(tree) => crate::domain::provenance::canonical_text(&tree),
            Self::Canonical(text) => text,
        }
    }

    fn into_tree(self) -> Result<Value, String> {
        match self {
            Self::Tree(tree) => Ok(tree),
            Self::Canonical(text) => serde_json::from_str(text.get()).map_err(|e| e.to_string()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Worker {
    pool: PgPool,
    registry: Arc<Registry>,
    id: Uuid,
    batch_size: i64,
    batch_wait: Duration,
    lease: Duration,
    retry: RetryPolicy,
    slide_batch: usize,
    last_reap: Arc<std::sync::Mutex<Option<Instant>>>,
    metrics: Arc<Metrics>,
}

const REAP_INTERVAL: Duration = Duration::from_secs(1);
/// How often a running slide analysis records its progress (and learns of its cancellation).
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

impl Worker {
    pub fn new(
        pool: PgPool,
        registry: Arc<Registry>,
        config: &Config,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            pool,
            registry,
            id: Uuid::now_v7(),
            batch_size: i64::from(config.worker_batch_size),
            batch_wait: Duration::from_millis(config.worker_batch_wait_ms),
            lease: Duration::from_secs(u64::from(config.worker_lease_secs)),
            retry: config.retry_policy(),
            slide_batch: config.slide_batch_tiles as usize,
            last_reap: Arc::default(),
            metrics,
        }
    }

    pub fn id(&self) -> Uuid {
        self.id
    }

    /// A second worker with the same models and settings but its own identity (its own leases).
    pub fn another(&self) -> Self {
        Self {
            id: Uuid::now_v7(),
            last_reap: Arc::default(),
            ..self.clone()
        }
    }

    /// Claims what is runnable now (up to the batch size, one model), runs it and stores the
    /// outcomes. Returns how many jobs it finished or rescheduled.
    pub async fn step(&self) -> anyhow::Result<usize> {
        let jobs = self.claim().await?;
        self.process(jobs).await
    }

    /// Fails jobs whose worker died on every attempt, then claims a batch. When the batch is not
    /// full and a batch wait is configured, waits once for more jobs of the same model.
    pub async fn claim(&self) -> anyhow::Result<Vec<ClaimedJob>> {
        if self.reap_due() {
            let mut tx = self.pool.begin().await?;
            let reaped = repo::jobs::reap_exhausted(&mut tx).await?;
            tx.commit().await?;
            if reaped > 0 {
                tracing::warn!(reaped, "failed analyses whose worker died on every attempt");
            }
        }
        let lease = self.lease.as_secs_f64();
        let mut jobs = repo::jobs::claim(&self.pool, self.id, self.batch_size, lease, None).await?;
        let missing = self.batch_size - jobs.len() as i64;
        if !jobs.is_empty() && missing > 0 && !self.batch_wait.is_zero() {
            tokio::time::sleep(self.batch_wait).await;
            let model = jobs[0].model_name.clone();
            jobs.extend(
                repo::jobs::claim(&self.pool, self.id, missing, lease, Some(&model)).await?,
            );
        }
        Ok(jobs)
    }

    /// Looking for dead-lettered jobs once a second is plenty; doing it on every step under load
    /// would cost a transaction per batch.
    fn reap_due(&self) -> bool {
        let Ok(mut last) = self.last_reap.lock() else {
            return true;
        };
        let due = last.is_none_or(|t| t.elapsed() >= REAP_INTERVAL);
        if due {
            *last = Some(Instant::now());
        }
        due
    }

    /// Runs claimed jobs and stores their outcomes; the lease is extended while this runs.
    pub async fn process(&self, jobs: Vec<ClaimedJob>) -> anyhow::Result<usize> {
        if jobs.is_empty() {
            return Ok(0);
        }
        let mut finished = 0;
        // Claims are per model; a new version activated meanwhile can split one claim in two.
        let mut groups: Vec<((String, String), Vec<ClaimedJob>)> = Vec::new();
        for job in jobs {
            let key = (job.model_name.clone(), job.model_version.clone());
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, group)) => group.push(job),
                None => groups.push((key, vec![job])),
            }
        }
        for ((model, version), jobs) in groups {
            let span = batch_span(&model, &version, &jobs);
            // Started outside the batch's span: a task spawned inside it would keep the span open.
            // The heartbeat stops before the outcome is stored, so that its update and the
            // storing transaction never hold the same rows in different orders.
            let heartbeat = self.heartbeat(&jobs);
            finished += async {
                // The claim already happened; this marks it in the submission's trace.
                tracing::info_span!(
                    "claim",
                    worker = %self.id,
                    attempt = jobs[0].attempts,
                    queue_wait_ms = queue_wait_ms(&jobs[0])
                )
                .in_scope(|| {});
                self.metrics.batch_size.observe(jobs.len() as f64);
                for job in &jobs {
                    self.metrics.stage("queue_wait", queue_wait_ms(job) / 1e3);
                }
                let attempts = self.run_batch(&model, &version, &jobs).await;
                drop(heartbeat);
                self.observe_stages(&attempts);
                // The provider of this model's session: with `auto`, one model may have fallen
                // back to the CPU while others run on CUDA.
                let provider = self
                    .registry
                    .version(&model, &version)
                    .await
                    .map_or_else(|_| self.registry.provider(), |m| m.onnx.provider);
                let storing = Instant::now();
                let stored = self
                    .store(&jobs, attempts, provider)
                    .instrument(tracing::info_span!("store"))
                    .await?;
                self.metrics.stage("store", storing.elapsed().as_secs_f64());
                Ok::<usize, anyhow::Error>(stored)
            }
            .instrument(span)
            .await?;
        }
        Ok(finished)
    }

    /// Inference time once per batch (its analyses share one call), and slide reading per slide,
    /// from the timings the attempts report.
    fn observe_stages(&self, attempts: &[Attempt]) {
        let timing = |timings: &serde_json::Value, key: &str| {
            timings.get(key).and_then(serde_json::Value::as_f64)
        };
        let mut batch_infer = None;
        for attempt in attempts {
            if let Attempt::Done { timings, .. } = attempt {
                if let Some(read) = timing(timings, "read_ms") {
                    self.metrics.stage("read", read / 1e3);
                }
                match (timing(timings, "infer_ms"), timing(timings, "read_ms")) {
                    // A slide: its own inference.
                    (Some(infer), Some(_)) => self.metrics.stage("infer", infer / 1e3),
                    (Some(infer), None) => batch_infer = Some(infer),
                    (None, _) => {}
                }
            }
        }
        if let Some(infer) = batch_infer {
            self.metrics.stage("infer", infer / 1e3);
        }
    }

    /// Extends the leases every third of the lease until the returned guard is dropped.
    fn heartbeat(&self, jobs: &[ClaimedJob]) -> tokio_util::sync::DropGuard {
        let held: Vec<(Uuid, i32)> = jobs.iter().map(|j| (j.analysis_id, j.attempts)).collect();
        let (pool, id, lease) = (self.pool.clone(), self.id, self.lease);
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(lease / 3);
            tick.tick().await;
            loop {
                tokio::select! {
                    () = stopped.cancelled() => break,
                    _ = tick.tick() => {
                        if let Err(e) = repo::jobs::heartbeat(&pool, id, &held, lease.as_secs_f64()).await {
                            tracing::warn!(error = %e, "heartbeat failed; the lease may expire");
                        }
                    }
                }
            }
        });
        stop.drop_guard()
    }

    async fn run_batch(&self, name: &str, version: &str, jobs: &[ClaimedJob]) -> Vec<Attempt> {
        let model = match self
            .registry
            .version(name, version)
            .instrument(tracing::info_span!("load"))
            .await
        {
            Ok(model) => model,
            Err(e) => {
                // The reason (paths, storage errors) goes to the log, not into the stored result.
                tracing::error!(error = ?e, model = name, version, "model cannot be loaded");
                let error = format!("model {name} {version} could not be loaded on the worker");
                return vec![Attempt::Transient(error); jobs.len()];
            }
        };
        if model.manifest.slide.is_some() || model.manifest.mil.is_some() {
            let mut attempts = Vec::with_capacity(jobs.len());
            for job in jobs {
                let span = tracing::info_span!("infer", analysis = %job.analysis_id);
                attempts.push(if model.manifest.mil.is_some() {
                    self.run_bag(&model, job).instrument(span).await
                } else {
                    self.run_slide(&model, job).instrument(span).await
                });
            }
            return attempts;
        }
        // Inputs were checked on the way in; checking again costs microseconds and guards against
        // a stored row that predates a contract change.
        let checked: Vec<Result<Checked, String>> = jobs
            .iter()
            .map(|job| {
                let features = job
                    .input
                    .as_object()
                    .ok_or("the stored input is not an object")?;
                model
                    .manifest
                    .validate_features(features)
                    .map(|v| (v.encoded, v.outside_training_range))
                    .map_err(|errors| {
                        errors
                            .iter()
                            .map(|e| format!("{}: {}", e.field, e.message))
                            .collect::<Vec<_>>()
                            .join("; ")
                    })
            })
            .collect();
        let rows: Vec<f64> = checked
            .iter()
            .flatten()
            .flat_map(|(encoded, _)| encoded.iter().copied())
            .collect();
        let batch_size = checked.iter().filter(|c| c.is_ok()).count();
        let started = Instant::now();
        let predictions = if rows.is_empty() {
            Ok(Vec::new())
        } else {
            let model = Arc::clone(&model);
            // Entered around the await, not on the blocking thread: entered there (with
            // tracing-opentelemetry 0.34), it kept the batch span from ever closing, so the batch
            // was never exported and its span data never freed.
            let span = tracing::info_span!("infer", rows = batch_size);
            match tokio::task::spawn_blocking(move || model.onnx.predict(&rows))
                .instrument(span)
                .await
            {
                Ok(result) => result.map_err(|e| format!("{e:#}")),
                Err(e) => Err(format!("the inference task died: {e}")),
            }
        };
        let infer_ms = started.elapsed().as_secs_f64() * 1e3;
        let mut outputs = match predictions {
            Ok(rows) => rows.into_iter().map(Ok).collect::<Vec<_>>().into_iter(),
            Err(e) => {
                // Runtime errors name hosts, source files and graph nodes: they go to the log only.
                tracing::error!(error = %e, model = name, "inference failed");
                vec![Err("inference failed on the worker".to_owned()); batch_size].into_iter()
            }
        };
        jobs.iter()
            .zip(checked)
            .map(|(job, checked)| match checked {
                Err(e) => {
                    Attempt::Permanent(format!("the stored input no longer fits the model: {e}"))
                }
                Ok((encoded, flags)) => match outputs.next() {
                    Some(Ok(row)) => {
                        let timings = Timings {
                            queue_wait_ms: queue_wait_ms(job),
                            infer_ms,
                            batch_size,
                            dispatch: "queue",
                        };
                        match result_document(&model, &row, &encoded, flags, &timings) {
                            Ok((text, timings)) => Attempt::Done {
                                result: Document::Canonical(text),
                                timings,
                                tiles: None,
                            },
                            Err(e) => Attempt::Permanent(e),
                        }
                    }
                    Some(Err(e)) => Attempt::Transient(e),
                    None => {
                        Attempt::Transient("the model returned fewer rows than it was given".into())
                    }
                },
            })
            .collect()
    }

    /// One slide analysis, off the async threads; progress is recorded between tile batches, and
    /// a cancelled job (or a lost lease) stops it there.
    async fn run_slide(&self, model: &Arc<LoadedModel>, job: &ClaimedJob) -> Attempt {
        let slide_id = job
            .input
            .get("slide")
            .and_then(Value::as_str)
            .and_then(|s| Uuid::parse_str(s).ok());
        let mpp = job.input.get("mpp").and_then(Value::as_f64);
        let source = job
            .input
            .get("mpp_source")
            .and_then(Value::as_str)
            .unwrap_or("file")
            .to_owned();
        let (Some(slide_id), Some(mpp), Ok(tenant)) =
            (slide_id, mpp, TenantId::parse(&job.tenant_id))
        else {
            return Attempt::Permanent("the stored input names no slide and resolution".into());
        };
        let slide = match repo::slides::find(&self.pool, &tenant, Key::Id(slide_id)).await {
            Ok(Some(slide)) => slide,
            Ok(None) => return Attempt::Permanent(format!("slide {slide_id} no longer exists")),
            Err(e) => return Attempt::Transient(format!("the slide record cannot be read: {e}")),
        };
        let path = match self.registry.blobs().fetch(&slide.blob_key).await {
            Ok(path) => path,
            Err(e) => {
                return Attempt::Transient(format!("the slide file cannot be fetched: {e:#}"));
            }
        };
        let handle = tokio::runtime::Handle::current();
        let (pool, worker, claimed) = (self.pool.clone(), self.id, job.clone());
        let loaded = Arc::clone(model);
        let batch = self.slide_batch;
        let started = Instant::now();
        let run = tokio::task::spawn_blocking(move || {
            let Some(spec) = loaded.manifest.slide.as_ref() else {
                return Err(Stopped::Refused("not a slide model".into()));
            };
            let plan = Plan {
                spec,
                onnx: &loaded.onnx,
                mpp,
                batch,
            };
            // Recorded after the first batch, then at most every PROGRESS_EVERY and after the
            // last: each write is a commit the tiles wait for, and a small batch takes a few
            // milliseconds. The write also says whether the job is still this worker's, so a
            // cancellation stops the analysis within that time.
            let mut written: Option<Instant> = None;
            let mut progress = |done: usize, total: usize| {
                if written.is_some_and(|at| at.elapsed() < PROGRESS_EVERY) && done < total {
                    return true;
                }
                written = Some(Instant::now());
                let done = i32::try_from(done).unwrap_or(i32::MAX);
                let total = i32::try_from(total).unwrap_or(i32::MAX);
                // A failed progress write is no reason to stop; a lost job is.
                handle
                    .block_on(repo::jobs::progress(&pool, &claimed, worker, done, total))
                    .unwrap_or(true)
            };
            let mut analysed = analyse(&path, &plan, &mut progress)?;
            let bag = match analysed.embeddings.take() {
                Some((dim, values)) => Some(
                    bag_file(&loaded, spec, dim, &values, &analysed.tiles)
                        .map_err(Stopped::Refused)?,
                ),
                None => None,
            };
            let (result, tiles) = slide_result(&loaded, slide_id, mpp, &source, analysed);
            Ok((result, tiles, bag))
        })
        .await;
        let total_ms = started.elapsed().as_secs_f64() * 1e3;
        match run {
            Ok(Ok((mut result, tiles, bag))) => {
                if let Some(bag) = bag {
                    match self.keep_bag(job, &tenant, bag).await {
                        Ok(id) => result.slide.embeddings = Some(id),
                        Err(e) => {
                            return Attempt::Transient(format!(
                                "the tile embeddings cannot be stored: {e}"
                            ));
                        }
                    }
                }
                let analysed = result.slide.tiles_analysed;
                result.stages.total_ms = total_ms;
                result.stages.tiles_per_second = analysed as f64 / (total_ms / 1e3).max(1e-9);
                let timings = json!({
                    "queue_wait_ms": queue_wait_ms(job),
                    "read_ms": result.stages.read_decode_ms,
                    "infer_ms": result.stages.infer_ms,
                    "batch_size": analysed,
                    "dispatch": "queue",
                });
                match serde_json::to_value(&result) {
                    Ok(result) => Attempt::Done {
                        result: Document::Tree(result),
                        timings,
                        tiles: Some(Box::new(tiles)),
                    },
                    Err(e) => Attempt::Permanent(format!("the result cannot be written: {e}")),
                }
            }
            Ok(Err(Stopped::Cancelled)) => {
                Attempt::Transient("stopped between tile batches: cancelled or lease lost".into())
            }
            Ok(Err(Stopped::Refused(reason))) => Attempt::Permanent(reason),
            Ok(Err(Stopped::Inference(e))) => {
                tracing::error!(error = %e, model = %model.manifest.name, "slide inference failed");
                Attempt::Transient("inference failed on the worker".into())
            }
            Err(e) => {
                tracing::error!(error = %e, analysis = %job.analysis_id, "slide analysis panicked");
                Attempt::Transient("the slide analysis stopped unexpectedly on the worker".into())
            }
        }
    }

    /// Stores an encoder's bag of tile embeddings (once per content per tenant); its id.
    async fn keep_bag(
        &self,
        job: &ClaimedJob,
        tenant: &TenantId,
        bag: EncodedBag,
    ) -> anyhow::Result<Uuid> {
        let sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bag.bytes));
        let key = repo::embeddings::Key::Digest(&sha256);
        if let Some(found) = repo::embeddings::find(&self.pool, tenant, key).await? {
            return Ok(found.id);
        }
        let id = Uuid::now_v7();
        let blob_key = format!("embeddings/{id}");
        let size = i64::try_from(bag.bytes.len())?;
        self.registry
            .blobs()
            .put(&blob_key, bytes::Bytes::from(bag.bytes))
            .await?;
        let uploaded_by = format!("analysis {}", job.analysis_id);
        let record = repo::embeddings::NewEmbeddings {
            id,
            tenant,
            uploaded_by: &uploaded_by,
            filename: None,
            sha256: &sha256,
            size_bytes: size,
            tiles: i32::try_from(bag.tiles)?,
            dim: i32::try_from(bag.dim)?,
            has_coords: true,
            metadata: &bag.metadata,
            blob_key: &blob_key,
        };
        let mut tx = self.pool.begin().await?;
        let inserted = repo::embeddings::insert(&mut tx, &record).await?;
        tx.commit().await?;
        if inserted {
            return Ok(id);
        }
        // Another worker stored the same bag meanwhile.
        self.registry.blobs().delete(&blob_key).await?;
        repo::embeddings::find(&self.pool, tenant, key)
            .await?
            .map(|found| found.id)
            .ok_or_else(|| anyhow::anyhow!("embeddings {sha256} vanished"))
    }

    /// One MIL analysis: the bag of tile embeddings through the model's head, off the async
    /// threads.
    async fn run_bag(&self, model: &Arc<LoadedModel>, job: &ClaimedJob) -> Attempt {
        if let Some(encoder) = job.input.get("encoder") {
            return self.run_bag_of_slide(model, job, encoder).await;
        }
        let id = job
            .input
            .get("embeddings")
            .and_then(Value::as_str)
            .and_then(|s| Uuid::parse_str(s).ok());
        self.classify_bag(model, job, id).await
    }

    /// A MIL analysis of a slide: the model's encoder over the slide (a slide analysis that stores
    /// the tiles' embeddings), then the head over that bag. The result is the head's, with the
    /// slide's summary and stages; the tiles carry the attention.
    async fn run_bag_of_slide(
        &self,
        model: &Arc<LoadedModel>,
        job: &ClaimedJob,
        encoder: &Value,
    ) -> Attempt {
        let (Some(name), Some(version)) = (encoder["name"].as_str(), encoder["version"].as_str())
        else {
            return Attempt::Permanent("the stored input names no encoder".into());
        };
        let encoder = match self.registry.version(name, version).await {
            Ok(encoder) => encoder,
            Err(e) => {
                tracing::error!(error = ?e, model = name, version, "encoder cannot be loaded");
                return Attempt::Transient(format!(
                    "encoder {name} {version} could not be loaded on the worker"
                ));
            }
        };
        let encoded = self.run_slide(&encoder, job).await;
        let slide = match encoded {
            Attempt::Done { result, .. } => match result.into_tree() {
                Ok(tree) => tree,
                Err(e) => return Attempt::Permanent(format!("the encoder's result: {e}")),
            },
            other => return other,
        };
        let bag = slide["slide"]["embeddings"]
            .as_str()
            .and_then(|s| Uuid::parse_str(s).ok());
        if bag.is_none() {
            return Attempt::Permanent(format!("encoder {name} {version} gave no embeddings"));
        }
        match self.classify_bag(model, job, bag).await {
            Attempt::Done {
                result,
                timings,
                tiles,
            } => match result.into_tree() {
                Ok(mut result) => {
                    result["slide"] = slide["slide"].clone();
                    result["stages"] = slide["stages"].clone();
                    Attempt::Done {
                        result: Document::Tree(result),
                        timings,
                        tiles,
                    }
                }
                Err(e) => Attempt::Permanent(format!("the bag's result: {e}")),
            },
            other => other,
        }
    }

    /// A stored bag of tile embeddings through the model's head.
    async fn classify_bag(
        &self,
        model: &Arc<LoadedModel>,
        job: &ClaimedJob,
        id: Option<Uuid>,
    ) -> Attempt {
        let (Some(id), Ok(tenant)) = (id, TenantId::parse(&job.tenant_id)) else {
            return Attempt::Permanent("the stored input names no embeddings".into());
        };
        let record = match repo::embeddings::find(&self.pool, &tenant, Key::Id(id)).await {
            Ok(Some(record)) => record,
            Ok(None) => return Attempt::Permanent(format!("embeddings {id} no longer exist")),
            Err(e) => {
                return Attempt::Transient(format!("the embeddings record cannot be read: {e}"));
            }
        };
        let path = match self.registry.blobs().fetch(&record.blob_key).await {
            Ok(path) => path,
            Err(e) => {
                return Attempt::Transient(format!("the embeddings file cannot be fetched: {e:#}"));
            }
        };
        let loaded = Arc::clone(model);
        let wait_ms = queue_wait_ms(job);
        let run =
            tokio::task::spawn_blocking(move || bag_result(&loaded, id, &path, wait_ms)).await;
        run.unwrap_or_else(|e| {
            tracing::error!(error = %e, analysis = %job.analysis_id, "MIL analysis panicked");
            Attempt::Transient("the analysis stopped unexpectedly on the worker".into())
        })
    }

    /// Stores all outcomes of a batch in one transaction; each job is fenced on this worker's lease.
    /// Successes (the common case) are stored set-wise; retries and failures one by one.
    async fn store(
        &self,
        jobs: &[ClaimedJob],
        attempts: Vec<Attempt>,
        provider: Provider,
    ) -> anyhow::Result<usize> {
        let mut tx = self.pool.begin().await?;
        let mut successes = Vec::new();
        let mut tiles = Vec::new();
        let mut done = Vec::new();
        let mut stored = 0;
        let mut counts = Counts::default();
        for (job, attempt) in jobs.iter().zip(attempts) {
            let (outcome, exhausted);
            match attempt {
                Attempt::Done {
                    result,
                    mut timings,
                    tiles: scores,
                } => {
                    // Which worker process ran it: with several, an operator can trace a result
                    // to the machine and the log that produced it.
                    if let Some(fields) = timings.as_object_mut() {
                        fields.insert("worker".into(), json!(self.id));
                    }
                    successes.push(Success {
                        job,
                        result: result.canonical(),
                        timings,
                    });
                    if let Some(scores) = scores {
                        tiles.push((job, scores));
                    }
                    continue;
                }
                Attempt::Permanent(error) => {
                    exhausted = error;
                    outcome = Outcome::Failed { error: &exhausted };
                }
                Attempt::Transient(error) if job.attempts < job.max_attempts => {
                    exhausted = error;
                    let delay_secs = self.retry.delay(job.attempts, unit_random()).as_secs_f64();
                    outcome = Outcome::Retry {
                        error: &exhausted,
                        delay_secs,
                    };
                }
                Attempt::Transient(error) => {
                    exhausted = format!("{error} (gave up after {} attempts)", job.attempts);
                    outcome = Outcome::Failed { error: &exhausted };
                }
            }
            let terminal = !matches!(outcome, Outcome::Retry { .. });
            if repo::jobs::finish(&mut tx, job, self.id, outcome).await? {
                stored += 1;
                if terminal {
                    done.push(job.analysis_id);
                    counts.failed += 1;
                } else {
                    counts.retried += 1;
                }
            } else {
                counts.discarded += 1;
                tracing::warn!(analysis = %job.analysis_id, "job cancelled or lease lost before its outcome was stored; discarded");
            }
        }
        if !successes.is_empty() {
            let completed =
                repo::jobs::complete_batch(&mut tx, self.id, &successes, provider).await?;
            if completed.len() < successes.len() {
                tracing::warn!(
                    discarded = successes.len() - completed.len(),
                    "jobs cancelled or leases lost before their results were stored"
                );
            }
            stored += completed.len();
            counts.succeeded = completed.len() as u64;
            counts.discarded += (successes.len() - completed.len()) as u64;
            for (job, scores) in &tiles {
                if completed.contains(&job.analysis_id) {
                    repo::jobs::store_tiles(&mut tx, job.analysis_id, &job.tenant_id, scores)
                        .await?;
                }
            }
            done.extend(completed);
        }
        repo::jobs::notify_done(&mut tx, &done).await?;
        // Unlinked: the sealer links them into their tenants' chains after this commits.
        let finished: std::collections::HashSet<Uuid> = done.iter().copied().collect();
        let records: Vec<repo::provenance::Stored> = successes
            .iter()
            .filter(|s| finished.contains(&s.job.analysis_id))
            .map(|s| repo::provenance::Stored {
                job: s.job,
                result_sha256: crate::domain::provenance::text_digest(&s.result),
                execution_provider: provider,
            })
            .collect();
        repo::provenance::append(&mut tx, &records).await?;
        tx.commit().await?;
        self.metrics.outcome("succeeded", counts.succeeded);
        self.metrics.outcome("failed", counts.failed);
        self.metrics.outcome("retried", counts.retried);
        self.metrics.outcome("discarded", counts.discarded);
        Ok(stored)
    }

    /// Steps until `shutdown`, sleeping between empty steps until NOTIFY or `poll` elapses. The
    /// current batch always finishes (or its lease lapses) before this returns.
    pub async fn run(self, shutdown: CancellationToken, poll: Duration) {
        let mut listener = listen(&self.pool).await;
        tracing::info!(worker = %self.id, "worker started");
        // A full claim means a backlog (a CSV batch, a pipeline's burst): that batch is run and
        // stored in the background while the next is claimed and run, so that one batch's commit
        // overlaps the next one's work instead of leaving the cores idle (BENCHMARKS.md,
        // 2026-12-01). A claim that is not full runs here, as one step: a few waiting cases are
        // not split into smaller batches.
        let mut background: VecDeque<tokio::task::JoinHandle<anyhow::Result<usize>>> =
            VecDeque::new();
        let mut back_off = false;
        while !shutdown.is_cancelled() {
            // Batches that ended in the background are looked at now, not when next joined: a
            // failure is logged at once, and the loop backs off as after a failed step instead of
            // claiming batch after batch into a failing store.
            while let Some(i) = background
                .iter()
                .position(tokio::task::JoinHandle::is_finished)
            {
                if let Some(ended) = background.remove(i) {
                    back_off |= !joined(ended.await);
                }
            }
            if std::mem::take(&mut back_off) {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(poll) => {}
                }
            }
            let finished = match self.claim().await {
                // A batch size of one makes every claim full: that is no backlog (and a slide
                // must run alone), so only a full batch of several runs in the background.
                Ok(jobs) if self.batch_size > 1 && jobs.len() as i64 >= self.batch_size => {
                    let worker = self.clone();
                    background.push_back(tokio::spawn(async move { worker.process(jobs).await }));
                    if background.len() >= PIPELINED_BATCHES
                        && let Some(oldest) = background.pop_front()
                    {
                        back_off |= !joined(oldest.await);
                    }
                    continue;
                }
                Ok(jobs) => self.process(jobs).await,
                Err(e) => Err(e),
            };
            let finished = finished.unwrap_or_else(|e| {
                tracing::error!(error = ?e, "worker step failed");
                0
            });
            if finished > 0 {
                continue;
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(poll) => {
                    if listener.is_none() {
                        listener = listen(&self.pool).await;
                    }
                }
                notified = async {
                    match listener.as_mut() {
                        Some(l) => l.recv().await.map(|_| ()),
                        None => std::future::pending().await,
                    }
                } => if let Err(e) = notified {
                    tracing::warn!(error = %e, "job listener lost; polling until it is back");
                    listener = None;
                }
            }
        }
        for batch in background {
            let _ = joined(batch.await);
        }
        tracing::info!(worker = %self.id, "worker stopped");
    }
}

/// Batches of one worker loop run at once under a backlog: one being stored while the next runs.
const PIPELINED_BATCHES: usize = 2;

/// Logs how a batch run in the background ended; whether it ended well.
fn joined(outcome: Result<anyhow::Result<usize>, tokio::task::JoinError>) -> bool {
    match outcome {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => {
            tracing::error!(error = ?e, "worker step failed");
            false
        }
        Err(e) => {
            tracing::error!(error = %e, "a worker's batch task ended abnormally");
            false
        }
    }
}

/// The span of one batch: in the trace of the request that queued its first job, and linked to
/// the traces of the others (a batch serves many requests; a span has one parent).
fn batch_span(model: &str, version: &str, jobs: &[ClaimedJob]) -> tracing::Span {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let span = tracing::info_span!(
        "batch",
        model,
        version,
        size = jobs.len(),
        trace_id = tracing::field::Empty
    );
    let mut contexts = jobs.iter().filter_map(|j| j.traceparent.as_deref());
    let parent = contexts
        .next()
        .map(telemetry::tracing::stored_context)
        .unwrap_or_default();
    telemetry::tracing::join(&span, parent);
    for traceparent in contexts {
        use opentelemetry::trace::TraceContextExt;
        let linked = telemetry::tracing::stored_context(traceparent);
        span.add_link(linked.span().span_context().clone());
    }
    span
}

/// Outcomes of one stored batch, for the metrics.
#[derive(Debug, Default)]
struct Counts {
    succeeded: u64,
    failed: u64,
    retried: u64,
    discarded: u64,
}

async fn listen(pool: &PgPool) -> Option<PgListener> {
    let mut listener = PgListener::connect_with(pool).await.ok()?;
    listener.listen(repo::JOBS_CHANNEL).await.ok()?;
    Some(listener)
}

/// From submission until the first claim.
fn queue_wait_ms(job: &ClaimedJob) -> f64 {
    job.started_at.map_or(0.0, |s| {
        (s - job.created_at).num_microseconds().unwrap_or(0) as f64 / 1e3
    })
}

/// Evidence tiles listed in a slide result.
const EVIDENCE_TILES: usize = 8;

/// The result document of a slide analysis, and its tile scores.
fn slide_result(
    model: &LoadedModel,
    slide: Uuid,
    mpp: f64,
    source: &str,
    a: Analysed,
) -> (SlideResult, TileScores) {
    let spec = model.manifest.slide.as_ref();
    let measurements = a
        .measures
        .iter()
        .map(|(name, value)| {
            let m = spec.and_then(|s| s.measures.iter().find(|m| &m.name == name));
            Measurement {
                name: name.clone(),
                value: *value,
                unit: m.map(|m| m.unit.clone()).unwrap_or_default(),
                description: m.map(|m| m.description.clone()).unwrap_or_default(),
                aggregation: m
                    .and_then(|m| serde_json::to_value(&m.aggregation).ok())
                    .unwrap_or_default(),
            }
        })
        .collect();
    let evidence = spec
        .and_then(|s| {
            let column = a.tiles.measures.iter().position(|m| *m == s.heatmap)?;
            let width = a.tiles.measures.len();
            let mut ranked: Vec<(usize, f32)> = a
                .tiles
                .scores
                .chunks(width)
                .map(|row| row[column])
                .enumerate()
                .filter(|(_, v)| v.is_finite())
                .collect();
            ranked.sort_by(|x, y| y.1.total_cmp(&x.1));
            Some(
                ranked
                    .into_iter()
                    .take(EVIDENCE_TILES)
                    .enumerate()
                    .map(|(rank, (i, value))| Evidence {
                        rank: rank + 1,
                        x: a.tiles.xs[i],
                        y: a.tiles.ys[i],
                        size: a.tiles.tile_size_level0,
                        measure: s.heatmap.clone(),
                        value: f64::from(value),
                    })
                    .collect(),
            )
        })
        .unwrap_or_default();
    let result = SlideResult {
        schema: SLIDE_SCHEMA.into(),
        evidence,
        slide: SlideSummary {
            id: slide,
            tissue_fraction: a.tissue_fraction,
            tiles_analysed: a.tiles.xs.len(),
            tiles_in_grid: a.tiles_in_grid,
            mpp_used: mpp,
            mpp_source: source.into(),
            model_mpp: spec.map_or(0.0, |s| s.mpp),
            level_used: a.level,
            level_downsample: a.level_downsample,
            tile_size: spec.map_or(0, |s| s.tile_size),
            tile_size_level0: a.tiles.tile_size_level0,
            reader: a.reader.clone(),
            stain_normalisation: a.stain.clone(),
            embeddings: None,
        },
        measurements,
        stages: SlideStages {
            open_ms: a.stage_ms.open,
            mask_ms: a.stage_ms.mask,
            read_decode_ms: a.stage_ms.read_decode,
            infer_ms: a.stage_ms.infer,
            aggregate_ms: a.stage_ms.aggregate,
            total_ms: 0.0,
            tiles_per_second: 0.0,
        },
        intended_use: model.manifest.intended_use.clone(),
    };
    (result, a.tiles)
}

/// Where an analysis's time went, as stored with its result.
struct Timings {
    queue_wait_ms: f64,
    infer_ms: f64,
    batch_size: usize,
    /// `queue` (claimed by a worker) or `inline` (run while its submitter waited).
    dispatch: &'static str,
}

/// An encoder's tile embeddings, written as a safetensors bag.
struct EncodedBag {
    bytes: Vec<u8>,
    tiles: usize,
    dim: usize,
    metadata: Value,
}

fn bag_file(
    model: &LoadedModel,
    spec: &crate::domain::contract::SlideSpec,
    dim: usize,
    values: &[f32],
    tiles: &TileScores,
) -> Result<EncodedBag, String> {
    let m = &model.manifest;
    let metadata = std::collections::BTreeMap::from([
        ("encoder".to_owned(), format!("{} {}", m.name, m.version)),
        ("encoder_sha256".to_owned(), m.onnx.sha256.clone()),
        ("mpp".to_owned(), spec.mpp.to_string()),
        ("tile_size".to_owned(), spec.tile_size.to_string()),
        (
            "tile_size_level0".to_owned(),
            tiles.tile_size_level0.to_string(),
        ),
    ]);
    let bytes = crate::slides::embeddings::to_safetensors(
        dim,
        values,
        &tiles.xs,
        &tiles.ys,
        metadata.clone(),
    )?;
    Ok(EncodedBag {
        bytes,
        tiles: tiles.xs.len(),
        dim,
        metadata: serde_json::to_value(metadata).map_err(|e| e.to_string())?,
    })
}

/// Reads a bag of tile embeddings, runs the MIL head and builds the classification result with
/// the bag and its most attended tiles. Blocking.
fn bag_result(model: &LoadedModel, id: Uuid, path: &std::path::Path, wait_ms: f64) -> Attempt {
    let Some(spec) = model.manifest.mil.as_ref() else {
        return Attempt::Permanent("not a MIL model".into());
    };
    let bag = match std::fs::read(path) {
        Ok(bytes) => match crate::slides::embeddings::parse(&bytes) {
            Ok(bag) => bag,
            Err(why) => return Attempt::Permanent(why),
        },
        Err(e) => return Attempt::Transient(format!("the embeddings file cannot be read: {e}")),
    };
    if bag.dim != spec.embedding_dim {
        return Attempt::Permanent(format!(
            "the embeddings are {} wide; the model takes {}",
            bag.dim, spec.embedding_dim
        ));
    }
    let started = Instant::now();
    let (probabilities, attention) = match model.onnx.predict_bag(
        &bag.values,
        bag.tiles,
        spec.attention.as_deref(),
    ) {
        Ok(out) => out,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), model = %model.manifest.name, "MIL inference failed");
            return Attempt::Transient("inference failed on the worker".into());
        }
    };
    let infer_ms = started.elapsed().as_secs_f64() * 1e3;
    let outputs = ModelOutputs {
        probabilities: Some(probabilities),
        ..ModelOutputs::default()
    };
    let mut result = match crate::domain::result::build(&model.manifest, &outputs, &[], Vec::new())
    {
        Ok(AnalysisResult::Classification(result)) => result,
        Ok(_) => return Attempt::Permanent("a MIL model gives a classification".into()),
        Err(why) => return Attempt::Permanent(why),
    };
    let weights = attention;
    let mut ranked: Vec<(usize, f64)> = weights
        .iter()
        .flatten()
        .copied()
        .enumerate()
        .filter(|(_, w)| w.is_finite())
        .collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    result.bag = Some(Box::new(BagSummary {
        embeddings: id,
        tiles: bag.tiles,
        dim: bag.dim,
        encoder: spec.encoder.clone(),
        attention: ranked
            .into_iter()
            .take(EVIDENCE_TILES)
            .enumerate()
            .map(|(rank, (index, weight))| {
                let at = bag.coords.as_ref().map(|c| c[index]);
                AttendedTile {
                    rank: rank + 1,
                    index,
                    x: at.map(|p| p[0]),
                    y: at.map(|p| p[1]),
                    weight,
                }
            })
            .collect(),
    }));
    // A bag onkos encoded knows its tiles' size: the attention becomes a per-tile score that the
    // heatmap and tiles.geojson show.
    let side = bag
        .metadata
        .get("tile_size_level0")
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v > 0.0);
    let tiles = match (side, &bag.coords, &weights) {
        (Some(side), Some(coords), Some(weights)) => Some(Box::new(TileScores {
            tile_size_level0: side,
            xs: coords.iter().map(|c| c[0].round() as i32).collect(),
            ys: coords.iter().map(|c| c[1].round() as i32).collect(),
            tissue: vec![1.0; bag.tiles],
            measures: vec![ATTENTION.into()],
            scores: weights.iter().map(|&w| w as f32).collect(),
        })),
        _ => None,
    };
    match serde_json::to_value(&result) {
        Ok(result) => Attempt::Done {
            result: Document::Tree(result),
            timings: json!({ "queue_wait_ms": wait_ms, "infer_ms": infer_ms,
                             "batch_size": bag.tiles, "dispatch": "queue" }),
            tiles,
        },
        Err(e) => Attempt::Permanent(format!("the result cannot be written: {e}")),
    }
}

/// The stored result (its canonical text) and timings of one analysis.
fn result_document(
    model: &LoadedModel,
    outputs: &ModelOutputs,
    encoded: &[f64],
    flags: Vec<RangeFlag>,
    t: &Timings,
) -> Result<(Box<serde_json::value::RawValue>, Value), String> {
    let result = crate::domain::result::build(&model.manifest, outputs, encoded, flags)?;
    Ok((
        crate::domain::result::canonical_text(&result)?,
        timings_document(t),
    ))
}

fn timings_document(t: &Timings) -> Value {
    json!({ "queue_wait_ms": t.queue_wait_ms, "infer_ms": t.infer_ms,
            "batch_size": t.batch_size, "dispatch": t.dispatch })
}

/// Runs one checked input now, outside the queue, for a submitter who waits for it: the result
/// document and timings, or why it could not be produced (the analysis is then queued instead,
/// and a worker retries it). With `wait`, it waits for the model's session when another call
/// holds it (blocking: call it off the async threads); without, it answers `None` at once then.
pub fn run_inline(
    model: &LoadedModel,
    encoded: &[f64],
    flags: &[RangeFlag],
    wait: bool,
) -> Option<Result<(Box<serde_json::value::RawValue>, Value), String>> {
    let started = Instant::now();
    let outputs = if wait {
        model.onnx.predict(encoded)
    } else {
        model.onnx.try_predict(encoded)?
    };
    Some(outputs.map_err(|e| format!("{e:#}")).and_then(|outputs| {
        inline_result(
            model,
            encoded,
            flags,
            &outputs,
            started.elapsed().as_secs_f64() * 1e3,
        )
    }))
}

fn inline_result(
    model: &LoadedModel,
    encoded: &[f64],
    flags: &[RangeFlag],
    outputs: &[crate::domain::result::ModelOutputs],
    infer_ms: f64,
) -> Result<(Box<serde_json::value::RawValue>, Value), String> {
    let row = outputs
        .first()
        .ok_or("the model returned no row for the input")?;
    let timings = Timings {
        queue_wait_ms: 0.0,
        infer_ms,
        batch_size: 1,
        dispatch: "inline",
    };
    result_document(model, row, encoded, flags.to_vec(), &timings)
}
