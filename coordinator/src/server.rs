//! `coordinator serve`: the gRPC server (CaptureService, WorkerService and
//! `grpc.health.v1`) over the job queue and the artifact store, with the
//! sweeper that re-queues expired leases and finalizes finished runs.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use capture_proto::client::{MAX_MESSAGE_BYTES, RequireToken};
use capture_proto::tonic::transport::{Identity, Server, ServerTlsConfig};
use capture_proto::{CaptureServiceServer, QueryServiceServer, Token, WorkerServiceServer};
use capture_worker::store::{ArtifactStore, StoreOptions};
use clap::Args;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::metrics::LeaseLossKind;
use crate::query::QueryApi;
use crate::queue::{JobQueue, Queue, RetryPolicy};
use crate::service::{CaptureApi, Coordinator, LeaseTiming, WorkerApi};

/// Flags of `coordinator serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Job queue database: postgres://USER:PASS@HOST:PORT/DB for a cluster,
    /// or sqlite://PATH?mode=rwc on one machine. Migrations are applied at start.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// Where artifacts go: s3://bucket/prefix (AWS_* variables; AWS_ENDPOINT_URL
    /// or CAPTURE_S3_ENDPOINT for MinIO and other S3-compatible stores),
    /// gs://bucket/prefix (GOOGLE_APPLICATION_CREDENTIALS), az://container/prefix
    /// (AZURE_STORAGE_ACCOUNT_NAME and _KEY), file:///dir, or a local directory path.
    #[arg(long, env = "CAPTURE_STORE")]
    pub store: String,
    /// Address to listen on (use 0.0.0.0:50051 to accept other machines).
    #[arg(long, env = "CAPTURE_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Bearer token clients must send (submit, status, cancel, ...); none
    /// by default. Never logged.
    #[arg(long, env = "CAPTURE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Bearer token workers must send; defaults to --token. Never logged.
    #[arg(long, env = "CAPTURE_WORKER_TOKEN", hide_env_values = true)]
    pub worker_token: Option<String>,
    /// PEM certificate chain to serve TLS with (needs --tls-key).
    #[arg(long, env = "CAPTURE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "CAPTURE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// How long a job's lease lasts without a heartbeat; a worker killed
    /// mid-job loses its job to another after at most this long.
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
    pub lease_seconds: f64,
    /// How often workers heartbeat their job (well under --lease-seconds).
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    pub heartbeat_seconds: f64,
    /// How often expired leases are re-queued and finished runs finalized.
    #[arg(long, default_value_t = 2.0, value_name = "SECONDS")]
    pub sweep_seconds: f64,
    /// Attempts a job gets before it is dead.
    #[arg(long, default_value_t = 3)]
    pub max_attempts: i32,
    /// Wait before the first retry of a failed job (doubles each time, jittered).
    #[arg(long, default_value_t = 5.0, value_name = "SECONDS")]
    pub retry_delay_seconds: f64,
    /// Serve Prometheus metrics on this address, e.g. 0.0.0.0:9090 (GET
    /// /metrics, GET /healthz); no endpoint by default.
    #[arg(long, env = "CAPTURE_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
}

/// Everything the server needs besides the queue and store.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub client_token: Option<Token>,
    pub worker_token: Option<Token>,
    pub tls: Option<(PathBuf, PathBuf)>,
    pub timing: LeaseTiming,
    pub sweep_interval: Duration,
}

fn seconds(name: &str, value: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| !d.is_zero())
        .with_context(|| format!("--{name} must be a positive number of seconds, got {value}"))
}

impl ServeArgs {
    pub fn server_config(&self) -> anyhow::Result<ServerConfig> {
        let timing = LeaseTiming {
            lease: seconds("lease-seconds", self.lease_seconds)?,
            heartbeat: seconds("heartbeat-seconds", self.heartbeat_seconds)?,
            ..LeaseTiming::default()
        };
        anyhow::ensure!(
            timing.heartbeat < timing.lease,
            "--heartbeat-seconds ({}) must be shorter than --lease-seconds ({})",
            self.heartbeat_seconds,
            self.lease_seconds
        );
        let client_token = self.token.as_deref().and_then(Token::new);
        let worker_token = self
            .worker_token
            .as_deref()
            .and_then(Token::new)
            .or_else(|| client_token.clone());
        Ok(ServerConfig {
            client_token,
            worker_token,
            tls: self.tls_cert.clone().zip(self.tls_key.clone()),
            timing,
            sweep_interval: seconds("sweep-seconds", self.sweep_seconds)?,
        })
    }

    pub fn retry_policy(&self) -> anyhow::Result<RetryPolicy> {
        anyhow::ensure!(
            (1..=100).contains(&self.max_attempts),
            "--max-attempts must be between 1 and 100, got {}",
            self.max_attempts
        );
        let base_delay = seconds("retry-delay-seconds", self.retry_delay_seconds)?;
        Ok(RetryPolicy {
            max_attempts: self.max_attempts,
            base_delay,
            max_delay: base_delay.saturating_mul(60),
        })
    }
}

/// Opens the queue (applying migrations) and the store named by `args`.
pub async fn open(args: &ServeArgs) -> anyhow::Result<Arc<Coordinator>> {
    let config = args.server_config()?;
    let queue = Queue::connect(&args.database_url)
        .await
        .context("opening the job queue")?
        .with_retry_policy(args.retry_policy()?);
    let store = ArtifactStore::from_url(&args.store, &StoreOptions::default())
        .with_context(|| format!("opening the artifact store {}", args.store))?;
    Ok(Coordinator::new(queue, store, config.timing))
}

/// `coordinator serve`: runs until SIGTERM or Ctrl-C.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.server_config()?;
    let coordinator = open(&args).await?;
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let _metrics = match args.metrics_listen {
        Some(addr) => {
            let endpoint = crate::metrics::serve_metrics(&coordinator, addr)
                .await
                .with_context(|| format!("cannot serve metrics on {addr}"))?;
            info!(listen = %endpoint.local_addr(), "serving metrics");
            Some(endpoint)
        }
        None => None,
    };
    info!(
        listen = %listener.local_addr()?,
        queue = coordinator.queue().backend_name(),
        store = %coordinator.store().url(),
        tls = config.tls.is_some(),
        client_auth = config.client_token.is_some(),
        worker_auth = config.worker_token.is_some(),
        "coordinator serving"
    );
    eprintln!(
        "coordinator listening on {} (queue: {}, store: {})",
        listener.local_addr()?,
        coordinator.queue().backend_name(),
        coordinator.store().url()
    );
    serve(coordinator, config, listener, shutdown_signal()).await
}

/// Serves both services and health on `listener` until `shutdown`
/// resolves, sweeping in the background.
pub async fn serve(
    coordinator: Arc<Coordinator>,
    config: ServerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let (health_reporter, health_service) = capture_proto::tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<CaptureServiceServer<CaptureApi>>()
        .await;
    health_reporter
        .set_serving::<WorkerServiceServer<WorkerApi>>()
        .await;
    health_reporter
        .set_serving::<QueryServiceServer<QueryApi>>()
        .await;
    let capture = capture_proto::tonic::service::interceptor::InterceptedService::new(
        CaptureServiceServer::new(CaptureApi::new(Arc::clone(&coordinator)))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        RequireToken::new(config.client_token.clone()),
    );
    let query = capture_proto::tonic::service::interceptor::InterceptedService::new(
        QueryServiceServer::new(QueryApi::new(Arc::clone(&coordinator)))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        RequireToken::new(config.client_token.clone()),
    );
    let worker = capture_proto::tonic::service::interceptor::InterceptedService::new(
        WorkerServiceServer::new(WorkerApi::new(Arc::clone(&coordinator)))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        RequireToken::new(config.worker_token.clone()),
    );
    let mut builder = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .tcp_keepalive(Some(Duration::from_secs(60)));
    if let Some((cert, key)) = &config.tls {
        // rustls is built with both aws-lc-rs and ring (hf-hub's ureq wants
        // ring), so it cannot pick a provider on its own, and tonic's server
        // asks for the process default: name it (an error means one is set).
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let cert_pem = std::fs::read(cert)
            .with_context(|| format!("cannot read the TLS certificate {}", cert.display()))?;
        let key_pem = std::fs::read(key)
            .with_context(|| format!("cannot read the TLS key {}", key.display()))?;
        builder = builder
            .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert_pem, key_pem)))
            .context("setting up TLS")?;
    }
    let sweeper = tokio::spawn(sweep(Arc::clone(&coordinator), config.sweep_interval));
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let served = builder
        .add_service(health_service)
        .add_service(capture)
        .add_service(query)
        .add_service(worker)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    sweeper.abort();
    served.context("the gRPC server failed")?;
    info!("coordinator stopped");
    Ok(())
}

/// How often the staging of recently finalized runs is swept, and how far
/// back: a zombie uploads at most about a lease and a drain timeout after it
/// lost its job, far less than an hour.
const STAGING_SWEEP_EVERY: Duration = Duration::from_secs(60);
const STAGING_SWEEP_WINDOW: Duration = Duration::from_secs(3600);

/// Every `interval`: re-queue expired leases, then finalize finished runs;
/// every [`STAGING_SWEEP_EVERY`], delete late uploads from the staging of
/// runs finalized in the last [`STAGING_SWEEP_WINDOW`].
async fn sweep(coordinator: Arc<Coordinator>, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut staging_swept = tokio::time::Instant::now();
    loop {
        ticker.tick().await;
        if staging_swept.elapsed() >= STAGING_SWEEP_EVERY {
            staging_swept = tokio::time::Instant::now();
            coordinator
                .sweep_finalized_staging(STAGING_SWEEP_WINDOW)
                .await;
        }
        match coordinator.queue().reap_expired().await {
            Ok(report) if report.requeued + report.dead > 0 => {
                coordinator
                    .metrics()
                    .lease_lost(LeaseLossKind::Expired, report.requeued + report.dead);
                info!(
                    requeued = report.requeued,
                    dead = report.dead,
                    "expired leases reaped"
                );
            }
            Ok(_) => {}
            Err(error) => warn!(%error, "reaping expired leases failed; will retry"),
        }
        coordinator.finalize_pending().await;
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    info!("shutdown signal received");
}
