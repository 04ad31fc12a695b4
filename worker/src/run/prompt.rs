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
    BatchItem, CaptureMode, LayerTrace, PromptTrace, ResponsePlan, Sampling, TokenTexts,
    capture_batch, internals_artifact, internals_artifact_owned, residual_artifact,
    residual_artifact_owned,
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
/// the capture thread goes straight on to the next batch. Encoding takes the
/// trace when no clone shares it: stored in f32, the prompt's rows become
/// the tensors' data without a copy.
#[derive(Debug, Clone)]
pub struct PromptArtifact {
    /// Path relative to the capture root, e.g. `inference/raw/residual/dynamic/1.pt`.
    pub key: String,
    /// The layer of an internals artifact; `None` for the residual one.
    pub layer: Option<usize>,
    source: Arc<ArtifactSource>,
}

/// What an artifact is assembled from: the prompt's trace (in internals
/// mode, of the artifact's layer only) and texts.
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

    /// [`ArtifactSource::assemble`], taking the trace.
    fn assemble_owned(self, layer: Option<usize>) -> PtValue {
        let (texts, store) = ((&self.prompt, &self.response), self.store);
        match layer {
            None => residual_artifact_owned(self.trace, texts.0, texts.1, store),
            Some(l) => internals_artifact_owned(self.trace, l, texts.0, texts.1, store),
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
    /// the tensors' data moved in rather than copied. Unless another
    /// handle (a clone) shares its trace, the artifact takes the trace's
    /// prompt rows as its tensors' data (stored in f32).
    pub fn encode(self) -> Result<EncodedArtifact> {
        let name = archive_name(Path::new(&self.key));
        let value = match Arc::try_unwrap(self.source) {
            Ok(source) => source.assemble_owned(self.layer),
            Err(shared) => shared.assemble(self.layer),
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
    /// The manifest entry of one of this prompt's artifacts, its file's
    /// size, sha256 and tensor shapes left for the writer or uploader to
    /// fill in (they are known once the artifact is encoded and sent).
    pub fn entry(&self, artifact: &PromptArtifact) -> ArtifactEntry {
        ArtifactEntry {
            key: artifact.key.clone(),
            prompt_set: self.set.clone(),
            prompt_id: self.prompt_id.clone(),
            mode: self.mode.into(),
            layer: artifact.layer,
            bytes: 0,
            sha256: String::new(),
            prompt_tokens: self.prompt_tokens,
            response_tokens: self.response_tokens,
            shapes: BTreeMap::new(),
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
    let store = settings.store_dtype;
    let artifacts = match &settings.mode {
        CaptureMode::Residual => vec![PromptArtifact {
            key: residual_key(&item.set, &item.prompt.id),
            layer: None,
            source: Arc::new(ArtifactSource {
                trace,
                prompt,
                response,
                store,
            }),
        }],
        // A trace per layer: each artifact can take its own when encoded.
        CaptureMode::Internals { layers: chosen } => {
            let PromptTrace {
                prompt_ids,
                response_ids,
                layers,
            } = trace;
            let mut traced: Vec<Option<LayerTrace>> = layers.into_iter().map(Some).collect();
            chosen
                .iter()
                .map(|&l| {
                    traced
                        .iter_mut()
                        .find_map(|t| t.take_if(|t| t.layer == l))
                        .expect("requested layers are traced (once)")
                })
                .map(|layer| PromptArtifact {
                    key: internals_key(&item.set, &item.prompt.id, layer.layer),
                    layer: Some(layer.layer),
                    source: Arc::new(ArtifactSource {
                        trace: PromptTrace {
                            prompt_ids: prompt_ids.clone(),
                            response_ids: response_ids.clone(),
                            layers: vec![layer],
                        },
                        prompt: prompt.clone(),
                        response: response.clone(),
                        store,
                    }),
                })
                .collect()
        }
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

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;
    use crate::capture::batch_tests::tiny_on;

    /// Every artifact of a captured prompt holds its trace alone (internals:
    /// one layer each), so encoding takes it, and the file is the one
    /// encoding from a shared trace writes.
    #[test]
    fn each_artifact_owns_its_trace_and_encodes_the_same_file() {
        let (meta, model) = tiny_on(&Device::Cpu, DType::F32);
        let prompts = [Prompt {
            id: "1".into(),
            text: "Each artifact its own trace.".into(),
            note: None,
        }];
        for (mode, layers) in [
            (CaptureMode::Residual, vec![None]),
            (
                CaptureMode::Internals { layers: vec![0, 2] },
                vec![Some(0), Some(2)],
            ),
        ] {
            let settings = CaptureSettings {
                mode,
                max_new_tokens: 3,
                sampling: Sampling::Greedy,
                store_dtype: StoreDtype::F32,
                chat_template: false,
            };
            let prepared = prepare_prompts(&meta, &settings, "s", &prompts, None).unwrap();
            let mut captured =
                capture_prepared_batch(&meta, &model, &settings, &prepared, &mut |_| {}).unwrap();
            let artifacts = std::mem::take(&mut captured[0].artifacts);
            assert_eq!(
                artifacts.iter().map(|a| a.layer).collect::<Vec<_>>(),
                layers
            );
            for artifact in artifacts {
                assert_eq!(Arc::strong_count(&artifact.source), 1, "{}", artifact.key);
                // A clone shares the trace: it assembles from it by reference.
                let shared = artifact.clone().encode().unwrap();
                let owned = artifact.encode().unwrap();
                assert_eq!(owned.shapes, shared.shapes);
                assert_eq!(owned.parts.sha256(), shared.parts.sha256());
                assert_eq!(owned.parts.len(), shared.parts.len());
            }
        }
    }
}
