//! Slide upload: streamed to the blob store, hashed, recognised and inspected from the real
//! fixture files (SVS, NDPI, generic TIFF); deduplicated per tenant; bad files refused with nothing
//! kept.

use crate::helpers::{TestApp, assert_problem, repo_path};
use serde_json::Value;

pub fn fixture(name: &str) -> Vec<u8> {
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
            // The file says 72 dots per inch (a TIFF writer's default, 353 µm/pixel): no
            // microscope's resolution, so taken as unstated.
            None,
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
        let read: Value = app.get_json(&location, &token).await;
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
    let problem = assert_problem(upload(&app, &token, dicom, octet).await, 422).await;
    assert!(problem.to_string().contains("no Image Type"), "{problem}");
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
    use onkos::slides::read::TiledSlide;
    let dir = repo_path("tests/fixtures/slides/openslide");
    let index: Value =
        serde_json::from_slice(&std::fs::read(dir.join("regions.json")).unwrap()).unwrap();
    let regions = index["regions"].as_array().unwrap();
    assert_eq!(regions.len(), 7);
    for region in regions {
        let file = region["slide"].as_str().unwrap();
        let slide = TiledSlide::open(&repo_path(&format!("tests/fixtures/slides/{file}"))).unwrap();
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
    let error = onkos::slides::read::TiledSlide::open(&ndpi).unwrap_err();
    assert!(error.to_string().contains("strips"), "{error}");
}

#[tokio::test]
async fn features_sent_to_the_slide_model_are_refused() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    let body = serde_json::json!({"model": "he-stain-quantification", "features": {}});
    let problem = assert_problem(app.post_json("/v1/analyses", &token, &body).await, 422).await;
    assert!(
        problem
            .to_string()
            .contains("not a field of a slide analysis"),
        "{problem}"
    );
    // A CSV batch for it too.
    let csv = app
        .client
        .post(format!("{}/v1/analyses?model={STAIN}", app.base))
        .bearer_auth(&token)
        .header("content-type", "text/csv")
        .body("a,b\n1,2\n")
        .send()
        .await
        .unwrap();
    let problem = assert_problem(csv, 422).await;
    assert!(problem.to_string().contains("analyses slides"), "{problem}");
    assert_eq!(app.rows("analyses").await, 0);
}

pub const STAIN: &str = "he-stain-quantification";

/// The bundled stain model's arithmetic (its card and `build.py`), in f64, over interleaved RGB:
/// optical density per channel, Ruifrok & Johnston's H&E stain matrix inverted, negative
/// densities clipped; returns the tissue fraction (total OD above 0.15) and the mean haematoxylin
/// and eosin density over the tissue pixels.
fn colour_deconvolution(rgb: &[u8]) -> (f64, f64, f64) {
    let unit = |v: [f64; 3]| {
        let n = (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt();
        [v[0] / n, v[1] / n, v[2] / n]
    };
    let m = [
        unit([0.65, 0.70, 0.29]),
        unit([0.07, 0.99, 0.11]),
        unit([0.27, 0.57, 0.78]),
    ];
    // inv(m) by cofactors: inv[i][j] = cofactor[j][i] / det.
    let c = |i: usize, j: usize| {
        let (r0, r1) = ((i + 1) % 3, (i + 2) % 3);
        let (c0, c1) = ((j + 1) % 3, (j + 2) % 3);
        m[r0][c0] * m[r1][c1] - m[r0][c1] * m[r1][c0]
    };
    let det = m[0][0] * c(0, 0) + m[0][1] * c(0, 1) + m[0][2] * c(0, 2);
    let inv = |i: usize, j: usize| c(j, i) / det;
    let (mut tissue, mut h, mut e) = (0.0, 0.0, 0.0);
    let pixels = rgb.len() / 3;
    for px in rgb.chunks_exact(3) {
        let od = [0, 1, 2].map(|k| -((f64::from(px[k]) + 1.0) / 256.0).log10());
        if od.iter().sum::<f64>() > 0.15 {
            tissue += 1.0;
            // hed[s] = sum over channels c of inv(m)[c][s] * od[c]
            let stain = |s: usize| (0..3).map(|k| inv(k, s) * od[k]).sum::<f64>().max(0.0);
            h += stain(0);
            e += stain(1);
        }
    }
    let count = f64::max(tissue, 1.0);
    (tissue / pixels as f64, h / count, e / count)
}

pub async fn uploaded(app: &TestApp, token: &str, file: &str) -> String {
    let response = upload(app, token, fixture(file), "application/octet-stream").await;
    assert!(response.status().is_success());
    response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn an_svs_slide_is_analysed_end_to_end_with_its_tissue_tiles_and_stain_measures() {
    let app = TestApp::spawn_with(|c| c.slide_batch_tiles = 16).await;
    let token = app.token("oslo", "submitter");
    let slide = uploaded(&app, &token, "aperio-cmu1-small-region.svs").await;
    let body = serde_json::json!({"model": STAIN, "slide": slide});
    let id = app.submit_to(&token, &body).await;
    assert_eq!(app.step().await, 1);
    let analysis: Value = app.get_json(&format!("/v1/analyses/{id}"), &token).await;
    assert_eq!(analysis["status"], "succeeded", "{analysis}");
    let result = &analysis["result"];
    assert_eq!(result["schema"], "onkos.result.slide/1");
    let summary = &result["slide"];
    assert_eq!(summary["id"], slide.as_str());
    assert_eq!(summary["mpp_used"], 0.499);
    assert_eq!(summary["mpp_source"], "file");
    // 2220 x 2967 pixels at 0.499 µm/pixel in 224-pixel tiles of 0.5 µm: 9 x 13 whole tiles.
    let tile0 = summary["tile_size_level0"].as_f64().unwrap();
    assert!((tile0 - 224.0 * 0.5 / 0.499).abs() < 1e-9);
    assert_eq!(summary["tiles_in_grid"], 9 * 13);
    let analysed = summary["tiles_analysed"].as_u64().unwrap();
    let tissue = summary["tissue_fraction"].as_f64().unwrap();
    assert!(analysed > 10 && analysed < 117, "{summary}");
    assert!(tissue > 0.1 && tissue < 0.9, "{summary}");
    // H&E: both stains present in the tissue, haematoxylin and eosin densities of plausible size.
    for m in result["measurements"].as_array().unwrap() {
        let value = m["value"].as_f64().unwrap();
        assert!(value > 0.02 && value < 2.0, "{m}");
    }
    assert!(result["stages"]["infer_ms"].as_f64().unwrap() > 0.0);
    assert!(
        result["intended_use"]
            .as_str()
            .unwrap()
            .contains("not a diagnosis")
    );
    let (xs, scores): (Vec<i32>, Vec<f32>) =
        sqlx::query_as("select xs, scores from analysis_tiles where analysis_id = $1::text::uuid")
            .bind(&id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(xs.len() as u64, analysed);
    assert_eq!(scores.len() as u64, 2 * analysed);
    // Each tile's numbers are colour deconvolution of its pixels, recomputed here in f64 from the
    // same region (at 0.499 µm/pixel a 0.5 µm tile is 224 level-0 pixels: read as it is).
    let (ys, tissue_scores): (Vec<i32>, Vec<f32>) =
        sqlx::query_as("select ys, tissue from analysis_tiles where analysis_id = $1::text::uuid")
            .bind(&id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    let file = onkos::slides::read::TiledSlide::open(&repo_path(
        "tests/fixtures/slides/aperio-cmu1-small-region.svs",
    ))
    .unwrap();
    for t in (0..xs.len()).step_by(7) {
        let (x, y) = (u32::try_from(xs[t]).unwrap(), u32::try_from(ys[t]).unwrap());
        let rgb = file.region(0, x, y, 224, 224).unwrap();
        let (tissue, h, e) = colour_deconvolution(&rgb.pixels);
        let close = |got: f32, want: f64| (f64::from(got) - want).abs() < 1e-4;
        assert!(
            close(tissue_scores[t], tissue)
                && close(scores[2 * t], h)
                && close(scores[2 * t + 1], e),
            "tile {t} at ({x}, {y}): stored {} {} {}, recomputed {tissue} {h} {e}",
            tissue_scores[t],
            scores[2 * t],
            scores[2 * t + 1]
        );
    }

    // The tiles as QuPath-importable GeoJSON, in level-0 pixels.
    let geo = app
        .get(&format!("/v1/analyses/{id}/tiles.geojson"), &token)
        .await;
    assert_eq!(geo.status(), 200);
    assert_eq!(geo.headers()["content-type"], "application/geo+json");
    let geo: Value = geo.json().await.unwrap();
    assert_eq!(geo["type"], "FeatureCollection");
    let features = geo["features"].as_array().unwrap();
    assert_eq!(features.len() as u64, analysed);
    let ring = features[0]["geometry"]["coordinates"][0]
        .as_array()
        .unwrap();
    assert_eq!((ring.len(), &ring[0]), (5, &ring[4]));
    let side = ring[1][0].as_f64().unwrap() - ring[0][0].as_f64().unwrap();
    assert!((side - tile0).abs() < 1e-9);
    let measured = &features[0]["properties"]["measurements"];
    assert!(measured["haematoxylin_od"].is_number() && measured["tissue_fraction"].is_number());

    // The heatmap: the slide's overview (long side 1024) with a colour bar below it.
    let heat = app
        .get(&format!("/v1/analyses/{id}/heatmap.png"), &token)
        .await;
    assert_eq!(heat.status(), 200);
    assert_eq!(heat.headers()["x-onkos-heatmap-measure"], "haematoxylin_od");
    let low: f64 = heat.headers()["x-onkos-heatmap-min"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let high: f64 = heat.headers()["x-onkos-heatmap-max"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(low < high, "{low} {high}");
    let picture = image::load_from_memory(&heat.bytes().await.unwrap()).unwrap();
    assert_eq!((picture.width(), picture.height()), (766, 1024 + 34));
    let thumb = app
        .get(&format!("/v1/slides/{slide}/thumbnail"), &token)
        .await;
    assert_eq!(thumb.status(), 200);
    let thumb = image::load_from_memory(&thumb.bytes().await.unwrap()).unwrap();
    assert_eq!((thumb.width(), thumb.height()), (766, 1024));
    // The evidence: the highest-scoring tiles on the heatmap measure, each with its crop.
    let evidence = result["evidence"].as_array().unwrap();
    assert_eq!(evidence.len(), 8);
    assert_eq!(evidence[0]["rank"], 1);
    assert_eq!(evidence[0]["measure"], "haematoxylin_od");
    assert!(
        evidence
            .windows(2)
            .all(|w| w[0]["value"].as_f64() >= w[1]["value"].as_f64())
    );
    assert_eq!(evidence[0]["value"].as_f64().unwrap() as f32, high as f32);
    let crop = app
        .get(&format!("/v1/analyses/{id}/evidence/1.jpg"), &token)
        .await;
    assert_eq!(crop.status(), 200);
    assert_eq!(crop.headers()["content-type"], "image/jpeg");
    let crop = image::load_from_memory(&crop.bytes().await.unwrap()).unwrap();
    assert_eq!((crop.width(), crop.height()), (224, 224));
    assert_problem(
        app.get(&format!("/v1/analyses/{id}/evidence/9.jpg"), &token)
            .await,
        404,
    )
    .await;
    // Another tenant sees none of it.
    let bergen = app.token("bergen", "clinician");
    for path in ["heatmap.png", "tiles.geojson", "evidence/1.jpg"] {
        assert_problem(
            app.get(&format!("/v1/analyses/{id}/{path}"), &bergen).await,
            404,
        )
        .await;
    }
}

#[tokio::test]
async fn slide_analyses_are_refused_when_the_slide_cannot_be_read_at_the_models_resolution() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    let svs = uploaded(&app, &token, "aperio-cmu1-small-region.svs").await;
    let boxes = uploaded(&app, &token, "generic-boxes.tiff").await;
    let refused = |body: Value| {
        let app = &app;
        let token = &token;
        async move { assert_problem(app.post_json("/v1/analyses", token, &body).await, 422).await }
    };
    let p = refused(serde_json::json!({"model": STAIN, "slide": svs, "mpp": 0.25})).await;
    assert!(p.to_string().contains("contradicts"), "{p}");
    let p = refused(serde_json::json!({"model": STAIN, "slide": boxes})).await;
    assert!(p.to_string().contains("states no µm/pixel"), "{p}");
    let p = refused(serde_json::json!({"model": STAIN, "slide": boxes, "mpp": 2.0})).await;
    assert!(p.to_string().contains("or finer"), "{p}");
    let p = refused(serde_json::json!({"model": STAIN})).await;
    assert!(p.to_string().contains("slide is required"), "{p}");
    let p = refused(serde_json::json!({"model": STAIN, "slide": svs, "features": {}})).await;
    assert!(p.to_string().contains("features"), "{p}");
    // Another tenant's slide does not exist for this one.
    let bergen = app.token("bergen", "submitter");
    let body = serde_json::json!({"model": STAIN, "slide": svs});
    let p = assert_problem(app.post_json("/v1/analyses", &bergen, &body).await, 422).await;
    assert!(p.to_string().contains("no slide"), "{p}");
    assert_eq!(app.rows("analyses").await, 0);
}

#[tokio::test]
async fn a_slide_analysis_cancelled_while_it_runs_stops_at_the_next_tile_batch() {
    let app = TestApp::spawn_with(|c| c.slide_batch_tiles = 4).await;
    let token = app.token("oslo", "submitter");
    let slide = uploaded(&app, &token, "aperio-cmu1-small-region.svs").await;
    let id = app
        .submit_to(&token, &serde_json::json!({"model": STAIN, "slide": slide}))
        .await;
    let claimed = app.worker.claim().await.unwrap();
    assert_eq!(claimed.len(), 1);
    // Not finished: no pictures yet.
    assert_problem(
        app.get(&format!("/v1/analyses/{id}/heatmap.png"), &token)
            .await,
        409,
    )
    .await;
    let url = format!("{}/v1/analyses/{id}", app.base);
    let cancel = app.client.delete(&url).bearer_auth(&token).send().await;
    assert_eq!(cancel.unwrap().status(), 200);
    assert_eq!(app.worker.process(claimed).await.unwrap(), 0);
    let analysis: Value = app.get_json(&format!("/v1/analyses/{id}"), &token).await;
    assert_eq!(analysis["status"], "cancelled");
    assert_eq!(app.rows("analysis_tiles").await, 0);
    assert_eq!(app.rows("results").await, 0);
}

#[tokio::test]
async fn slide_jobs_are_claimed_one_at_a_time() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    let slide = uploaded(&app, &token, "aperio-cmu1-small-region.svs").await;
    for _ in 0..3 {
        app.submit_to(&token, &serde_json::json!({"model": STAIN, "slide": slide}))
            .await;
    }
    let worker = app.worker.another();
    assert_eq!(worker.claim().await.unwrap().len(), 1);
    assert_eq!(app.worker.another().claim().await.unwrap().len(), 1);
}

/// Peak resident memory of a process.
fn peak_rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

#[tokio::test]
async fn a_gigabyte_upload_streams_to_disk_without_growing_memory() {
    use tokio::io::AsyncBufReadExt;
    const MIB: u64 = 1 << 20;
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    // A real `onkos api` process on the test database (and the test's keys), so that its memory
    // is its own: the upload's cost is not hidden among other tests'.
    let mut api = tokio::process::Command::new(env!("CARGO_BIN_EXE_onkos"))
        .arg("api")
        .env("DATABASE_URL", &app.database_url)
        .env("ONKOS_DATA_DIR", &app.config.data_dir)
        .env("ONKOS_LISTEN", "127.0.0.1:0")
        .env("ONKOS_MODELS_DIR", repo_path("models"))
        .env("ONKOS_EXECUTION_PROVIDER", "cpu")
        .env("ORT_DYLIB_PATH", app.config.ort_dylib_path.clone().unwrap())
        .env("ONKOS_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = api.id().unwrap();
    let mut log = tokio::io::BufReader::new(api.stderr.take().unwrap()).lines();
    let base = loop {
        let line = log.next_line().await.unwrap().expect("onkos api exited");
        if let Some(addr) = line
            .split("addr=")
            .nth(1)
            .filter(|_| line.contains("listening"))
        {
            break format!("http://{}", addr.split_whitespace().next().unwrap());
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = log.next_line().await {} });
    // 1 GiB that starts like a TIFF but is not one: streamed, hashed, inspected, refused.
    let mut first = vec![0xAB_u8; MIB as usize];
    first[..4].copy_from_slice(b"II*\0");
    let (first, rest) = (
        bytes::Bytes::from(first),
        bytes::Bytes::from(vec![0xAB_u8; MIB as usize]),
    );
    let chunks = (0..1024)
        .map(move |i| Ok::<_, std::io::Error>(if i == 0 { first.clone() } else { rest.clone() }));
    let before = peak_rss_bytes(pid);
    let response = reqwest::Client::new()
        .post(format!("{base}/v1/slides"))
        .bearer_auth(&token)
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_problem(response, 422).await;
    let grown = peak_rss_bytes(pid).saturating_sub(before);
    assert!(grown < 64 * MIB, "peak memory grew by {} MiB", grown / MIB);
    assert_eq!(stored_files(&app), (0, 0));
    assert_eq!(app.rows("slides").await, 0);
    api.start_kill().unwrap();
    let _ = api.wait().await;
}

#[tokio::test]
async fn a_slide_damaged_after_upload_fails_its_analysis_with_the_reason_and_the_worker_lives_on() {
    let app = TestApp::spawn_with(|c| c.worker_max_attempts = 1).await;
    let token = app.token("oslo", "submitter");
    let slide = uploaded(&app, &token, "aperio-cmu1-small-region.svs").await;
    // The stored file loses its second half (a disk or copy error after the upload).
    let blob = app.config.data_dir.join("blobs/slides").join(&slide);
    let bytes = std::fs::read(&blob).unwrap();
    std::fs::write(&blob, &bytes[..bytes.len() / 2]).unwrap();
    let id = app
        .submit_to(&token, &serde_json::json!({"model": STAIN, "slide": slide}))
        .await;
    assert_eq!(app.step().await, 1);
    let analysis = app.get_json(&format!("/v1/analyses/{id}"), &token).await;
    assert_eq!(analysis["status"], "failed", "{analysis}");
    let error = analysis["error"].as_str().unwrap();
    assert!(error.contains("tile") || error.contains("TIFF"), "{error}");
    // The same worker goes on to the next analysis.
    let features = crate::helpers::reference_rows()[0]["features"].clone();
    app.submit(&token, &features).await;
    assert_eq!(app.step().await, 1);
}

#[tokio::test]
async fn a_running_slide_analysis_shows_the_progress_its_worker_records() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    let slide = uploaded(&app, &token, "aperio-cmu1-small-region.svs").await;
    let id = app
        .submit_to(&token, &serde_json::json!({"model": STAIN, "slide": slide}))
        .await;
    let claimed = app.worker.claim().await.unwrap();
    // What the worker writes after each tile batch (fenced on its lease).
    assert!(
        onkos::repo::jobs::progress(&app.pool, &claimed[0], app.worker.id(), 16, 51)
            .await
            .unwrap()
    );
    let running = app.get_json(&format!("/v1/analyses/{id}"), &token).await;
    assert_eq!(running["status"], "running");
    assert_eq!(
        running["progress"],
        serde_json::json!({"tiles_done": 16, "tiles_total": 51})
    );
    // Another worker's write is refused: it does not hold the job.
    let stranger = app.worker.another();
    assert!(
        !onkos::repo::jobs::progress(&app.pool, &claimed[0], stranger.id(), 50, 51)
            .await
            .unwrap()
    );
    assert_eq!(app.worker.process(claimed).await.unwrap(), 1);
    let done = app.get_json(&format!("/v1/analyses/{id}"), &token).await;
    assert_eq!(done["status"], "succeeded");
    assert!(
        done["progress"].is_null(),
        "progress is shown only while it runs"
    );
}

#[tokio::test]
async fn a_registered_tile_classifier_runs_over_a_slide_with_its_normalisation_and_columns() {
    let app = TestApp::spawn().await;
    app.register_fixture("oslo", "tiny-tile-cnn", "oslo-tile-classifier", "0.1.0")
        .await;

    let token = app.token("oslo", "submitter");
    let slide = uploaded(&app, &token, "aperio-cmu1-small-region.svs").await;
    let body = serde_json::json!({"model": "oslo-tile-classifier", "slide": slide});
    let id = app.submit_to(&token, &body).await;
    assert_eq!(app.step().await, 1);
    let analysis = app.get_json(&format!("/v1/analyses/{id}"), &token).await;
    assert_eq!(analysis["status"], "succeeded", "{analysis}");
    let result = &analysis["result"];
    // 1 µm/pixel tiles of 64 pixels: 128.3 level-0 pixels each, read at level 0 and resized.
    let tile0 = result["slide"]["tile_size_level0"].as_f64().unwrap();
    assert!((tile0 - 64.0 / 0.499).abs() < 1e-9);
    assert_eq!(result["slide"]["tiles_in_grid"], 17 * 23);
    let value = |name: &str| {
        result["measurements"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .unwrap()["value"]
            .as_f64()
            .unwrap()
    };
    // Columns of one softmax output: the two class means add up to 1.
    assert!((value("p_class_a") + value("p_class_b") - 1.0).abs() < 1e-5);
    assert!((0.0..=1.0).contains(&value("share_b")));
    assert_eq!(
        result["measurements"][2]["aggregation"]["kind"],
        "fraction_above"
    );
    // No tissue output: the GeoJSON states no tissue fraction.
    let geo = app
        .get_json(&format!("/v1/analyses/{id}/tiles.geojson"), &token)
        .await;
    let measured = &geo["features"][0]["properties"]["measurements"];
    assert!(measured["tissue_fraction"].is_null() && measured["p_class_b"].is_number());
}

#[tokio::test]
async fn a_model_that_stain_normalises_sees_every_tile_in_its_target_stains() {
    let app = TestApp::spawn().await;
    app.register_fixture("oslo", "tiny-tile-cnn", "oslo-tile-classifier", "0.1.0")
        .await;
    let dir = repo_path("tests/fixtures/models/tiny-tile-cnn");
    let mut manifest: Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    manifest["name"] = "oslo-tile-classifier-stained".into();
    manifest["slide"]["stain_normalise"] = serde_json::json!({"method": "macenko"});
    app.register_with(
        "oslo",
        "tiny-tile-cnn",
        &manifest,
        "oslo-tile-classifier-stained",
        "0.1.0",
    )
    .await;
    let token = app.token("oslo", "submitter");
    let slide = uploaded(&app, &token, "aperio-cmu1-small-region.svs").await;
    let mut results = Vec::new();
    for model in ["oslo-tile-classifier", "oslo-tile-classifier-stained"] {
        let id = app
            .submit_to(&token, &serde_json::json!({"model": model, "slide": slide}))
            .await;
        assert_eq!(app.step().await, 1);
        let analysis = app.get_json(&format!("/v1/analyses/{id}"), &token).await;
        assert_eq!(analysis["status"], "succeeded", "{analysis}");
        results.push(analysis["result"].clone());
    }
    assert!(results[0]["slide"].get("stain_normalisation").is_none());
    // The slide's own stains, estimated from its tissue: unit OD vectors, haematoxylin (more red
    // absorbed) first.
    let stain = &results[1]["slide"]["stain_normalisation"];
    assert_eq!(stain["method"], "macenko");
    assert!(stain["samples"].as_u64().unwrap() > 100, "{stain}");
    let vectors: Vec<Vec<f64>> = serde_json::from_value(stain["slide_stains"].clone()).unwrap();
    for v in &vectors {
        let norm: f64 = v.iter().map(|c| c * c).sum::<f64>().sqrt();
        assert!(
            (norm - 1.0).abs() < 1e-9 && v.iter().all(|c| *c >= 0.0),
            "{stain}"
        );
    }
    assert!(vectors[0][0] > vectors[1][0], "{stain}");
    // The same tiles, seen in other colours: other scores.
    assert_eq!(
        results[0]["slide"]["tiles_analysed"],
        results[1]["slide"]["tiles_analysed"]
    );
    assert_ne!(results[0]["measurements"], results[1]["measurements"]);

    // A method onkos does not implement is refused at registration.
    manifest["name"] = "oslo-tile-classifier-vahadane".into();
    manifest["slide"]["stain_normalise"] = serde_json::json!({"method": "vahadane"});
    let form = reqwest::multipart::Form::new()
        .part(
            "manifest",
            reqwest::multipart::Part::bytes(serde_json::to_vec(&manifest).unwrap())
                .file_name("manifest.json"),
        )
        .part(
            "onnx",
            reqwest::multipart::Part::bytes(std::fs::read(dir.join("model.onnx")).unwrap())
                .file_name("model.onnx"),
        )
        .text("card", "# Test fixture");
    let response = app
        .client
        .post(format!("{}/v1/models", app.base))
        .bearer_auth(app.token("oslo", "admin"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    let problem = assert_problem(response, 422).await;
    assert!(problem.to_string().contains("not macenko"), "{problem}");
}

#[tokio::test]
async fn a_generic_tiff_without_a_resolution_is_analysed_at_the_resolution_the_request_states() {
    let app = TestApp::spawn().await;
    app.register_fixture("oslo", "tiny-tile-cnn", "oslo-tile-classifier", "0.1.0")
        .await;
    let token = app.token("oslo", "submitter");
    let slide = uploaded(&app, &token, "generic-boxes.tiff").await;
    // The file states no µm/pixel: without one the request is refused, with one it runs.
    let body = serde_json::json!({"model": "oslo-tile-classifier", "slide": slide});
    let problem = assert_problem(app.post_json("/v1/analyses", &token, &body).await, 422).await;
    assert!(
        problem.to_string().contains("states no µm/pixel"),
        "{problem}"
    );
    let body = serde_json::json!({"model": "oslo-tile-classifier", "slide": slide, "mpp": 0.5});
    let id = app.submit_to(&token, &body).await;
    assert_eq!(app.step().await, 1);
    let analysis = app.get_json(&format!("/v1/analyses/{id}"), &token).await;
    assert_eq!(analysis["status"], "succeeded", "{analysis}");
    let summary = &analysis["result"]["slide"];
    assert_eq!(summary["mpp_source"], "request");
    assert_eq!(summary["reader"], "onkos-tiff");
    // 300 x 250 pixels at 0.5 µm/pixel in tiles of 64 pixels at 1 µm: 128 pixels a side, 2 x 1.
    assert_eq!(summary["tiles_in_grid"], 2);
    assert!(
        summary["tiles_analysed"].as_u64().unwrap() >= 1,
        "{summary}"
    );
}
