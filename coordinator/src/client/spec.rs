//! `coordinator submit`'s flags turned into the wire `RunSpec`: prompt sets
//! and files, capture modes with their layers, decoding, model and storage.
//!
//! Only what the command line alone can tell is checked here (a prompt file
//! that cannot be read, `--layers` without internals, a temperature that is
//! not positive); the coordinator validates the rest of the spec and refuses
//! it as a whole.

use std::path::Path;

use anyhow::{Context as _, bail, ensure};
use capture_proto::RunId;
use capture_proto::v1::{
    CaptureMode, CaptureModeKind, Decoding, Greedy, PromptFile, PromptSetSource, ReplaySource,
    RunSpec, Sampling, StoreDtype, decoding, prompt_set_source, replay_source,
};

use super::args::{LayersArg, ModeArg, StoreDtypeArg, SubmitArgs};

/// The run `args` describe, with every `--prompt-file` read into the spec.
///
/// A `--model` that names an existing local directory is sent as its
/// canonical absolute path, the name workers and the coordinator know a
/// local checkpoint by; anything else is sent as given (a hub id).
pub fn run_spec(args: &SubmitArgs) -> anyhow::Result<RunSpec> {
    let mut prompt_sets: Vec<PromptSetSource> = args
        .prompt_set
        .iter()
        .map(|name| PromptSetSource {
            source: Some(prompt_set_source::Source::Builtin(name.trim().to_owned())),
        })
        .collect();
    for path in &args.prompt_file {
        prompt_sets.push(PromptSetSource {
            source: Some(prompt_set_source::Source::File(read_prompt_file(path)?)),
        });
    }
    ensure!(
        !prompt_sets.is_empty(),
        "no prompts: pass --prompt-set NAME or --prompt-file FILE"
    );
    Ok(RunSpec {
        experiment: args.experiment.clone(),
        prompt_sets,
        modes: capture_modes(args.mode, args.layers.as_ref())?,
        decoding: Some(decoding_of(args)?),
        model_id: model_id(&args.model)?,
        model_revision: args.revision.clone().unwrap_or_default(),
        store_dtype: store_dtype(args.store_dtype) as i32,
        shard_size: args.shard_size,
        chat_template: args.chat_template,
    })
}

/// The capture modes of `--mode` with the layers of `--layers` (default
/// all) on the internals one.
fn capture_modes(mode: ModeArg, layers: Option<&LayersArg>) -> anyhow::Result<Vec<CaptureMode>> {
    if mode == ModeArg::Residual && layers.is_some() {
        bail!(
            "--layers selects the layers of internals captures: add --mode internals or --mode both"
        );
    }
    let residual = CaptureMode {
        kind: CaptureModeKind::Residual as i32,
        layers: Vec::new(),
        all_layers: false,
    };
    let internals = match layers.unwrap_or(&LayersArg::All) {
        LayersArg::All => CaptureMode {
            kind: CaptureModeKind::Internals as i32,
            layers: Vec::new(),
            all_layers: true,
        },
        LayersArg::List(layers) => CaptureMode {
            kind: CaptureModeKind::Internals as i32,
            layers: layers.clone(),
            all_layers: false,
        },
    };
    Ok(match mode {
        ModeArg::Residual => vec![residual],
        ModeArg::Internals => vec![internals],
        ModeArg::Both => vec![residual, internals],
    })
}

fn decoding_of(args: &SubmitArgs) -> anyhow::Result<Decoding> {
    let strategy = match args.temperature {
        None => decoding::Strategy::Greedy(Greedy {}),
        Some(temperature) => {
            ensure!(
                temperature.is_finite() && temperature > 0.0,
                "--temperature must be a positive number, got {temperature} (leave it out for greedy decoding)"
            );
            if let Some(top_p) = args.top_p {
                ensure!(
                    top_p > 0.0 && top_p <= 1.0,
                    "--top-p must be above 0 and at most 1, got {top_p}"
                );
            }
            let seed = args
                .seed
                .context("--temperature needs --seed, so that the run can be reproduced")?;
            decoding::Strategy::Sampling(Sampling {
                temperature,
                top_p: args.top_p,
                seed,
            })
        }
    };
    Ok(Decoding {
        strategy: Some(strategy),
        max_new_tokens: args.max_new_tokens,
        replay: args.replay.as_deref().map(replay_source).transpose()?,
    })
}

/// `--replay`: a UUID is a run of the coordinator, anything else the root
/// URL of an earlier capture.
fn replay_source(text: &str) -> anyhow::Result<ReplaySource> {
    let text = text.trim();
    ensure!(
        !text.is_empty(),
        "--replay is empty: give a run id or the root URL of an earlier capture"
    );
    let source = match RunId::parse_wire(text) {
        Ok(run_id) => replay_source::Source::RunId(run_id.to_wire()),
        Err(_) => replay_source::Source::RootUrl(text.to_owned()),
    };
    Ok(ReplaySource {
        source: Some(source),
    })
}

fn store_dtype(arg: StoreDtypeArg) -> StoreDtype {
    match arg {
        StoreDtypeArg::F32 => StoreDtype::F32,
        StoreDtypeArg::F16 => StoreDtype::F16,
        StoreDtypeArg::Bf16 => StoreDtype::Bf16,
    }
}

/// A local checkpoint directory as its canonical absolute path; a hub id
/// unchanged.
fn model_id(spec: &str) -> anyhow::Result<String> {
    let path = Path::new(spec);
    if !path.is_dir() {
        ensure!(
            !spec.trim().is_empty(),
            "--model is empty: give a hub id or a checkpoint directory"
        );
        return Ok(spec.to_owned());
    }
    let canonical = path
        .canonicalize()
        .with_context(|| format!("resolving the model directory {spec}"))?;
    canonical.to_str().map(str::to_owned).with_context(|| {
        format!(
            "the model directory {} is not valid UTF-8",
            canonical.display()
        )
    })
}

/// A `--prompt-file`, read here and sent as bytes; the coordinator checks
/// its JSON. The set is named by the file stem.
fn read_prompt_file(path: &Path) -> anyhow::Result<PromptFile> {
    let name = path
        .file_stem()
        .and_then(|stem| stem.to_str())
        .unwrap_or_default();
    let valid_name = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    ensure!(
        valid_name,
        "prompt file {}: its file stem {name:?} names the prompt set in artifact paths and may only \
         hold letters, digits, '_' and '-'; rename the file",
        path.display()
    );
    let json = std::fs::read(path)
        .with_context(|| format!("cannot read prompt file {}", path.display()))?;
    Ok(PromptFile {
        name: name.to_owned(),
        json,
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: SubmitArgs,
    }

    fn parse(flags: &[&str]) -> SubmitArgs {
        let argv = std::iter::once("submit").chain(flags.iter().copied());
        Wrapper::try_parse_from(argv).unwrap().args
    }

    fn spec(flags: &[&str]) -> RunSpec {
        run_spec(&parse(flags)).unwrap()
    }

    fn spec_error(flags: &[&str]) -> String {
        format!("{:#}", run_spec(&parse(flags)).unwrap_err())
    }

    fn builtin(name: &str) -> PromptSetSource {
        PromptSetSource {
            source: Some(prompt_set_source::Source::Builtin(name.into())),
        }
    }

    fn kinds(spec: &RunSpec) -> Vec<CaptureModeKind> {
        spec.modes.iter().map(|mode| mode.kind()).collect()
    }

    #[test]
    fn defaults_describe_a_greedy_residual_run_of_gemma() {
        let spec = spec(&["--prompt-set", "dynamic"]);
        assert_eq!(
            spec,
            RunSpec {
                experiment: "default".into(),
                prompt_sets: vec![builtin("dynamic")],
                modes: vec![CaptureMode {
                    kind: CaptureModeKind::Residual as i32,
                    layers: vec![],
                    all_layers: false,
                }],
                decoding: Some(Decoding {
                    strategy: Some(decoding::Strategy::Greedy(Greedy {})),
                    max_new_tokens: 50,
                    replay: None,
                }),
                model_id: "google/gemma-2-2b-it".into(),
                model_revision: String::new(),
                store_dtype: StoreDtype::F32 as i32,
                shard_size: 4,
                chat_template: false,
            }
        );
    }

    #[test]
    fn modes_and_layers() {
        let internals = spec(&["--prompt-set", "a", "--mode", "internals"]);
        assert_eq!(kinds(&internals), [CaptureModeKind::Internals]);
        assert!(internals.modes[0].all_layers && internals.modes[0].layers.is_empty());

        let listed = spec(&[
            "--prompt-set",
            "a",
            "--mode",
            "internals",
            "--layers",
            "12,0,5",
        ]);
        assert_eq!(listed.modes[0].layers, [0, 5, 12]);
        assert!(!listed.modes[0].all_layers);

        let both = spec(&["--prompt-set", "a", "--mode", "both", "--layers", "all"]);
        assert_eq!(
            kinds(&both),
            [CaptureModeKind::Residual, CaptureModeKind::Internals]
        );
        assert!(both.modes[1].all_layers);

        let error = spec_error(&["--prompt-set", "a", "--layers", "3"]);
        assert!(error.contains("--mode internals"), "{error}");
    }

    #[test]
    fn bad_layers_are_a_parse_error() {
        let error = Wrapper::try_parse_from([
            "submit",
            "--prompt-set",
            "a",
            "--mode",
            "internals",
            "--layers",
            "1,x",
        ])
        .unwrap_err()
        .to_string();
        assert!(error.contains("invalid layer \"x\" in \"1,x\""), "{error}");
    }

    #[test]
    fn prompt_sets_and_files_are_both_sent() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("my-set_2.json");
        std::fs::write(&file, br#"{"name":"x","prompts":[]}"#).unwrap();
        let spec = spec(&[
            "--prompt-set",
            "adversarial",
            "--prompt-file",
            file.to_str().unwrap(),
            "--prompt-set",
            "dynamic",
        ]);
        assert_eq!(
            spec.prompt_sets,
            [
                builtin("adversarial"),
                builtin("dynamic"),
                PromptSetSource {
                    source: Some(prompt_set_source::Source::File(PromptFile {
                        name: "my-set_2".into(),
                        json: br#"{"name":"x","prompts":[]}"#.to_vec(),
                    })),
                },
            ]
        );
    }

    #[test]
    fn prompt_file_problems_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.json");
        let error = spec_error(&["--prompt-file", missing.to_str().unwrap()]);
        assert!(error.starts_with("cannot read prompt file "), "{error}");
        assert!(error.contains("missing.json"), "{error}");

        let spaced = dir.path().join("my set.json");
        std::fs::write(&spaced, b"{}").unwrap();
        let error = spec_error(&["--prompt-file", spaced.to_str().unwrap()]);
        assert!(error.contains("\"my set\""), "{error}");
        assert!(error.contains("rename the file"), "{error}");
    }

    #[test]
    fn some_prompt_source_is_required() {
        let error = Wrapper::try_parse_from(["submit"]).unwrap_err();
        assert_eq!(
            error.kind(),
            clap::error::ErrorKind::MissingRequiredArgument
        );
    }

    #[test]
    fn sampling_and_decoding_flags() {
        let spec = spec(&[
            "--prompt-set",
            "a",
            "--temperature",
            "0.7",
            "--top-p",
            "0.9",
            "--seed",
            "42",
            "--max-new-tokens",
            "7",
            "--store-dtype",
            "bf16",
            "--chat-template",
            "--shard-size",
            "2",
            "--experiment",
            "exp1",
            "--revision",
            "main",
        ]);
        let decoding = spec.decoding.clone().unwrap();
        assert_eq!(
            decoding.strategy,
            Some(decoding::Strategy::Sampling(Sampling {
                temperature: 0.7,
                top_p: Some(0.9),
                seed: 42,
            }))
        );
        assert_eq!(decoding.max_new_tokens, 7);
        assert_eq!(spec.store_dtype(), StoreDtype::Bf16);
        assert!(spec.chat_template);
        assert_eq!(spec.shard_size, 2);
        assert_eq!(spec.experiment, "exp1");
        assert_eq!(spec.model_revision, "main");

        assert!(
            Wrapper::try_parse_from(["submit", "--prompt-set", "a", "--temperature", "1"]).is_err()
        );
        assert!(
            Wrapper::try_parse_from([
                "submit",
                "--prompt-set",
                "a",
                "--greedy",
                "--temperature",
                "1",
                "--seed",
                "1"
            ])
            .is_err()
        );
        let error = spec_error(&["--prompt-set", "a", "--temperature", "0", "--seed", "1"]);
        assert!(
            error.contains("--temperature must be a positive number"),
            "{error}"
        );
        let error = spec_error(&[
            "--prompt-set",
            "a",
            "--temperature",
            "1",
            "--top-p",
            "1.5",
            "--seed",
            "1",
        ]);
        assert!(error.contains("--top-p"), "{error}");
        assert!(
            Wrapper::try_parse_from(["submit", "--prompt-set", "a", "--max-new-tokens", "0"])
                .is_err()
        );
    }

    #[test]
    fn replay_takes_a_run_id_or_a_url() {
        let run = RunId::new();
        let upper = run.to_wire().to_uppercase();
        let by_id = spec(&["--prompt-set", "a", "--replay", &upper]);
        assert_eq!(
            by_id.decoding.unwrap().replay.unwrap().source,
            Some(replay_source::Source::RunId(run.to_wire()))
        );
        let by_url = spec(&[
            "--prompt-set",
            "a",
            "--replay",
            "s3://bucket/captures/exp/run/",
        ]);
        assert_eq!(
            by_url.decoding.unwrap().replay.unwrap().source,
            Some(replay_source::Source::RootUrl(
                "s3://bucket/captures/exp/run/".into()
            ))
        );
        let error = spec_error(&["--prompt-set", "a", "--replay", " "]);
        assert!(error.contains("--replay is empty"), "{error}");
    }

    #[test]
    fn local_model_directories_are_sent_as_canonical_paths() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("tiny")).unwrap();
        let indirect = dir.path().join("tiny/../tiny");
        let spec = spec(&["--prompt-set", "a", "--model", indirect.to_str().unwrap()]);
        let expected = dir.path().join("tiny").canonicalize().unwrap();
        assert_eq!(spec.model_id, expected.to_str().unwrap());
        assert!(Path::new(&spec.model_id).is_absolute());

        let hub = self::spec(&["--prompt-set", "a", "--model", "google/gemma-2-9b-it"]);
        assert_eq!(hub.model_id, "google/gemma-2-9b-it");
    }
}
