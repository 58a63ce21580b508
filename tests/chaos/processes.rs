//! `onkos` child processes on a test database, started as an operator would start them, with their
//! log in their data folder (printed when a test fails to start one).

use crate::helpers::repo_path;
use crate::moto::Moto;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};

/// The ONNX Runtime library the test process was given.
fn ort() -> PathBuf {
    std::env::var_os("ORT_DYLIB_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_path("target/onnxruntime-1.31.1/libonnxruntime.so.1.31.1"))
}

/// `onkos <role>` on `database_url`, keeping its files in `data_dir`.
pub fn command(role: &str, database_url: &str, data_dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_onkos"));
    command
        .arg(role)
        .env("DATABASE_URL", database_url)
        .env("ONKOS_DATA_DIR", data_dir)
        .env("ONKOS_LISTEN", "127.0.0.1:0")
        .env("ONKOS_MODELS_DIR", repo_path("models"))
        .env("ONKOS_EXECUTION_PROVIDER", "cpu")
        .env("ORT_DYLIB_PATH", ort())
        .env("ONKOS_RATE_LIMIT_PER_SECOND", "0")
        .env("ONKOS_LOG", "info")
        .env("NO_COLOR", "1")
        .kill_on_drop(true);
    command
}

/// The settings that put a process's blobs in `bucket` on `moto`.
pub fn on_s3(command: &mut Command, moto: &Moto, bucket: &str) {
    command
        .env("ONKOS_STORAGE", "s3")
        .env("ONKOS_S3_BUCKET", bucket)
        .env("ONKOS_S3_ENDPOINT", &moto.endpoint)
        .env("ONKOS_S3_ACCESS_KEY_ID", "testing")
        .env("ONKOS_S3_SECRET_ACCESS_KEY", "testing")
        .env("ONKOS_S3_PATH_STYLE", "true")
        .env("ONKOS_S3_ALLOW_HTTP", "true");
}

/// Starts a worker; its log goes to `data_dir/onkos.log`.
pub fn start_worker(mut command: Command, data_dir: &Path) -> Child {
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(data_dir.join("onkos.log"))
        .unwrap();
    command.stdout(Stdio::null()).stderr(log).spawn().unwrap()
}

/// Starts an API or worker process and returns it with its base URL, once it listens.
pub async fn start_serving(mut command: Command) -> (Child, String) {
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let base = loop {
        let Some(line) = log.next_line().await.unwrap() else {
            panic!("onkos exited before listening:\n{}", seen.join("\n"));
        };
        if let Some(addr) = line
            .split("addr=")
            .nth(1)
            .filter(|_| line.contains("listening"))
        {
            break format!("http://{}", addr.split_whitespace().next().unwrap());
        }
        seen.push(line);
    };
    tokio::spawn(async move { while let Ok(Some(_)) = log.next_line().await {} });
    (child, base)
}

/// `onkos audit verify` on the database: every tenant's provenance chain checks out.
pub fn audit_verify(database_url: &str, data_dir: &Path) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_onkos"))
        .args(["audit", "verify"])
        .env("DATABASE_URL", database_url)
        .env("ONKOS_DATA_DIR", data_dir)
        .env("ONKOS_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "audit verify: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
