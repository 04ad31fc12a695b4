//! Stored (uncompressed) zip archives: a writer that lays entries out the
//! way torch's miniz writer does, and a central-directory reader.
//!
//! The writer mirrors `torch.save` byte for byte in structure: every entry's
//! data starts at a 64-byte aligned offset (padding lives in an `FB` extra
//! field of the local header), non-empty entries carry a data descriptor,
//! and the end records are zip64 ones followed by the plain one. Entries
//! whose size or header offset does not fit 32 bits get zip64 extended
//! information fields (before the padding, in the local header and the
//! central directory) and a data descriptor with 64-bit sizes, as miniz
//! writes them, so archives may pass 4 GiB. torch's optional offset
//! calculation (`calculate_storage_offsets`) relies on that layout.

use std::collections::HashMap;

use super::crc32::crc32;
use super::{PtBytes, PtError};

const LOCAL_SIG: u32 = 0x0403_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const EOCD_SIG: u32 = 0x0605_4b50;
const ZIP64_EOCD_SIG: u32 = 0x0606_4b50;
const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;
const DESCRIPTOR_SIG: u32 = 0x0807_4b50;

/// Length of a local file header without its name and extra field.
pub const LOCAL_HEADER_LEN: usize = 30;
const CENTRAL_HEADER_LEN: usize = 46;
const EOCD_LEN: usize = 22;
const ZIP64_LOCATOR_LEN: usize = 20;
const ZIP64_EOCD_LEN: usize = 56;
const MAX_COMMENT_LEN: usize = 0xFFFF;

/// Alignment of every entry's data, as torch's `.storage_alignment`.
pub(super) const ALIGNMENT: usize = 64;
/// General purpose flag: sizes and CRC follow the data in a descriptor.
const FLAG_DESCRIPTOR: u16 = 0x0008;
/// General purpose flag: the name is UTF-8.
const FLAG_UTF8: u16 = 0x0800;
/// Header id of the padding extra field torch writes.
const PADDING_EXTRA_ID: &[u8; 2] = b"FB";
/// Header id of the zip64 extended information extra field.
const ZIP64_EXTRA_ID: u16 = 0x0001;
/// "Version made by" and "version needed" of miniz's zip64 end record.
const ZIP64_VERSION_MADE_BY: u16 = 0x031E;
const ZIP64_VERSION_NEEDED: u16 = 45;
/// A 32-bit field holding this defers to the zip64 field.
const WIDE32: u32 = u32::MAX;
/// A 16-bit entry count holding this defers to the zip64 end record.
const WIDE16: u16 = u16::MAX;

/// From which value on a [`ZipWriter`] moves sizes and header offsets into
/// zip64 fields (their 32-bit fields then hold `0xFFFFFFFF`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Zip64 {
    pub(super) from: u64,
}

impl Zip64 {
    /// miniz's (torch's writer's) choice: values that do not fit 32 bits,
    /// and `0xFFFFFFFF` itself. A lower bound lays a small archive out the
    /// way one past 4 GiB is (for tests).
    pub(super) const AS_TORCH: Zip64 = Zip64 {
        from: WIDE32 as u64,
    };

    /// Whether a value of a 32-bit size or offset field goes to zip64.
    fn wide(self, value: u64) -> bool {
        value >= self.from.min(u64::from(WIDE32))
    }

    /// `value` for its 32-bit field: itself, or the placeholder.
    fn field32(self, value: u64) -> u32 {
        if self.wide(value) {
            WIDE32
        } else {
            value as u32
        }
    }

    /// An entry count for its 16-bit field: itself, or the placeholder.
    fn field16(count: u64) -> u16 {
        u16::try_from(count)
            .ok()
            .filter(|&c| c < WIDE16)
            .unwrap_or(WIDE16)
    }

    /// The zip64 extended information field miniz writes for an entry of
    /// `size` bytes at `header_offset` (empty if neither needs it): the
    /// uncompressed and compressed sizes if the size is wide, then the
    /// offset if it is. The compressed size is `compressed`: the local
    /// header, written before the data, has 0 there.
    fn extra(self, size: u64, compressed: u64, header_offset: u64) -> Vec<u8> {
        let mut values = Vec::with_capacity(3);
        if self.wide(size) {
            values.extend([size, compressed]);
        }
        if self.wide(header_offset) {
            values.push(header_offset);
        }
        if values.is_empty() {
            return Vec::new();
        }
        let mut extra = Vec::with_capacity(4 + 8 * values.len());
        put_u16(&mut extra, ZIP64_EXTRA_ID);
        put_u16(&mut extra, (8 * values.len()) as u16);
        for value in values {
            put_u64(&mut extra, value);
        }
        extra
    }
}

/// Builds a stored zip archive in memory, as a sequence of parts: runs of
/// headers and copied data, and data moved in whole (see [`EntryData`]).
pub(super) struct ZipWriter {
    /// Finished parts, in file order.
    parts: Vec<PtBytes>,
    /// Bytes in `parts`.
    parts_len: u64,
    /// The part being written.
    buf: Vec<u8>,
    entries: Vec<Entry>,
    zip64: Zip64,
}

/// An entry's data as handed to [`ZipWriter::add`].
pub(super) enum EntryData<'a> {
    /// Copied into the archive's current part.
    Copied(&'a [u8]),
    /// Kept as a part of its own, without copying, if it is at least
    /// [`OWN_PART_FROM`] bytes long; copied like the others if not.
    Moved(PtBytes),
}

/// Moved data shorter than this is copied among the headers: a long
/// response's thousands of one-row tensors would otherwise be as many parts
/// (and writes, and upload pieces).
const OWN_PART_FROM: usize = 64 << 10;

impl EntryData<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            EntryData::Copied(data) => data,
            EntryData::Moved(data) => data,
        }
    }
}

/// What the headers say about one entry.
struct Entry {
    name: String,
    crc: u32,
    size: u64,
    header_offset: u64,
}

impl Entry {
    fn flags(&self) -> u16 {
        if self.size == 0 {
            FLAG_UTF8
        } else {
            FLAG_UTF8 | FLAG_DESCRIPTOR
        }
    }

    /// Appends the local header (the entry's name, its zip64 field if any,
    /// and the padding that aligns the data that follows).
    fn local_header(&self, zip64: Zip64, buf: &mut Vec<u8>) {
        let extra = zip64.extra(self.size, 0, self.header_offset);
        // Data starts after the header, the name, the zip64 field and at
        // least the 4 bytes of the padding field's own header.
        let unpadded =
            self.header_offset as usize + LOCAL_HEADER_LEN + self.name.len() + extra.len() + 4;
        let padding = unpadded.next_multiple_of(ALIGNMENT) - unpadded;
        put_u32(buf, LOCAL_SIG);
        put_u16(buf, 0); // version needed
        put_u16(buf, self.flags());
        put_u16(buf, 0); // method: stored
        put_u32(buf, 0); // time and date
        buf.extend_from_slice(&[0; 12]); // crc and sizes: in the descriptor
        put_u16(buf, self.name.len() as u16);
        put_u16(buf, (extra.len() + 4 + padding) as u16);
        buf.extend_from_slice(self.name.as_bytes());
        buf.extend_from_slice(&extra);
        buf.extend_from_slice(PADDING_EXTRA_ID);
        put_u16(buf, padding as u16);
        buf.resize(buf.len() + padding, b'Z');
    }

    /// Appends the data descriptor (none for an empty entry). miniz's has
    /// 64-bit sizes exactly when the local header has a zip64 field.
    fn descriptor(&self, zip64: Zip64, buf: &mut Vec<u8>) {
        if self.size == 0 {
            return;
        }
        put_u32(buf, DESCRIPTOR_SIG);
        put_u32(buf, self.crc);
        if zip64.wide(self.size) || zip64.wide(self.header_offset) {
            put_u64(buf, self.size);
            put_u64(buf, self.size);
        } else {
            put_u32(buf, self.size as u32);
            put_u32(buf, self.size as u32);
        }
    }

    /// Appends the entry's central directory header.
    fn central_header(&self, zip64: Zip64, buf: &mut Vec<u8>) {
        let extra = zip64.extra(self.size, self.size, self.header_offset);
        put_u32(buf, CENTRAL_SIG);
        put_u16(buf, 0); // version made by
        put_u16(buf, 0); // version needed
        put_u16(buf, self.flags());
        put_u16(buf, 0); // method: stored
        put_u32(buf, 0); // time and date
        put_u32(buf, self.crc);
        put_u32(buf, zip64.field32(self.size));
        put_u32(buf, zip64.field32(self.size));
        put_u16(buf, self.name.len() as u16);
        put_u16(buf, extra.len() as u16);
        buf.extend_from_slice(&[0; 10]); // comment, disk, attributes
        put_u32(buf, zip64.field32(self.header_offset));
        buf.extend_from_slice(self.name.as_bytes());
        buf.extend_from_slice(&extra);
    }
}

/// Appends the end records after a central directory of `count` entries,
/// `cd_size` bytes at `cd_offset`: the zip64 one and its locator (which
/// miniz writes for every archive torch saves), then the plain one.
fn end_records(zip64: Zip64, count: u64, cd_offset: u64, cd_size: u64, buf: &mut Vec<u8>) {
    put_u32(buf, ZIP64_EOCD_SIG);
    put_u64(buf, (ZIP64_EOCD_LEN - 12) as u64); // size of the rest
    put_u16(buf, ZIP64_VERSION_MADE_BY);
    put_u16(buf, ZIP64_VERSION_NEEDED);
    put_u32(buf, 0); // disk numbers
    put_u32(buf, 0);
    put_u64(buf, count);
    put_u64(buf, count);
    put_u64(buf, cd_size);
    put_u64(buf, cd_offset);
    put_u32(buf, ZIP64_LOCATOR_SIG);
    put_u32(buf, 0); // disk of the zip64 end record
    put_u64(buf, cd_offset + cd_size);
    put_u32(buf, 1); // disks
    put_u32(buf, EOCD_SIG);
    put_u32(buf, 0); // disk numbers
    put_u16(buf, Zip64::field16(count));
    put_u16(buf, Zip64::field16(count));
    put_u32(buf, zip64.field32(cd_size));
    put_u32(buf, zip64.field32(cd_offset));
    put_u16(buf, 0); // comment length
}

impl ZipWriter {
    /// An empty archive whose first part has room for `capacity` bytes.
    pub(super) fn with_capacity(capacity: usize, zip64: Zip64) -> Self {
        ZipWriter {
            parts: Vec::new(),
            parts_len: 0,
            buf: Vec::with_capacity(capacity),
            entries: Vec::new(),
            zip64,
        }
    }

    /// Name, CRC-32 and size of each entry written so far.
    pub(super) fn entries(&self) -> impl Iterator<Item = (&str, u32, u64)> {
        self.entries
            .iter()
            .map(|e| (e.name.as_str(), e.crc, e.size))
    }

    /// Appends an entry `name` holding `data`, its data 64-byte aligned.
    pub(super) fn add(&mut self, name: &str, data: EntryData<'_>) -> Result<(), PtError> {
        if u16::try_from(name.len()).is_err() {
            return Err(PtError::Limit(format!("zip entry name too long: {name}")));
        }
        let bytes = data.bytes();
        let entry = Entry {
            name: name.to_owned(),
            crc: crc32(bytes),
            size: bytes.len() as u64,
            header_offset: self.parts_len + self.buf.len() as u64,
        };
        entry.local_header(self.zip64, &mut self.buf);
        match data {
            EntryData::Moved(bytes) if bytes.len() >= OWN_PART_FROM => {
                let headers = std::mem::take(&mut self.buf);
                self.push_part(headers.into());
                self.push_part(bytes);
            }
            data => self.buf.extend_from_slice(data.bytes()),
        }
        entry.descriptor(self.zip64, &mut self.buf);
        self.entries.push(entry);
        Ok(())
    }

    /// [`ZipWriter::finish`], concatenated.
    #[cfg(test)]
    pub(super) fn finish_bytes(self) -> Vec<u8> {
        self.finish()
            .iter()
            .flat_map(|part| part.iter().copied())
            .collect()
    }

    fn push_part(&mut self, part: PtBytes) {
        if !part.is_empty() {
            self.parts_len += part.len() as u64;
            self.parts.push(part);
        }
    }

    /// Writes the central directory and end records and returns the
    /// archive's parts, in file order (one if no data was moved in).
    pub(super) fn finish(mut self) -> Vec<PtBytes> {
        let cd_offset = self.parts_len + self.buf.len() as u64;
        for entry in &self.entries {
            entry.central_header(self.zip64, &mut self.buf);
        }
        let cd_size = self.parts_len + self.buf.len() as u64 - cd_offset;
        let count = self.entries.len() as u64;
        end_records(self.zip64, count, cd_offset, cd_size, &mut self.buf);
        let last = std::mem::take(&mut self.buf);
        self.push_part(last.into());
        self.parts
    }
}

fn put_u16(buf: &mut Vec<u8>, v: u16) {
    buf.extend_from_slice(&v.to_le_bytes());
}

fn put_u32(buf: &mut Vec<u8>, v: u32) {
    buf.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(buf: &mut Vec<u8>, v: u64) {
    buf.extend_from_slice(&v.to_le_bytes());
}

/// One entry of a zip archive's central directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZipEntry {
    pub name: String,
    /// File offset of the entry's local header.
    pub header_offset: u64,
    /// Size of the (stored) data in bytes.
    pub size: u64,
    pub crc32: u32,
}

impl ZipEntry {
    /// File offset of the entry's data, given at least the first
    /// [`LOCAL_HEADER_LEN`] bytes at [`ZipEntry::header_offset`].
    pub fn data_offset(&self, local_header: &[u8]) -> Result<u64, PtError> {
        let header = Bytes(local_header);
        let fields = (|| {
            let sig = header.u32(0)?;
            let method = header.u16(8)?;
            let name_len = header.u16(26)?;
            let extra_len = header.u16(28)?;
            Some((sig, method, name_len, extra_len))
        })();
        match fields {
            Some((LOCAL_SIG, 0, name_len, extra_len)) => {
                let header_len = LOCAL_HEADER_LEN + usize::from(name_len) + usize::from(extra_len);
                self.header_offset
                    .checked_add(header_len as u64)
                    .ok_or_else(|| PtError::Zip(format!("entry {} out of range", self.name)))
            }
            Some((LOCAL_SIG, method, ..)) => Err(PtError::Zip(format!(
                "entry {} is compressed (method {method}); only stored entries are supported",
                self.name
            ))),
            _ => Err(PtError::Zip(format!(
                "bad local header for entry {} at byte {}",
                self.name, self.header_offset
            ))),
        }
    }

    /// The entry's data within the whole archive `file`, CRC-checked.
    pub(crate) fn data<'a>(&self, file: &'a [u8]) -> Result<&'a [u8], PtError> {
        let out_of_bounds = || {
            PtError::Zip(format!(
                "entry {} extends past the end of the file",
                self.name
            ))
        };
        let start = usize::try_from(self.header_offset).map_err(|_| out_of_bounds())?;
        let local = file.get(start..).ok_or_else(out_of_bounds)?;
        let data_start = usize::try_from(self.data_offset(local)?).map_err(|_| out_of_bounds())?;
        let name_start = start + LOCAL_HEADER_LEN;
        if file.get(name_start..name_start + self.name.len()) != Some(self.name.as_bytes()) {
            return Err(PtError::Zip(format!(
                "local header of entry {} names another entry",
                self.name
            )));
        }
        let size = usize::try_from(self.size).map_err(|_| out_of_bounds())?;
        let data = data_start
            .checked_add(size)
            .and_then(|end| file.get(data_start..end))
            .ok_or_else(out_of_bounds)?;
        if crc32(data) != self.crc32 {
            return Err(PtError::Zip(format!("entry {}: crc32 mismatch", self.name)));
        }
        Ok(data)
    }
}

/// The central directory of a zip archive.
#[derive(Debug, Clone)]
pub struct ZipDirectory {
    entries: Vec<ZipEntry>,
    by_name: HashMap<String, usize>,
}

/// Where the central directory is, from the end records.
struct DirectoryLocation {
    entries: u64,
    offset: u64,
    size: u64,
    /// File offset of the first end record (zip64 or not).
    end: u64,
}

impl ZipDirectory {
    /// Parses the central directory from the last `tail.len()` bytes of a
    /// file `file_len` bytes long (the whole file works). If the tail does not
    /// reach back far enough, the error is [`PtError::TailTooShort`] with the
    /// tail length needed; retry with that many bytes (more than once for
    /// zip64 archives whose 32-bit end record lacks the directory offset).
    pub fn parse_from_tail(tail: &[u8], file_len: u64) -> Result<Self, PtError> {
        let tail_start = file_len
            .checked_sub(tail.len() as u64)
            .ok_or_else(|| PtError::Zip("tail longer than the file".into()))?;
        let location = locate_directory(tail, tail_start, file_len)?;
        let cd_start = location
            .offset
            .checked_sub(tail_start)
            .ok_or(PtError::TailTooShort {
                needed: file_len - location.offset,
            })?;
        let cd = usize::try_from(cd_start)
            .ok()
            .and_then(|start| tail.get(start..start.checked_add(location.size as usize)?))
            .ok_or_else(|| PtError::Zip("central directory out of bounds".into()))?;
        let cd = Bytes(cd);
        let mut entries = Vec::new();
        let mut by_name = HashMap::new();
        let mut pos = 0usize;
        for _ in 0..location.entries {
            let entry = parse_central_header(cd, &mut pos, location.offset)?;
            if by_name.insert(entry.name.clone(), entries.len()).is_some() {
                return Err(PtError::Zip(format!("duplicate entry {}", entry.name)));
            }
            entries.push(entry);
        }
        Ok(ZipDirectory { entries, by_name })
    }

    /// All entries in central directory order.
    pub fn entries(&self) -> &[ZipEntry] {
        &self.entries
    }

    /// The entry called `name`.
    pub fn get(&self, name: &str) -> Option<&ZipEntry> {
        self.by_name.get(name).map(|&i| &self.entries[i])
    }

    /// The entry called `name`, or an error naming it.
    pub(super) fn require(&self, name: &str) -> Result<&ZipEntry, PtError> {
        self.get(name)
            .ok_or_else(|| PtError::MissingEntry(name.to_owned()))
    }
}

/// Finds the end of central directory record (and the zip64 one if present).
fn locate_directory(
    tail: &[u8],
    tail_start: u64,
    file_len: u64,
) -> Result<DirectoryLocation, PtError> {
    let not_found = || PtError::NotZip("end of central directory not found".into());
    let max_search = (EOCD_LEN + MAX_COMMENT_LEN).min(tail.len());
    let bytes = Bytes(tail);
    let eocd = (EOCD_LEN..=max_search)
        .map(|back| tail.len() - back)
        .find(|&pos| {
            bytes.u32(pos) == Some(EOCD_SIG)
                && bytes.u16(pos + 20).map(usize::from) == Some(tail.len() - pos - EOCD_LEN)
        });
    let Some(eocd) = eocd else {
        let searchable = (EOCD_LEN + MAX_COMMENT_LEN) as u64;
        return Err(if tail_start > 0 && (tail.len() as u64) < searchable {
            PtError::TailTooShort {
                needed: file_len.min(searchable),
            }
        } else {
            not_found()
        });
    };
    let field16 = |off| bytes.u16(eocd + off).ok_or_else(not_found);
    let field32 = |off| bytes.u32(eocd + off).ok_or_else(not_found);
    if field16(4)? != 0 || field16(6)? != 0 {
        return Err(PtError::Zip("multi-disk archives are not supported".into()));
    }
    let mut location = DirectoryLocation {
        entries: u64::from(field16(10)?),
        size: u64::from(field32(12)?),
        offset: u64::from(field32(16)?),
        end: tail_start + eocd as u64,
    };
    let has_locator = eocd
        .checked_sub(ZIP64_LOCATOR_LEN)
        .is_some_and(|pos| bytes.u32(pos) == Some(ZIP64_LOCATOR_SIG));
    if has_locator {
        let locator = eocd - ZIP64_LOCATOR_LEN;
        let zip64_offset = bytes.u64(locator + 8).ok_or_else(not_found)?;
        // Ask for the central directory too if the plain record knows where it is.
        let first_needed = match location.offset {
            offset if offset == u64::from(u32::MAX) => zip64_offset,
            offset => offset.min(zip64_offset),
        };
        let pos = zip64_offset
            .checked_sub(tail_start)
            .ok_or(PtError::TailTooShort {
                needed: file_len.saturating_sub(first_needed),
            })?;
        let pos = usize::try_from(pos)
            .ok()
            .filter(|&p| {
                p.checked_add(ZIP64_EOCD_LEN)
                    .is_some_and(|end| end <= locator)
            })
            .ok_or_else(|| PtError::Zip("zip64 end of central directory out of bounds".into()))?;
        if bytes.u32(pos) != Some(ZIP64_EOCD_SIG) {
            return Err(PtError::Zip(
                "zip64 end of central directory not found".into(),
            ));
        }
        let field64 = |off| bytes.u64(pos + off).ok_or_else(not_found);
        location = DirectoryLocation {
            entries: field64(32)?,
            size: field64(40)?,
            offset: field64(48)?,
            end: zip64_offset,
        };
    }
    let cd_end = location.offset.checked_add(location.size);
    if cd_end.is_none_or(|end| end > location.end) {
        return Err(PtError::Zip(
            "central directory overlaps the end records".into(),
        ));
    }
    Ok(location)
}

/// Parses the central directory header at `*pos` in `cd` and advances `pos`.
fn parse_central_header(
    cd: Bytes<'_>,
    pos: &mut usize,
    cd_offset: u64,
) -> Result<ZipEntry, PtError> {
    let at = *pos;
    let truncated = || PtError::Zip(format!("central directory truncated at entry byte {at}"));
    if cd.u32(at) != Some(CENTRAL_SIG) {
        return Err(PtError::Zip(format!(
            "bad central directory header at byte {}",
            cd_offset + at as u64
        )));
    }
    let field16 = |off| cd.u16(at + off).map(usize::from).ok_or_else(truncated);
    let field32 = |off| cd.u32(at + off).ok_or_else(truncated);
    let method = field16(10)?;
    let crc32 = field32(16)?;
    let mut compressed = u64::from(field32(20)?);
    let mut size = u64::from(field32(24)?);
    let (name_len, extra_len, comment_len) = (field16(28)?, field16(30)?, field16(32)?);
    let mut header_offset = u64::from(field32(42)?);
    let name_start = at + CENTRAL_HEADER_LEN;
    let extra_start = name_start + name_len;
    let end = extra_start + extra_len + comment_len;
    let name = cd.slice(name_start, name_len).ok_or_else(truncated)?;
    let name = String::from_utf8(name.to_vec())
        .map_err(|_| PtError::Zip(format!("entry name at byte {at} is not utf-8")))?;
    let extra = cd.slice(extra_start, extra_len).ok_or_else(truncated)?;
    cd.slice(at, end - at).ok_or_else(truncated)?;
    read_zip64_extra(extra, &mut size, &mut compressed, &mut header_offset)
        .ok_or_else(|| PtError::Zip(format!("bad zip64 extra field in entry {name}")))?;
    if method != 0 || compressed != size {
        return Err(PtError::Zip(format!(
            "entry {name} is compressed (method {method}); only stored entries are supported"
        )));
    }
    if header_offset
        .checked_add(size)
        .is_none_or(|e| e > cd_offset)
    {
        return Err(PtError::Zip(format!(
            "entry {name} overlaps the central directory"
        )));
    }
    *pos = end;
    Ok(ZipEntry {
        name,
        header_offset,
        size,
        crc32,
    })
}

/// Replaces the 0xFFFFFFFF placeholders by the values of a zip64 extended
/// information field (`None` if the field is malformed).
fn read_zip64_extra(
    extra: &[u8],
    size: &mut u64,
    compressed: &mut u64,
    header_offset: &mut u64,
) -> Option<()> {
    let extra = Bytes(extra);
    let mut pos = 0;
    while pos + 4 <= extra.0.len() {
        let (id, len) = (extra.u16(pos)?, usize::from(extra.u16(pos + 2)?));
        if id == 0x0001 {
            let mut field = Bytes(extra.slice(pos + 4, len)?);
            for value in [size, compressed, header_offset] {
                if *value == u64::from(u32::MAX) {
                    *value = field.u64(0)?;
                    field = Bytes(&field.0[8..]);
                }
            }
            return Some(());
        }
        pos += 4 + len;
    }
    Some(())
}

/// Bounds-checked little-endian reads.
#[derive(Clone, Copy)]
struct Bytes<'a>(&'a [u8]);

impl<'a> Bytes<'a> {
    fn slice(&self, at: usize, len: usize) -> Option<&'a [u8]> {
        self.0.get(at..at.checked_add(len)?)
    }

    fn array<const N: usize>(&self, at: usize) -> Option<[u8; N]> {
        self.slice(at, N)?.try_into().ok()
    }

    fn u16(&self, at: usize) -> Option<u16> {
        self.array(at).map(u16::from_le_bytes)
    }

    fn u32(&self, at: usize) -> Option<u32> {
        self.array(at).map(u32::from_le_bytes)
    }

    fn u64(&self, at: usize) -> Option<u64> {
        self.array(at).map(u64::from_le_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contents(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
        let directory = ZipDirectory::parse_from_tail(bytes, bytes.len() as u64).unwrap();
        directory
            .entries()
            .iter()
            .map(|e| (e.name.clone(), e.data(bytes).unwrap().to_vec()))
            .collect()
    }

    #[test]
    fn written_archives_read_back() {
        let mut zip = ZipWriter::with_capacity(0, Zip64::AS_TORCH);
        zip.add("a/x", EntryData::Copied(b"hello")).unwrap();
        zip.add("a/empty", EntryData::Moved(PtBytes::default()))
            .unwrap();
        let mut bytes = zip.finish_bytes();
        let expected = vec![
            ("a/x".to_owned(), b"hello".to_vec()),
            ("a/empty".to_owned(), Vec::new()),
        ];
        assert_eq!(contents(&bytes), expected);
        // An archive comment does not hide the end record.
        let comment_len = bytes.len() - 2;
        bytes[comment_len..].copy_from_slice(&7u16.to_le_bytes());
        bytes.extend_from_slice(b"comment");
        assert_eq!(contents(&bytes), expected);
    }

    #[test]
    fn reads_zip64_records() {
        let (name, data) = ("z/data.bin", b"zip64 data");
        let crc = crc32(data);
        let mut f = Vec::new();
        put_u32(&mut f, LOCAL_SIG);
        f.extend_from_slice(&[45, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        put_u32(&mut f, crc);
        put_u32(&mut f, data.len() as u32);
        put_u32(&mut f, data.len() as u32);
        put_u16(&mut f, name.len() as u16);
        put_u16(&mut f, 0);
        f.extend_from_slice(name.as_bytes());
        f.extend_from_slice(data);
        let cd_offset = f.len() as u64;
        put_u32(&mut f, CENTRAL_SIG);
        f.extend_from_slice(&[45, 0, 45, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        put_u32(&mut f, crc);
        put_u32(&mut f, u32::MAX);
        put_u32(&mut f, u32::MAX);
        put_u16(&mut f, name.len() as u16);
        put_u16(&mut f, 28);
        f.extend_from_slice(&[0; 10]);
        put_u32(&mut f, u32::MAX);
        f.extend_from_slice(name.as_bytes());
        put_u16(&mut f, 1);
        put_u16(&mut f, 24);
        for v in [data.len() as u64, data.len() as u64, 0] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        let cd_size = f.len() as u64 - cd_offset;
        let zip64_offset = f.len() as u64;
        put_u32(&mut f, ZIP64_EOCD_SIG);
        f.extend_from_slice(&44u64.to_le_bytes());
        f.extend_from_slice(&[45, 0, 45, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        for v in [1, 1, cd_size, cd_offset] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        put_u32(&mut f, ZIP64_LOCATOR_SIG);
        put_u32(&mut f, 0);
        f.extend_from_slice(&zip64_offset.to_le_bytes());
        put_u32(&mut f, 1);
        put_u32(&mut f, EOCD_SIG);
        put_u32(&mut f, 0);
        f.extend_from_slice(&[0xFF; 12]);
        put_u16(&mut f, 0);
        assert_eq!(contents(&f), vec![(name.to_owned(), data.to_vec())]);
    }

    #[test]
    fn compressed_entries_are_rejected() {
        let mut zip = ZipWriter::with_capacity(0, Zip64::AS_TORCH);
        zip.add("a/x", EntryData::Copied(b"hello")).unwrap();
        let mut bytes = zip.finish_bytes();
        let end_records = ZIP64_EOCD_LEN + ZIP64_LOCATOR_LEN + EOCD_LEN;
        let central = bytes.len() - end_records - CENTRAL_HEADER_LEN - 3;
        bytes[central + 10] = 8; // deflate
        let err = ZipDirectory::parse_from_tail(&bytes, bytes.len() as u64).unwrap_err();
        assert!(err.to_string().contains("compressed (method 8)"), "{err}");
    }

    /// Bytes from hex, whitespace ignored.
    fn hex(text: &str) -> Vec<u8> {
        let digits: String = text.split_whitespace().collect();
        (0..digits.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).unwrap())
            .collect()
    }

    /// What torch 2.15's `torch.save({'big': torch.ones(1_100_000_000),
    /// 'small': torch.arange(5.)})` wrote (a 4,400,001,861-byte file, read
    /// back with Python's `struct`): the 4.4 GB storage `big/data/0` at
    /// byte 662, `big/data/1` past 4 GiB, and the end records.
    #[test]
    fn headers_past_4_gib_are_the_bytes_torch_writes() {
        let big = Entry {
            name: "big/data/0".into(),
            crc: 2_094_921_195,
            size: 4_400_000_000,
            header_offset: 662,
        };
        let small = Entry {
            name: "big/data/1".into(),
            crc: 1_758_053_516,
            size: 20,
            header_offset: 4_400_000_792,
        };
        let zip64 = Zip64::AS_TORCH;
        let local = |entry: &Entry| {
            let mut buf = Vec::new();
            entry.local_header(zip64, &mut buf);
            buf
        };
        let padded = |bytes: &str, padding: usize| {
            let mut out = hex(bytes);
            out.resize(out.len() + padding, b'Z');
            out
        };
        let local_start = "504b0304 0000 0808 0000 00000000 00000000 00000000 00000000";
        let expected = format!(
            "{local_start} 0a00 4200 {} 0100 1000 00ac420601000000 0000000000000000 4642 2a00",
            hex_of(b"big/data/0")
        );
        assert_eq!(local(&big), padded(&expected, 42));
        assert_eq!((big.header_offset as usize + local(&big).len()) % 64, 0);
        let expected = format!(
            "{local_start} 0a00 4000 {} 0100 0800 18af420601000000 4642 3000",
            hex_of(b"big/data/1")
        );
        assert_eq!(local(&small), padded(&expected, 48));

        let descriptor = |entry: &Entry| {
            let mut buf = Vec::new();
            entry.descriptor(zip64, &mut buf);
            buf
        };
        let expected = "504b0708 ebf5dd7c 00ac420601000000 00ac420601000000";
        assert_eq!(descriptor(&big), hex(expected));
        let expected = "504b0708 8cc4c968 1400000000000000 1400000000000000";
        assert_eq!(descriptor(&small), hex(expected));

        let central = |entry: &Entry| {
            let mut buf = Vec::new();
            entry.central_header(zip64, &mut buf);
            buf
        };
        let central_start = "504b0102 0000 0000 0808 0000 00000000";
        let expected = format!(
            "{central_start} ebf5dd7c ffffffff ffffffff 0a00 1400 0000 0000 0000 00000000 \
             96020000 {} 0100 1000 00ac420601000000 00ac420601000000",
            hex_of(b"big/data/0")
        );
        assert_eq!(central(&big), hex(&expected));
        let expected = format!(
            "{central_start} 8cc4c968 14000000 14000000 0a00 0c00 0000 0000 0000 00000000 \
             ffffffff {} 0100 0800 18af420601000000",
            hex_of(b"big/data/1")
        );
        assert_eq!(central(&small), hex(&expected));

        let mut end = Vec::new();
        end_records(zip64, 8, 4_400_001_216, 547, &mut end);
        let expected = "504b0606 2c00000000000000 1e03 2d00 00000000 00000000 \
             0800000000000000 0800000000000000 2302000000000000 c0b0420601000000 \
             504b0607 00000000 e3b2420601000000 01000000 \
             504b0506 0000 0000 0800 0800 23020000 ffffffff 0000";
        assert_eq!(end, hex(expected));
    }

    fn hex_of(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Small entries early in the archive keep torch's plain layout: no
    /// zip64 field and a 16-byte descriptor; the end records are zip64
    /// ones with the plain record holding the real values (torch's small
    /// files, `format/tests/fixtures/pt`, end the same way).
    #[test]
    fn small_archives_have_plain_entries_and_zip64_end_records() {
        let entry = Entry {
            name: "a/data/0".into(),
            crc: 7,
            size: 40,
            header_offset: 1_000,
        };
        let (mut local, mut descriptor, mut central) = (Vec::new(), Vec::new(), Vec::new());
        entry.local_header(Zip64::AS_TORCH, &mut local);
        entry.descriptor(Zip64::AS_TORCH, &mut descriptor);
        entry.central_header(Zip64::AS_TORCH, &mut central);
        assert_eq!(&local[30 + 8..30 + 10], PADDING_EXTRA_ID);
        assert_eq!(descriptor.len(), 16);
        assert_eq!(central.len(), CENTRAL_HEADER_LEN + 8);
        let fixture = format!("{}/tests/fixtures/pt/nested.pt", env!("CARGO_MANIFEST_DIR"));
        let torch = std::fs::read(fixture).unwrap();
        let mut zip = ZipWriter::with_capacity(0, Zip64::AS_TORCH);
        zip.add("a/x", EntryData::Copied(b"hello")).unwrap();
        let ours = zip.finish_bytes();
        let end = ZIP64_EOCD_LEN + ZIP64_LOCATOR_LEN + EOCD_LEN;
        let signature = |bytes: &[u8], at: usize| bytes[bytes.len() - at..][..4].to_vec();
        for at in [end, end - ZIP64_EOCD_LEN, EOCD_LEN] {
            assert_eq!(
                signature(&ours, at),
                signature(&torch, at),
                "{at} bytes from the end"
            );
        }
    }

    /// An archive whose zip64 bound is lowered is laid out the way one past
    /// 4 GiB is: entries from the bound on get zip64 fields and 24-byte
    /// descriptors, and read back the same.
    #[test]
    fn archives_with_zip64_entries_read_back() {
        // Every other entry long enough to be a part of its own when moved.
        let entries: Vec<(String, Vec<u8>)> = (0..6)
            .map(|i| {
                (
                    format!("a/data/{i}"),
                    vec![i as u8; 90 * i + OWN_PART_FROM * (i % 2)],
                )
            })
            .collect();
        for from in [0, 1, 100, 300, 1_000, 70_000, 140_000] {
            let mut zip = ZipWriter::with_capacity(0, Zip64 { from });
            // Data copied and moved in alternately: the same archive.
            for (i, (name, data)) in entries.iter().enumerate() {
                let data = if i % 2 == 0 {
                    EntryData::Copied(data)
                } else {
                    EntryData::Moved(data.clone().into())
                };
                zip.add(name, data).unwrap();
            }
            let parts = zip.finish();
            // Headers, entry 1, headers, entry 3, headers, entry 5, the rest.
            assert_eq!(parts.len(), 7);
            assert!(parts.iter().all(|p| !p.is_empty()));
            let bytes: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
            assert_eq!(contents(&bytes), entries, "zip64 from {from}");
            let directory = ZipDirectory::parse_from_tail(&bytes, bytes.len() as u64).unwrap();
            for entry in directory.entries() {
                let data = entry
                    .data_offset(&bytes[entry.header_offset as usize..])
                    .unwrap();
                assert_eq!(data % 64, 0, "{} from {from}", entry.name);
                let wide = entry.size >= from || entry.header_offset >= from;
                let descriptor = &bytes[(data + entry.size) as usize..];
                if entry.size > 0 {
                    assert_eq!(&descriptor[..4], &DESCRIPTOR_SIG.to_le_bytes());
                    let next = if wide { 24 } else { 16 };
                    let after = &descriptor[next..][..4];
                    assert!(
                        after == LOCAL_SIG.to_le_bytes() || after == CENTRAL_SIG.to_le_bytes(),
                        "{} from {from}: descriptor of {next} bytes",
                        entry.name
                    );
                }
            }
        }
    }

    /// Counts from 65,535 on are in the zip64 end record only, as miniz
    /// writes them (torch's reader test: `torch_loads::*_65535_entries`).
    #[test]
    fn more_than_65534_entries_read_back() {
        assert_eq!(Zip64::field16(65_534), 65_534);
        assert_eq!(Zip64::field16(65_535), 0xFFFF);
        assert_eq!(Zip64::field16(1 << 40), 0xFFFF);
        let mut zip = ZipWriter::with_capacity(0, Zip64::AS_TORCH);
        for i in 0..70_000u32 {
            zip.add(&format!("a/{i}"), EntryData::Copied(&i.to_le_bytes()))
                .unwrap();
        }
        let bytes = zip.finish_bytes();
        let directory = ZipDirectory::parse_from_tail(&bytes, bytes.len() as u64).unwrap();
        assert_eq!(directory.entries().len(), 70_000);
        let last = directory.get("a/69999").unwrap();
        assert_eq!(last.data(&bytes).unwrap(), 69_999u32.to_le_bytes());
    }
}
