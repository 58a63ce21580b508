//! The model registry: versions live in Postgres (manifest, card, sha256, state) with the ONNX bytes
//! in the blob store. Bundled models are imported at start-up, idempotently. Sessions are loaded on
//! first use and cached per (name, version): a version is immutable, so a cached session is never
//! stale.

mod import;
pub mod register;

use crate::domain::contract::Manifest;
use crate::domain::ids::TenantId;
use crate::inference::{OnnxModel, Provider, SessionOptions};
use crate::repo;
use crate::repo::models::ModelRow;
use crate::storage::BlobStore;
use anyhow::Context;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

/// A model version ready to serve: its contract and its session.
#[derive(Debug)]
pub struct LoadedModel {
    pub manifest: Manifest,
    /// sha256 of the manifest as registered (what provenance records name).
    pub manifest_sha256: String,
    pub onnx: OnnxModel,
}

#[derive(Debug)]
pub struct Registry {
    pool: PgPool,
    blobs: BlobStore,
    options: SessionOptions,
    loaded: RwLock<HashMap<(String, String), Arc<LoadedModel>>>,
    /// (tenant, name) → active version, looked up at most every `ACTIVE_TTL`: a submission should
    /// not cost a registry query. Changes made through this process clear it at once; other
    /// processes see them within the TTL.
    active: RwLock<HashMap<(String, String), ActiveEntry>>,
    provider: OnceLock<Provider>,
}

/// When the active version was looked up, and what it was (`None`: no active version).
type ActiveEntry = (Instant, Option<String>);

const ACTIVE_TTL: Duration = Duration::from_secs(2);
/// Unknown names are cached too; a flood of them must not grow the map without bound.
const ACTIVE_CACHE_LIMIT: usize = 10_000;

impl Registry {
    /// Opens the registry and imports the bundled models from `bundled` (each folder with
    /// `manifest.json`, the ONNX file and `card.md`), loading each once so a broken one stops start-up.
    pub async fn open(
        pool: PgPool,
        blobs: BlobStore,
        options: SessionOptions,
        bundled: &std::path::Path,
    ) -> anyhow::Result<Self> {
        let registry = Self {
            pool,
            blobs,
            options,
            loaded: RwLock::default(),
            active: RwLock::default(),
            provider: OnceLock::new(),
        };
        import::bundled(&registry, bundled).await?;
        Ok(registry)
    }

    /// The version of `name` that new analyses of `tenant` use, if there is one.
    pub async fn active(
        &self,
        tenant: &TenantId,
        name: &str,
    ) -> anyhow::Result<Option<Arc<LoadedModel>>> {
        // A name no model can have is not looked up (nor cached: random names would crowd out
        // the real ones).
        if !register::is_model_name(name) {
            return Ok(None);
        }
        let key = (tenant.as_str().to_owned(), name.to_owned());
        let fresh = self.active.read().ok().and_then(|a| {
            a.get(&key)
                .filter(|(at, _)| at.elapsed() < ACTIVE_TTL)
                .map(|(_, v)| v.clone())
        });
        if let Some(version) = fresh {
            return match version {
                Some(version) => Ok(Some(self.version(name, &version).await?)),
                None => Ok(None),
            };
        }
        let row = repo::models::find_active(&self.pool, tenant, name).await?;
        if let Ok(mut active) = self.active.write() {
            if active.len() >= ACTIVE_CACHE_LIMIT {
                active.clear();
            }
            active.insert(
                key,
                (Instant::now(), row.as_ref().map(|r| r.version.clone())),
            );
        }
        match row {
            Some(row) => Ok(Some(self.load_row(row).await?)),
            None => Ok(None),
        }
    }

    /// Forgets which versions are active, after this process registered, activated or retired one.
    pub fn forget_active(&self) {
        if let Ok(mut active) = self.active.write() {
            active.clear();
        }
    }

    /// Exactly `version` of `name` — what a job recorded when it was submitted.
    pub async fn version(&self, name: &str, version: &str) -> anyhow::Result<Arc<LoadedModel>> {
        if let Some(model) = self.cached(name, version) {
            return Ok(model);
        }
        let row = repo::models::find(&self.pool, name, version)
            .await?
            .with_context(|| format!("model {name} {version} is not registered"))?;
        self.load_row(row).await
    }

    /// Names the tenant can use now (for error messages).
    pub async fn active_names(&self, tenant: &TenantId) -> anyhow::Result<Vec<String>> {
        let rows = repo::models::list_visible(&self.pool, tenant).await?;
        Ok(rows
            .into_iter()
            .filter(|r| r.state == "active")
            .map(|r| r.name)
            .collect())
    }

    /// The execution provider the sessions run on (CPU until a model is loaded).
    pub fn provider(&self) -> Provider {
        self.provider
            .get()
            .copied()
            .unwrap_or(crate::inference::CPU)
    }

    /// Where model files and slides are kept.
    pub fn blobs(&self) -> &BlobStore {
        &self.blobs
    }

    pub fn loaded_count(&self) -> usize {
        self.loaded.read().map(|l| l.len()).unwrap_or(0)
    }

    /// Caches a session built elsewhere (import, registration) so it is not built twice.
    fn remember(&self, name: &str, version: &str, model: Arc<LoadedModel>) -> Arc<LoadedModel> {
        match self.loaded.write() {
            Ok(mut loaded) => Arc::clone(
                loaded
                    .entry((name.to_owned(), version.to_owned()))
                    .or_insert(model),
            ),
            Err(_) => model,
        }
    }

    fn cached(&self, name: &str, version: &str) -> Option<Arc<LoadedModel>> {
        self.loaded
            .read()
            .ok()?
            .get(&(name.to_owned(), version.to_owned()))
            .cloned()
    }

    async fn load_row(&self, row: ModelRow) -> anyhow::Result<Arc<LoadedModel>> {
        if let Some(model) = self.cached(&row.name, &row.version) {
            return Ok(model);
        }
        let bytes = self.blobs.get(&row.blob_key).await?;
        let digest = hex::encode(Sha256::digest(&bytes));
        anyhow::ensure!(
            digest == row.onnx_sha256,
            "the stored ONNX bytes of {} {} have sha256 {digest}, not {}",
            row.name,
            row.version,
            row.onnx_sha256
        );
        let manifest: Manifest = serde_json::from_value(row.manifest).context("stored manifest")?;
        let model = Arc::new(self.build(manifest, row.manifest_sha256, bytes).await?);
        Ok(self.remember(&row.name, &row.version, model))
    }

    /// Checks a manifest against its ONNX bytes and builds the session (on the blocking pool).
    async fn build(
        &self,
        manifest: Manifest,
        manifest_sha256: String,
        bytes: bytes::Bytes,
    ) -> anyhow::Result<LoadedModel> {
        manifest
            .check()
            .map_err(|e| anyhow::anyhow!("manifest: {e}"))?;
        let options = self.options.for_model(manifest.slide.is_some());
        let model = tokio::task::spawn_blocking(move || -> anyhow::Result<LoadedModel> {
            let onnx = OnnxModel::load(&bytes, &manifest.onnx, manifest.input_width(), &options)?;
            register::smoke_test(&manifest, &onnx)?;
            Ok(LoadedModel {
                manifest,
                manifest_sha256,
                onnx,
            })
        })
        .await??;
        let _ = self.provider.set(model.onnx.provider);
        tracing::info!(model = %model.manifest.name, version = %model.manifest.version, provider = model.onnx.provider, "model loaded");
        Ok(model)
    }
}
