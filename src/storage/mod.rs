//! The blob store for bytes too big for rows (model files now, slides later): `object_store` over a
//! local folder by default, so the same code can later point at S3-compatible storage.

use anyhow::Context;
use bytes::Bytes;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct BlobStore {
    store: Arc<dyn ObjectStore>,
    /// The folder of a local store: large uploads are staged there and moved into place.
    dir: PathBuf,
}

impl BlobStore {
    /// A store in a local folder (created when missing).
    pub fn local(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the blob folder {}", dir.display()))?;
        let store = LocalFileSystem::new_with_prefix(dir)
            .with_context(|| format!("blob folder {}", dir.display()))?;
        let staging = dir.join("staging");
        std::fs::create_dir_all(&staging)
            .with_context(|| format!("cannot create the staging folder {}", staging.display()))?;
        Ok(Self {
            store: Arc::new(store),
            dir: dir.to_path_buf(),
        })
    }

    /// A new, unique file path for streaming an upload to before it is stored.
    pub fn staging_path(&self) -> PathBuf {
        self.dir
            .join("staging")
            .join(uuid::Uuid::now_v7().to_string())
    }

    /// Stores a staged file under `key` without copying it (a rename within the store's folder).
    pub async fn put_file(&self, key: &str, staged: &Path) -> anyhow::Result<()> {
        let target = self.path_of(key);
        if let Some(parent) = target.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        tokio::fs::rename(staged, &target)
            .await
            .with_context(|| format!("cannot store blob {key}"))
    }

    /// Where a stored blob can be read as a file (slide readers need random access).
    pub fn path_of(&self, key: &str) -> PathBuf {
        self.dir.join(key)
    }

    pub async fn delete(&self, key: &str) -> anyhow::Result<()> {
        match self.store.delete(&ObjectPath::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("cannot delete blob {key}")),
        }
    }

    pub async fn put(&self, key: &str, bytes: Bytes) -> anyhow::Result<()> {
        self.store
            .put(&ObjectPath::from(key), bytes.into())
            .await
            .with_context(|| format!("cannot store blob {key}"))?;
        Ok(())
    }

    pub async fn exists(&self, key: &str) -> anyhow::Result<bool> {
        match self.store.head(&ObjectPath::from(key)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e).with_context(|| format!("cannot look up blob {key}")),
        }
    }

    pub async fn get(&self, key: &str) -> anyhow::Result<Bytes> {
        let object = self
            .store
            .get(&ObjectPath::from(key))
            .await
            .with_context(|| format!("blob {key} is missing"))?;
        Ok(object.bytes().await?)
    }
}
