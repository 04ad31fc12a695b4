//! Conversions between the wire messages of a job and the capture engine:
//! a claimed `Job` into the settings and prompts to capture, a written
//! artifact into its `ArtifactRecord`, and durations and timestamps.

use std::time::{Duration, SystemTime};

use capture_proto::DEFAULT_MAX_NEW_TOKENS;
use capture_proto::v1::{
    self, ArtifactRecord, CaptureModeKind, Job, JobStats, decoding, replay_source,
};

use super::error::JobError;
use crate::capture::{CaptureMode, LayerSelection, Sampling};
use crate::manifest::ArtifactEntry;
use crate::prompts::{Prompt, validate_path_component};
use crate::pt::StoreDtype;
use crate::run::CaptureSettings;

/// What a claimed job asks this worker to capture.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct JobPlan {
    /// The prompt set all of the job's prompts belong to.
    pub(crate) set: String,
    pub(crate) prompts: Vec<Prompt>,
    pub(crate) settings: CaptureSettings,
    /// Root of the earlier capture to replay (a store URL or a path
    /// relative to the store).
    pub(crate) replay_root: Option<String>,
}

/// Reads a job's prompts, mode and decoding, checked against a model of
/// `num_layers` layers; every problem is a non-retryable [`JobError::Invalid`].
pub(crate) fn plan_job(job: &Job, num_layers: usize) -> Result<JobPlan, JobError> {
    let (set, prompts) = job_prompts(job)?;
    let mode = capture_mode(job.mode.as_ref(), num_layers)?;
    let (sampling, max_new_tokens, replay_root) = decoding(job.decoding.as_ref())?;
    Ok(JobPlan {
        set,
        prompts,
        settings: CaptureSettings {
            mode,
            max_new_tokens,
            sampling,
            store_dtype: store_dtype(job.store_dtype)?,
            chat_template: job.chat_template,
        },
        replay_root,
    })
}

fn job_prompts(job: &Job) -> Result<(String, Vec<Prompt>), JobError> {
    let first = job
        .prompts
        .first()
        .ok_or_else(|| JobError::Invalid("the job has no prompts".into()))?;
    let set = first.prompt_set.clone();
    validate_path_component("prompt set name", &set)?;
    let prompts = job
        .prompts
        .iter()
        .map(|prompt| {
            if prompt.prompt_set != set {
                return Err(JobError::Invalid(format!(
                    "the job mixes prompt sets {set} and {}: a job holds prompts of one set",
                    prompt.prompt_set
                )));
            }
            validate_path_component("prompt id", &prompt.prompt_id)?;
            Ok(Prompt {
                id: prompt.prompt_id.clone(),
                text: prompt.text.clone(),
                note: None,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((set, prompts))
}

/// The capture mode with its layers resolved against the loaded model
/// (`all_layers` included, whatever the coordinator resolved).
pub(crate) fn capture_mode(
    mode: Option<&v1::CaptureMode>,
    num_layers: usize,
) -> Result<CaptureMode, JobError> {
    let mode = mode.ok_or_else(|| JobError::Invalid("the job has no capture mode".into()))?;
    match CaptureModeKind::try_from(mode.kind) {
        Ok(CaptureModeKind::Residual) => Ok(CaptureMode::Residual),
        Ok(CaptureModeKind::Internals) => {
            let selection = if mode.all_layers {
                LayerSelection::All
            } else if mode.layers.is_empty() {
                return Err(JobError::Invalid(
                    "the job asks for internals of no layer: name layers or all_layers".into(),
                ));
            } else {
                let mut layers: Vec<usize> = mode.layers.iter().map(|&l| l as usize).collect();
                layers.sort_unstable();
                layers.dedup();
                LayerSelection::List(layers)
            };
            let layers = selection.resolve(num_layers).map_err(JobError::Invalid)?;
            Ok(CaptureMode::Internals { layers })
        }
        _ => Err(JobError::Invalid(format!(
            "unsupported capture mode kind {}: use residual or internals",
            mode.kind
        ))),
    }
}

/// Sampling, most new tokens (0 means the default, 50) and replay root.
fn decoding(
    decoding: Option<&v1::Decoding>,
) -> Result<(Sampling, usize, Option<String>), JobError> {
    let Some(decoding) = decoding else {
        return Ok((Sampling::Greedy, DEFAULT_MAX_NEW_TOKENS as usize, None));
    };
    let sampling = match &decoding.strategy {
        None | Some(decoding::Strategy::Greedy(_)) => Sampling::Greedy,
        Some(decoding::Strategy::Sampling(s)) => Sampling::Temperature {
            temperature: s.temperature,
            top_p: s.top_p,
            seed: s.seed,
        },
    };
    sampling.validate().map_err(JobError::Invalid)?;
    let max_new_tokens = match decoding.max_new_tokens {
        0 => DEFAULT_MAX_NEW_TOKENS,
        n => n,
    } as usize;
    let replay_root = match decoding.replay.as_ref().and_then(|r| r.source.as_ref()) {
        None => None,
        Some(replay_source::Source::RootUrl(url)) if !url.trim().is_empty() => {
            Some(url.trim().to_owned())
        }
        Some(replay_source::Source::RootUrl(_)) => {
            return Err(JobError::Invalid(
                "the job's replay root url is empty".into(),
            ));
        }
        Some(replay_source::Source::RunId(run)) => {
            return Err(JobError::Invalid(format!(
                "the job names replay run {run} instead of its root url: the coordinator must resolve it"
            )));
        }
    };
    Ok((sampling, max_new_tokens, replay_root))
}

/// The storage dtype; unspecified means f32.
pub(crate) fn store_dtype(wire: i32) -> Result<StoreDtype, JobError> {
    match v1::StoreDtype::try_from(wire) {
        Ok(v1::StoreDtype::Unspecified | v1::StoreDtype::F32) => Ok(StoreDtype::F32),
        Ok(v1::StoreDtype::F16) => Ok(StoreDtype::F16),
        Ok(v1::StoreDtype::Bf16) => Ok(StoreDtype::BF16),
        Err(_) => Err(JobError::Invalid(format!(
            "unknown store dtype {wire}: use f32, f16 or bf16"
        ))),
    }
}

/// The record `CompleteJob` carries for one uploaded artifact.
pub(crate) fn artifact_record(entry: &ArtifactEntry) -> ArtifactRecord {
    let mode =
        CaptureModeKind::from_short_name(&entry.mode).unwrap_or(CaptureModeKind::Unspecified);
    ArtifactRecord {
        key: entry.key.clone(),
        bytes: entry.bytes,
        sha256: entry.sha256.clone(),
        prompt_set: entry.prompt_set.clone(),
        prompt_id: entry.prompt_id.clone(),
        mode: mode.into(),
        layer: entry.layer.map(saturating_u32),
        prompt_tokens: saturating_u32(entry.prompt_tokens),
        response_tokens: saturating_u32(entry.response_tokens),
        shapes_json: serde_json::to_string(&entry.shapes).expect("shapes serialise"),
    }
}

/// Timings and totals of one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AttemptStats {
    pub(crate) compute: Duration,
    pub(crate) upload: Duration,
    pub(crate) tokens: u64,
    pub(crate) bytes: u64,
    pub(crate) started_at: SystemTime,
    pub(crate) finished_at: SystemTime,
}

impl AttemptStats {
    pub(crate) fn to_proto(self) -> JobStats {
        JobStats {
            compute: proto_duration(self.compute),
            upload: proto_duration(self.upload),
            tokens_captured: self.tokens,
            bytes_written: self.bytes,
            started_at: Some(self.started_at.into()),
            finished_at: Some(self.finished_at.into()),
        }
    }
}

pub(crate) fn proto_duration(duration: Duration) -> Option<capture_proto::prost_types::Duration> {
    capture_proto::prost_types::Duration::try_from(duration).ok()
}

/// A wire duration as a std one; `None` for negative or zero durations.
pub(crate) fn std_duration(duration: capture_proto::prost_types::Duration) -> Option<Duration> {
    Duration::try_from(duration).ok().filter(|d| !d.is_zero())
}

fn saturating_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use capture_proto::v1::{Decoding, Greedy, ReplaySource};

    use super::*;

    fn job() -> Job {
        Job {
            prompts: vec![
                v1::Prompt {
                    prompt_set: "dynamic".into(),
                    prompt_id: "1".into(),
                    text: "Hello".into(),
                },
                v1::Prompt {
                    prompt_set: "dynamic".into(),
                    prompt_id: "2".into(),
                    text: "World".into(),
                },
            ],
            mode: Some(v1::CaptureMode {
                kind: CaptureModeKind::Internals.into(),
                layers: vec![3, 1, 3],
                all_layers: false,
            }),
            ..Default::default()
        }
    }

    fn invalid(result: Result<JobPlan, JobError>) -> String {
        match result {
            Err(JobError::Invalid(message)) => message,
            other => panic!("expected an invalid job, got {other:?}"),
        }
    }

    #[test]
    fn a_job_becomes_capture_settings_with_defaults() {
        let plan = plan_job(&job(), 4).unwrap();
        assert_eq!(plan.set, "dynamic");
        assert_eq!(plan.prompts.len(), 2);
        assert_eq!(plan.prompts[1].id, "2");
        assert_eq!(plan.prompts[1].text, "World");
        assert_eq!(
            plan.settings,
            CaptureSettings {
                mode: CaptureMode::Internals { layers: vec![1, 3] },
                max_new_tokens: 50,
                sampling: Sampling::Greedy,
                store_dtype: StoreDtype::F32,
                chat_template: false,
            }
        );
        assert_eq!(plan.replay_root, None);
    }

    #[test]
    fn decoding_sampling_replay_and_dtype_are_read() {
        let mut job = job();
        job.mode = Some(v1::CaptureMode {
            kind: CaptureModeKind::Internals.into(),
            layers: vec![],
            all_layers: true,
        });
        job.decoding = Some(Decoding {
            strategy: Some(decoding::Strategy::Sampling(v1::Sampling {
                temperature: 0.7,
                top_p: Some(0.9),
                seed: 42,
            })),
            max_new_tokens: 7,
            replay: Some(ReplaySource {
                source: Some(replay_source::Source::RootUrl("exp/run-1/".into())),
            }),
        });
        job.store_dtype = v1::StoreDtype::Bf16.into();
        job.chat_template = true;
        let plan = plan_job(&job, 3).unwrap();
        assert_eq!(
            plan.settings,
            CaptureSettings {
                mode: CaptureMode::Internals {
                    layers: vec![0, 1, 2]
                },
                max_new_tokens: 7,
                sampling: Sampling::Temperature {
                    temperature: 0.7,
                    top_p: Some(0.9),
                    seed: 42
                },
                store_dtype: StoreDtype::BF16,
                chat_template: true,
            }
        );
        assert_eq!(plan.replay_root.as_deref(), Some("exp/run-1/"));

        job.decoding = Some(Decoding {
            strategy: Some(decoding::Strategy::Greedy(Greedy {})),
            ..Default::default()
        });
        job.mode = Some(v1::CaptureMode {
            kind: CaptureModeKind::Residual.into(),
            ..Default::default()
        });
        let plan = plan_job(&job, 3).unwrap();
        assert_eq!(plan.settings.mode, CaptureMode::Residual);
        assert_eq!(plan.settings.sampling, Sampling::Greedy);
    }

    #[test]
    fn invalid_jobs_say_what_is_wrong() {
        let message = invalid(plan_job(&job(), 2));
        assert_eq!(
            message,
            "layer 3 is out of range: the model has 2 layers (0-1)"
        );

        let mut bad = job();
        bad.prompts[1].prompt_set = "baseline".into();
        assert!(invalid(plan_job(&bad, 4)).contains("mixes prompt sets dynamic and baseline"));

        let mut bad = job();
        bad.prompts.clear();
        assert_eq!(invalid(plan_job(&bad, 4)), "the job has no prompts");

        let mut bad = job();
        bad.mode = Some(v1::CaptureMode::default());
        assert!(invalid(plan_job(&bad, 4)).contains("unsupported capture mode kind 0"));

        let mut bad = job();
        bad.store_dtype = 99;
        assert!(invalid(plan_job(&bad, 4)).contains("unknown store dtype 99"));

        let mut bad = job();
        bad.decoding = Some(Decoding {
            strategy: Some(decoding::Strategy::Sampling(v1::Sampling {
                temperature: 0.0,
                top_p: None,
                seed: 1,
            })),
            ..Default::default()
        });
        assert!(invalid(plan_job(&bad, 4)).contains("temperature"));

        let mut bad = job();
        bad.prompts[0].prompt_id = "../x".into();
        let error = plan_job(&bad, 4).unwrap_err();
        assert!(!error.is_retryable());
        assert!(error.to_string().contains("prompt id"), "{error}");
    }

    #[test]
    fn hostile_set_names_and_prompt_ids_never_become_a_plan() {
        for name in crate::store::hostile_names::hostile_names() {
            for (what, set, id) in [("set", name.as_str(), "1"), ("id", "dynamic", &name)] {
                let mut job = job();
                job.prompts[1].prompt_set = set.to_owned();
                job.prompts[1].prompt_id = id.to_owned();
                if what == "set" {
                    job.prompts[0].prompt_set = set.to_owned();
                }
                match plan_job(&job, 4) {
                    Err(error @ JobError::Prompt(_)) => {
                        assert!(!error.is_retryable(), "{what} {name:?}");
                        let message = error.to_string();
                        assert!(message.starts_with("unsafe prompt "), "{message}");
                    }
                    other => panic!("{what} {name:?} was planned: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn artifacts_become_records() {
        let mut shapes = BTreeMap::new();
        shapes.insert(
            "prompt.residual.input".to_owned(),
            serde_json::json!([5, 64]),
        );
        let entry = ArtifactEntry {
            key: "inference/raw/internals/dynamic/1_L3.pt".into(),
            prompt_set: "dynamic".into(),
            prompt_id: "1".into(),
            mode: "internals".into(),
            layer: Some(3),
            bytes: 1234,
            sha256: "ab".repeat(32),
            prompt_tokens: 5,
            response_tokens: 7,
            shapes,
        };
        let record = artifact_record(&entry);
        assert_eq!(
            record,
            ArtifactRecord {
                key: entry.key.clone(),
                bytes: 1234,
                sha256: entry.sha256.clone(),
                prompt_set: "dynamic".into(),
                prompt_id: "1".into(),
                mode: CaptureModeKind::Internals.into(),
                layer: Some(3),
                prompt_tokens: 5,
                response_tokens: 7,
                shapes_json: r#"{"prompt.residual.input":[5,64]}"#.into(),
            }
        );
        let residual = ArtifactEntry {
            mode: "residual".into(),
            layer: None,
            ..entry
        };
        let record = artifact_record(&residual);
        assert_eq!(record.mode, i32::from(CaptureModeKind::Residual));
        assert_eq!(record.layer, None);
    }

    #[test]
    fn durations_round_trip() {
        let wire = proto_duration(Duration::from_millis(1500)).unwrap();
        assert_eq!(std_duration(wire), Some(Duration::from_millis(1500)));
        assert_eq!(std_duration(proto_duration(Duration::ZERO).unwrap()), None);
        let negative = capture_proto::prost_types::Duration {
            seconds: -1,
            nanos: 0,
        };
        assert_eq!(std_duration(negative), None);
    }
}
