//! The `coordinator` binary: parses the command line, sets up tracing and
//! the runtime, and hands over to [`capture_coordinator::cli::run`].

use std::process::ExitCode;

use capture_coordinator::cli::{Cli, run};
use clap::Parser as _;
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(cli))
}
