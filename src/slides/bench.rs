//! `onkos bench-slide`: the whole slide pipeline on one slide, against the decode limit of the
//! same slide's level-0 tiles on the same cores, measured in the same run.

use super::analyse::{Plan, analyse};
use super::read::TiledSlide;
use crate::config::Config;
use crate::inference::{OnnxModel, SessionOptions};
use anyhow::Context;
use rayon::prelude::*;
use std::path::Path;
use std::time::Instant;

/// One line of `key=value` results.
pub fn run(config: &Config, slide: &Path, model: &str, batch: usize) -> anyhow::Result<String> {
    let (manifest, bytes) = crate::inference::bench::read_model(config, model)?;
    let spec = manifest
        .slide
        .as_ref()
        .with_context(|| format!("{model} is not a slide model"))?;
    let mut options = SessionOptions::from_config(config)?;
    options.threads = config.slide_inference_threads;
    let onnx = OnnxModel::load(&bytes, &manifest.onnx, 0, &options)?;
    let info = super::inspect(std::io::BufReader::new(std::fs::File::open(slide)?))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mpp = info
        .mpp_x
        .context("the benchmark slide must state its µm/pixel")?;

    // The pipeline: mask, grid, read, resize, infer, aggregate.
    let plan = Plan {
        spec,
        onnx: &onnx,
        mpp,
        batch,
    };
    // Once with a fresh session (as a worker's first slide), then timed with the session warm
    // (as every later one): on CUDA the first run also loads kernels and searches cuDNN's
    // convolution algorithms for the batch shape.
    let started = Instant::now();
    analyse(slide, &plan, &mut |_, _| true).map_err(|e| anyhow::anyhow!("{e}"))?;
    let cold_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let analysed = analyse(slide, &plan, &mut |_, _| true).map_err(|e| anyhow::anyhow!("{e}"))?;
    let pipeline_s = started.elapsed().as_secs_f64();
    let n = analysed.tiles.xs.len();
    let read_size = (analysed.tiles.tile_size_level0 / analysed.level_downsample).round();

    // The decode limit: every file tile of the level the pipeline read, decoded on all cores
    // (three passes), in model tiles per second: decoded pixels / pixels read per model tile.
    let reader = TiledSlide::open(slide).map_err(|e| anyhow::anyhow!("{e}"))?;
    let level = &reader.levels[analysed.level];
    let tiles: Vec<(u32, u32)> = (0..level.tiles_down())
        .flat_map(|r| (0..level.tiles_across()).map(move |c| (c, r)))
        .collect();
    let started = Instant::now();
    let mut decoded = 0;
    for _ in 0..3 {
        decoded += tiles
            .par_iter()
            .map(|&(c, r)| {
                reader
                    .tile(analysed.level, c, r)
                    .map(|t| t.pixels.len() / 3)
            })
            .sum::<Result<usize, _>>()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let decode_s = started.elapsed().as_secs_f64();
    let decode_pixels_per_s = decoded as f64 / decode_s;

    // onkos's region reading alone (what OpenSlide's read_region does): every whole region of the
    // read size on that level, row by row, on all cores, from a fresh reader.
    let reader = TiledSlide::open(slide).map_err(|e| anyhow::anyhow!("{e}"))?;
    reader.keep_tiles(level.tiles_across() as usize * 3);
    let side = read_size as u32;
    let positions: Vec<(u32, u32)> = (0..level.height / side)
        .flat_map(|r| (0..level.width / side).map(move |c| (c * side, r * side)))
        .collect();
    let started = Instant::now();
    for band in positions.chunks(256) {
        band.par_iter()
            .try_for_each(|&(x, y)| reader.region(analysed.level, x, y, side, side).map(|_| ()))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let regions_per_s = positions.len() as f64 / started.elapsed().as_secs_f64();

    // The same regions through OpenSlide in onkos's isolated reader processes (one per core): the
    // breadth path, and what isolating the C library costs against OpenSlide in-process.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let isolated =
        super::openslide::OpenSlideSlide::open(slide, cores).map_err(|e| anyhow::anyhow!("{e}"))?;
    let sample = &positions[..positions.len().min(4096)];
    let started = Instant::now();
    sample
        .par_iter()
        .try_for_each(|&(x, y)| {
            isolated
                .region(analysed.level, x, y, side, side)
                .map(|_| ())
        })
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let isolated_per_s = sample.len() as f64 / started.elapsed().as_secs_f64();
    let s = &analysed.stage_ms;
    // isolated_openslide_regions_per_s comes before regions_per_s: the script's field lookup
    // takes the last match of a name.
    Ok(format!(
        "level_used={} read_size={read_size} file_tiles={} decode_mpix_per_s={:.1} \
         limit_tiles_per_s={:.0} isolated_openslide_regions_per_s={isolated_per_s:.0} regions_per_s={regions_per_s:.0} pipeline_tiles={n} cold_pipeline_tiles_per_s={:.1} pipeline_tiles_per_s={:.1} ratio={:.3} \
         mask_ms={:.0} read_decode_ms={:.0} infer_ms={:.0} wait_tiles_ms={:.0} total_ms={:.0} provider={} measures={}",
        analysed.level,
        tiles.len(),
        decode_pixels_per_s / 1e6,
        decode_pixels_per_s / read_size.powi(2),
        n as f64 / cold_s,
        n as f64 / pipeline_s,
        (n as f64 / pipeline_s) / (decode_pixels_per_s / read_size.powi(2)),
        s.mask,
        s.read_decode,
        s.infer,
        s.wait_tiles,
        pipeline_s * 1e3,
        onnx.provider,
        analysed
            .measures
            .iter()
            .map(|(name, value)| format!(
                "{name}:{}",
                value.map_or("none".into(), |v| format!("{v:.9}"))
            ))
            .collect::<Vec<_>>()
            .join(","),
    ))
}
