//! Turning a submitted `RunSpec` into a run and its jobs: every input is
//! checked before anything is written (unknown or malformed prompt sets,
//! unsafe names, layers the model does not have, a model the coordinator
//! cannot read, bad decoding parameters), then each prompt set x capture
//! mode is split into jobs of at most `shard_size` prompts with deterministic
//! keys `{set}/{mode}/{shard:05}`.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use capture_proto::CaptureServiceError;
use capture_proto::v1 as pb;
use capture_worker::capture::Sampling;
use capture_worker::model::Gemma2Config;
use capture_worker::model_files::{ModelSource, resolve_model_config};
use capture_worker::prompts::{PromptSet, validate_path_component};
use capture_worker::pt::StoreDtype;

use crate::queue::{
    CaptureMode, DecodingSpec, JobPayload, JobPrompt, ModelRef, NewJob, NewRun, RunId, RunSpec,
};

/// The model runs use when the spec names none.
pub const DEFAULT_MODEL_ID: &str = "google/gemma-2-2b-it";
/// Experiment name used when the spec names none.
pub const DEFAULT_EXPERIMENT: &str = "default";
const MAX_SHARD_SIZE: u32 = 1_000;
const MAX_NEW_TOKENS: u32 = 8_192;
const MAX_JOBS: usize = 100_000;

type Result<T> = std::result::Result<T, CaptureServiceError>;

fn invalid(message: impl Into<String>) -> CaptureServiceError {
    CaptureServiceError::InvalidArgument(message.into())
}

/// What the coordinator knows about a model: enough to check layer lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    pub model: ModelRef,
    pub num_layers: u32,
}

/// Reads (and remembers) models' `config.json`, from a local directory or
/// the hub, so submissions can be checked against the model they name.
#[derive(Debug, Default)]
pub struct ModelCatalog {
    known: Mutex<HashMap<(String, String), ModelInfo>>,
}

impl ModelCatalog {
    /// The model's identity as workers advertise it and its layer count.
    /// `FailedPrecondition` when its configuration cannot be read.
    pub async fn resolve(&self, id: &str, revision: &str) -> Result<ModelInfo> {
        let id = if id.is_empty() { DEFAULT_MODEL_ID } else { id };
        let cache_key = (id.to_owned(), revision.to_owned());
        if let Some(info) = self.known.lock().expect("catalog lock").get(&cache_key) {
            return Ok(info.clone());
        }
        let source = ModelSource {
            spec: id.to_owned(),
            revision: (!revision.is_empty()).then(|| revision.to_owned()),
        };
        let unusable = |reason: String| {
            CaptureServiceError::FailedPrecondition(format!(
                "model {id:?} cannot be used by this run: {reason}"
            ))
        };
        let resolved = tokio::task::spawn_blocking(move || -> std::result::Result<_, String> {
            let file = resolve_model_config(&source).map_err(|e| e.to_string())?;
            let json = std::fs::read_to_string(&file.config_json)
                .map_err(|e| format!("cannot read {}: {e}", file.config_json.display()))?;
            let config = Gemma2Config::from_json(&json, &file.config_json.display().to_string())?;
            Ok((file.model_id, config.num_hidden_layers))
        })
        .await
        .map_err(|e| CaptureServiceError::Internal(format!("model lookup task failed: {e}")))?
        .map_err(unusable)?;
        let info = ModelInfo {
            model: ModelRef {
                id: resolved.0,
                revision: revision.to_owned(),
            },
            num_layers: u32::try_from(resolved.1).unwrap_or(u32::MAX),
        };
        self.known
            .lock()
            .expect("catalog lock")
            .insert(cache_key, info.clone());
        Ok(info)
    }
}

/// A checked run, ready for `JobQueue::create_run`.
#[derive(Debug, Clone)]
pub struct PlannedRun {
    pub run: NewRun,
    pub jobs: Vec<NewJob>,
}

/// Checks `spec` against `model` and splits it into jobs. `replay_root` is
/// the resolved root URL of the replayed capture, when the spec replays.
pub fn plan_run(
    spec: &pb::RunSpec,
    model: &ModelInfo,
    replay_root: Option<String>,
) -> Result<PlannedRun> {
    let experiment = if spec.experiment.is_empty() {
        DEFAULT_EXPERIMENT
    } else {
        spec.experiment.as_str()
    };
    validate_path_component("experiment name", experiment).map_err(|e| invalid(e.to_string()))?;
    let sets = prompt_sets(&spec.prompt_sets)?;
    let modes = capture_modes(&spec.modes, model.num_layers)?;
    let decoding = decoding(spec.decoding.as_ref(), spec.chat_template, replay_root)?;
    let store_dtype = store_dtype(spec.store_dtype)?;
    let shard_size = match spec.shard_size {
        0 => capture_proto::DEFAULT_SHARD_SIZE,
        n if n > MAX_SHARD_SIZE => {
            return Err(invalid(format!(
                "shard size {n} is too large: use at most {MAX_SHARD_SIZE} prompts per job"
            )));
        }
        n => n,
    };

    let mut jobs = Vec::new();
    for set in &sets {
        for mode in &modes {
            for (index, shard) in set.prompts.chunks(shard_size as usize).enumerate() {
                jobs.push(NewJob {
                    key: format!("{}/{}/{index:05}", set.name, mode.name()),
                    payload: JobPayload {
                        prompt_set: set.name.clone(),
                        prompts: shard
                            .iter()
                            .map(|p| JobPrompt {
                                id: p.id.clone(),
                                text: p.text.clone(),
                            })
                            .collect(),
                        mode: mode.clone(),
                    },
                });
            }
        }
    }
    if jobs.len() > MAX_JOBS {
        return Err(invalid(format!(
            "the run would have {} jobs; at most {MAX_JOBS} are allowed: raise --shard-size or split the run",
            jobs.len()
        )));
    }
    let run_spec = RunSpec {
        experiment: experiment.to_owned(),
        model: model.model.clone(),
        prompt_sets: sets.iter().map(|s| s.name.clone()).collect(),
        modes,
        decoding,
        store_dtype: store_dtype.as_str().to_owned(),
        shard_size,
    };
    Ok(PlannedRun {
        run: NewRun {
            id: RunId::new_time_ordered(),
            spec: run_spec,
        },
        jobs,
    })
}

fn prompt_sets(sources: &[pb::PromptSetSource]) -> Result<Vec<PromptSet>> {
    if sources.is_empty() {
        return Err(invalid(
            "a run needs at least one prompt set: pass --prompt-set NAME or --prompt-file FILE",
        ));
    }
    let mut names = BTreeSet::new();
    let mut sets = Vec::with_capacity(sources.len());
    for source in sources {
        let set = match &source.source {
            Some(pb::prompt_set_source::Source::Builtin(name)) => {
                PromptSet::builtin(name).map_err(|e| invalid(e.to_string()))?
            }
            Some(pb::prompt_set_source::Source::File(file)) => {
                validate_path_component("prompt set name", &file.name)
                    .map_err(|e| invalid(e.to_string()))?;
                let json = std::str::from_utf8(&file.json).map_err(|e| {
                    invalid(format!("prompt file {:?} is not UTF-8: {e}", file.name))
                })?;
                PromptSet::from_json_str(&file.name, json, &format!("prompt file {}", file.name))
                    .map_err(|e| invalid(e.to_string()))?
            }
            None => {
                return Err(invalid(
                    "a prompt set names neither a built-in set nor a file",
                ));
            }
        };
        if !names.insert(set.name.clone()) {
            return Err(invalid(format!(
                "prompt set {:?} appears twice in the run: its artifacts would collide",
                set.name
            )));
        }
        sets.push(set);
    }
    Ok(sets)
}

fn capture_modes(modes: &[pb::CaptureMode], num_layers: u32) -> Result<Vec<CaptureMode>> {
    if modes.is_empty() {
        return Err(invalid(
            "a run needs at least one capture mode: residual, internals or both",
        ));
    }
    let mut out: Vec<CaptureMode> = Vec::with_capacity(modes.len());
    for mode in modes {
        let kind = pb::CaptureModeKind::try_from(mode.kind)
            .map_err(|_| invalid(format!("unknown capture mode kind {}", mode.kind)))?;
        let converted = match kind {
            pb::CaptureModeKind::Unspecified => {
                return Err(invalid(
                    "a capture mode has no kind: use residual or internals",
                ));
            }
            pb::CaptureModeKind::Residual => CaptureMode::Residual,
            pb::CaptureModeKind::Internals => CaptureMode::Internals {
                layers: layer_list(mode, num_layers)?,
            },
        };
        if out.iter().any(|m| m.name() == converted.name()) {
            return Err(invalid(format!(
                "capture mode {} is given twice",
                converted.name()
            )));
        }
        out.push(converted);
    }
    Ok(out)
}

fn layer_list(mode: &pb::CaptureMode, num_layers: u32) -> Result<Vec<u32>> {
    if mode.all_layers {
        if !mode.layers.is_empty() {
            return Err(invalid(
                "internals mode gives both all layers and a layer list: give one",
            ));
        }
        return Ok((0..num_layers).collect());
    }
    if mode.layers.is_empty() {
        return Err(invalid(
            "internals mode needs layers: --layers all or a list such as 0,6,12",
        ));
    }
    let mut layers = mode.layers.clone();
    layers.sort_unstable();
    if let Some(pair) = layers.windows(2).find(|w| w[0] == w[1]) {
        return Err(invalid(format!("layer {} is listed twice", pair[0])));
    }
    if let Some(&bad) = layers.iter().find(|&&l| l >= num_layers) {
        return Err(invalid(format!(
            "layer {bad} is out of range: the model has {num_layers} layers (0..={})",
            num_layers.saturating_sub(1)
        )));
    }
    Ok(layers)
}

fn decoding(
    decoding: Option<&pb::Decoding>,
    chat_template: bool,
    replay: Option<String>,
) -> Result<DecodingSpec> {
    let default = pb::Decoding::default();
    let decoding = decoding.unwrap_or(&default);
    let max_new_tokens = match decoding.max_new_tokens {
        0 => capture_proto::DEFAULT_MAX_NEW_TOKENS,
        n if n > MAX_NEW_TOKENS => {
            return Err(invalid(format!(
                "max new tokens {n} is too large: use at most {MAX_NEW_TOKENS}"
            )));
        }
        n => n,
    };
    let (temperature, top_p, seed) = match &decoding.strategy {
        None | Some(pb::decoding::Strategy::Greedy(_)) => (None, None, None),
        Some(pb::decoding::Strategy::Sampling(s)) => {
            Sampling::Temperature {
                temperature: s.temperature,
                top_p: s.top_p,
                seed: s.seed,
            }
            .validate()
            .map_err(invalid)?;
            (Some(s.temperature), s.top_p, Some(s.seed))
        }
    };
    Ok(DecodingSpec {
        max_new_tokens,
        temperature,
        top_p,
        seed,
        chat_template,
        replay,
    })
}

fn store_dtype(value: i32) -> Result<StoreDtype> {
    match pb::StoreDtype::try_from(value) {
        Ok(pb::StoreDtype::Unspecified | pb::StoreDtype::F32) => Ok(StoreDtype::F32),
        Ok(pb::StoreDtype::F16) => Ok(StoreDtype::F16),
        Ok(pb::StoreDtype::Bf16) => Ok(StoreDtype::BF16),
        Err(_) => Err(invalid(format!("unknown store dtype {value}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> ModelInfo {
        ModelInfo {
            model: ModelRef {
                id: "m".into(),
                revision: String::new(),
            },
            num_layers: 4,
        }
    }

    fn builtin(name: &str) -> pb::PromptSetSource {
        pb::PromptSetSource {
            source: Some(pb::prompt_set_source::Source::Builtin(name.into())),
        }
    }

    fn mode(kind: pb::CaptureModeKind, layers: Vec<u32>, all: bool) -> pb::CaptureMode {
        pb::CaptureMode {
            kind: kind as i32,
            layers,
            all_layers: all,
        }
    }

    fn spec() -> pb::RunSpec {
        pb::RunSpec {
            experiment: "exp".into(),
            prompt_sets: vec![builtin("dynamic"), builtin("adversarial")],
            modes: vec![
                mode(pb::CaptureModeKind::Residual, vec![], false),
                mode(pb::CaptureModeKind::Internals, vec![], true),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn splits_sets_times_modes_into_shards_with_stable_keys() {
        let planned = plan_run(&spec(), &model(), None).unwrap();
        let dynamic = PromptSet::builtin("dynamic").unwrap().prompts.len();
        let adversarial = PromptSet::builtin("adversarial").unwrap().prompts.len();
        let shards = |n: usize| n.div_ceil(4);
        assert_eq!(
            planned.jobs.len(),
            2 * (shards(dynamic) + shards(adversarial))
        );
        assert_eq!(planned.jobs[0].key, "dynamic/residual/00000");
        assert!(planned.jobs.iter().all(|j| j.payload.prompts.len() <= 4));
        let internals = planned
            .jobs
            .iter()
            .find(|j| j.key.starts_with("dynamic/internals"))
            .unwrap();
        assert_eq!(
            internals.payload.mode,
            CaptureMode::Internals {
                layers: vec![0, 1, 2, 3]
            }
        );
        let again = plan_run(&spec(), &model(), None).unwrap();
        let keys = |p: &PlannedRun| p.jobs.iter().map(|j| j.key.clone()).collect::<Vec<_>>();
        assert_eq!(keys(&planned), keys(&again));
        assert_eq!(planned.run.spec.shard_size, 4);
        assert_eq!(planned.run.spec.decoding.max_new_tokens, 50);
    }

    /// Names that must never become a path part of an artifact key.
    fn hostile_names() -> Vec<String> {
        let mut names: Vec<String> = [
            ".",
            "..",
            "../x",
            "a/../../b",
            "./a",
            "/etc/passwd",
            "C:\\x",
            "\\\\server\\share",
            "a/b",
            "a\0b",
            "a\u{1}b",
            "a\nb",
            "\u{7f}",
            "",
            " ",
            " \t\n",
            "a\u{202e}b",
            "\u{ff0e}\u{ff0e}",
            "a\u{200b}b",
            "%2e%2e",
            "..%2f..",
            "a:b",
            "~",
        ]
        .map(str::to_owned)
        .to_vec();
        names.push("a".repeat(300));
        names.push("a".repeat(5000));
        names
    }

    fn prompt_file(name: &str, json: serde_json::Value) -> pb::PromptSetSource {
        pb::PromptSetSource {
            source: Some(pb::prompt_set_source::Source::File(pb::PromptFile {
                name: name.into(),
                json: json.to_string().into_bytes(),
            })),
        }
    }

    #[test]
    fn hostile_names_in_a_run_spec_are_refused() {
        let refused = |spec: pb::RunSpec, what: &str, name: &str| {
            let err = plan_run(&spec, &model(), None).unwrap_err();
            assert!(
                matches!(err, CaptureServiceError::InvalidArgument(_)),
                "{what} {name:?}: {err:?}"
            );
            let message = err.to_string();
            assert!(
                message.contains(&format!("unsafe {what}")),
                "{what} {name:?}: {message}"
            );
        };
        let fine = serde_json::json!({ "prompts": [{ "id": 1, "text": "hello" }] });
        for name in hostile_names() {
            if !name.is_empty() {
                // An empty experiment means the default one.
                let mut s = spec();
                s.experiment = name.clone();
                refused(s, "experiment name", &name);
            }
            let mut s = spec();
            s.prompt_sets = vec![prompt_file(&name, fine.clone())];
            refused(s, "prompt set name", &name);
            // Ids inside a prompt file become file names too: the first,
            // a later one, and one given as a JSON string of digits-and-more.
            for prompts in [
                serde_json::json!([{ "id": name, "text": "hello" }]),
                serde_json::json!([
                    { "id": 1, "text": "hello" },
                    { "id": "two", "text": "hello" },
                    { "id": name, "text": "hello" },
                ]),
            ] {
                let mut s = spec();
                s.prompt_sets = vec![
                    builtin("dynamic"),
                    prompt_file("mine", serde_json::json!({ "prompts": prompts })),
                ];
                refused(s, "prompt id", &name);
            }
        }
        // The same file with safe names is planned, so the refusals above
        // are about the names alone.
        let mut s = spec();
        s.prompt_sets = vec![prompt_file("mine", fine)];
        let planned = plan_run(&s, &model(), None).unwrap();
        assert_eq!(planned.jobs[0].payload.prompts[0].id, "1");
    }

    #[test]
    fn refuses_bad_input_with_clear_messages() {
        let check = |spec: pb::RunSpec, needle: &str| {
            let err = plan_run(&spec, &model(), None).unwrap_err();
            assert!(err.to_string().contains(needle), "{err} lacks {needle:?}");
        };
        let mut s = spec();
        s.prompt_sets = vec![builtin("nope")];
        check(s, "nope");
        let mut s = spec();
        s.experiment = "../x".into();
        check(s, "experiment name");
        let mut s = spec();
        s.modes = vec![mode(pb::CaptureModeKind::Internals, vec![7], false)];
        check(s, "layer 7 is out of range");
        let mut s = spec();
        s.prompt_sets = vec![pb::PromptSetSource {
            source: Some(pb::prompt_set_source::Source::File(pb::PromptFile {
                name: "../evil".into(),
                json: b"{}".to_vec(),
            })),
        }];
        check(s, "prompt set name");
        let mut s = spec();
        s.prompt_sets = vec![pb::PromptSetSource {
            source: Some(pb::prompt_set_source::Source::File(pb::PromptFile {
                name: "mine".into(),
                json: b"{\"prompts\": [".to_vec(),
            })),
        }];
        check(s, "mine");
        let mut s = spec();
        s.prompt_sets = vec![builtin("dynamic"), builtin("dynamic")];
        check(s, "twice");
        let mut s = spec();
        s.decoding = Some(pb::Decoding {
            strategy: Some(pb::decoding::Strategy::Sampling(pb::Sampling {
                temperature: -1.0,
                top_p: None,
                seed: 1,
            })),
            ..Default::default()
        });
        check(s, "temperature");
    }
}
