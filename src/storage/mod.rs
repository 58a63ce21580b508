//! The blob store for bytes too big for rows (model files now, slides later): `object_store` over a
//! local folder by default, so the same code can later point at S3-compatible storage.

use anyhow::Context;
use bytes::Bytes;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct BlobStore {
    store: Arc<dyn ObjectStore>,
}

impl BlobStore {
    /// A store in a local folder (created when missing).
    pub fn local(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the blob folder {}", dir.display()))?;
        let store = LocalFileSystem::new_with_prefix(dir)
            .with_context(|| format!("blob folder {}", dir.display()))?;
        Ok(Self {
            store: Arc::new(store),
        })
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
