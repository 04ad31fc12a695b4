//! The writing half of `worker capture`: a thread that assembles and encodes
//! each captured prompt's artifacts, writes them (atomically, hashing as it goes) and
//! rewrites the manifest after every prompt, while the compute thread runs
//! the next batch. The queue between them is bounded, so at most one batch
//! of captured prompts waits in memory.

use std::path::PathBuf;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use super::prompt::CapturedPrompt;
use crate::error::Result;
use crate::manifest::{ArtifactEntry, Manifest};
use crate::pt::write_pt_parts;

/// The writer thread and the sending end of its queue.
pub(super) struct ArtifactWriter {
    queue: Option<SyncSender<CapturedPrompt>>,
    thread: JoinHandle<Result<Vec<ArtifactEntry>>>,
}

impl ArtifactWriter {
    /// Starts the thread; it writes under `out` and keeps `manifest` (saved
    /// at `manifest_path`) up to date. `capacity` prompts may wait.
    pub(super) fn start(
        out: PathBuf,
        manifest: Manifest,
        manifest_path: PathBuf,
        capacity: usize,
    ) -> Self {
        let (queue, prompts) = sync_channel(capacity.max(1));
        let thread = std::thread::Builder::new()
            .name("capture-writer".into())
            .spawn(move || write_all(&out, manifest, &manifest_path, prompts))
            .expect("spawning the writer thread");
        Self {
            queue: Some(queue),
            thread,
        }
    }

    /// Queues a captured prompt, waiting while the queue is full. `false`
    /// when the writer stopped on an error ([`ArtifactWriter::finish`]
    /// returns it).
    pub(super) fn send(&self, prompt: CapturedPrompt) -> bool {
        self.queue
            .as_ref()
            .is_some_and(|queue| queue.send(prompt).is_ok())
    }

    /// Waits for everything queued to be written; the entries written, in
    /// order, or the first error.
    pub(super) fn finish(mut self) -> Result<Vec<ArtifactEntry>> {
        drop(self.queue.take());
        self.thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }
}

fn write_all(
    out: &std::path::Path,
    mut manifest: Manifest,
    manifest_path: &std::path::Path,
    prompts: Receiver<CapturedPrompt>,
) -> Result<Vec<ArtifactEntry>> {
    let mut written = Vec::new();
    for mut captured in prompts {
        // Taken out of the prompt, so that encoding can take each
        // artifact's trace.
        for artifact in std::mem::take(&mut captured.artifacts) {
            let mut entry = captured.entry(&artifact);
            let encoded = artifact.encode()?;
            let info = write_pt_parts(&out.join(&entry.key), &encoded.parts)?;
            entry.shapes = encoded.shapes;
            entry.bytes = info.bytes;
            entry.sha256 = info.sha256;
            manifest.upsert(entry.clone());
            written.push(entry);
        }
        // Rewritten after every prompt, so an interrupted run keeps a true
        // record of what it finished.
        manifest.write(manifest_path)?;
    }
    Ok(written)
}
