//! Following a run with `WatchRun` until it ends: a progress bar on stderr,
//! and reconnection with backoff when the stream breaks (a coordinator
//! restart), since the server answers every new watch with the run's
//! current progress.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::bail;
use capture_proto::CaptureClient;
use capture_proto::tonic::Status;
use capture_proto::v1::{RunProgress, WatchRunRequest};
use indicatif::{HumanDuration, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::connect::{call_error, is_reconnectable};
use super::render::{JobCountsView, progress_message};

/// How a watch shows progress and rides out a lost coordinator.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// Draw a progress bar on stderr (indicatif hides it when stderr is not
    /// a terminal).
    pub progress_bar: bool,
    /// First wait before reconnecting; doubled after each failure.
    pub initial_backoff: Duration,
    /// Longest wait between reconnections.
    pub max_backoff: Duration,
    /// Give up once the coordinator has been unreachable this long without
    /// a single progress message.
    pub give_up_after: Duration,
}

impl Default for WatchOptions {
    fn default() -> Self {
        Self {
            progress_bar: true,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
            give_up_after: Duration::from_secs(15 * 60),
        }
    }
}

/// How one `WatchRun` stream ended.
enum StreamEnd {
    /// The message whose state is terminal.
    Finished(RunProgress),
    /// Closed by the server before the run ended (it is shutting down).
    Closed,
    /// The call or the stream failed.
    Failed(Status),
}

/// Follows run `run_id` until its state is terminal and returns the last
/// progress message.
///
/// When the stream breaks or cannot be opened, it waits (exponential
/// backoff with jitter), replaces `*client` with `reconnect()`'s and
/// watches again; it gives up after [`WatchOptions::give_up_after`] without
/// any message. Answers that will not change (unknown run, bad token) end
/// the watch with their error at once.
pub async fn watch_run<C, Fut>(
    client: &mut CaptureClient,
    run_id: &str,
    mut reconnect: C,
    options: &WatchOptions,
) -> anyhow::Result<RunProgress>
where
    C: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<CaptureClient>>,
{
    let bar = progress_bar(options.progress_bar);
    let mut backoff = options.initial_backoff;
    let mut outage_since: Option<Instant> = None;
    let mut connected = true;
    loop {
        let problem = if connected {
            let mut received = false;
            let end = follow_stream(client, run_id, |progress| {
                received = true;
                show(&bar, progress);
            })
            .await;
            if received {
                outage_since = None;
                backoff = options.initial_backoff;
            }
            match end {
                StreamEnd::Finished(last) => {
                    bar.finish_and_clear();
                    return Ok(last);
                }
                StreamEnd::Closed => {
                    "the coordinator closed the watch before the run ended".to_owned()
                }
                StreamEnd::Failed(status) if is_reconnectable(&status) => {
                    format!("{:#}", call_error("watching", &status))
                }
                StreamEnd::Failed(status) => {
                    bar.abandon();
                    return Err(call_error(format!("watching run {run_id}"), &status));
                }
            }
        } else {
            match reconnect().await {
                Ok(new_client) => {
                    *client = new_client;
                    connected = true;
                    continue;
                }
                Err(error) => format!("{error:#}"),
            }
        };

        let since = *outage_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= options.give_up_after {
            bar.abandon();
            bail!(
                "lost the coordinator while watching run {run_id} and gave up after {}: {problem}; \
                 the run goes on without this watch (see `coordinator status {run_id}`)",
                HumanDuration(since.elapsed())
            );
        }
        let wait = with_jitter(backoff);
        tracing::warn!(run_id, problem = %problem, retry_in_ms = wait.as_millis() as u64, "watch interrupted, reconnecting");
        bar.set_message(format!("coordinator unreachable, reconnecting: {problem}"));
        tokio::time::sleep(wait).await;
        backoff = (backoff * 2).min(options.max_backoff);
        connected = false;
    }
}

/// One `WatchRun` call, feeding each message to `on_progress`.
async fn follow_stream(
    client: &mut CaptureClient,
    run_id: &str,
    mut on_progress: impl FnMut(&RunProgress),
) -> StreamEnd {
    let request = WatchRunRequest {
        run_id: run_id.to_owned(),
    };
    let mut stream = match client.watch_run(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => return StreamEnd::Failed(status),
    };
    loop {
        match stream.message().await {
            Ok(Some(progress)) => {
                on_progress(&progress);
                if progress.finished || progress.state().is_terminal() {
                    return StreamEnd::Finished(progress);
                }
            }
            Ok(None) => return StreamEnd::Closed,
            Err(status) => return StreamEnd::Failed(status),
        }
    }
}

fn progress_bar(visible: bool) -> ProgressBar {
    if !visible {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {bar:30.cyan/blue} {pos}/{len} jobs · {msg}",
    )
    .expect("the progress template is valid")
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_message("connecting");
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

fn show(bar: &ProgressBar, progress: &RunProgress) {
    let jobs = JobCountsView::from(progress.jobs.as_ref());
    bar.set_length(jobs.total.into());
    bar.set_position(jobs.finished().into());
    bar.set_message(progress_message(progress));
}

/// `backoff` plus up to a fifth more, so that many clients do not
/// reconnect in lockstep.
fn with_jitter(backoff: Duration) -> Duration {
    let extra_ms = rand::random_range(0..=backoff.as_millis() as u64 / 5);
    backoff + Duration::from_millis(extra_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_a_fifth() {
        for _ in 0..100 {
            let wait = with_jitter(Duration::from_millis(1000));
            assert!(wait >= Duration::from_millis(1000) && wait <= Duration::from_millis(1200));
        }
        assert_eq!(with_jitter(Duration::ZERO), Duration::ZERO);
    }
}
