//! The application: state built once from a `Config`, the HTTP server and the in-process worker.

use crate::auth::verify::Verifier;
use crate::config::Config;
use crate::db::Database;
use crate::inference::SessionOptions;
use crate::jobs::completions::Completions;
use crate::jobs::intake::Intake;
use crate::jobs::reads::Reads;
use crate::jobs::webhooks::Deliverer;
use crate::jobs::worker::Worker;
use crate::registry::Registry;
use crate::storage::BlobStore;
use crate::telemetry::metrics::Metrics;
use anyhow::Context;
use sqlx::PgPool;
use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Everything a request handler may need, built once.
#[derive(Debug)]
pub struct App {
    pub config: Config,
    pub pool: PgPool,
    pub registry: Arc<Registry>,
    pub verifier: Verifier,
    /// Fans out "analysis final" notifications to long polls.
    pub completions: Completions,
    /// Group commit for submissions.
    pub intake: Intake,
    /// Audited reads of single analyses, grouped into one statement each (`jobs/reads.rs`).
    pub reads: Reads,
    /// Model files and slides.
    pub blobs: BlobStore,
    pub metrics: Arc<Metrics>,
    /// Cancelled when the process begins to shut down: long-lived responses (event streams) end.
    pub stopping: CancellationToken,
    /// Open event streams (each re-reads its analysis twice a second): a bounded number.
    pub event_streams: Arc<tokio::sync::Semaphore>,
    /// Per-client request rates; `None` when no limit is configured.
    pub limiter: Option<crate::http::limit::Limiter>,
}

/// Event streams one process serves at once; more are answered 503.
pub const MAX_EVENT_STREAMS: usize = 256;

impl App {
    pub fn retry_max_attempts(&self) -> i32 {
        self.config.retry_policy().max_attempts
    }
}

#[derive(Debug, Clone)]
pub struct AppState(pub Arc<App>);

impl Deref for AppState {
    type Target = App;
    fn deref(&self) -> &App {
        &self.0
    }
}

/// A bound, ready-to-run server (port 0 in tests), its worker and, in the default mode, the
/// embedded database it owns.
#[derive(Debug)]
pub struct Application {
    listener: TcpListener,
    state: AppState,
    worker: Worker,
    deliverer: Deliverer,
    database: Option<Database>,
}

impl Application {
    /// Opens the database (external or embedded), then builds everything else on it.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let database = Database::open(&config).await?;
        let mut app = Self::with_pool(config, database.pool.clone()).await?;
        app.database = Some(database);
        Ok(app)
    }

    /// Builds on an existing, migrated pool (tests give each test its own database).
    pub async fn with_pool(config: Config, pool: PgPool) -> anyhow::Result<Self> {
        let options = SessionOptions::from_config(&config)?;
        let blobs = config.blob_store()?;
        blobs.check().await?;
        if let Some(program) = &config.slide_reader {
            crate::slides::openslide::set_reader_program(program.clone());
        }
        let registry = Arc::new(
            Registry::open(pool.clone(), blobs.clone(), options, &config.models_dir).await?,
        );
        tracing::info!(provider = registry.provider(), "execution provider");
        let verifier = Verifier::from_config(&config)?;
        let listener = TcpListener::bind(config.listen_addr())
            .await
            .with_context(|| format!("ONKOS_LISTEN: cannot listen on {}", config.listen))?;
        let metrics = Arc::new(Metrics::default());
        let worker = Worker::new(
            pool.clone(),
            Arc::clone(&registry),
            &config,
            Arc::clone(&metrics),
        );
        let deliverer = Deliverer::new(pool.clone(), &config)?;
        let completions = Completions::default();
        let intake = Intake::start(pool.clone());
        let reads = Reads::start(pool.clone());
        let limiter = crate::http::limit::Limiter::from_config(&config);
        let state = AppState(Arc::new(App {
            config,
            pool,
            registry,
            verifier,
            completions,
            intake,
            reads,
            blobs,
            metrics,
            stopping: CancellationToken::new(),
            event_streams: Arc::new(tokio::sync::Semaphore::new(MAX_EVENT_STREAMS)),
            limiter,
        }));
        Ok(Self {
            listener,
            state,
            worker,
            deliverer,
            database: None,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| self.state.config.listen_addr())
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// The worker, for tests that step it explicitly.
    pub fn worker(&self) -> Worker {
        self.worker.clone()
    }

    /// The webhook deliverer, for tests that step it explicitly.
    pub fn deliverer(&self) -> Deliverer {
        self.deliverer.clone()
    }

    /// Runs only the worker until `shutdown`: `onkos worker`, one of many sharing a database. Its
    /// HTTP port serves only `/metrics`, `/healthz` and `/readyz`, for the scraper and the
    /// orchestrator of a GPU node.
    pub async fn run_worker(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let poll = Duration::from_millis(self.state.config.worker_poll_ms);
        tracing::info!(addr = %self.local_addr(), "worker probes and metrics listening");
        let probes = axum::serve(self.listener, crate::http::probes(self.state.clone()))
            .with_graceful_shutdown(shutdown.clone().cancelled_owned());
        let probes = tokio::spawn(async move { probes.await });
        let deliverer = self
            .state
            .config
            .webhooks
            .then(|| tokio::spawn(self.deliverer.clone().run(shutdown.clone())));
        // The sealer stops after the worker's last batch is stored, and seals it.
        let sealing = CancellationToken::new();
        let sealer = sealer(&self.state, &sealing);
        self.worker.clone().run(shutdown, poll).await;
        sealing.cancel();
        if let Some(deliverer) = deliverer {
            deliverer.await?;
        }
        if let Some(sealer) = sealer {
            sealer.await?;
        }
        probes.await??;
        if let Some(database) = self.database {
            database.close().await?;
        }
        Ok(())
    }

    /// Serves (and, when configured, works) until `shutdown`; in-flight requests finish, the worker
    /// completes its current batch, then the embedded database stops.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let router = crate::http::router(self.state.clone());
        // Event streams end when shutdown begins; graceful shutdown waits for open responses.
        let stopping = self.state.stopping.clone();
        let signal = shutdown.clone();
        tokio::spawn(async move {
            signal.cancelled().await;
            stopping.cancel();
        });
        tracing::info!(addr = %self.local_addr(), "listening");
        let completions = tokio::spawn(
            self.state
                .completions
                .clone()
                .run(self.state.pool.clone(), shutdown.clone()),
        );
        let worker = self.state.config.worker.then(|| {
            let poll = Duration::from_millis(self.state.config.worker_poll_ms);
            tokio::spawn(self.worker.clone().run(shutdown.clone(), poll))
        });
        let deliverer = self
            .state
            .config
            .webhooks
            .then(|| tokio::spawn(self.deliverer.clone().run(shutdown.clone())));
        let sealing = CancellationToken::new();
        let sealer = sealer(&self.state, &sealing);
        let forgetting = self.state.limiter.is_some().then(|| {
            let (state, stop) = (self.state.clone(), shutdown.clone());
            tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_secs(60));
                while stop.run_until_cancelled(every.tick()).await.is_some() {
                    if let Some(limiter) = &state.limiter {
                        limiter.forget_idle();
                    }
                }
            })
        });
        // Answers go out at once, not held back by Nagle's algorithm for an ACK.
        let listener = axum::serve::ListenerExt::tap_io(self.listener, |stream| {
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY on a connection");
            }
        });
        let server = axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown.clone().cancelled_owned());
        let served = server.await;
        shutdown.cancel();
        if let Some(worker) = worker {
            worker.await?;
        }
        // Requests have been answered and the worker's last batch stored: the sealer stops now,
        // sealing them.
        sealing.cancel();
        if let Some(deliverer) = deliverer {
            deliverer.await?;
        }
        if let Some(sealer) = sealer {
            sealer.await?;
        }
        completions.await?;
        if let Some(forgetting) = forgetting {
            forgetting.await?;
        }
        if let Some(database) = self.database {
            database.close().await?;
        }
        Ok(served?)
    }
}

/// The provenance sealer of a process, unless the configuration leaves sealing to others.
fn sealer(state: &AppState, shutdown: &CancellationToken) -> Option<tokio::task::JoinHandle<()>> {
    let every = state.config.provenance_seal_ms;
    (every > 0).then(|| {
        tokio::spawn(crate::jobs::sealer::run(
            state.pool.clone(),
            Duration::from_millis(every),
            shutdown.clone(),
        ))
    })
}
