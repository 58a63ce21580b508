//! Typed configuration: embedded defaults, then an optional TOML file, then `ONKOS_*` variables
//! (plus `DATABASE_URL` and `ORT_DYLIB_PATH`). `validate` names the setting that is wrong.

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Every setting, with the name it has in the TOML file; the variable is `ONKOS_` + upper case.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub listen: String,
    /// The URL clients reach this API at (behind a proxy), for identifiers and links in FHIR
    /// output; unset: `http://` and the request's Host.
    pub public_url: Option<String>,
    pub data_dir: PathBuf,
    /// External Postgres. Unset: a private cluster under `data_dir/postgres`.
    pub database_url: Option<String>,
    pub db_max_connections: u32,
    /// The system user the embedded cluster runs as when onkos runs as root.
    pub embedded_pg_user: String,
    /// Folder with `initdb` and `pg_ctl`; unset: PATH, then /usr/lib/postgresql/*/bin.
    pub embedded_pg_bin: Option<PathBuf>,
    pub auth_issuer: String,
    pub auth_audience: String,
    /// `EdDSA`, `ES256` or `RS256`; tokens signed any other way are refused.
    pub auth_algorithm: String,
    /// PEM public key. With neither this nor a JWKS URL, onkos trusts a development key pair it
    /// generates in `data_dir/keys` (and `onkos token` signs with it).
    pub auth_public_key: Option<PathBuf>,
    pub auth_jwks_url: Option<String>,
    /// A token naming an unknown key id refetches the JWKS at most this often.
    pub auth_jwks_min_refresh_secs: u64,
    /// JWKS keys older than this are refetched, so withdrawn keys stop verifying.
    pub auth_jwks_max_age_secs: u64,
    pub request_timeout_secs: u64,
    pub body_limit_bytes: usize,
    /// Largest model upload (`POST /v1/models`, multipart).
    pub model_upload_limit_bytes: usize,
    /// Largest slide file `POST /v1/slides` accepts (streamed to disk, never held in memory).
    pub slide_upload_limit_bytes: u64,
    /// Largest tile-embeddings file `POST /v1/embeddings` accepts (it is read whole when analysed).
    pub embeddings_upload_limit_bytes: u64,
    /// How long one slide upload may take (the general request timeout is too short for gigabytes).
    pub slide_upload_timeout_secs: u64,
    pub models_dir: PathBuf,
    /// `local`: blobs (models, slides, embeddings) in `data_dir/blobs`; `s3`: in an
    /// S3-compatible bucket (the `s3_*` settings), shared by every API and worker process.
    pub storage: String,
    pub s3_bucket: Option<String>,
    /// e.g. `http://minio:9000`; unset: AWS's endpoint for the region.
    pub s3_endpoint: Option<String>,
    pub s3_region: String,
    /// Unset (with the secret): the `AWS_*` environment variables, then instance credentials.
    pub s3_access_key_id: Option<String>,
    pub s3_secret_access_key: Option<String>,
    /// Path-style requests (`endpoint/bucket/key`), as MinIO and most on-premise stores need.
    pub s3_path_style: bool,
    /// Allow a plain `http://` endpoint (a store on the same host or a trusted network).
    pub s3_allow_http: bool,
    /// With `s3`: where this process keeps local copies of the blobs it reads (slide readers
    /// need random access) and stages uploads; unset: `data_dir/blob-cache`.
    pub blob_cache_dir: Option<PathBuf>,
    /// The local copies are trimmed to this many bytes, least recently used first.
    pub blob_cache_limit_bytes: u64,
    /// Requests per second one client may make on average (a client is the bearer token it
    /// presents, or its address when it presents none); 0: no limit. Over it: 429 with
    /// `Retry-After`. Health and metrics endpoints are never limited.
    pub rate_limit_per_second: u32,
    /// Requests a client may make at once above the average before it is limited.
    pub rate_limit_burst: u32,
    /// The ONNX Runtime shared library (`libonnxruntime.so.1.31.x`).
    pub ort_dylib_path: Option<PathBuf>,
    /// `auto` tries CUDA and falls back to CPU with a warning; `cuda` requires it (start-up stops
    /// with ONNX Runtime's reason when it does not register); `cpu` never tries CUDA.
    pub execution_provider: String,
    /// The GPU sessions run on.
    pub cuda_device_id: i32,
    /// Cap on the CUDA memory arena of each session, in bytes; unset: no cap.
    pub cuda_memory_limit_bytes: Option<usize>,
    /// Let CUDA run float32 matrix products and convolutions on TF32 tensor cores (10-bit
    /// mantissa). Off by default: results then agree with the CPU to float32 rounding.
    pub cuda_tf32: bool,
    /// Ask CUDA for NHWC (channels-last) convolution kernels, which tensor cores run faster for
    /// float16 convolutional models.
    pub cuda_prefer_nhwc: bool,
    /// Folder whose CUDA libraries (cudart, cublas, cublasLt, cufft) are loaded before ONNX Runtime
    /// looks for them (e.g. the nvidia-*-cu13 wheels' `lib` folders, or a CUDA install).
    pub cuda_library_dir: Option<PathBuf>,
    /// Folder whose cuDNN 9 libraries are loaded before ONNX Runtime looks for them.
    pub cudnn_library_dir: Option<PathBuf>,
    pub inference_threads: usize,
    /// Intra-op threads of slide models' sessions (a worker runs one slide at a time, with its tile
    /// decoding beside it); 0: ONNX Runtime's default, one per physical core.
    pub slide_inference_threads: usize,
    /// Run the in-process worker in `serve`.
    pub worker: bool,
    /// Most jobs of one model a worker claims, runs as one ONNX batch and stores in one
    /// transaction. 256 is the knee measured for CSV batches on the development VM (BENCHMARKS.md).
    pub worker_batch_size: u32,
    pub worker_lease_secs: u32,
    pub worker_poll_ms: u64,
    /// How long a worker that found fewer jobs than the batch size waits for more before running.
    pub worker_batch_wait_ms: u64,
    /// Tiles per ONNX Runtime call in a slide analysis. 8 is the CPU knee measured on the 2-core
    /// development VM (a batch's intermediate tensors stay in cache; BENCHMARKS.md); a GPU wants more.
    pub slide_batch_tiles: u32,
    /// The program run as `<program> slide-reader <file>` to read slides through OpenSlide in
    /// a separate process; unset: this onkos executable.
    pub slide_reader: Option<PathBuf>,
    /// In `serve` (a worker in the same process), run a single JSON case whose submitter waits
    /// (`?wait=`) right away and store it finished, instead of queueing it.
    pub worker_inline: bool,
    /// Attempts per analysis before it fails for good.
    pub worker_max_attempts: u32,
    /// First retry delay; doubles per attempt (with jitter), capped at 5 minutes.
    pub worker_retry_base_ms: u64,
    /// How often this process's provenance sealer links newly stored results' records into
    /// their tenants' chains, in milliseconds (`serve` and `worker`); 0: this process does not
    /// seal (another must).
    pub provenance_seal_ms: u64,
    /// Deliver webhook events from this process (`serve` and `worker`).
    pub webhooks: bool,
    /// How long a webhook receiver may take to answer one delivery.
    pub webhook_timeout_secs: u64,
    /// Attempts per webhook delivery before it is recorded as failed.
    pub webhook_max_attempts: u32,
    /// First webhook retry delay; doubles per attempt (with jitter), capped at an hour.
    pub webhook_retry_base_ms: u64,
    /// Let webhooks reach loopback, private, link-local and other non-public addresses (a LIS on
    /// the hospital network). Off: a tenant cannot make onkos probe the network it runs in.
    pub webhook_allow_private_networks: bool,
    /// Longest `?wait=` a reader may ask for (it is also capped below the request timeout).
    pub max_wait_secs: u64,
    pub log: String,
    /// `text` or `json` (one JSON object per line, with the request id and trace id of its span).
    pub log_format: String,
    /// OTLP/HTTP traces endpoint, e.g. `http://collector:4318/v1/traces`; unset: traces are not
    /// exported (their ids still correlate log lines and stored jobs).
    pub otlp_endpoint: Option<String>,
}

impl std::fmt::Debug for Config {
    // The database URL can carry a password; never print it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("data_dir", &self.data_dir)
            .field("database_url", &self.database_url.as_ref().map(|_| "<set>"))
            .field("auth_issuer", &self.auth_issuer)
            .field("auth_algorithm", &self.auth_algorithm)
            .finish_non_exhaustive()
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            public_url: None,
            data_dir: "./var".into(),
            database_url: None,
            db_max_connections: 16,
            embedded_pg_user: "postgres".into(),
            embedded_pg_bin: None,
            auth_issuer: "onkos-dev".into(),
            auth_audience: "onkos".into(),
            auth_algorithm: "EdDSA".into(),
            auth_public_key: None,
            auth_jwks_url: None,
            auth_jwks_min_refresh_secs: 10,
            auth_jwks_max_age_secs: 900,
            request_timeout_secs: 60,
            body_limit_bytes: 1024 * 1024,
            model_upload_limit_bytes: 512 * 1024 * 1024,
            slide_upload_limit_bytes: 20 * 1024 * 1024 * 1024,
            slide_upload_timeout_secs: 3600,
            embeddings_upload_limit_bytes: 1024 * 1024 * 1024,
            models_dir: "./models".into(),
            storage: "local".into(),
            s3_bucket: None,
            s3_endpoint: None,
            s3_region: "us-east-1".into(),
            s3_access_key_id: None,
            s3_secret_access_key: None,
            s3_path_style: false,
            s3_allow_http: false,
            blob_cache_dir: None,
            blob_cache_limit_bytes: 100 * 1024 * 1024 * 1024,
            rate_limit_per_second: 500,
            rate_limit_burst: 1000,
            ort_dylib_path: None,
            execution_provider: "auto".into(),
            cuda_device_id: 0,
            cuda_memory_limit_bytes: None,
            cuda_tf32: false,
            cuda_prefer_nhwc: false,
            cuda_library_dir: None,
            cudnn_library_dir: None,
            inference_threads: 1,
            slide_inference_threads: 0,
            worker: true,
            worker_batch_size: 256,
            worker_lease_secs: 60,
            worker_poll_ms: 500,
            worker_batch_wait_ms: 0,
            worker_inline: true,
            slide_batch_tiles: 8,
            slide_reader: None,
            worker_max_attempts: 5,
            worker_retry_base_ms: 1000,
            max_wait_secs: 50,
            provenance_seal_ms: 50,
            webhooks: true,
            webhook_timeout_secs: 10,
            webhook_max_attempts: 15,
            webhook_retry_base_ms: 1000,
            webhook_allow_private_networks: false,
            log: "info".into(),
            log_format: "text".into(),
            otlp_endpoint: None,
        }
    }
}

impl Config {
    /// Defaults ← TOML file (`file`, or `ONKOS_CONFIG`) ← environment.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        let env_file = std::env::var_os("ONKOS_CONFIG").map(PathBuf::from);
        if let Some(path) = file.map(Path::to_path_buf).or(env_file) {
            anyhow::ensure!(
                path.is_file(),
                "config file {} (ONKOS_CONFIG) does not exist",
                path.display()
            );
            figment = figment.merge(Toml::file_exact(path));
        }
        let config: Config = figment
            .merge(Env::prefixed("ONKOS_").ignore(&["config"]))
            .merge(Env::raw().only(&["database_url", "ort_dylib_path"]))
            .extract()
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        config.validate()?;
        Ok(config)
    }

    /// Refuses a configuration that cannot work, naming the variable to fix.
    pub fn validate(&self) -> anyhow::Result<()> {
        // Names both spellings: the variable and the TOML key.
        let bad = |var: &str, why: String| {
            let key = var.strip_prefix("ONKOS_").unwrap_or(var).to_lowercase();
            Err(anyhow::anyhow!(
                "invalid configuration: {var} ({key} in the config file): {why}"
            ))
        };
        if let Err(e) = self.listen.parse::<SocketAddr>() {
            return bad(
                "ONKOS_LISTEN",
                format!("{:?} is not host:port ({e})", self.listen),
            );
        }
        if !["EdDSA", "ES256", "RS256"].contains(&self.auth_algorithm.as_str()) {
            return bad(
                "ONKOS_AUTH_ALGORITHM",
                format!(
                    "{:?} is not one of EdDSA, ES256, RS256",
                    self.auth_algorithm
                ),
            );
        }
        if self.auth_public_key.is_some() && self.auth_jwks_url.is_some() {
            return bad(
                "ONKOS_AUTH_PUBLIC_KEY",
                "set it or ONKOS_AUTH_JWKS_URL, not both".into(),
            );
        }
        if let Some(url) = &self.auth_jwks_url
            && !(url.starts_with("https://")
                || url.starts_with("http://127.")
                || url.starts_with("http://localhost"))
        {
            return bad(
                "ONKOS_AUTH_JWKS_URL",
                "must be https:// (plain http only on loopback)".into(),
            );
        }
        if let Some(url) = &self.database_url
            && !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
        {
            return bad(
                "DATABASE_URL",
                "must start with postgres:// or postgresql://".into(),
            );
        }
        if !["text", "json"].contains(&self.log_format.as_str()) {
            return bad(
                "ONKOS_LOG_FORMAT",
                format!("{:?} is not text or json", self.log_format),
            );
        }
        if let Some(url) = &self.otlp_endpoint
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return bad(
                "ONKOS_OTLP_ENDPOINT",
                "must be an http:// or https:// URL".into(),
            );
        }
        match self.storage.as_str() {
            "local" => {}
            "s3" => {
                if self.s3_bucket.as_deref().is_none_or(str::is_empty) {
                    return bad("ONKOS_S3_BUCKET", "required with ONKOS_STORAGE=s3".into());
                }
                if self.s3_access_key_id.is_some() != self.s3_secret_access_key.is_some() {
                    return bad(
                        "ONKOS_S3_SECRET_ACCESS_KEY",
                        "set it and ONKOS_S3_ACCESS_KEY_ID together, or neither".into(),
                    );
                }
                if let Some(url) = &self.s3_endpoint
                    && !(url.starts_with("https://")
                        || (self.s3_allow_http && url.starts_with("http://")))
                {
                    return bad(
                        "ONKOS_S3_ENDPOINT",
                        "must be https:// (http:// only with ONKOS_S3_ALLOW_HTTP=true)".into(),
                    );
                }
            }
            other => {
                return bad("ONKOS_STORAGE", format!("{other:?} is not local or s3"));
            }
        }
        if self.rate_limit_per_second > 0 && self.rate_limit_burst == 0 {
            return bad(
                "ONKOS_RATE_LIMIT_BURST",
                "must be greater than 0 when ONKOS_RATE_LIMIT_PER_SECOND is set".into(),
            );
        }
        if !["auto", "cuda", "cpu"].contains(&self.execution_provider.as_str()) {
            return bad(
                "ONKOS_EXECUTION_PROVIDER",
                format!("{:?} is not auto, cuda or cpu", self.execution_provider),
            );
        }
        if self.cuda_device_id < 0 {
            return bad(
                "ONKOS_CUDA_DEVICE_ID",
                format!("{} is not a device number", self.cuda_device_id),
            );
        }
        if self.cuda_memory_limit_bytes == Some(0) {
            return bad(
                "ONKOS_CUDA_MEMORY_LIMIT_BYTES",
                "must be greater than 0 (unset it for no cap)".into(),
            );
        }
        for (var, value) in [
            (
                "ONKOS_DB_MAX_CONNECTIONS",
                u64::from(self.db_max_connections),
            ),
            ("ONKOS_REQUEST_TIMEOUT_SECS", self.request_timeout_secs),
            (
                "ONKOS_SLIDE_UPLOAD_LIMIT_BYTES",
                self.slide_upload_limit_bytes,
            ),
            (
                "ONKOS_EMBEDDINGS_UPLOAD_LIMIT_BYTES",
                self.embeddings_upload_limit_bytes,
            ),
            (
                "ONKOS_SLIDE_UPLOAD_TIMEOUT_SECS",
                self.slide_upload_timeout_secs,
            ),
            ("ONKOS_BODY_LIMIT_BYTES", self.body_limit_bytes as u64),
            ("ONKOS_INFERENCE_THREADS", self.inference_threads as u64),
            ("ONKOS_WORKER_BATCH_SIZE", u64::from(self.worker_batch_size)),
            ("ONKOS_SLIDE_BATCH_TILES", u64::from(self.slide_batch_tiles)),
            ("ONKOS_WORKER_LEASE_SECS", u64::from(self.worker_lease_secs)),
            ("ONKOS_WORKER_POLL_MS", self.worker_poll_ms),
            (
                "ONKOS_WORKER_MAX_ATTEMPTS",
                u64::from(self.worker_max_attempts),
            ),
            ("ONKOS_WORKER_RETRY_BASE_MS", self.worker_retry_base_ms),
            ("ONKOS_WEBHOOK_TIMEOUT_SECS", self.webhook_timeout_secs),
            (
                "ONKOS_WEBHOOK_MAX_ATTEMPTS",
                u64::from(self.webhook_max_attempts),
            ),
            ("ONKOS_WEBHOOK_RETRY_BASE_MS", self.webhook_retry_base_ms),
        ] {
            if value == 0 {
                return bad(var, "must be greater than 0".into());
            }
        }
        Ok(())
    }

    /// The blob store these settings name (its cache and staging folders are created).
    pub fn blob_store(&self) -> anyhow::Result<crate::storage::BlobStore> {
        use crate::storage::{BlobStore, S3Settings};
        if self.storage != "s3" {
            return BlobStore::local(&self.data_dir.join("blobs"));
        }
        let settings = S3Settings {
            bucket: self.s3_bucket.clone().unwrap_or_default(),
            endpoint: self.s3_endpoint.clone(),
            region: self.s3_region.clone(),
            access_key_id: self.s3_access_key_id.clone(),
            secret_access_key: self.s3_secret_access_key.clone(),
            path_style: self.s3_path_style,
            allow_http: self.s3_allow_http,
        };
        let cache = self
            .blob_cache_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("blob-cache"));
        BlobStore::s3(&settings, &cache, self.blob_cache_limit_bytes)
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
            .parse()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 8080)))
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }

    pub fn retry_policy(&self) -> crate::jobs::retry::RetryPolicy {
        crate::jobs::retry::RetryPolicy {
            max_attempts: i32::try_from(self.worker_max_attempts).unwrap_or(i32::MAX),
            base: Duration::from_millis(self.worker_retry_base_ms),
            cap: Duration::from_secs(300),
        }
    }

    pub fn webhook_retry_policy(&self) -> crate::jobs::retry::RetryPolicy {
        crate::jobs::retry::RetryPolicy {
            max_attempts: i32::try_from(self.webhook_max_attempts).unwrap_or(i32::MAX),
            base: Duration::from_millis(self.webhook_retry_base_ms),
            cap: Duration::from_secs(3600),
        }
    }

    /// The longest a long poll may wait: what was configured, and always short of the request timeout.
    pub fn max_wait(&self) -> Duration {
        Duration::from_secs(
            self.max_wait_secs
                .min(self.request_timeout_secs.saturating_sub(5)),
        )
    }

    pub fn keys_dir(&self) -> PathBuf {
        self.data_dir.join("keys")
    }

    /// True when onkos mints and trusts its own development key pair.
    pub fn dev_auth(&self) -> bool {
        self.auth_public_key.is_none() && self.auth_jwks_url.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert!(Config::default().validate().is_ok());
    }

    #[test]
    fn a_config_file_is_read_and_its_unknown_keys_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("onkos.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:9999\"\nworker_batch_size = 8\n",
        )
        .expect("write");
        let config = Config::load(Some(&file)).expect("valid file");
        assert_eq!(
            (config.listen.as_str(), config.worker_batch_size),
            ("127.0.0.1:9999", 8)
        );
        std::fs::write(&file, "listen_port = 9999\n").expect("write");
        let message = Config::load(Some(&file))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(message.contains("listen_port"), "{message}");
        std::fs::write(&file, "listen = \"everywhere\"\n").expect("write");
        let message = Config::load(Some(&file))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            message.contains("ONKOS_LISTEN (listen in the config file)"),
            "{message}"
        );
    }

    #[test]
    fn errors_name_the_setting() {
        type Breakage = fn(&mut Config);
        let cases: [(Breakage, &str); 4] = [
            (|c| c.listen = "nowhere".into(), "ONKOS_LISTEN"),
            (
                |c| c.auth_algorithm = "HS256".into(),
                "ONKOS_AUTH_ALGORITHM",
            ),
            (
                |c| c.database_url = Some("mysql://x".into()),
                "DATABASE_URL",
            ),
            (|c| c.worker_batch_size = 0, "ONKOS_WORKER_BATCH_SIZE"),
        ];
        for (break_it, var) in cases {
            let mut config = Config::default();
            break_it(&mut config);
            let message = config
                .validate()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(message.contains(var), "{message:?} does not name {var}");
        }
    }
}
