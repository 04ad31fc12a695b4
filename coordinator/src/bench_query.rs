//! `bench-query`: what a trait projection costs with ranged reads of the
//! `.pt` artifacts versus downloading whole files. Writes a synthetic run of
//! raw residual artifacts at Gemma-2-2B's shapes (random values), then, in
//! one sitting and side by side, projects one trait vector at one layer of
//! every artifact both ways: [`ArtifactReader`] reading only that layer's six
//! residual tensors, and a whole-file GET decoded with
//! [`capture_worker::pt::decode_pt`]. Both must give bit-identical scores.
//! Reports bytes, requests and wall time (median of the repeats) as markdown.
//!
//! The artifacts are staged the way a worker stages them
//! (`_staging/{job}/{attempt}/inference/raw/residual/...`, under a fresh run
//! root `bench-query/{run id}`) and read at those keys: staging is the part
//! of a run the store can delete again
//! ([`RunStore::discard_job_staging`]), so the benchmark cleans up after
//! itself. Key names do not change what a read costs.

use std::fmt::Write as _;
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use capture_worker::pt::{PtError, PtTensor, PtValue, StoreDtype, decode_pt, encode_pt};
use capture_worker::store::{ArtifactStore, RunStore, StoreError};
use futures::{StreamExt, TryStreamExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::query::analysis::{Sublayer, project};
use crate::query::reader::{ArtifactReader, ByteCounter, Phase, ReaderError, TensorValues};

/// Experiment name of every benchmark run root.
pub const EXPERIMENT: &str = "bench-query";
/// Job id the synthetic artifacts are staged under.
const JOB_ID: &str = "synthetic";
const ATTEMPT: u32 = 1;
/// Prompt set named in the artifact keys.
const PROMPT_SET: &str = "synthetic";
/// Artifacts generated and uploaded at once (each holds its value and its
/// encoded file in memory: about 2 x 80 MB at f32).
const WRITE_CONCURRENCY: usize = 2;
/// Layers read per `read_many` when projecting several layers, as the query
/// engine batches them.
const LAYERS_PER_BATCH: usize = 4;
/// Prompt lengths of the format reference's examples (P1 = 26 ... P2 = 43 tokens).
pub const GEMMA_PROMPT_TOKENS: RangeInclusive<usize> = 26..=43;

/// What to write and what to measure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchQueryConfig {
    /// Artifacts in the synthetic run (one per prompt).
    pub prompts: usize,
    /// Layers per artifact (Gemma-2-2B: 26).
    pub layers: usize,
    /// Width of the residual stream (Gemma-2-2B: 2304).
    pub hidden: usize,
    /// Prompt lengths, drawn per prompt from this range.
    pub prompt_tokens: RangeInclusive<usize>,
    /// Generated tokens per prompt.
    pub response_tokens: usize,
    /// Storage dtype of every tensor.
    pub dtype: StoreDtype,
    /// The layer projected.
    pub layer: usize,
    /// Times each measurement runs; the report shows the median.
    pub repeats: usize,
    /// Also measure the projection of every layer, both ways.
    pub all_layers: bool,
    /// Artifacts read at once, by either method.
    pub concurrency: usize,
    /// Seed of the synthetic values and of the trait vector.
    pub seed: u64,
    /// Leave the synthetic run in the store afterwards.
    pub keep: bool,
}

impl Default for BenchQueryConfig {
    /// A 50-prompt run at Gemma-2-2B's shapes, f32, layer 16, 3 repeats.
    fn default() -> Self {
        Self {
            prompts: 50,
            layers: 26,
            hidden: 2304,
            prompt_tokens: GEMMA_PROMPT_TOKENS,
            response_tokens: 50,
            dtype: StoreDtype::F32,
            layer: 16,
            repeats: 3,
            all_layers: false,
            concurrency: 4,
            seed: 0,
            keep: false,
        }
    }
}

impl BenchQueryConfig {
    fn check(&self) -> Result<(), BenchQueryError> {
        let problem = if self.prompts == 0 {
            Some("--prompts must be at least 1".to_owned())
        } else if self.layers == 0 || self.hidden == 0 {
            Some("--layers and --hidden must be at least 1".to_owned())
        } else if self.prompt_tokens.is_empty() || *self.prompt_tokens.start() == 0 {
            Some(format!(
                "prompt lengths {:?} must be a non-empty range of positive lengths",
                self.prompt_tokens
            ))
        } else if self.layer >= self.layers {
            Some(format!(
                "--layer {} is not captured: the artifacts have layers 0-{}",
                self.layer,
                self.layers - 1
            ))
        } else if self.repeats == 0 || self.concurrency == 0 {
            Some("--repeats and --concurrency must be at least 1".to_owned())
        } else {
            None
        };
        problem.map_or(Ok(()), |problem| Err(BenchQueryError::Invalid(problem)))
    }

    /// Bytes of tensor data in one artifact of `prompt_tokens` tokens.
    pub fn tensor_bytes(&self, prompt_tokens: usize) -> u64 {
        let (n, r) = (prompt_tokens as u64, self.response_tokens as u64);
        let activations = 3 * (n + r) * self.hidden as u64;
        let attention = n * n + (0..r).map(|i| (n + i) * (n + i)).sum::<u64>();
        (activations + attention) * self.layers as u64 * self.dtype.element_size() as u64
    }
}

/// What can stop the benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchQueryError {
    #[error("invalid benchmark settings: {0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Reader(#[from] ReaderError),
    #[error("cannot {action} {key}: {source}")]
    Pt {
        action: &'static str,
        key: String,
        #[source]
        source: PtError,
    },
    /// A tensor of an artifact is missing or has the wrong shape.
    #[error("{key}: {problem}")]
    Artifact { key: String, problem: String },
    /// The two methods disagree: the benchmark's result is void.
    #[error("ranged and whole-file scores differ: {0}")]
    Mismatch(String),
    #[error("internal task failed while {operation}: {source}")]
    Task {
        operation: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
}

/// How the artifacts are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// [`ArtifactReader`]: tail with the directory, pickle, then the wanted tensors.
    Ranged,
    /// One GET of each whole file, decoded in memory.
    Whole,
}

impl Method {
    fn label(self) -> &'static str {
        match self {
            Method::Ranged => "ranged reads (ArtifactReader)",
            Method::Whole => "whole files (GET + decode_pt)",
        }
    }
}

/// One pass over every artifact of the run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measurement {
    /// Body bytes of every GET.
    pub bytes: u64,
    /// HEADs and GETs.
    pub requests: u64,
    /// Wall time of the pass, reads, decoding and projection included.
    pub seconds: f64,
}

/// The repeats of one method over one set of layers.
#[derive(Debug, Clone, PartialEq)]
pub struct MeasurementRow {
    pub method: Method,
    pub layers: Vec<usize>,
    pub runs: Vec<Measurement>,
}

impl MeasurementRow {
    pub fn median_seconds(&self) -> f64 {
        median(self.runs.iter().map(|m| m.seconds).collect())
    }

    pub fn median_bytes(&self) -> u64 {
        median(self.runs.iter().map(|m| m.bytes as f64).collect()) as u64
    }

    pub fn median_requests(&self) -> u64 {
        median(self.runs.iter().map(|m| m.requests as f64).collect()) as u64
    }
}

/// The median of `values` (the mean of the middle two for an even count).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// One artifact of the synthetic run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntheticArtifact {
    /// Key below the run root (a staged key).
    pub key: String,
    pub file_bytes: u64,
    pub prompt_tokens: usize,
}

/// What the benchmark wrote, measured and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchQueryReport {
    pub config: BenchQueryConfig,
    pub run_root: String,
    pub artifacts: Vec<SyntheticArtifact>,
    /// Generating, encoding and uploading the run.
    pub write_seconds: f64,
    /// Layer `config.layer` first, then (with `all_layers`) every layer;
    /// ranged before whole for each.
    pub rows: Vec<MeasurementRow>,
    /// Score series compared between the methods (all repeats together).
    pub series_compared: usize,
    /// Objects deleted at the end (0 with `keep`).
    pub deleted: usize,
}

impl BenchQueryReport {
    fn pair(&self, layers: usize) -> Option<(&MeasurementRow, &MeasurementRow)> {
        let find = |method| {
            self.rows
                .iter()
                .find(|row| row.method == method && row.layers.len() == layers)
        };
        Some((find(Method::Ranged)?, find(Method::Whole)?))
    }

    /// Whole-file bytes over ranged bytes, at the single layer.
    pub fn bytes_ratio(&self) -> f64 {
        self.pair(1).map_or(0.0, |(ranged, whole)| {
            whole.median_bytes() as f64 / ranged.median_bytes().max(1) as f64
        })
    }

    /// Whole-file wall time over ranged wall time, at the single layer.
    pub fn time_ratio(&self) -> f64 {
        self.pair(1).map_or(0.0, |(ranged, whole)| {
            whole.median_seconds() / ranged.median_seconds().max(f64::EPSILON)
        })
    }

    /// At least 10x fewer bytes and faster.
    pub fn goal_met(&self) -> bool {
        self.bytes_ratio() >= 10.0 && self.time_ratio() > 1.0
    }

    pub fn to_markdown(&self) -> String {
        let config = &self.config;
        let total: u64 = self.artifacts.iter().map(|a| a.file_bytes).sum();
        let tokens = self.artifacts.iter().map(|a| a.prompt_tokens);
        let (shortest, longest) = (tokens.clone().min(), tokens.max());
        let mut out = String::new();
        let _ = writeln!(
            out,
            "Synthetic run: {} raw residual artifacts, {} layers x hidden {}, {} storage, \
             prompts of {}-{} tokens, {} response tokens, attention included; {} in all \
             ({} per file on average), written in {:.1} s under {}.",
            self.artifacts.len(),
            config.layers,
            config.hidden,
            config.dtype,
            shortest.unwrap_or(0),
            longest.unwrap_or(0),
            config.response_tokens,
            show_bytes(total),
            show_bytes(total / self.artifacts.len().max(1) as u64),
            self.write_seconds,
            self.run_root
        );
        let _ = writeln!(
            out,
            "Projection of one random trait vector (seed {}) onto prompt and response x \
             residual_in, after_attn, residual_out; {} artifacts read at once; median of {} runs.",
            config.seed, config.concurrency, config.repeats
        );
        out.push('\n');
        out.push_str("| method | layers | bytes read | requests | wall s (median) | runs (s) |\n");
        out.push_str("|---|---|---|---|---|---|\n");
        for row in &self.rows {
            let layers = match row.layers.as_slice() {
                [one] => one.to_string(),
                all => format!("all {}", all.len()),
            };
            let runs: Vec<String> = row
                .runs
                .iter()
                .map(|m| format!("{:.3}", m.seconds))
                .collect();
            let _ = writeln!(
                out,
                "| {} | {layers} | {} | {} | {:.3} | {} |",
                row.method.label(),
                show_bytes(row.median_bytes()),
                row.median_requests(),
                row.median_seconds(),
                runs.join(", ")
            );
        }
        out.push('\n');
        let _ = writeln!(
            out,
            "| layer {}: whole / ranged | ratio | goal | met |",
            config.layer
        );
        out.push_str("|---|---|---|---|\n");
        let yes = |ok: bool| if ok { "yes" } else { "no" };
        let (bytes, time) = (self.bytes_ratio(), self.time_ratio());
        let _ = writeln!(
            out,
            "| bytes | {bytes:.1}x | >= 10x | {} |",
            yes(bytes >= 10.0)
        );
        let _ = writeln!(
            out,
            "| wall time | {time:.2}x | > 1x | {} |",
            yes(time > 1.0)
        );
        if let Some((ranged, whole)) = self.pair(config.layers).filter(|_| config.layers > 1) {
            let _ = writeln!(
                out,
                "| all {} layers, for context: bytes / wall time | {:.2}x / {:.2}x | — | — |",
                config.layers,
                whole.median_bytes() as f64 / ranged.median_bytes().max(1) as f64,
                whole.median_seconds() / ranged.median_seconds().max(f64::EPSILON)
            );
        }
        out.push('\n');
        let _ = writeln!(
            out,
            "Scores: ranged and whole-file projections identical bit for bit ({} series \
             compared). Goal (>= 10x fewer bytes and faster): {}. {}",
            self.series_compared,
            if self.goal_met() { "met" } else { "not met" },
            if config.keep {
                format!("Artifacts kept under {}.", self.run_root)
            } else {
                format!("{} objects deleted.", self.deleted)
            }
        );
        out
    }
}

/// `123456789 B (117.7 MiB)`.
fn show_bytes(bytes: u64) -> String {
    let mib = bytes as f64 / (1024.0 * 1024.0);
    if mib >= 1024.0 {
        format!("{bytes} B ({:.2} GiB)", mib / 1024.0)
    } else {
        format!("{bytes} B ({mib:.1} MiB)")
    }
}

/// Writes the synthetic run under a fresh run root of `store`, measures both
/// methods and checks they agree, then deletes the run unless `keep`.
pub async fn bench_query(
    store: &ArtifactStore,
    config: BenchQueryConfig,
) -> Result<BenchQueryReport, BenchQueryError> {
    config.check()?;
    let run_id = uuid::Uuid::now_v7().to_string();
    let run = store.run(EXPERIMENT, &run_id)?;
    let outcome = write_and_measure(&run, &config).await;
    let deleted = if config.keep {
        0
    } else {
        match run.discard_job_staging(JOB_ID).await {
            Ok(deleted) => deleted,
            Err(err) if outcome.is_ok() => return Err(err.into()),
            Err(err) => {
                tracing::warn!(run_root = %run.root_url(), error = %err, "cleanup failed");
                0
            }
        }
    };
    let (artifacts, write_seconds, rows, series_compared) = outcome?;
    Ok(BenchQueryReport {
        config,
        run_root: run.root_url(),
        artifacts,
        write_seconds,
        rows,
        series_compared,
        deleted,
    })
}

type Measured = (Vec<SyntheticArtifact>, f64, Vec<MeasurementRow>, usize);

async fn write_and_measure(
    run: &RunStore,
    config: &BenchQueryConfig,
) -> Result<Measured, BenchQueryError> {
    let started = Instant::now();
    let artifacts = write_synthetic_run(run, config).await?;
    let write_seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        artifacts = artifacts.len(),
        seconds = write_seconds,
        "synthetic run written"
    );
    let keys: Vec<String> = artifacts.iter().map(|a| a.key.clone()).collect();
    let vector = Arc::new(trait_vector(config.hidden, config.seed));
    let mut scopes = vec![vec![config.layer]];
    if config.all_layers && config.layers > 1 {
        scopes.push((0..config.layers).collect());
    }
    let mut rows = Vec::new();
    let mut series_compared = 0;
    for layers in scopes {
        let mut ranged = MeasurementRow {
            method: Method::Ranged,
            layers: layers.clone(),
            runs: Vec::new(),
        };
        let mut whole = MeasurementRow {
            method: Method::Whole,
            layers: layers.clone(),
            runs: Vec::new(),
        };
        for repeat in 0..config.repeats {
            // Alternate which method goes first, so neither always finds
            // the store's caches warmed by the other.
            let order = if repeat % 2 == 0 {
                [Method::Ranged, Method::Whole]
            } else {
                [Method::Whole, Method::Ranged]
            };
            let mut scores = Vec::with_capacity(2);
            for method in order {
                let (measurement, run_scores) =
                    measure(run, &keys, &layers, &vector, config, method).await?;
                tracing::info!(
                    ?method,
                    layers = layers.len(),
                    repeat,
                    ?measurement,
                    "measured"
                );
                match method {
                    Method::Ranged => ranged.runs.push(measurement),
                    Method::Whole => whole.runs.push(measurement),
                }
                scores.push(run_scores);
            }
            series_compared += compare_scores(&keys, &layers, &scores[0], &scores[1])?;
        }
        rows.push(ranged);
        rows.push(whole);
    }
    Ok((artifacts, write_seconds, rows, series_compared))
}

/// A random trait vector of `hidden` values in [-1, 1).
fn trait_vector(hidden: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x7472_6169_745f_7665);
    loop {
        let vector: Vec<f32> = (0..hidden).map(|_| rng.random_range(-1.0..1.0)).collect();
        if vector.iter().any(|&x| x != 0.0) {
            return vector;
        }
    }
}

/// The documented key of prompt `index` (1-based in the name).
fn relative_key(index: usize) -> String {
    format!("inference/raw/residual/{PROMPT_SET}/p{:03}.pt", index + 1)
}

/// Generates, encodes and stages every artifact, [`WRITE_CONCURRENCY`] at once.
pub async fn write_synthetic_run(
    run: &RunStore,
    config: &BenchQueryConfig,
) -> Result<Vec<SyntheticArtifact>, BenchQueryError> {
    let staging = RunStore::staging_prefix(JOB_ID, ATTEMPT)?;
    futures::stream::iter(0..config.prompts)
        .map(|index| {
            let config = config.clone();
            let staging = &staging;
            async move {
                let key = relative_key(index);
                let archive = format!("p{:03}", index + 1);
                let (file, prompt_tokens) = tokio::task::spawn_blocking({
                    let key = key.clone();
                    move || {
                        let (value, prompt_tokens) = synthetic_artifact(&config, index);
                        encode_pt(&value, &archive)
                            .map(|file| (Bytes::from(file), prompt_tokens))
                            .map_err(|source| BenchQueryError::Pt {
                                action: "encode",
                                key,
                                source,
                            })
                    }
                })
                .await
                .map_err(|source| BenchQueryError::Task {
                    operation: "generating an artifact",
                    source,
                })??;
                let staged = run.stage_put(JOB_ID, ATTEMPT, &key, file).await?;
                Ok::<_, BenchQueryError>(SyntheticArtifact {
                    key: format!("{staging}/{key}"),
                    file_bytes: staged.bytes,
                    prompt_tokens,
                })
            }
        })
        .buffered(WRITE_CONCURRENCY)
        .try_collect()
        .await
}

/// The raw residual artifact of prompt `index` as the worker lays it out
/// (`artifact.rs`): per phase `text`, `tokens`, `token_ids`, `activations`
/// (`{layer}.{residual_in,after_attn,residual_out}`, `[tokens, hidden]`) and
/// `attention` (`layer_{n}`: `[N, N]` for the prompt, a list of `[N+i, N+i]`
/// for the response), filled with seeded random values. Returns the value
/// and its prompt length.
pub fn synthetic_artifact(config: &BenchQueryConfig, index: usize) -> (PtValue, usize) {
    let mut rng = StdRng::seed_from_u64(config.seed.wrapping_add(index as u64 + 1));
    let n = rng.random_range(config.prompt_tokens.clone());
    let r = config.response_tokens;
    let dtype = config.dtype;
    let mut section = |phase: Phase, tokens: usize| {
        let activations = (0..config.layers)
            .map(|layer| {
                let sublayers = Sublayer::ALL
                    .iter()
                    .map(|s| {
                        let values = random_values(&mut rng, tokens * config.hidden, -4.0);
                        let tensor =
                            PtTensor::from_f32(vec![tokens, config.hidden], &values, dtype);
                        (s.as_str().to_owned(), PtValue::Tensor(tensor))
                    })
                    .collect();
                (layer.to_string(), PtValue::Dict(sublayers))
            })
            .collect();
        let mut square = |size: usize| {
            let values = random_values(&mut rng, size * size, 0.0);
            PtValue::Tensor(PtTensor::from_f32(vec![size, size], &values, dtype))
        };
        let attention = (0..config.layers)
            .map(|layer| {
                let value = match phase {
                    Phase::Prompt => square(n),
                    Phase::Response => PtValue::List((0..r).map(|i| square(n + i)).collect()),
                };
                (format!("layer_{layer}"), value)
            })
            .collect();
        let words: Vec<String> = (0..tokens).map(|i| format!(" {phase}{i}")).collect();
        let base = match phase {
            Phase::Prompt => 1000,
            Phase::Response => 2000,
        };
        PtValue::Dict(vec![
            ("text".into(), PtValue::Str(words.concat())),
            (
                "tokens".into(),
                PtValue::List(words.into_iter().map(PtValue::Str).collect()),
            ),
            (
                "token_ids".into(),
                PtValue::List((0..tokens as i64).map(|i| PtValue::Int(base + i)).collect()),
            ),
            ("activations".into(), PtValue::Dict(activations)),
            ("attention".into(), PtValue::Dict(attention)),
        ])
    };
    let prompt = section(Phase::Prompt, n);
    let response = section(Phase::Response, r);
    let value = PtValue::Dict(vec![
        ("prompt".into(), prompt),
        ("response".into(), response),
    ]);
    (value, n)
}

/// `count` uniform values in `[low, 4)`.
fn random_values(rng: &mut StdRng, count: usize, low: f32) -> Vec<f32> {
    (0..count).map(|_| rng.random_range(low..4.0)).collect()
}

/// The tensors projected, in the order scores are kept: per layer, prompt
/// then response, each in [`Sublayer::ALL`] order.
fn slots(layers: &[usize]) -> impl Iterator<Item = (usize, Phase, Sublayer)> + '_ {
    layers.iter().flat_map(|&layer| {
        Phase::ALL
            .into_iter()
            .flat_map(move |phase| Sublayer::ALL.map(|sublayer| (layer, phase, sublayer)))
    })
}

/// Score series of one artifact, in [`slots`] order.
type ArtifactScores = Vec<Vec<f32>>;

/// One pass of `method` over every artifact, `concurrency` at once.
async fn measure(
    run: &RunStore,
    keys: &[String],
    layers: &[usize],
    vector: &Arc<Vec<f32>>,
    config: &BenchQueryConfig,
    method: Method,
) -> Result<(Measurement, Vec<ArtifactScores>), BenchQueryError> {
    let counter = ByteCounter::new();
    let started = Instant::now();
    let scores: Vec<ArtifactScores> = futures::stream::iter(keys)
        .map(|key| {
            let counter = &counter;
            async move {
                match method {
                    Method::Ranged => project_ranged(run, key, layers, vector, counter).await,
                    Method::Whole => project_whole(run, key, layers, vector).await,
                }
            }
        })
        .buffered(config.concurrency)
        .try_collect()
        .await?;
    let seconds = started.elapsed().as_secs_f64();
    let (bytes, requests) = match method {
        Method::Ranged => (counter.bytes_read(), counter.requests()),
        Method::Whole => (whole_file_bytes(run, keys).await?, keys.len() as u64),
    };
    Ok((
        Measurement {
            bytes,
            requests,
            seconds,
        },
        scores,
    ))
}

/// Sizes of the files a whole-file pass downloaded (read after the timed
/// pass, so the HEADs are neither timed nor counted).
async fn whole_file_bytes(run: &RunStore, keys: &[String]) -> Result<u64, BenchQueryError> {
    let mut total = 0;
    for key in keys {
        total += run.head(key).await?.bytes;
    }
    Ok(total)
}

/// Opens `key` for ranged reads and projects `layers`, reading
/// [`LAYERS_PER_BATCH`] layers per `read_many`.
async fn project_ranged(
    run: &RunStore,
    key: &str,
    layers: &[usize],
    vector: &Arc<Vec<f32>>,
    counter: &ByteCounter,
) -> Result<ArtifactScores, BenchQueryError> {
    let reader = ArtifactReader::open(run, key, counter).await?;
    let mut scores = Vec::with_capacity(layers.len() * 6);
    for batch in layers.chunks(LAYERS_PER_BATCH) {
        let wanted = slots(batch)
            .map(|(layer, phase, sublayer)| {
                Ok((
                    reader.residual_tensor(phase, layer, sublayer)?.clone(),
                    None,
                ))
            })
            .collect::<Result<Vec<_>, ReaderError>>()?;
        let values = reader.read_many(&wanted).await?;
        let vector = Arc::clone(vector);
        let key = key.to_owned();
        let projected = tokio::task::spawn_blocking(move || project_all(&key, values, &vector))
            .await
            .map_err(|source| BenchQueryError::Task {
                operation: "projecting",
                source,
            })??;
        scores.extend(projected);
    }
    Ok(scores)
}

/// Downloads `key` whole, decodes it and projects `layers`.
async fn project_whole(
    run: &RunStore,
    key: &str,
    layers: &[usize],
    vector: &Arc<Vec<f32>>,
) -> Result<ArtifactScores, BenchQueryError> {
    let file = run.get(key).await?;
    let key = key.to_owned();
    let layers = layers.to_vec();
    let vector = Arc::clone(vector);
    tokio::task::spawn_blocking(move || {
        let value = decode_pt(&file).map_err(|source| BenchQueryError::Pt {
            action: "decode",
            key: key.clone(),
            source,
        })?;
        let values = slots(&layers)
            .map(|(layer, phase, sublayer)| whole_tensor(&key, &value, layer, phase, sublayer))
            .collect::<Result<Vec<_>, _>>()?;
        project_all(&key, values, &vector)
    })
    .await
    .map_err(|source| BenchQueryError::Task {
        operation: "decoding and projecting",
        source,
    })?
}

/// `{phase}.activations.{layer}.{sublayer}` of a decoded artifact as f32.
fn whole_tensor(
    key: &str,
    value: &PtValue,
    layer: usize,
    phase: Phase,
    sublayer: Sublayer,
) -> Result<TensorValues, BenchQueryError> {
    let path = format!("{phase}.activations.{layer}.{sublayer}");
    let tensor = value
        .get(phase.as_str())
        .and_then(|v| v.get("activations"))
        .and_then(|v| v.get(&layer.to_string()))
        .and_then(|v| v.get(sublayer.as_str()))
        .and_then(|v| v.as_tensor())
        .ok_or_else(|| BenchQueryError::Artifact {
            key: key.to_owned(),
            problem: format!("has no tensor {path}"),
        })?;
    let values = tensor.to_f32_vec().map_err(|source| BenchQueryError::Pt {
        action: "convert",
        key: format!("{key} {path}"),
        source,
    })?;
    Ok((tensor.shape.clone(), values))
}

/// Projects `[tokens, hidden]` tensors onto `vector`.
fn project_all(
    key: &str,
    values: Vec<TensorValues>,
    vector: &[f32],
) -> Result<ArtifactScores, BenchQueryError> {
    let hidden = vector.len();
    values
        .into_iter()
        .map(|(shape, acts)| match shape.as_slice() {
            [_, width] if *width == hidden => Ok(project(&acts, hidden, vector)),
            other => Err(BenchQueryError::Artifact {
                key: key.to_owned(),
                problem: format!(
                    "has an activation of shape {other:?}, expected [tokens, {hidden}]"
                ),
            }),
        })
        .collect()
}

/// Checks that two passes gave bit-identical scores; returns the number of
/// series compared.
fn compare_scores(
    keys: &[String],
    layers: &[usize],
    a: &[ArtifactScores],
    b: &[ArtifactScores],
) -> Result<usize, BenchQueryError> {
    let names: Vec<(usize, Phase, Sublayer)> = slots(layers).collect();
    if a.len() != keys.len() || b.len() != keys.len() {
        return Err(BenchQueryError::Mismatch(format!(
            "{} and {} artifacts projected, expected {}",
            a.len(),
            b.len(),
            keys.len()
        )));
    }
    let mut compared = 0;
    for ((key, a), b) in keys.iter().zip(a).zip(b) {
        if a.len() != names.len() || b.len() != names.len() {
            return Err(BenchQueryError::Mismatch(format!(
                "{key}: {} and {} series, expected {}",
                a.len(),
                b.len(),
                names.len()
            )));
        }
        for ((series_a, series_b), (layer, phase, sublayer)) in a.iter().zip(b).zip(&names) {
            let same = series_a.len() == series_b.len()
                && series_a
                    .iter()
                    .zip(series_b)
                    .all(|(x, y)| x.to_bits() == y.to_bits());
            if !same {
                return Err(BenchQueryError::Mismatch(format!(
                    "{key} {phase}.activations.{layer}.{sublayer}: {} vs {} scores, first {:?} vs {:?}",
                    series_a.len(),
                    series_b.len(),
                    series_a.first(),
                    series_b.first()
                )));
            }
            compared += 1;
        }
    }
    Ok(compared)
}

#[cfg(test)]
mod tests {
    use capture_worker::store::StoreOptions;
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    fn small_config() -> BenchQueryConfig {
        BenchQueryConfig {
            prompts: 2,
            layers: 3,
            hidden: 32,
            prompt_tokens: 5..=7,
            response_tokens: 4,
            dtype: StoreDtype::F32,
            layer: 1,
            repeats: 2,
            all_layers: true,
            concurrency: 2,
            seed: 7,
            keep: false,
        }
    }

    fn local_store(dir: &tempfile::TempDir) -> ArtifactStore {
        let options = StoreOptions {
            fsync: false,
            ..StoreOptions::default()
        };
        ArtifactStore::from_url(dir.path().to_str().unwrap(), &options).unwrap()
    }

    fn shape_at(value: &PtValue, path: &[&str]) -> Vec<usize> {
        let mut node = value;
        for part in path {
            node = match node {
                PtValue::List(items) => &items[part.parse::<usize>().unwrap()],
                _ => node
                    .get(part)
                    .unwrap_or_else(|| panic!("no {part} in {path:?}")),
            };
        }
        node.as_tensor().unwrap().shape.clone()
    }

    #[test]
    fn synthetic_artifact_has_the_raw_residual_layout() {
        let config = small_config();
        let (value, n) = synthetic_artifact(&config, 0);
        assert!(config.prompt_tokens.contains(&n));
        let encoded = encode_pt(&value, "p001").unwrap();
        assert!(
            encoded.len() as u64 > config.tensor_bytes(n),
            "the file holds every tensor"
        );
        let decoded = decode_pt(&encoded).unwrap();
        assert_eq!(decoded, value);
        for layer in ["0", "2"] {
            for sublayer in ["residual_in", "after_attn", "residual_out"] {
                let prompt = ["prompt", "activations", layer, sublayer];
                assert_eq!(shape_at(&value, &prompt), vec![n, 32]);
                let response = ["response", "activations", layer, sublayer];
                assert_eq!(shape_at(&value, &response), vec![4, 32]);
            }
        }
        assert_eq!(
            shape_at(&value, &["prompt", "attention", "layer_2"]),
            vec![n, n]
        );
        for i in 0..4 {
            let path = ["response", "attention", "layer_0", &i.to_string()];
            assert_eq!(shape_at(&value, &path), vec![n + i, n + i]);
        }
        let tokens = value.get("response").and_then(|r| r.get("tokens")).unwrap();
        assert_eq!(tokens.as_list().unwrap().len(), 4);
        // Seeded: the same prompt again is the same value, another differs.
        assert_eq!(synthetic_artifact(&config, 0).0, value);
        assert_ne!(synthetic_artifact(&config, 1).0, value);
    }

    #[tokio::test]
    async fn ranged_and_whole_agree_and_the_run_is_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let store = local_store(&dir);
        let report = bench_query(&store, small_config()).await.unwrap();
        assert_eq!(report.artifacts.len(), 2);
        // One layer and all three, each ranged and whole.
        let shape: Vec<(Method, usize, usize)> = report
            .rows
            .iter()
            .map(|row| (row.method, row.layers.len(), row.runs.len()))
            .collect();
        assert_eq!(
            shape,
            vec![
                (Method::Ranged, 1, 2),
                (Method::Whole, 1, 2),
                (Method::Ranged, 3, 2),
                (Method::Whole, 3, 2)
            ]
        );
        // 2 artifacts x 6 series at one layer, x 18 at all layers, 2 repeats.
        assert_eq!(report.series_compared, 2 * (2 * 6 + 2 * 18));
        let total: u64 = report.artifacts.iter().map(|a| a.file_bytes).sum();
        let whole = &report.rows[1];
        assert!(
            whole
                .runs
                .iter()
                .all(|m| m.bytes == total && m.requests == 2)
        );
        // Files this small lie inside the tail the reader reads first:
        // one suffix GET per artifact.
        let ranged = &report.rows[0];
        assert!(
            ranged
                .runs
                .iter()
                .all(|m| m.requests == 2 && m.bytes == total),
            "{ranged:?}"
        );
        assert_eq!(report.deleted, 2);
        let remaining = store.run(EXPERIMENT, "x").unwrap();
        assert!(remaining.list("").await.unwrap().is_empty());
        let listed = store.list_objects("").await.unwrap();
        assert!(listed.is_empty(), "left behind: {listed:?}");
        let markdown = report.to_markdown();
        assert!(
            markdown.contains("| ranged reads (ArtifactReader) | 1 |"),
            "{markdown}"
        );
        assert!(
            markdown.contains("| whole files (GET + decode_pt) | all 3 |"),
            "{markdown}"
        );
        assert!(
            markdown.contains("identical bit for bit (96 series"),
            "{markdown}"
        );
    }

    #[tokio::test]
    async fn ranged_reads_fetch_a_fraction_of_larger_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = local_store(&dir);
        let config = BenchQueryConfig {
            prompts: 1,
            layers: 8,
            hidden: 1024,
            prompt_tokens: 20..=20,
            response_tokens: 12,
            dtype: StoreDtype::BF16,
            layer: 5,
            repeats: 1,
            all_layers: false,
            keep: true,
            ..small_config()
        };
        let report = bench_query(&store, config).await.unwrap();
        let (ranged, whole) = (&report.rows[0], &report.rows[1]);
        assert_eq!(report.rows.len(), 2);
        // Tail (with the size), data.pkl, then one GET per phase: the
        // layer's three tensors of a phase lie next to each other.
        assert_eq!(ranged.median_requests(), 4);
        // The 128 KiB tail, the pickle and the layer's six tensors (about
        // 190 KiB) of a ~2 MB file.
        assert!(
            report.bytes_ratio() > 4.0,
            "ranged {} vs whole {} bytes",
            ranged.median_bytes(),
            whole.median_bytes()
        );
        assert_eq!(report.deleted, 0);
        let run_id = report.run_root.rsplit('/').next().unwrap();
        let kept = store
            .run(EXPERIMENT, run_id)
            .unwrap()
            .list("")
            .await
            .unwrap();
        assert_eq!(kept.len(), 1);
        assert!(
            kept[0]
                .key
                .ends_with("inference/raw/residual/synthetic/p001.pt")
        );
    }

    #[test]
    fn mismatched_scores_name_the_artifact_and_tensor() {
        let keys = vec!["a.pt".to_owned()];
        let a = vec![vec![vec![1.0f32, 2.0]; 6]];
        let mut b = a.clone();
        assert_eq!(compare_scores(&keys, &[4], &a, &b).unwrap(), 6);
        b[0][4][1] = 2.5;
        let err = compare_scores(&keys, &[4], &a, &b).unwrap_err().to_string();
        assert!(
            err.contains("a.pt response.activations.4.after_attn"),
            "{err}"
        );
    }

    #[test]
    fn settings_are_checked_before_any_io() {
        let config = BenchQueryConfig {
            layer: 3,
            ..small_config()
        };
        let err = config.check().unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid benchmark settings: --layer 3 is not captured: the artifacts have layers 0-2"
        );
        assert!(BenchQueryConfig::default().check().is_ok());
        // Gemma-2-2B at f32: about 80 MB per file of 35 prompt tokens.
        let bytes = BenchQueryConfig::default().tensor_bytes(35);
        assert!((75_000_000..85_000_000).contains(&bytes), "{bytes}");
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0]), 2.5);
    }

    #[test]
    fn cli_parses_bench_query_defaults() {
        let cli = Cli::try_parse_from(["coordinator", "bench-query", "--store", "/tmp/x"]).unwrap();
        let Command::BenchQuery(args) = cli.command else {
            panic!("expected bench-query");
        };
        assert_eq!(args.config(), BenchQueryConfig::default());
        let cli = Cli::try_parse_from([
            "coordinator",
            "bench-query",
            "--store",
            "s3://b/p",
            "--dtype",
            "bf16",
            "--prompts",
            "3",
            "--all-layers",
            "--keep",
        ])
        .unwrap();
        let Command::BenchQuery(args) = cli.command else {
            panic!("expected bench-query");
        };
        let config = args.config();
        assert_eq!(
            (config.dtype, config.prompts, config.all_layers, config.keep),
            (StoreDtype::BF16, 3, true, true)
        );
        assert!(
            Cli::try_parse_from([
                "coordinator",
                "bench-query",
                "--store",
                "x",
                "--dtype",
                "f64"
            ])
            .is_err()
        );
    }
}
