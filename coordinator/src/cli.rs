//! The `coordinator` command line: argument definitions and the library
//! function each subcommand runs, so that `main.rs` only parses, sets up
//! tracing and calls [`run`].

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use crate::bench_query::{BenchQueryConfig, GEMMA_PROMPT_TOKENS, bench_query};
use crate::bench_queue::{BenchQueueConfig, bench_queue};
use crate::client::{RunArgs, RunsArgs, StatusArgs, SubmitArgs};
use crate::soak::{SoakConfig, soak};

/// Coordinator of capture runs: owns the job queue (Postgres for a cluster,
/// SQLite embedded) that workers claim capture jobs from, and the client
/// commands that submit and follow runs.
#[derive(Debug, Parser)]
#[command(name = "coordinator", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or upgrade the job queue's schema, then exit.
    ///
    /// Applies the embedded migrations that have not run yet; running it
    /// again is a no-op. Example:
    ///
    ///   coordinator migrate --database-url postgres://capture:capture@127.0.0.1:5432/capture
    Migrate(DatabaseArgs),
    /// Serve the coordinator: the gRPC CaptureService, WorkerService, QueryService and grpc.health.v1.
    ///
    /// Applies the queue's migrations, then hands jobs to workers under
    /// fenced leases, re-queues expired leases, promotes accepted attempts'
    /// artifacts to their documented keys and writes each finished run's
    /// manifest.json at its root. Stops on SIGTERM or Ctrl-C. Example:
    ///
    ///   coordinator serve --database-url postgres://capture:capture@127.0.0.1:5432/capture --store s3://my-bucket/captures --listen 0.0.0.0:50051
    Serve(crate::server::ServeArgs),
    /// Measure job queue throughput with synthetic jobs, then verify them.
    ///
    /// Creates one run of --jobs jobs under a fresh experiment name
    /// (bench-queue-<run id>) and a model no real worker serves, then runs
    /// --workers concurrent loops that each claim a job and complete it with
    /// one small artifact row, until no job is left. Prints a markdown table:
    /// job transitions per second (claims + completions over wall time),
    /// p50/p99 latency of claim and of complete, and wall time. Then checks
    /// the queue's own records (list_jobs, list_attempts, run_status): every
    /// job must have succeeded exactly once, on attempt 1. Exits non-zero if
    /// not. The run stays in the database; use a scratch database. Example:
    ///
    ///   createdb capture_bench
    ///
    ///   coordinator bench-queue --database-url postgres://capture:capture@127.0.0.1:5432/capture_bench --workers 16 --jobs 5000
    BenchQueue(BenchQueueArgs),
    /// Soak the whole job path on loopback: real gRPC workers, real server, real queue.
    ///
    /// Starts a coordinator gRPC server in this process on 127.0.0.1 (the
    /// queue at --database-url, a local artifact store in a temporary
    /// directory), submits one run of --jobs one-prompt jobs through
    /// CaptureService, and drains it with --workers simulated workers: real
    /// WorkerService clients, one connection each, that claim (long poll),
    /// heartbeat from a separate task at the advertised interval, sleep
    /// about --job-ms instead of capturing, stage a small file where a real
    /// worker stages its artifact, and complete. --fail-rate injects
    /// retryable failures; --zombie-rate makes workers go silent past their
    /// lease and then complete anyway, which must be refused.
    ///
    /// When the run's manifest is written, prints a markdown table (claim,
    /// heartbeat and complete latency p50/p90/p99/max, jobs per second,
    /// lease losses) and checks the database and the store: every job
    /// succeeded exactly once with one accepted completion and one artifact
    /// row, no two attempts of a job overlap in time (no lease held twice),
    /// every artifact promoted, nothing left in staging (zombies uploading
    /// after finalization are counted apart), manifest complete. Exits
    /// non-zero on any violation, and fails once --max-seconds have passed.
    /// The run stays in the database; use a scratch database. Example:
    ///
    ///   createdb capture_soak
    ///
    ///   coordinator soak --database-url postgres://capture:capture@127.0.0.1:5432/capture_soak --workers 200 --jobs 10000 --job-ms 200
    Soak(SoakArgs),
    /// Measure what a trait projection reads: ranged reads versus whole files.
    ///
    /// Writes a synthetic run of --prompts raw residual artifacts at
    /// Gemma-2-2B's shapes (--layers 26, --hidden 2304, prompts of 26-43
    /// tokens, --response-tokens 50, head-averaged attention included,
    /// random values in --dtype) under a fresh run root
    /// bench-query/<run id> of --store, staged as a worker stages them.
    /// Then projects one random trait vector at --layer of every artifact
    /// two ways, side by side: ranged reads of that layer's six residual
    /// tensors (what `coordinator query project` does), and a GET of each
    /// whole file decoded in memory. Both must give bit-identical scores,
    /// or the command fails. Prints a markdown table of bytes read,
    /// requests and wall time (median of --repeats runs) with the ratios
    /// whole / ranged; --all-layers adds the same for every layer. Deletes
    /// what it wrote unless --keep. At f32 the run is about 80 MB per file
    /// (4 GB for 50); bf16 halves it. Example:
    ///
    ///   curl -X PUT http://127.0.0.1:5599/bench && AWS_ENDPOINT_URL=http://127.0.0.1:5599 coordinator bench-query --store s3://bench/captures --prompts 50 --layer 16
    BenchQuery(BenchQueryArgs),
    /// Submit a run of captures; print its id, and with --wait follow it to the end.
    ///
    /// The run is split into jobs of at most --shard-size prompts of one
    /// prompt set and one capture mode, which workers pull from the
    /// coordinator's queue; artifacts go below the run's artifact root in the
    /// object store (printed on stderr). Prompt files are read here and sent
    /// to the coordinator, which checks everything before queueing anything.
    ///
    /// Prints the run id on stdout. With --wait, shows a progress bar (jobs
    /// done / total, tokens captured, state) until the run ends, riding out
    /// coordinator restarts, and exits 1 with the dead jobs' last errors if
    /// a job is dead or the run was cancelled. With --json, prints one JSON
    /// object instead (run_id, job_count, artifact_root, and with --wait the
    /// outcome).
    ///
    /// With --coordinator URL (or CAPTURE_COORDINATOR) the run goes to that
    /// coordinator (`coordinator serve`); without, an embedded coordinator
    /// runs it in this process. Examples:
    ///
    ///   coordinator submit --coordinator http://10.0.0.5:50051 --prompt-set dynamic --wait
    ///
    ///   coordinator submit --prompt-set adversarial --prompt-file my_prompts.json --mode both --layers 0,12
    ///
    ///   coordinator submit --prompt-set baseline --experiment exp1 --temperature 0.7 --seed 1 --json
    Submit(SubmitArgs),
    /// Show a run: state, job counts, timings, artifact root and totals.
    ///
    /// With --jobs, also a table of its jobs: key, state, attempt / max
    /// attempts, worker and last error. Example:
    ///
    ///   coordinator status 0190f5c2-7a3e-7b1c-9d2a-3c4b5d6e7f80 --jobs --coordinator http://10.0.0.5:50051
    Status(StatusArgs),
    /// List runs, newest first.
    ///
    /// Shows id, state, experiment, model, finished / total jobs, dead
    /// jobs, tokens captured and creation time of at most --limit runs.
    /// Example:
    ///
    ///   coordinator runs --experiment exp1 --state failed --limit 10 --coordinator http://10.0.0.5:50051
    Runs(RunsArgs),
    /// Cancel a run: its queued jobs are dropped and its workers told to stop.
    ///
    /// Jobs that already succeeded keep their artifacts. A run that already
    /// finished cannot be cancelled. Example:
    ///
    ///   coordinator cancel 0190f5c2-7a3e-7b1c-9d2a-3c4b5d6e7f80 --coordinator http://10.0.0.5:50051
    Cancel(RunArgs),
    /// Queue a run's dead jobs again, with a fresh retry budget.
    ///
    /// Jobs that succeeded are not run again. Example:
    ///
    ///   coordinator retry 0190f5c2-7a3e-7b1c-9d2a-3c4b5d6e7f80 --coordinator http://10.0.0.5:50051
    Retry(RunArgs),
    /// Analyse captured runs without downloading them: runs, artifacts, projections, dynamics, comparisons, tensors.
    ///
    /// Reads run records from the coordinator's database and only the bytes
    /// each answer needs from the artifacts (ranged reads of the .pt files).
    /// With --coordinator URL the coordinator's QueryService answers; without,
    /// the embedded state of `coordinator submit` (--state-dir, --store) is
    /// read in this process. JSON by default, --format csv on request,
    /// --plot FILE.png for pictures. Examples:
    ///
    ///   coordinator query runs --experiment exp1
    ///
    ///   coordinator query project RUN --vector experiments/my_exp --trait behavior/refusal --layers 16 --plot refusal.png
    ///
    ///   coordinator query compare RUN_A RUN_B --vector refusal_probe_layer16.pt --format csv
    #[command(subcommand)]
    Query(crate::client::query::QueryCommand),
}

#[derive(Debug, Args)]
pub struct DatabaseArgs {
    /// The queue's database: postgres://USER:PASS@HOST:PORT/DB, or
    /// sqlite://PATH?mode=rwc for an embedded file (created if missing).
    #[arg(long, env = "DATABASE_URL", value_name = "URL", hide_env_values = true)]
    pub database_url: String,
}

#[derive(Debug, Args)]
pub struct BenchQueueArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Concurrent claim -> complete loops (tokio tasks sharing one pool;
    /// the Postgres pool holds at most 16 connections).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub workers: u32,
    /// Jobs in the benchmark run.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub jobs: u32,
    /// Lease each claim asks for, in milliseconds. Keep it longer than the
    /// whole benchmark: an expired lease makes the verification fail.
    #[arg(long, default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..=604_800_000))]
    pub lease_ms: u64,
}

#[derive(Debug, Args)]
pub struct SoakArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Simulated workers, each a WorkerService client on its own connection.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=2_000))]
    pub workers: u32,
    /// Jobs in the run, one prompt each.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub jobs: u32,
    /// Mean duration of a fake capture in milliseconds (each job draws
    /// 0.5x to 1.5x of it).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(0..=600_000))]
    pub job_ms: u64,
    /// Lease the coordinator grants; heartbeats extend it.
    #[arg(long, default_value_t = 5.0, value_name = "SECONDS")]
    pub lease_seconds: f64,
    /// Heartbeat interval the coordinator advertises (under --lease-seconds).
    #[arg(long, default_value_t = 0.1, value_name = "SECONDS")]
    pub heartbeat_seconds: f64,
    /// Fraction of attempts that fail with a retryable error (0 to 0.5).
    #[arg(long, default_value_t = 0.0)]
    pub fail_rate: f64,
    /// Fraction of attempts whose worker goes silent past its lease, then
    /// completes anyway (0 to 0.5); each holds its worker for the lease plus 1 s.
    #[arg(long, default_value_t = 0.0)]
    pub zombie_rate: f64,
    /// Hard bound on the whole soak; past it, it stops and fails.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub max_seconds: u64,
}

impl SoakArgs {
    /// The soak these flags ask for.
    pub fn config(&self) -> anyhow::Result<SoakConfig> {
        let seconds = |name: &str, value: f64| {
            Duration::try_from_secs_f64(value)
                .ok()
                .filter(|d| !d.is_zero())
                .with_context(|| {
                    format!("--{name} must be a positive number of seconds, got {value}")
                })
        };
        Ok(SoakConfig {
            workers: self.workers as usize,
            jobs: self.jobs as usize,
            job_duration: Duration::from_millis(self.job_ms),
            lease: seconds("lease-seconds", self.lease_seconds)?,
            heartbeat: seconds("heartbeat-seconds", self.heartbeat_seconds)?,
            fail_rate: self.fail_rate,
            zombie_rate: self.zombie_rate,
            max_duration: Duration::from_secs(self.max_seconds),
        })
    }
}

#[derive(Debug, Args)]
pub struct BenchQueryArgs {
    /// Where to write the synthetic run: s3://bucket/prefix (AWS_* variables),
    /// another store URL, or a local directory.
    #[arg(long, env = "CAPTURE_STORE")]
    pub store: String,
    /// S3 endpoint for MinIO, moto and other S3-compatible stores
    /// (AWS_ENDPOINT_URL works too).
    #[arg(long, env = "CAPTURE_S3_ENDPOINT", value_name = "URL")]
    pub s3_endpoint: Option<String>,
    /// Artifacts in the synthetic run, one per prompt.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub prompts: u32,
    /// Layers per artifact (Gemma-2-2B has 26).
    #[arg(long, default_value_t = 26, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub layers: u32,
    /// Residual stream width (Gemma-2-2B: 2304).
    #[arg(long, default_value_t = 2304, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub hidden: u32,
    /// Generated tokens per prompt.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(0..=4096))]
    pub response_tokens: u32,
    /// Storage dtype of the tensors: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: capture_worker::pt::StoreDtype,
    /// The layer projected.
    #[arg(long, default_value_t = 16)]
    pub layer: u32,
    /// Runs of each measurement; the table shows the median.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub repeats: u32,
    /// Also measure projecting every layer, both ways (for context).
    #[arg(long)]
    pub all_layers: bool,
    /// Artifacts read at once, by either method.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub concurrency: u32,
    /// Seed of the random values and the trait vector.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Leave the synthetic run in the store.
    #[arg(long)]
    pub keep: bool,
}

impl BenchQueryArgs {
    /// The benchmark these flags ask for.
    pub fn config(&self) -> BenchQueryConfig {
        BenchQueryConfig {
            prompts: self.prompts as usize,
            layers: self.layers as usize,
            hidden: self.hidden as usize,
            prompt_tokens: GEMMA_PROMPT_TOKENS,
            response_tokens: self.response_tokens as usize,
            dtype: self.dtype,
            layer: self.layer as usize,
            repeats: self.repeats as usize,
            all_layers: self.all_layers,
            concurrency: self.concurrency as usize,
            seed: self.seed,
            keep: self.keep,
        }
    }
}

/// Runs the parsed command; the exit code is a failure when a benchmark's
/// verification found problems.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Migrate(args) => migrate(&args).await,
        Command::Serve(args) => crate::server::run(args).await.map(|()| ExitCode::SUCCESS),
        Command::BenchQueue(args) => run_bench_queue(&args).await,
        Command::BenchQuery(args) => run_bench_query(&args).await,
        Command::Soak(args) => run_soak(&args).await,
        Command::Submit(args) => match args.connection.coordinator {
            Some(_) => crate::client::submit_command(&args).await,
            None => crate::embedded::submit(&args).await,
        },
        Command::Status(args) => crate::client::status_command(&args).await,
        Command::Runs(args) => crate::client::runs_command(&args).await,
        Command::Cancel(args) => crate::client::cancel_command(&args).await,
        Command::Retry(args) => crate::client::retry_command(&args).await,
        Command::Query(command) => crate::client::query::query_command(&command).await,
    }
}

async fn migrate(args: &DatabaseArgs) -> anyhow::Result<ExitCode> {
    let shown_url = redact_database_url(&args.database_url);
    let queue = crate::connect(&args.database_url)
        .await
        .with_context(|| format!("migrating {shown_url}"))?;
    println!(
        "migrations applied to {shown_url} ({})",
        queue.backend_name()
    );
    Ok(ExitCode::SUCCESS)
}

async fn run_bench_queue(args: &BenchQueueArgs) -> anyhow::Result<ExitCode> {
    let shown_url = redact_database_url(&args.database.database_url);
    let queue = crate::connect(&args.database.database_url)
        .await
        .with_context(|| format!("opening the queue at {shown_url}"))?;
    let config = BenchQueueConfig {
        workers: args.workers as usize,
        jobs: args.jobs as usize,
        lease: Duration::from_millis(args.lease_ms),
    };
    tracing::info!(
        database = %shown_url,
        workers = config.workers,
        jobs = config.jobs,
        "starting queue benchmark"
    );
    let report = bench_queue(&queue, config)
        .await
        .with_context(|| format!("benchmarking the queue at {shown_url}"))?;
    println!("{}", report.to_markdown());
    if report.is_clean() {
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!(
        "verification failed: {} of {} jobs succeeded exactly once (run {})",
        report.jobs_succeeded_once, config.jobs, report.run_id
    );
    for problem in &report.problems {
        eprintln!("  {problem}");
    }
    Ok(ExitCode::FAILURE)
}

async fn run_soak(args: &SoakArgs) -> anyhow::Result<ExitCode> {
    let shown_url = redact_database_url(&args.database.database_url);
    let config = args.config()?;
    tracing::info!(database = %shown_url, workers = config.workers, jobs = config.jobs, "starting soak");
    let report = soak(&args.database.database_url, config)
        .await
        .with_context(|| format!("soaking the coordinator on {shown_url}"))?;
    println!("{}", report.to_markdown());
    if report.is_clean() {
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!(
        "verification failed: {} of {} jobs succeeded exactly once (run {})",
        report.jobs_succeeded_once, config.jobs, report.run_id
    );
    for problem in &report.problems {
        eprintln!("  {problem}");
    }
    Ok(ExitCode::FAILURE)
}

async fn run_bench_query(args: &BenchQueryArgs) -> anyhow::Result<ExitCode> {
    let options = capture_worker::store::StoreOptions {
        s3_endpoint: args.s3_endpoint.clone().filter(|url| !url.is_empty()),
        ..capture_worker::store::StoreOptions::default()
    };
    let store = capture_worker::store::ArtifactStore::from_url(&args.store, &options)
        .with_context(|| format!("opening the store {}", args.store))?;
    let config = args.config();
    tracing::info!(store = %args.store, prompts = config.prompts, dtype = %config.dtype, layer = config.layer, "starting query benchmark");
    let report = bench_query(&store, config)
        .await
        .with_context(|| format!("benchmarking queries on {}", args.store))?;
    println!("{}", report.to_markdown());
    Ok(ExitCode::SUCCESS)
}

/// `url` with any password replaced by `***`, both in the user info
/// (`postgres://user:***@host/db`) and in a `password=` query parameter.
pub fn redact_database_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest_start = scheme_end + 3;
    let (scheme, rest) = url.split_at(rest_start);
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path_and_query) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((user_info, host)) => match user_info.split_once(':') {
            Some((user, _password)) => format!("{user}:***@{host}"),
            None => authority.to_owned(),
        },
        None => authority.to_owned(),
    };
    let path_and_query = match path_and_query.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((key, _)) if key.eq_ignore_ascii_case("password") => {
                        format!("{key}=***")
                    }
                    _ => pair.to_owned(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => path_and_query.to_owned(),
    };
    format!("{scheme}{authority}{path_and_query}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn redacts_passwords_and_keeps_the_rest() {
        assert_eq!(
            redact_database_url("postgres://capture:s3cret@127.0.0.1:5432/capture_bench"),
            "postgres://capture:***@127.0.0.1:5432/capture_bench"
        );
        assert_eq!(
            redact_database_url("postgresql://user:p@ss@host/db?sslmode=disable&password=x"),
            "postgresql://user:***@host/db?sslmode=disable&password=***"
        );
        assert_eq!(
            redact_database_url("postgres://capture@host/db"),
            "postgres://capture@host/db"
        );
        assert_eq!(
            redact_database_url("sqlite://state/queue.db?mode=rwc"),
            "sqlite://state/queue.db?mode=rwc"
        );
        assert_eq!(redact_database_url("sqlite::memory:"), "sqlite::memory:");
    }

    #[test]
    fn every_option_of_every_command_says_what_it_does() {
        let mut cli = Cli::command();
        cli.build();
        let mut undocumented = Vec::new();
        let mut commands: Vec<(String, &clap::Command)> = vec![("coordinator".into(), &cli)];
        while let Some((path, command)) = commands.pop() {
            for arg in command.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if !builtin && arg.get_help().is_none() && arg.get_long_help().is_none() {
                    undocumented.push(format!("{path} --{}", arg.get_id()));
                }
            }
            for sub in command.get_subcommands() {
                commands.push((format!("{path} {}", sub.get_name()), sub));
            }
        }
        assert!(undocumented.is_empty(), "no help: {undocumented:?}");
    }

    #[test]
    fn cli_definition_is_valid_and_parses_bench_defaults() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "coordinator",
            "bench-queue",
            "--database-url",
            "sqlite://x.db?mode=rwc",
        ])
        .unwrap();
        let Command::BenchQueue(args) = cli.command else {
            panic!("expected bench-queue");
        };
        assert_eq!((args.workers, args.jobs, args.lease_ms), (16, 5000, 30_000));
        assert!(
            Cli::try_parse_from([
                "coordinator",
                "bench-queue",
                "--database-url",
                "x",
                "--workers",
                "0"
            ])
            .is_err()
        );
    }
}
