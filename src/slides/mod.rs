//! Whole-slide images: recognising a file's format from its first bytes, and reading its pyramid
//! (levels, tile sizes), resolution (µm per pixel) and objective from its TIFF structure.

#[cfg(feature = "service")]
pub mod analyse;
pub mod archive;
#[cfg(feature = "service")]
pub mod bench;
pub mod dicom;
pub mod embeddings;
#[cfg(feature = "service")]
pub mod heatmap;
#[cfg(feature = "service")]
pub mod openslide;
pub mod read;
#[cfg(feature = "service")]
pub mod slide;
pub mod stain;

use serde::{Deserialize, Serialize};
use std::io::{Read, Seek};
use tiff::decoder::Decoder;
use tiff::tags::Tag;

/// What the first bytes of a file say it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    /// Classic or BigTIFF, either byte order: SVS, NDPI, generic pyramidal TIFF, …
    Tiff,
    /// DICOM Part 10 (`DICM` after the 128-byte preamble).
    Dicom,
    /// A zip archive (how a MIRAX slide, a folder of files, is uploaded).
    Zip,
    Unknown,
}

/// Bytes needed to tell the formats apart.
pub const SNIFF_LEN: usize = 132;

pub fn sniff(head: &[u8]) -> Sniffed {
    match head {
        [b'I', b'I', 42, 0, ..]
        | [b'M', b'M', 0, 42, ..]
        | [b'I', b'I', 43, 0, ..]
        | [b'M', b'M', 0, 43, ..] => Sniffed::Tiff,
        [b'P', b'K', 3, 4, ..] => Sniffed::Zip,
        _ if head.len() >= SNIFF_LEN && &head[128..132] == b"DICM" => Sniffed::Dicom,
        _ => Sniffed::Unknown,
    }
}

/// One level of the pyramid, level 0 being full resolution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Level {
    pub width: u32,
    pub height: u32,
    /// Level-0 pixels per pixel of this level.
    pub downsample: f64,
    /// Present when the level is stored in tiles (absent: in strips).
    pub tile_width: Option<u32>,
    pub tile_height: Option<u32>,
}

/// What onkos knows about a slide from its file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlideInfo {
    /// `aperio-svs`, `hamamatsu-ndpi`, `generic-tiff` or `dicom-wsi`.
    pub format: String,
    pub vendor: Option<String>,
    pub levels: Vec<Level>,
    /// Micrometres per level-0 pixel, when the file states it.
    pub mpp_x: Option<f64>,
    pub mpp_y: Option<f64>,
    /// Objective magnification the slide was scanned at, when the file states it.
    pub objective: Option<f64>,
}

/// Why a file is not a slide onkos can read.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SlideError {
    /// Readable, but not a format onkos reads (yet): 415.
    #[error("{0}")]
    Unsupported(String),
    /// Claims a supported format but is broken, truncated or not a whole-slide image: 422.
    #[error("{0}")]
    Invalid(String),
    /// The server's fault, not the file's (a reader that cannot start, a full disk): 500.
    #[error("{0}")]
    Internal(String),
}

/// One image file directory, as read.
#[derive(Debug)]
struct Directory {
    width: u32,
    height: u32,
    tile: Option<(u32, u32)>,
    description: Option<String>,
    /// Pixels per centimetre, when stated.
    x_per_cm: Option<f64>,
    y_per_cm: Option<f64>,
    /// Hamamatsu's source-lens tag (objective; -1 for the macro image).
    source_lens: Option<f64>,
}

/// Runs third-party decoding of untrusted bytes: a panic inside it (a decoder bug a crafted file
/// triggers; libFuzzer found one in the `tiff` crate) becomes the file's error, not a failed
/// request or a lost worker thread.
pub(crate) fn guarded<T>(
    what: &str,
    decode: impl FnOnce() -> Result<T, SlideError>,
) -> Result<T, SlideError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(decode)).unwrap_or_else(|_| {
        Err(SlideError::Invalid(format!(
            "{what}: the decoder failed on this file"
        )))
    })
}

/// Reads the slide's structure (not its pixels). Blocking: run it off the async threads.
pub fn inspect(file: impl Read + Seek) -> Result<SlideInfo, SlideError> {
    guarded("the TIFF structure cannot be read", || {
        inspect_unguarded(file)
    })
}

fn inspect_unguarded(file: impl Read + Seek) -> Result<SlideInfo, SlideError> {
    let broken =
        |e: tiff::TiffError| SlideError::Invalid(format!("the TIFF structure cannot be read: {e}"));
    let mut decoder = Decoder::new(file).map_err(broken)?;
    let mut directories = Vec::new();
    loop {
        directories.push(directory(&mut decoder).map_err(broken)?);
        if !decoder.more_images() || directories.len() >= 64 {
            break;
        }
        decoder.next_image().map_err(broken)?;
    }
    let first = &directories[0];
    let description = first.description.clone().unwrap_or_default();
    let (format, vendor) = if description.starts_with("Aperio") {
        ("aperio-svs", Some("aperio"))
    } else if first.source_lens.is_some() {
        ("hamamatsu-ndpi", Some("hamamatsu"))
    } else {
        ("generic-tiff", None)
    };
    let levels: Vec<Level> = pyramid(&directories).into_iter().map(|(_, l)| l).collect();
    if levels.len() < 2 && levels[0].tile_width.is_none() {
        return Err(SlideError::Invalid(
            "not a whole-slide image: a single image stored in strips, neither tiled nor pyramidal"
                .into(),
        ));
    }
    let (mpp_x, mpp_y, objective) = if format == "aperio-svs" {
        let field = |name: &str| {
            description
                .split('|')
                .filter_map(|f| f.split_once('='))
                .find(|(k, _)| k.trim() == name)
                .and_then(|(_, v)| v.trim().parse::<f64>().ok())
                .filter(|v| v.is_finite() && *v > 0.0)
        };
        (field("MPP"), field("MPP"), field("AppMag"))
    } else {
        let mpp = |per_cm: Option<f64>| per_cm.filter(|p| *p > 0.0).map(|p| 10_000.0 / p);
        (
            mpp(first.x_per_cm),
            mpp(first.y_per_cm),
            first.source_lens.filter(|l| *l > 0.0),
        )
    };
    Ok(SlideInfo {
        format: format.into(),
        vendor: vendor.map(str::to_owned),
        levels,
        mpp_x: mpp_x.filter(|m| plausible_mpp(*m)),
        mpp_y: mpp_y.filter(|m| plausible_mpp(*m)),
        objective,
    })
}

/// Whether a resolution could come from a slide scanner. TIFF writers put 72 or 96 dots per inch
/// (353 or 265 µm/pixel) in files that say nothing about a microscope: such a value is taken as
/// unstated, so that a grid is never cut at it.
pub fn plausible_mpp(mpp: f64) -> bool {
    mpp.is_finite() && (0.01..=100.0).contains(&mpp)
}

fn directory<R: Read + Seek>(d: &mut Decoder<R>) -> tiff::TiffResult<Directory> {
    let (width, height) = d.dimensions()?;
    let tile = match (
        d.get_tag_u32(Tag::TileWidth).ok(),
        d.get_tag_u32(Tag::TileLength).ok(),
    ) {
        (Some(w), Some(h)) => Some((w, h)),
        _ => None,
    };
    // ResolutionUnit 2 = inch, 3 = centimetre; no unit means no physical size.
    let unit = d.get_tag_u32(Tag::ResolutionUnit).ok();
    let per_cm = |tag: Tag, d: &mut Decoder<R>| {
        let value = number(d, tag)?;
        match unit {
            Some(2) => Some(value / 2.54),
            Some(3) => Some(value),
            _ => None,
        }
    };
    let x_per_cm = per_cm(Tag::XResolution, d);
    let y_per_cm = per_cm(Tag::YResolution, d);
    Ok(Directory {
        width,
        height,
        tile,
        description: d.get_tag_ascii_string(Tag::ImageDescription).ok(),
        x_per_cm,
        y_per_cm,
        source_lens: number(d, Tag::Unknown(65421)),
    })
}

/// A numeric tag whatever its TIFF type (rationals for resolutions, a float for NDPI's lens).
fn number<R: Read + Seek>(d: &mut Decoder<R>, tag: Tag) -> Option<f64> {
    use tiff::decoder::ifd::Value;
    let value = match d.get_tag(tag).ok()? {
        Value::List(values) => values.into_iter().next()?,
        v => v,
    };
    let number = match value {
        Value::Rational(n, q) if q != 0 => f64::from(n) / f64::from(q),
        Value::SRational(n, q) if q != 0 => f64::from(n) / f64::from(q),
        Value::Float(f) => f64::from(f),
        Value::Double(f) => f,
        Value::Short(v) => f64::from(v),
        Value::Unsigned(v) => f64::from(v),
        Value::Signed(v) => f64::from(v),
        _ => return None,
    };
    number.is_finite().then_some(number)
}

/// The directories that are levels of the level-0 image: the same aspect ratio, stored the same
/// way (tiled or not), and, when a resolution is stated, one that scales with the size or is level
/// 0's own. This leaves out thumbnails, labels, macro pictures and maps.
fn pyramid(directories: &[Directory]) -> Vec<(usize, Level)> {
    let base = &directories[0];
    let level = |d: &Directory| Level {
        width: d.width,
        height: d.height,
        downsample: f64::from(base.width) / f64::from(d.width.max(1)),
        tile_width: d.tile.map(|t| t.0),
        tile_height: d.tile.map(|t| t.1),
    };
    let mut levels = vec![(0, level(base))];
    for (i, d) in directories.iter().enumerate().skip(1) {
        if d.width == 0 || d.height == 0 || d.width >= levels.last().map_or(u32::MAX, |l| l.1.width)
        {
            continue;
        }
        let by_width = f64::from(base.width) / f64::from(d.width);
        let by_height = f64::from(base.height) / f64::from(d.height);
        let same_aspect = (by_width / by_height - 1.0).abs() < 0.02;
        let same_storage = d.tile.is_some() == base.tile.is_some();
        let same_scale = match (base.x_per_cm, d.x_per_cm) {
            // Some writers copy level 0's resolution to every level; others scale it.
            (Some(b), Some(x)) if x > 0.0 => {
                (b / x / by_width - 1.0).abs() < 0.05 || (b / x - 1.0).abs() < 1e-6
            }
            _ => true,
        };
        let not_macro = d.source_lens.is_none_or(|l| l > 0.0);
        if same_aspect && same_storage && same_scale && not_macro {
            levels.push((i, level(d)));
        }
    }
    levels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_told_apart_by_their_first_bytes() {
        let mut dicom = vec![0_u8; 128];
        dicom.extend_from_slice(b"DICM");
        assert_eq!(sniff(&dicom), Sniffed::Dicom);
        assert_eq!(sniff(b"II*\0rest"), Sniffed::Tiff);
        assert_eq!(sniff(b"MM\0*rest"), Sniffed::Tiff);
        assert_eq!(sniff(b"II+\0bigtiff"), Sniffed::Tiff);
        assert_eq!(sniff(b"PK\x03\x04zip"), Sniffed::Zip);
        assert_eq!(sniff(b"%PDF-1.7"), Sniffed::Unknown);
        assert_eq!(sniff(b""), Sniffed::Unknown);
    }
}
