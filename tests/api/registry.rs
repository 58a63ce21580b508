//! The model registry: the bundled catalogue with cards and contracts, admin registration (every
//! bad upload refused, nothing stored), activation and retirement of immutable versions.

use crate::helpers::{TestApp, assert_problem, model_references, repo_path};
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const GB: &str = "breast-fna-malignancy-gb";

fn gb_files() -> (Value, Vec<u8>) {
    let dir = repo_path(&format!("models/{GB}"));
    let manifest =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    (manifest, std::fs::read(dir.join("model.onnx")).unwrap())
}

/// The GB model re-labelled as a tenant's own model.
fn own_model(version: &str) -> (Value, Vec<u8>) {
    let (mut manifest, onnx) = gb_files();
    manifest["name"] = json!("oslo-fna-gb");
    manifest["version"] = json!(version);
    (manifest, onnx)
}

async fn register(
    app: &TestApp,
    token: &str,
    manifest: &Value,
    onnx: Vec<u8>,
) -> reqwest::Response {
    let form = Form::new()
        .part(
            "manifest",
            Part::bytes(serde_json::to_vec(manifest).unwrap()).file_name("manifest.json"),
        )
        .part("onnx", Part::bytes(onnx).file_name("model.onnx"))
        .text("card", "# Oslo FNA GB\nResearch use only.");
    app.client
        .post(format!("{}/v1/models", app.base))
        .bearer_auth(token)
        .multipart(form)
        .send()
        .await
        .unwrap()
}

async fn post(app: &TestApp, token: &str, path: &str) -> reqwest::Response {
    app.client
        .post(format!("{}{path}", app.base))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

fn case(model: &str) -> Value {
    json!({"model": model, "features": model_references(GB)[0]["features"]})
}

#[tokio::test]
async fn the_catalogue_lists_every_bundled_model_with_its_card_and_contract() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "clinician");
    let list: Value = app.get("/v1/models", &token).await.json().await.unwrap();
    let mut names: Vec<&str> = list["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "breast-fna-malignancy",
            GB,
            "breast-metastasis-76gene",
            "breast-recurrence-gbsg2",
            "he-stain-quantification",
            "lung-survival-ncctg",
            "lung-survival-va"
        ]
    );
    let stain: Value = app
        .get("/v1/models/he-stain-quantification", &token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        (&stain["modality"], &stain["task"]),
        (&json!("slide"), &json!("quantification"))
    );
    assert_eq!(stain["manifest"]["slide"]["tile_size"], 224);
    assert_eq!(stain["input_schema"]["required"], json!(["slide"]));
    assert!(stain["card"].as_str().unwrap().contains("not a diagnosis"));
    // Each bundled model is active at the version its folder's manifest gives.
    for m in list["models"].as_array().unwrap() {
        let name = m["name"].as_str().unwrap();
        let manifest = crate::helpers::model_manifest(name);
        assert_eq!(m["active_version"], manifest["version"], "{name}");
        assert_eq!(m["source"], "bundled", "{name}");
    }

    let gbsg2: Value = app
        .get("/v1/models/breast-recurrence-gbsg2", &token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(gbsg2["task"], "survival");
    assert_eq!(
        gbsg2["input_schema"]["properties"]["horTh"]["enum"],
        json!(["no", "yes"])
    );
    assert_eq!(gbsg2["input_schema"]["additionalProperties"], false);
    assert!(gbsg2["card"].as_str().unwrap().contains("Intended use"));
    assert!(
        gbsg2["intended_use"]
            .as_str()
            .unwrap()
            .contains("not a medical device")
    );
    assert!(gbsg2["manifest"]["metrics"]["cross_validated"]["c_index"].is_number());
    let version: Value = app
        .get("/v1/models/breast-recurrence-gbsg2/versions/1.0.0", &token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(version["onnx_sha256"], gbsg2["onnx_sha256"]);
    assert_problem(app.get("/v1/models/no-such-model", &token).await, 404).await;
    assert_problem(
        app.get("/v1/models/breast-recurrence-gbsg2/versions/9.9.9", &token)
            .await,
        404,
    )
    .await;
}

#[tokio::test]
async fn a_registered_model_is_used_once_activated_and_only_by_its_tenant() {
    let app = TestApp::spawn().await;
    let admin = app.token("oslo", "admin");
    let (manifest, onnx) = own_model("2.0.0");
    let response = register(&app, &admin, &manifest, onnx).await;
    assert_eq!(response.status(), 201, "{:?}", response.text().await);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    assert_eq!(location, "/v1/models/oslo-fna-gb/versions/2.0.0");
    let staged: Value = app.get(&location, &admin).await.json().await.unwrap();
    assert_eq!(
        (staged["state"].as_str(), staged["source"].as_str()),
        (Some("staged"), Some("registered"))
    );

    let problem = assert_problem(
        app.post_json("/v1/analyses", &admin, &case("oslo-fna-gb"))
            .await,
        422,
    )
    .await;
    assert_eq!(
        problem["errors"][0]["rule"], "unknown_model",
        "a staged version is not used"
    );
    assert_eq!(
        post(
            &app,
            &admin,
            "/v1/models/oslo-fna-gb/versions/2.0.0/activate"
        )
        .await
        .status(),
        200
    );
    let id = app.submit_to(&admin, &case("oslo-fna-gb")).await;
    app.step().await;
    let analysis: Value = app
        .get(&format!("/v1/analyses/{id}"), &admin)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(analysis["status"], "succeeded");
    assert_eq!(analysis["model"]["version"], "2.0.0");
    assert_eq!(analysis["model"]["sha256"], manifest["onnx"]["sha256"]);

    let bergen = app.token("bergen", "admin");
    assert_problem(app.get("/v1/models/oslo-fna-gb", &bergen).await, 404).await;
    let problem = assert_problem(
        app.post_json("/v1/analyses", &bergen, &case("oslo-fna-gb"))
            .await,
        422,
    )
    .await;
    assert_eq!(problem["errors"][0]["rule"], "unknown_model");
}

#[tokio::test]
async fn every_kind_of_bad_model_is_refused_and_nothing_is_stored() {
    let app = TestApp::spawn().await;
    let admin = app.token("oslo", "admin");
    let bundled_rows = app.rows("models").await;
    let with_sha = |mut manifest: Value, onnx: &[u8]| {
        manifest["onnx"]["sha256"] = json!(hex::encode(Sha256::digest(onnx)));
        manifest
    };
    let (good, onnx) = own_model("1.0.0");
    let garbage = b"this is not an ONNX file".to_vec();
    let mut wrong_input = good.clone();
    wrong_input["onnx"]["input"] = json!("pixels");
    let mut three_labels = good.clone();
    three_labels["classification"]["labels"] = json!(["benign", "malignant", "uncertain"]);
    let mut narrower = good.clone();
    narrower["inputs"].as_array_mut().unwrap().pop();
    narrower["encoding"].as_array_mut().unwrap().pop();
    let mut wrong_sha = good.clone();
    wrong_sha["onnx"]["sha256"] = json!("00".repeat(32));
    let mut bad_name = good.clone();
    bad_name["name"] = json!("Oslo Model!");
    let mut old_schema = good.clone();
    old_schema["schema"] = json!("onkos.manifest/1");
    let cases: Vec<(&str, Value, Vec<u8>)> = vec![
        (
            "an unloadable ONNX file",
            with_sha(good.clone(), &garbage),
            garbage.clone(),
        ),
        ("an input the graph lacks", wrong_input, onnx.clone()),
        (
            "more labels than the graph has outputs",
            three_labels,
            onnx.clone(),
        ),
        (
            "fewer encoded columns than the graph takes",
            narrower,
            onnx.clone(),
        ),
        ("a sha256 that is not the file's", wrong_sha, onnx.clone()),
        ("a name outside the alphabet", bad_name, onnx.clone()),
        ("an unknown manifest format", old_schema, onnx.clone()),
    ];
    for (what, manifest, bytes) in cases {
        let problem = assert_problem(register(&app, &admin, &manifest, bytes).await, 422).await;
        assert!(!problem["detail"].as_str().unwrap().is_empty(), "{what}");
    }
    let not_json = Form::new()
        .text("manifest", "{not json")
        .part("onnx", Part::bytes(onnx.clone()));
    let response = app
        .client
        .post(format!("{}/v1/models", app.base))
        .bearer_auth(&admin)
        .multipart(not_json)
        .send()
        .await
        .unwrap();
    assert_problem(response, 422).await;
    let no_onnx = Form::new().text("manifest", serde_json::to_string(&good).unwrap());
    let response = app
        .client
        .post(format!("{}/v1/models", app.base))
        .bearer_auth(&admin)
        .multipart(no_onnx)
        .send()
        .await
        .unwrap();
    assert_problem(response, 422).await;
    assert_problem(
        register(&app, &app.token("oslo", "submitter"), &good, onnx.clone()).await,
        403,
    )
    .await;
    assert_eq!(app.rows("models").await, bundled_rows, "nothing stored");

    let (mut bundled_name, _) = gb_files();
    bundled_name["version"] = json!("7.0.0");
    assert_problem(
        register(&app, &admin, &bundled_name, onnx.clone()).await,
        409,
    )
    .await;
    assert_eq!(
        register(&app, &admin, &good, onnx.clone()).await.status(),
        201
    );
    assert_problem(register(&app, &admin, &good, onnx).await, 409).await;
}

#[tokio::test]
async fn a_retired_version_is_not_used_for_new_analyses_but_its_queue_still_runs() {
    let app = TestApp::spawn().await;
    let admin = app.token("oslo", "admin");
    for version in ["1.0.0", "1.1.0"] {
        let (manifest, onnx) = own_model(version);
        assert_eq!(register(&app, &admin, &manifest, onnx).await.status(), 201);
    }
    assert_eq!(
        post(
            &app,
            &admin,
            "/v1/models/oslo-fna-gb/versions/1.0.0/activate"
        )
        .await
        .status(),
        200
    );
    let queued_on_old = app.submit_to(&admin, &case("oslo-fna-gb")).await;
    let switched: Value = post(
        &app,
        &admin,
        "/v1/models/oslo-fna-gb/versions/1.1.0/activate",
    )
    .await
    .json()
    .await
    .unwrap();
    let states: Vec<(String, String)> = switched["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["version"].as_str().unwrap().into(),
                v["state"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert!(
        states.contains(&("1.0.0".into(), "retired".into()))
            && states.contains(&("1.1.0".into(), "active".into())),
        "{states:?}"
    );
    let on_new = app.submit_to(&admin, &case("oslo-fna-gb")).await;
    app.drain().await;
    let version = |id: String| {
        let app = &app;
        let admin = &admin;
        async move {
            app.get(&format!("/v1/analyses/{id}"), admin)
                .await
                .json::<Value>()
                .await
                .unwrap()["model"]["version"]
                .clone()
        }
    };
    assert_eq!(version(queued_on_old).await, "1.0.0");
    assert_eq!(version(on_new).await, "1.1.0");

    assert_eq!(
        post(&app, &admin, "/v1/models/oslo-fna-gb/versions/1.1.0/retire")
            .await
            .status(),
        200
    );
    assert_problem(
        app.post_json("/v1/analyses", &admin, &case("oslo-fna-gb"))
            .await,
        422,
    )
    .await;
    assert_problem(
        post(
            &app,
            &admin,
            &format!("/v1/models/{GB}/versions/1.0.0/retire"),
        )
        .await,
        403,
    )
    .await;
}
