//! Entry points for fuzzing the parsers onkos owns: model manifests, JSON features, CSV batches,
//! the TIFF tile directory (the fast path's reader), tile-embedding bags and slide archives. Each
//! takes arbitrary bytes and must return (an error is fine) without panicking, hanging or
//! allocating without bound.
//!
//! `tests/fuzz` runs them under libFuzzer (`make fuzz`, for as long as one likes); the unit test
//! below replays the committed corpus and a few thousand deterministic mutations of it on every
//! `make test`.

use crate::domain::contract::Manifest;
use std::path::PathBuf;
use std::sync::OnceLock;

/// A bundled manifest with numeric and categorical inputs (GBSG2: `horTh`, `menostat`, `tgrade`).
fn gbsg2() -> &'static Manifest {
    static MANIFEST: OnceLock<Manifest> = OnceLock::new();
    MANIFEST.get_or_init(|| {
        serde_json::from_str(include_str!(
            "../models/breast-recurrence-gbsg2/manifest.json"
        ))
        .unwrap_or_else(|e| panic!("the bundled GBSG2 manifest does not parse: {e}"))
    })
}

/// A model manifest as `POST /v1/models` receives it: parsed, checked, its input schema derived.
pub fn manifest(data: &[u8]) {
    if let Ok(manifest) = serde_json::from_slice::<Manifest>(data)
        && manifest.check().is_ok()
    {
        let _ = manifest.input_schema();
        let _ = manifest.column_labels();
    }
}

/// A JSON features object checked against a bundled model's contract.
pub fn features(data: &[u8]) {
    if let Ok(serde_json::Value::Object(features)) = serde_json::from_slice(data) {
        let _ = gbsg2().validate_features(&features);
    }
}

/// A CSV batch against a bundled model's contract.
pub fn csv_batch(data: &[u8]) {
    let _ = crate::domain::batch::csv_rows(gbsg2(), data);
}

/// Tile embeddings as `POST /v1/embeddings` receives them (safetensors).
pub fn embeddings(data: &[u8]) {
    let _ = crate::slides::embeddings::parse(data);
}

/// A file written where the readers expect one; removed (with anything extracted beside it)
/// when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(data: &[u8]) -> Option<Self> {
        let path = std::env::temp_dir().join(format!(
            "onkos-fuzz-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&path, data).ok()?;
        Some(Self(path))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = std::fs::remove_dir_all(crate::slides::archive::folder_of(&self.0));
    }
}

/// A TIFF as an upload is inspected, then opened by the tile reader, which reads the first and
/// last tile of every level.
pub fn tiff(data: &[u8]) {
    let _ = crate::slides::inspect(std::io::Cursor::new(data));
    let Some(file) = Scratch::new(data) else {
        return;
    };
    if let Ok(slide) = crate::slides::read::TiledSlide::open(&file.0) {
        read_corners(&slide);
    }
}

/// A DICOM WSI instance opened as an upload's inspection opens it (its header walk, data set and
/// frame table), then the first and last tile of every level read.
pub fn dicom(data: &[u8]) {
    let Some(file) = Scratch::new(data) else {
        return;
    };
    if let Ok((slide, _)) =
        crate::slides::read::TiledSlide::open_dicom_series(std::slice::from_ref(&file.0))
    {
        read_corners(&slide);
    }
}

fn read_corners(slide: &crate::slides::read::TiledSlide) {
    for (level, tiles) in slide.levels.iter().enumerate() {
        let _ = slide.tile(level, 0, 0);
        let (across, down) = (tiles.tiles_across(), tiles.tiles_down());
        if across > 0 && down > 0 {
            let _ = slide.tile(level, across - 1, down - 1);
        }
    }
}

/// A slide archive (zip) extracted under a small limit.
pub fn archive(data: &[u8]) {
    if let Some(file) = Scratch::new(data) {
        let _ = crate::slides::archive::unpacked(&file.0, 16 << 20);
    }
}

/// A fuzz target: bytes in, nothing out.
pub type Target = fn(&[u8]);

/// Every target, by the name of its corpus folder.
pub const TARGETS: [(&str, Target); 7] = [
    ("manifest", manifest),
    ("features", features),
    ("csv_batch", csv_batch),
    ("embeddings", embeddings),
    ("tiff", tiff),
    ("dicom", dicom),
    ("archive", archive),
];

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Deterministic variations of a seed: bytes flipped, cut, repeated, spliced with others.
    fn mutate(seed: &[u8], state: &mut u64, others: &[Vec<u8>]) -> Vec<u8> {
        let mut next = || {
            *state ^= *state << 13;
            *state ^= *state >> 7;
            *state ^= *state << 17;
            *state
        };
        let mut out = seed.to_vec();
        for _ in 0..1 + next() % 4 {
            let len = out.len().max(1) as u64;
            match next() % 6 {
                0 if !out.is_empty() => {
                    let at = (next() % len) as usize;
                    out[at] ^= 1 << (next() % 8);
                }
                1 => out.truncate((next() % len) as usize),
                2 if !out.is_empty() => {
                    let at = (next() % len) as usize;
                    out[at] = [0, 0xFF, b'"', b',', b'\n', b'{', b'9'][(next() % 7) as usize];
                }
                3 => {
                    let at = (next() % (len + 1)) as usize;
                    let at = at.min(out.len());
                    let chunk: Vec<u8> = out[at..].iter().take(64).copied().collect();
                    out.splice(at..at, chunk);
                }
                4 if !others.is_empty() => {
                    let other = &others[(next() % others.len() as u64) as usize];
                    let at = (next() % len) as usize;
                    out.truncate(at.min(out.len()));
                    out.extend(other.iter().skip(at).take(4096));
                }
                _ => {
                    let at = (next() % len) as usize;
                    let value = (next() as u32).to_le_bytes();
                    for (i, b) in value.iter().enumerate() {
                        if let Some(slot) = out.get_mut(at + i) {
                            *slot = *b;
                        }
                    }
                }
            }
        }
        out
    }

    #[test]
    fn every_target_survives_its_corpus_and_mutations_of_it() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz/corpus");
        for (name, target) in TARGETS {
            let folder = root.join(name);
            let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(&folder)
                .unwrap_or_else(|e| panic!("{}: {e}", folder.display()))
                .map(|entry| std::fs::read(entry.unwrap().path()).unwrap())
                .collect();
            seeds.sort();
            assert!(!seeds.is_empty(), "{name} has no corpus");
            let mut state = 0x9E37_79B9_7F4A_7C15_u64;
            for seed in &seeds {
                target(seed);
                // Fewer variations of the slower file-based targets.
                let variations = if matches!(name, "tiff" | "archive") {
                    200
                } else {
                    2000
                };
                for _ in 0..variations {
                    target(&mutate(seed, &mut state, &seeds));
                }
            }
        }
    }
}
