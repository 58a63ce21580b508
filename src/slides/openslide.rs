//! The breadth path: slides that onkos's own tile reader does not read (NDPI's striped levels,
//! JPEG 2000 SVS, MIRAX, SCN, Philips, Ventana …) are read by OpenSlide.
//!
//! OpenSlide is a C library that parses untrusted files. It runs in child processes
//! (`onkos slide-reader <file>`), never in the API or the worker: a crash or an abort in it ends
//! that child, and the analysis that was reading fails with the reason, while the process that
//! asked carries on. A reader child serves one slide over its stdin/stdout:
//!
//! - on start it writes one line of JSON, a [`Header`] (the slide's levels and properties) or an
//!   error;
//! - then, for each request (level `u32`, level-0 `x`, `y` as `i64`, `width`, `height` as `u32`,
//!   little-endian), it answers a status byte (0: pixels follow, 1: an error message follows), a
//!   `u32` length and the bytes: the region as RGB, composited over white;
//! - it exits when its stdin closes (so it never outlives the process that started it).

use super::SlideError;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Largest region one request may ask for (pixels), so a request cannot make a child allocate
/// without bound.
const MAX_REGION_PIXELS: u64 = 64 << 20;
const REQUEST_LEN: usize = 4 + 8 + 8 + 4 + 4;

static READER_PROGRAM: OnceLock<PathBuf> = OnceLock::new();

/// How long a reader may take to answer one request before it is taken for hung and killed (a
/// region is read in milliseconds; opening a slide in well under a second).
pub const ANSWER_WITHIN: Duration = Duration::from_secs(120);

/// Deadlines of the reader children now awaited, by process id; one watchdog thread kills those
/// past theirs, so that a hang in the C library ends like a crash instead of holding a worker.
static WATCHED: OnceLock<Mutex<HashMap<u32, Instant>>> = OnceLock::new();

fn watched() -> &'static Mutex<HashMap<u32, Instant>> {
    WATCHED.get_or_init(|| {
        std::thread::Builder::new()
            .name("onkos-reader-watchdog".into())
            .spawn(|| {
                loop {
                    std::thread::sleep(Duration::from_millis(500));
                    let now = Instant::now();
                    if let Some(map) = WATCHED.get()
                        && let Ok(mut map) = map.lock()
                    {
                        map.retain(|&pid, deadline| {
                            if now < *deadline {
                                return true;
                            }
                            tracing::warn!(pid, "a slide reader did not answer in time: killed");
                            let pid = nix::unistd::Pid::from_raw(pid as i32);
                            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                            false
                        });
                    }
                }
            })
            .ok();
        Mutex::new(HashMap::new())
    })
}

/// Awaiting one answer from a child: watched until dropped.
struct Awaiting(u32);

impl Awaiting {
    fn new(pid: u32, within: Duration) -> Self {
        if let Ok(mut map) = watched().lock() {
            map.insert(pid, Instant::now() + within);
        }
        Self(pid)
    }
}

impl Drop for Awaiting {
    fn drop(&mut self) {
        if let Ok(mut map) = watched().lock() {
            map.remove(&self.0);
        }
    }
}

/// Sets the program run as `<program> slide-reader <file>` (by default this executable). The
/// first call wins; later ones are ignored.
pub fn set_reader_program(program: PathBuf) {
    let _ = READER_PROGRAM.set(program);
}

fn reader_program() -> Result<PathBuf, SlideError> {
    match READER_PROGRAM.get() {
        Some(program) => Ok(program.clone()),
        None => std::env::current_exe().map_err(|e| {
            SlideError::Internal(format!("the slide reader program cannot be found: {e}"))
        }),
    }
}

/// What a reader child says about its slide when it has opened it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// OpenSlide's version, e.g. `3.4.1`.
    pub version: String,
    /// OpenSlide's name for the format (`hamamatsu`, `mirax`, `aperio`, …).
    pub vendor: Option<String>,
    /// (width, height, downsample) per level.
    pub levels: Vec<(u32, u32, f64)>,
    pub mpp_x: Option<f64>,
    pub mpp_y: Option<f64>,
    pub objective: Option<f64>,
}

#[derive(Debug, Serialize, Deserialize)]
enum Opened {
    Ok(Header),
    /// Not a format OpenSlide knows.
    Unsupported(String),
    /// A format it knows, but the file is broken.
    Invalid(String),
}

/// The child side: serves one slide on stdin/stdout until stdin closes.
pub fn serve(path: &Path) -> anyhow::Result<()> {
    let mut out = BufWriter::new(std::io::stdout().lock());
    let mut input = BufReader::new(std::io::stdin().lock());
    let slide = match openslide_rs::OpenSlide::new(path) {
        Ok(slide) => slide,
        Err(e) => {
            let opened = match e {
                openslide_rs::errors::OpenSlideError::UnsupportedFile(_)
                | openslide_rs::errors::OpenSlideError::MissingFile(_) => Opened::Unsupported(
                    format!("OpenSlide does not recognise the file as a slide ({e})"),
                ),
                e => Opened::Invalid(format!("OpenSlide cannot read the slide: {e}")),
            };
            serde_json::to_writer(&mut out, &opened)?;
            out.write_all(b"\n")?;
            out.flush()?;
            return Ok(());
        }
    };
    let property = |name: &str| {
        slide
            .property_value(name)
            .ok()
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|v| v.is_finite() && *v > 0.0)
    };
    let header = Header {
        version: openslide_rs::OpenSlide::version().unwrap_or_default(),
        vendor: slide.property_value("openslide.vendor").ok(),
        levels: slide
            .all_level_dimensions()
            .iter()
            .zip(slide.all_level_downsamples())
            .map(|(size, &ds)| (size.w, size.h, ds))
            .collect(),
        mpp_x: property("openslide.mpp-x"),
        mpp_y: property("openslide.mpp-y"),
        objective: property("openslide.objective-power"),
    };
    serde_json::to_writer(&mut out, &Opened::Ok(header))?;
    out.write_all(b"\n")?;
    out.flush()?;

    let mut request = [0_u8; REQUEST_LEN];
    loop {
        match input.read_exact(&mut request) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let u32_at = |i: usize| u32::from_le_bytes(request[i..i + 4].try_into().unwrap_or([0; 4]));
        let i64_at = |i: usize| i64::from_le_bytes(request[i..i + 8].try_into().unwrap_or([0; 8]));
        let (level, x, y, width, height) =
            (u32_at(0), i64_at(4), i64_at(12), u32_at(20), u32_at(24));
        match read_rgb(&slide, level, x, y, width, height) {
            Ok(rgb) => {
                out.write_all(&[0])?;
                out.write_all(&(rgb.len() as u32).to_le_bytes())?;
                out.write_all(&rgb)?;
            }
            Err(message) => {
                out.write_all(&[1])?;
                out.write_all(&(message.len() as u32).to_le_bytes())?;
                out.write_all(message.as_bytes())?;
            }
        }
        out.flush()?;
    }
}

/// A region as RGB over a white background (OpenSlide gives premultiplied ARGB, transparent
/// outside the scanned area).
fn read_rgb(
    slide: &openslide_rs::OpenSlide,
    level: u32,
    x: i64,
    y: i64,
    width: u32,
    height: u32,
) -> Result<Vec<u8>, String> {
    if u64::from(width) * u64::from(height) > MAX_REGION_PIXELS || width == 0 || height == 0 {
        return Err(format!("a {width} x {height} region is not read"));
    }
    let (Ok(x), Ok(y)) = (u32::try_from(x), u32::try_from(y)) else {
        return Err(format!("({x}, {y}) is outside the slide"));
    };
    let region = openslide_rs::Region {
        size: openslide_rs::Size {
            w: width,
            h: height,
        },
        level,
        address: openslide_rs::Address { x, y },
    };
    let argb = slide
        .read_region(&region)
        .map_err(|e| format!("OpenSlide cannot read level {level} at ({x}, {y}): {e}"))?;
    let mut rgb = Vec::with_capacity(argb.len() / 4 * 3);
    for px in argb.chunks_exact(4) {
        // One native-endian u32 per pixel: 0xAARRGGBB, premultiplied.
        let v = u32::from_ne_bytes([px[0], px[1], px[2], px[3]]);
        let white = 255 - (v >> 24);
        let channel = |shift: u32| ((v >> shift) & 0xFF).saturating_add(white).min(255) as u8;
        rgb.extend_from_slice(&[channel(16), channel(8), channel(0)]);
    }
    Ok(rgb)
}

/// One running reader child.
#[derive(Debug)]
struct Reader {
    child: Child,
    /// How long one answer may take.
    within: Duration,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Reader {
    fn spawn(program: &Path, path: &Path, within: Duration) -> Result<Self, SlideError> {
        let mut child = Command::new(program)
            .arg("slide-reader")
            .arg(path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| {
                SlideError::Internal(format!(
                    "the slide reader ({}) cannot be started: {e}",
                    program.display()
                ))
            })?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(SlideError::Invalid("the slide reader has no pipes".into()));
        };
        Ok(Self {
            child,
            within,
            stdin: Some(stdin),
            stdout: BufReader::new(stdout),
        })
    }

    fn header(&mut self) -> Result<Header, SlideError> {
        let mut line = String::new();
        let awaiting = Awaiting::new(self.child.id(), self.within);
        let read = self.stdout.read_line(&mut line);
        drop(awaiting);
        if read.is_err() || line.is_empty() {
            return Err(self.died("opening the slide"));
        }
        match serde_json::from_str::<Opened>(&line) {
            Ok(Opened::Ok(header)) => Ok(header),
            Ok(Opened::Unsupported(why)) => Err(SlideError::Unsupported(why)),
            Ok(Opened::Invalid(why)) => Err(SlideError::Invalid(why)),
            Err(e) => Err(SlideError::Invalid(format!(
                "the slide reader answered something else than a header: {e}"
            ))),
        }
    }

    fn region(
        &mut self,
        level: u32,
        x0: i64,
        y0: i64,
        width: u32,
        height: u32,
    ) -> Result<Vec<u8>, SlideError> {
        let what = format!("reading a {width} x {height} region of level {level} at ({x0}, {y0})");
        let mut request = Vec::with_capacity(REQUEST_LEN);
        request.extend_from_slice(&level.to_le_bytes());
        request.extend_from_slice(&x0.to_le_bytes());
        request.extend_from_slice(&y0.to_le_bytes());
        request.extend_from_slice(&width.to_le_bytes());
        request.extend_from_slice(&height.to_le_bytes());
        let Some(stdin) = self.stdin.as_mut() else {
            return Err(self.died(&what));
        };
        let awaiting = Awaiting::new(self.child.id(), self.within);
        if stdin
            .write_all(&request)
            .and_then(|()| stdin.flush())
            .is_err()
        {
            drop(awaiting);
            return Err(self.died(&what));
        }
        let mut head = [0_u8; 5];
        if self.stdout.read_exact(&mut head).is_err() {
            drop(awaiting);
            return Err(self.died(&what));
        }
        let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let expected = width as usize * height as usize * 3;
        if head[0] == 0 && len != expected || head[0] > 1 || len > expected.max(1 << 16) {
            // Out of step with the protocol: this reader is not used again.
            drop(awaiting);
            let _ = self.died(&what);
            return Err(SlideError::Invalid(format!(
                "the slide reader answered {len} bytes {what}"
            )));
        }
        let mut body = vec![0_u8; len];
        let read = self.stdout.read_exact(&mut body);
        drop(awaiting);
        if read.is_err() {
            return Err(self.died(&what));
        }
        if head[0] == 1 {
            return Err(SlideError::Invalid(
                String::from_utf8_lossy(&body).into_owned(),
            ));
        }
        Ok(body)
    }

    /// The reason a child stopped answering: its exit status or the signal that ended it.
    fn died(&mut self, doing: &str) -> SlideError {
        self.stdin = None;
        // A child that already died keeps its status (killing a zombie changes nothing); one
        // that hangs is ended here.
        let _ = self.child.kill();
        let status = self.child.wait().ok();
        use std::os::unix::process::ExitStatusExt;
        let how = match status {
            Some(s) if s.signal().is_some() => format!(
                "was ended by signal {}",
                s.signal().map_or(String::new(), |n| n.to_string())
            ),
            Some(s) => format!("exited ({s})"),
            None => "stopped answering".into(),
        };
        SlideError::Invalid(format!(
            "OpenSlide's reader process {how} while {doing}; the file is probably corrupt (the crash was contained to that process)"
        ))
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        // Closing stdin ends a healthy child; a stuck one is killed.
        self.stdin = None;
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A slide read by OpenSlide in `processes` child processes (regions are read in parallel, one
/// per child at a time).
#[derive(Debug)]
pub struct OpenSlideSlide {
    pub header: Header,
    readers: Vec<Mutex<Reader>>,
    next: AtomicUsize,
}

impl OpenSlideSlide {
    pub fn open(path: &Path, processes: usize) -> Result<Self, SlideError> {
        Self::open_with(path, processes, ANSWER_WITHIN)
    }

    /// Opens with another limit on how long one answer may take.
    pub fn open_with(path: &Path, processes: usize, within: Duration) -> Result<Self, SlideError> {
        let program = reader_program()?;
        let mut first = Reader::spawn(&program, path, within)?;
        let header = first.header()?;
        if header.levels.is_empty() {
            return Err(SlideError::Invalid(
                "OpenSlide finds no level in the slide".into(),
            ));
        }
        let mut readers = vec![first];
        let mut more = Vec::new();
        for _ in 1..processes.max(1) {
            more.push(Reader::spawn(&program, path, within)?);
        }
        for mut reader in more {
            reader.header()?;
            readers.push(reader);
        }
        Ok(Self {
            header,
            readers: readers.into_iter().map(Mutex::new).collect(),
            next: AtomicUsize::new(0),
        })
    }

    /// A region of a level, in that level's pixels (RGB, white outside the slide).
    pub fn region(
        &self,
        level: usize,
        x: u32,
        y: u32,
        width: u32,
        height: u32,
    ) -> Result<Vec<u8>, SlideError> {
        let &(_, _, downsample) = self
            .header
            .levels
            .get(level)
            .ok_or_else(|| SlideError::Invalid(format!("no level {level}")))?;
        let x0 = (f64::from(x) * downsample).round() as i64;
        let y0 = (f64::from(y) * downsample).round() as i64;
        // A free reader if there is one; otherwise wait for the next in turn.
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.readers.len();
        let mut reader = (0..n)
            .find_map(|k| self.readers[(start + k) % n].try_lock().ok())
            .map_or_else(
                || {
                    self.readers[start % n]
                        .lock()
                        .map_err(|_| SlideError::Invalid("the slide reader failed earlier".into()))
                },
                Ok,
            )?;
        reader.region(level as u32, x0, y0, width, height)
    }

    /// What OpenSlide read from the slide, as onkos describes slides.
    pub fn info(&self, format: &str) -> super::SlideInfo {
        super::SlideInfo {
            format: format.into(),
            vendor: self.header.vendor.clone(),
            levels: self
                .header
                .levels
                .iter()
                .map(|&(width, height, downsample)| super::Level {
                    width,
                    height,
                    downsample,
                    tile_width: None,
                    tile_height: None,
                })
                .collect(),
            mpp_x: self.header.mpp_x,
            mpp_y: self.header.mpp_y,
            objective: self.header.objective,
        }
    }

    /// The process ids of the reader children (for tests that end one).
    pub fn reader_pids(&self) -> Vec<u32> {
        self.readers
            .iter()
            .filter_map(|r| r.lock().ok().map(|r| r.pid()))
            .collect()
    }
}
