//! DICOM WSI on the fast path: frames read straight from the file like TIFF tiles. The fixtures
//! (`tests/fixtures/slides/dicom/`, made by its `make_dicom.py`) are the Aperio SVS fixture
//! converted with wsidicomizer (its JPEG tiles copied as they are) plus a second, uncompressed
//! level and a thumbnail of the same series.

use crate::helpers::{TestApp, assert_problem, repo_path, zipped};
use crate::slides::{STAIN, fixture};
use onkos::slides::read::TiledSlide;
use serde_json::Value;
use std::path::PathBuf;

fn dicom(name: &str) -> PathBuf {
    repo_path(&format!("tests/fixtures/slides/dicom/{name}"))
}

#[test]
fn a_dicom_wsi_reads_pixel_for_pixel_like_the_svs_it_was_converted_from() {
    let svs = TiledSlide::open(&repo_path(
        "tests/fixtures/slides/aperio-cmu1-small-region.svs",
    ))
    .unwrap();
    // The thumbnail is left out of the pyramid; the uncompressed level is level 1, 4x smaller.
    let slide = TiledSlide::open_dicom(&[
        dicom("cmu1-thumbnail.dcm"),
        dicom("cmu1-level1-native.dcm"),
        dicom("cmu1-level0.dcm"),
    ])
    .unwrap();
    assert_eq!(slide.levels.len(), 2);
    assert_eq!(
        (slide.levels[0].width, slide.levels[0].height),
        (2220, 2967)
    );
    assert_eq!((slide.levels[1].width, slide.levels[1].height), (555, 741));
    assert!((slide.levels[1].downsample - 4.0).abs() < 1e-9);
    // Level 0: the same JPEG bytes through the same decoder, so exactly the same pixels, across
    // tile borders and past the edges.
    for (x, y, w, h) in [
        (0, 0, 240, 240),
        (230, 470, 300, 130),
        (1000, 1500, 512, 512),
        (2100, 2900, 200, 120),
    ] {
        assert_eq!(
            slide.region(0, x, y, w, h).unwrap(),
            svs.region(0, x, y, w, h).unwrap(),
            "({x}, {y}) {w}x{h}"
        );
    }
    // Level 1 (uncompressed frames) is level 0 averaged over 4 x 4 blocks: a misplaced frame would
    // differ by far more than rounding.
    let coarse = slide.region(1, 0, 0, 555, 741).unwrap();
    let fine = svs.region(0, 0, 0, 2220, 2964).unwrap();
    let mut worst = 0.0_f64;
    for (y, x) in [(0, 0), (100, 300), (400, 200), (740, 554), (370, 277)] {
        for c in 0..3 {
            let mut sum = 0.0;
            for dy in 0..4 {
                for dx in 0..4 {
                    sum += f64::from(
                        fine.pixels[(((y * 4 + dy) * 2220 + x * 4 + dx) * 3 + c) as usize],
                    );
                }
            }
            let got = f64::from(coarse.pixels[((y * 555 + x) * 3 + c) as usize]);
            worst = worst.max((got - sum / 16.0).abs());
        }
    }
    assert!(worst <= 0.5 + 1e-9, "largest difference {worst}");
}

#[tokio::test]
async fn a_dicom_wsi_is_uploaded_and_analysed_with_the_same_result_as_its_svs() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    let upload = |bytes: Vec<u8>| {
        let app = &app;
        let token = &token;
        async move {
            let response = app
                .client
                .post(format!("{}/v1/slides?filename=cmu1.dcm", app.base))
                .bearer_auth(token)
                .header("content-type", "application/octet-stream")
                .body(bytes)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 201);
            response.json::<Value>().await.unwrap()
        }
    };
    let dcm = upload(std::fs::read(dicom("cmu1-level0.dcm")).unwrap()).await;
    assert_eq!(dcm["format"], "dicom-wsi");
    assert_eq!(
        (dcm["width"].as_u64(), dcm["height"].as_u64()),
        (Some(2220), Some(2967))
    );
    assert_eq!(dcm["levels"][0]["tile_width"], 240);
    assert!(
        (dcm["mpp_x"].as_f64().unwrap() - 0.499).abs() < 1e-9,
        "{dcm}"
    );
    let svs = upload(fixture("aperio-cmu1-small-region.svs")).await;

    let mut results = Vec::new();
    for slide in [&dcm["id"], &svs["id"]] {
        let id = app
            .submit_to(&token, &serde_json::json!({"model": STAIN, "slide": slide}))
            .await;
        assert_eq!(app.step().await, 1);
        let analysis = app.get_json(&format!("/v1/analyses/{id}"), &token).await;
        assert_eq!(analysis["status"], "succeeded", "{analysis}");
        results.push(analysis["result"].clone());
    }
    assert_eq!(results[0]["slide"]["reader"], "onkos-dicom");
    assert_eq!(results[1]["slide"]["reader"], "onkos-tiff");
    // The same pixels, grid and model: the same tiles and measurements.
    for key in [
        "tiles_analysed",
        "tiles_in_grid",
        "tissue_fraction",
        "level_used",
    ] {
        assert_eq!(results[0]["slide"][key], results[1]["slide"][key], "{key}");
    }
    assert_eq!(results[0]["measurements"], results[1]["measurements"]);
    let thumbnail = app
        .get(
            &format!("/v1/slides/{}/thumbnail", dcm["id"].as_str().unwrap()),
            &token,
        )
        .await;
    assert_eq!(thumbnail.status(), 200);
}

#[tokio::test]
async fn dicom_files_that_are_not_readable_slides_are_refused_with_the_reason() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    let send = |bytes: Vec<u8>| post_slide(&app, &token, bytes);
    // A thumbnail instance alone is not a slide.
    let problem = assert_problem(
        send(std::fs::read(dicom("cmu1-thumbnail.dcm")).unwrap()).await,
        422,
    )
    .await;
    assert!(problem.to_string().contains("no VOLUME image"), "{problem}");
    // Truncated: its frames run past the end of the file.
    let mut truncated = std::fs::read(dicom("cmu1-level0.dcm")).unwrap();
    truncated.truncate(truncated.len() / 2);
    let problem = assert_problem(send(truncated).await, 422).await;
    assert!(problem.to_string().contains("truncated"), "{problem}");
    // A WSI without the attributes the standard requires.
    let problem = assert_problem(
        send(fixture("dicom-nonconformant-single-frame-set.dcm")).await,
        422,
    )
    .await;
    assert!(problem.to_string().contains("no Image Type"), "{problem}");
    // A DICOM file of another kind (the WSI header with another SOP class) is not a slide.
    let mut other = std::fs::read(dicom("cmu1-thumbnail.dcm")).unwrap();
    let wsi = b"1.2.840.10008.5.1.4.1.1.77.1.6";
    while let Some(at) = other.windows(wsi.len()).position(|w| w == wsi) {
        other[at..at + wsi.len()].copy_from_slice(b"1.2.840.10008.5.1.4.1.1.77.1.4");
    }
    let problem = assert_problem(send(other).await, 415).await;
    assert!(
        problem.to_string().contains("not a VL Whole Slide"),
        "{problem}"
    );
    assert_eq!(app.rows("slides").await, 0);
}

async fn post_slide(app: &TestApp, token: &str, bytes: Vec<u8>) -> reqwest::Response {
    app.client
        .post(format!("{}/v1/slides?filename=series.zip", app.base))
        .bearer_auth(token)
        .header("content-type", "application/octet-stream")
        .body(bytes)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_dicom_series_uploaded_as_a_zip_is_one_slide_with_its_pyramid() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    let series = zipped(&[
        (
            "series/thumb.dcm",
            std::fs::read(dicom("cmu1-thumbnail.dcm")).unwrap(),
        ),
        (
            "series/level1.dcm",
            std::fs::read(dicom("cmu1-level1-native.dcm")).unwrap(),
        ),
        (
            "series/level0.dcm",
            std::fs::read(dicom("cmu1-level0.dcm")).unwrap(),
        ),
    ]);
    let response = post_slide(&app, &token, series).await;
    assert_eq!(response.status(), 201);
    let slide: Value = response.json().await.unwrap();
    assert_eq!(slide["format"], "dicom-wsi");
    let levels = slide["levels"].as_array().unwrap();
    assert_eq!(levels.len(), 2, "{slide}");
    assert_eq!(
        (
            levels[1]["width"].as_u64(),
            levels[1]["downsample"].as_f64()
        ),
        (Some(555), Some(4.0))
    );
    let id = app
        .submit_to(
            &token,
            &serde_json::json!({"model": STAIN, "slide": slide["id"]}),
        )
        .await;
    assert_eq!(app.step().await, 1);
    let analysis = app.get_json(&format!("/v1/analyses/{id}"), &token).await;
    assert_eq!(analysis["status"], "succeeded", "{analysis}");
    assert_eq!(analysis["result"]["slide"]["reader"], "onkos-dicom");
    let heatmap = app
        .get(&format!("/v1/analyses/{id}/heatmap.png"), &token)
        .await;
    assert_eq!(heatmap.status(), 200);
    // Nothing is left in staging.
    let staged = std::fs::read_dir(app.config.data_dir.join("blobs/staging"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(staged, 0);
}

#[tokio::test]
async fn archives_that_are_not_slides_or_are_bombs_are_refused_and_nothing_is_kept() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    // 200 MB of zeros deflate to a fraction of a megabyte: far past 50x the archive.
    let bomb = zipped(&[("level0.dcm", vec![0_u8; 200 << 20])]);
    assert!(bomb.len() < 1 << 20);
    let problem = assert_problem(post_slide(&app, &token, bomb).await, 422).await;
    assert!(
        problem.to_string().contains("expands to more than"),
        "{problem}"
    );
    let escape = zipped(&[(
        "../../outside.dcm",
        std::fs::read(dicom("cmu1-level0.dcm")).unwrap(),
    )]);
    let problem = assert_problem(post_slide(&app, &token, escape).await, 422).await;
    assert!(problem.to_string().contains("unsafe path"), "{problem}");
    let notes = zipped(&[("notes.txt", b"not a slide".to_vec())]);
    let problem = assert_problem(post_slide(&app, &token, notes).await, 415).await;
    assert!(
        problem
            .to_string()
            .contains("neither DICOM files nor a MIRAX"),
        "{problem}"
    );
    // A MIRAX slide goes to OpenSlide, which refuses this one with its reason.
    let mirax = zipped(&[
        ("case.mrxs", b"[GENERAL]\nnot really".to_vec()),
        ("case/Slidedat.ini", b"[GENERAL]\n".to_vec()),
    ]);
    let problem = post_slide(&app, &token, mirax).await;
    assert!(matches!(problem.status().as_u16(), 415 | 422));
    let problem: Value = problem.json().await.unwrap();
    assert!(problem.to_string().contains("OpenSlide"), "{problem}");
    let broken = b"PK\x03\x04 a truncated zip".to_vec();
    let problem = assert_problem(post_slide(&app, &token, broken).await, 422).await;
    assert!(problem.to_string().contains("zip"), "{problem}");
    assert_eq!(app.rows("slides").await, 0);
    let staging = app.config.data_dir.join("blobs/staging");
    let left: Vec<_> = std::fs::read_dir(&staging)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
    assert!(!app.config.data_dir.join("blobs/outside.dcm").exists());
}

/// The DICOM fixture with one element's value bytes replaced (the element found by its tag, group
/// and element little-endian, explicit VR).
fn with_value(bytes: &[u8], tag: [u8; 4], value: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    let at = out.windows(4).position(|w| w == tag).unwrap();
    out[at + 8..at + 8 + value.len()].copy_from_slice(value);
    out
}

#[tokio::test]
async fn hostile_dicom_headers_are_refused_without_harm() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    let level0 = std::fs::read(dicom("cmu1-level0.dcm")).unwrap();
    // A billion-pixel-wide matrix in a 1.3 MB file: refused before anything is allocated for it.
    let wide = with_value(
        &level0,
        [0x48, 0x00, 0x06, 0x00],
        &1_000_000_000_u32.to_le_bytes(),
    );
    let problem = assert_problem(post_slide(&app, &token, wide).await, 422).await;
    assert!(
        problem.to_string().contains("do not fit the file"),
        "{problem}"
    );
    // Sequences nested 5 000 deep right after the file meta group: refused before dicom-rs
    // recurses into them.
    let meta_len = u32::from_le_bytes(level0[140..144].try_into().unwrap()) as usize;
    let start = 144 + meta_len;
    let mut nested = level0[..start].to_vec();
    for _ in 0..5000 {
        nested.extend_from_slice(&[
            0x07, 0x00, 0x10, 0x00, b'S', b'Q', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
        ]);
        nested.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
    }
    for _ in 0..5000 {
        nested.extend_from_slice(&[0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
        nested.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
    }
    nested.extend_from_slice(&level0[start..]);
    let problem = assert_problem(post_slide(&app, &token, nested).await, 422).await;
    assert!(
        problem.to_string().contains("nested more than"),
        "{problem}"
    );
    // The API is still there.
    assert_eq!(app.get("/healthz", &token).await.status(), 200);
    assert_eq!(app.rows("slides").await, 0);
}
