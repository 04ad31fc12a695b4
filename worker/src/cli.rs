//! The `worker` command line: flags, help texts and their translation into
//! library options.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use candle_core::DType;
use capture_proto::{ClientConfig, Token};
use clap::{Args, Parser, Subcommand};

use crate::bench::{BenchOptions, TransformersBench};
use crate::capture::{LayerSelection, Sampling};
use crate::loader::{DeviceArg, parse_compute_dtype};
use crate::metrics::WorkerMetrics;
use crate::model::Gemma2Config;
use crate::model_files::ModelSource;
use crate::pt::StoreDtype;
use crate::pull::PullOptions;
use crate::run::{BatchSize, CaptureOptions, PromptSource};
use crate::store::StoreOptions;

#[derive(Debug, Parser)]
#[command(
    name = "worker",
    version,
    about = "Capture what Gemma-2 computes while it reads a prompt and writes its answer",
    long_about = "Capture what Gemma-2 computes while it reads a prompt and writes its answer.\n\n\
        `worker capture` runs a hooked Gemma-2 on a prompt set and writes PyTorch .pt artifacts in the \
        layout researchers' scripts expect (inference/raw/residual/{set}/{id}.pt, \
        inference/raw/internals/{set}/{id}_L{layer}.pt) plus a manifest.json.\n\n\
        `worker run` pulls capture jobs from a coordinator and uploads their artifacts to object storage.\n\n\
        Examples:\n  worker capture --model google/gemma-2-2b-it --prompt-set dynamic --mode residual --out captures/exp1\n  \
        worker run --coordinator http://coordinator:50051 --store s3://captures/team"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// What `worker bench --help` explains.
const BENCH_LONG_ABOUT: &str = "Time plain generation and capture on random weights at real dimensions.\n\n\
    Builds random weights at gemma-2-2b's dimensions (or --config's) on --device and times, best of \
    --repeats: plain greedy generation with the KV cache, residual capture of every layer, internals \
    capture of --layer, residual capture teacher-forced on the response just generated, and for each \
    of --batch-sizes a plain batch and a residual-capture batch (with one more batch timed phase by \
    phase: forward, to host, record, choose). It prints seconds per generated token, captured tokens \
    per second, peak resident memory (on a GPU also peak device memory, from its memory pool), \
    capture's overhead over plain generation, the artifact's assembly and encoding time, and first \
    the cost of one small operation on the device (a chain of 2,000 on one row: on a GPU, what a \
    kernel launch costs the host). With --compare-transformers the transformers reference runs the \
    same shapes, prompt and tokens, and the table gets the ratios.\n\n\
    To compare implementations in one sitting: CAPTURE_UNFUSED=1 uses candle's separate operations \
    instead of the worker's fused ones; on a GPU, CAPTURE_CUDA_DEFAULTS=1 keeps the driver's memory \
    pool release threshold and cudarc's per-allocation events, CAPTURE_CUBLAS_PROJECTIONS=1 computes \
    the projections of decode steps at batches up to 4 with cuBLAS's matmul instead of the worker's \
    matvec kernel, and CAPTURE_DECODE_SPLIT_FROM=N splits a decode step's attention over the keys \
    only past N keys (default 256; a large N keeps one block per query row). Results and the exact commands are recorded in docs/benchmarks.md.";

const RUN_LONG_ABOUT: &str = "Pull capture jobs from a coordinator until stopped.\n\n\
    The model is loaded once; then the worker claims jobs for it (model id and --revision must match \
    the runs' model_id and model_revision), captures each job's prompts, uploads the .pt artifacts \
    under the job's staging prefix in --store and reports them to the coordinator, which publishes \
    them at their documented keys. It captures up to --concurrent-jobs jobs at once and batches the \
    prompts of those with the same capture settings together; a job uploads while the next ones \
    are captured. A coordinator or database restart only delays \
    the worker. SIGTERM or Ctrl-C stops claiming, lets the jobs held finish for up to \
    --drain-timeout seconds, gives them back otherwise, and exits 0.\n\n\
    S3 credentials and region come from the AWS_* environment variables; AWS_ENDPOINT_URL (or \
    --s3-endpoint) points at MinIO or another S3-compatible server. Set RUST_LOG=debug for more detail.\n\n\
    Example:\n  CAPTURE_WORKER_TOKEN=... worker run --coordinator https://coordinator:50051 --tls-ca ca.pem \\\n      \
    --store s3://captures/team --model google/gemma-2-2b-it --device cuda:0";

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Capture residual streams or layer internals for a prompt set
    Capture(CaptureArgs),
    /// Pull capture jobs from a coordinator until stopped (SIGTERM or Ctrl-C)
    #[command(long_about = RUN_LONG_ABOUT)]
    Run(RunArgs),
    /// Time plain generation and capture on random weights at real dimensions
    #[command(long_about = BENCH_LONG_ABOUT)]
    Bench(BenchArgs),
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("prompts").required(true).args(["prompt_set", "prompt_file", "prompt"])))]
pub struct CaptureArgs {
    /// Checkpoint directory, or a Hugging Face hub id fetched into the usual cache (HF_TOKEN and HF_ENDPOINT honoured)
    #[arg(long, default_value = "google/gemma-2-2b-it")]
    pub model: String,
    /// Hub revision (branch, tag or commit) to pin
    #[arg(long)]
    pub revision: Option<String>,
    /// Built-in prompt set: adversarial, baseline, dynamic, multi_trait, real_world, single_trait
    #[arg(long)]
    pub prompt_set: Option<String>,
    /// Custom prompt file {"name","description","prompts":[{"id","text","note"}]}; its file stem names the set in paths
    #[arg(long)]
    pub prompt_file: Option<PathBuf>,
    /// A single prompt (set "custom", id 1)
    #[arg(long)]
    pub prompt: Option<String>,
    /// residual: three residuals of every layer + head-averaged attention, one file per prompt; internals: q/k/v, per-head attention, MLP and residuals of --layers, one file per prompt and layer
    #[arg(long, value_parser = ["residual", "internals"])]
    pub mode: String,
    /// Layers for internals mode: 16, 1,3, 0-5 or all
    #[arg(long, default_value = "16")]
    pub layers: LayerSelection,
    /// Most response tokens per prompt; generation also stops after an end token of generation_config.json
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_new_tokens: u32,
    /// Choose the most likely token (the default when no --temperature is given)
    #[arg(long, conflicts_with_all = ["temperature", "top_p"])]
    pub greedy: bool,
    /// Sample with this temperature (needs --seed)
    #[arg(long, requires = "seed")]
    pub temperature: Option<f64>,
    /// Nucleus sampling: keep the smallest set of tokens with this much probability
    #[arg(long, requires = "temperature")]
    pub top_p: Option<f64>,
    /// Seed of the sampler; with the same model, prompt and parameters a run is reproducible
    #[arg(long)]
    pub seed: Option<u64>,
    /// Capture on the response tokens of an earlier capture in DIR (teacher forcing), e.g. to compare two model variants on one response
    #[arg(long, value_name = "DIR")]
    pub replay: Option<PathBuf>,
    /// Storage dtype of the captured tensors
    #[arg(long, default_value = "f32")]
    pub store_dtype: StoreDtype,
    /// Wrap each prompt in Gemma's chat template (recorded in the manifest)
    #[arg(long)]
    pub chat_template: bool,
    /// cpu, or cuda:N with a CUDA build
    #[arg(long, default_value = "cpu")]
    pub device: DeviceArg,
    /// Compute dtype: f32 (default on cpu), bf16 (default on cuda) or f16
    #[arg(long, value_parser = parse_compute_dtype)]
    pub dtype: Option<DType>,
    /// Prompts per forward pass: a number, or auto to fit as many as half of the free memory allows (at most 32); batching several prompts reads the weights once per step for all of them
    #[arg(long, default_value = "auto", value_name = "N|auto")]
    pub batch_size: BatchSize,
    /// Output root: artifacts go below it at the reference's relative paths, with manifest.json at the top
    #[arg(long)]
    pub out: PathBuf,
    /// Hide the progress bar
    #[arg(long)]
    pub quiet: bool,
}

impl CaptureArgs {
    pub fn into_options(self) -> CaptureOptions {
        let prompts = match (self.prompt_set, self.prompt_file, self.prompt) {
            (Some(set), _, _) => PromptSource::Set(set),
            (_, Some(file), _) => PromptSource::File(file),
            (_, _, Some(text)) => PromptSource::Text(text),
            (None, None, None) => unreachable!("clap requires one prompt source"),
        };
        let sampling = match self.temperature {
            Some(temperature) => Sampling::Temperature {
                temperature,
                top_p: self.top_p,
                seed: self.seed.unwrap_or_default(),
            },
            None => Sampling::Greedy,
        };
        CaptureOptions {
            model: ModelSource {
                spec: self.model,
                revision: self.revision,
            },
            prompts,
            mode: self.mode,
            layers: self.layers,
            max_new_tokens: self.max_new_tokens as usize,
            sampling,
            replay: self.replay,
            store_dtype: self.store_dtype,
            chat_template: self.chat_template,
            device: self.device,
            compute_dtype: self.dtype,
            batch_size: self.batch_size,
            out: self.out,
            progress: !self.quiet,
        }
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The coordinator's gRPC address: http://host:port or https://host:port
    #[arg(long, env = "CAPTURE_COORDINATOR")]
    pub coordinator: String,
    /// The artifact store, the same as the coordinator's: s3://bucket/prefix, gs://bucket/prefix, az://container/prefix, file:///dir or a local directory
    #[arg(long, env = "CAPTURE_STORE")]
    pub store: String,
    /// S3 endpoint for MinIO or another S3-compatible server, e.g. http://127.0.0.1:9000 (default: AWS_ENDPOINT_URL)
    #[arg(long, value_name = "URL")]
    pub s3_endpoint: Option<String>,
    /// Checkpoint directory, or a Hugging Face hub id fetched into the usual cache (HF_TOKEN and HF_ENDPOINT honoured)
    #[arg(long, default_value = "google/gemma-2-2b-it")]
    pub model: String,
    /// Hub revision (branch, tag or commit) to load; jobs are claimed for exactly this revision (none: the runs' default, "")
    #[arg(long)]
    pub revision: Option<String>,
    /// Model id to claim jobs for (default: the hub id, or the canonical path of a checkpoint directory)
    #[arg(long, value_name = "NAME")]
    pub model_id: Option<String>,
    /// cpu, or cuda:N with a CUDA build
    #[arg(long, default_value = "cpu")]
    pub device: DeviceArg,
    /// Compute dtype: f32 (default on cpu), bf16 (default on cuda) or f16
    #[arg(long, value_parser = parse_compute_dtype)]
    pub dtype: Option<DType>,
    /// Prompts per forward pass: a number, or auto to fit as many as half of the free memory allows (at most 32); batching several prompts reads the weights once per step for all of them
    #[arg(
        long,
        env = "CAPTURE_BATCH_SIZE",
        default_value = "auto",
        value_name = "N|auto"
    )]
    pub batch_size: BatchSize,
    /// Jobs captured at once (default: 1 on cpu, 4 on cuda); the prompts of those with the same capture settings share batches, so a GPU worker batches beyond one job's shard (coordinator submit --shard-size, 4 prompts by default). A job's uploads overlap the next jobs' capture
    #[arg(long, env = "CAPTURE_CONCURRENT_JOBS", value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub concurrent_jobs: Option<u16>,
    /// Bearer token for the coordinator (falls back to CAPTURE_TOKEN)
    #[arg(long, env = "CAPTURE_WORKER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM file of a certificate authority to trust for https:// coordinators (besides the system's)
    #[arg(long, value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
    /// This worker's id, a UUID (default: a fresh one)
    #[arg(long, value_name = "ID")]
    pub worker_id: Option<String>,
    /// On shutdown, how long the jobs held may still run before they are given back
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    pub drain_timeout: u64,
    /// Stop after this many jobs
    #[arg(long, value_name = "N")]
    pub max_jobs: Option<u64>,
    /// Stop as soon as the coordinator has no job for this worker
    #[arg(long)]
    pub exit_when_idle: bool,
    /// Serve Prometheus metrics on this address, e.g. 0.0.0.0:9091: GET /metrics, and GET /healthz for liveness probes (default: no endpoint)
    #[arg(long, env = "CAPTURE_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
}

impl RunArgs {
    pub fn into_options(self) -> PullOptions {
        let token = self
            .token
            .or_else(|| std::env::var("CAPTURE_TOKEN").ok())
            .and_then(|text| Token::new(&text));
        PullOptions {
            coordinator: ClientConfig {
                token,
                tls_ca: self.tls_ca,
                ..ClientConfig::new(self.coordinator)
            },
            store_url: self.store,
            store_options: StoreOptions {
                s3_endpoint: self.s3_endpoint,
                ..StoreOptions::default()
            },
            model: ModelSource {
                spec: self.model,
                revision: self.revision,
            },
            model_id: self.model_id,
            device: self.device,
            compute_dtype: self.dtype,
            batch_size: self.batch_size,
            concurrent_jobs: self.concurrent_jobs.map(usize::from),
            worker_id: self.worker_id,
            drain_timeout: Duration::from_secs(self.drain_timeout),
            max_jobs: self.max_jobs,
            exit_when_idle: self.exit_when_idle,
            metrics: WorkerMetrics::default(),
        }
    }
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Take the dimensions from this config.json instead of gemma-2-2b's
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Prompt length in tokens (including <bos>)
    #[arg(long, default_value_t = 30)]
    pub prompt_tokens: usize,
    /// Generated tokens per run
    #[arg(long, default_value_t = 20)]
    pub new_tokens: usize,
    /// Layer of the internals workload
    #[arg(long, default_value_t = 16)]
    pub layer: usize,
    /// Runs per workload; the best is reported
    #[arg(long, default_value_t = 1)]
    pub repeats: usize,
    /// cpu, or cuda:N with a CUDA build
    #[arg(long, default_value = "cpu")]
    pub device: DeviceArg,
    /// Compute dtype: f32 (default on cpu), bf16 (default on cuda) or f16
    #[arg(long, value_parser = parse_compute_dtype)]
    pub dtype: Option<DType>,
    /// Storage dtype of the random weight matrices, f32 or bf16; by default what loading the released (bf16) gemma-2-2b-it gives: bf16 on the CPU computing in f32 (widened exactly on the fly, half the bytes per step), else the compute dtype
    #[arg(long, value_parser = parse_compute_dtype)]
    pub weights: Option<DType>,
    /// Batch sizes of the batched residual-capture workloads, comma-separated (1 alone: none)
    #[arg(long, value_delimiter = ',', default_value = "4,16")]
    pub batch_sizes: Vec<usize>,
    /// Also run the transformers reference (KV cache + capture hooks, and the original full-recompute method) on the same shapes, prompt and token count, and print both side by side with the ratios
    #[arg(long)]
    pub compare_transformers: bool,
    /// Python with torch and transformers for --compare-transformers
    #[arg(long, env = "CAPTURE_PYTHON", default_value = "python3")]
    pub python: PathBuf,
    /// The reference benchmark script
    #[arg(long, default_value = "scripts/bench_transformers.py")]
    pub transformers_script: PathBuf,
    /// Also write the results as JSON to this file
    #[arg(long)]
    pub json: Option<PathBuf>,
}

impl BenchArgs {
    pub fn options(&self) -> anyhow::Result<BenchOptions> {
        let config = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)?;
                Gemma2Config::from_json(&text, &path.display().to_string())
                    .map_err(anyhow::Error::msg)?
            }
            None => Gemma2Config::gemma2_2b(),
        };
        anyhow::ensure!(
            self.layer < config.num_hidden_layers,
            "--layer {} is out of range: the model has {} layers",
            self.layer,
            config.num_hidden_layers
        );
        anyhow::ensure!(
            self.new_tokens > 0 && self.prompt_tokens > 0,
            "--new-tokens and --prompt-tokens must be positive"
        );
        if self.compare_transformers {
            anyhow::ensure!(
                self.config.is_none(),
                "--compare-transformers runs the reference at gemma-2-2b's dimensions: drop --config"
            );
            anyhow::ensure!(
                self.transformers_script.is_file(),
                "{} not found: run from the repository root or pass --transformers-script",
                self.transformers_script.display()
            );
        }
        Ok(BenchOptions {
            config,
            prompt_tokens: self.prompt_tokens,
            new_tokens: self.new_tokens,
            internals_layer: self.layer,
            device: self.device,
            compute_dtype: self.dtype,
            weight_dtype: self.weights,
            repeats: self.repeats.max(1),
            batch_sizes: self.batch_sizes.clone(),
            transformers: self.compare_transformers.then(|| TransformersBench {
                python: self.python.clone(),
                script: self.transformers_script.clone(),
                threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn every_option_of_every_command_says_what_it_does() {
        let mut cli = Cli::command();
        cli.build();
        cli.clone().debug_assert();
        let mut undocumented = Vec::new();
        for command in cli.get_subcommands() {
            for arg in command.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if !builtin && arg.get_help().is_none() && arg.get_long_help().is_none() {
                    undocumented.push(format!("worker {} --{}", command.get_name(), arg.get_id()));
                }
            }
        }
        assert!(undocumented.is_empty(), "no help: {undocumented:?}");
        let bench = cli.find_subcommand_mut("bench").unwrap();
        let help = bench.render_long_help().to_string();
        for switch in [
            "CAPTURE_UNFUSED=1",
            "CAPTURE_CUDA_DEFAULTS=1",
            "docs/benchmarks.md",
        ] {
            assert!(help.contains(switch), "{switch} missing from:\n{help}");
        }
    }
}
