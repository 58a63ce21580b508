//! Reading pixels from tiled slides: TIFF (SVS, generic pyramidal TIFF) and DICOM WSI.
//!
//! The fast path: a JPEG tile's compressed bytes are read straight from the file (positioned reads,
//! no lock, so many threads decode at once) and decoded with zune-jpeg, with the TIFF's shared
//! JPEG tables spliced in front. The photometric tag decides the colours: Aperio writes RGB
//! samples into JPEG without an Adobe marker, which a decoder would take for YCbCr, so for
//! `Photometric = RGB` the samples are taken as they are, without a colour conversion. Tiles in
//! other compressions (deflate, LZW, none …) are decoded by the `tiff` crate.

use super::{Directory, SlideError, directory, pyramid};
use lru::LruCache;
use std::fs::File;
use std::io::BufReader;
use std::num::NonZeroUsize;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tiff::decoder::{Decoder, DecodingResult};
use tiff::tags::Tag;
use zune_core::colorspace::ColorSpace;
use zune_core::options::DecoderOptions;

const JPEG: u16 = 7;
/// Decoded tiles kept by default (about 48 MB of 256 x 256 tiles).
const CACHED_TILES: NonZeroUsize = NonZeroUsize::new(256).unwrap();
const PHOTOMETRIC_RGB: u16 = 2;
/// Largest tile side the fast path reads (real slides use 240-1024).
const MAX_TILE_SIDE: u32 = 8192;
/// Compressions the fast path decodes: none, LZW, JPEG, deflate (both codes), PackBits.
const DECODED: [u16; 6] = [1, 5, 7, 8, 32946, 32773];

/// One tiled level, with where its tiles are in the file.
#[derive(Debug)]
pub struct TiledLevel {
    pub width: u32,
    pub height: u32,
    pub tile_width: u32,
    pub tile_height: u32,
    /// Level-0 pixels per pixel of this level.
    pub downsample: f64,
    /// The file the level is in (DICOM keeps each level in its own file).
    file: usize,
    ifd: usize,
    offsets: Vec<u64>,
    counts: Vec<u64>,
    /// Abbreviated JPEG tables shared by the tiles (SOI … EOI), for JPEG levels.
    tables: Option<Vec<u8>>,
    compression: u16,
    photometric: u16,
}

impl TiledLevel {
    pub fn tiles_across(&self) -> u32 {
        self.width.div_ceil(self.tile_width)
    }

    pub fn tiles_down(&self) -> u32 {
        self.height.div_ceil(self.tile_height)
    }
}

/// An open tiled slide.
#[derive(Debug)]
pub struct TiledSlide {
    files: Vec<File>,
    pub levels: Vec<TiledLevel>,
    /// TIFF: for tiles the fast path does not decode.
    decoder: Option<Mutex<Decoder<BufReader<File>>>>,
    /// Recently decoded tiles: neighbouring regions share file tiles, which are decoded once.
    cache: Mutex<LruCache<(usize, u32, u32), Slot>>,
}

/// A cached tile, or the place it is being decoded into: the first thread to want a tile decodes
/// it while holding the slot, and threads that want it meanwhile wait for it instead of decoding
/// it again (neighbouring regions of one batch are read in parallel and share file tiles).
type Slot = Arc<Mutex<Option<Arc<Rgb>>>>;

/// An RGB image, 3 bytes per pixel, row by row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rgb {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
}

impl TiledSlide {
    /// Opens the slide's tiled levels. A slide whose levels are stored in strips (NDPI) is refused
    /// with a reason; it is not read at the wrong resolution or guessed at.
    pub fn open(path: &Path) -> Result<Self, SlideError> {
        super::guarded("the TIFF structure cannot be read", || {
            Self::open_unguarded(path)
        })
    }

    fn open_unguarded(path: &Path) -> Result<Self, SlideError> {
        let broken = |e: tiff::TiffError| {
            SlideError::Invalid(format!("the TIFF structure cannot be read: {e}"))
        };
        let io =
            |e: std::io::Error| SlideError::Invalid(format!("the slide cannot be opened: {e}"));
        let file = File::open(path).map_err(io)?;
        let mut decoder =
            Decoder::new(BufReader::new(file.try_clone().map_err(io)?)).map_err(broken)?;
        let mut directories: Vec<Directory> = Vec::new();
        let mut layouts = Vec::new();
        loop {
            directories.push(directory(&mut decoder).map_err(broken)?);
            layouts.push(layout(&mut decoder));
            if !decoder.more_images() || directories.len() >= 64 {
                break;
            }
            decoder.next_image().map_err(broken)?;
        }
        let chosen = pyramid(&directories);
        let mut levels = Vec::new();
        for (ifd, level) in chosen {
            let Some((offsets, counts, tables, compression, photometric)) = layouts[ifd].take()
            else {
                continue;
            };
            let (Some(tile_width), Some(tile_height)) = (level.tile_width, level.tile_height)
            else {
                continue;
            };
            if tile_width > MAX_TILE_SIDE || tile_height > MAX_TILE_SIDE {
                return Err(SlideError::Unsupported(format!(
                    "level {} has {tile_width} x {tile_height} tiles; onkos's tile reader reads at most {MAX_TILE_SIDE} a side",
                    levels.len()
                )));
            }
            if !DECODED.contains(&compression) {
                return Err(SlideError::Unsupported(format!(
                    "level {} is compressed with TIFF compression {compression}, which onkos's tile reader does not decode",
                    levels.len()
                )));
            }
            let expected =
                (level.width.div_ceil(tile_width) * level.height.div_ceil(tile_height)) as usize;
            if offsets.len() < expected || counts.len() < expected {
                return Err(SlideError::Invalid(format!(
                    "level {} lists {} tiles, its size needs {expected}",
                    levels.len(),
                    offsets.len()
                )));
            }
            levels.push(TiledLevel {
                width: level.width,
                height: level.height,
                tile_width,
                tile_height,
                downsample: level.downsample,
                file: 0,
                ifd,
                offsets,
                counts,
                tables,
                compression,
                photometric,
            });
        }
        if levels.is_empty() {
            return Err(SlideError::Unsupported(
                "the slide's levels are stored in strips, not tiles, and onkos's tile reader reads tiled levels"
                    .into(),
            ));
        }
        Ok(Self {
            files: vec![file],
            levels,
            decoder: Some(Mutex::new(decoder)),
            cache: Mutex::new(LruCache::new(CACHED_TILES)),
        })
    }

    /// One tile, decoded to RGB at the level's full tile size (edge tiles include the padding the
    /// file stores).
    pub fn tile(&self, level: usize, col: u32, row: u32) -> Result<Rgb, SlideError> {
        super::guarded(
            &format!("tile {col},{row} of level {level} cannot be read"),
            || self.tile_unguarded(level, col, row),
        )
    }

    fn tile_unguarded(&self, level: usize, col: u32, row: u32) -> Result<Rgb, SlideError> {
        let l = self
            .levels
            .get(level)
            .ok_or_else(|| SlideError::Invalid(format!("no level {level}")))?;
        if col >= l.tiles_across() || row >= l.tiles_down() {
            return Err(SlideError::Invalid(format!(
                "tile ({col}, {row}) is outside level {level}"
            )));
        }
        let index = (row * l.tiles_across() + col) as usize;
        let pixels = if l.counts.get(index) == Some(&0) {
            // A sparse image's missing tile: background.
            vec![255_u8; (l.tile_width * l.tile_height * 3) as usize]
        } else if l.compression == JPEG {
            self.jpeg_tile(l, index)?
        } else if let Some(decoder) = &self.decoder {
            self.other_tile(decoder, l, index)?
        } else {
            self.raw_tile(l, index)?
        };
        let expected = (l.tile_width * l.tile_height * 3) as usize;
        if pixels.len() != expected {
            return Err(SlideError::Invalid(format!(
                "tile {index} of level {level} decoded to {} bytes, not {expected}",
                pixels.len()
            )));
        }
        Ok(Rgb {
            width: l.tile_width,
            height: l.tile_height,
            pixels,
        })
    }

    fn jpeg_tile(&self, l: &TiledLevel, index: usize) -> Result<Vec<u8>, SlideError> {
        let (offset, count) = (l.offsets[index], l.counts[index]);
        let count = usize::try_from(count)
            .ok()
            .filter(|c| *c >= 4 && *c <= 64 << 20)
            .ok_or_else(|| SlideError::Invalid(format!("tile {index} has {count} bytes")))?;
        let mut tile = vec![0_u8; count];
        self.files[l.file]
            .read_exact_at(&mut tile, offset)
            .map_err(|e| {
                SlideError::Invalid(format!(
                    "tile {index} cannot be read (truncated file?): {e}"
                ))
            })?;
        // An abbreviated tile (SOI, scan, EOI) gets the shared tables spliced in after its SOI.
        let stream = match &l.tables {
            Some(tables) if tables.len() > 4 && tile.starts_with(&[0xFF, 0xD8]) => {
                let mut joined = Vec::with_capacity(tables.len() + tile.len());
                joined.extend_from_slice(&tables[..tables.len() - 2]);
                joined.extend_from_slice(&tile[2..]);
                joined
            }
            _ => tile,
        };
        // For RGB samples, "YCbCr out" means no colour conversion at all: the samples as stored.
        let out = if l.photometric == PHOTOMETRIC_RGB {
            ColorSpace::YCbCr
        } else {
            ColorSpace::RGB
        };
        let options = DecoderOptions::default()
            .set_max_width(1 << 16)
            .set_max_height(1 << 16);
        let mut decoder = zune_jpeg::JpegDecoder::new_with_options(stream.as_slice(), options);
        // A stream whose Adobe marker says RGB is taken as RGB by the decoder already; only an
        // unmarked one needs "no conversion".
        let out = if adobe_rgb(&stream) {
            ColorSpace::RGB
        } else {
            out
        };
        decoder.set_options(options.jpeg_set_out_colorspace(out));
        let pixels = decoder.decode().map_err(|e| {
            SlideError::Invalid(format!("tile {index} is not a readable JPEG: {e:?}"))
        })?;
        match decoder.get_output_colorspace() {
            Some(ColorSpace::Luma) => Ok(pixels.iter().flat_map(|&v| [v, v, v]).collect()),
            _ => Ok(pixels),
        }
    }

    /// An uncompressed tile of interleaved RGB bytes (DICOM native frames).
    fn raw_tile(&self, l: &TiledLevel, index: usize) -> Result<Vec<u8>, SlideError> {
        let mut tile = vec![0_u8; (l.tile_width * l.tile_height * 3) as usize];
        if l.counts[index] < tile.len() as u64 {
            return Err(SlideError::Invalid(format!(
                "tile {index} has {} bytes, not {}",
                l.counts[index],
                tile.len()
            )));
        }
        self.files[l.file]
            .read_exact_at(&mut tile, l.offsets[index])
            .map_err(|e| {
                SlideError::Invalid(format!(
                    "tile {index} cannot be read (truncated file?): {e}"
                ))
            })?;
        Ok(tile)
    }

    fn other_tile(
        &self,
        decoder: &Mutex<Decoder<BufReader<File>>>,
        l: &TiledLevel,
        index: usize,
    ) -> Result<Vec<u8>, SlideError> {
        let broken = |e: tiff::TiffError| SlideError::Invalid(format!("tile {index}: {e}"));
        let mut decoder = decoder
            .lock()
            .map_err(|_| SlideError::Invalid("the tile decoder failed earlier".into()))?;
        decoder.seek_to_image(l.ifd).map_err(broken)?;
        let samples = decoder
            .get_tag_u32(Tag::SamplesPerPixel)
            .unwrap_or(1)
            .max(1) as usize;
        let DecodingResult::U8(data) = decoder.read_chunk(index as u32).map_err(broken)? else {
            return Err(SlideError::Unsupported(
                "only 8-bit samples are read".into(),
            ));
        };
        // Chunks at the edge may come back cropped; pad them to the full tile.
        let (tw, th) = (l.tile_width as usize, l.tile_height as usize);
        let pixel_count = data.len() / samples;
        let (cw, ch) = if pixel_count == tw * th {
            (tw, th)
        } else {
            let cw = decoder.chunk_data_dimensions(index as u32).0 as usize;
            (cw, pixel_count / cw.max(1))
        };
        let mut rgb = vec![255_u8; tw * th * 3];
        for y in 0..ch.min(th) {
            for x in 0..cw.min(tw) {
                let s = &data[(y * cw + x) * samples..];
                let px = if samples >= 3 {
                    [s[0], s[1], s[2]]
                } else {
                    [s[0]; 3]
                };
                rgb[(y * tw + x) * 3..][..3].copy_from_slice(&px);
            }
        }
        Ok(rgb)
    }

    /// Keeps up to `tiles` decoded tiles (at least the default), e.g. a few rows of the level a
    /// grid is read from.
    pub fn keep_tiles(&self, tiles: usize) {
        if let (Ok(mut cache), Some(n)) = (self.cache.lock(), NonZeroUsize::new(tiles)) {
            cache.resize(n.max(CACHED_TILES));
        }
    }

    fn cached_tile(&self, level: usize, col: u32, row: u32) -> Result<Arc<Rgb>, SlideError> {
        let key = (level, col, row);
        let slot: Slot = {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(cache.get_or_insert(key, Slot::default))
        };
        // Decoded under the slot's lock, not the cache's: other tiles are decoded meanwhile. A
        // failed decode leaves the slot empty, and the next thread that wants the tile tries again.
        let mut tile = slot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tile) = &*tile {
            return Ok(Arc::clone(tile));
        }
        let decoded = Arc::new(self.tile(level, col, row)?);
        *tile = Some(Arc::clone(&decoded));
        Ok(decoded)
    }

    /// The file tiles (column, row) that square regions of `side` pixels at `corners` on
    /// `level` cover, each once.
    pub fn tiles_covering(
        &self,
        level: usize,
        corners: &[(u32, u32)],
        side: u32,
    ) -> Vec<(u32, u32)> {
        let Some(l) = self.levels.get(level) else {
            return Vec::new();
        };
        let mut tiles: Vec<(u32, u32)> = corners
            .iter()
            .filter(|&&(x, y)| x < l.width && y < l.height && side > 0)
            .flat_map(|&(x, y)| {
                let (x_end, y_end) = ((x + side).min(l.width), (y + side).min(l.height));
                (y / l.tile_height..=(y_end - 1) / l.tile_height).flat_map(move |row| {
                    (x / l.tile_width..=(x_end - 1) / l.tile_width).map(move |col| (col, row))
                })
            })
            .collect();
        tiles.sort_unstable();
        tiles.dedup();
        tiles
    }

    /// Grows the tile cache to at least `tiles` (never shrinks it).
    pub fn reserve_tiles(&self, tiles: usize) {
        if let Ok(mut cache) = self.cache.lock()
            && let Some(n) = NonZeroUsize::new(tiles)
            && n > cache.cap()
        {
            cache.resize(n);
        }
    }

    /// Decodes a file tile into the cache unless it is there (errors are left for `region`).
    pub fn warm(&self, level: usize, col: u32, row: u32) {
        let _ = self.cached_tile(level, col, row);
    }

    /// A region of a level, in that level's pixels, composed from its tiles. What lies outside
    /// the level is white (background).
    pub fn region(
        &self,
        level: usize,
        x: u32,
        y: u32,
        width: u32,
        height: u32,
    ) -> Result<Rgb, SlideError> {
        let l = self
            .levels
            .get(level)
            .ok_or_else(|| SlideError::Invalid(format!("no level {level}")))?;
        let mut out = vec![255_u8; (width * height * 3) as usize];
        let (x_end, y_end) = ((x + width).min(l.width), (y + height).min(l.height));
        if x >= x_end || y >= y_end {
            return Ok(Rgb {
                width,
                height,
                pixels: out,
            });
        }
        for row in y / l.tile_height..=(y_end - 1) / l.tile_height {
            for col in x / l.tile_width..=(x_end - 1) / l.tile_width {
                let tile = self.cached_tile(level, col, row)?;
                let (tx, ty) = (col * l.tile_width, row * l.tile_height);
                let (from_x, to_x) = (x.max(tx), x_end.min(tx + l.tile_width));
                for py in y.max(ty)..y_end.min(ty + l.tile_height) {
                    let src = (((py - ty) * l.tile_width + (from_x - tx)) * 3) as usize;
                    let dst = (((py - y) * width + (from_x - x)) * 3) as usize;
                    let n = ((to_x - from_x) * 3) as usize;
                    out[dst..dst + n].copy_from_slice(&tile.pixels[src..src + n]);
                }
            }
        }
        Ok(Rgb {
            width,
            height,
            pixels: out,
        })
    }
}

impl TiledSlide {
    /// Opens a DICOM WSI from its instances (one per level; thumbnails, labels and overviews are
    /// left out). All levels must be of one series and keep the base level's aspect ratio.
    pub fn open_dicom(paths: &[std::path::PathBuf]) -> Result<Self, SlideError> {
        Self::open_dicom_series(paths).map(|(slide, _)| slide)
    }

    /// Like `open_dicom`, with what the base level's instance says about the slide (resolution,
    /// objective, manufacturer), read in the same pass.
    pub fn open_dicom_series(
        paths: &[std::path::PathBuf],
    ) -> Result<(Self, super::dicom::SeriesFacts), SlideError> {
        let mut instances = Vec::new();
        let mut skipped = None;
        for path in paths {
            // In an archive of several files, DICOM files that are not WSI images onkos reads
            // (a DICOMDIR, annotations, a label in another codec) are left out, not fatal.
            let instance = match super::dicom::open_instance(path) {
                Ok(instance) => instance,
                Err(SlideError::Unsupported(why)) if paths.len() > 1 => {
                    skipped.get_or_insert(why);
                    continue;
                }
                Err(e) => return Err(e),
            };
            if instance.flavour == "VOLUME" {
                let file = File::open(path)
                    .map_err(|e| SlideError::Invalid(format!("the slide cannot be opened: {e}")))?;
                instances.push((instance, file));
            }
        }
        instances.sort_by_key(|(i, _)| std::cmp::Reverse(u64::from(i.width) * u64::from(i.height)));
        let Some((base, _)) = instances.first() else {
            return Err(match skipped {
                Some(why) => SlideError::Unsupported(format!(
                    "no DICOM file of the archive is a WSI image onkos reads ({why})"
                )),
                None => SlideError::Invalid(
                    "the DICOM upload has no VOLUME image (only thumbnails, labels or overviews)"
                        .into(),
                ),
            });
        };
        let (series, base_width, base_height) = (base.series.clone(), base.width, base.height);
        let facts = super::dicom::SeriesFacts {
            mpp: base.mpp,
            objective: base.objective,
            manufacturer: base.manufacturer.clone(),
        };
        let mut files = Vec::new();
        let mut levels: Vec<TiledLevel> = Vec::new();
        for (instance, file) in instances {
            if instance.series != series {
                return Err(SlideError::Invalid(
                    "the DICOM instances belong to different series (slides)".into(),
                ));
            }
            let downsample = f64::from(base_width) / f64::from(instance.width);
            let aspect = f64::from(base_height) / f64::from(instance.height) / downsample;
            if (aspect - 1.0).abs() > 0.02
                || levels.last().is_some_and(|l| l.width == instance.width)
            {
                continue;
            }
            let (offsets, counts) = instance.tiles.iter().copied().unzip();
            levels.push(TiledLevel {
                width: instance.width,
                height: instance.height,
                tile_width: instance.tile_width,
                tile_height: instance.tile_height,
                downsample,
                file: files.len(),
                ifd: 0,
                offsets,
                counts,
                tables: None,
                compression: instance.compression,
                photometric: instance.photometric,
            });
            files.push(file);
        }
        let slide = Self {
            files,
            levels,
            decoder: None,
            cache: Mutex::new(LruCache::new(CACHED_TILES)),
        };
        Ok((slide, facts))
    }
}

/// Whether a JPEG stream has an Adobe APP14 marker with transform 0 (its samples are RGB), among
/// the markers before its scan.
fn adobe_rgb(stream: &[u8]) -> bool {
    let mut at = 2;
    while at + 4 <= stream.len() && stream[at] == 0xFF {
        let marker = stream[at + 1];
        if marker == 0xDA || marker == 0xD9 {
            return false;
        }
        let len = usize::from(u16::from_be_bytes([stream[at + 2], stream[at + 3]]));
        if len < 2 {
            return false;
        }
        let payload = stream
            .get(at + 4..(at + 2 + len).min(stream.len()))
            .unwrap_or(&[]);
        if marker == 0xEE && payload.len() >= 12 && payload.starts_with(b"Adobe") {
            return payload[11] == 0;
        }
        at += 2 + len;
    }
    false
}

type Layout = (Vec<u64>, Vec<u64>, Option<Vec<u8>>, u16, u16);

/// Where the current directory's tiles are, if it is tiled.
fn layout(d: &mut Decoder<BufReader<File>>) -> Option<Layout> {
    let offsets = d.get_tag_u64_vec(Tag::TileOffsets).ok()?;
    let counts = d.get_tag_u64_vec(Tag::TileByteCounts).ok()?;
    let tables = d.get_tag_u8_vec(Tag::JPEGTables).ok();
    let compression = d.get_tag_u32(Tag::Compression).ok()? as u16;
    let photometric = d.get_tag_u32(Tag::PhotometricInterpretation).unwrap_or(2) as u16;
    Some((offsets, counts, tables, compression, photometric))
}

impl Rgb {
    /// PNG bytes of the image.
    pub fn png(&self) -> Result<Vec<u8>, SlideError> {
        let mut out = std::io::Cursor::new(Vec::new());
        image::write_buffer_with_format(
            &mut out,
            &self.pixels,
            self.width,
            self.height,
            image::ExtendedColorType::Rgb8,
            image::ImageFormat::Png,
        )
        .map_err(|e| SlideError::Invalid(format!("the picture cannot be encoded: {e}")))?;
        Ok(out.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::adobe_rgb;

    #[test]
    fn jpeg_markers_are_scanned_without_trusting_their_lengths() {
        // An Adobe marker saying RGB (transform 0), and one saying YCbCr.
        let mut rgb = vec![0xFF, 0xD8, 0xFF, 0xEE, 0x00, 0x0E];
        rgb.extend_from_slice(b"Adobe\x00\x64\x00\x00\x00\x00\x00");
        assert!(adobe_rgb(&rgb));
        let mut ycc = rgb.clone();
        ycc[17] = 1;
        assert!(!adobe_rgb(&ycc));
        // Lengths of 0 and 1, or past the end, end the scan instead of the process.
        for broken in [
            vec![0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x00],
            vec![0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x01],
            vec![0xFF, 0xD8, 0xFF, 0xEE, 0xFF, 0xFF, b'A'],
            vec![0xFF, 0xD8],
        ] {
            assert!(!adobe_rgb(&broken));
        }
    }
}
