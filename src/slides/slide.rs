//! An open slide, whichever reader reads it: onkos's own tile reader (the fast path) when it reads
//! every level of the file, OpenSlide in isolated processes otherwise.

use super::archive::{self, Contents};
use super::openslide::OpenSlideSlide;
use super::read::{Rgb, TiledSlide};
use super::{SNIFF_LEN, SlideError, Sniffed, sniff};
use std::io::Read;
use std::path::Path;

/// The size of one level, level 0 being full resolution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LevelSize {
    pub width: u32,
    pub height: u32,
    /// Level-0 pixels per pixel of this level.
    pub downsample: f64,
}

#[derive(Debug)]
enum Source {
    Tiff(Box<TiledSlide>),
    OpenSlide(OpenSlideSlide),
}

#[derive(Debug)]
pub struct Slide {
    pub levels: Vec<LevelSize>,
    source: Source,
    reader: String,
}

impl Slide {
    /// Opens the slide. `processes` is how many OpenSlide reader processes read in parallel when
    /// the slide needs OpenSlide (the fast path reads on any number of threads).
    pub fn open(path: &Path, processes: usize) -> Result<Self, SlideError> {
        let mut head = Vec::with_capacity(SNIFF_LEN);
        std::fs::File::open(path)
            .and_then(|f| f.take(SNIFF_LEN as u64).read_to_end(&mut head))
            .map_err(|e| SlideError::Invalid(format!("the slide cannot be opened: {e}")))?;
        let fast = match sniff(&head) {
            Sniffed::Tiff => match TiledSlide::open(path) {
                Ok(slide) => return Ok(Self::tiled(slide, "onkos-tiff")),
                Err(SlideError::Unsupported(why)) => Some(why),
                Err(e) => return Err(e),
            },
            Sniffed::Dicom => {
                let slide = TiledSlide::open_dicom(&[path.to_path_buf()])?;
                return Ok(Self::tiled(slide, "onkos-dicom"));
            }
            Sniffed::Zip => match archive::unpacked(path, archive::REOPEN_LIMIT)? {
                Contents::Dicom(files) => {
                    return Ok(Self::tiled(TiledSlide::open_dicom(&files)?, "onkos-dicom"));
                }
                Contents::Mirax(mrxs) => return Self::open_with_openslide(&mrxs, processes, None),
            },
            Sniffed::Unknown => None,
        };
        Self::open_with_openslide(path, processes, fast)
    }

    fn open_with_openslide(
        path: &Path,
        processes: usize,
        fast: Option<String>,
    ) -> Result<Self, SlideError> {
        let slide = OpenSlideSlide::open(path, processes).map_err(|e| match (e, &fast) {
            (SlideError::Unsupported(why), Some(fast)) => {
                SlideError::Unsupported(format!("{fast}; {why}"))
            }
            (e, _) => e,
        })?;
        let levels = slide
            .header
            .levels
            .iter()
            .map(|&(width, height, downsample)| LevelSize {
                width,
                height,
                downsample,
            })
            .collect();
        Ok(Self {
            levels,
            reader: format!("openslide-{}", slide.header.version),
            source: Source::OpenSlide(slide),
        })
    }

    fn tiled(slide: TiledSlide, reader: &str) -> Self {
        let levels = slide
            .levels
            .iter()
            .map(|l| LevelSize {
                width: l.width,
                height: l.height,
                downsample: l.downsample,
            })
            .collect();
        Self {
            levels,
            source: Source::Tiff(Box::new(slide)),
            reader: reader.into(),
        }
    }

    /// `onkos-tiff` or `onkos-dicom` (the fast path), or `openslide-<version>`.
    pub fn reader(&self) -> String {
        self.reader.clone()
    }

    /// A region of a level, in that level's pixels; white outside the slide.
    pub fn region(
        &self,
        level: usize,
        x: u32,
        y: u32,
        width: u32,
        height: u32,
    ) -> Result<Rgb, SlideError> {
        match &self.source {
            Source::Tiff(t) => t.region(level, x, y, width, height),
            Source::OpenSlide(s) => Ok(Rgb {
                width,
                height,
                pixels: s.region(level, x, y, width, height)?,
            }),
        }
    }

    /// Decodes the file tiles that square regions of `side` pixels at `corners` cover, in
    /// parallel, ahead of reading the regions (the fast path; OpenSlide reads regions whole).
    pub fn prefetch(&self, level: usize, corners: &[(u32, u32)], side: u32) {
        use rayon::prelude::*;
        if let Source::Tiff(t) = &self.source {
            let tiles = t.tiles_covering(level, corners, side);
            // Room for this batch's tiles and the next one's: none is evicted before its regions
            // are composed.
            t.reserve_tiles(2 * tiles.len());
            tiles
                .par_iter()
                .for_each(|&(col, row)| t.warm(level, col, row));
        }
    }

    /// Keeps decoded tiles for about `rows` rows of regions `side` pixels high on `level`, so
    /// neighbouring regions decode each file tile once.
    pub fn keep_rows(&self, level: usize, rows: u32) {
        if let Source::Tiff(t) = &self.source
            && let Some(l) = t.levels.get(level)
        {
            t.keep_tiles((l.tiles_across() * rows) as usize);
        }
    }

    /// The whole slide, downscaled so that its long side is at most `max_side` pixels, read from
    /// the coarsest level. Refused when even that level is too large to read whole.
    pub fn overview(&self, max_side: u32) -> Result<Rgb, SlideError> {
        let (index, level) = self
            .levels
            .iter()
            .enumerate()
            .next_back()
            .ok_or_else(|| SlideError::Invalid("the slide has no level".into()))?;
        if u64::from(level.width) * u64::from(level.height) > 64 << 20 {
            return Err(SlideError::Unsupported(format!(
                "the slide's coarsest level ({} x {}) is too large for an overview",
                level.width, level.height
            )));
        }
        let whole = self.region(index, 0, 0, level.width, level.height)?;
        let scale = f64::from(max_side) / f64::from(level.width.max(level.height));
        if scale >= 1.0 {
            return Ok(whole);
        }
        let width = ((f64::from(level.width) * scale).round() as u32).max(1);
        let height = ((f64::from(level.height) * scale).round() as u32).max(1);
        let image = image::RgbImage::from_raw(whole.width, whole.height, whole.pixels)
            .ok_or_else(|| SlideError::Invalid("the overview does not fit its size".into()))?;
        let small =
            image::imageops::resize(&image, width, height, image::imageops::FilterType::Triangle);
        Ok(Rgb {
            width,
            height,
            pixels: small.into_raw(),
        })
    }
}
