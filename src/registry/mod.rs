//! The bundled models: each folder under the models directory holds `manifest.json` and the ONNX
//! file it names. The file's sha256 must match the manifest, or the model is not served.

use crate::domain::contract::Manifest;
use crate::inference::{OnnxModel, SessionOptions};
use anyhow::Context;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// A model ready to serve: its contract and its session.
#[derive(Debug)]
pub struct LoadedModel {
    pub manifest: Manifest,
    pub onnx: OnnxModel,
}

#[derive(Debug, Default)]
pub struct Registry {
    models: BTreeMap<String, Arc<LoadedModel>>,
}

impl Registry {
    /// Loads every model folder under `dir`. A model that fails its checks stops start-up: serving
    /// a model whose bytes differ from its card would make every result untraceable.
    pub fn load_dir(dir: &Path, options: &SessionOptions) -> anyhow::Result<Self> {
        let mut models = BTreeMap::new();
        let entries = std::fs::read_dir(dir)
            .with_context(|| format!("ONKOS_MODELS_DIR: cannot read {}", dir.display()))?;
        let mut folders: Vec<_> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.join("manifest.json").is_file())
            .collect();
        folders.sort();
        for folder in folders {
            let model = load_model(&folder, options)
                .with_context(|| format!("model in {}", folder.display()))?;
            tracing::info!(
                model = %model.manifest.name,
                version = %model.manifest.version,
                sha256 = %model.manifest.onnx.sha256,
                provider = model.onnx.provider,
                "model loaded"
            );
            models.insert(model.manifest.name.clone(), Arc::new(model));
        }
        anyhow::ensure!(
            !models.is_empty(),
            "ONKOS_MODELS_DIR: no model (folder with manifest.json) in {}",
            dir.display()
        );
        Ok(Self { models })
    }

    pub fn get(&self, name: &str) -> Option<Arc<LoadedModel>> {
        self.models.get(name).cloned()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.models.keys().map(String::as_str)
    }

    /// The execution provider of the loaded sessions (all share one choice per process).
    pub fn provider(&self) -> &'static str {
        self.models
            .values()
            .next()
            .map_or(crate::inference::CPU, |m| m.onnx.provider)
    }
}

fn load_model(folder: &Path, options: &SessionOptions) -> anyhow::Result<LoadedModel> {
    let manifest: Manifest = serde_json::from_slice(&std::fs::read(folder.join("manifest.json"))?)
        .context("manifest.json does not parse")?;
    manifest
        .check()
        .map_err(|e| anyhow::anyhow!("manifest: {e}"))?;
    let bytes = std::fs::read(folder.join(&manifest.onnx.file))
        .with_context(|| format!("cannot read {}", manifest.onnx.file))?;
    let digest = hex::encode(Sha256::digest(&bytes));
    anyhow::ensure!(
        digest == manifest.onnx.sha256,
        "{} has sha256 {digest}, but the manifest says {}",
        manifest.onnx.file,
        manifest.onnx.sha256
    );
    let onnx = OnnxModel::load(&bytes, &manifest.onnx, manifest.encoding.len(), options)?;
    Ok(LoadedModel { manifest, onnx })
}
