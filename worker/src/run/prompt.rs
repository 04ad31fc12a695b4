//! One prompt of a capture, shared by `worker capture` and the pulling
//! worker: preparing it (chat template, tokens, replayed response, context
//! check), capturing it with an already loaded model, and describing the
//! artifacts it yields.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use super::batch::{BatchSize, RunLengths};
use super::replay::{ReplaySource, replay_ids};
use super::{CHAT_TEMPLATE, internals_key, residual_key};
use crate::capture::{
    BatchItem, CaptureMode, PromptTrace, ResponsePlan, Sampling, TokenTexts, capture_batch,
    internals_artifact, residual_artifact, residual_artifact_owned,
};
use crate::error::{CaptureError, Result};
use crate::loader::ModelMeta;
use crate::manifest::{ArtifactEntry, tensor_shapes};
use crate::model::Gemma2;
use crate::prompts::Prompt;
use crate::pt::{PtParts, PtValue, StoreDtype, archive_name, encode_pt_parts};

/// What every prompt of one capture shares.
#[derive(Debug, Clone, PartialEq)]
pub struct CaptureSettings {
    /// Residual, or internals of resolved (checked) layers.
    pub mode: CaptureMode,
    /// Most response tokens per prompt (at least 1).
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    pub store_dtype: StoreDtype,
    /// Wrap each prompt in [`CHAT_TEMPLATE`].
    pub chat_template: bool,
}

/// A prompt ready to run: validated, tokenized, with its replay tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedPrompt {
    /// Name of the prompt's set, as in artifact paths.
    pub set: String,
    pub prompt: Prompt,
    /// `<bos>` and the prompt's tokens (after the chat template, if any).
    pub ids: Vec<u32>,
    /// The response to capture on instead of generating one.
    pub replay: Option<Vec<u32>>,
}

/// One artifact of a captured prompt, before it is encoded. It holds the
/// prompt's trace, not its tensors: they are assembled when it is encoded
/// ([`PromptArtifact::encode`]), on the thread that writes or uploads it, so
/// the capture thread goes straight on to the next batch (assembling copies
/// every recorded value once more: about 5 ms per residual prompt of 50
/// positions, measured with `worker bench`).
#[derive(Debug, Clone)]
pub struct PromptArtifact {
    /// Path relative to the capture root, e.g. `inference/raw/residual/dynamic/1.pt`.
    pub key: String,
    /// The layer of an internals artifact; `None` for the residual one.
    pub layer: Option<usize>,
    source: Arc<ArtifactSource>,
}

/// What a prompt's artifacts are assembled from (shared by the artifacts of
/// the layers of one internals capture).
#[derive(Debug)]
struct ArtifactSource {
    trace: PromptTrace,
    prompt: TokenTexts,
    response: TokenTexts,
    store: StoreDtype,
}

impl ArtifactSource {
    /// The residual artifact (`layer` `None`) or one layer's internals.
    fn assemble(&self, layer: Option<usize>) -> PtValue {
        let ArtifactSource {
            trace,
            prompt,
            response,
            store,
        } = self;
        match layer {
            None => residual_artifact(trace, prompt, response, *store),
            Some(l) => {
                let layer = trace.layer(l).expect("requested layers are traced");
                internals_artifact(trace, layer, prompt, response, *store)
            }
        }
    }
}

/// An artifact's `.pt` file, in parts (its large tensors' buffers as they
/// were assembled), and the tensor shapes of its manifest entry.
#[derive(Debug)]
pub struct EncodedArtifact {
    pub parts: PtParts,
    pub shapes: BTreeMap<String, serde_json::Value>,
}

impl PromptArtifact {
    /// The artifact's value, assembled from the prompt's trace.
    pub fn assemble(&self) -> PtValue {
        self.source.assemble(self.layer)
    }

    /// Assembles the value and encodes it: the `.pt` file's bytes, exactly
    /// as [`crate::pt::write_pt_file`] writes them at `{root}/{key}`, with
    /// the tensors' data moved in rather than copied. The residual
    /// artifact, once no other handle shares its trace, takes the trace's
    /// prompt rows as its tensors' data (stored in f32).
    pub fn encode(self) -> Result<EncodedArtifact> {
        let name = archive_name(Path::new(&self.key));
        let value = match (self.layer, Arc::try_unwrap(self.source)) {
            (None, Ok(source)) => residual_artifact_owned(
                source.trace,
                &source.prompt,
                &source.response,
                source.store,
            ),
            (layer, Ok(source)) => source.assemble(layer),
            (layer, Err(shared)) => shared.assemble(layer),
        };
        let shapes = tensor_shapes(&value);
        Ok(EncodedArtifact {
            parts: encode_pt_parts(value, &name)?,
            shapes,
        })
    }
}

/// What capturing one prompt yielded.
#[derive(Debug, Clone)]
pub struct CapturedPrompt {
    pub set: String,
    pub prompt_id: String,
    /// `residual` or `internals`.
    pub mode: &'static str,
    pub prompt_tokens: usize,
    pub response_tokens: usize,
    /// One artifact in residual mode, one per layer in internals mode.
    pub artifacts: Vec<PromptArtifact>,
}

impl CapturedPrompt {
    /// The manifest entry of one of this prompt's artifacts, once its file
    /// (`bytes` long, with this sha256 and these tensor shapes) is written.
    pub fn entry(
        &self,
        artifact: &PromptArtifact,
        shapes: BTreeMap<String, serde_json::Value>,
        bytes: u64,
        sha256: String,
    ) -> ArtifactEntry {
        ArtifactEntry {
            key: artifact.key.clone(),
            prompt_set: self.set.clone(),
            prompt_id: self.prompt_id.clone(),
            mode: self.mode.into(),
            layer: artifact.layer,
            bytes,
            sha256,
            prompt_tokens: self.prompt_tokens,
            response_tokens: self.response_tokens,
            shapes,
        }
    }
}

/// Prepares every prompt of `set` before any work starts: the chat template,
/// tokens, the replayed response when `replay` is given, and a check that
/// the longest pass fits the model's context.
pub fn prepare_prompts(
    meta: &ModelMeta,
    settings: &CaptureSettings,
    set: &str,
    prompts: &[Prompt],
    replay: Option<&dyn ReplaySource>,
) -> Result<Vec<PreparedPrompt>> {
    let limit = meta.config.max_position_embeddings;
    prompts
        .iter()
        .map(|prompt| {
            let text = if settings.chat_template {
                CHAT_TEMPLATE.replace("{prompt}", &prompt.text)
            } else {
                prompt.text.clone()
            };
            let ids = meta.tokenizer.encode_prompt(&text)?;
            let replay = match replay {
                Some(source) => Some(replay_ids(source, set, prompt, &ids)?),
                None => None,
            };
            let steps = replay.as_ref().map_or(settings.max_new_tokens, Vec::len);
            // The last step's pass holds N + steps - 1 tokens.
            if ids.len() + steps - 1 > limit {
                return Err(CaptureError::InvalidArgument(format!(
                    "prompt {} of set {set} has {} tokens; with {steps} new tokens it exceeds the model's context of {limit} positions: shorten it or lower --max-new-tokens",
                    prompt.id,
                    ids.len()
                )));
            }
            Ok(PreparedPrompt {
                set: set.to_owned(),
                prompt: prompt.clone(),
                ids,
                replay,
            })
        })
        .collect()
}

/// Prompts per batch for `prepared` on `model`: `batch` resolved against
/// the longest prompt and response (see [`BatchSize::resolve`]), never
/// more than there are prompts.
pub fn batch_size_for(
    batch: BatchSize,
    meta: &ModelMeta,
    model: &Gemma2,
    settings: &CaptureSettings,
    prepared: &[PreparedPrompt],
    encoders: usize,
) -> usize {
    batch
        .resolve(
            &meta.config,
            &settings.mode,
            longest_lengths(prepared, settings),
            model.dtype(),
            model.device(),
            encoders,
        )
        .min(prepared.len().max(1))
}

/// The longest prompt and the longest response of these prompts (a bound
/// for every pass's context and every artifact; the last response token is
/// never fed back, but counting it keeps the estimate on the safe side).
fn longest_lengths(prepared: &[PreparedPrompt], settings: &CaptureSettings) -> RunLengths {
    let longest =
        |length: &dyn Fn(&PreparedPrompt) -> usize| prepared.iter().map(length).max().unwrap_or(0);
    RunLengths {
        prompt: longest(&|p| p.ids.len()).max(1),
        response: longest(&|p| p.replay.as_ref().map_or(settings.max_new_tokens, Vec::len)),
    }
}

/// Captures one prepared prompt with a loaded model and builds its
/// artifacts; `on_token` runs after every response token.
pub fn capture_prepared(
    meta: &ModelMeta,
    model: &Gemma2,
    settings: &CaptureSettings,
    item: &PreparedPrompt,
    on_token: &mut dyn FnMut(),
) -> Result<CapturedPrompt> {
    let mut captured = capture_prepared_batch(
        meta,
        model,
        settings,
        std::slice::from_ref(item),
        &mut |_| on_token(),
    )?;
    Ok(captured.remove(0))
}

/// Captures prepared prompts in one batch (shared forward passes, see
/// [`capture_batch`]) and builds each one's artifacts, in the order given;
/// `on_token` gets the index of the prompt of every response token.
pub fn capture_prepared_batch(
    meta: &ModelMeta,
    model: &Gemma2,
    settings: &CaptureSettings,
    items: &[PreparedPrompt],
    on_token: &mut dyn FnMut(usize),
) -> Result<Vec<CapturedPrompt>> {
    let keys: Vec<String> = items
        .iter()
        .map(|item| format!("{}/{}", item.set, item.prompt.id))
        .collect();
    let batch: Vec<BatchItem<'_>> = items
        .iter()
        .zip(&keys)
        .map(|(item, prompt_key)| BatchItem {
            prompt_ids: &item.ids,
            plan: match &item.replay {
                Some(ids) => ResponsePlan::Replay(ids),
                None => ResponsePlan::Generate {
                    sampling: &settings.sampling,
                    max_new_tokens: settings.max_new_tokens,
                    eos_ids: &meta.eos_ids,
                    prompt_key,
                },
            },
        })
        .collect();
    let request = settings.mode.request(meta.config.num_hidden_layers);
    let traces = capture_batch(model, &batch, &request, on_token)?;
    items
        .iter()
        .zip(traces)
        .map(|(item, trace)| captured_prompt(meta, settings, item, trace))
        .collect()
}

/// The artifacts of one prompt's trace, assembled when encoded.
fn captured_prompt(
    meta: &ModelMeta,
    settings: &CaptureSettings,
    item: &PreparedPrompt,
    trace: PromptTrace,
) -> Result<CapturedPrompt> {
    let prompt = TokenTexts {
        text: item.prompt.text.clone(),
        tokens: meta.tokenizer.token_strings(&trace.prompt_ids)?,
        token_ids: trace.prompt_ids.clone(),
    };
    let response = TokenTexts {
        text: meta.tokenizer.text(&trace.response_ids)?,
        tokens: meta.tokenizer.token_strings(&trace.response_ids)?,
        token_ids: trace.response_ids.clone(),
    };
    let (prompt_tokens, response_tokens) = (trace.prompt_ids.len(), trace.response_ids.len());
    let source = Arc::new(ArtifactSource {
        trace,
        prompt,
        response,
        store: settings.store_dtype,
    });
    let artifact = |key: String, layer: Option<usize>| PromptArtifact {
        key,
        layer,
        source: Arc::clone(&source),
    };
    let artifacts = match &settings.mode {
        CaptureMode::Residual => vec![artifact(residual_key(&item.set, &item.prompt.id), None)],
        CaptureMode::Internals { layers } => layers
            .iter()
            .map(|&l| artifact(internals_key(&item.set, &item.prompt.id, l), Some(l)))
            .collect(),
    };
    Ok(CapturedPrompt {
        set: item.set.clone(),
        prompt_id: item.prompt.id.clone(),
        mode: settings.mode.name(),
        prompt_tokens,
        response_tokens,
        artifacts,
    })
}
