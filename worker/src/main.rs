//! The `worker` binary: parses the command line and calls the library.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context as _;
use capture_worker::bench::run_bench;
use capture_worker::cli::{Cli, Command};
use capture_worker::metrics::serve_worker_metrics;
use capture_worker::pull::run_worker;
use capture_worker::run::run_capture;
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The pulling worker reports each job; the one-shot commands stay quiet.
    let default_filter = match cli.command {
        Command::Run(_) => "info",
        Command::Capture(_) | Command::Bench(_) => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let result = match cli.command {
        Command::Capture(args) => capture(args),
        Command::Run(args) => run(args),
        Command::Bench(args) => bench(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn capture(args: capture_worker::cli::CaptureArgs) -> anyhow::Result<()> {
    let out = args.out.clone();
    let summary = run_capture(&args.into_options())?;
    let peak = summary
        .peak_memory_bytes
        .map(|b| format!(", peak memory {:.2} GiB", b as f64 / (1u64 << 30) as f64))
        .unwrap_or_default();
    eprintln!(
        "captured {} artifact(s) of set {} ({} tokens in {:.1} s, {} prompt(s) per batch{peak}) under {}",
        summary.artifacts.len(),
        summary.prompt_set,
        summary.generated_tokens,
        summary.seconds,
        summary.batch_size,
        out.display()
    );
    Ok(())
}

/// `worker run` on a multi-threaded runtime, stopped by SIGTERM or Ctrl-C.
fn run(args: capture_worker::cli::RunArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let metrics_listen = args.metrics_listen;
    let options = args.into_options();
    let report = runtime.block_on(async {
        // Up before the model loads, so liveness probes pass while it does.
        let _metrics = match metrics_listen {
            Some(addr) => {
                let endpoint = serve_worker_metrics(addr, &options.metrics)
                    .await
                    .with_context(|| format!("cannot serve metrics on {addr}"))?;
                tracing::info!(listen = %endpoint.local_addr(), "serving metrics");
                Some(endpoint)
            }
            None => None,
        };
        anyhow::Ok(run_worker(options, shutdown_signal()).await?)
    })?;
    // A capture stopped at the drain timeout may still be finishing its
    // prompt on a blocking thread; its job is already given back.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    eprintln!(
        "worker stopped: {} job(s) completed, {} failed, {} released, {} lease(s) lost, {} tokens captured",
        report.jobs_completed,
        report.jobs_failed,
        report.jobs_released,
        report.leases_lost,
        report.tokens_captured
    );
    Ok(())
}

/// Resolves on the first SIGTERM or Ctrl-C (SIGINT).
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; Ctrl-C still stops the worker");
                std::future::pending::<()>().await;
            }
        }
    };
    let interrupt = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::warn!(%error, "cannot listen for Ctrl-C; SIGTERM still stops the worker");
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
}

fn bench(args: capture_worker::cli::BenchArgs) -> anyhow::Result<()> {
    let options = args.options()?;
    let report = run_bench(&options, &mut |line| eprintln!("{line}"))?;
    println!("{}", report.to_markdown());
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(())
}
