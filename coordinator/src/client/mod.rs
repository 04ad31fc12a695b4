//! The client commands of the `coordinator` binary — `submit`, `status`,
//! `runs`, `cancel`, `retry` — talking to a coordinator's `CaptureService`
//! over gRPC.
//!
//! Each command is a library function: [`submit_command`] and friends
//! connect with the command's flags and print; the pieces below them work on
//! any connected [`CaptureClient`], which is how embedded mode reuses them:
//!
//! ```no_run
//! # async fn example(args: capture_coordinator::client::SubmitArgs) -> anyhow::Result<()> {
//! use capture_coordinator::client::{run_spec, submit_and_follow, Connector, FollowOptions};
//! use capture_proto::ClientConfig;
//!
//! let spec = run_spec(&args)?; // reads --prompt-file files
//! let connector = Connector::new(ClientConfig::new("http://127.0.0.1:50051"));
//! let mut client = connector.connect().await?;
//! let options = FollowOptions { wait: true, ..FollowOptions::default() };
//! let exit = submit_and_follow(&mut client, spec, &options, || connector.connect()).await?;
//! # let _ = exit;
//! # Ok(())
//! # }
//! ```
//!
//! - [`run_spec`]: `submit`'s flags → the wire `RunSpec`.
//! - [`submit_run`], [`follow_run`], [`submit_and_follow`]: submit, and
//!   follow a run to its end with [`watch_run`] (progress bar, reconnection
//!   with backoff when the coordinator restarts).
//! - [`get_run`], [`list_runs`], [`cancel_run`], [`retry_run`]: the other
//!   calls, returning what the commands print.
//! - [`render`]: `--json` views and the human text.
//!
//! Failed calls become one-line errors through
//! [`CaptureServiceError::from_status`](capture_proto::CaptureServiceError::from_status)
//! ([`call_error`]); the binary prints them as `error: ...` and exits 1.

mod args;
mod connect;
pub mod query;
pub mod render;
mod spec;
mod status;
mod submit;
mod watch;

use std::process::ExitCode;

pub use args::{
    ConnectionArgs, LayersArg, ModeArg, RunArgs, RunStateArg, RunsArgs, StatusArgs, StoreDtypeArg,
    SubmitArgs,
};
pub use capture_proto::CaptureClient;
pub use connect::{Connector, call_error, is_reconnectable};
pub use spec::run_spec;
pub use status::{RunFilter, cancel_run, get_run, list_runs, retry_run};
pub use submit::{FinishedRun, FollowOptions, follow_run, submit_and_follow, submit_run};
pub use watch::{WatchOptions, watch_run};

use render::{RunView, RunsView, to_json};

/// `coordinator submit --coordinator URL ...`: builds the run from the
/// flags (before connecting, so bad input costs no round trip), submits it
/// and with `--wait` follows it. Embedded mode (no `--coordinator`) is the
/// caller's business.
pub async fn submit_command(args: &SubmitArgs) -> anyhow::Result<ExitCode> {
    let spec = run_spec(args)?;
    let connector = Connector::from_args(&args.connection, "submit")?.suggesting_embedded();
    let mut client = connector.connect().await?;
    let options = FollowOptions {
        wait: args.wait,
        json: args.json,
        watch: WatchOptions::default(),
    };
    submit_and_follow(&mut client, spec, &options, || connector.connect()).await
}

/// `coordinator status RUN`: the run's state, counts, timings and totals,
/// with `--jobs` a table of its jobs.
pub async fn status_command(args: &StatusArgs) -> anyhow::Result<ExitCode> {
    let mut client = Connector::from_args(&args.connection, "status")?
        .connect()
        .await?;
    let run = get_run(&mut client, args.run, args.jobs).await?;
    if args.json {
        println!("{}", to_json(&RunView::new(&run, args.jobs)));
    } else {
        print!("{}", render::run_text(&run, chrono::Utc::now(), args.jobs));
    }
    Ok(ExitCode::SUCCESS)
}

/// `coordinator runs`: a table of runs, newest first.
pub async fn runs_command(args: &RunsArgs) -> anyhow::Result<ExitCode> {
    let mut client = Connector::from_args(&args.connection, "runs")?
        .connect()
        .await?;
    let filter = RunFilter {
        experiment: args.experiment.clone(),
        state: args.state.map(Into::into),
    };
    let runs = list_runs(&mut client, &filter, args.limit).await?;
    if args.json {
        let view = RunsView {
            runs: runs.iter().map(|run| RunView::new(run, false)).collect(),
        };
        println!("{}", to_json(&view));
    } else {
        print!("{}", render::runs_table(&runs));
    }
    Ok(ExitCode::SUCCESS)
}

/// `coordinator cancel RUN`.
pub async fn cancel_command(args: &RunArgs) -> anyhow::Result<ExitCode> {
    let mut client = Connector::from_args(&args.connection, "cancel")?
        .connect()
        .await?;
    let view = cancel_run(&mut client, args.run).await?;
    if args.json {
        println!("{}", to_json(&view));
    } else {
        println!("{}", view.to_text());
    }
    Ok(ExitCode::SUCCESS)
}

/// `coordinator retry RUN`: requeues the run's dead jobs.
pub async fn retry_command(args: &RunArgs) -> anyhow::Result<ExitCode> {
    let mut client = Connector::from_args(&args.connection, "retry")?
        .connect()
        .await?;
    let view = retry_run(&mut client, args.run).await?;
    if args.json {
        println!("{}", to_json(&view));
    } else {
        println!("{}", view.to_text());
    }
    Ok(ExitCode::SUCCESS)
}
