//! `worker capture`: validate every input, load the model once, capture each
//! prompt and write its artifacts and the manifest under the output root.
//!
//! The per-prompt steps (`prompt.rs`: chat template, tokens, context check,
//! capture, artifacts; `replay.rs`: the replayed response and its checks)
//! are shared with the pulling worker (`crate::pull`).

mod batch;
mod prompt;
mod replay;
mod writer;

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::DType;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::capture::{CaptureMode, LayerSelection, Sampling};
use crate::error::{CaptureError, Result};
use crate::loader::{DeviceArg, ModelMeta, dtype_name};
use crate::manifest::{ArtifactEntry, Manifest, ModelIdentity};
use crate::model_files::ModelSource;
use crate::prompts::PromptSet;
use crate::pt::StoreDtype;
use writer::ArtifactWriter;

pub use batch::{
    AUTO_MAX, BatchSize, RunLengths, SequenceCost, auto_batch_size, free_device_memory,
    host_available_memory, peak_resident_memory, sequence_cost,
};
pub use prompt::{
    CaptureSettings, CapturedPrompt, PreparedPrompt, PromptArtifact, batch_size_for,
    capture_prepared, capture_prepared_batch, prepare_prompts,
};
pub use replay::{ReplayDir, ReplaySource, first_internals_file, internals_dir, nothing_to_replay};

/// The chat template applied with `--chat-template`.
pub const CHAT_TEMPLATE: &str =
    "<start_of_turn>user\n{prompt}<end_of_turn>\n<start_of_turn>model\n";

/// Where the prompts come from.
#[derive(Debug, Clone)]
pub enum PromptSource {
    Set(String),
    File(PathBuf),
    Text(String),
}

impl PromptSource {
    pub fn load(&self) -> Result<PromptSet> {
        Ok(match self {
            PromptSource::Set(name) => PromptSet::builtin(name)?,
            PromptSource::File(path) => PromptSet::from_file(path)?,
            PromptSource::Text(text) => PromptSet::single(text)?,
        })
    }
}

/// Everything `worker capture` needs.
#[derive(Debug, Clone)]
pub struct CaptureOptions {
    pub model: ModelSource,
    pub prompts: PromptSource,
    /// `residual` or `internals`.
    pub mode: String,
    pub layers: LayerSelection,
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    pub replay: Option<PathBuf>,
    pub store_dtype: StoreDtype,
    pub chat_template: bool,
    pub device: DeviceArg,
    pub compute_dtype: Option<DType>,
    /// Prompts per forward pass.
    pub batch_size: BatchSize,
    pub out: PathBuf,
    pub progress: bool,
}

/// What a finished capture wrote.
#[derive(Debug, Clone)]
pub struct CaptureSummary {
    pub prompt_set: String,
    pub artifacts: Vec<ArtifactEntry>,
    pub generated_tokens: usize,
    pub seconds: f64,
    pub manifest_path: PathBuf,
    /// Prompts per forward pass (resolved from `auto`).
    pub batch_size: usize,
    /// Peak resident memory of the process, when the OS reports it.
    pub peak_memory_bytes: Option<u64>,
}

/// Relative key of a residual artifact.
pub fn residual_key(set: &str, id: &str) -> String {
    format!("inference/raw/residual/{set}/{id}.pt")
}

/// Relative key of an internals artifact.
pub fn internals_key(set: &str, id: &str, layer: usize) -> String {
    format!("inference/raw/internals/{set}/{id}_L{layer}.pt")
}

/// Runs a whole capture. Every input is checked before the weights are read
/// and before anything is written.
pub fn run_capture(options: &CaptureOptions) -> Result<CaptureSummary> {
    options
        .sampling
        .validate()
        .map_err(CaptureError::InvalidArgument)?;
    if options.max_new_tokens == 0 {
        return Err(CaptureError::InvalidArgument(
            "--max-new-tokens must be at least 1".into(),
        ));
    }
    let set = options.prompts.load()?;
    let meta = ModelMeta::load(&options.model)?;
    let num_layers = meta.config.num_hidden_layers;
    let mode = match options.mode.as_str() {
        "residual" => CaptureMode::Residual,
        "internals" => CaptureMode::Internals {
            layers: options
                .layers
                .resolve(num_layers)
                .map_err(CaptureError::InvalidArgument)?,
        },
        other => {
            return Err(CaptureError::InvalidArgument(format!(
                "unknown mode \"{other}\": use residual or internals"
            )));
        }
    };
    let settings = CaptureSettings {
        mode,
        max_new_tokens: options.max_new_tokens,
        sampling: options.sampling.clone(),
        store_dtype: options.store_dtype,
        chat_template: options.chat_template,
    };
    let replay = options.replay.clone().map(ReplayDir);
    let prepared = prepare_prompts(
        &meta,
        &settings,
        &set.name,
        &set.prompts,
        replay.as_ref().map(|r| r as &dyn ReplaySource),
    )?;
    let device = options.device.open()?;
    let compute_dtype = options
        .compute_dtype
        .unwrap_or_else(|| options.device.default_dtype());

    let identity = ModelIdentity {
        id: meta.files.model_id.clone(),
        revision: meta.files.revision.clone(),
        config_sha256: meta.files.config_sha256.clone(),
        tokenizer_sha256: meta.files.tokenizer_sha256.clone(),
        compute_dtype: dtype_name(compute_dtype).into(),
    };
    let parameters = json!({
        "max_new_tokens": options.max_new_tokens,
        "sampling": options.sampling,
        "eos_token_ids": meta.eos_ids,
        "store_dtype": options.store_dtype,
        "replay": options.replay.as_ref().map(|p| p.display().to_string()),
        "chat_template": options.chat_template.then_some(CHAT_TEMPLATE),
        "device": options.device.to_string(),
    });
    let manifest_path = options.out.join("manifest.json");
    let manifest = existing_manifest(&manifest_path, &identity, &parameters)?
        .unwrap_or_else(|| Manifest::new(identity, parameters));

    let model = meta.load_model(&device, compute_dtype)?;
    // The writer thread assembles and encodes one artifact at a time.
    let batch_size = batch_size_for(options.batch_size, &meta, &model, &settings, &prepared, 1);
    let progress = progress_bar(options.progress, prepared.len());
    let started = Instant::now();
    let mut generated = 0usize;
    // Encoding, hashing and writing run on their own thread while the next
    // batch computes; at most one batch waits for it.
    let writer = ArtifactWriter::start(
        options.out.clone(),
        manifest,
        manifest_path.clone(),
        batch_size,
    );
    // On a capture error, what earlier batches captured is still written
    // and recorded in the manifest before the error is returned; a writer
    // error stops the capture.
    let computed: Result<()> = 'capture: {
        for batch in prepared.chunks(batch_size) {
            let first = &batch[0].prompt.id;
            progress.set_message(match batch.len() {
                1 => format!("prompt {first}"),
                n => format!("prompts {first}.. ({n} per batch)"),
            });
            let mut on_token = |_| {
                generated += 1;
                let rate = generated as f64 / started.elapsed().as_secs_f64().max(1e-9);
                progress.set_message(format!("batch of {} · {rate:.2} tok/s", batch.len()));
            };
            let captured =
                match capture_prepared_batch(&meta, &model, &settings, batch, &mut on_token) {
                    Ok(captured) => captured,
                    Err(error) => break 'capture Err(error),
                };
            for prompt in captured {
                if !writer.send(prompt) {
                    break 'capture Ok(());
                }
                progress.inc(1);
            }
        }
        Ok(())
    };
    let written = writer.finish();
    computed?;
    let written = written?;
    progress.finish_and_clear();
    Ok(CaptureSummary {
        prompt_set: set.name,
        artifacts: written,
        generated_tokens: generated,
        seconds: started.elapsed().as_secs_f64(),
        manifest_path,
        batch_size,
        peak_memory_bytes: peak_resident_memory(),
    })
}

/// An earlier manifest in the same output root is extended only if it was
/// made by the same model with the same parameters.
fn existing_manifest(
    path: &Path,
    identity: &ModelIdentity,
    parameters: &serde_json::Value,
) -> Result<Option<Manifest>> {
    if !path.exists() {
        return Ok(None);
    }
    let manifest = Manifest::read(path)?;
    let mut differences = Vec::new();
    if &manifest.model != identity {
        differences.push("model".to_string());
    }
    if let (Some(old), Some(new)) = (manifest.parameters.as_object(), parameters.as_object()) {
        let keys: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
        differences.extend(
            keys.into_iter()
                .filter(|k| old.get(*k) != new.get(*k))
                .cloned(),
        );
    } else if &manifest.parameters != parameters {
        differences.push("parameters".to_string());
    }
    if !differences.is_empty() {
        return Err(CaptureError::InvalidArgument(format!(
            "{} holds a capture made with other settings ({}): choose a new --out directory",
            path.display(),
            differences.join(", ")
        )));
    }
    Ok(Some(manifest))
}

fn progress_bar(enabled: bool, prompts: usize) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(prompts as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} prompts · {msg}",
        )
        .expect("a valid progress template"),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}
