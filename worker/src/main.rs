//! The `worker` binary: parses the command line and calls the library.

use std::process::ExitCode;

use capture_worker::bench::run_bench;
use capture_worker::cli::{Cli, Command};
use capture_worker::run::run_capture;
use clap::Parser;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Capture(args) => capture(args),
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
    eprintln!(
        "captured {} artifact(s) of set {} ({} tokens in {:.1} s) under {}",
        summary.artifacts.len(),
        summary.prompt_set,
        summary.generated_tokens,
        summary.seconds,
        out.display()
    );
    Ok(())
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
