//! The inference path that slide batches take, and the harness of the GPU checks (tests/gpu), on
//! the CPU: what a machine without a GPU can check of them.

use crate::helpers::{repo_path, test_config};
use onkos::domain::contract::Manifest;
use onkos::inference::bench::{Feed, parity, tile_throughput};
use onkos::inference::{OnnxModel, ProviderChoice, SessionOptions, TileBatch};

fn tiny_tile_cnn() -> OnnxModel {
    let data = tempfile::tempdir().unwrap();
    let config = test_config(data.path());
    let folder = repo_path("tests/fixtures/models/tiny-tile-cnn");
    let manifest: Manifest =
        serde_json::from_slice(&std::fs::read(folder.join("manifest.json")).unwrap()).unwrap();
    let bytes = std::fs::read(folder.join(&manifest.onnx.file)).unwrap();
    let options = SessionOptions::from_config(&config).unwrap();
    OnnxModel::load(&bytes, &manifest.onnx, 0, &options).unwrap()
}

/// Distinct pixels per tile, so that a tile's outputs are its own.
fn tiles(n: usize, size: usize) -> Vec<f32> {
    (0..n * 3 * size * size)
        .map(|i| ((i * 7919) % 1000) as f32 / 400.0 - 1.2)
        .collect()
}

#[test]
fn a_fixed_batch_runs_whole_and_answers_for_its_first_tiles_only() {
    let model = tiny_tile_cnn();
    let size = 64;
    let tile_len = 3 * size * size;
    let outputs = [("probabilities".to_owned(), Some(1))];
    let pixels = tiles(8, size);
    // An 8-tile batch filled with other tiles first, as a slide's earlier batch leaves it.
    let stale: Vec<f32> = pixels.iter().map(|v| -v).collect();
    let mut batch = TileBatch::Fixed(
        ort::value::Tensor::from_array(([8usize, 3, size, size], stale.into_boxed_slice()))
            .unwrap(),
    );
    batch
        .pixels_mut(5, tile_len)
        .unwrap()
        .copy_from_slice(&pixels[..5 * tile_len]);
    let (fixed, _) = model
        .predict_batch(&batch, 5, size, &outputs, None)
        .unwrap();
    let (direct, _) = model
        .predict_tiles(&pixels[..5 * tile_len], 5, size, &outputs, None)
        .unwrap();
    assert_eq!(
        fixed[0].len(),
        5,
        "one value per real tile, none for the padding"
    );
    assert_eq!(fixed, direct);
    // The padding's own outputs differ, so dropping them is what made the answers equal.
    let (whole, _) = model
        .predict_batch(&batch, 8, size, &outputs, None)
        .unwrap();
    assert_ne!(whole[0][5..], direct[0][..3]);
    assert!(batch.pixels_mut(9, tile_len).is_err());
    assert!(
        model
            .predict_batch(&batch, 9, size, &outputs, None)
            .is_err()
    );
}

#[test]
fn a_host_batch_is_sized_to_each_batch() {
    let model = tiny_tile_cnn();
    let size = 64;
    let tile_len = 3 * size * size;
    let outputs = [("probabilities".to_owned(), Some(0))];
    let pixels = tiles(3, size);
    // A CPU session gets ordinary memory.
    let mut batch = model.tile_batch(8, size);
    assert!(matches!(batch, TileBatch::Host(_)));
    batch
        .pixels_mut(3, tile_len)
        .unwrap()
        .copy_from_slice(&pixels);
    let (values, _) = model
        .predict_batch(&batch, 3, size, &outputs, None)
        .unwrap();
    let (direct, _) = model
        .predict_tiles(&pixels, 3, size, &outputs, None)
        .unwrap();
    assert_eq!(values, direct);
}

#[test]
fn the_parity_harness_finds_the_cpu_equal_to_itself() {
    let data = tempfile::tempdir().unwrap();
    let config = test_config(data.path());
    let lines = parity(
        &config,
        &["he-stain-quantification".to_owned()],
        ProviderChoice::Cpu,
    )
    .unwrap();
    // The six bundled feature models and the tile model.
    assert_eq!(lines.len(), 7, "{lines:#?}");
    for line in &lines {
        assert!(line.ends_with("ok=true"), "{line}");
        assert!(line.contains("max_abs=0.000e0"), "{line}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("model=lung-survival-va kind=features rows=137"))
    );
    assert!(
        parity(
            &config,
            &["breast-fna-malignancy".to_owned()],
            ProviderChoice::Cpu
        )
        .is_err()
    );
}

#[test]
fn tile_throughput_is_measured_per_batch_size_and_pinned_needs_cuda() {
    let data = tempfile::tempdir().unwrap();
    let config = test_config(data.path());
    let lines = tile_throughput(
        &config,
        "he-stain-quantification",
        &[1, 4],
        0.05,
        Feed::Pageable,
    )
    .unwrap();
    assert_eq!(lines.len(), 2);
    for (line, batch) in lines.iter().zip([1, 4]) {
        assert!(line.contains(&format!(" batch={batch} ")), "{line}");
        let rate: f64 = line.rsplit("tiles_per_s=").next().unwrap().parse().unwrap();
        assert!(rate > 0.0, "{line}");
    }
    let error =
        tile_throughput(&config, "he-stain-quantification", &[4], 0.05, Feed::Pinned).unwrap_err();
    assert!(format!("{error:#}").contains("not on CUDA"), "{error:#}");
}
