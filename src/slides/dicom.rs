//! DICOM whole-slide images (VL Whole Slide Microscopy, Supplement 145): one instance per pyramid
//! level, each a tiled image whose frames are the tiles.
//!
//! The attributes are read with dicom-rs; where the frames are in the file is found by walking the
//! data set's top-level elements to Pixel Data and its items (headers only, no pixel bytes), so
//! that tiles can then be read straight from the file like a TIFF's: JPEG baseline frames go to the
//! same decoder as SVS tiles, uncompressed frames are copied.

use super::SlideError;
use dicom_dictionary_std::tags;
use dicom_object::{InMemDicomObject, OpenFileOptions};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

/// VL Whole Slide Microscopy Image Storage.
pub const WSI_SOP_CLASS: &str = "1.2.840.10008.5.1.4.1.1.77.1.6";
const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
const JPEG_BASELINE: &str = "1.2.840.10008.1.2.4.50";
/// Largest tile side read (DICOM WSI tiles are 256-2048 in practice).
const MAX_TILE_SIDE: u32 = 8192;
/// Most tiles (or frames) one instance may have: 4 194 304, a 500 000-pixel square of 256-pixel tiles.
const MAX_TILES: u64 = 1 << 22;
/// Deepest nesting of sequences read: real WSI headers nest a few levels.
const MAX_DEPTH: u32 = 16;

/// What a series' base level says about the slide.
#[derive(Debug, Clone)]
pub struct SeriesFacts {
    /// µm per pixel (x, y).
    pub mpp: Option<(f64, f64)>,
    pub objective: Option<f64>,
    pub manufacturer: Option<String>,
}

/// One DICOM WSI instance: a level (or a thumbnail, label, overview).
#[derive(Debug, Clone)]
pub struct Instance {
    pub series: String,
    /// `VOLUME`, `THUMBNAIL`, `LABEL` or `OVERVIEW` (the third value of Image Type).
    pub flavour: String,
    pub width: u32,
    pub height: u32,
    pub tile_width: u32,
    pub tile_height: u32,
    /// µm per pixel of this instance (Pixel Spacing is in mm).
    pub mpp: Option<(f64, f64)>,
    pub objective: Option<f64>,
    pub manufacturer: Option<String>,
    /// TIFF codes, so the tile reader treats the frames like TIFF tiles: 7 JPEG, 1 none.
    pub compression: u16,
    /// TIFF codes: 2 RGB, 6 YCbCr.
    pub photometric: u16,
    /// Byte offset and length of each tile, row by row; length 0 where a sparse image has no
    /// frame (the tile is background).
    pub tiles: Vec<(u64, u64)>,
}

impl Instance {
    pub fn tiles_across(&self) -> u32 {
        self.width.div_ceil(self.tile_width)
    }

    pub fn tiles_down(&self) -> u32 {
        self.height.div_ceil(self.tile_height)
    }
}

fn invalid(why: impl Into<String>) -> SlideError {
    SlideError::Invalid(why.into())
}

/// Reads one instance's attributes and frame index. Refuses, with the reason, what onkos does not
/// read: other SOP classes, compressions other than JPEG baseline and none, several focal planes
/// or optical paths.
pub fn open_instance(path: &Path) -> Result<Instance, SlideError> {
    // The element walk comes first: it bounds the nesting that dicom-rs would recurse into.
    let file = File::open(path).map_err(|e| invalid(format!("the slide cannot be opened: {e}")))?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut reader = BufReader::new(file);
    let (pixel_at, pixel_length) = locate_pixel_data(&mut reader, size)?;
    let object = OpenFileOptions::new()
        .read_until(tags::PIXEL_DATA)
        .open_file(path)
        .map_err(|e| invalid(format!("the DICOM file cannot be read: {e}")))?;
    let syntax = object
        .meta()
        .transfer_syntax()
        .trim_end_matches('\0')
        .to_owned();
    let text = |tag| {
        object
            .get(tag)
            .and_then(|e| e.to_str().ok())
            .map(|s| s.trim().to_owned())
    };
    let number = |tag| object.get(tag).and_then(|e| e.to_int::<u32>().ok());
    if text(tags::SOP_CLASS_UID).as_deref() != Some(WSI_SOP_CLASS) {
        return Err(SlideError::Unsupported(
            "a DICOM file, but not a VL Whole Slide Microscopy image".into(),
        ));
    }
    let compression = match syntax.as_str() {
        JPEG_BASELINE => 7,
        EXPLICIT_LE => 1,
        other => {
            return Err(SlideError::Unsupported(format!(
                "DICOM transfer syntax {other} is not read (JPEG baseline and explicit little-endian are)"
            )));
        }
    };
    let photometric = match text(tags::PHOTOMETRIC_INTERPRETATION).as_deref() {
        Some("RGB") => 2,
        Some("YBR_FULL_422" | "YBR_FULL") if compression == 7 => 6,
        other => {
            return Err(SlideError::Unsupported(format!(
                "photometric interpretation {other:?} is not read"
            )));
        }
    };
    if number(tags::SAMPLES_PER_PIXEL) != Some(3) || number(tags::BITS_ALLOCATED) != Some(8) {
        return Err(SlideError::Unsupported(
            "only 8-bit, 3-sample (colour) DICOM slides are read".into(),
        ));
    }
    if compression == 1 && number(tags::PLANAR_CONFIGURATION).unwrap_or(0) != 0 {
        return Err(SlideError::Unsupported(
            "planar-configured uncompressed frames are not read".into(),
        ));
    }
    for (tag, what) in [
        (tags::TOTAL_PIXEL_MATRIX_FOCAL_PLANES, "focal planes"),
        (tags::NUMBER_OF_OPTICAL_PATHS, "optical paths"),
    ] {
        if number(tag).unwrap_or(1) > 1 {
            return Err(SlideError::Unsupported(format!(
                "a slide with several {what} is not read"
            )));
        }
    }
    let required = |tag, name: &str| {
        number(tag)
            .filter(|v| *v > 0)
            .ok_or_else(|| invalid(format!("the DICOM file has no {name}")))
    };
    let width = required(
        tags::TOTAL_PIXEL_MATRIX_COLUMNS,
        "Total Pixel Matrix Columns",
    )?;
    let height = required(tags::TOTAL_PIXEL_MATRIX_ROWS, "Total Pixel Matrix Rows")?;
    let tile_width = required(tags::COLUMNS, "Columns")?;
    let tile_height = required(tags::ROWS, "Rows")?;
    let frames = u64::from(required(tags::NUMBER_OF_FRAMES, "Number of Frames")?);
    if tile_width > MAX_TILE_SIDE || tile_height > MAX_TILE_SIDE {
        return Err(SlideError::Unsupported(format!(
            "{tile_width} x {tile_height} tiles are not read (at most {MAX_TILE_SIDE} a side)"
        )));
    }
    let grid = u64::from(width.div_ceil(tile_width)) * u64::from(height.div_ceil(tile_height));
    let frame_bytes = u64::from(tile_width) * u64::from(tile_height) * 3;
    // Every frame takes at least an item header (8 bytes), or its pixels when uncompressed.
    let least = frames.saturating_mul(if compression == 7 { 8 } else { frame_bytes });
    if grid > MAX_TILES || frames > MAX_TILES || least > size {
        return Err(invalid(format!(
            "{frames} frames of a {width} x {height} image in {tile_width} x {tile_height} tiles do not fit the file ({size} bytes)"
        )));
    }
    let frames = frames as usize;
    let flavour = object
        .get(tags::IMAGE_TYPE)
        .and_then(|e| e.to_multi_str().ok())
        .and_then(|v| v.get(2).map(|s| s.trim().to_owned()))
        .unwrap_or_default();
    if flavour.is_empty() {
        return Err(invalid(
            "the DICOM file has no Image Type: not a conformant whole-slide image",
        ));
    }
    let shared = object
        .get(tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE)
        .and_then(|e| e.items())
        .and_then(|items| items.first());
    let mpp = shared
        .and_then(|s| first_item(s, tags::PIXEL_MEASURES_SEQUENCE))
        .and_then(|m| m.get(tags::PIXEL_SPACING))
        .and_then(|e| e.to_multi_float64().ok())
        .filter(|v| v.len() == 2 && v.iter().all(|x| x.is_finite() && *x > 0.0))
        // Pixel Spacing is (row spacing, column spacing) in mm: (y, x).
        .map(|v| (v[1] * 1000.0, v[0] * 1000.0));
    let objective = first_item(&object, tags::OPTICAL_PATH_SEQUENCE)
        .and_then(|p| p.get(tags::OBJECTIVE_LENS_POWER))
        .and_then(|e| e.to_float64().ok())
        .filter(|v| v.is_finite() && *v > 0.0);

    let across = width.div_ceil(tile_width) as usize;
    let down = height.div_ceil(tile_height) as usize;
    let positions: Vec<usize> = match text(tags::DIMENSION_ORGANIZATION_TYPE).as_deref() {
        Some("TILED_FULL") | None => {
            if frames < across * down {
                return Err(invalid(format!(
                    "{frames} frames for a {across} x {down} tile grid"
                )));
            }
            (0..across * down).collect()
        }
        Some("TILED_SPARSE") => {
            sparse_positions(&object, frames, tile_width, tile_height, across, down)?
        }
        Some(other) => {
            return Err(SlideError::Unsupported(format!(
                "dimension organisation {other} is not read"
            )));
        }
    };
    let offsets = frame_offsets(
        &mut reader,
        size,
        (pixel_at, pixel_length),
        compression == 7,
        frames,
        frame_bytes,
    )?;
    let mut tiles = vec![(0_u64, 0_u64); across * down];
    for (frame, &position) in positions.iter().enumerate().take(frames) {
        if let Some(slot) = tiles.get_mut(position) {
            *slot = offsets[frame];
        }
    }
    Ok(Instance {
        series: text(tags::SERIES_INSTANCE_UID).unwrap_or_default(),
        flavour,
        width,
        height,
        tile_width,
        tile_height,
        mpp,
        objective,
        manufacturer: text(tags::MANUFACTURER).filter(|m| !m.is_empty()),
        compression,
        photometric,
        tiles,
    })
}

fn first_item(object: &InMemDicomObject, tag: dicom_object::Tag) -> Option<&InMemDicomObject> {
    object
        .get(tag)
        .and_then(|e| e.items())
        .and_then(|i| i.first())
}

/// Tile index (row-major) of each frame of a TILED_SPARSE image, from its per-frame positions.
fn sparse_positions(
    object: &InMemDicomObject,
    frames: usize,
    tile_width: u32,
    tile_height: u32,
    across: usize,
    down: usize,
) -> Result<Vec<usize>, SlideError> {
    let groups = object
        .get(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE)
        .and_then(|e| e.items())
        .filter(|g| g.len() == frames)
        .ok_or_else(|| invalid("a sparse tiled image without a position per frame"))?;
    groups
        .iter()
        .map(|g| {
            let at = first_item(g, tags::PLANE_POSITION_SLIDE_SEQUENCE)
                .ok_or_else(|| invalid("a frame without its position"))?;
            let pos = |tag| {
                at.get(tag)
                    .and_then(|e| e.to_int::<i64>().ok())
                    .ok_or_else(|| invalid("a frame without its position"))
            };
            // 1-based pixel positions of the frame's top-left corner.
            let (column, row) = (
                pos(tags::COLUMN_POSITION_IN_TOTAL_IMAGE_PIXEL_MATRIX)?,
                pos(tags::ROW_POSITION_IN_TOTAL_IMAGE_PIXEL_MATRIX)?,
            );
            let (c, r) = (
                (column - 1) / i64::from(tile_width),
                (row - 1) / i64::from(tile_height),
            );
            if column < 1 || row < 1 || c as usize >= across || r as usize >= down {
                return Err(invalid(format!(
                    "a frame at ({column}, {row}) lies outside the image"
                )));
            }
            Ok(r as usize * across + c as usize)
        })
        .collect()
}

/// Where Pixel Data's value starts and its length, by walking the top-level elements (explicit VR
/// little endian, headers only); sequences nested deeper than `MAX_DEPTH` are refused.
fn locate_pixel_data<R: Read + Seek>(r: &mut R, size: u64) -> Result<(u64, u32), SlideError> {
    let broken = |e: std::io::Error| invalid(format!("the DICOM file is truncated or broken: {e}"));
    // Preamble and "DICM"; then group 0002 is explicit VR little endian too.
    r.seek(SeekFrom::Start(132)).map_err(broken)?;
    loop {
        let (group, element, length) = element_header(r).map_err(broken)?;
        let at = r.stream_position().map_err(broken)?;
        if (group, element) == (0x7FE0, 0x0010) {
            return Ok((at, length));
        }
        if length == u32::MAX {
            skip_undefined(r, 0).map_err(broken)?;
        } else {
            if at + u64::from(length) > size {
                return Err(invalid(
                    "an element runs past the end of the file (truncated?)",
                ));
            }
            r.seek(SeekFrom::Current(i64::from(length)))
                .map_err(broken)?;
        }
    }
}

/// Where each frame's bytes are: encapsulated frames are Pixel Data's items after the offset table
/// (one fragment per frame), native frames follow each other.
fn frame_offsets<R: Read + Seek>(
    r: &mut R,
    size: u64,
    (at, length): (u64, u32),
    encapsulated: bool,
    frames: usize,
    frame_bytes: u64,
) -> Result<Vec<(u64, u64)>, SlideError> {
    let broken = |e: std::io::Error| invalid(format!("the DICOM file is truncated or broken: {e}"));
    if !encapsulated {
        let needed = frame_bytes * frames as u64;
        if length == u32::MAX || u64::from(length) < needed || at + needed > size {
            return Err(invalid(
                "uncompressed Pixel Data is shorter than its frames",
            ));
        }
        return Ok((0..frames as u64)
            .map(|i| (at + i * frame_bytes, frame_bytes))
            .collect());
    }
    if length != u32::MAX {
        return Err(invalid("encapsulated Pixel Data with a defined length"));
    }
    r.seek(SeekFrom::Start(at)).map_err(broken)?;
    let mut offsets = Vec::with_capacity(frames);
    let mut first = true;
    loop {
        let (tag, len) = item_header(r).map_err(broken)?;
        match tag {
            0xE0DD => break,
            0xE000 => {}
            _ => return Err(invalid("Pixel Data holds something other than items")),
        }
        let start = r.stream_position().map_err(broken)?;
        if start + u64::from(len) > size {
            return Err(invalid(
                "a frame runs past the end of the file (truncated?)",
            ));
        }
        if !first {
            if offsets.len() == frames {
                return Err(SlideError::Unsupported(format!(
                    "more fragments than the {frames} frames: frames split into several fragments are not read"
                )));
            }
            offsets.push((start, u64::from(len)));
        }
        first = false;
        r.seek(SeekFrom::Current(i64::from(len))).map_err(broken)?;
    }
    if offsets.len() != frames {
        return Err(SlideError::Unsupported(format!(
            "{} fragments for {frames} frames: frames split into several fragments are not read",
            offsets.len()
        )));
    }
    Ok(offsets)
}

/// Group, element and value length of the next explicit-VR little-endian element.
fn element_header(r: &mut impl Read) -> std::io::Result<(u16, u16, u32)> {
    let mut head = [0_u8; 8];
    r.read_exact(&mut head)?;
    let group = u16::from_le_bytes([head[0], head[1]]);
    let element = u16::from_le_bytes([head[2], head[3]]);
    if group == 0xFFFE {
        // An item or delimiter: no VR.
        return Ok((
            group,
            element,
            u32::from_le_bytes([head[4], head[5], head[6], head[7]]),
        ));
    }
    let vr = [head[4], head[5]];
    let long = matches!(
        &vr,
        b"OB"
            | b"OD"
            | b"OF"
            | b"OL"
            | b"OV"
            | b"OW"
            | b"SQ"
            | b"SV"
            | b"UC"
            | b"UN"
            | b"UR"
            | b"UT"
            | b"UV"
    );
    if long {
        let mut len = [0_u8; 4];
        r.read_exact(&mut len)?;
        Ok((group, element, u32::from_le_bytes(len)))
    } else {
        Ok((
            group,
            element,
            u32::from(u16::from_le_bytes([head[6], head[7]])),
        ))
    }
}

fn item_header(r: &mut impl Read) -> std::io::Result<(u16, u32)> {
    let mut head = [0_u8; 8];
    r.read_exact(&mut head)?;
    let group = u16::from_le_bytes([head[0], head[1]]);
    let element = u16::from_le_bytes([head[2], head[3]]);
    if group != 0xFFFE {
        return Err(std::io::Error::other("an item was expected"));
    }
    Ok((
        element,
        u32::from_le_bytes([head[4], head[5], head[6], head[7]]),
    ))
}

/// Skips an undefined-length value (a sequence or encapsulated data): items until the sequence
/// delimiter, each item's elements until its delimiter when the item's length is undefined too.
fn skip_undefined<R: Read + Seek>(r: &mut R, depth: u32) -> std::io::Result<()> {
    if depth > MAX_DEPTH {
        return Err(std::io::Error::other(format!(
            "sequences nested more than {MAX_DEPTH} deep"
        )));
    }
    loop {
        let (element, len) = item_header(r)?;
        match element {
            0xE0DD => return Ok(()),
            0xE000 if len == u32::MAX => skip_item_elements(r, depth)?,
            0xE000 => {
                r.seek(SeekFrom::Current(i64::from(len)))?;
            }
            _ => return Err(std::io::Error::other("unexpected delimiter")),
        }
    }
}

fn skip_item_elements<R: Read + Seek>(r: &mut R, depth: u32) -> std::io::Result<()> {
    loop {
        let (group, element, len) = element_header(r)?;
        if group == 0xFFFE && element == 0xE00D {
            return Ok(());
        }
        if len == u32::MAX {
            skip_undefined(r, depth + 1)?;
        } else {
            r.seek(SeekFrom::Current(i64::from(len)))?;
        }
    }
}

/// What a DICOM WSI upload is, from its instances: the pyramid of its VOLUME images, the
/// resolution, objective and manufacturer of the base level.
pub fn inspect(paths: &[std::path::PathBuf]) -> Result<super::SlideInfo, SlideError> {
    let (slide, base) = super::read::TiledSlide::open_dicom_series(paths)?;
    Ok(super::SlideInfo {
        format: "dicom-wsi".into(),
        vendor: base.manufacturer,
        levels: slide
            .levels
            .iter()
            .map(|l| super::Level {
                width: l.width,
                height: l.height,
                downsample: l.downsample,
                tile_width: Some(l.tile_width),
                tile_height: Some(l.tile_height),
            })
            .collect(),
        mpp_x: base.mpp.map(|m| m.0),
        mpp_y: base.mpp.map(|m| m.1),
        objective: base.objective,
    })
}
