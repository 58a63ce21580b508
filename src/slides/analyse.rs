//! A slide analysis: tissue mask on a low-resolution view, a tile grid at the model's µm/pixel,
//! tiles read and decoded in parallel while the previous batch is in ONNX Runtime, and the
//! per-tile measures summed up as the manifest says.

use super::SlideError;
use super::read::Rgb;
use super::slide::{LevelSize, Slide};
use super::stain::{Estimate, Normaliser};
use crate::domain::contract::{Aggregation, Normalise, PixelSpace, SlideSpec};
use crate::inference::{OnnxModel, TileBatch, TileEmbeddings};
use image::imageops::FilterType;
use rayon::prelude::*;
use std::path::Path;
use std::sync::mpsc::sync_channel;
use std::time::Instant;

/// What a slide analysis needs besides the slide.
#[derive(Debug)]
pub struct Plan<'a> {
    pub spec: &'a SlideSpec,
    pub onnx: &'a OnnxModel,
    /// µm per level-0 pixel, from the file or stated by the request.
    pub mpp: f64,
    /// Tiles per ONNX Runtime call.
    pub batch: usize,
}

/// Where the tiles are and what the model said about each.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TileScores {
    /// Side of every tile in level-0 pixels.
    pub tile_size_level0: f64,
    /// Top-left corners in level-0 pixels.
    pub xs: Vec<i32>,
    pub ys: Vec<i32>,
    /// The model's tissue output per tile.
    pub tissue: Vec<f32>,
    /// Measure names, the columns of `scores`.
    pub measures: Vec<String>,
    /// Row-major: one row per tile, one column per measure.
    pub scores: Vec<f32>,
}

/// The numbers a slide result is built from.
#[derive(Debug, Clone, PartialEq)]
pub struct Analysed {
    /// Which reader read the slide (`onkos-tiff`, `openslide-3.4.1`, …).
    pub reader: String,
    /// An encoder's tile embeddings: D, then one row of D values per analysed tile.
    pub embeddings: Option<TileEmbeddings>,
    /// The slide's stains as estimated for stain normalisation.
    pub stain: Option<Estimate>,
    pub tissue_fraction: f64,
    pub tiles_in_grid: usize,
    pub level: usize,
    pub level_downsample: f64,
    /// (measure name, tissue-weighted mean; none when no analysed tile had tissue in the model's eyes).
    pub measures: Vec<(String, Option<f64>)>,
    pub tiles: TileScores,
    pub stage_ms: StageTimes,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct StageTimes {
    pub open: f64,
    pub mask: f64,
    pub read_decode: f64,
    pub infer: f64,
    /// How long inference waited for decoded tiles (the model idle; included in no other stage).
    pub wait_tiles: f64,
    pub aggregate: f64,
}

/// Why an analysis stopped.
#[derive(Debug, thiserror::Error)]
pub enum Stopped {
    /// The analysis was cancelled (or its lease lost) between batches.
    #[error("cancelled")]
    Cancelled,
    /// The slide cannot be analysed; the reason is for people (stored with the analysis).
    #[error("{0}")]
    Refused(String),
    /// Inference failed (may succeed on another attempt).
    #[error("{0}")]
    Inference(String),
}

impl From<SlideError> for Stopped {
    fn from(e: SlideError) -> Self {
        match e {
            // The worker's fault: another attempt (maybe on another worker) may succeed.
            SlideError::Internal(why) => Self::Inference(why),
            e => Self::Refused(e.to_string()),
        }
    }
}

/// Level-0 pixels per mask pixel, relative to a tile: 8 × 8 mask pixels per analysis tile.
const MASK_PER_TILE: f64 = 8.0;
/// The mask is never larger than this on its long side.
const MASK_MAX: f64 = 4096.0;
/// The mask's level is read in regions of this many pixels a side.
const MASK_CHUNK: u32 = 512;

/// OpenSlide reader processes per analysis (when the slide needs OpenSlide): one per core, at
/// most 8.
fn reader_processes() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
}

/// Runs the analysis. `progress(done, total)` is called after every batch; returning false stops
/// it (cancelled). Blocking: run it off the async threads.
pub fn analyse(
    path: &Path,
    plan: &Plan<'_>,
    progress: &mut dyn FnMut(usize, usize) -> bool,
) -> Result<Analysed, Stopped> {
    let mut times = StageTimes::default();
    let started = Instant::now();
    let slide = Slide::open(path, reader_processes())?;
    times.open = ms(started);

    let spec = plan.spec;
    let size = spec.tile_size as usize;
    // One model tile covers this many level-0 pixels; it is read from the coarsest level that is
    // at least as fine as the model's resolution, and resized — never upsampled from a coarser one.
    let tile0 = f64::from(spec.tile_size) * spec.mpp / plan.mpp;
    let wanted_ds = tile0 / f64::from(spec.tile_size);
    let (level, ds) = slide
        .levels
        .iter()
        .enumerate()
        .rfind(|(_, l)| l.downsample <= wanted_ds * 1.001)
        .map(|(i, l)| (i, l.downsample))
        .ok_or_else(|| {
            Stopped::Refused(format!(
                "the slide's finest level ({:.3} µm/pixel) is coarser than the model's {} µm/pixel",
                plan.mpp, spec.mpp
            ))
        })?;
    let base = &slide.levels[0];
    let cols = (f64::from(base.width) / tile0).floor() as u32;
    let rows = (f64::from(base.height) / tile0).floor() as u32;
    if cols == 0 || rows == 0 {
        return Err(Stopped::Refused(format!(
            "the slide ({} x {} pixels) is smaller than one {:.0}-pixel tile at {} µm/pixel",
            base.width, base.height, tile0, spec.mpp
        )));
    }

    let started = Instant::now();
    let mask = Mask::build(&slide, tile0)?;
    times.mask = ms(started);
    if mask.tissue_pixels == 0 {
        return Err(Stopped::Refused(
            "no tissue found on the slide (the tissue mask is empty)".into(),
        ));
    }
    // Stain normalisation is estimated once per slide, from its tissue.
    let (stain, normaliser) = match &spec.stain_normalise {
        Some(target) => {
            let refused = |e: String| Stopped::Refused(format!("stain normalisation: {e}"));
            let estimate = super::stain::estimate(&mask.tissue_rgb).map_err(refused)?;
            let normaliser = Normaliser::new(&estimate, target).map_err(refused)?;
            (Some(estimate), Some(normaliser))
        }
        None => (None, None),
    };
    let normaliser = normaliser.as_ref();
    let planar = &Planar::new(spec.normalise.as_ref());
    let grid: Vec<(u32, u32)> = (0..rows)
        .flat_map(|r| (0..cols).map(move |c| (c, r)))
        .filter(|&(c, r)| {
            mask.coverage(f64::from(c) * tile0, f64::from(r) * tile0, tile0) >= spec.min_tissue
        })
        .collect();
    if grid.is_empty() {
        return Err(Stopped::Refused(format!(
            "no tile of the grid is at least {:.0} % tissue",
            spec.min_tissue * 100.0
        )));
    }

    let read_size = (tile0 / ds).round().max(1.0) as u32;
    // Grid rows are read in order: keeping three rows of file tiles decodes each tile once.
    slide.keep_rows(level, 3);
    let outputs: Vec<(String, Option<usize>)> = spec
        .tissue_output
        .iter()
        .map(|t| (t.clone(), None))
        .chain(spec.measures.iter().map(|m| (m.output.clone(), m.column)))
        .collect();
    let weighted = usize::from(spec.tissue_output.is_some());
    let total = grid.len();
    let mut tiles = TileScores {
        tile_size_level0: tile0,
        measures: spec.measures.iter().map(|m| m.name.clone()).collect(),
        ..TileScores::default()
    };
    let mut read_decode_ms = 0.0;
    let mut infer_ms = 0.0;
    let mut wait_ms = 0.0;
    let mut embeddings: Option<TileEmbeddings> = None;
    let batches: Vec<&[(u32, u32)]> = grid.chunks(plan.batch.max(1)).collect();
    std::thread::scope(|scope| -> Result<(), Stopped> {
        // Decoding runs one batch ahead of inference: two batches in flight at most. Each tile
        // is decoded straight into its place in the batch's input, and inference hands the
        // buffers back, so a slide allocates two batches' worth of input, not one per batch.
        let (send, receive) = sync_channel::<Result<(TileBatch, f64), Stopped>>(1);
        let (recycle, recycled) = sync_channel::<TileBatch>(2);
        let slide = &slide;
        let batches = &batches;
        let tile_len = 3 * size * size;
        scope.spawn(move || {
            for batch in batches {
                let started = Instant::now();
                let mut buffer = recycled.try_recv().unwrap_or_else(|_| {
                    plan.onnx
                        .tile_batch(plan.batch.max(1).min(total.max(1)), size)
                });
                let pixels = match buffer.pixels_mut(batch.len(), tile_len) {
                    Ok(pixels) => pixels,
                    Err(e) => {
                        let _ = send.send(Err(Stopped::Inference(format!("{e:#}"))));
                        return;
                    }
                };
                // Each tile's region on the read level; their file tiles are decoded first.
                let corners: Vec<(u32, u32)> = batch
                    .iter()
                    .map(|&(c, r)| {
                        (
                            (f64::from(c) * tile0 / ds).round() as u32,
                            (f64::from(r) * tile0 / ds).round() as u32,
                        )
                    })
                    .collect();
                slide.prefetch(level, &corners, read_size);
                let decoded: Result<(), Stopped> = pixels
                    .par_chunks_mut(tile_len)
                    .zip(corners.par_iter())
                    .try_for_each(|(out, &(x, y))| {
                        let rgb = slide.region(level, x, y, read_size, read_size)?;
                        let mut tile = resized(rgb, spec.tile_size);
                        if let Some(n) = normaliser {
                            n.apply(&mut tile.pixels);
                        }
                        planar.write(&tile, out);
                        Ok(())
                    });
                let message = decoded.map(|()| (buffer, ms(started)));
                let failed = message.is_err();
                if send.send(message).is_err() || failed {
                    return;
                }
            }
        });
        let mut done = 0;
        for batch in batches {
            let waiting = Instant::now();
            let (buffer, decode_ms) = receive
                .recv()
                .map_err(|_| Stopped::Refused("the tile reader stopped".into()))??;
            read_decode_ms += decode_ms;
            wait_ms += ms(waiting);
            let started = Instant::now();
            let (values, rows) = plan
                .onnx
                .predict_batch(
                    &buffer,
                    batch.len(),
                    size,
                    &outputs,
                    spec.embedding.as_deref(),
                )
                .map_err(|e| Stopped::Inference(format!("{e:#}")))?;
            if let Some((dim, rows)) = rows {
                let (width, all) = embeddings.get_or_insert_with(|| (dim, Vec::new()));
                if *width != dim {
                    return Err(Stopped::Inference(format!(
                        "the embedding width changed from {width} to {dim} between batches"
                    )));
                }
                all.extend_from_slice(&rows);
            }
            infer_ms += ms(started);
            let _ = recycle.try_send(buffer);
            for (i, &(c, r)) in batch.iter().enumerate() {
                tiles.xs.push((f64::from(c) * tile0).round() as i32);
                tiles.ys.push((f64::from(r) * tile0).round() as i32);
                // Without a tissue output every analysed tile weighs 1.
                tiles.tissue.push(if weighted == 1 {
                    values[0][i] as f32
                } else {
                    1.0
                });
                tiles
                    .scores
                    .extend(values[weighted..].iter().map(|column| column[i] as f32));
            }
            done += batch.len();
            if !progress(done, total) {
                return Err(Stopped::Cancelled);
            }
        }
        Ok(())
    })?;
    times.read_decode = read_decode_ms;
    times.infer = infer_ms;
    times.wait_tiles = wait_ms;

    let started = Instant::now();
    let width = tiles.measures.len();
    let measures = spec
        .measures
        .iter()
        .enumerate()
        .map(|(k, measure)| {
            let values: Vec<f64> = tiles
                .scores
                .chunks(width)
                .map(|row| f64::from(row[k]))
                .collect();
            let weights: Vec<f64> = tiles.tissue.iter().map(|&w| f64::from(w)).collect();
            (
                measure.name.clone(),
                aggregate(&measure.aggregation, &values, &weights),
            )
        })
        .collect();
    times.aggregate = ms(started);
    Ok(Analysed {
        reader: slide.reader(),
        embeddings,
        stain,
        tissue_fraction: mask.tissue_pixels as f64 / mask.cells() as f64,
        tiles_in_grid: (cols * rows) as usize,
        level,
        level_downsample: ds,
        measures,
        tiles,
        stage_ms: times,
    })
}

/// One slide-level value from per-tile values, as the manifest's aggregation says; none when it is
/// undefined (no tiles, or no tissue weight).
pub fn aggregate(how: &Aggregation, values: &[f64], weights: &[f64]) -> Option<f64> {
    let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if finite.is_empty() {
        return None;
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    match how {
        Aggregation::TissueWeightedMean => {
            let (sum, weight) = values
                .iter()
                .zip(weights)
                .filter(|(v, w)| v.is_finite() && w.is_finite())
                .fold((0.0, 0.0), |(s, t), (v, w)| (s + v * w, t + w));
            (weight > 0.0).then(|| sum / weight)
        }
        Aggregation::Mean => Some(mean(&finite)),
        Aggregation::Max => finite.iter().copied().reduce(f64::max),
        Aggregation::TopKMean { k } => {
            let mut sorted = finite;
            sorted.sort_by(|a, b| b.total_cmp(a));
            Some(mean(&sorted[..(*k).clamp(1, sorted.len())]))
        }
        Aggregation::FractionAbove { threshold } => {
            Some(finite.iter().filter(|v| *v > threshold).count() as f64 / finite.len() as f64)
        }
    }
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

fn resized(rgb: Rgb, size: u32) -> Rgb {
    if rgb.width == size && rgb.height == size {
        return rgb;
    }
    let Some(image) = image::RgbImage::from_raw(rgb.width, rgb.height, rgb.pixels) else {
        return Rgb {
            width: size,
            height: size,
            pixels: vec![255; (size * size * 3) as usize],
        };
    };
    let out = image::imageops::resize(&image, size, size, FilterType::Triangle);
    Rgb {
        width: size,
        height: size,
        pixels: out.into_raw(),
    }
}

/// Interleaved RGB bytes to the model's planar float32 input (C, H, W), normalised as the
/// manifest says. Built once per slide: an optical-density input is a table of each channel's 256
/// possible values, so a tile costs a lookup per value, not a logarithm.
#[derive(Debug)]
enum Planar {
    Plain,
    Affine(Normalise),
    Table(Box<[[f32; 256]; 3]>),
}

impl Planar {
    fn new(normalise: Option<&Normalise>) -> Self {
        match normalise {
            None => Self::Plain,
            Some(k) if k.space == PixelSpace::Rgb => Self::Affine(k.clone()),
            Some(k) => {
                let mut table = Box::new([[0.0_f32; 256]; 3]);
                for (c, values) in table.iter_mut().enumerate() {
                    for (v, out) in values.iter_mut().enumerate() {
                        let od = -((v as f64 + 1.0) / 256.0).log10();
                        *out = ((od * f64::from(k.scale) - f64::from(k.mean[c]))
                            / f64::from(k.std[c])) as f32;
                    }
                }
                Self::Table(table)
            }
        }
    }

    /// Writes one tile into `out` (3 × its pixels), a plane at a time. Not all three in one pass:
    /// a 224-pixel tile's planes are exactly 49 × 4 KiB apart, so stores to the three at once
    /// alias each other (4K aliasing) and stall the loop; it was 15 % of the pipeline's samples.
    fn write(&self, rgb: &Rgb, out: &mut [f32]) {
        let n = (rgb.width * rgb.height) as usize;
        if n == 0 {
            return;
        }
        for (c, plane) in out.chunks_exact_mut(n).take(3).enumerate() {
            let values = rgb.pixels[c..].iter().step_by(3);
            match self {
                Self::Plain => {
                    for (o, &v) in plane.iter_mut().zip(values) {
                        *o = f32::from(v);
                    }
                }
                Self::Affine(k) => {
                    let (scale, mean, std) = (k.scale, k.mean[c], k.std[c]);
                    for (o, &v) in plane.iter_mut().zip(values) {
                        *o = (f32::from(v) * scale - mean) / std;
                    }
                }
                Self::Table(t) => {
                    let table = &t[c];
                    for (o, &v) in plane.iter_mut().zip(values) {
                        *o = table[usize::from(v)];
                    }
                }
            }
        }
    }

    #[cfg(test)]
    fn tile(&self, rgb: &Rgb) -> Vec<f32> {
        let mut out = vec![0.0_f32; 3 * (rgb.width * rgb.height) as usize];
        self.write(rgb, &mut out);
        out
    }
}

/// The tissue mask: one cell per `scale` level-0 pixels a side.
#[derive(Debug)]
pub struct Mask {
    width: usize,
    height: usize,
    /// Level-0 pixels per cell side.
    scale: f64,
    tissue: Vec<bool>,
    tissue_pixels: usize,
    /// Mean RGB of each tissue cell: samples of the slide's stains.
    tissue_rgb: Vec<[f32; 3]>,
}

impl Mask {
    /// Reads the coarsest level that still gives 8 × 8 cells per tile, averages its pixels into
    /// cells, and marks tissue: saturation above Otsu's threshold (at least 0.05), not black, and
    /// not part of a speck smaller than a quarter tile.
    fn build(slide: &Slide, tile0: f64) -> Result<Self, SlideError> {
        let base = slide.levels[0];
        let scale = (tile0 / MASK_PER_TILE)
            .max(f64::from(base.width.max(base.height)) / MASK_MAX)
            .max(1.0);
        let (index, level): (usize, LevelSize) = slide
            .levels
            .iter()
            .copied()
            .enumerate()
            .rfind(|(_, l)| l.downsample <= scale)
            .unwrap_or((0, base));
        let width = (f64::from(base.width) / scale).ceil() as usize;
        let height = (f64::from(base.height) / scale).ceil() as usize;
        let mut sums = vec![[0.0_f64; 4]; width * height];
        let per_cell = scale / level.downsample;
        // The level is read in chunks, in parallel.
        let chunk = MASK_CHUNK;
        let chunks: Vec<(u32, u32)> = (0..level.height.div_ceil(chunk))
            .flat_map(|r| (0..level.width.div_ceil(chunk)).map(move |c| (c * chunk, r * chunk)))
            .collect();
        let decoded: Result<Vec<(u32, u32, Rgb)>, SlideError> = chunks
            .par_iter()
            .map(|&(x0, y0)| {
                let (w, h) = (chunk.min(level.width - x0), chunk.min(level.height - y0));
                slide.region(index, x0, y0, w, h).map(|t| (x0, y0, t))
            })
            .collect();
        for (x0, y0, tile) in decoded? {
            for ty in 0..tile.height {
                let cy = (f64::from(y0 + ty) / per_cell) as usize;
                for tx in 0..tile.width {
                    let cx = (f64::from(x0 + tx) / per_cell) as usize;
                    if cx >= width || cy >= height {
                        continue;
                    }
                    let p = &tile.pixels[((ty * tile.width + tx) * 3) as usize..][..3];
                    let cell = &mut sums[cy * width + cx];
                    cell[0] += f64::from(p[0]);
                    cell[1] += f64::from(p[1]);
                    cell[2] += f64::from(p[2]);
                    cell[3] += 1.0;
                }
            }
        }
        // Saturation and brightness per cell; cells with no pixels are background.
        let cells: Vec<(f64, f64)> = sums
            .iter()
            .map(|s| {
                if s[3] == 0.0 {
                    return (0.0, 255.0);
                }
                let rgb = [s[0] / s[3], s[1] / s[3], s[2] / s[3]];
                let max = rgb.iter().copied().fold(0.0, f64::max);
                let min = rgb.iter().copied().fold(255.0, f64::min);
                let saturation = if max > 0.0 { (max - min) / max } else { 0.0 };
                (saturation, max)
            })
            .collect();
        let threshold = otsu(cells.iter().map(|c| c.0)).max(0.05);
        let mut tissue: Vec<bool> = cells
            .iter()
            .map(|&(s, v)| s > threshold && v > 25.0)
            .collect();
        let min_object = ((MASK_PER_TILE * MASK_PER_TILE) / 4.0) as usize;
        remove_specks(&mut tissue, width, height, min_object);
        let tissue_pixels = tissue.iter().filter(|&&t| t).count();
        let tissue_rgb = sums
            .iter()
            .zip(&tissue)
            .filter(|(s, t)| **t && s[3] > 0.0)
            .map(|(s, _)| {
                [
                    (s[0] / s[3]) as f32,
                    (s[1] / s[3]) as f32,
                    (s[2] / s[3]) as f32,
                ]
            })
            .collect();
        Ok(Self {
            tissue_rgb,
            width,
            height,
            scale,
            tissue,
            tissue_pixels,
        })
    }

    fn cells(&self) -> usize {
        self.width * self.height
    }

    /// The tissue fraction of a square of level-0 pixels.
    fn coverage(&self, x: f64, y: f64, side: f64) -> f64 {
        let x0 = (x / self.scale).floor() as usize;
        let y0 = (y / self.scale).floor() as usize;
        let x1 = (((x + side) / self.scale).ceil() as usize).min(self.width);
        let y1 = (((y + side) / self.scale).ceil() as usize).min(self.height);
        if x0 >= x1 || y0 >= y1 {
            return 0.0;
        }
        let mut tissue = 0;
        for cy in y0..y1 {
            tissue += self.tissue[cy * self.width + x0..cy * self.width + x1]
                .iter()
                .filter(|&&t| t)
                .count();
        }
        tissue as f64 / ((x1 - x0) * (y1 - y0)) as f64
    }
}

/// Otsu's threshold of values in [0, 1] (256 bins).
fn otsu(values: impl Iterator<Item = f64>) -> f64 {
    let mut histogram = [0_u64; 256];
    let mut n = 0_u64;
    for v in values {
        histogram[(v.clamp(0.0, 1.0) * 255.0).round() as usize] += 1;
        n += 1;
    }
    if n == 0 {
        return 0.0;
    }
    let total: f64 = histogram
        .iter()
        .enumerate()
        .map(|(i, &c)| i as f64 * c as f64)
        .sum();
    let (mut below, mut below_sum, mut best, mut best_at) = (0.0, 0.0, -1.0, 0);
    for (i, &count) in histogram.iter().enumerate() {
        below += count as f64;
        if below == 0.0 {
            continue;
        }
        let above = n as f64 - below;
        if above == 0.0 {
            break;
        }
        below_sum += i as f64 * count as f64;
        let mean_below = below_sum / below;
        let mean_above = (total - below_sum) / above;
        let between = below * above * (mean_below - mean_above).powi(2);
        if between > best {
            best = between;
            best_at = i;
        }
    }
    (best_at as f64 + 0.5) / 255.0
}

/// Clears 4-connected groups of tissue cells smaller than `min` cells.
fn remove_specks(mask: &mut [bool], width: usize, height: usize, min: usize) {
    let mut seen = vec![false; mask.len()];
    let mut stack = Vec::new();
    let mut group = Vec::new();
    for start in 0..mask.len() {
        if !mask[start] || seen[start] {
            continue;
        }
        group.clear();
        stack.push(start);
        seen[start] = true;
        while let Some(i) = stack.pop() {
            group.push(i);
            let (x, y) = (i % width, i / width);
            let neighbours = [
                (x > 0).then(|| i - 1),
                (x + 1 < width).then(|| i + 1),
                (y > 0).then(|| i - width),
                (y + 1 < height).then(|| i + width),
            ];
            for j in neighbours.into_iter().flatten() {
                if mask[j] && !seen[j] {
                    seen[j] = true;
                    stack.push(j);
                }
            }
        }
        if group.len() < min {
            for &i in &group {
                mask[i] = false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_aggregation_sums_up_the_tiles_as_named() {
        let values = [0.1, 0.9, 0.5, f64::NAN];
        let weights = [1.0, 0.0, 1.0, 1.0];
        let close =
            |a: Option<f64>, b: f64| assert!((a.expect("a value") - b).abs() < 1e-12, "{a:?} {b}");
        close(
            aggregate(&Aggregation::TissueWeightedMean, &values, &weights),
            0.3,
        );
        close(aggregate(&Aggregation::Mean, &values, &weights), 0.5);
        close(aggregate(&Aggregation::Max, &values, &weights), 0.9);
        close(
            aggregate(&Aggregation::TopKMean { k: 2 }, &values, &weights),
            0.7,
        );
        close(
            aggregate(&Aggregation::TopKMean { k: 10 }, &values, &weights),
            0.5,
        );
        let above = Aggregation::FractionAbove { threshold: 0.4 };
        close(aggregate(&above, &values, &weights), 2.0 / 3.0);
        assert_eq!(
            aggregate(&Aggregation::TissueWeightedMean, &[0.5], &[0.0]),
            None
        );
        assert_eq!(aggregate(&Aggregation::Mean, &[], &[]), None);
    }

    #[test]
    fn otsu_splits_two_groups() {
        let values = (0..100).map(|i| if i < 60 { 0.02 } else { 0.6 });
        let t = otsu(values);
        assert!(t > 0.02 && t < 0.6, "{t}");
    }

    #[test]
    fn specks_smaller_than_the_minimum_are_removed() {
        // A 2-cell speck and a 6-cell block in a 5 x 4 mask.
        let mut mask = vec![
            true, true, false, false, false, //
            false, false, false, true, true, //
            false, false, false, true, true, //
            false, false, false, true, true, //
        ];
        remove_specks(&mut mask, 5, 4, 4);
        assert_eq!(mask.iter().filter(|&&t| t).count(), 6);
        assert!(!mask[0] && !mask[1]);
    }

    #[test]
    fn planar_layout_puts_each_channel_in_its_own_plane() {
        let rgb = Rgb {
            width: 2,
            height: 1,
            pixels: vec![1, 2, 3, 4, 5, 6],
        };
        assert_eq!(
            Planar::new(None).tile(&rgb),
            vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]
        );
        let imagenet = Normalise {
            scale: 1.0 / 255.0,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
            space: PixelSpace::Rgb,
        };
        let white = Rgb {
            width: 1,
            height: 1,
            pixels: vec![255, 255, 255],
        };
        let got = Planar::new(Some(&imagenet)).tile(&white);
        assert!((got[0] - (1.0 - 0.485) / 0.229).abs() < 1e-6, "{got:?}");
    }

    #[test]
    fn optical_density_input_is_the_absorbance_of_each_value() {
        let od = Normalise {
            scale: 2.0,
            mean: [0.0, 0.5, 0.0],
            std: [1.0, 1.0, 4.0],
            space: PixelSpace::OpticalDensity,
        };
        let rgb = Rgb {
            width: 2,
            height: 1,
            pixels: vec![255, 0, 99, 7, 128, 200],
        };
        let got = Planar::new(Some(&od)).tile(&rgb);
        let absorbance = |v: f64| -((v + 1.0) / 256.0).log10();
        let want = [
            absorbance(255.0) * 2.0,
            absorbance(7.0) * 2.0,
            absorbance(0.0) * 2.0 - 0.5,
            absorbance(128.0) * 2.0 - 0.5,
            absorbance(99.0) * 2.0 / 4.0,
            absorbance(200.0) * 2.0 / 4.0,
        ];
        for (g, w) in got.iter().zip(want) {
            assert!((f64::from(*g) - w).abs() < 1e-6, "{got:?} {want:?}");
        }
        // White is no absorbance at all; black the most an 8-bit value can say.
        assert_eq!(got[0], 0.0);
        assert!((f64::from(got[2]) + 0.5 - 2.0 * 256f64.log10()).abs() < 1e-6);
    }
}
