//! moto's S3-compatible server on 127.0.0.1, for the tests that store blobs in a bucket.

use crate::helpers::repo_path;
use onkos::config::Config;
use std::path::PathBuf;
use std::time::Duration;

/// An S3-compatible server (moto, from the PyPI wheel `make test` installs), killed on drop.
pub struct Moto {
    pub endpoint: String,
    child: tokio::process::Child,
}

impl Moto {
    pub async fn start() -> Self {
        let program = std::env::var_os("MOTO_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_path("target/moto-venv/bin/moto_server"));
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = tokio::process::Command::new(&program)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("{} (make test installs it): {e}", program.display()));
        let endpoint = format!("http://127.0.0.1:{port}");
        // Its start-up, not work, is what is waited for: the port answers when it is ready.
        let client = reqwest::Client::new();
        for _ in 0..200 {
            if client.get(&endpoint).send().await.is_ok() {
                return Self { endpoint, child };
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("moto_server did not start on {endpoint}");
    }

    pub async fn create_bucket(&self, bucket: &str) {
        let response = reqwest::Client::new()
            .put(format!("{}/{bucket}", self.endpoint))
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success(), "{response:?}");
    }

    /// The keys the bucket holds.
    pub async fn keys(&self, bucket: &str) -> Vec<String> {
        let xml = reqwest::get(format!("{}/{bucket}?list-type=2", self.endpoint))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        xml.split("<Key>")
            .skip(1)
            .filter_map(|s| s.split("</Key>").next())
            .map(str::to_owned)
            .collect()
    }

    pub async fn stop(mut self) {
        self.child.start_kill().unwrap();
        let _ = self.child.wait().await;
    }

    /// Settings for a process storing in `bucket`.
    pub fn configure(&self, config: &mut Config, bucket: &str) {
        config.storage = "s3".into();
        config.s3_bucket = Some(bucket.into());
        config.s3_endpoint = Some(self.endpoint.clone());
        config.s3_access_key_id = Some("testing".into());
        config.s3_secret_access_key = Some("testing".into());
        config.s3_path_style = true;
        config.s3_allow_http = true;
    }
}
