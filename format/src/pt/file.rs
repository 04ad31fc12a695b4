//! `.pt` files on disk: atomic writes and reads.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::PtError;
use super::archive::{decode_pt, encode_pt_with};
use super::parts::PtParts;
use super::value::PtValue;
use super::zip::Zip64;

/// What was written by [`write_pt_file`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PtFileInfo {
    /// Size of the file.
    pub bytes: u64,
    /// SHA-256 of the whole file, lowercase hex.
    pub sha256: String,
}

/// Writes `value` to `path` with [`write_file_atomic`]. The archive folder
/// inside the file is the file stem, reduced to `[A-Za-z0-9_]`.
pub fn write_pt_file(path: &Path, value: &PtValue) -> Result<PtFileInfo, PtError> {
    let parts = encode_pt_with(value, &archive_name(path), Zip64::AS_TORCH)?;
    write_pt_parts(path, &parts)
}

/// Writes an encoded file's `parts` to `path` as [`write_file_atomic`]
/// does, one after the other.
pub fn write_pt_parts(path: &Path, parts: &PtParts) -> Result<PtFileInfo, PtError> {
    write_parts_atomic(path, parts.iter())?;
    Ok(PtFileInfo {
        bytes: parts.len(),
        sha256: parts.sha256(),
    })
}

/// Writes `bytes` to `path` atomically: they go to a temporary sibling
/// `.{name}.tmp-{pid}-{random}`, which is synced and renamed over `path`,
/// then the directory is synced. Parent directories are created; the
/// temporary file is removed if anything fails before the rename.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<(), PtError> {
    write_parts_atomic(path, std::iter::once(bytes))
}

/// [`write_file_atomic`] of the concatenation of `parts`.
fn write_parts_atomic<'a>(
    path: &Path,
    parts: impl Iterator<Item = &'a [u8]>,
) -> Result<(), PtError> {
    let file_name = path.file_name().ok_or_else(|| PtError::Io {
        action: "write",
        path: path.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "path has no file name"),
    })?;
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    fs::create_dir_all(dir).map_err(io_error("create directory", dir))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{:016x}",
        file_name.to_string_lossy(),
        std::process::id(),
        rand::random::<u64>()
    ));
    if let Err(e) = write_and_rename(&tmp, path, parts) {
        // Best effort: the temporary file may not exist.
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(dir)
}

/// Reads and decodes the `.pt` file at `path`.
pub fn read_pt_file(path: &Path) -> Result<PtValue, PtError> {
    let bytes = fs::read(path).map_err(io_error("read", path))?;
    decode_pt(&bytes).map_err(|source| PtError::File {
        path: path.to_owned(),
        source: Box::new(source),
    })
}

/// The archive folder [`write_pt_file`] uses for `path`: the file stem with
/// every character outside `[A-Za-z0-9_]` replaced by `_`.
pub fn archive_name(path: &Path) -> String {
    let stem = path.file_stem().unwrap_or_default().to_string_lossy();
    let name: String = stem
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if name.is_empty() {
        "archive".into()
    } else {
        name
    }
}

fn write_and_rename<'a>(
    tmp: &Path,
    path: &Path,
    parts: impl Iterator<Item = &'a [u8]>,
) -> Result<(), PtError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(tmp)
        .map_err(io_error("create", tmp))?;
    for part in parts {
        file.write_all(part).map_err(io_error("write", tmp))?;
    }
    file.sync_all().map_err(io_error("sync", tmp))?;
    drop(file);
    fs::rename(tmp, path).map_err(io_error("rename a temporary file over", path))
}

/// Makes a rename in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), PtError> {
    if cfg!(unix) {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_error("sync directory", dir))?;
    }
    Ok(())
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PtError {
    let path: PathBuf = path.to_owned();
    move |source| PtError::Io {
        action,
        path,
        source,
    }
}

#[cfg(test)]
mod tests {
    use sha2::{Digest, Sha256};

    use super::*;
    use crate::pt::{PtTensor, StoreDtype};

    #[test]
    fn archive_names_are_sanitised() {
        assert_eq!(archive_name(Path::new("/a/b/12_L3.pt")), "12_L3");
        assert_eq!(archive_name(Path::new("x-y.z.pt")), "x_y_z");
        assert_eq!(archive_name(Path::new("é.pt")), "_");
        assert_eq!(archive_name(Path::new(".pt")), "_pt");
    }

    #[test]
    fn write_then_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/dir/7.pt");
        let value = PtValue::Dict(vec![(
            "t".into(),
            PtValue::Tensor(PtTensor::from_f32(vec![2], &[1.0, 2.0], StoreDtype::F16)),
        )]);
        let info = write_pt_file(&path, &value).unwrap();
        let bytes = fs::read(&path).unwrap();
        assert_eq!(info.bytes, bytes.len() as u64);
        assert_eq!(info.sha256, hex::encode(Sha256::digest(&bytes)));
        assert_eq!(read_pt_file(&path).unwrap(), value);
        // Overwrites in place and leaves no temporary files behind.
        write_pt_file(&path, &PtValue::None).unwrap();
        assert_eq!(read_pt_file(&path).unwrap(), PtValue::None);
        let names: Vec<_> = fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn atomic_write_of_plain_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("manifest.json");
        write_file_atomic(&path, b"{}").unwrap();
        write_file_atomic(&path, b"{\"a\": 1}").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"{\"a\": 1}");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.pt");
        fs::write(&path, b"not a zip").unwrap();
        let message = read_pt_file(&path).unwrap_err().to_string();
        assert!(message.contains("bad.pt"), "{message}");
        assert!(message.contains("end of central directory"), "{message}");
        let missing = read_pt_file(&dir.path().join("missing.pt")).unwrap_err();
        assert!(missing.to_string().contains("missing.pt"));
    }

    #[test]
    fn failed_write_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        // The target is a non-empty directory, so the rename fails.
        let path = dir.path().join("target.pt");
        fs::create_dir(&path).unwrap();
        fs::write(path.join("keep"), b"x").unwrap();
        assert!(write_pt_file(&path, &PtValue::None).is_err());
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }
}
