//! Precomputed tile embeddings: a safetensors bag uploaded, deduplicated per tenant and refused
//! with the reason when it is not one; a registered MIL head (the tiny ABMIL test fixture) run
//! over it, checked against the same arithmetic in NumPy (`weights.json`).

use crate::helpers::{TestApp, assert_problem, repo_path};
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use serde_json::Value;

const MIL: &str = "oslo-abmil";

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(repo_path(&format!(
        "tests/fixtures/models/tiny-abmil/{name}"
    )))
    .unwrap()
}

/// A safetensors file of the given float32 tensors.
fn bag_file(tensors: &[(&str, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), data)| {
            (
                (*name).to_owned(),
                TensorView::new(Dtype::F32, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize(views, None).unwrap()
}

async fn upload(
    app: &TestApp,
    token: &str,
    bytes: Vec<u8>,
    content_type: &str,
) -> reqwest::Response {
    app.client
        .post(format!(
            "{}/v1/embeddings?filename=case-7.safetensors",
            app.base
        ))
        .bearer_auth(token)
        .header("content-type", content_type)
        .body(bytes)
        .send()
        .await
        .unwrap()
}

fn stored_blobs(app: &TestApp) -> usize {
    std::fs::read_dir(app.config.data_dir.join("blobs/embeddings"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_mil_head_classifies_an_uploaded_bag_of_tile_embeddings_with_its_attention() {
    let app = TestApp::spawn().await;
    app.register_fixture("oslo", "tiny-abmil", MIL, "0.1.0")
        .await;
    let token = app.token("oslo", "submitter");

    let first = upload(
        &app,
        &token,
        fixture("bag.safetensors"),
        "application/octet-stream",
    )
    .await;
    assert_eq!(first.status(), 201);
    let location = first.headers()["location"].to_str().unwrap().to_owned();
    let bag: Value = first.json().await.unwrap();
    assert_eq!(
        (bag["tiles"].as_u64(), bag["dim"].as_u64()),
        (Some(40), Some(16))
    );
    assert_eq!(bag["has_coords"], true);
    assert_eq!(bag["metadata"]["encoder"], "test fixture");
    assert_eq!(bag["filename"], "case-7.safetensors");
    let id = bag["id"].as_str().unwrap().to_owned();
    assert_eq!(location, format!("/v1/embeddings/{id}"));
    // The same bytes again: the same bag.
    let again = upload(
        &app,
        &token,
        fixture("bag.safetensors"),
        "application/octet-stream",
    )
    .await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.json::<Value>().await.unwrap()["id"], id.as_str());
    assert_eq!((app.rows("embeddings").await, stored_blobs(&app)), (1, 1));
    assert_eq!(
        app.get_json(&location, &token).await["sha256"],
        bag["sha256"]
    );
    let bergen = app.token("bergen", "clinician");
    assert_problem(app.get(&location, &bergen).await, 404).await;

    let analysis_id = app
        .submit_to(
            &token,
            &serde_json::json!({"model": MIL, "embeddings": id, "subject": "ACC-7"}),
        )
        .await;
    assert_eq!(app.step().await, 1);
    let analysis = app
        .get_json(&format!("/v1/analyses/{analysis_id}"), &token)
        .await;
    assert_eq!(analysis["status"], "succeeded", "{analysis}");
    let result = &analysis["result"];
    assert_eq!(result["schema"], "onkos.result.classification/1");

    // The same arithmetic in NumPy (float64), from the fixture's build script.
    let reference: Value = serde_json::from_slice(&fixture("weights.json")).unwrap();
    let want_p: Vec<f64> =
        serde_json::from_value(reference["reference_bag"]["probabilities"].clone()).unwrap();
    let want_a: Vec<f64> =
        serde_json::from_value(reference["reference_bag"]["attention"].clone()).unwrap();
    let got_p: Vec<f64> = result["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["probability"].as_f64().unwrap())
        .collect();
    assert_eq!(got_p.len(), 2);
    for (got, want) in got_p.iter().zip(&want_p) {
        assert!((got - want).abs() < 1e-5, "{got_p:?} vs {want_p:?}");
    }
    let positive = want_p[1];
    let decision = &result["decision"];
    assert_eq!(
        decision["label"],
        if positive >= 0.5 {
            "positive"
        } else {
            "negative"
        }
    );
    assert!((decision["margin"].as_f64().unwrap() - (positive - 0.5)).abs() < 1e-5);

    // The bag and the tiles the head attended to most, highest first, with their positions.
    let summary = &result["bag"];
    assert_eq!(summary["embeddings"], id.as_str());
    assert_eq!(
        (summary["tiles"].as_u64(), summary["dim"].as_u64()),
        (Some(40), Some(16))
    );
    let attended = summary["attention"].as_array().unwrap();
    assert_eq!(attended.len(), 8);
    let mut order: Vec<usize> = (0..want_a.len()).collect();
    order.sort_by(|&a, &b| want_a[b].total_cmp(&want_a[a]));
    for (rank, tile) in attended.iter().enumerate() {
        let index = tile["index"].as_u64().unwrap() as usize;
        assert_eq!(tile["rank"].as_u64(), Some(rank as u64 + 1));
        assert_eq!(index, order[rank], "{attended:?}");
        assert!((tile["weight"].as_f64().unwrap() - want_a[index]).abs() < 1e-5);
        // The fixture's tiles sit on a 256-pixel grid, 8 across.
        assert_eq!(tile["x"].as_f64(), Some(((index % 8) * 256) as f64));
        assert_eq!(tile["y"].as_f64(), Some(((index / 8) * 256) as f64));
    }
    assert!(
        result["intended_use"]
            .as_str()
            .unwrap()
            .contains("Test fixture")
    );
}

#[tokio::test]
async fn bags_that_are_not_tile_embeddings_are_refused_with_the_reason_and_nothing_is_kept() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    let refused = |bytes: Vec<u8>, words: &'static str| {
        let app = &app;
        let token = &token;
        async move {
            let response = upload(app, token, bytes, "application/octet-stream").await;
            let problem = assert_problem(response, 422).await;
            assert!(problem.to_string().contains(words), "{problem}");
        }
    };
    refused(b"not a tensor file".to_vec(), "not a safetensors file").await;
    refused(
        bag_file(&[("features", vec![2, 2], vec![0.0; 4])]),
        "\\\"features\\\" is not read",
    )
    .await;
    refused(
        bag_file(&[("embeddings", vec![2, 2], vec![0.0, 1.0, f32::INFINITY, 0.0])]),
        "row 1",
    )
    .await;
    refused(
        bag_file(&[
            ("embeddings", vec![3, 2], vec![0.0; 6]),
            ("coords", vec![2, 2], vec![0.0; 4]),
        ]),
        "must be [3, 2]",
    )
    .await;
    let wrong_type = upload(&app, &token, fixture("bag.safetensors"), "application/json").await;
    assert_problem(wrong_type, 415).await;
    assert_eq!((app.rows("embeddings").await, stored_blobs(&app)), (0, 0));
    let staged = std::fs::read_dir(app.config.data_dir.join("blobs/staging"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(staged, 0);
}

#[tokio::test]
async fn mil_analyses_are_refused_when_the_bag_does_not_fit_the_model() {
    let app = TestApp::spawn().await;
    app.register_fixture("oslo", "tiny-abmil", MIL, "0.1.0")
        .await;
    let token = app.token("oslo", "submitter");
    let narrow = upload(
        &app,
        &token,
        bag_file(&[("embeddings", vec![3, 8], vec![0.5; 24])]),
        "application/octet-stream",
    )
    .await;
    assert_eq!(narrow.status(), 201);
    let narrow = narrow.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let refused = |body: Value, words: &'static str| {
        let app = &app;
        let token = &token;
        async move {
            let problem =
                assert_problem(app.post_json("/v1/analyses", token, &body).await, 422).await;
            assert!(problem.to_string().contains(words), "{problem}");
        }
    };
    refused(
        serde_json::json!({"model": MIL, "embeddings": narrow}),
        "8 wide",
    )
    .await;
    refused(serde_json::json!({"model": MIL}), "embeddings is required").await;
    refused(
        serde_json::json!({"model": MIL, "embeddings": narrow, "slide": narrow}),
        "names no encoder",
    )
    .await;
    refused(
        serde_json::json!({"model": MIL, "features": {"a": 1}}),
        "not a field of an embeddings analysis",
    )
    .await;
    // Another tenant's bag does not exist for this one.
    let bergen = app.token("bergen", "submitter");
    let body = serde_json::json!({"model": MIL, "embeddings": narrow});
    let problem = assert_problem(app.post_json("/v1/analyses", &bergen, &body).await, 422).await;
    assert!(problem.to_string().contains("model"), "{problem}");
    // Features sent to the MIL model as CSV are refused too.
    let csv = app
        .client
        .post(format!("{}/v1/analyses?model={MIL}", app.base))
        .bearer_auth(&token)
        .header("content-type", "text/csv")
        .body("a,b\n1,2\n")
        .send()
        .await
        .unwrap();
    let problem = assert_problem(csv, 422).await;
    assert!(problem.to_string().contains("tile embeddings"), "{problem}");
    assert_eq!(app.rows("analyses").await, 0);
}

#[tokio::test]
async fn a_mil_head_whose_manifest_misstates_its_width_is_refused_at_registration() {
    use reqwest::multipart::{Form, Part};
    let app = TestApp::spawn().await;
    let admin = app.token("oslo", "admin");
    let mut manifest: Value = serde_json::from_slice(&fixture("manifest.json")).unwrap();
    manifest["mil"]["embedding_dim"] = 32.into();
    let form = Form::new()
        .part(
            "manifest",
            Part::bytes(serde_json::to_vec(&manifest).unwrap()).file_name("manifest.json"),
        )
        .part(
            "onnx",
            Part::bytes(fixture("model.onnx")).file_name("model.onnx"),
        )
        .text("card", "# Test fixture");
    let response = app
        .client
        .post(format!("{}/v1/models", app.base))
        .bearer_auth(&admin)
        .multipart(form)
        .send()
        .await
        .unwrap();
    let problem = assert_problem(response, 422).await;
    assert!(
        problem.to_string().contains("probe bag of 3 x 32"),
        "{problem}"
    );
    let registered: i64 = sqlx::query_scalar("select count(*) from models where name = $1")
        .bind(MIL)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(registered, 0);
}

#[tokio::test]
async fn a_tile_encoder_stores_a_slides_embeddings_as_a_bag_that_a_mil_head_classifies() {
    let app = TestApp::spawn().await;
    app.register_fixture("oslo", "tiny-tile-encoder", "oslo-tile-encoder", "0.1.0")
        .await;
    app.register_fixture("oslo", "tiny-abmil", MIL, "0.1.0")
        .await;
    let token = app.token("oslo", "submitter");
    let slide = crate::slides::uploaded(&app, &token, "aperio-cmu1-small-region.svs").await;
    let encode = serde_json::json!({"model": "oslo-tile-encoder", "slide": slide});
    let id = app.submit_to(&token, &encode).await;
    assert_eq!(app.step().await, 1);
    let analysis = app.get_json(&format!("/v1/analyses/{id}"), &token).await;
    assert_eq!(analysis["status"], "succeeded", "{analysis}");
    let summary = &analysis["result"]["slide"];
    let tiles = summary["tiles_analysed"].as_u64().unwrap();
    assert!(tiles > 10, "{summary}");
    assert_eq!(analysis["result"]["measurements"], serde_json::json!([]));
    // An encoder has no heatmap, and says so.
    let heatmap = app
        .get(&format!("/v1/analyses/{id}/heatmap.png"), &token)
        .await;
    let problem = assert_problem(heatmap, 422).await;
    assert!(problem.to_string().contains("no heatmap"), "{problem}");

    // The tiles' embeddings, one row per analysed tile, with each tile's level-0 corner.
    let bag_id = summary["embeddings"].as_str().unwrap().to_owned();
    let bag = app
        .get_json(&format!("/v1/embeddings/{bag_id}"), &token)
        .await;
    assert_eq!(
        (bag["tiles"].as_u64(), bag["dim"].as_u64()),
        (Some(tiles), Some(16))
    );
    assert_eq!(bag["has_coords"], true);
    assert_eq!(bag["metadata"]["encoder"], "oslo-tile-encoder 0.1.0");
    // The same slide encoded again gives the same bag, stored once.
    let again = app.submit_to(&token, &encode).await;
    assert_eq!(app.step().await, 1);
    let again = app.get_json(&format!("/v1/analyses/{again}"), &token).await;
    assert_eq!(again["result"]["slide"]["embeddings"], bag_id.as_str());
    assert_eq!(app.rows("embeddings").await, 1);

    // The MIL head classifies the bag; the tiles it attends to are grid tiles of the slide.
    let classify = serde_json::json!({"model": MIL, "embeddings": bag_id});
    let mil = app.submit_to(&token, &classify).await;
    assert_eq!(app.step().await, 1);
    let mil = app.get_json(&format!("/v1/analyses/{mil}"), &token).await;
    assert_eq!(mil["status"], "succeeded", "{mil}");
    let geo = app
        .get_json(&format!("/v1/analyses/{id}/tiles.geojson"), &token)
        .await;
    let corners: Vec<(f64, f64)> = geo["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let c = &f["geometry"]["coordinates"][0][0];
            (c[0].as_f64().unwrap(), c[1].as_f64().unwrap())
        })
        .collect();
    let attended = mil["result"]["bag"]["attention"].as_array().unwrap();
    assert_eq!(attended.len(), 8);
    for tile in attended {
        let at = (tile["x"].as_f64().unwrap(), tile["y"].as_f64().unwrap());
        assert!(corners.contains(&at), "{at:?} is not a tile of the slide");
    }
    let p: f64 = mil["result"]["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["probability"].as_f64().unwrap())
        .sum();
    assert!((p - 1.0).abs() < 1e-5);
}

#[tokio::test]
async fn a_mil_model_with_an_encoder_classifies_a_slide_in_one_analysis_with_an_attention_heatmap()
{
    let app = TestApp::spawn().await;
    app.register_fixture("oslo", "tiny-tile-encoder", "oslo-tile-encoder", "0.1.0")
        .await;
    let mut manifest: Value = serde_json::from_slice(&fixture("manifest.json")).unwrap();
    manifest["name"] = "oslo-abmil-slide".into();
    manifest["mil"]["encoder_model"] = "oslo-tile-encoder".into();
    app.register_with("oslo", "tiny-abmil", &manifest, "oslo-abmil-slide", "0.1.0")
        .await;
    // The same head without an encoder takes embeddings only.
    app.register_fixture("oslo", "tiny-abmil", MIL, "0.1.0")
        .await;
    let token = app.token("oslo", "submitter");
    let slide = crate::slides::uploaded(&app, &token, "aperio-cmu1-small-region.svs").await;

    let body = serde_json::json!({"model": "oslo-abmil-slide", "slide": slide, "subject": "ACC-9"});
    let id = app.submit_to(&token, &body).await;
    assert_eq!(app.step().await, 1);
    let analysis = app.get_json(&format!("/v1/analyses/{id}"), &token).await;
    assert_eq!(analysis["status"], "succeeded", "{analysis}");
    let result = &analysis["result"];
    assert_eq!(result["schema"], "onkos.result.classification/1");
    assert_eq!(analysis["model"]["name"], "oslo-abmil-slide");
    // What the encoder looked at, and the bag it made, which the head classified.
    let tiles = result["slide"]["tiles_analysed"].as_u64().unwrap();
    assert!(tiles > 10, "{result}");
    assert_eq!(result["bag"]["tiles"].as_u64(), Some(tiles));
    assert_eq!(result["bag"]["embeddings"], result["slide"]["embeddings"]);
    assert!(result["stages"]["read_decode_ms"].as_f64().unwrap() > 0.0);
    // The same bag through the head alone gives the same answer.
    let alone = serde_json::json!({"model": MIL, "embeddings": result["bag"]["embeddings"]});
    let alone = app.submit_to(&token, &alone).await;
    assert_eq!(app.step().await, 1);
    let alone = app.get_json(&format!("/v1/analyses/{alone}"), &token).await;
    assert_eq!(alone["result"]["predictions"], result["predictions"]);
    assert_eq!(
        alone["result"]["bag"]["attention"],
        result["bag"]["attention"]
    );
    // The attention over the slide: one score per tile, as a heatmap and as GeoJSON.
    let heat = app
        .get(&format!("/v1/analyses/{id}/heatmap.png"), &token)
        .await;
    assert_eq!(heat.status(), 200);
    assert_eq!(heat.headers()["x-onkos-heatmap-measure"], "attention");
    let geo = app
        .get_json(&format!("/v1/analyses/{id}/tiles.geojson"), &token)
        .await;
    let features = geo["features"].as_array().unwrap();
    assert_eq!(features.len() as u64, tiles);
    let total: f64 = features
        .iter()
        .map(|f| {
            f["properties"]["measurements"]["attention"]
                .as_f64()
                .unwrap()
        })
        .sum();
    assert!((total - 1.0).abs() < 1e-4, "attention sums to {total}");
    // The head alone has no encoder: a slide is refused with the reason.
    let refused = app
        .post_json(
            "/v1/analyses",
            &token,
            &serde_json::json!({"model": MIL, "slide": slide}),
        )
        .await;
    let problem = assert_problem(refused, 422).await;
    assert!(
        problem.to_string().contains("names no encoder"),
        "{problem}"
    );
}
