//! Import of the bundled models at start-up. Idempotent: a version already registered is left as
//! it is, but its bytes must be the same — a bundled file that changed without a new version would
//! make old results untraceable, so that stops start-up.

use super::Registry;
use crate::domain::contract::Manifest;
use crate::repo;
use anyhow::Context;
use sha2::{Digest, Sha256};
use std::path::Path;

pub(super) async fn bundled(registry: &Registry, dir: &Path) -> anyhow::Result<()> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("ONKOS_MODELS_DIR: cannot read {}", dir.display()))?;
    let mut folders: Vec<_> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("manifest.json").is_file())
        .collect();
    folders.sort();
    anyhow::ensure!(
        !folders.is_empty(),
        "ONKOS_MODELS_DIR: no model (folder with manifest.json) in {}",
        dir.display()
    );
    for folder in folders {
        import_one(registry, &folder)
            .await
            .with_context(|| format!("bundled model in {}", folder.display()))?;
    }
    Ok(())
}

async fn import_one(registry: &Registry, folder: &Path) -> anyhow::Result<()> {
    let manifest_bytes = std::fs::read(folder.join("manifest.json"))?;
    let manifest: Manifest =
        serde_json::from_slice(&manifest_bytes).context("manifest.json does not parse")?;
    let onnx = std::fs::read(folder.join(&manifest.onnx.file))
        .with_context(|| format!("cannot read {}", manifest.onnx.file))?;
    let digest = hex::encode(Sha256::digest(&onnx));
    anyhow::ensure!(
        digest == manifest.onnx.sha256,
        "{} has sha256 {digest}, but the manifest says {}",
        manifest.onnx.file,
        manifest.onnx.sha256
    );
    if let Some(existing) =
        repo::models::find(&registry.pool, &manifest.name, &manifest.version).await?
    {
        anyhow::ensure!(
            existing.onnx_sha256 == digest,
            "{} {} is registered with sha256 {}, but the bundled file has {digest}: give a changed model a new version",
            manifest.name,
            manifest.version,
            existing.onnx_sha256
        );
        // A new blob store (another node, a wiped folder) gets the bytes back from the bundle.
        if !registry.blobs.exists(&existing.blob_key).await? {
            registry.blobs.put(&existing.blob_key, onnx.into()).await?;
        }
        registry.version(&manifest.name, &manifest.version).await?;
        return Ok(());
    }
    let card = std::fs::read_to_string(folder.join("card.md")).unwrap_or_default();
    let row = super::register::row_for(
        &manifest,
        &manifest_bytes,
        &digest,
        card,
        None,
        "bundled",
        None,
    );
    let model = registry
        .build(manifest, row.manifest_sha256.clone(), onnx.clone().into())
        .await?;
    registry.blobs.put(&row.blob_key, onnx.into()).await?;
    let mut tx = registry.pool.begin().await?;
    // A concurrent start-up may have imported it first; either way it is there and active once.
    anyhow::ensure!(
        repo::models::claim_name(&mut tx, &row.name, None).await?,
        "the bundled model name {} is already used by a tenant's own model",
        row.name
    );
    if repo::models::insert(&mut *tx, &row).await? {
        repo::models::activate(&mut tx, &row.name, &row.version).await?;
    } else {
        // Another node imported this version first: its files must be ours, or analyses would
        // record one sha256 (model or manifest) while this node runs another.
        let theirs = repo::models::find(&mut *tx, &row.name, &row.version).await?;
        anyhow::ensure!(
            theirs
                .is_some_and(|t| t.onnx_sha256 == row.onnx_sha256
                    && t.manifest_sha256 == row.manifest_sha256),
            "{} {} was imported concurrently with a different model or manifest: give a changed model a new version",
            row.name,
            row.version
        );
    }
    tx.commit().await?;
    registry.remember(&row.name, &row.version, std::sync::Arc::new(model));
    Ok(())
}
