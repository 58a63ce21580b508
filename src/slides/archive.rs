//! Slides that are several files — a DICOM WSI series (one instance per level), a MIRAX slide (an
//! `.mrxs` file and its folder) — are uploaded as one zip. The zip is kept as uploaded; to read
//! it, its files are extracted once into a folder beside it (`<zip>.d/`), under limits that stop a
//! zip bomb: a number of entries, a total size and a compression ratio.

use super::{SNIFF_LEN, SlideError, Sniffed, sniff};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Most files one slide archive may hold.
pub const MAX_ENTRIES: usize = 10_000;
/// Most bytes the extracted files may take per byte of archive: whole-slide data is already
/// compressed (JPEG), so a real archive is close to 1; a bomb is thousands.
pub const MAX_RATIO: u64 = 50;
/// The size limit used when an archive accepted earlier is extracted again.
pub const REOPEN_LIMIT: u64 = 1 << 40;

/// What an archive holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Contents {
    /// The DICOM files (instances of one series, presumably: the reader checks).
    Dicom(Vec<PathBuf>),
    /// The `.mrxs` file (its folder beside it).
    Mirax(PathBuf),
}

/// Where an archive's files are extracted.
pub fn folder_of(archive: &Path) -> PathBuf {
    let mut name = archive.as_os_str().to_owned();
    name.push(".d");
    PathBuf::from(name)
}

/// The archive's files, extracted beside it on first use; refused with the reason when it holds
/// no slide, too many files, unsafe names, or more bytes than `limit` or the ratio allows.
pub fn unpacked(archive: &Path, limit: u64) -> Result<Contents, SlideError> {
    let folder = folder_of(archive);
    if !folder.is_dir() {
        extract(archive, &folder, limit)?;
    }
    contents(&folder)
}

fn extract(archive: &Path, folder: &Path, limit: u64) -> Result<(), SlideError> {
    let invalid = |why: String| SlideError::Invalid(why);
    let internal = |why: String| SlideError::Internal(why);
    let file =
        File::open(archive).map_err(|e| invalid(format!("the archive cannot be opened: {e}")))?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut zip = zip::ZipArchive::new(file)
        .map_err(|e| invalid(format!("not a readable zip archive: {e}")))?;
    if zip.len() > MAX_ENTRIES {
        return Err(invalid(format!(
            "the archive holds {} files; a slide archive holds at most {MAX_ENTRIES}",
            zip.len()
        )));
    }
    let budget = limit.min(size.saturating_mul(MAX_RATIO).max(1 << 20));
    // Extracted into a private folder first, renamed into place when complete: a folder that
    // exists is whole.
    let partial = PathBuf::from(format!(
        "{}.partial-{}",
        folder.display(),
        uuid::Uuid::now_v7()
    ));
    let result = (|| {
        let mut written: u64 = 0;
        for i in 0..zip.len() {
            let mut entry = zip
                .by_index(i)
                .map_err(|e| invalid(format!("archive entry {i} cannot be read: {e}")))?;
            let Some(name) = entry.enclosed_name() else {
                return Err(invalid(format!(
                    "archive entry {:?} has an unsafe path",
                    entry.name().unwrap_or("(not UTF-8)".into())
                )));
            };
            let target = partial.join(&name);
            if entry.is_dir() {
                std::fs::create_dir_all(&target)
                    .map_err(|e| internal(format!("cannot extract the archive: {e}")))?;
                continue;
            }
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| internal(format!("cannot extract the archive: {e}")))?;
            }
            let mut out = File::create(&target)
                .map_err(|e| internal(format!("cannot extract the archive: {e}")))?;
            let left = budget - written;
            // A read error is the archive's fault; a write error (a full disk) is ours.
            let mut limited = (&mut entry).take(left + 1);
            let mut buffer = vec![0_u8; 1 << 16];
            let mut copied = 0_u64;
            loop {
                let n = limited.read(&mut buffer).map_err(|e| {
                    invalid(format!("archive entry {:?} is broken: {e}", name.display()))
                })?;
                if n == 0 {
                    break;
                }
                std::io::Write::write_all(&mut out, &buffer[..n])
                    .map_err(|e| internal(format!("cannot extract the archive: {e}")))?;
                copied += n as u64;
            }
            written += copied;
            if written > budget {
                return Err(invalid(format!(
                    "the archive expands to more than {budget} bytes ({MAX_RATIO}x its size at most, and the upload limit): refused"
                )));
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&partial);
        return Err(e);
    }
    match std::fs::rename(&partial, folder) {
        Ok(()) => Ok(()),
        // Another reader extracted it meanwhile.
        Err(_) if folder.is_dir() => {
            let _ = std::fs::remove_dir_all(&partial);
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&partial);
            Err(SlideError::Internal(format!(
                "cannot extract the archive: {e}"
            )))
        }
    }
}

/// What the extracted files are: a MIRAX slide when there is an `.mrxs` file, else DICOM files.
fn contents(folder: &Path) -> Result<Contents, SlideError> {
    let mut files = Vec::new();
    let mut pending = vec![folder.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| SlideError::Invalid(format!("cannot list the archive: {e}")))?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    let mirax: Vec<&PathBuf> = files
        .iter()
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("mrxs"))
        })
        .collect();
    match mirax.as_slice() {
        [one] => return Ok(Contents::Mirax((*one).clone())),
        [] => {}
        _ => {
            return Err(SlideError::Invalid(
                "the archive holds several .mrxs files: upload one slide per archive".into(),
            ));
        }
    }
    let dicom: Vec<PathBuf> = files
        .into_iter()
        .filter(|p| {
            let mut head = Vec::with_capacity(SNIFF_LEN);
            File::open(p)
                .and_then(|f| f.take(SNIFF_LEN as u64).read_to_end(&mut head))
                .is_ok()
                && sniff(&head) == Sniffed::Dicom
        })
        .collect();
    if dicom.is_empty() {
        return Err(SlideError::Unsupported(
            "the archive holds neither DICOM files nor a MIRAX slide (.mrxs)".into(),
        ));
    }
    Ok(Contents::Dicom(dicom))
}
