//! `worker capture`: validate every input, load the model once, capture each
//! prompt and write its artifacts and the manifest under the output root.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::DType;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::capture::{
    CaptureMode, LayerSelection, ResponsePlan, Sampling, TokenTexts, capture_prompt,
    internals_artifact, residual_artifact,
};
use crate::error::{CaptureError, Result};
use crate::loader::{DeviceArg, ModelMeta, dtype_name};
use crate::manifest::{ArtifactEntry, Manifest, ModelIdentity, tensor_shapes};
use crate::model_files::ModelSource;
use crate::prompts::{Prompt, PromptSet};
use crate::pt::{PtValue, StoreDtype, read_pt_file, write_pt_file};

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
    pub out: PathBuf,
    pub progress: bool,
}

/// A prompt ready to run: validated, tokenized, with its replay tokens.
#[derive(Debug)]
struct PreparedPrompt {
    prompt: Prompt,
    ids: Vec<u32>,
    replay: Option<Vec<u32>>,
}

/// What a finished capture wrote.
#[derive(Debug, Clone)]
pub struct CaptureSummary {
    pub prompt_set: String,
    pub artifacts: Vec<ArtifactEntry>,
    pub generated_tokens: usize,
    pub seconds: f64,
    pub manifest_path: PathBuf,
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
    let prepared = prepare_prompts(options, &set, &meta)?;
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
    let mut manifest = existing_manifest(&manifest_path, &identity, &parameters)?
        .unwrap_or_else(|| Manifest::new(identity, parameters));

    let model = meta.load_model(&device, compute_dtype)?;
    let request = mode.request(num_layers);
    let progress = progress_bar(options.progress, prepared.len());
    let started = Instant::now();
    let mut generated = 0usize;
    let mut written = Vec::new();
    for item in &prepared {
        progress.set_message(format!("prompt {}", item.prompt.id));
        let prompt_key = format!("{}/{}", set.name, item.prompt.id);
        let plan = match &item.replay {
            Some(ids) => ResponsePlan::Replay(ids),
            None => ResponsePlan::Generate {
                sampling: &options.sampling,
                max_new_tokens: options.max_new_tokens,
                eos_ids: &meta.eos_ids,
                prompt_key: &prompt_key,
            },
        };
        let mut on_token = || {
            generated += 1;
            let rate = generated as f64 / started.elapsed().as_secs_f64().max(1e-9);
            progress.set_message(format!("prompt {} · {rate:.2} tok/s", item.prompt.id));
        };
        let trace = capture_prompt(&model, &item.ids, &request, plan, &mut on_token)?;
        let prompt_texts = TokenTexts {
            text: item.prompt.text.clone(),
            tokens: meta.tokenizer.token_strings(&trace.prompt_ids)?,
            token_ids: trace.prompt_ids.clone(),
        };
        let response_texts = TokenTexts {
            text: meta.tokenizer.text(&trace.response_ids)?,
            tokens: meta.tokenizer.token_strings(&trace.response_ids)?,
            token_ids: trace.response_ids.clone(),
        };
        let artifacts: Vec<(String, Option<usize>, PtValue)> = match &mode {
            CaptureMode::Residual => vec![(
                residual_key(&set.name, &item.prompt.id),
                None,
                residual_artifact(&trace, &prompt_texts, &response_texts, options.store_dtype),
            )],
            CaptureMode::Internals { layers } => layers
                .iter()
                .map(|&l| {
                    let layer = trace.layer(l).expect("requested layers are traced");
                    (
                        internals_key(&set.name, &item.prompt.id, l),
                        Some(l),
                        internals_artifact(
                            &trace,
                            layer,
                            &prompt_texts,
                            &response_texts,
                            options.store_dtype,
                        ),
                    )
                })
                .collect(),
        };
        for (key, layer, value) in artifacts {
            let info = write_pt_file(&options.out.join(&key), &value)?;
            let entry = ArtifactEntry {
                key,
                prompt_set: set.name.clone(),
                prompt_id: item.prompt.id.clone(),
                mode: mode.name().into(),
                layer,
                bytes: info.bytes,
                sha256: info.sha256,
                prompt_tokens: trace.prompt_ids.len(),
                response_tokens: trace.response_ids.len(),
                shapes: tensor_shapes(&value),
            };
            manifest.upsert(entry.clone());
            written.push(entry);
        }
        // Rewritten after every prompt, so an interrupted run keeps a true
        // record of what it finished.
        manifest.write(&manifest_path)?;
        progress.inc(1);
    }
    progress.finish_and_clear();
    Ok(CaptureSummary {
        prompt_set: set.name,
        artifacts: written,
        generated_tokens: generated,
        seconds: started.elapsed().as_secs_f64(),
        manifest_path,
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

fn prepare_prompts(
    options: &CaptureOptions,
    set: &PromptSet,
    meta: &ModelMeta,
) -> Result<Vec<PreparedPrompt>> {
    let limit = meta.config.max_position_embeddings;
    set.prompts
        .iter()
        .map(|prompt| {
            let text = if options.chat_template {
                CHAT_TEMPLATE.replace("{prompt}", &prompt.text)
            } else {
                prompt.text.clone()
            };
            let ids = meta.tokenizer.encode_prompt(&text)?;
            let replay = match &options.replay {
                Some(dir) => Some(replay_ids(dir, &set.name, prompt, &ids)?),
                None => None,
            };
            let steps = replay.as_ref().map_or(options.max_new_tokens, Vec::len);
            // The last step's pass holds N + steps - 1 tokens.
            if ids.len() + steps - 1 > limit {
                return Err(CaptureError::InvalidArgument(format!(
                    "prompt {} of set {} has {} tokens; with {steps} new tokens it exceeds the model's context of {limit} positions: shorten it or lower --max-new-tokens",
                    prompt.id,
                    set.name,
                    ids.len()
                )));
            }
            Ok(PreparedPrompt {
                prompt: prompt.clone(),
                ids,
                replay,
            })
        })
        .collect()
}

/// Response ids of the same prompt in an earlier capture under `dir`.
fn replay_ids(dir: &Path, set: &str, prompt: &Prompt, prompt_ids: &[u32]) -> Result<Vec<u32>> {
    let residual = dir.join(residual_key(set, &prompt.id));
    let internals_dir = dir.join("inference/raw/internals").join(set);
    let prefix = format!("{}_L", prompt.id);
    let candidate = if residual.is_file() {
        Some(residual.clone())
    } else {
        std::fs::read_dir(&internals_dir).ok().and_then(|entries| {
            let mut found: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .and_then(|n| n.strip_prefix(&prefix))
                        .and_then(|rest| rest.strip_suffix(".pt"))
                        .is_some_and(|layer| layer.parse::<usize>().is_ok())
                })
                .collect();
            found.sort();
            found.into_iter().next()
        })
    };
    let path = candidate.ok_or_else(|| {
        CaptureError::InvalidArgument(format!(
            "nothing to replay for prompt {} of set {set}: neither {} nor {}/{prefix}*.pt exists",
            prompt.id,
            residual.display(),
            internals_dir.display()
        ))
    })?;
    let value = read_pt_file(&path)?;
    let ids_at = |section: &str| -> Result<Vec<u32>> {
        value
            .get(section)
            .and_then(|s| s.get("token_ids"))
            .and_then(PtValue::as_list)
            .and_then(|items| {
                items
                    .iter()
                    .map(|v| v.as_int().and_then(|i| u32::try_from(i).ok()))
                    .collect::<Option<Vec<u32>>>()
            })
            .ok_or_else(|| {
                CaptureError::InvalidArgument(format!(
                    "{} has no {section}.token_ids list: is it a capture artifact?",
                    path.display()
                ))
            })
    };
    if ids_at("prompt")? != prompt_ids {
        return Err(CaptureError::InvalidArgument(format!(
            "{} was captured on other prompt tokens than prompt {} here (another prompt text, tokenizer or chat template): replay needs the same prompt tokens",
            path.display(),
            prompt.id
        )));
    }
    let response = ids_at("response")?;
    if response.is_empty() {
        return Err(CaptureError::InvalidArgument(format!(
            "{} has an empty response to replay",
            path.display()
        )));
    }
    Ok(response)
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
