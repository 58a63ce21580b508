//! Registering a model version: everything is checked before anything is stored. The manifest must
//! parse and agree with itself, the ONNX file must load, name the manifest's input and outputs, and
//! answer a probe row with outputs of the shapes the manifest promises.

use super::{LoadedModel, Registry};
use crate::domain::contract::{InputKind, Manifest, Task};
use crate::domain::ids::TenantId;
use crate::inference::OnnxModel;
use crate::repo;
use crate::repo::models::ModelRow;
use sha2::{Digest, Sha256};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// The upload is not a usable model (422).
    #[error("{0}")]
    Invalid(String),
    /// The name or version is taken (409).
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<sqlx::Error> for RegisterError {
    fn from(e: sqlx::Error) -> Self {
        Self::Internal(e.into())
    }
}

/// The registry row for a checked manifest and its ONNX digest.
pub(super) fn row_for(
    manifest: &Manifest,
    manifest_bytes: &[u8],
    onnx_sha256: &str,
    card: String,
    tenant: Option<&TenantId>,
    source: &str,
    registered_by: Option<&str>,
) -> ModelRow {
    ModelRow {
        name: manifest.name.clone(),
        version: manifest.version.clone(),
        tenant_id: tenant.map(|t| t.as_str().to_owned()),
        modality: manifest.modality.clone(),
        task: match manifest.task {
            Task::Classification => "classification".into(),
            Task::Survival => "survival".into(),
            Task::Quantification => "quantification".into(),
            Task::Embedding => "embedding".into(),
        },
        title: manifest.title.clone(),
        manifest: serde_json::to_value(manifest).unwrap_or_default(),
        manifest_sha256: hex::encode(Sha256::digest(manifest_bytes)),
        onnx_sha256: onnx_sha256.to_owned(),
        blob_key: format!("models/{onnx_sha256}.onnx"),
        card,
        state: "staged".into(),
        source: source.into(),
        registered_by: registered_by.map(str::to_owned),
        created_at: chrono::Utc::now(),
    }
}

/// Runs one plausible row (training means, reference levels) and checks the output shapes.
pub(super) fn smoke_test(manifest: &Manifest, onnx: &OnnxModel) -> anyhow::Result<()> {
    if let Some(spec) = &manifest.slide {
        let names = onnx.output_names();
        let wanted = manifest.slide_outputs();
        if let Some((missing, _)) = wanted.iter().find(|(w, _)| !names.contains(w)) {
            anyhow::bail!("the graph has no output {missing:?} (it has {names:?})");
        }
        // One blank (white) tile: every output must give one finite value for it.
        let size = spec.tile_size as usize;
        let white = vec![255.0_f32; 3 * size * size];
        let (values, embedding) = onnx
            .predict_tiles(&white, 1, size, &wanted, spec.embedding.as_deref())
            .map_err(|e| {
                anyhow::anyhow!("the model does not run on a {size} x {size} probe tile: {e:#}")
            })?;
        anyhow::ensure!(
            values.iter().flatten().all(|v| v.is_finite())
                && embedding.iter().flat_map(|e| &e.1).all(|v| v.is_finite()),
            "the model gives non-finite values for a blank tile"
        );
        return Ok(());
    }
    if let (Some(spec), Some(classes)) = (&manifest.mil, &manifest.classification) {
        // A bag of three zero embeddings: probabilities per label in [0, 1], one weight per tile.
        let bag = vec![0.0_f32; 3 * spec.embedding_dim];
        let (p, attention) = onnx
            .predict_bag(&bag, 3, spec.attention.as_deref())
            .map_err(|e| {
                anyhow::anyhow!(
                    "the model does not run on a probe bag of 3 x {} embeddings: {e:#}",
                    spec.embedding_dim
                )
            })?;
        anyhow::ensure!(
            p.len() == classes.labels.len(),
            "the model returns {} probabilities, the manifest lists {} labels",
            p.len(),
            classes.labels.len()
        );
        anyhow::ensure!(
            p.iter()
                .chain(attention.iter().flatten())
                .all(|v| v.is_finite())
                && p.iter().all(|v| (0.0..=1.0).contains(v)),
            "the model's probabilities or attention weights are not finite probabilities: {p:?}"
        );
        return Ok(());
    }
    let row: Vec<f64> = match &manifest.explanation {
        Some(e) => e.means.clone(),
        None => manifest
            .encoding
            .iter()
            .map(|c| match manifest.input(&c.input).map(|i| &i.kind) {
                Some(InputKind::Numeric {
                    training_range: [lo, hi],
                    ..
                }) if c.level.is_none() => (lo + hi) / 2.0,
                _ => 0.0,
            })
            .collect(),
    };
    let outputs = onnx.predict(&row).map_err(|e| {
        anyhow::anyhow!(
            "the model does not run on a probe row of {} values: {e:#}",
            row.len()
        )
    })?;
    let out = outputs
        .first()
        .ok_or_else(|| anyhow::anyhow!("the model returned no rows"))?;
    if let Some(spec) = &manifest.classification {
        let p = out.probabilities.as_deref().unwrap_or_default();
        anyhow::ensure!(
            p.len() == spec.labels.len(),
            "the model returns {} probabilities, the manifest lists {} labels",
            p.len(),
            spec.labels.len()
        );
        anyhow::ensure!(
            p.iter().all(|v| v.is_finite() && (0.0..=1.0).contains(v)),
            "the model's probabilities are not in [0, 1]: {p:?}"
        );
    }
    if let Some(spec) = &manifest.survival {
        anyhow::ensure!(
            out.risk_score.is_some_and(f64::is_finite),
            "the model's risk score is not a finite number"
        );
        let s = out.survival.as_deref().unwrap_or_default();
        anyhow::ensure!(
            s.len() == spec.horizons_days.len(),
            "the model returns {} survival values, the manifest lists {} horizons",
            s.len(),
            spec.horizons_days.len()
        );
        anyhow::ensure!(
            s.iter().all(|v| (0.0..=1.0).contains(v)),
            "the model's survival values are not in [0, 1]: {s:?}"
        );
    }
    Ok(())
}

/// 2-64 characters of a-z, 0-9 and '-': what a model may be named.
pub(crate) fn is_model_name(name: &str) -> bool {
    (2..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn check_name(name: &str) -> Result<(), RegisterError> {
    if is_model_name(name) {
        Ok(())
    } else {
        Err(RegisterError::Invalid(format!(
            "name {name:?} must be 2-64 characters of a-z, 0-9 and '-'"
        )))
    }
}

impl Registry {
    /// Registers a new, staged version for `tenant` after every check passed; nothing is stored
    /// otherwise. Activate it to make new analyses use it.
    pub async fn register(
        &self,
        tenant: &TenantId,
        by: &str,
        manifest_bytes: &[u8],
        onnx: bytes::Bytes,
        card: String,
    ) -> Result<ModelRow, RegisterError> {
        let manifest: Manifest = serde_json::from_slice(manifest_bytes)
            .map_err(|e| RegisterError::Invalid(format!("manifest: {e}")))?;
        check_name(&manifest.name)?;
        if manifest.version.is_empty() || manifest.version.len() > 64 {
            return Err(RegisterError::Invalid(
                "version must be 1-64 characters".into(),
            ));
        }
        manifest
            .check()
            .map_err(|e| RegisterError::Invalid(format!("manifest: {e}")))?;
        let digest = hex::encode(Sha256::digest(&onnx));
        if digest != manifest.onnx.sha256 {
            return Err(RegisterError::Invalid(format!(
                "the uploaded ONNX file has sha256 {digest}, the manifest says {}",
                manifest.onnx.sha256
            )));
        }
        if repo::models::find(&self.pool, &manifest.name, &manifest.version)
            .await?
            .is_some()
        {
            return Err(RegisterError::Conflict(format!(
                "{} {} exists; versions are immutable, register a new one",
                manifest.name, manifest.version
            )));
        }
        let row = row_for(
            &manifest,
            manifest_bytes,
            &digest,
            card,
            Some(tenant),
            "registered",
            Some(by),
        );
        let model: LoadedModel = self
            .build(manifest, row.manifest_sha256.clone(), onnx.clone())
            .await
            .map_err(|e| RegisterError::Invalid(format!("{e:#}")))?;
        self.blobs.put(&row.blob_key, onnx).await?;
        let mut tx = self.pool.begin().await?;
        if !repo::models::claim_name(&mut tx, &row.name, Some(tenant.as_str())).await? {
            return Err(RegisterError::Conflict(format!(
                "the name {} belongs to another model",
                row.name
            )));
        }
        if !repo::models::insert(&mut *tx, &row).await? {
            return Err(RegisterError::Conflict(format!(
                "{} {} was registered concurrently",
                row.name, row.version
            )));
        }
        tx.commit().await?;
        self.remember(&row.name, &row.version, Arc::new(model));
        tracing::info!(model = %row.name, version = %row.version, tenant = %tenant, "model registered");
        Ok(row)
    }
}
