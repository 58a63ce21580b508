//! Hostile input: schemathesis against the served OpenAPI document, and a corpus of broken slides,
//! archives and request bodies. Each gets a clear 4xx problem, or, for a file that passes
//! inspection but cannot be analysed, a failed analysis with its reason; the process keeps serving.
//!
//! A binary of its own: schemathesis sends about a thousand requests, which should not share two
//! cores with the hundred integration tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../api/helpers.rs"]
#[allow(dead_code)]
mod helpers;

use helpers::{MODEL, TestApp, assert_problem, reference_rows, repo_path, zipped};
use serde_json::{Value, json};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

const STAIN: &str = "he-stain-quantification";
const OCTET: &str = "application/octet-stream";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_fault_in_the_served_api() {
    // Production settings where tests relax them: webhooks may not reach private addresses.
    let app = TestApp::spawn_with(|c| c.webhook_allow_private_networks = false).await;
    let token = app
        .keys
        .mint(
            &app.config.auth_issuer,
            &app.config.auth_audience,
            "schemathesis",
            "fuzz",
            &["submitter".into(), "clinician".into(), "admin".into()],
            Duration::from_secs(3600),
        )
        .unwrap();
    let st = std::env::var_os("SCHEMATHESIS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_path("target/st-venv/bin/st"));
    // Its reports and example database go to a folder of its own.
    let work = tempfile::tempdir().unwrap();
    let output = tokio::process::Command::new(&st)
        .current_dir(work.path())
        .arg("--config-file")
        .arg(repo_path("tests/schemathesis/schemathesis.toml"))
        .args(["run", &format!("{}/openapi.json", app.base)])
        .args(["-H", &format!("Authorization: Bearer {token}")])
        // Fixed, so that CI is repeatable; `make fuzz-api` runs it longer with fresh seeds.
        .args(["--seed", "20261130", "--generation-database", "none"])
        .arg("--no-color")
        .output()
        .await
        .unwrap_or_else(|e| panic!("{} (make test installs it): {e}", st.display()));
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "schemathesis:\n{report}");
    // Every operation of the document was exercised.
    let document: Value =
        serde_json::from_slice(&std::fs::read(repo_path("openapi/openapi.json")).unwrap()).unwrap();
    let operations: usize = document["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|item| item.as_object().unwrap().len())
        .sum();
    assert!(
        report.contains(&format!("Tested: {operations}")),
        "not every one of the {operations} operations was tested:\n{report}"
    );
    let health = app.client.get(format!("{}/healthz", app.base)).send().await;
    assert_eq!(health.unwrap().status(), 200);
}

/// A little-endian TIFF with one directory of `(tag, type, count, value)` entries (values that fit
/// in four bytes), followed by `tail`.
fn tiff(entries: &[(u16, u16, u32, u32)], next_directory: u32, tail: &[u8]) -> Vec<u8> {
    let mut out = b"II*\0".to_vec();
    out.extend(8u32.to_le_bytes());
    out.extend(u16::try_from(entries.len()).unwrap().to_le_bytes());
    for (tag, kind, count, value) in entries {
        out.extend(tag.to_le_bytes());
        out.extend(kind.to_le_bytes());
        out.extend(count.to_le_bytes());
        out.extend(value.to_le_bytes());
    }
    out.extend(next_directory.to_le_bytes());
    out.extend(tail);
    out
}

const SHORT: u16 = 3;
const LONG: u16 = 4;

/// A tiled JPEG RGB level of `width` × `height` with one tile of `tile` bytes at offset `at`.
fn tiled_level(width: u32, height: u32, at: u32, tile: u32) -> Vec<(u16, u16, u32, u32)> {
    vec![
        (256, LONG, 1, width),
        (257, LONG, 1, height),
        (258, SHORT, 1, 8),
        (259, SHORT, 1, 7),
        (262, SHORT, 1, 2),
        (277, SHORT, 1, 3),
        (322, SHORT, 1, 256),
        (323, SHORT, 1, 256),
        (324, LONG, 1, at),
        (325, LONG, 1, tile),
    ]
}

/// A MIRAX archive whose data file is 64 MiB of zeros: about 64 KiB compressed.
fn zip_bomb() -> Vec<u8> {
    let mut out = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .large_file(false);
    out.start_file("case.mrxs", options).unwrap();
    out.write_all(b"[GENERAL]\n").unwrap();
    out.start_file("case/Data0000.dat", options).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..64 {
        out.write_all(&zeros).unwrap();
    }
    out.finish().unwrap().into_inner()
}

/// Deterministic bytes that look like nothing.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

fn corpus() -> Vec<(String, Vec<u8>)> {
    let svs = std::fs::read(repo_path(
        "tests/fixtures/slides/aperio-cmu1-small-region.svs",
    ))
    .unwrap();
    let mut corpus: Vec<(String, Vec<u8>)> = [1, 10, 25, 50, 75, 90, 99]
        .iter()
        .map(|percent| {
            (
                format!("the SVS fixture cut at {percent}%"),
                svs[..svs.len() * percent / 100].to_vec(),
            )
        })
        .collect();
    let mut flipped = svs.clone();
    // Its first tile offsets and counts overwritten (the directory is at the end of this file).
    for byte in flipped.iter_mut().skip(svs.len() / 2).step_by(997) {
        *byte = !*byte;
    }
    corpus.push((
        "the SVS fixture with every 997th byte of its second half flipped".into(),
        flipped,
    ));
    let huge = tiled_level(u32::MAX, u32::MAX, 200, 10);
    let mut bogus: Vec<(String, Vec<u8>)> = vec![
        ("only the TIFF magic".into(), b"II*\0".to_vec()),
        (
            "a TIFF whose first directory is past the end".into(),
            [b"II*\0".as_slice(), &u32::MAX.to_le_bytes()].concat(),
        ),
        (
            "a big-endian TIFF whose directory is at 0".into(),
            b"MM\0*\0\0\0\0".to_vec(),
        ),
        (
            "a BigTIFF header followed by garbage".into(),
            [b"II+\0\x08\0\0\0".as_slice(), &[0xFF; 16]].concat(),
        ),
        (
            "a directory that names itself as the next".into(),
            tiff(&tiled_level(512, 512, 200, 10), 8, &[0; 64]),
        ),
        (
            "4294967295 x 4294967295 pixels declared, one tile stored".into(),
            tiff(&huge, 0, &[0; 64]),
        ),
        (
            "65535 directory entries declared, none stored".into(),
            [b"II*\0\x08\0\0\0\xFF\xFF".as_slice(), &[0; 32]].concat(),
        ),
        (
            "a tile whose byte count runs past the end of the file".into(),
            tiff(&tiled_level(256, 256, 200, u32::MAX - 1000), 0, &[0; 64]),
        ),
        ("a zip bomb as a MIRAX archive".into(), zip_bomb()),
        (
            "an archive entry whose path leaves its folder".into(),
            zipped(&[("../../escaped.mrxs", b"[GENERAL]\n".to_vec())]),
        ),
        (
            "a TIFF header in front of a zip".into(),
            [
                b"II*\0\x08\0\0\0".as_slice(),
                &zipped(&[("case.mrxs", b"x".to_vec())]),
            ]
            .concat(),
        ),
        (
            "a PDF with a TIFF inside".into(),
            [b"%PDF-1.7\n".as_slice(), &svs[..4096]].concat(),
        ),
        (
            "a DICOM preamble without its DICM marker".into(),
            [vec![0u8; 128], b"DICX".to_vec(), noise(1024, 7)].concat(),
        ),
        ("64 KiB of noise".into(), noise(64 << 10, 42)),
        (
            "libFuzzer's finding: a TIFF that panicked the tiff crate (an empty SampleFormat)"
                .into(),
            std::fs::read(repo_path(
                "tests/fuzz/corpus/tiff/finding-empty-sample-format.tiff",
            ))
            .unwrap(),
        ),
        (
            "libFuzzer's finding: a DICOM element with a non-standard VR (dicom-rs reserved 775 MB)"
                .into(),
            std::fs::read(repo_path(
                "tests/fuzz/corpus/dicom/finding-unknown-vr-length.dcm",
            ))
            .unwrap(),
        ),
        (
            "libFuzzer's finding: a DICOM US value of odd length (dicom-rs then misread a length)"
                .into(),
            std::fs::read(repo_path("tests/fuzz/corpus/dicom/finding-odd-us-length.dcm")).unwrap(),
        ),
    ];
    corpus.append(&mut bogus);
    corpus
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_slides_are_refused_or_fail_their_analysis_with_the_reason() {
    let app = TestApp::spawn_with(|c| c.worker_max_attempts = 1).await;
    let token = app.token("oslo", "submitter");
    let (mut refused, mut failed) = (0, 0);
    for (name, bytes) in corpus() {
        let response = app
            .client
            .post(format!("{}/v1/slides", app.base))
            .bearer_auth(&token)
            .header("content-type", OCTET)
            .body(bytes)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        if status != 201 {
            assert!(matches!(status, 415 | 422), "{name}: {status}");
            let problem = assert_problem(response, status).await;
            let detail = problem["detail"].as_str().unwrap();
            assert!(!detail.is_empty(), "{name}");
            eprintln!("{name}: {status} {detail}");
            refused += 1;
            continue;
        }
        // Inspection passed: the analysis must fail with a reason, not crash or hang.
        let slide: Value = response.json().await.unwrap();
        let submitted = app
            .post_json(
                "/v1/analyses",
                &token,
                &json!({"model": STAIN, "slide": slide["id"], "mpp": 0.5}),
            )
            .await;
        if submitted.status() == 422 {
            refused += 1;
            continue;
        }
        assert_eq!(submitted.status(), 202, "{name}");
        let id = submitted.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        app.drain().await;
        let analysis = app.get_json(&format!("/v1/analyses/{id}"), &token).await;
        assert_eq!(analysis["status"], "failed", "{name}: {analysis}");
        let error = analysis["error"].as_str().unwrap_or("");
        assert!(!error.is_empty(), "{name}: {analysis}");
        eprintln!("{name}: stored, analysis failed: {error}");
        failed += 1;
    }
    eprintln!("{refused} refused at upload or submission, {failed} failed their analysis");
    // The process is whole: a real slide still goes all the way through.
    let svs = std::fs::read(repo_path(
        "tests/fixtures/slides/aperio-cmu1-small-region.svs",
    ))
    .unwrap();
    let response = app
        .client
        .post(format!("{}/v1/slides", app.base))
        .bearer_auth(&token)
        .header("content-type", OCTET)
        .body(svs)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let slide: Value = response.json().await.unwrap();
    let id = app
        .submit_to(&token, &json!({"model": STAIN, "slide": slide["id"]}))
        .await;
    assert_eq!(app.step().await, 1);
    let analysis = app.get_json(&format!("/v1/analyses/{id}"), &token).await;
    assert_eq!(analysis["status"], "succeeded", "{analysis}");
    let staging = app.config.data_dir.join("blobs/staging");
    assert_eq!(std::fs::read_dir(staging).unwrap().count(), 0);
}

/// Submits `body` as `content_type`: it must be refused with a 4xx problem.
async fn refused(
    app: &TestApp,
    token: &str,
    query: &str,
    content_type: &str,
    name: &str,
    body: Vec<u8>,
) {
    let response = app
        .client
        .post(format!("{}/v1/analyses{query}", app.base))
        .bearer_auth(token)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    assert!(matches!(status, 400 | 413 | 422), "{name}: {status}");
    assert_problem(response, status).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_json_and_csv_bodies_get_a_clear_4xx_and_nothing_is_stored() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    let features = reference_rows()[0]["features"].clone();
    let with = |name: &str, value: Value| {
        let mut f = features.clone();
        f[name] = value;
        json!({"model": MODEL, "features": f})
    };
    let first = features.as_object().unwrap().keys().next().unwrap().clone();
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let deep_in_features = format!(
        r#"{{"model": "{MODEL}", "features": {{"{first}": {}1{}}}}}"#,
        "[".repeat(5_000),
        "]".repeat(5_000)
    );
    let json_bodies: Vec<(&str, Vec<u8>)> = vec![
        (
            "a number past f64",
            format!(r#"{{"model": "{MODEL}", "features": {{"{first}": 1e400}}}}"#).into_bytes(),
        ),
        (
            "a 400-digit integer",
            format!(
                r#"{{"model": "{MODEL}", "features": {{"{first}": {}}}}}"#,
                "9".repeat(400)
            )
            .into_bytes(),
        ),
        (
            "1e308, finite but far outside the physical range",
            serde_json::to_vec(&with(&first, json!(1e308))).unwrap(),
        ),
        ("100000 nested arrays", deep.into_bytes()),
        (
            "5000 nested arrays as a feature",
            deep_in_features.into_bytes(),
        ),
        (
            "Latin-1 bytes that are not UTF-8",
            b"{\"model\": \"breast-fna-malignancy\", \"subject\": \"M\xfcller\"}".to_vec(),
        ),
        (
            "UTF-16 with a byte order mark",
            [
                vec![0xFF, 0xFE],
                "{\"model\": 1}"
                    .encode_utf16()
                    .flat_map(u16::to_le_bytes)
                    .collect(),
            ]
            .concat(),
        ),
        (
            "a NUL in the subject",
            serde_json::to_vec(
                &json!({"model": MODEL, "features": features, "subject": "ACC\u{0}1"}),
            )
            .unwrap(),
        ),
        (
            "a NUL in the model name",
            serde_json::to_vec(&json!({"model": "breast\u{0}", "features": features})).unwrap(),
        ),
        (
            "a NUL in a feature name",
            serde_json::to_vec(&with("mean\u{0}radius", json!(1.0))).unwrap(),
        ),
        (
            "a string where a number goes",
            serde_json::to_vec(&with(&first, json!("12.5"))).unwrap(),
        ),
        ("an array as the body", b"[1, 2, 3]".to_vec()),
        ("an empty body", Vec::new()),
        (
            "a body that stops halfway",
            br#"{"model": "breast-fna-malignancy", "featu"#.to_vec(),
        ),
        (
            "a duplicated key",
            format!(r#"{{"model": "{MODEL}", "model": "x", "features": {{}}}}"#).into_bytes(),
        ),
    ];
    for (name, body) in json_bodies {
        refused(&app, &token, "", "application/json", name, body).await;
    }
    let header = features
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect::<Vec<_>>()
        .join(",");
    let row = features
        .as_object()
        .unwrap()
        .values()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let csv_bodies: Vec<(&str, Vec<u8>)> = vec![
        (
            "UTF-16 with a byte order mark",
            [
                vec![0xFF, 0xFE],
                format!("{header}\n{row}\n")
                    .encode_utf16()
                    .flat_map(u16::to_le_bytes)
                    .collect(),
            ]
            .concat(),
        ),
        (
            "Latin-1 bytes in a cell",
            format!("{header},subject\n{row},M")
                .into_bytes()
                .into_iter()
                .chain(*b"\xfcller\n")
                .collect(),
        ),
        (
            "a NUL in a cell",
            format!("{header},subject\n{row},A\u{0}B\n").into_bytes(),
        ),
        (
            "1e400 in a cell",
            format!(
                "{header}\n{}\n",
                row.replacen(row.split(',').next().unwrap(), "1e400", 1)
            )
            .into_bytes(),
        ),
        (
            "a row longer than the header",
            format!("{header}\n{row},1,2,3\n").into_bytes(),
        ),
        ("only a header", format!("{header}\n").into_bytes()),
        (
            "an unclosed quote",
            format!("{header}\n\"{row}\n").into_bytes(),
        ),
        (
            "50000 empty columns",
            format!("{}\n", ",".repeat(50_000)).into_bytes(),
        ),
    ];
    for (name, body) in csv_bodies {
        let query = format!("?model={MODEL}");
        refused(&app, &token, &query, "text/csv", name, body).await;
    }
    assert_eq!(app.rows("analyses").await, 0, "nothing was half-stored");
    // Still serving.
    app.submit(&token, &features).await;
    assert_eq!(app.rows("analyses").await, 1);
}
