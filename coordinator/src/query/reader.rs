//! Ranged reads of captured `.pt` artifacts in the artifact store.
//!
//! [`ArtifactReader::open`] costs one HEAD and two GETs: the file's last
//! [`TAIL_BYTES`] (the zip central directory; more only when the directory
//! is larger) and `data.pkl` with its local header (plus the tiny
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
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use capture_worker::pt::{
    LOCAL_HEADER_LEN, PtDtype, PtError, PtIndex, PtSkeleton, PtTensor, PtTree, TensorRef,
    ZipDirectory, ZipEntry, crc32,
};
use capture_worker::store::{RunStore, StoreError};
use futures::{StreamExt, TryStreamExt};

/// A tensor read back: its shape and its row-major values.
pub type TensorValues = (Vec<usize>, Vec<f32>);

/// Bytes read from the end of a file to find its central directory.
pub const TAIL_BYTES: u64 = 64 * 1024;
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

/// The two halves of a capture: the prompt pass and the generated response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    Prompt,
    Response,
}

impl Phase {
    pub const ALL: [Phase; 2] = [Phase::Prompt, Phase::Response];

    /// The artifact's top-level key.
    pub fn as_str(&self) -> &'static str {
        match self {
            Phase::Prompt => "prompt",
            Phase::Response => "response",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Phase {
    type Err = ParseNameError;

    fn from_str(s: &str) -> Result<Self, ParseNameError> {
        Phase::ALL
            .into_iter()
            .find(|phase| phase.as_str() == s)
            .ok_or_else(|| ParseNameError {
                kind: "phase",
                value: s.to_owned(),
                expected: "prompt or response",
            })
    }
}

/// Where in a layer a residual stream tensor was taken.
pub use super::analysis::Sublayer;

impl Sublayer {
    /// The key in a layer internals file (`residual.{key}`).
    pub fn internals_key(&self) -> &'static str {
        match self {
            Sublayer::ResidualIn => "input",
            Sublayer::AfterAttn => "after_attn",
            Sublayer::ResidualOut => "output",
        }
    }
}

impl fmt::Display for Sublayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Sublayer {
    type Err = ParseNameError;

    fn from_str(s: &str) -> Result<Self, ParseNameError> {
        Sublayer::from_name(s).ok_or_else(|| ParseNameError {
            kind: "sublayer",
            value: s.to_owned(),
            expected: "residual_in, after_attn or residual_out",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {value:?}: use {expected}")]
pub struct ParseNameError {
    kind: &'static str,
    value: String,
    expected: &'static str,
}

/// A path that does not lead to what was asked for in an artifact's value.
/// Messages read as the predicate of a sentence about the artifact:
/// [`ReaderError::Path`] puts its URL in front.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Nothing at `path`; `present` says what there is instead.
    #[error("has no {path}; {present}")]
    Missing { path: String, present: String },
    /// Something of the wrong type at `path`.
    #[error("has {path} as a {found}, not a {expected}")]
    WrongType {
        path: String,
        expected: &'static str,
        found: &'static str,
    },
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

    /// Reads the tail and parses the central directory, reading further
    /// back as long as the directory asks for more.
    async fn read_directory(&self) -> Result<(ZipDirectory, Bytes, u64), ReaderError> {
        let len = self.file_bytes;
        if len == 0 {
            return Err(self.corrupt("not a zip file: the object is empty"));
        }
        let mut tail_start = len - len.min(TAIL_BYTES);
        let mut tail = self.get(tail_start..len).await?;
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
        let url = store.url_of(key);
        let info = store.head(key).await.map_err(|source| ReaderError::Store {
            url: url.clone(),
            source: Box::new(source),
        })?;
        counter.record(0);
        let source = Source {
            store: store.clone(),
            key: key.to_owned(),
            url,
            file_bytes: info.bytes,
            counter: counter.clone(),
        };
        let (directory, tail, tail_start) = source.read_directory().await?;

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
        let needed: Vec<Range<u64>> = spans
            .into_iter()
            .filter(|span| !span.is_empty() && span_in(self.tail_start, &self.tail, span).is_none())
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
                data: raw.bytes.to_vec(),
            };
            let values = tensor.to_f32_vec().map_err(|err| err.to_string())?;
            Ok((tensor.shape, values))
        })
        .collect()
}

/// The residual stream tensor `{phase}.activations.{layer}.{sublayer}` of a
/// raw residual artifact (`[tokens, hidden]`).
pub fn residual_tensor(
    skeleton: &PtSkeleton,
    phase: Phase,
    layer: usize,
    sublayer: Sublayer,
) -> Result<&TensorRef, PathError> {
    let layer_key = layer.to_string();
    let path = [phase.as_str(), "activations", &layer_key, sublayer.as_str()];
    let activations = value_at(skeleton, &path[..2])?;
    if activations.get(&layer_key).is_none() && activations.as_dict().is_some() {
        let present = layers_of(activations);
        return Err(PathError::Missing {
            path: path.join("."),
            present: format!("layers present: {}", describe_layers(&present)),
        });
    }
    tensor_at(skeleton, &path)
}

/// The residual stream tensor `{phase}.residual.{input|after_attn|output}`
/// of a layer internals artifact (`[tokens, hidden]` for the prompt,
/// `[tokens, 1, hidden]` for the response).
pub fn internals_residual_tensor(
    skeleton: &PtSkeleton,
    phase: Phase,
    sublayer: Sublayer,
) -> Result<&TensorRef, PathError> {
    tensor_at(
        skeleton,
        &[phase.as_str(), "residual", sublayer.internals_key()],
    )
}

/// The tensor at `path`: dict keys, and list indices for lists (negative
/// ones count from the end, as in Python).
pub fn tensor_at<'a>(skeleton: &'a PtSkeleton, path: &[&str]) -> Result<&'a TensorRef, PathError> {
    let value = value_at(skeleton, path)?;
    value.as_tensor().ok_or_else(|| PathError::WrongType {
        path: path.join("."),
        expected: "tensor",
        found: value.type_name(),
    })
}

/// The value at `path`, as [`tensor_at`] walks it.
pub fn value_at<'a>(skeleton: &'a PtSkeleton, path: &[&str]) -> Result<&'a PtSkeleton, PathError> {
    let mut node = skeleton;
    for (depth, part) in path.iter().enumerate() {
        let here = || path[..=depth].join(".");
        let parent = || {
            if depth == 0 {
                "the top-level value".to_owned()
            } else {
                path[..depth].join(".")
            }
        };
        node = match node {
            PtTree::Dict(entries) => match entries.iter().find(|(key, _)| key == part) {
                Some((_, value)) => value,
                None => {
                    return Err(PathError::Missing {
                        path: here(),
                        present: describe_keys(entries),
                    });
                }
            },
            PtTree::List(items) | PtTree::Tuple(items) => {
                let index = part.parse::<i64>().ok().and_then(|i| {
                    let len = i64::try_from(items.len()).ok()?;
                    let i = if i < 0 { i + len } else { i };
                    usize::try_from(i).ok().filter(|&i| i < items.len())
                });
                match index {
                    Some(i) => &items[i],
                    None => {
                        return Err(PathError::Missing {
                            path: here(),
                            present: format!(
                                "{} is a {} of {} items",
                                parent(),
                                node.type_name(),
                                items.len()
                            ),
                        });
                    }
                }
            }
            other => {
                return Err(PathError::WrongType {
                    path: parent(),
                    expected: "dict or list",
                    found: other.type_name(),
                });
            }
        };
    }
    Ok(node)
}

/// The `text`, `tokens` and `token_ids` of one phase.
pub fn text_fields(
    skeleton: &PtSkeleton,
    phase: Phase,
) -> Result<(String, Vec<String>, Vec<i64>), PathError> {
    let section = phase.as_str();
    let text = value_at(skeleton, &[section, "text"])?;
    let text = text.as_str().ok_or_else(|| PathError::WrongType {
        path: format!("{section}.text"),
        expected: "str",
        found: text.type_name(),
    })?;
    let items = |key: &str| -> Result<&[PtSkeleton], PathError> {
        let value = value_at(skeleton, &[section, key])?;
        value.as_list().ok_or_else(|| PathError::WrongType {
            path: format!("{section}.{key}"),
            expected: "list",
            found: value.type_name(),
        })
    };
    let item_error = |key: &str, i: usize, expected, item: &PtSkeleton| PathError::WrongType {
        path: format!("{section}.{key}.{i}"),
        expected,
        found: item.type_name(),
    };
    let tokens = items("tokens")?
        .iter()
        .enumerate()
        .map(|(i, item)| {
            item.as_str()
                .map(str::to_owned)
                .ok_or_else(|| item_error("tokens", i, "str", item))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let token_ids = items("token_ids")?
        .iter()
        .enumerate()
        .map(|(i, item)| {
            item.as_int()
                .ok_or_else(|| item_error("token_ids", i, "int", item))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((text.to_owned(), tokens, token_ids))
}

/// The layer numbers of a raw residual artifact (the numeric keys of
/// `prompt.activations`, or of `response.activations` without a prompt),
/// ascending.
pub fn layers(skeleton: &PtSkeleton) -> Result<Vec<usize>, PathError> {
    let activations = value_at(skeleton, &["prompt", "activations"])
        .or_else(|err| value_at(skeleton, &["response", "activations"]).map_err(|_| err))?;
    if activations.as_dict().is_none() {
        return Err(PathError::WrongType {
            path: "prompt.activations".to_owned(),
            expected: "dict",
            found: activations.type_name(),
        });
    }
    Ok(layers_of(activations))
}

/// The numeric keys of a dict, ascending.
fn layers_of(activations: &PtSkeleton) -> Vec<usize> {
    let mut layers: Vec<usize> = activations
        .as_dict()
        .unwrap_or_default()
        .iter()
        .filter_map(|(key, _)| key.parse().ok())
        .collect();
    layers.sort_unstable();
    layers.dedup();
    layers
}

/// `0-3, 5, 7-9`; `none` for no layers.
fn describe_layers(layers: &[usize]) -> String {
    let mut runs: Vec<String> = Vec::new();
    let mut i = 0;
    while i < layers.len() {
        let start = layers[i];
        while i + 1 < layers.len() && layers[i + 1] == layers[i] + 1 {
            i += 1;
        }
        runs.push(if layers[i] == start {
            start.to_string()
        } else {
            format!("{start}-{}", layers[i])
        });
        i += 1;
    }
    if runs.is_empty() {
        "none".to_owned()
    } else {
        runs.join(", ")
    }
}

fn describe_keys(entries: &[(String, PtSkeleton)]) -> String {
    if entries.is_empty() {
        return "the dict is empty".to_owned();
    }
    let mut listed: Vec<&str> = entries
        .iter()
        .take(LISTED_KEYS)
        .map(|(key, _)| key.as_str())
        .collect();
    if entries.len() > LISTED_KEYS {
        listed.push("...");
    }
    format!("keys present: {}", listed.join(", "))
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    use capture_worker::pt::{PtValue, StoreDtype, decode_pt, encode_pt};
    use capture_worker::store::{ArtifactStore, StoreOptions};

    use super::*;

    const KEY: &str = "inference/raw/residual/dynamic/1.pt";
    const PROMPT_LEN: usize = 6;
    const RESPONSE_LEN: usize = 4;

    fn values(numel: usize, seed: f32) -> Vec<f32> {
        (0..numel)
            .map(|i| ((i as f32) * 0.37 + seed).sin() * 10.0)
            .collect()
    }

    fn tensor(shape: &[usize], seed: f32, store: StoreDtype) -> PtValue {
        let numel = shape.iter().product();
        PtValue::Tensor(PtTensor::from_f32(
            shape.to_vec(),
            &values(numel, seed),
            store,
        ))
    }

    fn dict(entries: Vec<(String, PtValue)>) -> PtValue {
        PtValue::Dict(entries)
    }

    fn texts(phase: Phase, tokens: usize) -> Vec<(String, PtValue)> {
        let words: Vec<String> = (0..tokens).map(|i| format!("{phase}{i}")).collect();
        vec![
            ("text".into(), PtValue::Str(words.concat())),
            (
                "tokens".into(),
                PtValue::List(words.into_iter().map(PtValue::Str).collect()),
            ),
            (
                "token_ids".into(),
                PtValue::List((0..tokens as i64).map(|i| PtValue::Int(1000 + i)).collect()),
            ),
        ]
    }

    /// A raw residual artifact as the worker lays it out, `width` wide.
    fn residual_value(store: StoreDtype, layers: usize, width: usize) -> PtValue {
        let section = |phase: Phase| {
            let rows = match phase {
                Phase::Prompt => PROMPT_LEN,
                Phase::Response => RESPONSE_LEN,
            };
            let seed = |layer: usize, k: usize| (layer * 3 + k) as f32 + rows as f32 * 0.1;
            let activations = (0..layers)
                .map(|layer| {
                    let sublayers = Sublayer::ALL
                        .iter()
                        .enumerate()
                        .map(|(k, s)| {
                            let t = tensor(&[rows, width], seed(layer, k), store);
                            (s.as_str().to_owned(), t)
                        })
                        .collect();
                    (layer.to_string(), dict(sublayers))
                })
                .collect();
            let attention = (0..layers)
                .map(|layer| {
                    let t = match phase {
                        Phase::Prompt => tensor(&[PROMPT_LEN, PROMPT_LEN], layer as f32, store),
                        Phase::Response => PtValue::List(
                            (0..RESPONSE_LEN)
                                .map(|i| {
                                    let n = PROMPT_LEN + i;
                                    tensor(&[n, n], (layer * 10 + i) as f32, store)
                                })
                                .collect(),
                        ),
                    };
                    (format!("layer_{layer}"), t)
                })
                .collect();
            let mut entries = texts(phase, rows);
            entries.push(("activations".into(), dict(activations)));
            entries.push(("attention".into(), dict(attention)));
            dict(entries)
        };
        dict(vec![
            ("prompt".into(), section(Phase::Prompt)),
            ("response".into(), section(Phase::Response)),
        ])
    }

    /// A layer internals artifact (a few of its tensors), `width` wide.
    fn internals_value(store: StoreDtype, width: usize) -> PtValue {
        let prompt = {
            let mut entries = texts(Phase::Prompt, PROMPT_LEN);
            entries.push((
                "residual".into(),
                dict(vec![
                    ("input".into(), tensor(&[PROMPT_LEN, width], 1.0, store)),
                    (
                        "after_attn".into(),
                        tensor(&[PROMPT_LEN, width], 2.0, store),
                    ),
                    ("output".into(), tensor(&[PROMPT_LEN, width], 3.0, store)),
                ]),
            ));
            dict(entries)
        };
        let response = {
            let mut entries = texts(Phase::Response, RESPONSE_LEN);
            let q_proj = (0..RESPONSE_LEN)
                .map(|i| tensor(&[1, 8], 10.0 + i as f32, store))
                .collect();
            entries.push((
                "attention".into(),
                dict(vec![("q_proj".into(), PtValue::List(q_proj))]),
            ));
            let residual = |seed| tensor(&[RESPONSE_LEN, 1, width], seed, store);
            entries.push((
                "residual".into(),
                dict(vec![
                    ("input".into(), residual(4.0)),
                    ("after_attn".into(), residual(5.0)),
                    ("output".into(), residual(6.0)),
                ]),
            ));
            dict(entries)
        };
        dict(vec![
            ("prompt".into(), prompt),
            ("response".into(), response),
        ])
    }

    /// The tensor at `path` of a fully decoded value, as (shape, values).
    fn decoded_at(value: &PtValue, path: &[&str]) -> TensorValues {
        let mut node = value;
        for part in path {
            node = match node {
                PtTree::Dict(_) => node.get(part).unwrap(),
                _ => {
                    let items = node.as_list().unwrap();
                    let i: i64 = part.parse().unwrap();
                    &items[if i < 0 {
                        items.len() - i.unsigned_abs() as usize
                    } else {
                        i as usize
                    }]
                }
            };
        }
        let t = node.as_tensor().unwrap();
        (t.shape.clone(), t.to_f32_vec().unwrap())
    }

    struct LocalRun {
        _dir: tempfile::TempDir,
        run: RunStore,
    }

    fn local_run() -> LocalRun {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let options = StoreOptions {
            fsync: false,
            ..StoreOptions::default()
        };
        let store = ArtifactStore::from_url(root.to_str().unwrap(), &options).unwrap();
        let run = store.run("exp", "run1").unwrap();
        LocalRun { _dir: dir, run }
    }

    async fn put(run: &RunStore, key: &str, bytes: &[u8]) {
        run.put_root_file(key, Bytes::copy_from_slice(bytes))
            .await
            .unwrap();
    }

    fn directory(bytes: &[u8]) -> ZipDirectory {
        ZipDirectory::parse_from_tail(bytes, bytes.len() as u64).unwrap()
    }

    /// File offset of an entry's data, from the whole file.
    fn data_offset(bytes: &[u8], entry: &ZipEntry) -> u64 {
        entry
            .data_offset(&bytes[entry.header_offset as usize..])
            .unwrap()
    }

    /// What `open` reads after the tail: `data.pkl`'s local header and data
    /// up to the end of the `byteorder` record's data.
    fn pickle_read_len(bytes: &[u8]) -> u64 {
        let directory = directory(bytes);
        let pickle = PtIndex::pickle_entry(&directory).unwrap();
        let prefix = pickle.name.strip_suffix("/data.pkl").unwrap();
        let order = directory.get(&format!("{prefix}/byteorder")).unwrap();
        data_offset(bytes, order) + order.size - pickle.header_offset
    }

    fn all_residual_paths(layers: usize) -> Vec<(Phase, usize, Sublayer)> {
        let mut paths = Vec::new();
        for phase in Phase::ALL {
            for layer in 0..layers {
                for sublayer in Sublayer::ALL {
                    paths.push((phase, layer, sublayer));
                }
            }
        }
        paths
    }

    #[tokio::test]
    async fn values_match_the_full_decode_for_every_dtype() {
        let local = local_run();
        for store in [StoreDtype::F32, StoreDtype::F16, StoreDtype::BF16] {
            let key = format!("inference/raw/residual/dynamic/{store}.pt");
            let value = residual_value(store, 4, 1024);
            let bytes = encode_pt(&value, store.as_str()).unwrap();
            let decoded = decode_pt(&bytes).unwrap();
            put(&local.run, &key, &bytes).await;
            let reader = ArtifactReader::open(&local.run, &key, &ByteCounter::new())
                .await
                .unwrap();
            assert_eq!(reader.file_bytes(), bytes.len() as u64);
            assert_eq!(reader.key(), key);
            assert_eq!(reader.layers().unwrap(), vec![0, 1, 2, 3]);
            let (text, tokens, ids) = reader.text_fields(Phase::Response).unwrap();
            assert_eq!(text, "response0response1response2response3");
            assert_eq!(tokens[1], "response1");
            assert_eq!(ids, vec![1000, 1001, 1002, 1003]);

            let mut wanted = Vec::new();
            let mut expected = Vec::new();
            for (phase, layer, sublayer) in all_residual_paths(4) {
                let layer_key = layer.to_string();
                let path = [phase.as_str(), "activations", &layer_key, sublayer.as_str()];
                let (shape, full) = decoded_at(&decoded, &path);
                let tensor = reader.residual_tensor(phase, layer, sublayer).unwrap();
                assert_eq!(
                    reader.read_f32(tensor, None).await.unwrap(),
                    (shape.clone(), full.clone()),
                    "{store} {path:?}"
                );
                let width = shape[1];
                let rows = reader.read_f32(tensor, Some(1..3)).await.unwrap();
                assert_eq!(rows, (vec![2, width], full[width..3 * width].to_vec()));
                let empty = reader.read_f32(tensor, Some(2..2)).await.unwrap();
                assert_eq!(empty, (vec![0, width], Vec::new()));
                wanted.push((tensor.clone(), None));
                expected.push((shape, full));
            }
            for path in [
                ["prompt", "attention", "layer_2", ""],
                ["response", "attention", "layer_1", "-1"],
            ] {
                let path: Vec<&str> = path.into_iter().filter(|p| !p.is_empty()).collect();
                wanted.push((reader.tensor_at(&path).unwrap().clone(), None));
                expected.push(decoded_at(&decoded, &path));
            }
            assert_eq!(
                reader.read_many(&wanted).await.unwrap(),
                expected,
                "{store}"
            );
        }
    }

    /// Opens the standard f32 artifact in `run` and checks, to the byte,
    /// what opening and reading cost; returns (bytes read, file size).
    async fn check_ranged_costs(run: &RunStore) -> (u64, u64) {
        let value = residual_value(StoreDtype::F32, 4, 1024);
        let bytes = encode_pt(&value, "1").unwrap();
        let decoded = decode_pt(&bytes).unwrap();
        let len = bytes.len() as u64;
        put(run, KEY, &bytes).await;
        let counter = ByteCounter::new();
        let reader = ArtifactReader::open(run, KEY, &counter).await.unwrap();
        let directory = directory(&bytes);
        let opened = TAIL_BYTES + pickle_read_len(&bytes);
        assert_eq!((counter.bytes_read(), counter.requests()), (opened, 3));

        // First read of an entry: its local header and its data, one GET.
        let tensor = reader
            .residual_tensor(Phase::Prompt, 2, Sublayer::ResidualOut)
            .unwrap()
            .clone();
        let span = reader.index().locate(&tensor).unwrap();
        let entry = directory.get(&span.entry).unwrap();
        let data = data_offset(&bytes, entry);
        assert!(
            data + span.len < len - TAIL_BYTES,
            "the tensor is not in the tail"
        );
        let (shape, full) = reader.read_f32(&tensor, None).await.unwrap();
        assert_eq!(
            (shape.clone(), full.clone()),
            decoded_at(&decoded, &["prompt", "activations", "2", "residual_out"])
        );
        let header_and_data = data - entry.header_offset + span.len;
        assert_eq!(counter.bytes_read(), opened + header_and_data);
        assert_eq!(counter.requests(), 4);

        // The offset is cached: rows cost exactly their bytes.
        let row_bytes = span.len / shape[0] as u64;
        let rows = reader.read_f32(&tensor, Some(1..3)).await.unwrap();
        assert_eq!(rows.1, full[shape[1]..3 * shape[1]]);
        assert_eq!(
            counter.bytes_read(),
            opened + header_and_data + 2 * row_bytes
        );
        assert_eq!(counter.requests(), 5);

        // Tensors inside the tail already read cost nothing.
        let path = ["response", "attention", "layer_3", "-1"];
        let last = reader.tensor_at(&path).unwrap();
        let last_span = reader.index().locate(last).unwrap();
        let last_entry = directory.get(&last_span.entry).unwrap();
        assert!(
            last_entry.header_offset >= len - TAIL_BYTES,
            "the tensor is in the tail"
        );
        let before = counter.bytes_read();
        assert_eq!(
            reader.read_f32(last, None).await.unwrap(),
            decoded_at(&decoded, &path)
        );
        assert_eq!((counter.bytes_read(), counter.requests()), (before, 5));
        eprintln!(
            "ranged read of {}: file {len} bytes; open {opened} bytes (tail {TAIL_BYTES} + \
             pickle {}); one [6, 1024] f32 tensor {header_and_data} bytes ({} of data); two \
             rows {} bytes; total {} bytes in {} requests",
            reader.url(),
            opened - TAIL_BYTES,
            span.len,
            2 * row_bytes,
            counter.bytes_read(),
            counter.requests()
        );
        assert!(
            counter.bytes_read() * 4 < len,
            "{} of {len}",
            counter.bytes_read()
        );
        (counter.bytes_read(), len)
    }

    #[tokio::test]
    async fn reads_cost_the_tail_the_pickle_and_the_tensor_bytes() {
        let local = local_run();
        check_ranged_costs(&local.run).await;
    }

    #[tokio::test]
    async fn nearby_tensors_share_one_get_and_distant_ones_do_not() {
        let local = local_run();
        let bytes = encode_pt(&residual_value(StoreDtype::BF16, 4, 1024), "1").unwrap();
        let decoded = decode_pt(&bytes).unwrap();
        put(&local.run, KEY, &bytes).await;
        let counter = ByteCounter::new();
        let reader = ArtifactReader::open(&local.run, KEY, &counter)
            .await
            .unwrap();
        let directory = directory(&bytes);
        let entry_of = |t: &TensorRef| {
            directory
                .get(&reader.index().locate(t).unwrap().entry)
                .unwrap()
        };

        // The three sublayers of a layer are consecutive storages.
        let wanted: Vec<_> = Sublayer::ALL
            .iter()
            .map(|&s| {
                (
                    reader.residual_tensor(Phase::Prompt, 1, s).unwrap().clone(),
                    None,
                )
            })
            .collect();
        let (first, last) = (entry_of(&wanted[0].0), entry_of(&wanted[2].0));
        let (bytes_before, requests_before) = (counter.bytes_read(), counter.requests());
        let read = reader.read_many(&wanted).await.unwrap();
        for (sublayer, got) in Sublayer::ALL.iter().zip(&read) {
            assert_eq!(
                *got,
                decoded_at(&decoded, &["prompt", "activations", "1", sublayer.as_str()])
            );
        }
        assert_eq!(counter.requests(), requests_before + 1);
        let expected = data_offset(&bytes, last) + last.size - first.header_offset;
        assert_eq!(counter.bytes_read(), bytes_before + expected);

        // Layer 0's input and layer 3's output are far apart: two GETs, of
        // a header and a tensor each.
        let far = [
            reader
                .residual_tensor(Phase::Prompt, 0, Sublayer::ResidualIn)
                .unwrap(),
            reader
                .residual_tensor(Phase::Prompt, 3, Sublayer::ResidualOut)
                .unwrap(),
        ];
        let (bytes_before, requests_before) = (counter.bytes_read(), counter.requests());
        let wanted: Vec<_> = far.iter().map(|t| ((*t).clone(), None)).collect();
        let read = reader.read_many(&wanted).await.unwrap();
        assert_eq!(
            read[0],
            decoded_at(&decoded, &["prompt", "activations", "0", "residual_in"])
        );
        assert_eq!(
            read[1],
            decoded_at(&decoded, &["prompt", "activations", "3", "residual_out"])
        );
        assert_eq!(counter.requests(), requests_before + 2);
        let expected: u64 = far
            .iter()
            .map(|t| {
                let entry = entry_of(t);
                data_offset(&bytes, entry) + entry.size - entry.header_offset
            })
            .sum();
        assert_eq!(counter.bytes_read(), bytes_before + expected);
    }

    #[tokio::test]
    async fn small_files_are_read_once_whole() {
        let local = local_run();
        let value = residual_value(StoreDtype::F16, 2, 8);
        let bytes = encode_pt(&value, "1").unwrap();
        assert!((bytes.len() as u64) < TAIL_BYTES);
        put(&local.run, KEY, &bytes).await;
        let counter = ByteCounter::new();
        let reader = ArtifactReader::open(&local.run, KEY, &counter)
            .await
            .unwrap();
        assert_eq!(
            (counter.bytes_read(), counter.requests()),
            (bytes.len() as u64, 2)
        );
        let decoded = decode_pt(&bytes).unwrap();
        let tensor = reader
            .residual_tensor(Phase::Response, 1, Sublayer::AfterAttn)
            .unwrap();
        let read = reader.read_f32(tensor, None).await.unwrap();
        assert_eq!(
            read,
            decoded_at(&decoded, &["response", "activations", "1", "after_attn"])
        );
        assert_eq!(
            (counter.bytes_read(), counter.requests()),
            (bytes.len() as u64, 2)
        );
    }

    #[tokio::test]
    async fn internals_paths_index_lists() {
        let local = local_run();
        let key = "inference/raw/internals/dynamic/1_L16.pt";
        let bytes = encode_pt(&internals_value(StoreDtype::BF16, 256), "1_L16").unwrap();
        let decoded = decode_pt(&bytes).unwrap();
        put(&local.run, key, &bytes).await;
        let reader = ArtifactReader::open(&local.run, key, &ByteCounter::new())
            .await
            .unwrap();
        let url = local.run.url_of(key);

        let residual = reader
            .internals_residual_tensor(Phase::Response, Sublayer::ResidualIn)
            .unwrap();
        let (shape, full) = decoded_at(&decoded, &["response", "residual", "input"]);
        assert_eq!(shape, vec![RESPONSE_LEN, 1, 256]);
        let rows = reader.read_f32(residual, Some(1..3)).await.unwrap();
        assert_eq!(rows, (vec![2, 1, 256], full[256..3 * 256].to_vec()));
        for index in ["2", "-1", "-4"] {
            let path = ["response", "attention", "q_proj", index];
            let tensor = reader.tensor_at(&path).unwrap();
            assert_eq!(
                reader.read_f32(tensor, None).await.unwrap(),
                decoded_at(&decoded, &path)
            );
        }

        let message = |path: &[&str]| reader.tensor_at(path).unwrap_err().to_string();
        assert_eq!(
            message(&["response", "attention", "q_proj", "4"]),
            format!(
                "{url} has no response.attention.q_proj.4; response.attention.q_proj is a list \
                 of 4 items"
            )
        );
        assert_eq!(
            message(&["prompt", "mlp", "gelu"]),
            format!("{url} has no prompt.mlp; keys present: text, tokens, token_ids, residual")
        );
        assert_eq!(
            message(&["prompt", "text"]),
            format!("{url} has prompt.text as a str, not a tensor")
        );
        assert_eq!(
            message(&["prompt", "text", "x"]),
            format!("{url} has prompt.text as a str, not a dict or list")
        );
        let err = reader.layers().unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{url} has no prompt.activations; keys present: text, tokens, token_ids, residual"
            )
        );
    }

    #[tokio::test]
    async fn missing_layers_rows_and_objects_are_named() {
        let local = local_run();
        let bytes = encode_pt(&residual_value(StoreDtype::F32, 4, 16), "1").unwrap();
        put(&local.run, KEY, &bytes).await;
        let url = local.run.url_of(KEY);
        let reader = ArtifactReader::open(&local.run, KEY, &ByteCounter::new())
            .await
            .unwrap();
        let err = reader
            .residual_tensor(Phase::Prompt, 7, Sublayer::ResidualIn)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("{url} has no prompt.activations.7.residual_in; layers present: 0-3")
        );
        assert_eq!(err.url(), url);

        let tensor = reader
            .residual_tensor(Phase::Prompt, 0, Sublayer::AfterAttn)
            .unwrap();
        let err = reader.read_f32(tensor, Some(5..9)).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "cannot read F32 tensor of shape [6, 16] in storage {} of {url}: rows 5..9 out \
                 of range: the tensor has 6 rows",
                tensor.storage_key()
            )
        );

        let missing = "inference/raw/residual/dynamic/99.pt";
        let err = ArtifactReader::open(&local.run, missing, &ByteCounter::new())
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ReaderError::Store { source, .. } if source.is_not_found()),
            "{err:?}"
        );
        assert!(
            err.to_string().contains(&local.run.url_of(missing)),
            "{err}"
        );
    }

    #[tokio::test]
    async fn torch_written_views_read_when_contiguous() {
        let local = local_run();
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../worker/tests/fixtures/pt/views.pt"
        );
        let bytes = std::fs::read(path).unwrap();
        let key = "inference/raw/residual/fixtures/views.pt";
        put(&local.run, key, &bytes).await;
        let url = local.run.url_of(key);
        let reader = ArtifactReader::open(&local.run, key, &ByteCounter::new())
            .await
            .unwrap();
        let read = |name: &'static str, rows| {
            let reader = &reader;
            async move {
                reader
                    .read_f32(reader.tensor_at(&[name]).unwrap(), rows)
                    .await
            }
        };
        assert_eq!(
            read("row", None).await.unwrap(),
            (vec![4], vec![0.75, 1.0, 1.25, 1.5])
        );
        assert_eq!(read("element", None).await.unwrap(), (vec![], vec![0.0]));
        let base = read("base", Some(1..3)).await.unwrap();
        assert_eq!(
            base,
            (
                vec![2, 4],
                vec![-0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
            )
        );
        let err = read("transposed", None).await.unwrap_err().to_string();
        assert!(
            err.starts_with("cannot read F32 tensor of shape [4, 3] in storage 0 of "),
            "{err}"
        );
        assert!(
            err.contains(&url) && err.contains("is not contiguous"),
            "{err}"
        );
        let err = read("element", Some(0..1)).await.unwrap_err().to_string();
        assert!(err.ends_with("a 0-dim tensor has no rows 0..1"), "{err}");
    }

    /// Opens `bytes` stored at `key` and returns the error's message.
    async fn open_error(run: &RunStore, key: &str, bytes: &[u8]) -> String {
        put(run, key, bytes).await;
        match ArtifactReader::open(run, key, &ByteCounter::new()).await {
            Ok(reader) => panic!("{key} opened: {reader:?}"),
            Err(err) => err.to_string(),
        }
    }

    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    /// Offset of the central directory record of entry `name`.
    fn central_record(bytes: &[u8], name: &str) -> usize {
        (0..bytes.len() - 46)
            .find(|&at| {
                bytes[at..at + 4] == [0x50, 0x4b, 0x01, 0x02]
                    && usize::from(u16::from_le_bytes([bytes[at + 28], bytes[at + 29]]))
                        == name.len()
                    && &bytes[at + 46..at + 46 + name.len()] == name.as_bytes()
            })
            .unwrap()
    }

    #[tokio::test]
    async fn corrupt_files_are_errors_naming_the_artifact() {
        let local = local_run();
        let run = &local.run;
        let good = encode_pt(&residual_value(StoreDtype::F32, 4, 1024), "1").unwrap();
        let not_zip = "not a zip file: end of central directory not found";
        for (name, bytes) in [
            ("noise.pt", noise(100_000, 1)),
            ("short_noise.pt", noise(100, 2)),
            ("half.pt", good[..good.len() / 2].to_vec()),
            ("cut_end.pt", good[..good.len() - 10].to_vec()),
        ] {
            let key = format!("inference/raw/residual/corrupt/{name}");
            let message = open_error(run, &key, &bytes).await;
            assert_eq!(
                message,
                format!("corrupt artifact {}: {not_zip}", run.url_of(&key))
            );
        }
        let key = "inference/raw/residual/corrupt/empty.pt";
        assert_eq!(
            open_error(run, key, b"").await,
            format!(
                "corrupt artifact {}: not a zip file: the object is empty",
                run.url_of(key)
            )
        );

        // Garbage pickle: caught by its checksum, and by the unpickler once
        // the checksum is made to match.
        let directory = directory(&good);
        let pickle = PtIndex::pickle_entry(&directory).unwrap();
        let start = data_offset(&good, pickle) as usize;
        let mut garbage = good.clone();
        garbage[start..start + pickle.size as usize].fill(0xFF);
        let key = "inference/raw/residual/corrupt/pickle_crc.pt";
        assert_eq!(
            open_error(run, key, &garbage).await,
            format!(
                "corrupt artifact {}: entry 1/data.pkl: crc32 mismatch",
                run.url_of(key)
            )
        );
        let record = central_record(&garbage, "1/data.pkl");
        let crc = crc32(&garbage[start..start + pickle.size as usize]);
        garbage[record + 16..record + 20].copy_from_slice(&crc.to_le_bytes());
        let key = "inference/raw/residual/corrupt/pickle.pt";
        assert_eq!(
            open_error(run, key, &garbage).await,
            format!(
                "corrupt artifact {}: unsupported pickle opcode 0xff at byte 0",
                run.url_of(key)
            )
        );
    }

    #[tokio::test]
    async fn corrupt_storages_are_errors_naming_the_artifact() {
        let local = local_run();
        let run = &local.run;
        let good = encode_pt(&residual_value(StoreDtype::F32, 4, 1024), "1").unwrap();
        let index = {
            let directory = directory(&good);
            let pickle = PtIndex::pickle_entry(&directory).unwrap();
            let start = data_offset(&good, pickle) as usize;
            PtIndex::new(
                directory.clone(),
                &good[start..start + pickle.size as usize],
            )
            .unwrap()
        };
        let entry_of = |path: &[&str]| {
            let span = index
                .locate(tensor_at(index.root(), path).unwrap())
                .unwrap();
            index.directory().get(&span.entry).unwrap().clone()
        };
        let read_error = |key: &'static str, bytes: Vec<u8>, path: &'static [&'static str]| async move {
            put(run, key, &bytes).await;
            let reader = ArtifactReader::open(run, key, &ByteCounter::new())
                .await
                .unwrap();
            let tensor = reader.tensor_at(path).unwrap();
            reader.read_f32(tensor, None).await.unwrap_err().to_string()
        };

        // A clobbered local header.
        const MIDDLE: &[&str] = &["prompt", "activations", "1", "residual_in"];
        let entry = entry_of(MIDDLE);
        let mut bytes = good.clone();
        bytes[entry.header_offset as usize..][..4].fill(0);
        let key = "inference/raw/residual/corrupt/header.pt";
        assert_eq!(
            read_error(key, bytes, MIDDLE).await,
            format!(
                "corrupt artifact {}: corrupt zip archive: bad local header for entry {} at \
                 byte {}",
                run.url_of(key),
                entry.name,
                entry.header_offset
            )
        );

        // Flipped data bits: whole-storage reads check the checksum.
        let mut bytes = good.clone();
        bytes[data_offset(&good, &entry) as usize + 5] ^= 0x10;
        let key = "inference/raw/residual/corrupt/data.pt";
        assert_eq!(
            read_error(key, bytes, MIDDLE).await,
            format!(
                "corrupt artifact {}: entry {}: crc32 mismatch",
                run.url_of(key),
                entry.name
            )
        );

        // A header whose extra field pushes the data past the end.
        const LAST: &[&str] = &["response", "attention", "layer_3", "-1"];
        let entry = entry_of(LAST);
        let mut bytes = good.clone();
        let at = entry.header_offset as usize + 28;
        bytes[at..at + 2].copy_from_slice(&u16::MAX.to_le_bytes());
        let key = "inference/raw/residual/corrupt/truncated.pt";
        let message = read_error(key, bytes, LAST).await;
        assert!(
            message.starts_with(&format!(
                "truncated artifact {}: entry {} reaches byte ",
                run.url_of(key),
                entry.name
            )) && message.ends_with(&format!("but the file is {} bytes long", good.len())),
            "{message}"
        );
    }

    #[test]
    fn names_parse_and_print() {
        for phase in Phase::ALL {
            assert_eq!(phase.to_string().parse::<Phase>().unwrap(), phase);
        }
        for sublayer in Sublayer::ALL {
            assert_eq!(sublayer.as_str().parse::<Sublayer>().unwrap(), sublayer);
        }
        assert_eq!(
            "x".parse::<Sublayer>().unwrap_err().to_string(),
            "unknown sublayer \"x\": use residual_in, after_attn or residual_out"
        );
        assert_eq!(
            "Prompt".parse::<Phase>().unwrap_err().to_string(),
            "unknown phase \"Prompt\": use prompt or response"
        );
        assert_eq!(Sublayer::ResidualOut.internals_key(), "output");
    }

    #[test]
    fn layer_lists_are_compressed() {
        assert_eq!(describe_layers(&[0, 1, 2, 3, 5, 7, 8, 9]), "0-3, 5, 7-9");
        assert_eq!(describe_layers(&[4]), "4");
        assert_eq!(describe_layers(&[]), "none");
    }

    #[test]
    fn spans_coalesce_within_the_gap_and_size_limits() {
        let merged = coalesce(
            vec![100..110, 0..10, 15..20, 105..200, 1000..1001],
            10,
            1000,
        );
        assert_eq!(merged, vec![0..20, 100..200, 1000..1001]);
        // Too long a merge is not made, but overlapping spans always merge.
        assert_eq!(coalesce(vec![0..10, 12..20], 10, 15), vec![0..10, 12..20]);
        assert_eq!(coalesce(vec![0..10, 5..20], 0, 1), vec![0..20]);
        assert_eq!(coalesce(vec![0..10, 10..20], 0, 100), vec![0..20]);
    }

    /// `PUT /{bucket}`: object_store cannot create buckets; moto takes an
    /// unsigned request.
    fn create_bucket(endpoint: &str, bucket: &str) {
        let authority = endpoint
            .strip_prefix("http://")
            .unwrap_or_else(|| panic!("the S3 endpoint {endpoint} must be plain http"))
            .trim_end_matches('/');
        let mut stream = TcpStream::connect(authority).unwrap_or_else(|err| {
            panic!("cannot reach the S3 endpoint {endpoint}: {err}; is moto running?")
        });
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        write!(
            stream,
            "PUT /{bucket} HTTP/1.1\r\nHost: {authority}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let status = response.lines().next().unwrap_or_default();
        assert!(
            status.contains(" 200"),
            "creating bucket {bucket} at {endpoint} failed: {status}"
        );
    }

    /// Against a real S3 endpoint (moto): `source scripts/services.sh &&
    /// start_moto` exports `CAPTURE_S3_ENDPOINT` (`CAPTURE_TEST_S3_ENDPOINT`
    /// works too). Skipped, saying so, when neither is set.
    #[tokio::test]
    async fn s3_reads_cost_the_same_bytes() {
        let endpoint = ["CAPTURE_TEST_S3_ENDPOINT", "CAPTURE_S3_ENDPOINT"]
            .iter()
            .find_map(|name| std::env::var(name).ok().filter(|v| !v.is_empty()));
        let Some(endpoint) = endpoint else {
            eprintln!(
                "skipped: CAPTURE_S3_ENDPOINT is not set; run `source scripts/services.sh && \
                 start_moto` first to test against moto"
            );
            return;
        };
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let bucket = format!(
            "capture-reader-{}-{}",
            std::process::id(),
            nanos % 1_000_000_000_000
        );
        tokio::task::spawn_blocking({
            let (endpoint, bucket) = (endpoint.clone(), bucket.clone());
            move || create_bucket(&endpoint, &bucket)
        })
        .await
        .unwrap();
        let options = StoreOptions {
            s3_endpoint: Some(endpoint),
            max_retries: 2,
            retry_timeout: Duration::from_secs(10),
            ..StoreOptions::default()
        };
        let store = ArtifactStore::from_url(&format!("s3://{bucket}/captures"), &options).unwrap();
        let run = store.run("exp", "run1").unwrap();
        assert_eq!(
            run.url_of(KEY),
            format!("s3://{bucket}/captures/exp/run1/{KEY}")
        );
        check_ranged_costs(&run).await;

        let key = "inference/raw/residual/dynamic/noise.pt";
        assert_eq!(
            open_error(&run, key, &noise(70_000, 3)).await,
            format!(
                "corrupt artifact s3://{bucket}/captures/exp/run1/{key}: not a zip file: end of \
                 central directory not found"
            )
        );
    }
}
