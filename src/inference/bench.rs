//! In-process inference throughput for a bundled model: the ceiling that the queue, the database
//! and HTTP are measured against in the benchmark.

use super::{OnnxModel, ProviderChoice, SessionOptions, TileBatch};
use crate::config::Config;
use crate::domain::contract::Manifest;
use anyhow::Context;
use serde_json::Value;
use std::time::{Duration, Instant};

/// Rows per second for batches of `batch` real cohort rows, run for `duration` on one thread.
pub fn bundled_throughput(
    config: &Config,
    model: &str,
    batch: usize,
    duration: Duration,
) -> anyhow::Result<f64> {
    let folder = config.models_dir.join(model);
    let (manifest, bytes) = read_model(config, model)?;
    let options = SessionOptions::from_config(config)?;
    let onnx = OnnxModel::load(&bytes, &manifest.onnx, manifest.encoding.len(), &options)?;
    let references: Vec<Value> =
        serde_json::from_slice(&std::fs::read(folder.join("reference_predictions.json"))?)?;
    let encoded: Vec<Vec<f64>> = references
        .iter()
        .filter_map(|r| r["features"].as_object())
        .filter_map(|f| manifest.validate_features(f).ok())
        .map(|v| v.encoded)
        .collect();
    anyhow::ensure!(!encoded.is_empty() && batch > 0, "no rows to run");
    let rows: Vec<f64> = encoded
        .iter()
        .cycle()
        .take(batch)
        .flatten()
        .copied()
        .collect();
    let started = Instant::now();
    let mut done = 0usize;
    while started.elapsed() < duration {
        onnx.predict(&rows)?;
        done += batch;
    }
    Ok(done as f64 / started.elapsed().as_secs_f64())
}

/// A model folder's manifest and ONNX bytes.
pub(crate) fn read_model(config: &Config, model: &str) -> anyhow::Result<(Manifest, Vec<u8>)> {
    let folder = config.models_dir.join(model);
    let manifest: Manifest = serde_json::from_slice(
        &std::fs::read(folder.join("manifest.json"))
            .with_context(|| format!("{}/manifest.json", folder.display()))?,
    )?;
    let bytes = std::fs::read(folder.join(&manifest.onnx.file))?;
    Ok((manifest, bytes))
}

/// Session options for one provider, whatever the configuration chose.
fn options_on(config: &Config, provider: ProviderChoice) -> anyhow::Result<SessionOptions> {
    let mut options = SessionOptions::from_config(config)?;
    options.provider = provider;
    options.threads = 0;
    Ok(options)
}

/// Reproducible pseudo-random inputs (xorshift64*), uniform in `[low, high)`.
fn uniform(seed: u64, len: usize, low: f32, high: f32) -> Vec<f32> {
    let mut state = seed.max(1);
    (0..len)
        .map(|_| {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let unit =
                (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32;
            low + unit * (high - low)
        })
        .collect()
}

/// The largest absolute difference, and the relative one ‖a − b‖ / ‖b‖ (Euclidean norms).
fn differences(a: &[f64], b: &[f64]) -> (f64, f64) {
    let max_abs = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    let norm = |v: &mut dyn Iterator<Item = f64>| v.map(|x| x * x).sum::<f64>().sqrt();
    let diff = norm(&mut a.iter().zip(b).map(|(x, y)| x - y));
    let reference = norm(&mut b.iter().copied());
    (
        max_abs,
        if reference > 0.0 {
            diff / reference
        } else {
            diff
        },
    )
}

/// Every output of one run, flattened, in the graph's output order.
fn run_all(onnx: &OnnxModel, input: &[f32], shape: &[usize]) -> anyhow::Result<Vec<f64>> {
    let mut session = onnx
        .session
        .lock()
        .map_err(|_| anyhow::anyhow!("an earlier inference panicked"))?;
    let names: Vec<String> = session
        .outputs()
        .iter()
        .map(|o| o.name().to_owned())
        .collect();
    let result = session.run(ort::inputs![onnx.input.as_str() => ort::value::TensorRef::from_array_view((shape.to_vec(), input))?])?;
    let mut values = Vec::new();
    for name in &names {
        values.extend(super::flat_values(&result[name.as_str()])?);
    }
    Ok(values)
}

/// CPU against CUDA on the same inputs, one `key=value` line per model: every bundled feature
/// model on its whole reference cohort, and each named tile model on 16 pseudo-random tiles.
/// A line says `ok=false` when a difference is over the stated float32 tolerance.
/// `against` is the side compared with the CPU: CUDA, or the CPU again (which checks this harness
/// on a machine without a GPU: every difference must then be zero).
pub fn parity(
    config: &Config,
    tile_models: &[String],
    against: ProviderChoice,
) -> anyhow::Result<Vec<String>> {
    let cpu = options_on(config, ProviderChoice::Cpu)?;
    let cuda = options_on(config, against)?;
    let mut lines = Vec::new();
    let mut names: Vec<String> = std::fs::read_dir(&config.models_dir)?
        .filter_map(Result::ok)
        .filter(|e| e.path().join("reference_predictions.json").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for name in names {
        let (manifest, bytes) = read_model(config, &name)?;
        if manifest.slide.is_some() || manifest.encoding.is_empty() {
            continue;
        }
        let references: Vec<Value> = serde_json::from_slice(&std::fs::read(
            config
                .models_dir
                .join(&name)
                .join("reference_predictions.json"),
        )?)?;
        let rows: Vec<f64> = references
            .iter()
            .filter_map(|r| r["features"].as_object())
            .filter_map(|f| manifest.validate_features(f).ok())
            .flat_map(|v| v.encoded)
            .collect();
        let width = manifest.encoding.len();
        let flatten = |outputs: Vec<crate::domain::result::ModelOutputs>| -> Vec<f64> {
            outputs
                .into_iter()
                .flat_map(|o| {
                    o.probabilities
                        .unwrap_or_default()
                        .into_iter()
                        .chain(o.risk_score)
                        .chain(o.survival.unwrap_or_default())
                })
                .collect()
        };
        let on_cpu = OnnxModel::load(&bytes, &manifest.onnx, width, &cpu)?;
        let on_cuda = OnnxModel::load(&bytes, &manifest.onnx, width, &cuda)?;
        let (a, b) = (
            flatten(on_cuda.predict(&rows)?),
            flatten(on_cpu.predict(&rows)?),
        );
        anyhow::ensure!(
            a.len() == b.len() && !a.is_empty(),
            "{name}: outputs differ in length"
        );
        let (max_abs, relative) = differences(&a, &b);
        lines.push(format!(
            "parity model={name} kind=features rows={} values={} provider={} max_abs={max_abs:.3e} relative={relative:.3e} tolerance_abs=1e-5 ok={}",
            rows.len() / width,
            a.len(),
            on_cuda.provider,
            max_abs < 1e-5
        ));
    }
    for name in tile_models {
        let (manifest, bytes) = read_model(config, name)?;
        let spec = manifest
            .slide
            .as_ref()
            .with_context(|| format!("{name} is not a slide model"))?;
        let size = spec.tile_size as usize;
        let shape = [16, 3, size, size];
        // Model inputs as the pipeline makes them: optical density 0-2.4, or normalised RGB.
        let optical_density = spec
            .normalise
            .as_ref()
            .is_some_and(|n| n.space == crate::domain::contract::PixelSpace::OpticalDensity);
        let (low, high) = if optical_density {
            (0.0, 2.4)
        } else {
            (-2.1, 2.6)
        };
        let input = uniform(7, shape.iter().product(), low, high);
        let on_cpu = OnnxModel::load(&bytes, &manifest.onnx, 0, &cpu)?;
        let on_cuda = OnnxModel::load(&bytes, &manifest.onnx, 0, &cuda)?;
        let (a, b) = (
            run_all(&on_cuda, &input, &shape)?,
            run_all(&on_cpu, &input, &shape)?,
        );
        let (max_abs, relative) = differences(&a, &b);
        let tolerance = if config.cuda_tf32 { 3e-3 } else { 1e-4 };
        lines.push(format!(
            "parity model={name} kind=tiles tiles=16 values={} provider={} tf32={} max_abs={max_abs:.3e} relative={relative:.3e} tolerance_relative={tolerance:.0e} ok={}",
            a.len(),
            on_cuda.provider,
            config.cuda_tf32,
            relative < tolerance
        ));
    }
    Ok(lines)
}

/// How a tile batch reaches the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feed {
    /// An ordinary (pageable) host buffer: the pipeline's path on the CPU.
    Pageable,
    /// Page-locked host memory from the session's CUDA-pinned allocator, which the GPU reads by
    /// DMA: the pipeline's path on CUDA ([`OnnxModel::tile_batch`]).
    Pinned,
}

/// Tiles per second of a tile model at each batch size: median over timed runs of at least
/// `seconds` (after three warm-up runs), one `key=value` line per batch size.
pub fn tile_throughput(
    config: &Config,
    model: &str,
    batches: &[usize],
    seconds: f64,
    feed: Feed,
) -> anyhow::Result<Vec<String>> {
    let (manifest, bytes) = read_model(config, model)?;
    let spec = manifest
        .slide
        .as_ref()
        .with_context(|| format!("{model} is not a slide model"))?;
    let size = spec.tile_size as usize;
    let options = options_on(config, ProviderChoice::Auto)?;
    let onnx = OnnxModel::load(&bytes, &manifest.onnx, 0, &options)?;
    let output = onnx
        .output_names()
        .into_iter()
        .next()
        .context("the graph has no output")?;
    let outputs = [(output, Some(0))];
    let mut lines = Vec::new();
    for &n in batches {
        let pixels = uniform(n as u64, n * 3 * size * size, -2.1, 2.6);
        let batch = match feed {
            Feed::Pageable => TileBatch::Host(pixels),
            Feed::Pinned => {
                let mut batch = onnx.tile_batch(n, size);
                anyhow::ensure!(
                    matches!(batch, TileBatch::Fixed(_)),
                    "no pinned memory: the session is not on CUDA"
                );
                batch
                    .pixels_mut(n, 3 * size * size)?
                    .copy_from_slice(&pixels);
                batch
            }
        };
        let mut times = Vec::new();
        let started = Instant::now();
        for i in 0.. {
            let run = Instant::now();
            onnx.predict_batch(&batch, n, size, &outputs, None)?;
            if i >= 3 {
                times.push(run.elapsed().as_secs_f64());
            }
            if times.len() >= 5 && started.elapsed().as_secs_f64() > seconds {
                break;
            }
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        lines.push(format!(
            "throughput model={model} feed={feed:?} provider={} batch={n} runs={} median_ms={:.3} tiles_per_s={:.0}",
            onnx.provider,
            times.len(),
            median * 1e3,
            n as f64 / median
        ));
    }
    Ok(lines)
}
