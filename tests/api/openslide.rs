//! The breadth path: slides onkos's tile reader does not read (here NDPI's striped levels) are read
//! by OpenSlide in child processes. Pixel agreement with the fast path where both read, an NDPI
//! analysis end to end, and a crash in OpenSlide's process that costs one read, not the caller.

use crate::helpers::{TestApp, repo_path};
use crate::slides::{STAIN, fixture, uploaded};
use onkos::slides::SlideError;
use onkos::slides::openslide::{OpenSlideSlide, set_reader_program};
use onkos::slides::read::TiledSlide;
use onkos::slides::slide::Slide;
use serde_json::Value;
use std::path::PathBuf;

fn slide_path(name: &str) -> PathBuf {
    repo_path(&format!("tests/fixtures/slides/{name}"))
}

fn reader() {
    set_reader_program(PathBuf::from(env!("CARGO_BIN_EXE_onkos")));
}

/// Largest and mean absolute difference between two RGB buffers.
fn difference(a: &[u8], b: &[u8]) -> (u8, f64) {
    assert_eq!(a.len(), b.len());
    let max = a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
    let sum: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(x.abs_diff(*y)))
        .sum();
    (max, sum / a.len() as f64)
}

#[test]
fn openslide_and_the_fast_path_agree_pixel_for_pixel_where_both_read() {
    reader();
    // (file, level, x, y, width, height): tile borders crossed, edges reached, the outside white.
    let regions: &[(&str, usize, u32, u32, u32, u32)] = &[
        ("aperio-cmu1-small-region.svs", 0, 0, 0, 240, 240),
        ("aperio-cmu1-small-region.svs", 0, 230, 470, 300, 130),
        ("aperio-cmu1-small-region.svs", 0, 1000, 1500, 512, 512),
        ("aperio-cmu1-small-region.svs", 0, 2100, 2900, 200, 120),
        ("generic-boxes.tiff", 0, 0, 0, 300, 250),
        ("generic-boxes.tiff", 0, 17, 33, 200, 190),
        ("generic-boxes.tiff", 1, 0, 0, 150, 125),
        ("generic-boxes.tiff", 1, 40, 50, 120, 100),
    ];
    for &(file, level, x, y, width, height) in regions {
        let fast = TiledSlide::open(&slide_path(file)).unwrap();
        let broad = OpenSlideSlide::open(&slide_path(file), 1).unwrap();
        let ours = fast.region(level, x, y, width, height).unwrap();
        let theirs = broad.region(level, x, y, width, height).unwrap();
        let (max, mean) = difference(&ours.pixels, &theirs);
        // JPEG decoders may round an IDCT coefficient differently by one level; nothing more.
        let allowed = if file.ends_with(".svs") { 1 } else { 0 };
        assert!(
            max <= allowed && mean < 0.05,
            "{file} level {level} ({x}, {y}) {width}x{height}: max {max}, mean {mean}"
        );
    }
    // Both also agree with what OpenSlide 4.0.1 read (the committed reference regions).
    let dir = repo_path("tests/fixtures/slides/openslide");
    let index: Value =
        serde_json::from_slice(&std::fs::read(dir.join("regions.json")).unwrap()).unwrap();
    for region in index["regions"].as_array().unwrap() {
        let file = region["slide"].as_str().unwrap();
        let n = |k: &str| u32::try_from(region[k].as_u64().unwrap()).unwrap();
        let broad = OpenSlideSlide::open(&slide_path(file), 1).unwrap();
        let ours = broad
            .region(n("level") as usize, n("x"), n("y"), n("width"), n("height"))
            .unwrap();
        let reference = image::open(dir.join(region["png"].as_str().unwrap()))
            .unwrap()
            .to_rgb8();
        let (max, mean) = difference(&ours, reference.as_raw());
        assert!(max <= 1 && mean < 0.05, "{region}: max {max}, mean {mean}");
    }
}

#[test]
fn slides_the_fast_path_cannot_read_open_through_openslide_and_others_are_refused() {
    reader();
    let svs = Slide::open(&slide_path("aperio-cmu1-small-region.svs"), 1).unwrap();
    assert_eq!(svs.reader(), "onkos-tiff");
    let ndpi = Slide::open(&slide_path("hamamatsu-fluorescence-dapi.ndpi"), 2).unwrap();
    assert!(ndpi.reader().starts_with("openslide-"), "{}", ndpi.reader());
    assert_eq!((ndpi.levels[0].width, ndpi.levels[0].height), (3968, 4864));
    assert!(ndpi.levels.len() > 1);
    // A region read through two reader processes, twice, is the same.
    let a = ndpi.region(0, 1000, 1000, 300, 300).unwrap();
    let b = ndpi.region(0, 1000, 1000, 300, 300).unwrap();
    assert_eq!(a, b);
    assert!(
        a.pixels.iter().any(|&v| v != 255),
        "the region is all background"
    );
    // What neither reader knows is refused with OpenSlide's reason.
    let pdf = std::env::temp_dir().join(format!("onkos-not-a-slide-{}.pdf", std::process::id()));
    std::fs::write(&pdf, b"%PDF-1.7 not a slide").unwrap();
    let refused = Slide::open(&pdf, 1);
    std::fs::remove_file(&pdf).unwrap();
    match refused {
        Err(SlideError::Unsupported(why)) => assert!(why.contains("OpenSlide"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_crash_in_openslides_process_fails_that_read_with_the_reason_and_the_caller_lives_on() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    reader();
    let path = slide_path("hamamatsu-fluorescence-dapi.ndpi");
    let slide = OpenSlideSlide::open(&path, 1).unwrap();
    assert!(slide.region(0, 0, 0, 64, 64).is_ok());
    // The C library dies in the middle of the work (as glib's abort on a failed assertion or
    // allocation would end it).
    let pid = slide.reader_pids()[0];
    kill(Pid::from_raw(i32::try_from(pid).unwrap()), Signal::SIGABRT).unwrap();
    let error = slide
        .region(0, 100, 100, 64, 64)
        .map(|pixels| pixels.len())
        .unwrap_err()
        .to_string();
    assert!(error.contains("signal 6"), "{error}");
    assert!(error.contains("contained"), "{error}");
    // Later reads of that slide fail too, without waiting; a new reader reads it again.
    assert!(slide.region(0, 0, 0, 64, 64).is_err());
    let again = OpenSlideSlide::open(&path, 1).unwrap();
    assert_eq!(again.region(0, 0, 0, 64, 64).unwrap().len(), 64 * 64 * 3);
}

#[tokio::test]
async fn an_ndpi_slide_is_analysed_end_to_end_through_openslide() {
    let app = TestApp::spawn_with(|c| c.slide_batch_tiles = 32).await;
    let token = app.token("oslo", "submitter");
    let slide = uploaded(&app, &token, "hamamatsu-fluorescence-dapi.ndpi").await;
    let body = serde_json::json!({"model": STAIN, "slide": slide});
    let id = app.submit_to(&token, &body).await;
    assert_eq!(app.step().await, 1);
    let analysis: Value = app.get_json(&format!("/v1/analyses/{id}"), &token).await;
    assert_eq!(analysis["status"], "succeeded", "{analysis}");
    let summary = &analysis["result"]["slide"];
    assert!(
        summary["reader"]
            .as_str()
            .unwrap()
            .starts_with("openslide-"),
        "{summary}"
    );
    // 3968 x 4864 at 0.228 µm/pixel, in tiles of 224 pixels at 0.5 µm: 491 level-0 pixels each.
    let tile0 = summary["tile_size_level0"].as_f64().unwrap();
    let mpp = summary["mpp_used"].as_f64().unwrap();
    assert!((mpp - 0.228_175).abs() < 1e-5, "{summary}");
    assert!((tile0 - 224.0 * 0.5 / mpp).abs() < 1e-9);
    let across = (3968.0 / tile0).floor() as u64;
    let down = (4864.0 / tile0).floor() as u64;
    assert_eq!(summary["tiles_in_grid"].as_u64().unwrap(), across * down);
    // Read from the level of 2 (0.456 µm/pixel), the coarsest at least as fine as 0.5.
    assert_eq!(summary["level_used"], 1, "{summary}");
    assert!(summary["tiles_analysed"].as_u64().unwrap() > 0, "{summary}");
    // Its pictures come through the same reader.
    for path in [
        format!("/v1/slides/{slide}/thumbnail"),
        format!("/v1/analyses/{id}/heatmap.png"),
        format!("/v1/analyses/{id}/evidence/1.jpg"),
    ] {
        let response = app.get(&path, &token).await;
        assert_eq!(response.status(), 200, "{path}");
        image::load_from_memory(&response.bytes().await.unwrap()).unwrap();
    }
}

#[tokio::test]
async fn a_damaged_ndpi_fails_its_analysis_with_the_reason_and_the_worker_lives_on() {
    let app = TestApp::spawn_with(|c| c.worker_max_attempts = 1).await;
    let token = app.token("oslo", "submitter");
    let slide = uploaded(&app, &token, "hamamatsu-fluorescence-dapi.ndpi").await;
    // After the upload, the image data of level 1 (the level the tiles are read from; bytes
    // 2 068 207 to 2 863 144 of the file) is overwritten with zeros. The directories and the
    // coarser levels the tissue mask is made from stay readable.
    let blob = app.config.data_dir.join("blobs/slides").join(&slide);
    let mut bytes = fixture("hamamatsu-fluorescence-dapi.ndpi");
    bytes[2_100_000..2_800_000].fill(0);
    std::fs::write(&blob, &bytes).unwrap();
    let id = app
        .submit_to(&token, &serde_json::json!({"model": STAIN, "slide": slide}))
        .await;
    assert_eq!(app.step().await, 1);
    let analysis = app.get_json(&format!("/v1/analyses/{id}"), &token).await;
    assert_eq!(analysis["status"], "failed", "{analysis}");
    let error = analysis["error"].as_str().unwrap();
    assert!(
        error.contains("OpenSlide") && error.contains("Restart marker"),
        "{error}"
    );
    let features = crate::helpers::reference_rows()[0]["features"].clone();
    app.submit(&token, &features).await;
    assert_eq!(app.step().await, 1);
}

#[test]
fn a_reader_that_hangs_is_killed_and_the_read_fails_with_the_reason() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    reader();
    let path = slide_path("hamamatsu-fluorescence-dapi.ndpi");
    let slide = OpenSlideSlide::open_with(&path, 1, std::time::Duration::from_secs(3)).unwrap();
    // The C library stops making progress (here: the process is frozen).
    let pid = slide.reader_pids()[0];
    kill(Pid::from_raw(i32::try_from(pid).unwrap()), Signal::SIGSTOP).unwrap();
    let started = std::time::Instant::now();
    let error = slide
        .region(0, 0, 0, 64, 64)
        .map(|pixels| pixels.len())
        .unwrap_err()
        .to_string();
    assert!(error.contains("signal 9"), "{error}");
    // Ended by the watchdog, not waited on forever.
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
}
