//! The `.pt` archive: the records `torch.save` writes and how a pickle's
//! tensors map onto `data/<key>` entries.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use super::PtError;
use super::parts::PtParts;
use super::pickle_read::unpickle;
use super::pickle_write::pickle_value;
use super::tensor::{PtDtype, PtTensor};
use super::tensor_ref::{TensorRef, TensorSpan};
use super::value::{PtSkeleton, PtValue};
use super::zip::{EntryData, Zip64, ZipDirectory, ZipEntry, ZipWriter};

/// Bytes of zip overhead budgeted per entry when sizing the output buffer.
const ENTRY_OVERHEAD: usize = 256;

/// Decoded tensors may be larger than the file (views share storages, and
/// memo references share tensors) but not beyond this factor plus
/// [`MATERIALISE_SLACK`].
const MATERIALISE_FACTOR: usize = 64;
const MATERIALISE_SLACK: usize = 64 << 20;

/// Encodes `value` as a complete `.pt` file whose records live under
/// `archive_name/` (torch uses the file stem). Files past 4 GiB carry zip64
/// fields where torch's writer puts them.
pub fn encode_pt(value: &PtValue, archive_name: &str) -> Result<Vec<u8>, PtError> {
    Ok(encode_pt_with(value, archive_name, Zip64::AS_TORCH)?.into_bytes())
}

/// [`encode_pt`] taking the value: its tensors' data become parts of the
/// file as they are, without being copied (the file is the parts in order).
/// For large values this saves a copy of every tensor and the memory of
/// the whole file twice over.
pub fn encode_pt_parts(value: PtValue, archive_name: &str) -> Result<PtParts, PtError> {
    encode_pt_parts_with(value, archive_name, Zip64::AS_TORCH)
}

/// [`encode_pt`] with the bound from which sizes and offsets go to zip64
/// fields; a single part.
pub(super) fn encode_pt_with(
    value: &PtValue,
    archive_name: &str,
    zip64: Zip64,
) -> Result<PtParts, PtError> {
    check_archive_name(archive_name)?;
    let pickled = pickle_value(value)?;
    let data_bytes: usize = pickled.storages.iter().map(|t| t.data.len()).sum();
    let capacity =
        pickled.pickle.len() + data_bytes + (pickled.storages.len() + 8) * ENTRY_OVERHEAD;
    let storages = pickled.storages.iter().map(|t| EntryData::Copied(&t.data));
    write_records(archive_name, &pickled.pickle, storages, capacity, zip64)
}

/// [`encode_pt_parts`] with the bound from which sizes and offsets go to
/// zip64 fields.
pub(super) fn encode_pt_parts_with(
    value: PtValue,
    archive_name: &str,
    zip64: Zip64,
) -> Result<PtParts, PtError> {
    check_archive_name(archive_name)?;
    let (pickle, sizes) = {
        let pickled = pickle_value(&value)?;
        let sizes: Vec<usize> = pickled.storages.iter().map(|t| t.data.len()).collect();
        (pickled.pickle, sizes)
    };
    // The pickle numbers storages in document order, as `try_map` visits
    // the tensors.
    let mut storages = Vec::with_capacity(sizes.len());
    value.try_map(&mut |tensor: PtTensor| {
        storages.push(tensor.data);
        Ok::<(), PtError>(())
    })?;
    let visited: Vec<usize> = storages.iter().map(|data| data.len()).collect();
    if visited != sizes {
        return Err(PtError::Tensor(
            "the pickle's storages are not the value's tensors in document order".into(),
        ));
    }
    let capacity = pickle.len() + (storages.len() + 8) * ENTRY_OVERHEAD;
    let storages = storages.into_iter().map(EntryData::Moved);
    write_records(archive_name, &pickle, storages, capacity, zip64)
}

fn check_archive_name(archive_name: &str) -> Result<(), PtError> {
    if archive_name.is_empty() || archive_name.contains(['/', '\\']) {
        return Err(PtError::Unsupported(format!(
            "archive name {archive_name:?}"
        )));
    }
    Ok(())
}

/// Writes the records `torch.save` writes, in its order, around `pickle`
/// and the `storages`' data.
fn write_records<'a>(
    archive_name: &str,
    pickle: &[u8],
    storages: impl Iterator<Item = EntryData<'a>>,
    capacity: usize,
    zip64: Zip64,
) -> Result<PtParts, PtError> {
    let mut zip = ZipWriter::with_capacity(capacity, zip64);
    let record = |name: &str| format!("{archive_name}/{name}");
    let copied = EntryData::Copied;
    zip.add(&record("data.pkl"), copied(pickle))?;
    zip.add(&record(".format_version"), copied(b"1"))?;
    zip.add(&record(".storage_alignment"), copied(b"64"))?;
    zip.add(&record("byteorder"), copied(b"little"))?;
    for (key, data) in storages.enumerate() {
        zip.add(&record(&format!("data/{key}")), data)?;
    }
    zip.add(&record("version"), copied(b"3\n"))?;
    let id = serialization_id(&zip);
    zip.add(&record(".data/serialization_id"), copied(id.as_bytes()))?;
    Ok(PtParts::new(zip.finish()))
}

/// torch writes a random 40-digit id; ours is derived from the entries
/// (names, CRCs and sizes) so that equal values encode to equal files.
fn serialization_id(zip: &ZipWriter) -> String {
    let mut hasher = Sha256::new();
    for (name, crc, size) in zip.entries() {
        hasher.update(name.as_bytes());
        hasher.update([0]);
        hasher.update(crc.to_le_bytes());
        hasher.update(size.to_le_bytes());
    }
    let digest = hasher.finalize();
    let word = |i: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&digest[i * 8..i * 8 + 8]);
        u64::from_le_bytes(bytes)
    };
    format!("{:020}{:020}", word(0), word(1))
}

/// Decodes a complete `.pt` file held in memory.
pub fn decode_pt(bytes: &[u8]) -> Result<PtValue, PtError> {
    let directory = ZipDirectory::parse_from_tail(bytes, bytes.len() as u64)?;
    let pickle = PtIndex::pickle_entry(&directory)?.data(bytes)?;
    let index = PtIndex::new(directory, pickle)?;
    let byteorder = format!("{}/byteorder", index.prefix);
    if let Some(entry) = index.directory.get(&byteorder) {
        let order = entry.data(bytes)?;
        if order != b"little" {
            return Err(PtError::Unsupported(format!(
                "byte order {:?}",
                String::from_utf8_lossy(order)
            )));
        }
    }
    let budget = bytes
        .len()
        .saturating_mul(MATERIALISE_FACTOR)
        .saturating_add(MATERIALISE_SLACK);
    index.materialise(budget, |entry| entry.data(bytes))
}

/// What is known about a `.pt` archive before reading any storage: its
/// directory, its folder name and the unpickled value with tensors as
/// [`TensorRef`]s. Storages are assumed little-endian (torch writes a
/// `byteorder` record, `little` on all common platforms).
#[derive(Debug, Clone)]
pub struct PtIndex {
    directory: ZipDirectory,
    prefix: String,
    root: PtSkeleton,
}

impl PtIndex {
    /// The entry holding the pickle, `<archive>/data.pkl`, where `<archive>`
    /// is the folder of the first entry (as torch's reader decides it).
    pub fn pickle_entry(directory: &ZipDirectory) -> Result<&ZipEntry, PtError> {
        let prefix = archive_prefix(directory)?;
        directory.require(&format!("{prefix}/data.pkl"))
    }

    /// Unpickles `pickle`, the data of [`PtIndex::pickle_entry`].
    pub fn new(directory: ZipDirectory, pickle: &[u8]) -> Result<Self, PtError> {
        let prefix = archive_prefix(&directory)?.to_owned();
        let root = unpickle(pickle)?;
        Ok(PtIndex {
            directory,
            prefix,
            root,
        })
    }

    pub fn directory(&self) -> &ZipDirectory {
        &self.directory
    }

    /// The archive's folder name.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The unpickled value.
    pub fn root(&self) -> &PtSkeleton {
        &self.root
    }

    /// Where the bytes of a contiguous `tensor` of this archive are. The
    /// span's offset counts from the start of the entry's data (see
    /// [`ZipEntry::data_offset`]); non-contiguous views are an error.
    pub fn locate(&self, tensor: &TensorRef) -> Result<TensorSpan, PtError> {
        let entry = storage_entry(&self.directory, &self.prefix, tensor)?;
        let range = tensor.storage_byte_range()?;
        Ok(TensorSpan {
            entry: entry.name.clone(),
            offset: range.start,
            len: range.end - range.start,
        })
    }

    /// Reads every tensor's data through `read` (each storage once), giving
    /// up once the tensors would exceed `budget` bytes in total.
    fn materialise<'a>(
        self,
        mut budget: usize,
        read: impl Fn(&ZipEntry) -> Result<&'a [u8], PtError>,
    ) -> Result<PtValue, PtError> {
        let PtIndex {
            directory,
            prefix,
            root,
        } = self;
        let mut storages: HashMap<String, (PtDtype, &'a [u8])> = HashMap::new();
        root.try_map(&mut |tensor: TensorRef| -> Result<PtTensor, PtError> {
            budget = budget.checked_sub(tensor.nbytes()).ok_or_else(|| {
                PtError::Limit("tensors expand to far more bytes than the file holds".into())
            })?;
            let bytes = match storages.get(tensor.storage_key()) {
                Some(&(dtype, bytes)) if dtype == tensor.dtype() => bytes,
                Some(_) => {
                    return Err(PtError::Tensor(format!(
                        "storage {} is used with different dtypes",
                        tensor.storage_key()
                    )));
                }
                None => {
                    let bytes = read(storage_entry(&directory, &prefix, &tensor)?)?;
                    storages.insert(tensor.storage_key().to_owned(), (tensor.dtype(), bytes));
                    bytes
                }
            };
            tensor.materialise(bytes)
        })
    }
}

/// The storage entry of `tensor`, checked against the storage's size.
fn storage_entry<'d>(
    directory: &'d ZipDirectory,
    prefix: &str,
    tensor: &TensorRef,
) -> Result<&'d ZipEntry, PtError> {
    let entry = directory.require(&tensor.storage_entry(prefix))?;
    let expected = tensor.storage_numel() * tensor.dtype().element_size() as u64;
    if entry.size != expected {
        return Err(PtError::Tensor(format!(
            "entry {} has {} bytes but storage {} holds {expected}",
            entry.name,
            entry.size,
            tensor.storage_key()
        )));
    }
    Ok(entry)
}

/// The folder holding the archive's records: that of the first entry.
fn archive_prefix(directory: &ZipDirectory) -> Result<&str, PtError> {
    let first = directory
        .entries()
        .first()
        .ok_or_else(|| PtError::Zip("archive has no entries".into()))?;
    match first.name.split_once('/') {
        Some((prefix, _)) if !prefix.is_empty() => Ok(prefix),
        _ => Err(PtError::Zip(format!(
            "entry {} is not inside an archive folder",
            first.name
        ))),
    }
}
