//! The test harness: one private Postgres cluster per test run, one migrated template database,
//! and per test a fresh database cloned from it plus an application bound to port 0.

use onkos::app::Application;
use onkos::auth::keys::DevKeys;
use onkos::config::Config;
use onkos::db::embedded::EmbeddedPostgres;
use onkos::jobs::worker::Worker;
use reqwest::header::CONTENT_TYPE;
use serde_json::{Value, json};
use sqlx::{Connection, PgPool};
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

const TEMPLATE: &str = "onkos_template";
pub const MODEL: &str = "breast-fna-malignancy";

static CLUSTER: OnceCell<EmbeddedPostgres> = OnceCell::const_new();

/// The cluster, started (and the template migrated) by the first test that needs it. It stops when
/// the test process exits (the server has a parent-death signal).
async fn cluster() -> &'static EmbeddedPostgres {
    CLUSTER
        .get_or_init(|| async {
            // One cluster per test binary: cargo runs the binaries one after another, and the
            // previous one's cluster may still be stopping.
            let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
                .join(format!("onkos-test-pg-{}", env!("CARGO_CRATE_NAME")));
            let server = EmbeddedPostgres::start(&dir, None, "postgres")
                .await
                .expect("start the test cluster");
            let mut admin = sqlx::PgConnection::connect_with(&server.options("postgres"))
                .await
                .unwrap();
            let stale: Vec<String> = sqlx::query_scalar(
                "select datname from pg_database where datname like 'test_%' or datname = $1",
            )
            .bind(TEMPLATE)
            .fetch_all(&mut admin)
            .await
            .unwrap();
            for name in stale {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "drop database \"{name}\" with (force)"
                )))
                .execute(&mut admin)
                .await
                .unwrap();
            }
            sqlx::query(sqlx::AssertSqlSafe(format!("create database {TEMPLATE}")))
                .execute(&mut admin)
                .await
                .unwrap();
            let template = onkos::db::pool(server.options(TEMPLATE), 1).await.unwrap();
            onkos::db::MIGRATOR.run(&template).await.unwrap();
            template.close().await;
            server
        })
        .await
}

/// A fresh, migrated database for one test.
pub async fn fresh_database() -> PgPool {
    fresh_database_named().await.0
}

/// A fresh database and a URL other processes can reach it by.
pub async fn fresh_database_named() -> (PgPool, String) {
    let (options, url) = fresh_database_options().await;
    (onkos::db::pool(options, 8).await.unwrap(), url)
}

/// A fresh, migrated database: how to reach it, and its URL for other processes.
pub async fn fresh_database_options() -> (sqlx::postgres::PgConnectOptions, String) {
    let server = cluster().await;
    let name = format!("test_{}", uuid::Uuid::new_v4().simple());
    let mut admin = sqlx::PgConnection::connect_with(&server.options("postgres"))
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "create database {name} template {TEMPLATE}"
    )))
    .execute(&mut admin)
    .await
    .unwrap();
    (server.options(&name), server.url(&name))
}

pub fn repo_path(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// A configuration for tests: port 0, its own data folder, no background worker.
pub fn test_config(data_dir: &std::path::Path) -> Config {
    Config {
        listen: "127.0.0.1:0".into(),
        data_dir: data_dir.to_path_buf(),
        models_dir: repo_path("models"),
        ort_dylib_path: Some(
            std::env::var_os("ORT_DYLIB_PATH")
                .map(PathBuf::from)
                .unwrap_or_else(|| repo_path("target/onnxruntime-1.31.1/libonnxruntime.so.1.31.1")),
        ),
        execution_provider: "cpu".into(),
        worker: false,
        // Tests step webhook delivery themselves, to receivers on 127.0.0.1.
        webhooks: false,
        // Tests step the provenance sealer themselves.
        provenance_seal_ms: 0,
        webhook_allow_private_networks: true,
        // Tests send requests as fast as they can; the limit's own test sets one.
        rate_limit_per_second: 0,
        // OpenSlide runs in child processes of onkos itself, not of the test binary.
        slide_reader: Some(PathBuf::from(env!("CARGO_BIN_EXE_onkos"))),
        ..Config::default()
    }
}

#[derive(Debug)]
pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub pool: PgPool,
    pub worker: Worker,
    pub deliverer: onkos::jobs::webhooks::Deliverer,
    pub keys: DevKeys,
    pub config: Config,
    /// The test database, as another process would reach it.
    pub database_url: String,
    shutdown: CancellationToken,
    /// The running application (`Application::run`), until `stop_and_wait` takes it.
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _data_dir: tempfile::TempDir,
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    pub async fn spawn_with(adjust: impl FnOnce(&mut Config)) -> Self {
        let (pool, database_url) = fresh_database_named().await;
        Self::spawn_on(pool, database_url, adjust).await
    }

    /// As `spawn_with`, on the caller's pool of a fresh database (one that reaches it another way).
    pub async fn spawn_on(
        pool: PgPool,
        database_url: String,
        adjust: impl FnOnce(&mut Config),
    ) -> Self {
        let data_dir = tempfile::tempdir().unwrap();
        let mut config = test_config(data_dir.path());
        adjust(&mut config);
        let app = Application::with_pool(config.clone(), pool.clone())
            .await
            .expect("build the application");
        let base = format!("http://{}", app.local_addr());
        let worker = app.worker();
        let deliverer = app.deliverer();
        let keys = DevKeys::load_or_create(&config.keys_dir()).unwrap();
        let shutdown = CancellationToken::new();
        let server = Some(tokio::spawn(app.run(shutdown.clone())));
        Self {
            base,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            pool,
            worker,
            deliverer,
            keys,
            config,
            database_url,
            shutdown,
            server,
            _data_dir: data_dir,
        }
    }

    /// A token from the development key pair the application trusts.
    pub fn token(&self, tenant: &str, role: &str) -> String {
        self.keys
            .mint(
                &self.config.auth_issuer,
                &self.config.auth_audience,
                "tester",
                tenant,
                &[role.into()],
                Duration::from_secs(600),
            )
            .unwrap()
    }

    pub async fn post_json(&self, path: &str, token: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(format!("{}{path}", self.base))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn get(&self, path: &str, token: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.base))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    /// GETs `path` and returns its JSON body, whatever the status.
    pub async fn get_json(&self, path: &str, token: &str) -> Value {
        self.get(path, token).await.json().await.unwrap()
    }

    /// Submits a whole JSON request and returns the new analysis id.
    pub async fn submit_to(&self, token: &str, body: &Value) -> String {
        let response = self.post_json("/v1/analyses", token, body).await;
        assert_eq!(response.status(), 202, "{:?}", response.text().await);
        response.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Submits `features` and returns the new analysis id.
    pub async fn submit(&self, token: &str, features: &Value) -> String {
        let response = self
            .post_json(
                "/v1/analyses",
                token,
                &json!({"model": MODEL, "features": features}),
            )
            .await;
        assert_eq!(response.status(), 202, "{:?}", response.text().await);
        response.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Runs the worker once; returns how many analyses it finished.
    /// Registers a test-fixture model (`tests/fixtures/models/<folder>`: manifest.json and
    /// model.onnx) in `tenant` through the API, and activates it.
    pub async fn register_fixture(&self, tenant: &str, folder: &str, name: &str, version: &str) {
        let dir = repo_path(&format!("tests/fixtures/models/{folder}"));
        let manifest = serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap());
        self.register_with(tenant, folder, &manifest.unwrap(), name, version)
            .await;
    }

    /// Registers and activates a test-fixture model's ONNX file under another manifest.
    pub async fn register_with(
        &self,
        tenant: &str,
        folder: &str,
        manifest: &Value,
        name: &str,
        version: &str,
    ) {
        use reqwest::multipart::{Form, Part};
        let admin = self.token(tenant, "admin");
        let dir = repo_path(&format!("tests/fixtures/models/{folder}"));
        let file = |name: &str| {
            Part::bytes(std::fs::read(dir.join(name)).unwrap()).file_name(name.to_owned())
        };
        let form = Form::new()
            .part(
                "manifest",
                Part::bytes(serde_json::to_vec(manifest).unwrap()).file_name("manifest.json"),
            )
            .part("onnx", file("model.onnx"))
            .text("card", "# Test fixture\nRandom weights; not a model.");
        let registered = self
            .client
            .post(format!("{}/v1/models", self.base))
            .bearer_auth(&admin)
            .multipart(form)
            .send()
            .await
            .unwrap();
        assert_eq!(registered.status(), 201, "{:?}", registered.text().await);
        let activate = self
            .client
            .post(format!(
                "{}/v1/models/{name}/versions/{version}/activate",
                self.base
            ))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap();
        assert_eq!(activate.status(), 200);
    }

    /// Begins the server's shutdown, as SIGTERM would.
    pub fn stop(&self) {
        self.shutdown.cancel();
    }

    /// Shuts the application down, as SIGTERM would, and waits until `run` has returned.
    pub async fn stop_and_wait(&mut self) {
        self.shutdown.cancel();
        if let Some(server) = self.server.take() {
            server.await.unwrap().unwrap();
        }
    }

    pub async fn step(&self) -> usize {
        self.worker.step().await.unwrap()
    }

    /// Steps the worker until nothing is runnable; returns how many analyses it finished.
    pub async fn drain(&self) -> usize {
        let mut total = 0;
        loop {
            match self.step().await {
                0 => return total,
                n => total += n,
            }
        }
    }

    pub async fn rows(&self, table: &str) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("select count(*) from {table}")))
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Real WDBC cohort rows with the probabilities the training script computed for them.
pub fn reference_rows() -> Vec<Value> {
    model_references(MODEL)
}

/// Every cohort row of `model`, with the outputs its training script computed and the outcome.
pub fn model_references(model: &str) -> Vec<Value> {
    let path = repo_path(&format!("models/{model}/reference_predictions.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

pub fn manifest() -> Value {
    model_manifest(MODEL)
}

pub fn model_manifest(model: &str) -> Value {
    let path = repo_path(&format!("models/{model}/manifest.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Asserts an RFC 9457 problem response with `status`, returning the problem document.
pub async fn assert_problem(response: reqwest::Response, status: u16) -> Value {
    assert_eq!(response.status(), status);
    let content_type = response
        .headers()
        .get(CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(content_type.as_deref(), Some("application/problem+json"));
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["status"], status);
    assert!(
        problem["type"]
            .as_str()
            .is_some_and(|t| t.starts_with("https://")),
        "{problem}"
    );
    assert!(
        problem["title"].is_string() && problem["detail"].is_string(),
        "{problem}"
    );
    problem
}

/// The probability a classification result gives `label`.
pub fn class_probability(analysis: &Value, label: &str) -> f64 {
    analysis["result"]["predictions"]
        .as_array()
        .expect("a classification result")
        .iter()
        .find(|p| p["label"] == label)
        .unwrap_or_else(|| panic!("no prediction for {label}"))["probability"]
        .as_f64()
        .unwrap()
}

/// A zip of (name, bytes) entries, deflated.
pub fn zipped(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
    use std::io::Write;
    let mut out = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for (name, bytes) in entries {
        out.start_file(*name, options).unwrap();
        out.write_all(bytes).unwrap();
    }
    out.finish().unwrap().into_inner()
}

/// A CSV batch of the rows' features, with a `subject` column (`case-1`, …). `break_cell`
/// (1-based row, column, text) replaces one cell.
pub fn csv(rows: &[Value], break_cell: Option<(usize, &str, &str)>) -> String {
    let names: Vec<String> = rows[0]["features"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    let mut out = format!("subject,{}\n", names.join(","));
    for (i, row) in rows.iter().enumerate() {
        let cells: Vec<String> = names
            .iter()
            .map(|n| match break_cell {
                Some((r, column, value)) if r == i + 1 && column == n => value.to_owned(),
                _ => row["features"][n].to_string(),
            })
            .collect();
        out.push_str(&format!("case-{},{}\n", i + 1, cells.join(",")));
    }
    out
}
