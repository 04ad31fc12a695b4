//! PyTorch `.pt` (zip + pickle) writer and reader.
//!
//! Files are laid out the way `torch.save` lays them out (stored zip entries
//! under one `<archive_name>/` folder, 64-byte aligned records, a protocol 2
//! pickle in `data.pkl`), so `torch.load(path, weights_only=True)` and
//! `torch.load(path, mmap=True)` read what [`encode_pt`] writes.
//!
//! Decoding runs in three steps, each usable on its own for ranged reads:
//! 1. [`ZipDirectory::parse_from_tail`] reads the central directory;
//! 2. [`PtIndex::new`] unpickles `data.pkl` into a [`PtSkeleton`] whose
//!    tensors are [`TensorRef`]s naming a storage, an offset, a shape and
//!    strides, and [`PtIndex::locate`] turns one into a byte span;
//! 3. [`decode_pt`] materialises every tensor from its `data/<key>` entry.

mod archive;
mod bytes;
mod crc32;
mod file;
mod opcodes;
mod parts;
mod pickle_read;
mod pickle_write;
mod tensor;
mod tensor_ref;
mod value;
mod zip;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use archive::{PtIndex, decode_pt, encode_pt, encode_pt_parts};
pub use bytes::PtBytes;
pub use crc32::crc32;
pub use file::{
    PtFileInfo, archive_name, read_pt_file, write_file_atomic, write_pt_file, write_pt_parts,
};
pub use parts::PtParts;
pub use tensor::{PtDtype, PtTensor, StoreDtype};
pub use tensor_ref::{TensorRef, TensorSpan};
pub use value::{PtSkeleton, PtTree, PtValue};
pub use zip::{LOCAL_HEADER_LEN, ZipDirectory, ZipEntry};

/// Errors of the `.pt` writer and reader.
#[derive(Debug, thiserror::Error)]
pub enum PtError {
    /// No end of central directory record, or one that points nowhere.
    #[error("not a zip file: {0}")]
    NotZip(String),
    /// The tail handed to [`ZipDirectory::parse_from_tail`] does not reach
    /// back to the start of the central directory.
    #[error("zip tail too short: the central directory needs the last {needed} bytes")]
    TailTooShort { needed: u64 },
    /// A structurally broken zip archive.
    #[error("corrupt zip archive: {0}")]
    Zip(String),
    /// An entry the archive must have is absent.
    #[error("entry {0} missing")]
    MissingEntry(String),
    /// The pickle ended before an opcode's operand.
    #[error("truncated pickle at byte {0}")]
    PickleTruncated(usize),
    /// A malformed pickle.
    #[error("invalid pickle at byte {offset}: {message}")]
    Pickle { offset: usize, message: String },
    /// A pickle opcode this reader does not implement.
    #[error("unsupported pickle opcode 0x{opcode:02x} at byte {offset}")]
    Opcode { opcode: u8, offset: usize },
    /// A pickle global outside the tensor allow-list.
    #[error("pickle global {0} is not allowed")]
    Global(String),
    /// A value the `.pt` model cannot represent (non-string dict key, ...).
    #[error("unsupported value: {0}")]
    Unsupported(String),
    /// A tensor whose metadata or data is inconsistent.
    #[error("invalid tensor: {0}")]
    Tensor(String),
    /// A resource limit of the reader or writer was hit.
    #[error("limit exceeded: {0}")]
    Limit(String),
    /// An unknown store dtype name.
    #[error("unknown dtype {0:?} (expected f32, f16 or bf16)")]
    UnknownDtype(String),
    /// A file system operation failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Decoding a file failed; names the file.
    #[error("invalid .pt file {path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: Box<PtError>,
    },
}
