//! Submitting a run and, with `--wait`, following it to its end: the
//! library side of `coordinator submit`, callable on any connected client
//! (a remote coordinator, or the embedded one).

use std::future::Future;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::bail;
use capture_proto::CaptureClient;
use capture_proto::client::MAX_MESSAGE_BYTES;
use capture_proto::prost::Message;
use capture_proto::v1::{
    GetRunRequest, JobState, RunProgress, RunSpec, SubmitRunRequest, SubmitRunResponse,
};

use super::connect::call_error;
use super::render::{DeadJobView, OutcomeView, SubmitView, outcome_text, submitted_text, to_json};
use super::watch::{WatchOptions, watch_run};

/// What [`submit_and_follow`] prints and whether it waits.
#[derive(Debug, Clone, Default)]
pub struct FollowOptions {
    /// Follow the run until it ends (`--wait`).
    pub wait: bool,
    /// Print one JSON object on stdout instead of text (`--json`).
    pub json: bool,
    /// Progress bar and reconnection settings of the wait.
    pub watch: WatchOptions,
}

/// How a followed run ended, with its dead jobs' last errors.
#[derive(Debug, Clone, PartialEq)]
pub struct FinishedRun {
    pub run_id: String,
    pub outcome: OutcomeView,
    /// From the start of the watch to its end.
    pub elapsed: std::time::Duration,
}

impl FinishedRun {
    /// 0 when every job succeeded; 1 when a job is dead or the run was
    /// cancelled.
    pub fn exit_code(&self) -> ExitCode {
        if self.outcome.is_success() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    }

    /// The summary (success) or error text (failure) for people.
    pub fn text(&self) -> String {
        outcome_text(&self.run_id, &self.outcome, self.elapsed)
    }
}

/// Queues the run `spec` describes (`SubmitRun`).
pub async fn submit_run(
    client: &mut CaptureClient,
    spec: RunSpec,
) -> anyhow::Result<SubmitRunResponse> {
    let request = SubmitRunRequest { spec: Some(spec) };
    // Over the limit, tonic's encoder resets the stream and the caller would
    // only see "h2 protocol error"; say what is too large instead.
    let bytes = request.encoded_len();
    if bytes > MAX_MESSAGE_BYTES {
        bail!(
            "submitting the run: the request is {bytes} bytes, more than the {MAX_MESSAGE_BYTES} \
             a request may carry; split large prompt files over several runs"
        );
    }
    client
        .submit_run(request)
        .await
        .map(|response| response.into_inner())
        .map_err(|status| call_error("submitting the run", &status))
}

/// Follows run `run_id` to its end ([`watch_run`], reconnecting through
/// `reconnect` when the stream breaks) and, when jobs died, fetches their
/// last errors with `GetRun`.
pub async fn follow_run<C, Fut>(
    client: &mut CaptureClient,
    run_id: &str,
    reconnect: C,
    options: &WatchOptions,
) -> anyhow::Result<FinishedRun>
where
    C: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<CaptureClient>>,
{
    let started = Instant::now();
    let last = watch_run(client, run_id, reconnect, options).await?;
    let dead_jobs = dead_jobs(client, &last).await;
    Ok(FinishedRun {
        run_id: run_id.to_owned(),
        outcome: OutcomeView::new(&last, dead_jobs),
        elapsed: started.elapsed(),
    })
}

/// The dead jobs of a finished run; none when it has none, or (with a
/// warning) when the coordinator cannot say.
async fn dead_jobs(client: &mut CaptureClient, last: &RunProgress) -> Vec<DeadJobView> {
    if last.jobs.as_ref().is_none_or(|jobs| jobs.dead == 0) {
        return Vec::new();
    }
    let request = GetRunRequest {
        run_id: last.run_id.clone(),
        include_jobs: true,
    };
    let run = match client.get_run(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => {
            let error = call_error("listing the dead jobs", &status);
            tracing::warn!(run_id = %last.run_id, error = format!("{error:#}"), "cannot list dead jobs");
            return Vec::new();
        }
    };
    run.job_details
        .iter()
        .filter(|job| job.state() == JobState::Dead)
        .map(|job| DeadJobView {
            job_id: job.job_id.clone(),
            job_key: job.job_key.clone(),
            attempt: job.attempt,
            last_error: job.last_error.clone(),
        })
        .collect()
}

/// `coordinator submit` on a connected client: submits `spec`, prints the
/// run id (stdout) and a summary (stderr), and with `options.wait` follows
/// the run to its end.
///
/// Returns exit code 1, after printing `error: ...` with the dead jobs and
/// their last errors, when a job is dead or the run was cancelled. With
/// `options.json` stdout gets one JSON object ([`SubmitView`]) instead,
/// holding the outcome when waiting. `reconnect` opens a fresh client when
/// the watch breaks (e.g. `|| connector.connect()` with a
/// [`Connector`](super::Connector)).
pub async fn submit_and_follow<C, Fut>(
    client: &mut CaptureClient,
    spec: RunSpec,
    options: &FollowOptions,
    reconnect: C,
) -> anyhow::Result<ExitCode>
where
    C: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<CaptureClient>>,
{
    let response = submit_run(client, spec).await?;
    let mut view = SubmitView::from(&response);
    if options.json && !options.wait {
        println!("{}", to_json(&view));
        return Ok(ExitCode::SUCCESS);
    }
    if !options.json {
        println!("{}", response.run_id);
    }
    eprintln!("{}", submitted_text(&response));
    if !options.wait {
        return Ok(ExitCode::SUCCESS);
    }

    let finished = follow_run(client, &response.run_id, reconnect, &options.watch).await?;
    if options.json {
        view.outcome = Some(finished.outcome.clone());
        println!("{}", to_json(&view));
    }
    if finished.outcome.is_success() {
        eprintln!("{}", finished.text());
    } else {
        eprintln!("error: {}", finished.text());
    }
    Ok(finished.exit_code())
}
