//! The blob store for bytes too big for rows (model files, slides, tile embeddings): `object_store`
//! over a local folder by default, or over any S3-compatible store (AWS S3, MinIO, Ceph RGW…) so
//! that API replicas and workers on several machines share one set of blobs.
//!
//! Slide readers need random access to a file, so a process on S3 keeps a local cache of the blobs
//! it reads (`fetch`), trimmed to a size limit least recently used first. Uploads are staged in a
//! local file (hashed and inspected there), then sent to the store in parts and kept in the cache.

use anyhow::Context;
use bytes::Bytes;
use futures_util::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::buffered::BufWriter;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;
use tokio::io::AsyncWriteExt;

/// Where an S3-compatible store is and how to reach it.
#[derive(Clone)]
pub struct S3Settings {
    pub bucket: String,
    /// `None`: AWS's endpoint for the region.
    pub endpoint: Option<String>,
    pub region: String,
    /// `None`: the `AWS_*` environment variables, then the instance's credentials.
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// `endpoint/bucket/key` requests, as MinIO and most on-premise stores need.
    pub path_style: bool,
    pub allow_http: bool,
}

impl std::fmt::Debug for S3Settings {
    // The secret never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Settings")
            .field("bucket", &self.bucket)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("path_style", &self.path_style)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
pub struct BlobStore {
    store: Arc<dyn ObjectStore>,
    /// The store's own folder (local), or the cache of the remote store's blobs (S3). Uploads are
    /// staged in its `staging` folder, on the same file system, so storing them is a rename.
    dir: PathBuf,
    /// Blobs live elsewhere; `dir` only caches them.
    remote: bool,
    /// The cache is trimmed to this many bytes (S3 only).
    cache_limit: u64,
}

impl BlobStore {
    /// A store in a local folder (created when missing).
    pub fn local(dir: &Path) -> anyhow::Result<Self> {
        make_folders(dir)?;
        let store = LocalFileSystem::new_with_prefix(dir)
            .with_context(|| format!("blob folder {}", dir.display()))?;
        Ok(Self {
            store: Arc::new(store),
            dir: dir.to_path_buf(),
            remote: false,
            cache_limit: u64::MAX,
        })
    }

    /// A store in an S3-compatible bucket, with a local cache in `cache_dir` of at most
    /// `cache_limit` bytes. Nothing is sent until the first request; `check` proves it is reachable.
    pub fn s3(settings: &S3Settings, cache_dir: &Path, cache_limit: u64) -> anyhow::Result<Self> {
        make_folders(cache_dir)?;
        // The S3 client's TLS takes the process's default provider; the first caller installs it.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&settings.bucket)
            .with_region(&settings.region)
            .with_virtual_hosted_style_request(!settings.path_style)
            .with_allow_http(settings.allow_http);
        if let Some(endpoint) = &settings.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let (Some(id), Some(secret)) = (&settings.access_key_id, &settings.secret_access_key) {
            builder = builder
                .with_access_key_id(id)
                .with_secret_access_key(secret);
        }
        let store = builder
            .build()
            .with_context(|| format!("S3 bucket {:?}", settings.bucket))?;
        Ok(Self {
            store: Arc::new(store),
            dir: cache_dir.to_path_buf(),
            remote: true,
            cache_limit,
        })
    }

    /// Proves the store answers (start-up fails with the reason rather than the first upload).
    pub async fn check(&self) -> anyhow::Result<()> {
        match self
            .store
            .head(&ObjectPath::from("onkos-reachability-check"))
            .await
        {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(anyhow::anyhow!("the blob store is not reachable: {e}")),
        }
    }

    /// A new, unique file path for streaming an upload to before it is stored.
    pub fn staging_path(&self) -> PathBuf {
        self.dir
            .join("staging")
            .join(uuid::Uuid::now_v7().to_string())
    }

    /// Stores a staged file under `key`: a rename within a local store's folder; with S3 a
    /// streamed multipart upload, after which the file is kept in the cache.
    pub async fn put_file(&self, key: &str, staged: &Path) -> anyhow::Result<()> {
        if self.remote {
            self.upload(key, staged).await?;
        }
        let target = self.local_path(key);
        if let Some(parent) = target.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        tokio::fs::rename(staged, &target)
            .await
            .with_context(|| format!("cannot store blob {key}"))?;
        if self.remote {
            self.trim(&target).await;
        }
        Ok(())
    }

    async fn upload(&self, key: &str, staged: &Path) -> anyhow::Result<()> {
        let mut file = tokio::fs::File::open(staged)
            .await
            .with_context(|| format!("cannot read the staged file for blob {key}"))?;
        let mut writer = BufWriter::new(Arc::clone(&self.store), ObjectPath::from(key));
        if let Err(e) = tokio::io::copy(&mut file, &mut writer).await {
            // A multipart upload left open costs storage until the bucket's lifecycle rule runs.
            if let Err(abort) = writer.abort().await {
                tracing::warn!(%key, error = %abort, "an aborted upload was not cleaned up");
            }
            return Err(anyhow::anyhow!("cannot store blob {key}: {e}"));
        }
        // Completes the upload (or sends a small file whole); a failure here cannot be aborted
        // any more, the writer is spent.
        writer
            .shutdown()
            .await
            .with_context(|| format!("cannot store blob {key}"))
    }

    /// Where a blob's file is (local store) or is cached (S3) on this machine; it may not be there
    /// yet with S3 — `fetch` makes sure it is.
    pub fn local_path(&self, key: &str) -> PathBuf {
        self.dir.join(key)
    }

    /// The blob as a local file, for readers that need random access: a local store's own file,
    /// or the cached copy, downloaded first when this machine has none.
    pub async fn fetch(&self, key: &str) -> anyhow::Result<PathBuf> {
        let target = self.local_path(key);
        if !self.remote {
            return Ok(target);
        }
        if tokio::fs::metadata(&target).await.is_ok() {
            touch(&target).await;
            return Ok(target);
        }
        let staged = self.staging_path();
        let downloaded = async {
            let mut stream = self.store.get(&ObjectPath::from(key)).await?.into_stream();
            let mut file = tokio::fs::File::create(&staged).await?;
            while let Some(chunk) = stream.next().await {
                file.write_all(&chunk?).await?;
            }
            file.sync_all().await?;
            if let Some(parent) = target.parent() {
                tokio::fs::create_dir_all(parent).await?;
            }
            // Another task may have fetched it meanwhile: the rename replaces an identical copy.
            tokio::fs::rename(&staged, &target).await?;
            Ok::<_, anyhow::Error>(())
        }
        .await;
        if let Err(e) = downloaded {
            let _ = tokio::fs::remove_file(&staged).await;
            return Err(e.context(format!("cannot fetch blob {key}")));
        }
        self.trim(&target).await;
        Ok(target)
    }

    pub async fn delete(&self, key: &str) -> anyhow::Result<()> {
        match self.store.delete(&ObjectPath::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e).with_context(|| format!("cannot delete blob {key}")),
        }
        if self.remote {
            let _ = tokio::fs::remove_file(self.local_path(key)).await;
        }
        Ok(())
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

    /// Removes the least recently used cached blobs (and an archive's extracted folder with its
    /// archive) until the cache fits its limit; `keep` is never removed. A reader that has the
    /// file open keeps reading it; one that had only its path fails that attempt, which retries.
    async fn trim(&self, keep: &Path) {
        let (dir, limit, keep) = (self.dir.clone(), self.cache_limit, keep.to_path_buf());
        let trimmed = tokio::task::spawn_blocking(move || trim_cache(&dir, limit, &keep)).await;
        match trimmed {
            Ok(Ok(0)) => {}
            Ok(Ok(removed)) => tracing::debug!(removed, "blob cache trimmed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "the blob cache could not be trimmed"),
            Err(e) => tracing::warn!(error = %e, "the blob cache trim stopped"),
        }
    }
}

fn make_folders(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the blob folder {}", dir.display()))?;
    let staging = dir.join("staging");
    std::fs::create_dir_all(&staging)
        .with_context(|| format!("cannot create the staging folder {}", staging.display()))
}

/// Marks a cached blob as used now (the cache's recency is the file's modification time).
async fn touch(path: &Path) {
    if let Ok(file) = tokio::fs::File::options().append(true).open(path).await {
        let _ = file.into_std().await.set_modified(SystemTime::now());
    }
}

/// One cached blob: its file, an archive's extracted folder beside it, their size and last use.
struct Cached {
    file: PathBuf,
    bytes: u64,
    used: SystemTime,
}

fn trim_cache(dir: &Path, limit: u64, keep: &Path) -> std::io::Result<usize> {
    let mut cached = Vec::new();
    for kind in std::fs::read_dir(dir)? {
        let kind = kind?;
        if !kind.file_type()?.is_dir() || kind.file_name() == "staging" {
            continue;
        }
        for entry in std::fs::read_dir(kind.path())? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if !meta.is_file() {
                continue; // an archive's folder is counted with its archive
            }
            let file = entry.path();
            let bytes = meta.len() + folder_size(&crate::slides::archive::folder_of(&file));
            cached.push(Cached {
                file,
                bytes,
                used: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            });
        }
    }
    let mut total: u64 = cached.iter().map(|c| c.bytes).sum();
    cached.sort_by_key(|c| c.used);
    let mut removed = 0;
    for blob in cached {
        if total <= limit {
            break;
        }
        if blob.file == keep {
            continue;
        }
        std::fs::remove_file(&blob.file)?;
        let _ = std::fs::remove_dir_all(crate::slides::archive::folder_of(&blob.file));
        total -= blob.bytes;
        removed += 1;
    }
    Ok(removed)
}

fn folder_size(folder: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(folder) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => folder_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn write(path: &Path, bytes: usize, age_secs: u64) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, vec![0u8; bytes]).unwrap();
        let when = SystemTime::now() - std::time::Duration::from_secs(age_secs);
        std::fs::File::options()
            .append(true)
            .open(path)
            .unwrap()
            .set_modified(when)
            .unwrap();
    }

    #[test]
    fn the_cache_drops_the_least_recently_used_first_and_keeps_the_new_blob() {
        let dir = tempfile::tempdir().unwrap();
        let (old, mid, new) = (
            dir.path().join("slides/old"),
            dir.path().join("slides/mid"),
            dir.path().join("embeddings/new"),
        );
        write(&old, 400, 300);
        // An archive's extracted files count with it and go with it.
        write(
            &crate::slides::archive::folder_of(&old).join("inner/a.dat"),
            100,
            300,
        );
        write(&mid, 400, 200);
        write(&new, 400, 0);
        write(&dir.path().join("staging/partial"), 5000, 1000);

        assert_eq!(trim_cache(dir.path(), 900, &new).unwrap(), 1);
        assert!(!old.exists() && !crate::slides::archive::folder_of(&old).exists());
        assert!(mid.exists() && new.exists());
        assert!(
            dir.path().join("staging/partial").exists(),
            "staging is never trimmed"
        );

        // The blob just fetched survives even when it alone is over the limit.
        assert_eq!(trim_cache(dir.path(), 100, &new).unwrap(), 1);
        assert!(!mid.exists() && new.exists());
    }
}
