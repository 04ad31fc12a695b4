//! Embedded mode: `coordinator submit` without `--coordinator` runs the
//! whole system in one process — the same queue (SQLite in a local state
//! directory), the same gRPC services on a loopback port only this process
//! knows the token of, and one in-process worker pulling jobs through them —
//! so a single machine needs no services.
//!
//! The run is followed to its end (the worker lives in this process). Runs
//! left unfinished by an earlier interrupted invocation stay queued in the
//! state directory and are resumed by the next one, oldest first.

use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use capture_proto::{ClientConfig, Token};
use capture_worker::loader::{DeviceArg, parse_compute_dtype};
use capture_worker::model_files::ModelSource;
use capture_worker::pull::{PullOptions, run_worker};
use capture_worker::store::{ArtifactStore, StoreOptions};
use clap::Args;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::client::{
    Connector, FollowOptions, SubmitArgs, WatchOptions, run_spec, submit_and_follow,
};
use crate::queue::{Queue, RetryPolicy};
use crate::server::{ServerConfig, serve};
use crate::service::{Coordinator, LeaseTiming};

/// Where embedded mode keeps its state: the queue's state directory and
/// the artifact store (shared by `submit` and `query`).
#[derive(Debug, Clone, Args)]
pub struct LocalStateArgs {
    /// Embedded mode: where the job queue (queue.db) lives
    /// [default: $CAPTURE_STATE_DIR, else $XDG_STATE_HOME/capture, else ~/.local/state/capture]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Embedded mode: where artifacts go (a directory, file:///dir or s3://bucket/prefix)
    #[arg(
        long,
        env = "CAPTURE_STORE",
        default_value = "captures",
        value_name = "URL"
    )]
    pub store: String,
}

/// Flags of `coordinator submit` that only embedded mode uses.
#[derive(Debug, Clone, Args)]
pub struct EmbeddedArgs {
    #[command(flatten)]
    pub local: LocalStateArgs,
    /// Embedded mode: device of the in-process worker (cpu or cuda:N)
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Embedded mode: compute dtype of the in-process worker (f32, bf16, f16)
    /// [default: f32 on the CPU, bf16 on GPUs]
    #[arg(long, value_name = "DTYPE")]
    pub dtype: Option<String>,
}

fn state_dir(given: Option<&PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(dir) = given {
        return Ok(dir.clone());
    }
    if let Some(dir) = std::env::var_os("CAPTURE_STATE_DIR").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("capture"));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .context("cannot find a state directory: set --state-dir, CAPTURE_STATE_DIR or HOME")?;
    Ok(PathBuf::from(home).join(".local/state/capture"))
}

/// The embedded coordinator's state: the SQLite queue in the state
/// directory (`state_dir`, else the default) and the store at `store_url`.
/// With `create`, missing directories are made; without (queries), a
/// missing state directory is an error that says how runs get there.
pub async fn open_local(
    state_dir_arg: Option<&PathBuf>,
    store_url: &str,
    create: bool,
) -> anyhow::Result<Arc<Coordinator>> {
    let state = state_dir(state_dir_arg)?;
    let queue_file = state.join("queue.db");
    if create {
        std::fs::create_dir_all(&state)
            .with_context(|| format!("cannot create the state directory {}", state.display()))?;
    } else if !queue_file.exists() {
        anyhow::bail!(
            "no embedded runs in {}: runs submitted without --coordinator live there (see --state-dir); for a cluster pass --coordinator URL",
            state.display()
        );
    }
    let database_url = format!("sqlite://{}?mode=rwc", queue_file.display());
    let queue = Queue::connect(&database_url)
        .await
        .with_context(|| format!("opening the embedded job queue {database_url}"))?
        .with_retry_policy(RetryPolicy::default());
    if create && !store_url.contains("://") {
        std::fs::create_dir_all(store_url)
            .with_context(|| format!("cannot create the store directory {store_url}"))?;
    }
    let store = ArtifactStore::from_url(store_url, &StoreOptions::default())
        .with_context(|| format!("opening the artifact store {store_url}"))?;
    Ok(Coordinator::new(queue, store, LeaseTiming::default()))
}

/// How long the embedded `submit` lets an ended run's finalization fail
/// before it stops and reports the error.
const FINALIZE_PATIENCE: Duration = Duration::from_secs(20);

/// `coordinator submit` with no `--coordinator`.
pub async fn submit(args: &SubmitArgs) -> anyhow::Result<ExitCode> {
    // Everything the user typed is checked before anything starts.
    let spec = run_spec(args)?;
    let embedded = &args.embedded;
    let device = DeviceArg::from_str(&embedded.device)
        .map_err(|e| anyhow::anyhow!("--device {}: {e}", embedded.device))?;
    let compute_dtype = embedded
        .dtype
        .as_deref()
        .map(parse_compute_dtype)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--dtype: {e}"))?;

    let timing = LeaseTiming::default();
    let state = state_dir(embedded.local.state_dir.as_ref())?;
    let coordinator = open_local(Some(&state), &embedded.local.store, true).await?;
    // Interrupted runs of earlier invocations: finalize those that ended.
    // One that still cannot be finalized is reported and does not stop
    // this run (see `stuck` below).
    coordinator.finalize_pending().await;
    let earlier_failures = coordinator.failing_finalizations();
    for (run, error) in &earlier_failures {
        eprintln!(
            "warning: run {run} of an earlier submit ended but cannot be finalized yet: {error}"
        );
    }

    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot open a loopback port for the embedded coordinator")?;
    let url = format!("http://{}", listener.local_addr()?);
    let token = Token::new(&uuid::Uuid::new_v4().simple().to_string());
    let config = ServerConfig {
        client_token: token.clone(),
        worker_token: token.clone(),
        tls: None,
        timing,
        sweep_interval: Duration::from_secs(2),
    };
    let (stop_server, server_stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(serve(
        Arc::clone(&coordinator),
        config,
        listener,
        async move {
            let _ = server_stopped.await;
        },
    ));

    let mut client_config = ClientConfig::new(url);
    client_config.token = token;
    let (stop_worker, worker_stopped) = oneshot::channel::<()>();
    let worker = tokio::spawn(run_worker(
        PullOptions {
            coordinator: client_config.clone(),
            store_url: embedded.local.store.clone(),
            store_options: StoreOptions::default(),
            model: ModelSource {
                spec: args.model.clone(),
                revision: args.revision.clone(),
            },
            model_id: None,
            device,
            compute_dtype,
            batch_size: capture_worker::run::BatchSize::Auto,
            concurrent_jobs: None,
            worker_id: None,
            drain_timeout: Duration::from_secs(5),
            max_jobs: None,
            exit_when_idle: false,
            metrics: capture_worker::metrics::WorkerMetrics::default(),
        },
        async move {
            let _ = worker_stopped.await;
        },
    ));

    let connector = Connector::new(client_config);
    let options = FollowOptions {
        wait: true,
        json: args.json,
        watch: WatchOptions::default(),
    };
    let followed = async {
        let mut client = connector.connect().await?;
        submit_and_follow(&mut client, spec, &options, || connector.connect()).await
    };
    // A run that ended but cannot be finalized (the store refuses us, say)
    // would be followed for ever: give up after a while, saying why.
    let stuck = async {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let stuck = coordinator
                .stuck_finalizations(FINALIZE_PATIENCE)
                .into_iter()
                .find(|(run, _)| !earlier_failures.iter().any(|(earlier, _)| earlier == run));
            if let Some(found) = stuck {
                return found;
            }
        }
    };
    tokio::pin!(worker);
    let outcome = tokio::select! {
        outcome = followed => outcome,
        (run, error) = stuck => {
            let _ = stop_worker.send(());
            let _ = (&mut worker).await;
            let _ = stop_server.send(());
            let _ = server.await;
            anyhow::bail!(
                "run {run} ended, but its artifacts could not be finalized for {} s: {error}; fix the store (credentials, rights, reachability) and run an embedded submit with the same --state-dir again: it finalizes the run first",
                FINALIZE_PATIENCE.as_secs()
            );
        }
        stopped = &mut worker => {
            let reason = match stopped {
                Ok(Ok(_)) => "it stopped".to_owned(),
                Ok(Err(error)) => format!("{error:#}"),
                Err(error) => format!("it panicked: {error}"),
            };
            let _ = stop_server.send(());
            let _ = server.await;
            anyhow::bail!(
                "the in-process worker could not run the jobs: {reason}; the run stays queued in {} and resumes with the next embedded submit",
                state.display()
            );
        }
    };
    let _ = stop_worker.send(());
    let _ = (&mut worker).await;
    let _ = stop_server.send(());
    let _ = server.await;
    outcome
}
