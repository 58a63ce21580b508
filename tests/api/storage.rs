//! Blobs on S3-compatible storage (a real `moto_server` on 127.0.0.1), and uploads whose storage
//! fails: 503 problem+json, nothing half-kept.

use crate::helpers::{TestApp, assert_problem};
use crate::moto::Moto;
use crate::slides::{STAIN, fixture, uploaded};
use serde_json::Value;
use std::path::PathBuf;

fn cached(app: &TestApp, key: &str) -> PathBuf {
    app.config.data_dir.join("blob-cache").join(key)
}

#[tokio::test]
async fn on_s3_models_and_slides_live_in_the_bucket_and_a_machine_without_a_copy_fetches_it() {
    let moto = Moto::start().await;
    moto.create_bucket("onkos").await;
    let app = TestApp::spawn_with(|c| moto.configure(c, "onkos")).await;
    let keys = moto.keys("onkos").await;
    // The bundled models were imported into the bucket at start-up; nothing local but the cache.
    assert!(
        keys.iter().filter(|k| k.starts_with("models/")).count() >= 6,
        "{keys:?}"
    );
    assert!(!app.config.data_dir.join("blobs").exists());

    let token = app.token("oslo", "submitter");
    let slide = uploaded(&app, &token, "aperio-cmu1-small-region.svs").await;
    let key = format!("slides/{slide}");
    assert!(moto.keys("onkos").await.contains(&key));
    let copy = cached(&app, &key);
    assert_eq!(
        std::fs::read(&copy).unwrap(),
        fixture("aperio-cmu1-small-region.svs")
    );
    // The worker's machine has no copy: it fetches the slide from the bucket to analyse it.
    std::fs::remove_file(&copy).unwrap();
    let id = app
        .submit_to(&token, &serde_json::json!({"model": STAIN, "slide": slide}))
        .await;
    assert_eq!(app.step().await, 1);
    let analysis: Value = app.get_json(&format!("/v1/analyses/{id}"), &token).await;
    assert_eq!(analysis["status"], "succeeded", "{analysis}");
    assert!(
        analysis["result"]["slide"]["tiles_analysed"]
            .as_u64()
            .unwrap()
            > 10
    );
    assert_eq!(
        std::fs::read(&copy).unwrap(),
        fixture("aperio-cmu1-small-region.svs"),
        "the fetched copy is the uploaded file"
    );
    let heatmap = app
        .get(&format!("/v1/analyses/{id}/heatmap.png"), &token)
        .await;
    assert_eq!(heatmap.status(), 200);
    // Staging holds nothing once uploads and fetches are done.
    assert_eq!(
        std::fs::read_dir(app.config.data_dir.join("blob-cache/staging"))
            .unwrap()
            .count(),
        0
    );
}

#[tokio::test]
async fn an_upload_when_the_store_is_down_is_503_and_leaves_no_slide_and_no_staged_file() {
    let moto = Moto::start().await;
    moto.create_bucket("onkos").await;
    let app = TestApp::spawn_with(|c| moto.configure(c, "onkos")).await;
    let token = app.token("oslo", "submitter");
    moto.stop().await;
    let response = app
        .client
        .post(format!("{}/v1/slides", app.base))
        .bearer_auth(&token)
        .header("content-type", "application/octet-stream")
        .body(fixture("aperio-cmu1-small-region.svs"))
        .send()
        .await
        .unwrap();
    let problem = assert_problem(response, 503).await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("nothing was kept"),
        "{problem}"
    );
    assert_eq!(app.rows("slides").await, 0);
    let cache = app.config.data_dir.join("blob-cache");
    assert_eq!(std::fs::read_dir(cache.join("staging")).unwrap().count(), 0);
    assert!(!cache.join("slides").exists());
}

#[tokio::test]
async fn a_store_that_cannot_be_reached_stops_start_up_with_the_reason() {
    let data = tempfile::tempdir().unwrap();
    let mut config = crate::helpers::test_config(data.path());
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    config.storage = "s3".into();
    config.s3_bucket = Some("onkos".into());
    config.s3_endpoint = Some(format!("http://127.0.0.1:{port}"));
    config.s3_access_key_id = Some("testing".into());
    config.s3_secret_access_key = Some("testing".into());
    config.s3_path_style = true;
    config.s3_allow_http = true;
    let pool = crate::helpers::fresh_database().await;
    let error = onkos::app::Application::with_pool(config, pool)
        .await
        .expect_err("no store answers");
    assert!(
        format!("{error:#}").contains("blob store is not reachable"),
        "{error:#}"
    );
}

#[tokio::test]
async fn a_local_volume_that_cannot_be_written_fails_the_upload_cleanly() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    let blobs = app.config.data_dir.join("blobs");
    // The slides folder cannot be made (a file is in its way): the move into the store fails after
    // the upload was staged, hashed and inspected, as a full or broken volume would.
    std::fs::write(blobs.join("slides"), b"in the way").unwrap();
    let upload = |bytes: Vec<u8>| {
        app.client
            .post(format!("{}/v1/slides", app.base))
            .bearer_auth(&token)
            .header("content-type", "application/octet-stream")
            .body(bytes)
            .send()
    };
    let response = upload(fixture("aperio-cmu1-small-region.svs"))
        .await
        .unwrap();
    assert_problem(response, 503).await;
    assert_eq!(app.rows("slides").await, 0);
    assert_eq!(std::fs::read_dir(blobs.join("staging")).unwrap().count(), 0);
    // Staging itself cannot be written: refused before a byte is kept.
    std::fs::remove_dir(blobs.join("staging")).unwrap();
    std::fs::write(blobs.join("staging"), b"in the way").unwrap();
    let response = upload(fixture("aperio-cmu1-small-region.svs"))
        .await
        .unwrap();
    assert_problem(response, 503).await;
    assert_eq!(app.rows("slides").await, 0);
    // The volume is repaired: the same upload is stored.
    std::fs::remove_file(blobs.join("staging")).unwrap();
    std::fs::remove_file(blobs.join("slides")).unwrap();
    std::fs::create_dir(blobs.join("staging")).unwrap();
    let response = upload(fixture("aperio-cmu1-small-region.svs"))
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(app.rows("slides").await, 1);
}
