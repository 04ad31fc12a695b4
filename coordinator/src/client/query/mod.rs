//! `coordinator query ...`: the query service's commands. Each loads what
//! it needs locally (trait vectors from files, trees or store URLs), calls
//! the coordinator's `QueryService` (or the embedded one) and writes JSON,
//! CSV, `.npy` or PNG.

pub mod args;
pub mod backend;
pub mod output;
pub mod plots;

use std::process::ExitCode;

use anyhow::Context as _;
use capture_proto::v1 as pb;
use indicatif::{ProgressBar, ProgressStyle};

pub use args::{
    ArtifactsQueryArgs, CompareArgs, DynamicsArgs, FormatArg, ProjectArgs, QueryCommand,
    QueryConnection, RunsQueryArgs, TensorArgs, VectorArgs,
};
pub use backend::QueryBackend;
pub use output::npy_bytes;

use self::args::{ModeFilter, PhaseArg, RunFilterArgs, SublayerArg, TensorFormat};
use self::backend::next_reply;
use self::output::{
    CompareView, Csv, DynamicsView, ProjectView, PromptProjectionView, ReadView, emit, phase_name,
    sublayer_name, tensor_json, write_atomic,
};
use crate::client::render::{RunView, RunsView, to_json};
use crate::query::vectors::{TraitVector, VectorRequest, VectorSource, load_vectors};

/// Runs one `coordinator query` command.
pub async fn query_command(command: &QueryCommand) -> anyhow::Result<ExitCode> {
    match command {
        QueryCommand::Runs(args) => runs(args).await,
        QueryCommand::Artifacts(args) => artifacts(args).await,
        QueryCommand::Project(args) => project(args).await,
        QueryCommand::Dynamics(args) => dynamics(args).await,
        QueryCommand::Compare(args) => compare(args).await,
        QueryCommand::Tensor(args) => tensor(args).await,
    }
}

fn mode_kind(mode: Option<ModeFilter>) -> i32 {
    match mode {
        Some(ModeFilter::Residual) => pb::CaptureModeKind::Residual as i32,
        Some(ModeFilter::Internals) => pb::CaptureModeKind::Internals as i32,
        None => pb::CaptureModeKind::Unspecified as i32,
    }
}

fn timestamp(time: chrono::DateTime<chrono::Utc>) -> capture_proto::prost_types::Timestamp {
    capture_proto::prost_types::Timestamp {
        seconds: time.timestamp(),
        nanos: i32::try_from(time.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

fn run_query(filter: &RunFilterArgs) -> pb::RunQuery {
    pb::RunQuery {
        experiment: filter.experiment.clone().unwrap_or_default(),
        prompt_set: filter.prompt_set.clone().unwrap_or_default(),
        mode: mode_kind(filter.mode),
        model_id: filter.model.clone().unwrap_or_default(),
        model_revision: filter.revision.clone().unwrap_or_default(),
        created_after: filter.since.map(timestamp),
        created_before: filter.until.map(timestamp),
        state: filter.state.map_or(pb::RunState::Unspecified, Into::into) as i32,
        limit: filter.limit,
    }
}

async fn runs(args: &RunsQueryArgs) -> anyhow::Result<ExitCode> {
    let mut backend = QueryBackend::open(&args.connection, "query runs").await?;
    let response = backend
        .query_runs(pb::QueryRunsRequest {
            filter: Some(run_query(&args.filter)),
        })
        .await?;
    let views: Vec<RunView> = response
        .runs
        .iter()
        .map(|r| RunView::new(r, false))
        .collect();
    let text = match args.output.format {
        FormatArg::Json => to_json(&RunsView { runs: views }),
        FormatArg::Csv => {
            let mut csv = Csv::new(&[
                "run_id",
                "state",
                "experiment",
                "model_id",
                "model_revision",
                "prompt_sets",
                "modes",
                "jobs_total",
                "jobs_succeeded",
                "jobs_dead",
                "artifacts",
                "tokens_captured",
                "created_at",
                "finished_at",
                "artifact_root",
            ]);
            for (run, view) in response.runs.iter().zip(views) {
                let sets = run
                    .spec
                    .as_ref()
                    .map(|s| {
                        s.prompt_sets
                            .iter()
                            .map(|p| match &p.source {
                                Some(pb::prompt_set_source::Source::Builtin(name)) => name.clone(),
                                Some(pb::prompt_set_source::Source::File(file)) => {
                                    file.name.clone()
                                }
                                None => String::new(),
                            })
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
                    .unwrap_or_default();
                csv.row([
                    view.run_id,
                    view.state.to_owned(),
                    view.experiment,
                    view.model_id,
                    view.model_revision,
                    sets,
                    view.modes.join(" "),
                    view.jobs.total.to_string(),
                    view.jobs.succeeded.to_string(),
                    view.jobs.dead.to_string(),
                    run.artifacts_written.to_string(),
                    view.tokens_captured.to_string(),
                    view.created_at.unwrap_or_default(),
                    view.finished_at.unwrap_or_default(),
                    view.artifact_root,
                ]);
            }
            csv.into_string()
        }
    };
    emit(args.output.output.as_deref(), &text)?;
    Ok(ExitCode::SUCCESS)
}

async fn artifacts(args: &ArtifactsQueryArgs) -> anyhow::Result<ExitCode> {
    let mut backend = QueryBackend::open(&args.connection, "query artifacts").await?;
    let response = backend
        .query_artifacts(pb::QueryArtifactsRequest {
            runs: Some(run_query(&args.filter)),
            run_id: args.run.clone().unwrap_or_default(),
            prompt_set: if args.run.is_some() {
                args.filter.prompt_set.clone().unwrap_or_default()
            } else {
                String::new()
            },
            mode: mode_kind(args.filter.mode),
            prompt_id: args.prompt_id.clone().unwrap_or_default(),
            layer: args.layer,
            limit: args.max_artifacts,
        })
        .await?;
    let rows: Vec<serde_json::Value> = response
        .artifacts
        .iter()
        .map(|a| {
            let record = a.artifact.clone().unwrap_or_default();
            serde_json::json!({
                "run_id": a.run_id,
                "experiment": a.experiment,
                "key": record.key,
                "url": a.url,
                "prompt_set": record.prompt_set,
                "prompt_id": record.prompt_id,
                "mode": match record.mode() {
                    pb::CaptureModeKind::Residual => "residual",
                    pb::CaptureModeKind::Internals => "internals",
                    pb::CaptureModeKind::Unspecified => "",
                },
                "layer": record.layer,
                "bytes": record.bytes,
                "sha256": record.sha256,
                "prompt_tokens": record.prompt_tokens,
                "response_tokens": record.response_tokens,
                "created_at": a.created_at.as_ref().map(crate::client::render::rfc3339),
            })
        })
        .collect();
    if response.truncated {
        eprintln!(
            "showing the first {} artifacts: raise --max-artifacts for more",
            rows.len()
        );
    }
    let text = match args.output.format {
        FormatArg::Json => to_json(&serde_json::json!({
            "artifacts": rows,
            "truncated": response.truncated,
        })),
        FormatArg::Csv => {
            const COLUMNS: [&str; 13] = [
                "run_id",
                "experiment",
                "key",
                "url",
                "prompt_set",
                "prompt_id",
                "mode",
                "layer",
                "bytes",
                "sha256",
                "prompt_tokens",
                "response_tokens",
                "created_at",
            ];
            let mut csv = Csv::new(&COLUMNS);
            for row in &rows {
                csv.row(COLUMNS.iter().map(|c| match &row[*c] {
                    serde_json::Value::Null => String::new(),
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                }));
            }
            csv.into_string()
        }
    };
    emit(args.output.output.as_deref(), &text)?;
    Ok(ExitCode::SUCCESS)
}

/// Loads the vectors the flags name, for `layers` (empty: all available).
async fn vectors(args: &VectorArgs, layers: &[u32]) -> anyhow::Result<Vec<pb::TraitVector>> {
    let request = VectorRequest {
        sources: args
            .vectors
            .iter()
            .map(|v| VectorSource::guess(v))
            .collect(),
        traits: args.traits.clone(),
        method: args.method.clone(),
        layers: layers.iter().map(|&l| l as usize).collect(),
        experiment: args.vector_experiment.clone(),
        files_for_every_layer: args.every_layer,
    };
    // The vector errors' messages already carry their causes: flattened
    // here so that `{:#}` does not print each cause twice.
    let loaded = load_vectors(&request)
        .await
        .map_err(|error| anyhow::anyhow!("loading the trait vectors: {error}"))?;
    if loaded.is_empty() {
        let mut filters = Vec::new();
        if let Some(method) = &args.method {
            filters.push(format!("--method {method}"));
        }
        if !layers.is_empty() {
            let layers: Vec<String> = layers.iter().map(u32::to_string).collect();
            filters.push(format!("layers {}", layers.join(",")));
        }
        anyhow::bail!(
            "loading the trait vectors: no vector in {} matches {}",
            args.vectors.join(", "),
            if filters.is_empty() {
                "the request".to_owned()
            } else {
                filters.join(" and ")
            }
        );
    }
    Ok(loaded.into_iter().map(wire_vector).collect())
}

fn wire_vector(vector: TraitVector) -> pb::TraitVector {
    pb::TraitVector {
        trait_name: vector.trait_name,
        layer: vector.layer.and_then(|l| u32::try_from(l).ok()),
        method: vector.method.unwrap_or_default(),
        source: vector.source,
        values: vector.values,
    }
}

/// A spinner counting prompts on stderr (hidden when it is not a terminal).
fn progress(what: &'static str) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} {pos} prompts ({elapsed})")
            .expect("valid template"),
    );
    bar.set_message(what);
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

fn sublayer_wire(sublayer: SublayerArg) -> pb::Sublayer {
    match sublayer {
        SublayerArg::ResidualIn => pb::Sublayer::ResidualIn,
        SublayerArg::AfterAttn => pb::Sublayer::AfterAttn,
        SublayerArg::ResidualOut => pb::Sublayer::ResidualOut,
    }
}

async fn project(args: &ProjectArgs) -> anyhow::Result<ExitCode> {
    let vectors = vectors(&args.vectors, &args.layers).await?;
    let mut backend = QueryBackend::open(&args.connection, "query project").await?;
    let mut replies = backend
        .project(pb::ProjectRequest {
            run_id: args.run.clone(),
            vectors,
            layers: args.layers.clone(),
            prompt_sets: args.vectors.prompt_sets.clone(),
            prompt_ids: args.vectors.prompt_ids.clone(),
        })
        .await?;
    let doing = format!("projecting run {}", args.run);
    let bar = progress("projecting");
    let mut prompts = Vec::new();
    let mut read = ReadView::default();
    while let Some(reply) = next_reply(&mut replies, &doing).await? {
        match reply.item {
            Some(pb::project_reply::Item::Prompt(prompt)) => {
                bar.inc(1);
                prompts.push(prompt);
            }
            Some(pb::project_reply::Item::Done(stats)) => read = (&stats).into(),
            None => {}
        }
    }
    bar.finish_and_clear();
    if let Some(path) = &args.plot.plot {
        plots::projection(path, &prompts, &args.plot)?;
    }
    let text = match args.output.format {
        FormatArg::Json => to_json(&ProjectView {
            run_id: args.run.clone(),
            prompts: prompts.iter().map(PromptProjectionView::from).collect(),
            read,
        }),
        FormatArg::Csv => projection_csv(&prompts),
    };
    emit(args.output.output.as_deref(), &text)?;
    eprintln!("{}", read.to_text());
    Ok(ExitCode::SUCCESS)
}

/// Long format: one row per prompt, trait, phase, token and layer.
fn projection_csv(prompts: &[pb::PromptProjection]) -> String {
    let mut csv = Csv::new(&[
        "prompt_set",
        "prompt_id",
        "trait",
        "phase",
        "token_index",
        "token",
        "layer",
        "residual_in",
        "after_attn",
        "residual_out",
    ]);
    for prompt in prompts {
        for scores in &prompt.traits {
            let layers = scores.layers.len();
            for (phase, values, tokens) in [
                ("prompt", &scores.prompt, &prompt.prompt_tokens),
                ("response", &scores.response, &prompt.response_tokens),
            ] {
                for (token_index, token) in tokens.iter().enumerate() {
                    for (layer_index, layer) in scores.layers.iter().enumerate() {
                        let at = (token_index * layers + layer_index) * 3;
                        let Some(triple) = values.get(at..at + 3) else {
                            continue;
                        };
                        csv.row([
                            prompt.prompt_set.clone(),
                            prompt.prompt_id.clone(),
                            scores.trait_name.clone(),
                            phase.to_owned(),
                            token_index.to_string(),
                            token.clone(),
                            layer.to_string(),
                            triple[0].to_string(),
                            triple[1].to_string(),
                            triple[2].to_string(),
                        ]);
                    }
                }
            }
        }
    }
    csv.into_string()
}

async fn dynamics(args: &DynamicsArgs) -> anyhow::Result<ExitCode> {
    let layers: Vec<u32> = args.layer.into_iter().collect();
    let vectors = vectors(&args.vectors, &layers).await?;
    let mut backend = QueryBackend::open(&args.connection, "query dynamics").await?;
    let mut replies = backend
        .dynamics(pb::DynamicsRequest {
            projection: Some(pb::ProjectRequest {
                run_id: args.run.clone(),
                vectors,
                layers: Vec::new(),
                prompt_sets: args.vectors.prompt_sets.clone(),
                prompt_ids: args.vectors.prompt_ids.clone(),
            }),
            layer: args.layer,
            sublayer: sublayer_wire(args.sublayer) as i32,
            threshold: args.threshold,
        })
        .await?;
    let doing = format!("analysing the dynamics of run {}", args.run);
    let bar = progress("analysing");
    let mut prompts = Vec::new();
    let mut read = ReadView::default();
    while let Some(reply) = next_reply(&mut replies, &doing).await? {
        match reply.item {
            Some(pb::dynamics_reply::Item::Prompt(prompt)) => {
                bar.inc(1);
                prompts.push(prompt);
            }
            Some(pb::dynamics_reply::Item::Done(stats)) => read = (&stats).into(),
            None => {}
        }
    }
    bar.finish_and_clear();
    if let Some(path) = &args.plot {
        plots::dynamics(path, &prompts, args.plot_prompt.as_deref())?;
    }
    let text = match args.output.format {
        FormatArg::Json => to_json(&DynamicsView {
            run_id: args.run.clone(),
            threshold: args.threshold,
            prompts: prompts.iter().map(Into::into).collect(),
            read,
        }),
        FormatArg::Csv => {
            let mut csv = Csv::new(&[
                "prompt_set",
                "prompt_id",
                "trait",
                "layer",
                "sublayer",
                "tokens",
                "commitment_token",
                "peak_velocity",
                "peak_velocity_index",
                "mean_abs_velocity",
                "peak_score",
                "peak_score_token",
                "persistence",
            ]);
            for prompt in &prompts {
                for d in &prompt.traits {
                    csv.row([
                        prompt.prompt_set.clone(),
                        prompt.prompt_id.clone(),
                        d.trait_name.clone(),
                        d.layer.to_string(),
                        sublayer_name(d.sublayer).to_owned(),
                        d.scores.len().to_string(),
                        d.commitment_token
                            .map(|t| t.to_string())
                            .unwrap_or_default(),
                        d.peak_velocity.to_string(),
                        d.peak_velocity_index.to_string(),
                        d.mean_abs_velocity.to_string(),
                        d.peak_score.to_string(),
                        d.peak_score_token.to_string(),
                        d.persistence.to_string(),
                    ]);
                }
            }
            csv.into_string()
        }
    };
    emit(args.output.output.as_deref(), &text)?;
    eprintln!("{}", read.to_text());
    Ok(ExitCode::SUCCESS)
}

async fn compare(args: &CompareArgs) -> anyhow::Result<ExitCode> {
    let vectors = vectors(&args.vectors, &args.layers).await?;
    let mut backend = QueryBackend::open(&args.connection, "query compare").await?;
    let mut replies = backend
        .compare(pb::CompareRequest {
            run_ids: args.runs.clone(),
            vectors,
            layers: args.layers.clone(),
            prompt_sets: args.vectors.prompt_sets.clone(),
            prompt_ids: args.vectors.prompt_ids.clone(),
        })
        .await?;
    let doing = format!("comparing runs {}", args.runs.join(", "));
    let bar = progress("comparing");
    let mut prompts = Vec::new();
    let mut summary = None;
    while let Some(reply) = next_reply(&mut replies, &doing).await? {
        match reply.item {
            Some(pb::compare_reply::Item::Prompt(prompt)) => {
                bar.inc(1);
                prompts.push(prompt);
            }
            Some(pb::compare_reply::Item::Summary(done)) => summary = Some(done),
            None => {}
        }
    }
    bar.finish_and_clear();
    let summary = summary.with_context(|| format!("{doing}: the answer ended early"))?;
    let read: ReadView = summary.stats.as_ref().map(Into::into).unwrap_or_default();
    if !summary.unmatched.is_empty() {
        eprintln!(
            "{} prompts are not in every run and were left out: {}",
            summary.unmatched.len(),
            summary.unmatched.join(", ")
        );
    }
    if let Some(path) = &args.plot {
        plots::comparison(path, &prompts, args.plot_prompt.as_deref())?;
    }
    let text = match args.output.format {
        FormatArg::Json => to_json(&CompareView {
            baseline_run_id: args.runs[0].clone(),
            run_ids: args.runs.clone(),
            prompts: prompts.iter().map(Into::into).collect(),
            summary: summary.layers.iter().map(Into::into).collect(),
            unmatched: summary.unmatched.clone(),
            read,
        }),
        FormatArg::Csv => {
            let mut csv = Csv::new(&[
                "baseline_run_id",
                "run_id",
                "trait",
                "layer",
                "sublayer",
                "phase",
                "mean_difference",
                "cohens_d",
                "baseline_tokens",
                "tokens",
            ]);
            for layer in &summary.layers {
                csv.row([
                    args.runs[0].clone(),
                    layer.run_id.clone(),
                    layer.trait_name.clone(),
                    layer.layer.to_string(),
                    sublayer_name(layer.sublayer).to_owned(),
                    phase_name(layer.phase).to_owned(),
                    layer.mean_difference.to_string(),
                    layer.cohens_d.map(|d| d.to_string()).unwrap_or_default(),
                    layer.baseline_tokens.to_string(),
                    layer.tokens.to_string(),
                ]);
            }
            csv.into_string()
        }
    };
    emit(args.output.output.as_deref(), &text)?;
    eprintln!("{}", read.to_text());
    Ok(ExitCode::SUCCESS)
}

async fn tensor(args: &TensorArgs) -> anyhow::Result<ExitCode> {
    let format = args.format.unwrap_or_else(|| {
        match args
            .output
            .as_ref()
            .and_then(|p| p.extension())
            .and_then(|e| e.to_str())
        {
            Some("npy") => TensorFormat::Npy,
            _ => TensorFormat::Json,
        }
    });
    if format == TensorFormat::Npy && args.output.is_none() {
        anyhow::bail!("--format npy writes a binary file: name it with --output FILE.npy");
    }
    if args.key.is_none() && (args.prompt_set.is_none() || args.prompt_id.is_none()) {
        anyhow::bail!("name the artifact: --key KEY, or --prompt-set SET and --prompt-id ID");
    }
    let mut backend = QueryBackend::open(&args.connection, "query tensor").await?;
    let answer = backend
        .read_tensor(pb::ReadTensorRequest {
            run_id: args.run.clone(),
            artifact_key: args.key.clone().unwrap_or_default(),
            prompt_set: args.prompt_set.clone().unwrap_or_default(),
            prompt_id: args.prompt_id.clone().unwrap_or_default(),
            mode: mode_kind(Some(args.mode)),
            phase: match args.phase {
                PhaseArg::Prompt => pb::Phase::Prompt,
                PhaseArg::Response => pb::Phase::Response,
            } as i32,
            layer: args.layer,
            tensor: args.tensor.clone(),
            token_start: args.tokens.and_then(|t| t.start),
            token_end: args.tokens.and_then(|t| t.end),
        })
        .await?;
    match format {
        TensorFormat::Npy => {
            let path = args.output.as_ref().expect("checked above");
            write_atomic(path, &npy_bytes(&answer.shape, &answer.values))?;
        }
        TensorFormat::Json => emit(args.output.as_deref(), &to_json(&tensor_json(&answer)))?,
    }
    let read: ReadView = answer.stats.as_ref().map(Into::into).unwrap_or_default();
    eprintln!(
        "{} {} {:?} ({}) from {}: {}",
        answer.artifact_key,
        answer.path,
        answer.shape,
        answer.dtype,
        args.run,
        read.to_text()
    );
    Ok(ExitCode::SUCCESS)
}
