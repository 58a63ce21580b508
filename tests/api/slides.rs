//! Slide upload: streamed to the blob store, hashed, recognised and inspected from the real
//! fixture files (SVS, NDPI, generic TIFF); deduplicated per tenant; bad files refused with nothing
//! kept.

use crate::helpers::{TestApp, assert_problem, repo_path};
use serde_json::Value;

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(repo_path(&format!("tests/fixtures/slides/{name}"))).unwrap()
}

async fn upload(
    app: &TestApp,
    token: &str,
    bytes: Vec<u8>,
    content_type: &str,
) -> reqwest::Response {
    app.client
        .post(format!("{}/v1/slides?filename=case.svs", app.base))
        .bearer_auth(token)
        .header("content-type", content_type)
        .body(bytes)
        .send()
        .await
        .unwrap()
}

/// Files in the blob store's staging and slide folders.
fn stored_files(app: &TestApp) -> (usize, usize) {
    let count = |dir: &str| {
        std::fs::read_dir(app.config.data_dir.join("blobs").join(dir))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    (count("staging"), count("slides"))
}

#[tokio::test]
async fn each_fixture_format_is_read_with_its_pyramid_and_resolution() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    // (file, format, level-0 size, levels, tile width, µm/pixel)
    let cases = [
        (
            "aperio-cmu1-small-region.svs",
            "aperio-svs",
            (2220, 2967),
            1,
            Some(240_u32),
            Some(0.499),
        ),
        (
            "hamamatsu-fluorescence-dapi.ndpi",
            "hamamatsu-ndpi",
            (3968, 4864),
            4,
            None,
            Some(10_000.0 / 43_826.0),
        ),
        (
            "generic-boxes.tiff",
            "generic-tiff",
            (300, 250),
            4,
            Some(64),
            Some(10_000.0 / (14_861_707.0 / 524_288.0)),
        ),
    ];
    for (file, format, (width, height), levels, tile, mpp) in cases {
        let bytes = fixture(file);
        let size = bytes.len();
        let response = upload(&app, &token, bytes, "application/octet-stream").await;
        assert_eq!(response.status(), 201, "{file}");
        let location = response.headers()["location"].to_str().unwrap().to_owned();
        let slide: Value = response.json().await.unwrap();
        assert_eq!(slide["format"], format, "{file}: {slide}");
        assert_eq!(
            (slide["width"].as_i64(), slide["height"].as_i64()),
            (Some(width), Some(height)),
            "{file}"
        );
        assert_eq!(slide["size_bytes"], size);
        assert_eq!(slide["sha256"].as_str().unwrap().len(), 64);
        let pyramid = slide["levels"].as_array().unwrap();
        assert_eq!(pyramid.len(), levels, "{file}: {slide}");
        assert_eq!(
            pyramid[0]["tile_width"].as_u64(),
            tile.map(|t: u32| u64::from(t)),
            "{file}"
        );
        for pair in pyramid.windows(2) {
            assert!(pair[1]["downsample"].as_f64() > pair[0]["downsample"].as_f64());
        }
        match (slide["mpp_x"].as_f64(), mpp) {
            (Some(got), Some(want)) => {
                assert!((got - want).abs() < 1e-6, "{file}: {got} vs {want}")
            }
            (got, want) => assert_eq!(got, want, "{file}"),
        }
        let read: Value = app.get(&location, &token).await.json().await.unwrap();
        assert_eq!(read, slide);
    }
    assert_eq!(stored_files(&app), (0, 3));
    assert_eq!(app.rows("audit_events").await, 3, "every upload is audited");
    let svs: Value = app
        .get(
            &format!("/v1/slides/{}", "00000000-0000-0000-0000-000000000000"),
            &token,
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(svs["status"], 404);
}

#[tokio::test]
async fn the_same_bytes_are_one_slide_per_tenant() {
    let app = TestApp::spawn().await;
    let oslo = app.token("oslo", "submitter");
    let first = upload(
        &app,
        &oslo,
        fixture("generic-boxes.tiff"),
        "application/octet-stream",
    )
    .await;
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.unwrap();
    let again = upload(
        &app,
        &oslo,
        fixture("generic-boxes.tiff"),
        "application/octet-stream",
    )
    .await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.json::<Value>().await.unwrap()["id"], first["id"]);
    // Another tenant's upload of the same bytes is its own slide, and neither sees the other's.
    let bergen = app.token("bergen", "submitter");
    let theirs = upload(
        &app,
        &bergen,
        fixture("generic-boxes.tiff"),
        "application/octet-stream",
    )
    .await;
    assert_eq!(theirs.status(), 201);
    let theirs: Value = theirs.json().await.unwrap();
    assert_ne!(theirs["id"], first["id"]);
    let foreign = app
        .get(
            &format!("/v1/slides/{}", first["id"].as_str().unwrap()),
            &bergen,
        )
        .await;
    assert_problem(foreign, 404).await;
    assert_eq!(app.rows("slides").await, 2);
    assert_eq!(stored_files(&app), (0, 2));
}

#[tokio::test]
async fn files_that_are_not_readable_slides_are_refused_and_nothing_is_kept() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    let octet = "application/octet-stream";
    let problem = assert_problem(
        upload(&app, &token, b"%PDF-1.7 not a slide".to_vec(), octet).await,
        415,
    )
    .await;
    assert!(
        problem["detail"].as_str().unwrap().contains("not a slide"),
        "{problem}"
    );
    let dicom = fixture("dicom-nonconformant-single-frame-set.dcm");
    let problem = assert_problem(upload(&app, &token, dicom, octet).await, 415).await;
    assert!(
        problem["detail"].as_str().unwrap().contains("DICOM"),
        "{problem}"
    );
    // A truncated SVS: its directory chain points past the end of the file.
    let mut truncated = fixture("aperio-cmu1-small-region.svs");
    truncated.truncate(truncated.len() / 3);
    assert_problem(upload(&app, &token, truncated, octet).await, 422).await;
    // A TIFF that is a small picture, not a slide: one image in strips.
    let mut picture = std::io::Cursor::new(Vec::new());
    tiff::encoder::TiffEncoder::new(&mut picture)
        .unwrap()
        .write_image::<tiff::encoder::colortype::RGB8>(16, 16, &[128; 16 * 16 * 3])
        .unwrap();
    let problem =
        assert_problem(upload(&app, &token, picture.into_inner(), octet).await, 422).await;
    assert!(
        problem.to_string().contains("not a whole-slide image"),
        "{problem}"
    );
    assert_problem(upload(&app, &token, Vec::new(), octet).await, 422).await;
    // Declared as something else.
    let svs = fixture("aperio-cmu1-small-region.svs");
    assert_problem(upload(&app, &token, svs, "image/tiff").await, 415).await;
    // Clinicians read slides but do not upload them.
    let clinician = app.token("oslo", "clinician");
    assert_problem(
        upload(&app, &clinician, fixture("generic-boxes.tiff"), octet).await,
        403,
    )
    .await;
    assert_eq!(app.rows("slides").await, 0);
    assert_eq!(stored_files(&app), (0, 0));
}

#[tokio::test]
async fn an_upload_over_the_limit_is_refused_while_streaming() {
    let app = TestApp::spawn_with(|c| c.slide_upload_limit_bytes = 100_000).await;
    let token = app.token("oslo", "submitter");
    let svs = fixture("aperio-cmu1-small-region.svs");
    assert!(svs.len() > 100_000);
    let response = upload(&app, &token, svs, "application/octet-stream").await;
    assert_problem(response, 413).await;
    assert_eq!(app.rows("slides").await, 0);
    assert_eq!(stored_files(&app), (0, 0));
    let small = upload(
        &app,
        &token,
        fixture("generic-boxes.tiff"),
        "application/octet-stream",
    )
    .await;
    assert_eq!(small.status(), 201);
}

/// onkos's tile reader against OpenSlide 4.0.1 (`tests/fixtures/slides/openslide/`): regions that
/// cross tile borders and reach the edges, on the JPEG (SVS, RGB-encoded) and deflate (TIFF) paths.
#[test]
fn the_tile_reader_agrees_with_openslide_pixel_for_pixel() {
    use onkos::slides::read::TiffSlide;
    let dir = repo_path("tests/fixtures/slides/openslide");
    let index: Value =
        serde_json::from_slice(&std::fs::read(dir.join("regions.json")).unwrap()).unwrap();
    let regions = index["regions"].as_array().unwrap();
    assert_eq!(regions.len(), 7);
    for region in regions {
        let file = region["slide"].as_str().unwrap();
        let slide = TiffSlide::open(&repo_path(&format!("tests/fixtures/slides/{file}"))).unwrap();
        let n = |k: &str| u32::try_from(region[k].as_u64().unwrap()).unwrap();
        let ours = slide
            .region(n("level") as usize, n("x"), n("y"), n("width"), n("height"))
            .unwrap();
        let theirs = image::open(dir.join(region["png"].as_str().unwrap()))
            .unwrap()
            .to_rgb8();
        assert_eq!((ours.width, ours.height), theirs.dimensions());
        let deltas: Vec<u8> = ours
            .pixels
            .iter()
            .zip(theirs.as_raw())
            .map(|(a, b)| a.abs_diff(*b))
            .collect();
        let max = deltas.iter().copied().max().unwrap();
        let mean = deltas.iter().map(|&d| f64::from(d)).sum::<f64>() / deltas.len() as f64;
        // JPEG decoders may round an IDCT coefficient differently by one level; nothing more.
        let allowed = if file.ends_with(".svs") { 1 } else { 0 };
        assert!(
            max <= allowed && mean < 0.05,
            "{region}: max {max}, mean {mean}"
        );
    }
}

#[test]
fn a_slide_stored_in_strips_is_refused_by_the_tile_reader_with_the_reason() {
    let ndpi = repo_path("tests/fixtures/slides/hamamatsu-fluorescence-dapi.ndpi");
    let error = onkos::slides::read::TiffSlide::open(&ndpi).unwrap_err();
    assert!(error.to_string().contains("strips"), "{error}");
}

#[tokio::test]
async fn features_sent_to_the_slide_model_are_refused() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    let body = serde_json::json!({"model": "he-stain-quantification", "features": {}});
    let problem = assert_problem(app.post_json("/v1/analyses", &token, &body).await, 422).await;
    assert!(problem.to_string().contains("analyses slides"), "{problem}");
    assert_eq!(app.rows("analyses").await, 0);
}
