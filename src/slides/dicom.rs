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
    let compression = compression_of(&syntax)?;
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

/// Where Pixel Data's value starts and its length, by walking every element's header (explicit VR
/// little endian), into sequences and their items.
///
/// dicom-rs, which then parses the data set, reserves each value's declared length before reading
/// it, so a few bytes declaring a 4 GiB value would cost 4 GiB. The walk is what it may trust:
/// every VR is a standard one, every value and item fits inside what contains it (the file, a
/// sequence or an item), sequences nest at most `MAX_DEPTH` deep, and the transfer syntax is one
/// onkos reads (both are explicit VR little endian, as the walk assumes).
fn locate_pixel_data<R: Read + Seek>(r: &mut R, size: u64) -> Result<(u64, u32), SlideError> {
    let broken = |e: std::io::Error| invalid(format!("the DICOM file is truncated or broken: {e}"));
    // Preamble and "DICM"; then group 0002 is explicit VR little endian too.
    r.seek(SeekFrom::Start(132)).map_err(broken)?;
    loop {
        let head = element_header(r).map_err(broken)?;
        let at = r.stream_position().map_err(broken)?;
        if (head.group, head.element) == (0x7FE0, 0x0010) {
            return Ok((at, head.length));
        }
        if (head.group, head.element) == (0x0002, 0x0010) {
            check_transfer_syntax(r, head.length, size, at).map_err(broken)??;
            continue;
        }
        skip_value(r, &head, at, size, 0).map_err(broken)?;
    }
}

/// Reads the meta group's Transfer Syntax UID and refuses one that onkos does not read before
/// anything parses the data set in it.
fn check_transfer_syntax<R: Read + Seek>(
    r: &mut R,
    length: u32,
    size: u64,
    at: u64,
) -> std::io::Result<Result<(), SlideError>> {
    if length > 64 || at + u64::from(length) > size {
        return Err(std::io::Error::other(
            "a Transfer Syntax UID longer than a UID",
        ));
    }
    let mut value = vec![0_u8; length as usize];
    r.read_exact(&mut value)?;
    let syntax = String::from_utf8_lossy(&value);
    Ok(compression_of(syntax.trim_end_matches(['\0', ' '])).map(drop))
}

/// The tile reader's compression (TIFF codes: 7 JPEG, 1 none) for a transfer syntax onkos reads.
fn compression_of(syntax: &str) -> Result<u16, SlideError> {
    match syntax {
        JPEG_BASELINE => Ok(7),
        EXPLICIT_LE => Ok(1),
        other => Err(SlideError::Unsupported(format!(
            "DICOM transfer syntax {other} is not read (JPEG baseline and explicit little-endian are)"
        ))),
    }
}

/// Skips one element's value, which starts at `at`, and must end by `end`: a sequence item by
/// item and element by element, anything else by seeking past it.
fn skip_value<R: Read + Seek>(
    r: &mut R,
    head: &Element,
    at: u64,
    end: u64,
    depth: u32,
) -> std::io::Result<()> {
    if head.length == u32::MAX {
        return match &head.vr {
            b"SQ" => skip_items(r, None, end, depth + 1),
            // Encapsulated pixel data (an icon's, say): fragments, each an item of defined length.
            b"OB" | b"OW" => skip_fragments(r, end),
            _ => Err(std::io::Error::other(format!(
                "an undefined length on a {} value",
                String::from_utf8_lossy(&head.vr)
            ))),
        };
    }
    let value_end = at + u64::from(head.length);
    if value_end > end {
        return Err(std::io::Error::other(
            "an element runs past what contains it (the file, a sequence or an item)",
        ));
    }
    if &head.vr == b"SQ" {
        skip_items(r, Some(value_end), end, depth + 1)
    } else {
        r.seek(SeekFrom::Start(value_end)).map(drop)
    }
}

/// Skips a sequence's items: up to `until` when its length is defined, else to its delimiter,
/// never past `end`.
fn skip_items<R: Read + Seek>(
    r: &mut R,
    until: Option<u64>,
    end: u64,
    depth: u32,
) -> std::io::Result<()> {
    if depth > MAX_DEPTH {
        return Err(std::io::Error::other(format!(
            "sequences nested more than {MAX_DEPTH} deep"
        )));
    }
    let end = until.unwrap_or(end);
    loop {
        let Some(at) = next_position(r, until)? else {
            return Ok(());
        };
        let (element, length) = item_header(r)?;
        let start = at + 8;
        match element {
            0xE0DD if until.is_none() => return Ok(()),
            0xE000 if length == u32::MAX => skip_item_elements(r, None, end, depth)?,
            0xE000 => {
                let item_end = start + u64::from(length);
                if item_end > end {
                    return Err(std::io::Error::other(
                        "an item runs past its sequence or the file",
                    ));
                }
                skip_item_elements(r, Some(item_end), end, depth)?;
            }
            _ => return Err(std::io::Error::other("unexpected delimiter")),
        }
    }
}

/// Skips an item's elements: up to `until` when its length is defined, else to its delimiter.
fn skip_item_elements<R: Read + Seek>(
    r: &mut R,
    until: Option<u64>,
    end: u64,
    depth: u32,
) -> std::io::Result<()> {
    let end = until.unwrap_or(end);
    loop {
        if next_position(r, until)?.is_none() {
            return Ok(());
        }
        let head = element_header(r)?;
        if (head.group, head.element) == (0xFFFE, 0xE00D) {
            return if until.is_none() {
                Ok(())
            } else {
                Err(std::io::Error::other(
                    "an item delimiter in an item of defined length",
                ))
            };
        }
        let value_at = r.stream_position()?;
        skip_value(r, &head, value_at, end, depth)?;
    }
}

/// Where the next header starts, or none when a container of defined length ends there.
fn next_position(r: &mut impl Seek, until: Option<u64>) -> std::io::Result<Option<u64>> {
    let at = r.stream_position()?;
    Ok((until != Some(at)).then_some(at))
}

/// Skips encapsulated fragments (items of defined length) to the sequence delimiter.
fn skip_fragments<R: Read + Seek>(r: &mut R, end: u64) -> std::io::Result<()> {
    loop {
        let (element, length) = item_header(r)?;
        match element {
            0xE0DD => return Ok(()),
            0xE000 => {
                let at = r.stream_position()?;
                if at + u64::from(length) > end {
                    return Err(std::io::Error::other("a fragment runs past the file"));
                }
                r.seek(SeekFrom::Current(i64::from(length)))?;
            }
            _ => return Err(std::io::Error::other("unexpected delimiter")),
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

/// The value representations of the standard (PS3.5 6.2). Any other is refused: dicom-rs and the
/// walk could disagree on where its value ends.
const VRS: [&[u8; 2]; 34] = [
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"OB",
    b"OD", b"OF", b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM",
    b"UC", b"UI", b"UL", b"UN", b"UR", b"US", b"UT", b"UV",
];

/// An element's header: tag, VR (none for items and delimiters) and value length.
#[derive(Debug)]
struct Element {
    group: u16,
    element: u16,
    vr: [u8; 2],
    length: u32,
}

/// The header of the next explicit-VR little-endian element.
fn element_header(r: &mut impl Read) -> std::io::Result<Element> {
    let mut head = [0_u8; 8];
    r.read_exact(&mut head)?;
    let group = u16::from_le_bytes([head[0], head[1]]);
    let element = u16::from_le_bytes([head[2], head[3]]);
    if group == 0xFFFE {
        // An item or delimiter: no VR.
        return Ok(Element {
            group,
            element,
            vr: [0, 0],
            length: u32::from_le_bytes([head[4], head[5], head[6], head[7]]),
        });
    }
    let vr = [head[4], head[5]];
    if !VRS.contains(&&vr) {
        return Err(std::io::Error::other(format!(
            "({group:04X},{element:04X}) has no standard value representation"
        )));
    }
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
    let length = if long {
        let mut len = [0_u8; 4];
        r.read_exact(&mut len)?;
        u32::from_le_bytes(len)
    } else {
        u32::from(u16::from_le_bytes([head[6], head[7]]))
    };
    // dicom-rs reads binary values a whole value at a time (`length / size` of them): a length
    // that is not a whole number of them would leave it reading the next element's header from
    // a different byte than the walk. Text, OB and UN values it reads byte for byte, so an odd
    // length there (which the standard forbids, and some writers produce) is read as it is.
    let unit = match &vr {
        b"FD" | b"OD" | b"OV" | b"SV" | b"UV" => 8,
        b"AT" | b"FL" | b"OF" | b"OL" | b"SL" | b"UL" => 4,
        b"OW" | b"SS" | b"US" => 2,
        _ => 1,
    };
    if length != u32::MAX && length % unit != 0 {
        return Err(std::io::Error::other(format!(
            "({group:04X},{element:04X}) has a {length}-byte {} value: not a whole number of values",
            String::from_utf8_lossy(&vr)
        )));
    }
    Ok(Element {
        group,
        element,
        vr,
        length,
    })
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// Preamble, `DICM`, the meta group's transfer syntax, then `body`.
    fn file(syntax: &str, body: &[u8]) -> Vec<u8> {
        let mut out = vec![0_u8; 128];
        out.extend_from_slice(b"DICM");
        let mut uid = syntax.as_bytes().to_vec();
        if uid.len() % 2 == 1 {
            uid.push(0);
        }
        out.extend_from_slice(&[0x02, 0x00, 0x10, 0x00, b'U', b'I']);
        out.extend_from_slice(&(uid.len() as u16).to_le_bytes());
        out.extend_from_slice(&uid);
        out.extend_from_slice(body);
        out
    }

    fn short(group: u16, element: u16, vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
        let mut out = [group.to_le_bytes(), element.to_le_bytes()].concat();
        out.extend_from_slice(vr);
        out.extend_from_slice(&(value.len() as u16).to_le_bytes());
        out.extend_from_slice(value);
        out
    }

    fn long(group: u16, element: u16, vr: &[u8; 2], length: u32, value: &[u8]) -> Vec<u8> {
        let mut out = [group.to_le_bytes(), element.to_le_bytes()].concat();
        out.extend_from_slice(vr);
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&length.to_le_bytes());
        out.extend_from_slice(value);
        out
    }

    fn item(length: u32, value: &[u8]) -> Vec<u8> {
        [&[0xFE, 0xFF, 0x00, 0xE0], &length.to_le_bytes()[..], value].concat()
    }

    fn pixel_data() -> Vec<u8> {
        long(0x7FE0, 0x0010, b"OB", u32::MAX, &[])
    }

    fn locate(bytes: &[u8]) -> Result<(u64, u32), SlideError> {
        locate_pixel_data(&mut Cursor::new(bytes), bytes.len() as u64)
    }

    #[test]
    fn the_walk_finds_pixel_data_past_nested_sequences() {
        let inner = short(0x0028, 0x0030, b"DS", b"0.25\\0.25 ");
        let sequence = long(
            0x5200,
            0x9229,
            b"SQ",
            8 + inner.len() as u32,
            &item(inner.len() as u32, &inner),
        );
        let undefined = long(
            0x0040,
            0x0560,
            b"SQ",
            u32::MAX,
            &[
                item(inner.len() as u32, &inner),
                vec![0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0],
            ]
            .concat(),
        );
        let body = [
            short(0x0008, 0x0016, b"UI", WSI_SOP_CLASS.as_bytes()),
            sequence,
            undefined,
            pixel_data(),
        ]
        .concat();
        let bytes = file(EXPLICIT_LE, &body);
        let (at, length) = locate(&bytes).unwrap();
        assert_eq!((at, length), (bytes.len() as u64, u32::MAX));
    }

    /// libFuzzer's finding: dicom-rs read a non-standard VR's length from the 4 bytes after it and
    /// reserved that much (775 MB for "1.2." from a 15 kB file) before reading anything.
    #[test]
    fn a_non_standard_vr_is_refused_before_dicom_rs_reads_its_length() {
        let body = [
            short(0x0020, 0x0052, b"_I", b"1.2.826.0.1.3680043.8.498.1"),
            pixel_data(),
        ]
        .concat();
        let error = locate(&file(EXPLICIT_LE, &body)).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("no standard value representation"),
            "{error}"
        );
    }

    #[test]
    fn a_value_longer_than_its_item_or_sequence_is_refused() {
        // 2 GiB declared inside an 8-byte item of a 16-byte sequence, in a file of a few hundred bytes.
        let inner = long(0x0048, 0x0105, b"OB", 1 << 31, &[]);
        let sequence = long(
            0x0048,
            0x0105,
            b"SQ",
            8 + inner.len() as u32,
            &item(inner.len() as u32, &inner),
        );
        let error = locate(&file(EXPLICIT_LE, &[sequence, pixel_data()].concat())).unwrap_err();
        assert!(
            error.to_string().contains("runs past what contains it"),
            "{error}"
        );
        // An item longer than its sequence.
        let sequence = long(0x0048, 0x0105, b"SQ", 8, &item(1 << 30, &[]));
        let error = locate(&file(EXPLICIT_LE, &[sequence, pixel_data()].concat())).unwrap_err();
        assert!(
            error.to_string().contains("runs past its sequence"),
            "{error}"
        );
    }

    /// libFuzzer's second finding: dicom-rs reads a 617-byte US value as 308 values (616 bytes),
    /// then the next header one byte early, which declared a value of hundreds of MB.
    #[test]
    fn a_value_that_is_not_a_whole_number_of_values_is_refused() {
        for (vr, value) in [
            (b"US", vec![0_u8; 3]),
            (b"FL", vec![0; 6]),
            (b"FD", vec![0; 12]),
        ] {
            let body = [short(0x0028, 0x0100, vr, &value), pixel_data()].concat();
            let error = locate(&file(EXPLICIT_LE, &body)).unwrap_err();
            assert!(
                error.to_string().contains("not a whole number of values"),
                "{error}"
            );
        }
        // An odd-length text value (non-conformant, but read byte for byte by both) is accepted.
        let body = [short(0x0008, 0x0070, b"LO", b"odd"), pixel_data()].concat();
        let bytes = file(EXPLICIT_LE, &body);
        assert_eq!(locate(&bytes).unwrap().0, bytes.len() as u64);
    }

    #[test]
    fn a_transfer_syntax_onkos_does_not_read_is_refused_before_parsing() {
        // Implicit VR little endian: the walk's explicit-VR reading would not hold.
        let error = locate(&file("1.2.840.10008.1.2", &pixel_data())).unwrap_err();
        assert!(matches!(error, SlideError::Unsupported(_)), "{error}");
        assert!(
            error.to_string().contains("1.2.840.10008.1.2 is not read"),
            "{error}"
        );
    }
}
