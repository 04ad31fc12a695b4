//! `RunStore`: one run's root in the store — staged uploads per attempt,
//! promotion to the documented keys, root files and reads.

use std::collections::{BTreeSet, HashSet};
use std::io::Read;
use std::ops::Range;
use std::path::Path;
use std::time::SystemTime;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetRange, ObjectMeta, ObjectStoreExt, PutPayload, WriteMultipart};
use sha2::{Digest, Sha256};
use tracing::debug;

use super::ArtifactStore;
use super::error::StoreError;
use super::keys::{
    KeyUse, MAX_OBJECT_KEY_BYTES, STAGING_DIR, validate_attempt, validate_component,
    validate_list_prefix, validate_relative_key,
};

/// An object uploaded under an attempt's staging prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedObject {
    /// The relative key it will have once promoted, e.g.
    /// `inference/raw/residual/dynamic/p01.pt`.
    pub key: String,
    /// Its size.
    pub bytes: u64,
    /// Lowercase hex sha256 of its content.
    pub sha256: String,
}

/// What a listing or `head` says about one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Key relative to the run root (staged objects start with `_staging/`).
    pub key: String,
    /// Size in bytes.
    pub bytes: u64,
    /// When the store last wrote it.
    pub last_modified: SystemTime,
    /// The store's entity tag, if it has one (S3: `"...-N"` for N-part uploads).
    pub e_tag: Option<String>,
}

/// What [`RunStore::promote`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Promotion {
    /// Objects copied from staging to their documented keys.
    pub copied: usize,
    /// Objects already at their documented keys with nothing left staged (a
    /// promotion that is run again after a crash).
    pub already_promoted: usize,
    /// Objects deleted from the attempt's staging prefix afterwards.
    pub staging_deleted: usize,
}

/// One run's root, `{store prefix}/{experiment}/{run_id}/`. Cheap to clone.
#[derive(Debug, Clone)]
pub struct RunStore {
    pub(super) store: ArtifactStore,
    pub(super) root: ObjectPath,
}

impl RunStore {
    pub(super) fn new(store: ArtifactStore, root: ObjectPath) -> Self {
        Self { store, root }
    }

    /// The run root's URL, e.g. `s3://bucket/prefix/exp/0190f5c2-...`.
    pub fn root_url(&self) -> String {
        self.store.location(&self.root)
    }

    /// The URL of a relative key below the run root (for messages and manifests).
    pub fn url_of(&self, key: &str) -> String {
        format!("{}/{key}", self.root_url())
    }

    /// The relative staging prefix of one attempt: `_staging/{job_id}/{attempt}`.
    pub fn staging_prefix(job_id: &str, attempt: u32) -> Result<String, StoreError> {
        validate_component("job id", job_id)?;
        validate_attempt(attempt)?;
        Ok(format!("{STAGING_DIR}/{job_id}/{attempt}"))
    }

    /// Uploads `payload` (one buffer, or several in order: an encoded
    /// artifact's parts) for `key` under the attempt's staging prefix (in
    /// parts when it is larger than the multipart threshold, without copying
    /// it) and returns its size and sha256, hashed while it uploads.
    pub async fn stage_put(
        &self,
        job_id: &str,
        attempt: u32,
        key: &str,
        payload: impl Into<PutPayload>,
    ) -> Result<StagedObject, StoreError> {
        let payload = payload.into();
        let path = self.staged_path(job_id, attempt, key)?;
        let bytes = payload.content_length() as u64;
        let hashing = tokio::task::spawn_blocking({
            let payload = payload.clone();
            move || {
                let mut hasher = Sha256::new();
                for part in &payload {
                    hasher.update(part);
                }
                hex::encode(hasher.finalize())
            }
        });
        let uploaded = self.upload(&path, payload).await;
        let sha256 = hashing.await.map_err(|source| StoreError::Task {
            operation: "hashing an upload",
            source,
        })?;
        uploaded?;
        debug!(job_id, attempt, key, bytes, "staged artifact");
        Ok(StagedObject {
            key: key.to_owned(),
            bytes,
            sha256,
        })
    }

    /// As [`RunStore::stage_put`], reading the payload from a local file; a
    /// large file is read, hashed and uploaded one part at a time, so at most
    /// about `concurrency` parts are in memory.
    pub async fn stage_put_file(
        &self,
        job_id: &str,
        attempt: u32,
        key: &str,
        file: &Path,
    ) -> Result<StagedObject, StoreError> {
        let path = self.staged_path(job_id, attempt, key)?;
        let read_error = |source| StoreError::ReadFile {
            path: file.to_owned(),
            source,
        };
        let size = tokio::fs::metadata(file).await.map_err(read_error)?.len();
        if size <= self.store.options.multipart_threshold as u64 {
            let payload = tokio::fs::read(file).await.map_err(read_error)?;
            return self
                .stage_put(job_id, attempt, key, Bytes::from(payload))
                .await;
        }
        let (bytes, sha256) = self.upload_file_in_parts(&path, file).await?;
        debug!(job_id, attempt, key, bytes, "staged artifact from file");
        Ok(StagedObject {
            key: key.to_owned(),
            bytes,
            sha256,
        })
    }

    /// Publishes an accepted attempt: copies each staged `key` to its
    /// documented key, then deletes the attempt's whole staging prefix.
    ///
    /// Call it only after the attempt's completion was accepted. Every key is
    /// checked before anything is copied: a key that was neither staged nor is
    /// already at its documented key fails the promotion with nothing
    /// written. Running it again after a crash is safe: keys whose staged
    /// object is gone but whose documented object exists count as already
    /// promoted.
    pub async fn promote<K: AsRef<str>>(
        &self,
        job_id: &str,
        attempt: u32,
        keys: &[K],
    ) -> Result<Promotion, StoreError> {
        let staging = Self::staging_prefix(job_id, attempt)?;
        let keys: BTreeSet<&str> = keys.iter().map(AsRef::as_ref).collect();
        let mut moves = Vec::with_capacity(keys.len());
        for key in &keys {
            let from = self.staged_path(job_id, attempt, key)?;
            let to = self.documented_path(key)?;
            moves.push((*key, from, to));
        }

        let staged: HashSet<ObjectPath> = self
            .list_paths(&self.full_path(&staging)?)
            .await?
            .into_iter()
            .map(|meta| meta.location)
            .collect();
        let mut to_copy = Vec::new();
        let mut promotion = Promotion::default();
        let mut missing = Vec::new();
        for (key, from, to) in moves {
            if staged.contains(&from) {
                to_copy.push((from, to));
            } else if self.exists(&to).await? {
                promotion.already_promoted += 1;
            } else {
                missing.push(key.to_owned());
            }
        }
        if !missing.is_empty() {
            return Err(StoreError::MissingStaged {
                job: job_id.to_owned(),
                attempt,
                staging: self.url_of(&staging),
                missing,
            });
        }

        let outcomes: Vec<bool> = futures::stream::iter(to_copy)
            .map(|(from, to)| async move { self.copy_staged(&from, &to).await })
            .buffer_unordered(self.store.options.concurrency)
            .try_collect()
            .await?;
        for copied in outcomes {
            if copied {
                promotion.copied += 1;
            } else {
                promotion.already_promoted += 1;
            }
        }
        promotion.staging_deleted = self.delete_below(&staging).await?;
        debug!(
            job_id,
            attempt,
            copied = promotion.copied,
            already_promoted = promotion.already_promoted,
            staging_deleted = promotion.staging_deleted,
            "promoted attempt"
        );
        Ok(promotion)
    }

    /// Deletes everything one attempt staged (a failed, lost or superseded
    /// attempt); returns how many objects were deleted. Safe to repeat.
    pub async fn discard_attempt(&self, job_id: &str, attempt: u32) -> Result<usize, StoreError> {
        let staging = Self::staging_prefix(job_id, attempt)?;
        let deleted = self.delete_below(&staging).await?;
        debug!(job_id, attempt, deleted, "discarded staged attempt");
        Ok(deleted)
    }

    /// Deletes what every attempt of a job staged (e.g. once the job is done,
    /// to collect uploads a zombie worker made after its lease was lost).
    pub async fn discard_job_staging(&self, job_id: &str) -> Result<usize, StoreError> {
        validate_component("job id", job_id)?;
        let deleted = self
            .delete_below(&format!("{STAGING_DIR}/{job_id}"))
            .await?;
        debug!(job_id, deleted, "discarded staged job");
        Ok(deleted)
    }

    /// Deletes everything under the run's staging directory; returns how
    /// many objects were deleted. Only for a finalized run, where nothing
    /// staged can be promoted any more (late zombie uploads).
    pub async fn discard_all_staging(&self) -> Result<usize, StoreError> {
        let deleted = self.delete_below(STAGING_DIR).await?;
        debug!(deleted, "discarded the run's staging");
        Ok(deleted)
    }

    /// Writes a file at a documented key directly (no staging), e.g. the run's
    /// `manifest.json`. Only the coordinator writes these; the write replaces
    /// the object atomically.
    pub async fn put_root_file(&self, key: &str, payload: Bytes) -> Result<(), StoreError> {
        let path = self.documented_path(key)?;
        self.upload(&path, payload.into()).await
    }

    /// Reads a whole object.
    pub async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        let path = self.read_path(key)?;
        let location = || self.store.location(&path);
        let result = self
            .store
            .inner
            .get(&path)
            .await
            .map_err(|source| StoreError::backend("read", location(), source))?;
        result
            .bytes()
            .await
            .map_err(|source| StoreError::backend("read", location(), source))
    }

    /// Reads exactly the bytes `range` of an object; a range past its end is
    /// an error, not a short read.
    pub async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
        let path = self.read_path(key)?;
        let location = || self.store.location(&path);
        let invalid = |reason: String| StoreError::InvalidRange {
            location: location(),
            start: range.start,
            end: range.end,
            reason,
        };
        if range.start > range.end {
            return Err(invalid("the start is after the end".to_owned()));
        }
        if range.is_empty() {
            // Nothing to fetch, but the object must exist and reach the start.
            let size = self.head(key).await?.bytes;
            if range.start > size {
                return Err(invalid(format!("the object is {size} bytes long")));
            }
            return Ok(Bytes::new());
        }
        let bytes = match self.store.inner.get_range(&path, range.clone()).await {
            Ok(bytes) => bytes,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(StoreError::NotFound {
                    location: location(),
                });
            }
            Err(source) => {
                // Say plainly when the range lies past the end of the object.
                if let Ok(info) = self.head(key).await
                    && range.end > info.bytes
                {
                    return Err(invalid(format!("the object is {} bytes long", info.bytes)));
                }
                return Err(StoreError::backend("read", location(), source));
            }
        };
        if bytes.len() as u64 != range.end - range.start {
            let size = self.head(key).await?.bytes;
            return Err(invalid(format!("the object is {size} bytes long")));
        }
        Ok(bytes)
    }

    /// The last `len` bytes of an object (all of it when shorter) and the
    /// object's size, with one request (a suffix range), so readers of a
    /// zip's central directory need no HEAD first. `len` must not be 0.
    pub async fn get_tail(&self, key: &str, len: u64) -> Result<(Bytes, u64), StoreError> {
        let path = self.read_path(key)?;
        let location = || self.store.location(&path);
        let options = GetOptions {
            range: Some(GetRange::Suffix(len.max(1))),
            ..GetOptions::default()
        };
        let result = match self.store.inner.get_opts(&path, options).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(StoreError::NotFound {
                    location: location(),
                });
            }
            Err(source) => {
                // An empty object has no suffix to serve: say it is empty.
                if let Ok(info) = self.head(key).await
                    && info.bytes == 0
                {
                    return Ok((Bytes::new(), 0));
                }
                return Err(StoreError::backend("read", location(), source));
            }
        };
        let size = result.meta.size;
        let bytes = result
            .bytes()
            .await
            .map_err(|source| StoreError::backend("read", location(), source))?;
        let expected = size.min(len.max(1));
        if bytes.len() as u64 != expected {
            return Err(StoreError::InvalidRange {
                location: location(),
                start: size - expected,
                end: size,
                reason: format!("the store answered {} bytes", bytes.len()),
            });
        }
        Ok((bytes, size))
    }

    /// Size and metadata of one object.
    pub async fn head(&self, key: &str) -> Result<ObjectInfo, StoreError> {
        let path = self.read_path(key)?;
        let meta =
            self.store.inner.head(&path).await.map_err(|source| {
                StoreError::backend("inspect", self.store.location(&path), source)
            })?;
        Ok(self.info(meta))
    }

    /// Every object below a relative folder (`""` for the whole run root,
    /// `"_staging"` for everything staged), sorted by key.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        validate_list_prefix(prefix)?;
        let folder = prefix.trim_end_matches('/');
        let path = if folder.is_empty() {
            self.root.clone()
        } else {
            self.full_path(folder)?
        };
        let mut infos: Vec<ObjectInfo> = self
            .list_paths(&path)
            .await?
            .into_iter()
            .map(|meta| self.info(meta))
            .collect();
        infos.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(infos)
    }

    fn info(&self, meta: ObjectMeta) -> ObjectInfo {
        let full = meta.location.as_ref();
        let key = full
            .strip_prefix(self.root.as_ref())
            .map(|rest| rest.trim_start_matches('/'))
            .unwrap_or(full);
        ObjectInfo {
            key: key.to_owned(),
            bytes: meta.size,
            last_modified: meta.last_modified.into(),
            e_tag: meta.e_tag,
        }
    }

    pub(super) fn documented_path(&self, key: &str) -> Result<ObjectPath, StoreError> {
        validate_relative_key(key, KeyUse::Documented)?;
        self.full_path(key)
    }

    fn read_path(&self, key: &str) -> Result<ObjectPath, StoreError> {
        validate_relative_key(key, KeyUse::Read)?;
        self.full_path(key)
    }

    pub(super) fn staged_path(
        &self,
        job_id: &str,
        attempt: u32,
        key: &str,
    ) -> Result<ObjectPath, StoreError> {
        let staging = Self::staging_prefix(job_id, attempt)?;
        validate_relative_key(key, KeyUse::Documented)?;
        self.full_path(&format!("{staging}/{key}"))
    }

    /// Joins an already validated relative key to the run root.
    fn full_path(&self, relative: &str) -> Result<ObjectPath, StoreError> {
        let joined = if self.root.as_ref().is_empty() {
            relative.to_owned()
        } else {
            format!("{}/{relative}", self.root.as_ref())
        };
        if joined.len() > MAX_OBJECT_KEY_BYTES {
            return Err(StoreError::KeyTooLong {
                location: self.url_of(relative),
                bytes: joined.len(),
                max: MAX_OBJECT_KEY_BYTES,
            });
        }
        ObjectPath::parse(&joined).map_err(|err| StoreError::UnsafeKey {
            key: relative.to_owned(),
            reason: err.to_string(),
        })
    }

    async fn exists(&self, path: &ObjectPath) -> Result<bool, StoreError> {
        match self.store.inner.head(path).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(source) => Err(StoreError::backend(
                "inspect",
                self.store.location(path),
                source,
            )),
        }
    }

    /// Copies one staged object to its documented key; `false` when the
    /// staged object vanished meanwhile but the documented one exists (a
    /// concurrent promotion of the same attempt finished first).
    async fn copy_staged(&self, from: &ObjectPath, to: &ObjectPath) -> Result<bool, StoreError> {
        match self.store.inner.copy(from, to).await {
            Ok(()) => Ok(true),
            Err(object_store::Error::NotFound { .. }) if self.exists(to).await? => Ok(false),
            Err(source) => Err(StoreError::backend(
                "promote",
                self.store.location(from),
                source,
            )),
        }
    }

    async fn list_paths(&self, folder: &ObjectPath) -> Result<Vec<ObjectMeta>, StoreError> {
        self.store
            .inner
            .list(Some(folder))
            .try_collect()
            .await
            .map_err(|source| StoreError::backend("list", self.store.location(folder), source))
    }

    /// Deletes every object below a relative folder; returns how many.
    async fn delete_below(&self, folder: &str) -> Result<usize, StoreError> {
        let folder_path = self.full_path(folder)?;
        let paths: Vec<ObjectPath> = self
            .list_paths(&folder_path)
            .await?
            .into_iter()
            .map(|meta| meta.location)
            .collect();
        let count = paths.len();
        let locations = futures::stream::iter(paths.into_iter().map(Ok)).boxed();
        let mut deleted = self.store.inner.delete_stream(locations);
        while let Some(outcome) = deleted.next().await {
            match outcome {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(source) => {
                    return Err(StoreError::backend(
                        "delete",
                        self.store.location(&folder_path),
                        source,
                    ));
                }
            }
        }
        Ok(count)
    }

    /// One put for small payloads, a multipart upload of zero-copy slices
    /// for large ones (parts of `part_size` gathered across the payload's
    /// buffers, at most `concurrency` of them in flight).
    async fn upload(&self, path: &ObjectPath, payload: PutPayload) -> Result<(), StoreError> {
        let options = &self.store.options;
        let location = || self.store.location(path);
        if payload.content_length() <= options.multipart_threshold {
            self.store
                .inner
                .put(path, payload)
                .await
                .map_err(|source| StoreError::backend("upload", location(), source))?;
            return Ok(());
        }
        let mut writer = self.start_multipart(path).await?;
        let slices = payload.iter().flat_map(|buffer| {
            (0..buffer.len())
                .step_by(options.part_size)
                .map(|start| buffer.slice(start..(start + options.part_size).min(buffer.len())))
        });
        for slice in slices {
            if let Err(source) = writer.wait_for_capacity(options.concurrency).await {
                let _ = writer.abort().await;
                return Err(StoreError::backend("upload", location(), source));
            }
            writer.put(slice);
        }
        writer
            .finish()
            .await
            .map_err(|source| StoreError::backend("upload", location(), source))?;
        Ok(())
    }

    async fn start_multipart(&self, path: &ObjectPath) -> Result<WriteMultipart, StoreError> {
        let upload = self
            .store
            .inner
            .put_multipart(path)
            .await
            .map_err(|source| {
                StoreError::backend("start upload of", self.store.location(path), source)
            })?;
        Ok(WriteMultipart::new_with_chunk_size(
            upload,
            self.store.options.part_size,
        ))
    }

    /// Reads, hashes and uploads a file one part at a time; reading and
    /// hashing run off the async executor.
    async fn upload_file_in_parts(
        &self,
        path: &ObjectPath,
        file: &Path,
    ) -> Result<(u64, String), StoreError> {
        let options = &self.store.options;
        let location = || self.store.location(path);
        let opened = {
            let file = file.to_owned();
            blocking("reading a file", move || std::fs::File::open(&file)).await?
        };
        let mut reader = opened.map_err(|source| StoreError::ReadFile {
            path: file.to_owned(),
            source,
        })?;
        let mut writer = self.start_multipart(path).await?;
        let mut hasher = Sha256::new();
        let mut total = 0u64;
        loop {
            let part_size = options.part_size;
            let file_name = file.to_owned();
            let read = blocking("reading a file", move || {
                let part = read_part(&mut reader, part_size, &file_name);
                if let Ok(bytes) = &part {
                    hasher.update(bytes);
                }
                (reader, hasher, part)
            })
            .await;
            let (next_reader, next_hasher, part) = match read {
                Ok(read) => read,
                Err(err) => {
                    let _ = writer.abort().await;
                    return Err(err);
                }
            };
            (reader, hasher) = (next_reader, next_hasher);
            let part = match part {
                Ok(part) => part,
                Err(err) => {
                    let _ = writer.abort().await;
                    return Err(err);
                }
            };
            if part.is_empty() {
                break;
            }
            total += part.len() as u64;
            if let Err(source) = writer.wait_for_capacity(options.concurrency).await {
                let _ = writer.abort().await;
                return Err(StoreError::backend("upload", location(), source));
            }
            writer.put(part);
        }
        writer
            .finish()
            .await
            .map_err(|source| StoreError::backend("upload", location(), source))?;
        Ok((total, hex::encode(hasher.finalize())))
    }
}

/// Reads up to `part_size` bytes (fewer only at the end of the file).
fn read_part(
    reader: &mut std::fs::File,
    part_size: usize,
    file: &Path,
) -> Result<Bytes, StoreError> {
    let mut buffer = Vec::with_capacity(part_size);
    reader
        .take(part_size as u64)
        .read_to_end(&mut buffer)
        .map_err(|source| StoreError::ReadFile {
            path: file.to_owned(),
            source,
        })?;
    Ok(Bytes::from(buffer))
}

async fn blocking<T: Send + 'static>(
    operation: &'static str,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|source| StoreError::Task { operation, source })
}
