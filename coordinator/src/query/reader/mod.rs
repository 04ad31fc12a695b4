//! Ranged reads of captured `.pt` artifacts in the artifact store.
//!
//! [`ArtifactReader::open`] costs two GETs: the file's last [`TAIL_BYTES`]
//! as a suffix range, which also tells the file's size (the zip central
//! directory; one more GET only when the directory is larger), and `data.pkl` with its local header (plus the tiny
//! `byteorder` record torch writes right after it). After that each tensor
//! costs only its own bytes: [`ArtifactReader::read_many`] turns the wanted
//! tensors (or row ranges of them) into byte spans, coalesces spans less
//! than [`COALESCE_GAP_BYTES`] apart into one GET and runs up to
//! [`READ_CONCURRENCY`] GETs at once. A storage entry's data offset comes
//! from its local header; the first read of an entry fetches the header
//! together with the data (torch aligns data to 64 bytes after the header,
//! so the two are adjacent), verifies it and caches the offset, so later
//! reads of that entry fetch exactly the tensor bytes. Spans inside the tail
//! already read are served from memory. `data.pkl` and every read of a
//! whole storage are checked against the entry's CRC-32 (a row range
//! cannot be). Every HEAD and GET adds to a [`ByteCounter`] that many
//! readers share, so a query can report what it read in total.
//!
//! Path helpers address the two layouts of `gemma-2-2b-it-format.md`: raw
//! residual files (`{phase}.activations.{layer}.{sublayer}`, see
//! [`ArtifactReader::residual_tensor`]) and layer internals files (any path,
//! numeric parts indexing lists, see [`ArtifactReader::tensor_at`]). The
//! free functions of the same names work on a bare [`PtSkeleton`] and return
//! a [`PathError`]; the reader's methods add the artifact's URL.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use capture_worker::pt::{
    LOCAL_HEADER_LEN, PtDtype, PtError, PtIndex, PtSkeleton, PtTensor, TensorRef, ZipDirectory,
    ZipEntry, crc32,
};
use capture_worker::store::{RunStore, StoreError};
use futures::{StreamExt, TryStreamExt};

pub(crate) mod paths;

pub use paths::{
    ParseNameError, PathError, Phase, Sublayer, internals_residual_tensor, layers, residual_tensor,
    tensor_at, text_fields, value_at,
};

/// A tensor read back: its shape and its row-major values.
pub type TensorValues = (Vec<usize>, Vec<f32>);

/// Bytes read from the end of a file to find its central directory.
pub const TAIL_BYTES: u64 = 128 * 1024;
/// Spans at most this far apart are read with one GET (the gap is read too).
pub const COALESCE_GAP_BYTES: u64 = 64 * 1024;
/// Coalescing stops growing a GET beyond this size, so that large reads
/// still run in parallel (a single larger span is read whole).
pub const MAX_COALESCED_BYTES: u64 = 8 * 1024 * 1024;
/// GETs in flight at once within one [`ArtifactReader::read_many`].
pub const READ_CONCURRENCY: usize = 8;

/// Largest central directory read (a full 65534-entry archive needs ~6 MiB).
const MAX_DIRECTORY_BYTES: u64 = 64 * 1024 * 1024;
/// Largest `data.pkl` read.
const MAX_PICKLE_BYTES: u64 = 256 * 1024 * 1024;
/// The `byteorder` record is read with the pickle when it starts at most
/// this far after the pickle's data.
const NEARBY_RECORD_BYTES: u64 = 4096;
/// Data alignment of torch's zip writer (`.storage_alignment`).
const STORAGE_ALIGNMENT: u64 = 64;
/// Header of the `FB` padding extra field that precedes aligned data.
const PADDING_FIELD_HEADER: u64 = 4;
/// Tensors larger than this in total are converted off the async executor.
const CONVERT_INLINE_BYTES: usize = 256 * 1024;
/// Keys listed in a "has no ..." message before it is cut short.
const LISTED_KEYS: usize = 12;

/// Bytes and requests a set of readers spent; cheap to clone, clones share
/// the counts.
#[derive(Debug, Clone, Default)]
pub struct ByteCounter {
    counts: Arc<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    bytes: AtomicU64,
    requests: AtomicU64,
}

impl ByteCounter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Body bytes of every GET so far.
    pub fn bytes_read(&self) -> u64 {
        self.counts.bytes.load(Ordering::Relaxed)
    }

    /// Store round trips so far (each HEAD and each GET).
    pub fn requests(&self) -> u64 {
        self.counts.requests.load(Ordering::Relaxed)
    }

    fn record(&self, bytes: u64) {
        self.counts.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.counts.requests.fetch_add(1, Ordering::Relaxed);
    }
}

/// What can go wrong reading an artifact; every message names it by URL.
#[derive(Debug, thiserror::Error)]
pub enum ReaderError {
    /// The store failed or the object does not exist.
    #[error("{}", store_message(.url, .source))]
    Store {
        url: String,
        /// Boxed: the store's error is large.
        #[source]
        source: Box<StoreError>,
    },
    /// The bytes are not a `.pt` file this reader understands.
    #[error("corrupt artifact {url}: {reason}")]
    Corrupt { url: String, reason: String },
    /// A record of the file lies past its end.
    #[error(
        "truncated artifact {url}: {what} reaches byte {end} but the file is {file_bytes} bytes long"
    )]
    Truncated {
        url: String,
        what: String,
        end: u64,
        file_bytes: u64,
    },
    /// The value has nothing (or something else) at the path asked for.
    #[error("{url} {source}")]
    Path {
        url: String,
        #[source]
        source: PathError,
    },
    /// A tensor that cannot be read as asked (non-contiguous view, rows out
    /// of range, inconsistent storage).
    #[error("cannot read {what} of {url}: {reason}")]
    Tensor {
        url: String,
        what: String,
        reason: String,
    },
    /// The conversion task panicked or was cancelled.
    #[error("internal task failed while converting tensors of {url}: {source}")]
    Task {
        url: String,
        #[source]
        source: tokio::task::JoinError,
    },
}

impl ReaderError {
    /// Whether the store failed (network, credentials, outage) rather than
    /// the artifact being missing or broken: retrying later may succeed.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, ReaderError::Store { source, .. } if matches!(**source, StoreError::Backend { .. }))
    }

    /// The URL of the artifact the error is about.
    pub fn url(&self) -> &str {
        match self {
            ReaderError::Store { url, .. }
            | ReaderError::Corrupt { url, .. }
            | ReaderError::Truncated { url, .. }
            | ReaderError::Path { url, .. }
            | ReaderError::Tensor { url, .. }
            | ReaderError::Task { url, .. } => url,
        }
    }
}

/// The store's message, which names the object in most cases; the URL in
/// front where it does not (an unsafe key names only the key).
fn store_message(url: &str, source: &StoreError) -> String {
    let message = source.to_string();
    if message.contains(url) {
        message
    } else {
        format!("cannot read {url}: {message}")
    }
}

/// One artifact of a run, opened for ranged reads: its directory and its
/// value with tensors as [`TensorRef`]s. Send and Sync; reads take `&self`.
pub struct ArtifactReader {
    source: Source,
    index: PtIndex,
    /// The file's last bytes, read to find the directory.
    tail: Bytes,
    tail_start: u64,
    /// Verified file offsets of storage entries' data, by entry name.
    data_offsets: Mutex<HashMap<String, u64>>,
}

impl fmt::Debug for ArtifactReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ArtifactReader")
            .field("url", &self.source.url)
            .field("file_bytes", &self.source.file_bytes)
            .field("entries", &self.index.directory().entries().len())
            .finish_non_exhaustive()
    }
}

/// Where the bytes come from and what reading them costs.
struct Source {
    store: RunStore,
    key: String,
    url: String,
    file_bytes: u64,
    counter: ByteCounter,
}

impl Source {
    /// One ranged GET, counted.
    async fn get(&self, range: Range<u64>) -> Result<Bytes, ReaderError> {
        let bytes = self
            .store
            .get_range(&self.key, range)
            .await
            .map_err(|source| self.store_error(source))?;
        self.counter.record(bytes.len() as u64);
        Ok(bytes)
    }

    fn store_error(&self, source: StoreError) -> ReaderError {
        ReaderError::Store {
            url: self.url.clone(),
            source: Box::new(source),
        }
    }

    fn corrupt(&self, reason: impl fmt::Display) -> ReaderError {
        ReaderError::Corrupt {
            url: self.url.clone(),
            reason: reason.to_string(),
        }
    }

    fn truncated(&self, what: String, end: u64) -> ReaderError {
        ReaderError::Truncated {
            url: self.url.clone(),
            what,
            end,
            file_bytes: self.file_bytes,
        }
    }

    /// Parses the central directory from the file's `tail` (its last
    /// bytes), reading further back as long as the directory asks for more.
    async fn read_directory(
        &self,
        mut tail: Bytes,
    ) -> Result<(ZipDirectory, Bytes, u64), ReaderError> {
        let len = self.file_bytes;
        if len == 0 {
            return Err(self.corrupt("not a zip file: the object is empty"));
        }
        let mut tail_start = len - tail.len() as u64;
        loop {
            match ZipDirectory::parse_from_tail(&tail, len) {
                Ok(directory) => return Ok((directory, tail, tail_start)),
                Err(PtError::TailTooShort { needed }) => {
                    if needed > MAX_DIRECTORY_BYTES {
                        return Err(self.corrupt(format!(
                            "the central directory needs the last {needed} bytes; at most \
                             {MAX_DIRECTORY_BYTES} are read"
                        )));
                    }
                    let start = len
                        .checked_sub(needed)
                        .filter(|&start| start < tail_start)
                        .ok_or_else(|| {
                            self.corrupt(format!(
                                "inconsistent end records: the central directory needs the \
                                 last {needed} bytes"
                            ))
                        })?;
                    let head = self.get(start..tail_start).await?;
                    let mut joined = Vec::with_capacity(head.len() + tail.len());
                    joined.extend_from_slice(&head);
                    joined.extend_from_slice(&tail);
                    (tail, tail_start) = (Bytes::from(joined), start);
                }
                Err(err) => return Err(self.corrupt(err)),
            }
        }
    }

    /// File offset of `entry`'s data from its local header (`header` starts
    /// at the header and holds at least the fixed part and the name),
    /// checked against the directory and the file size.
    fn check_local_header(&self, entry: &ZipEntry, header: &[u8]) -> Result<u64, ReaderError> {
        let data_offset = entry.data_offset(header).map_err(|err| self.corrupt(err))?;
        let name_end = LOCAL_HEADER_LEN + entry.name.len();
        // The local header's name length field.
        let local_name_len = header
            .get(26..28)
            .map(|b| usize::from(u16::from_le_bytes([b[0], b[1]])));
        if local_name_len != Some(entry.name.len())
            || header.get(LOCAL_HEADER_LEN..name_end) != Some(entry.name.as_bytes())
        {
            return Err(self.corrupt(format!(
                "local header of entry {} names another entry",
                entry.name
            )));
        }
        let end = data_offset
            .checked_add(entry.size)
            .ok_or_else(|| self.corrupt(format!("entry {} out of range", entry.name)))?;
        if end > self.file_bytes {
            return Err(self.truncated(format!("entry {}", entry.name), end));
        }
        Ok(data_offset)
    }

    /// The whole data of a small record, CRC-checked, taken from `buffer`
    /// (file bytes from `buffer_start`) as far as it reaches and read for
    /// the rest.
    async fn entry_data(
        &self,
        entry: &ZipEntry,
        buffer: &[u8],
        buffer_start: u64,
    ) -> Result<Vec<u8>, ReaderError> {
        let header = header_span(entry);
        if header.end > self.file_bytes {
            return Err(self.truncated(format!("local header of entry {}", entry.name), header.end));
        }
        let fetched;
        let (buffer, buffer_start) = if span_in(buffer_start, buffer, &header).is_some() {
            (buffer, buffer_start)
        } else {
            let end = (predicted_data_offset(entry) + entry.size).min(self.file_bytes);
            fetched = self.get(header.start..end).await?;
            (&fetched[..], header.start)
        };
        let local = &buffer[(header.start - buffer_start) as usize..];
        let data_offset = self.check_local_header(entry, local)?;
        let data_end = data_offset + entry.size;
        let buffer_end = buffer_start + buffer.len() as u64;
        let mut data = Vec::with_capacity(entry.size as usize);
        if data_offset < buffer_end {
            let within = (data_offset - buffer_start) as usize
                ..(data_end.min(buffer_end) - buffer_start) as usize;
            data.extend_from_slice(&buffer[within]);
        }
        if data_end > buffer_end {
            let rest = self.get(data_offset.max(buffer_end)..data_end).await?;
            data.extend_from_slice(&rest);
        }
        if crc32(&data) != entry.crc32 {
            return Err(self.corrupt(format!("entry {}: crc32 mismatch", entry.name)));
        }
        Ok(data)
    }
}

impl ArtifactReader {
    /// Opens the artifact at `key` of the run: HEAD for its size, the
    /// central directory from its tail and `data.pkl` from its local
    /// header, all counted in `counter`.
    pub async fn open(
        store: &RunStore,
        key: &str,
        counter: &ByteCounter,
    ) -> Result<Self, ReaderError> {
        Self::open_expecting(store, key, counter, None).await
    }

    /// As [`ArtifactReader::open`], checking first that the object has the
    /// size the run recorded for it (a shorter object is reported as
    /// truncated, a different one as corrupt).
    pub async fn open_expecting(
        store: &RunStore,
        key: &str,
        counter: &ByteCounter,
        recorded_bytes: Option<u64>,
    ) -> Result<Self, ReaderError> {
        let url = store.url_of(key);
        // One suffix GET gives both the tail and the object's size.
        let (tail, file_bytes) =
            store
                .get_tail(key, TAIL_BYTES)
                .await
                .map_err(|source| ReaderError::Store {
                    url: url.clone(),
                    source: Box::new(source),
                })?;
        counter.record(tail.len() as u64);
        match recorded_bytes {
            Some(recorded) if file_bytes < recorded => {
                return Err(ReaderError::Truncated {
                    url,
                    what: format!("the recorded artifact ({recorded} bytes)"),
                    end: recorded,
                    file_bytes,
                });
            }
            Some(recorded) if file_bytes != recorded => {
                return Err(ReaderError::Corrupt {
                    url,
                    reason: format!(
                        "the object is {file_bytes} bytes long but the run recorded {recorded}"
                    ),
                });
            }
            _ => {}
        }
        let source = Source {
            store: store.clone(),
            key: key.to_owned(),
            url,
            file_bytes,
            counter: counter.clone(),
        };
        let (directory, tail, tail_start) = source.read_directory(tail).await?;

        let pickle_entry = PtIndex::pickle_entry(&directory)
            .map_err(|err| source.corrupt(err))?
            .clone();
        if pickle_entry.size > MAX_PICKLE_BYTES {
            return Err(source.corrupt(format!(
                "data.pkl is {} bytes long; at most {MAX_PICKLE_BYTES} are read",
                pickle_entry.size
            )));
        }
        let prefix = pickle_entry
            .name
            .strip_suffix("/data.pkl")
            .unwrap_or_default();
        let byteorder = directory.get(&format!("{prefix}/byteorder")).cloned();
        let start = pickle_entry.header_offset;
        let mut end = predicted_data_offset(&pickle_entry) + pickle_entry.size;
        if let Some(order) = &byteorder
            && order.header_offset >= start
            && order.header_offset <= end + NEARBY_RECORD_BYTES
        {
            end = end.max(predicted_data_offset(order) + order.size);
        }
        let end = end.min(source.file_bytes).max(start);
        let buffer = match span_in(tail_start, &tail, &(start..end)) {
            Some(within) => tail.slice(within),
            None if start == end => Bytes::new(),
            None => source.get(start..end).await?,
        };
        let pickle = source.entry_data(&pickle_entry, &buffer, start).await?;
        if let Some(order) = &byteorder {
            let value = source.entry_data(order, &buffer, start).await?;
            if value != b"little" {
                return Err(source.corrupt(format!(
                    "byte order {:?} is not supported; storages must be little-endian",
                    String::from_utf8_lossy(&value)
                )));
            }
        }
        let index = PtIndex::new(directory, &pickle).map_err(|err| source.corrupt(err))?;
        Ok(Self {
            source,
            index,
            tail,
            tail_start,
            data_offsets: Mutex::new(HashMap::new()),
        })
    }

    /// The object's size in bytes.
    pub fn file_bytes(&self) -> u64 {
        self.source.file_bytes
    }

    /// The key relative to the run root.
    pub fn key(&self) -> &str {
        &self.source.key
    }

    /// The artifact's URL, as error messages name it.
    pub fn url(&self) -> &str {
        &self.source.url
    }

    /// The counter this reader adds to.
    pub fn counter(&self) -> &ByteCounter {
        &self.source.counter
    }

    /// The unpickled value, tensors as references into the archive.
    pub fn skeleton(&self) -> &PtSkeleton {
        self.index.root()
    }

    /// The archive's directory and value.
    pub fn index(&self) -> &PtIndex {
        &self.index
    }

    /// Reads one tensor, or the rows `rows` of its first dimension, as
    /// `(shape, row-major values)` with one GET of its bytes (and of the
    /// storage entry's local header the first time that entry is read).
    pub async fn read_f32(
        &self,
        tensor: &TensorRef,
        rows: Option<Range<usize>>,
    ) -> Result<TensorValues, ReaderError> {
        let mut read = self.read_many(&[(tensor.clone(), rows)]).await?;
        read.pop()
            .ok_or_else(|| self.source.corrupt("no tensor was read"))
    }

    /// Reads several tensors (or row ranges of them) like
    /// [`ArtifactReader::read_f32`], in the order asked, coalescing nearby
    /// byte spans into fewer GETs. Tensors of any stored dtype (f32, f16,
    /// bf16; int64 cast) come back as f32.
    pub async fn read_many(
        &self,
        wanted: &[(TensorRef, Option<Range<usize>>)],
    ) -> Result<Vec<TensorValues>, ReaderError> {
        let plans = wanted
            .iter()
            .map(|(tensor, rows)| self.plan(tensor, rows.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        let mut raw: Vec<Bytes> = vec![Bytes::new(); plans.len()];
        let mut pending: Vec<usize> = (0..plans.len())
            .filter(|&i| !plans[i].bytes.is_empty())
            .collect();
        // A second round only for entries whose data was not where the
        // alignment rule put it; their offsets are known by then.
        for _round in 0..2 {
            if pending.is_empty() {
                break;
            }
            pending = self.fetch_round(&plans, &pending, &mut raw).await?;
        }
        if let Some(&i) = pending.first() {
            return Err(self.source.corrupt(format!(
                "cannot locate the data of entry {}",
                plans[i].entry.name
            )));
        }
        self.convert(plans, raw).await
    }

    /// Fetches the spans of the `pending` plans into `raw`; returns those
    /// whose data turned out to be elsewhere than assumed.
    async fn fetch_round(
        &self,
        plans: &[Plan<'_>],
        pending: &[usize],
        raw: &mut [Bytes],
    ) -> Result<Vec<usize>, ReaderError> {
        let known: HashMap<String, u64> = self.known_offsets(plans, pending);
        let mut spans = Vec::with_capacity(pending.len() * 2);
        let mut assumed = Vec::with_capacity(pending.len());
        for &i in pending {
            let plan = &plans[i];
            let offset = match known.get(&plan.entry.name) {
                Some(&offset) => Some(offset),
                None => {
                    spans.push(header_span(plan.entry));
                    let predicted = predicted_data_offset(plan.entry);
                    // Read no data past the end on a guess; the header says.
                    (predicted + plan.bytes.end <= self.source.file_bytes).then_some(predicted)
                }
            };
            if let Some(offset) = offset {
                spans.push(offset + plan.bytes.start..offset + plan.bytes.end);
            }
            assumed.push(offset);
        }
        let chunks = self.fetch_spans(spans).await?;
        let mut retry = Vec::new();
        for (&i, assumed) in pending.iter().zip(assumed) {
            let plan = &plans[i];
            let actual = match known.get(&plan.entry.name) {
                Some(&offset) => offset,
                None => self.resolve_data_offset(plan.entry, &chunks)?,
            };
            if assumed != Some(actual) {
                retry.push(i);
                continue;
            }
            let span = actual + plan.bytes.start..actual + plan.bytes.end;
            raw[i] = chunks
                .slice(&span)
                .ok_or_else(|| self.source.corrupt(format!("bytes {span:?} were not read")))?;
        }
        Ok(retry)
    }

    /// The cached data offsets of the pending plans' entries.
    fn known_offsets(&self, plans: &[Plan<'_>], pending: &[usize]) -> HashMap<String, u64> {
        let cache = self.data_offsets.lock().unwrap_or_else(|p| p.into_inner());
        pending
            .iter()
            .filter_map(|&i| {
                let name = &plans[i].entry.name;
                cache.get(name).map(|&offset| (name.clone(), offset))
            })
            .collect()
    }

    /// Reads `entry`'s local header from `chunks` and caches its data offset.
    fn resolve_data_offset(&self, entry: &ZipEntry, chunks: &Chunks) -> Result<u64, ReaderError> {
        if let Some(&offset) = self
            .data_offsets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&entry.name)
        {
            return Ok(offset);
        }
        let span = header_span(entry);
        let header = chunks.slice(&span).ok_or_else(|| {
            self.source
                .corrupt(format!("local header of entry {} was not read", entry.name))
        })?;
        let offset = self.source.check_local_header(entry, &header)?;
        self.data_offsets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(entry.name.clone(), offset);
        Ok(offset)
    }

    /// Reads `spans` (in memory when inside the tail), coalesced.
    async fn fetch_spans(&self, spans: Vec<Range<u64>>) -> Result<Chunks, ReaderError> {
        // Spans inside the tail are served from memory; a span that runs
        // into the tail is fetched only up to where the tail starts.
        let needed: Vec<Range<u64>> = spans
            .into_iter()
            .filter(|span| !span.is_empty() && span_in(self.tail_start, &self.tail, span).is_none())
            .map(|span| {
                if span.start < self.tail_start {
                    span.start..span.end.min(self.tail_start)
                } else {
                    span
                }
            })
            .collect();
        let merged = coalesce(needed, COALESCE_GAP_BYTES, MAX_COALESCED_BYTES);
        let fetched: Vec<(u64, Bytes)> = futures::stream::iter(merged)
            .map(|span| async move {
                let bytes = self.source.get(span.clone()).await?;
                Ok::<_, ReaderError>((span.start, bytes))
            })
            .buffered(READ_CONCURRENCY)
            .try_collect()
            .await?;
        Ok(Chunks {
            tail: self.tail.clone(),
            tail_start: self.tail_start,
            fetched,
        })
    }

    /// Where `tensor` (or its `rows`) is and what it reads back as.
    fn plan<'a>(
        &'a self,
        tensor: &TensorRef,
        rows: Option<Range<usize>>,
    ) -> Result<Plan<'a>, ReaderError> {
        let fail = |reason: String| ReaderError::Tensor {
            url: self.source.url.clone(),
            what: format!(
                "{:?} tensor of shape {:?} in storage {}",
                tensor.dtype(),
                tensor.shape(),
                tensor.storage_key()
            ),
            reason,
        };
        let span = self
            .index
            .locate(tensor)
            .map_err(|err| fail(err.to_string()))?;
        let entry = self
            .index
            .directory()
            .get(&span.entry)
            .ok_or_else(|| fail(format!("entry {} missing", span.entry)))?;
        let mut shape = tensor.shape().to_vec();
        let mut bytes = span.offset..span.offset + span.len;
        if let Some(rows) = rows {
            let Some(&first) = shape.first() else {
                return Err(fail(format!("a 0-dim tensor has no rows {rows:?}")));
            };
            if rows.start > rows.end || rows.end > first {
                return Err(fail(format!(
                    "rows {rows:?} out of range: the tensor has {first} rows"
                )));
            }
            let row_bytes = if first == 0 {
                0
            } else {
                span.len / first as u64
            };
            bytes = span.offset + rows.start as u64 * row_bytes
                ..span.offset + rows.end as u64 * row_bytes;
            shape[0] = rows.len();
        }
        // A read of a whole storage is checked against the entry's CRC.
        let crc32 = (bytes == (0..entry.size) && !bytes.is_empty()).then_some(entry.crc32);
        Ok(Plan {
            entry,
            bytes,
            crc32,
            dtype: tensor.dtype(),
            shape,
        })
    }

    /// Turns the raw bytes into f32 values, off the executor when large.
    async fn convert(
        &self,
        plans: Vec<Plan<'_>>,
        raw: Vec<Bytes>,
    ) -> Result<Vec<TensorValues>, ReaderError> {
        let total: usize = raw.iter().map(Bytes::len).sum();
        let tensors: Vec<RawTensor> = plans
            .into_iter()
            .zip(raw)
            .map(|(plan, bytes)| RawTensor {
                entry: plan.entry.name.clone(),
                crc32: plan.crc32,
                dtype: plan.dtype,
                shape: plan.shape,
                bytes,
            })
            .collect();
        let converted = if total <= CONVERT_INLINE_BYTES {
            convert_all(tensors)
        } else {
            tokio::task::spawn_blocking(move || convert_all(tensors))
                .await
                .map_err(|source| ReaderError::Task {
                    url: self.source.url.clone(),
                    source,
                })?
        };
        converted.map_err(|err| self.source.corrupt(err))
    }

    fn path_error(&self, source: PathError) -> ReaderError {
        ReaderError::Path {
            url: self.source.url.clone(),
            source,
        }
    }

    /// [`residual_tensor`] of this artifact.
    pub fn residual_tensor(
        &self,
        phase: Phase,
        layer: usize,
        sublayer: Sublayer,
    ) -> Result<&TensorRef, ReaderError> {
        residual_tensor(self.skeleton(), phase, layer, sublayer).map_err(|e| self.path_error(e))
    }

    /// [`internals_residual_tensor`] of this artifact.
    pub fn internals_residual_tensor(
        &self,
        phase: Phase,
        sublayer: Sublayer,
    ) -> Result<&TensorRef, ReaderError> {
        internals_residual_tensor(self.skeleton(), phase, sublayer).map_err(|e| self.path_error(e))
    }

    /// [`tensor_at`] of this artifact.
    pub fn tensor_at(&self, path: &[&str]) -> Result<&TensorRef, ReaderError> {
        tensor_at(self.skeleton(), path).map_err(|e| self.path_error(e))
    }

    /// [`value_at`] of this artifact.
    pub fn value_at(&self, path: &[&str]) -> Result<&PtSkeleton, ReaderError> {
        value_at(self.skeleton(), path).map_err(|e| self.path_error(e))
    }

    /// [`text_fields`] of this artifact.
    pub fn text_fields(
        &self,
        phase: Phase,
    ) -> Result<(String, Vec<String>, Vec<i64>), ReaderError> {
        text_fields(self.skeleton(), phase).map_err(|e| self.path_error(e))
    }

    /// [`layers`] of this artifact.
    pub fn layers(&self) -> Result<Vec<usize>, ReaderError> {
        layers(self.skeleton()).map_err(|e| self.path_error(e))
    }
}

/// One tensor to read: `bytes` of `entry`'s data.
struct Plan<'a> {
    entry: &'a ZipEntry,
    bytes: Range<u64>,
    /// The entry's checksum, when `bytes` are all of its data.
    crc32: Option<u32>,
    dtype: PtDtype,
    shape: Vec<usize>,
}

/// A tensor's bytes on their way to f32 values.
struct RawTensor {
    entry: String,
    crc32: Option<u32>,
    dtype: PtDtype,
    shape: Vec<usize>,
    bytes: Bytes,
}

/// Bytes read for one round: the tail and the fetched spans (sorted, disjoint).
struct Chunks {
    tail: Bytes,
    tail_start: u64,
    fetched: Vec<(u64, Bytes)>,
}

impl Chunks {
    /// File bytes `span`, if they were read.
    fn slice(&self, span: &Range<u64>) -> Option<Bytes> {
        if let Some(within) = span_in(self.tail_start, &self.tail, span) {
            return Some(self.tail.slice(within));
        }
        if span.start < self.tail_start && span.end > self.tail_start {
            // Fetched up to the tail, the rest from the tail.
            let head = self.fetched_slice(&(span.start..self.tail_start))?;
            let rest = span_in(self.tail_start, &self.tail, &(self.tail_start..span.end))?;
            let mut joined = Vec::with_capacity((span.end - span.start) as usize);
            joined.extend_from_slice(&head);
            joined.extend_from_slice(&self.tail[rest]);
            return Some(Bytes::from(joined));
        }
        self.fetched_slice(span)
    }

    fn fetched_slice(&self, span: &Range<u64>) -> Option<Bytes> {
        let after = self
            .fetched
            .partition_point(|(start, _)| *start <= span.start);
        let (start, bytes) = self.fetched.get(after.checked_sub(1)?)?;
        span_in(*start, bytes, span).map(|within| bytes.slice(within))
    }
}

/// The positions of file bytes `span` in `buffer` (file bytes from
/// `buffer_start`), if it holds all of them.
fn span_in(buffer_start: u64, buffer: &[u8], span: &Range<u64>) -> Option<Range<usize>> {
    let start = span.start.checked_sub(buffer_start)?;
    let end = span.end.checked_sub(buffer_start)?;
    (start <= end && end <= buffer.len() as u64).then_some(start as usize..end as usize)
}

/// The fixed part and name of `entry`'s local header: what locating and
/// verifying its data needs.
fn header_span(entry: &ZipEntry) -> Range<u64> {
    entry.header_offset..entry.header_offset + (LOCAL_HEADER_LEN + entry.name.len()) as u64
}

/// Where torch's writer puts `entry`'s data: after the header, the name and
/// a padding field, at the next multiple of 64 bytes. Only a guess until the
/// local header confirms it.
fn predicted_data_offset(entry: &ZipEntry) -> u64 {
    (header_span(entry).end + PADDING_FIELD_HEADER).next_multiple_of(STORAGE_ALIGNMENT)
}

/// Merges spans at most `max_gap` apart while the merged span stays within
/// `max_len`; overlapping spans always merge. The result is sorted and
/// disjoint, and each input span lies inside one output span.
fn coalesce(mut spans: Vec<Range<u64>>, max_gap: u64, max_len: u64) -> Vec<Range<u64>> {
    spans.sort_by_key(|span| (span.start, span.end));
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(spans.len());
    for span in spans {
        if let Some(last) = merged.last_mut() {
            let overlaps = span.start < last.end;
            let near = span.start <= last.end.saturating_add(max_gap)
                && span.end.max(last.end) - last.start <= max_len;
            if overlaps || near {
                last.end = last.end.max(span.end);
                continue;
            }
        }
        merged.push(span);
    }
    merged
}

/// Checks and converts tensors; the error is the reason they are corrupt.
fn convert_all(tensors: Vec<RawTensor>) -> Result<Vec<TensorValues>, String> {
    tensors
        .into_iter()
        .map(|raw| {
            if raw
                .crc32
                .is_some_and(|expected| crc32(&raw.bytes) != expected)
            {
                return Err(format!("entry {}: crc32 mismatch", raw.entry));
            }
            let tensor = PtTensor {
                dtype: raw.dtype,
                shape: raw.shape,
                data: raw.bytes.to_vec().into(),
            };
            let values = tensor.to_f32_vec().map_err(|err| err.to_string())?;
            Ok((tensor.shape, values))
        })
        .collect()
}

#[cfg(test)]
mod tests;
