//! In-process inference throughput for a bundled model: the ceiling that the queue, the database
//! and HTTP are measured against in the benchmark.

use super::{OnnxModel, SessionOptions};
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
    let manifest: Manifest = serde_json::from_slice(
        &std::fs::read(folder.join("manifest.json")).context("manifest.json")?,
    )?;
    let bytes = std::fs::read(folder.join(&manifest.onnx.file))?;
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
