//! What the client commands print: small serde views of the wire messages
//! for `--json`, and the human text (summaries, tables) built from them.
//!
//! Everything here is pure (the current time is a parameter), so tests
//! compare the exact text.

use std::fmt::Write as _;
use std::time::Duration;

use capture_proto::prost_types::Timestamp;
use capture_proto::v1::{
    CancelRunResponse, JobCounts, JobInfo, RetryRunResponse, Run, RunProgress, SubmitRunResponse,
};
use chrono::{DateTime, Utc};
use indicatif::{HumanBytes, HumanCount};
use serde::Serialize;

/// Longest last error shown in a table cell; `--json` has the whole text.
const TABLE_ERROR_CHARS: usize = 100;

/// A run's job counts, for `--json`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct JobCountsView {
    pub total: u32,
    pub queued: u32,
    pub leased: u32,
    pub succeeded: u32,
    pub dead: u32,
    pub cancelled: u32,
}

impl JobCountsView {
    /// Jobs in a terminal state.
    pub fn finished(&self) -> u32 {
        self.succeeded + self.dead + self.cancelled
    }
}

impl From<Option<&JobCounts>> for JobCountsView {
    fn from(counts: Option<&JobCounts>) -> Self {
        let Some(counts) = counts else {
            return Self::default();
        };
        Self {
            total: counts.total,
            queued: counts.queued,
            leased: counts.leased,
            succeeded: counts.succeeded,
            dead: counts.dead,
            cancelled: counts.cancelled,
        }
    }
}

/// One job of a run, for `--json` and the `status --jobs` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobView {
    pub job_id: String,
    pub job_key: String,
    pub state: &'static str,
    pub prompt_set: String,
    pub prompt_ids: Vec<String>,
    pub mode: String,
    pub attempt: u32,
    pub max_attempts: u32,
    pub worker_id: String,
    pub lease_expires_at: Option<String>,
    pub last_error: String,
}

impl From<&JobInfo> for JobView {
    fn from(job: &JobInfo) -> Self {
        let mode = job.mode.as_ref().map(mode_name).unwrap_or_default();
        Self {
            job_id: job.job_id.clone(),
            job_key: job.job_key.clone(),
            state: job.state().short_name(),
            prompt_set: job.prompt_set.clone(),
            prompt_ids: job.prompt_ids.clone(),
            mode,
            attempt: job.attempt,
            max_attempts: job.max_attempts,
            worker_id: job.worker_id.clone(),
            lease_expires_at: job.lease_expires_at.as_ref().map(rfc3339),
            last_error: job.last_error.clone(),
        }
    }
}

/// A run, for `status --json` and `runs --json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunView {
    pub run_id: String,
    pub state: &'static str,
    pub experiment: String,
    pub model_id: String,
    pub model_revision: String,
    pub modes: Vec<String>,
    pub jobs: JobCountsView,
    pub artifact_root: String,
    pub created_at: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub tokens_captured: u64,
    pub artifacts_written: u64,
    pub bytes_written: u64,
    /// Only with `status --jobs`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_details: Option<Vec<JobView>>,
}

impl RunView {
    /// The view of `run`; `with_jobs` keeps its job details.
    pub fn new(run: &Run, with_jobs: bool) -> Self {
        let spec = run.spec.clone().unwrap_or_default();
        Self {
            run_id: run.run_id.clone(),
            state: run.state().short_name(),
            experiment: spec.experiment,
            model_id: spec.model_id,
            model_revision: spec.model_revision,
            modes: spec.modes.iter().map(mode_name).collect(),
            jobs: run.jobs.as_ref().into(),
            artifact_root: run.artifact_root.clone(),
            created_at: run.created_at.as_ref().map(rfc3339),
            started_at: run.started_at.as_ref().map(rfc3339),
            finished_at: run.finished_at.as_ref().map(rfc3339),
            tokens_captured: run.tokens_captured,
            artifacts_written: run.artifacts_written,
            bytes_written: run.bytes_written,
            job_details: with_jobs.then(|| run.job_details.iter().map(JobView::from).collect()),
        }
    }
}

/// `runs --json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunsView {
    pub runs: Vec<RunView>,
}

/// A dead job and why, in the outcome of a failed run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadJobView {
    pub job_id: String,
    pub job_key: String,
    pub attempt: u32,
    pub last_error: String,
}

/// How a followed run ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutcomeView {
    pub state: &'static str,
    pub jobs: JobCountsView,
    pub tokens_captured: u64,
    pub artifacts_written: u64,
    pub bytes_written: u64,
    /// Every dead job with its last error (empty when the coordinator could
    /// not be asked for them).
    pub dead_jobs: Vec<DeadJobView>,
}

impl OutcomeView {
    /// The outcome of the run's last progress message and its dead jobs.
    pub fn new(progress: &RunProgress, dead_jobs: Vec<DeadJobView>) -> Self {
        Self {
            state: progress.state().short_name(),
            jobs: progress.jobs.as_ref().into(),
            tokens_captured: progress.tokens_captured,
            artifacts_written: progress.artifacts_written,
            bytes_written: progress.bytes_written,
            dead_jobs,
        }
    }

    /// Whether every job succeeded: no dead job, not cancelled.
    pub fn is_success(&self) -> bool {
        self.state == "succeeded" && self.jobs.dead == 0 && self.jobs.cancelled == 0
    }
}

/// `submit --json`: the new run, and with `--wait` how it ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SubmitView {
    pub run_id: String,
    pub job_count: u32,
    pub artifact_root: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<OutcomeView>,
}

impl From<&SubmitRunResponse> for SubmitView {
    fn from(response: &SubmitRunResponse) -> Self {
        Self {
            run_id: response.run_id.clone(),
            job_count: response.job_count,
            artifact_root: response.artifact_root.clone(),
            outcome: None,
        }
    }
}

/// `cancel --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CancelView {
    pub run_id: String,
    pub state: &'static str,
    pub jobs_cancelled: u32,
}

impl CancelView {
    pub fn new(run_id: &str, response: &CancelRunResponse) -> Self {
        Self {
            run_id: run_id.to_owned(),
            state: response.state().short_name(),
            jobs_cancelled: response.jobs_cancelled,
        }
    }

    /// One line: how many jobs were cancelled.
    pub fn to_text(&self) -> String {
        format!(
            "cancelled run {}: {} queued or leased {} stopped (state {})",
            self.run_id,
            self.jobs_cancelled,
            plural(self.jobs_cancelled.into(), "job", "jobs"),
            self.state
        )
    }
}

/// `retry --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RetryView {
    pub run_id: String,
    pub state: &'static str,
    pub jobs_requeued: u32,
}

impl RetryView {
    pub fn new(run_id: &str, response: &RetryRunResponse) -> Self {
        Self {
            run_id: run_id.to_owned(),
            state: response.state().short_name(),
            jobs_requeued: response.jobs_requeued,
        }
    }

    /// One line: how many dead jobs were queued again.
    pub fn to_text(&self) -> String {
        if self.jobs_requeued == 0 {
            return format!(
                "run {} has no dead jobs: nothing to retry (state {})",
                self.run_id, self.state
            );
        }
        format!(
            "requeued {} dead {} of run {} (state {}); follow it with `coordinator status {}`",
            self.jobs_requeued,
            plural(self.jobs_requeued.into(), "job", "jobs"),
            self.run_id,
            self.state,
            self.run_id
        )
    }
}

/// JSON text of a view, pretty-printed.
pub fn to_json<T: Serialize>(view: &T) -> String {
    serde_json::to_string_pretty(view).expect("views serialize to JSON")
}

/// The line printed on stderr after a submission.
pub fn submitted_text(response: &SubmitRunResponse) -> String {
    format!(
        "submitted run {}: {} {}, artifacts at {}",
        response.run_id,
        response.job_count,
        plural(response.job_count.into(), "job", "jobs"),
        response.artifact_root
    )
}

/// The progress bar's message: state, tokens and anything gone wrong.
pub fn progress_message(progress: &RunProgress) -> String {
    let jobs = JobCountsView::from(progress.jobs.as_ref());
    let mut message = format!(
        "{} · {} tokens · {} leased",
        progress.state().short_name(),
        HumanCount(progress.tokens_captured),
        jobs.leased
    );
    if jobs.dead > 0 {
        let _ = write!(message, " · {} dead", jobs.dead);
    }
    message
}

/// The summary of a run that ended well, or the error text of one that did
/// not (dead jobs with their last errors, or a cancellation).
pub fn outcome_text(run_id: &str, outcome: &OutcomeView, elapsed: Duration) -> String {
    let jobs = &outcome.jobs;
    let totals = format!(
        "{} tokens, {} {} ({})",
        HumanCount(outcome.tokens_captured),
        HumanCount(outcome.artifacts_written),
        plural(outcome.artifacts_written, "artifact", "artifacts"),
        HumanBytes(outcome.bytes_written)
    );
    if outcome.is_success() {
        return format!(
            "run {run_id} succeeded: {}/{} jobs, {totals} in {}",
            jobs.succeeded,
            jobs.total,
            duration_text(elapsed)
        );
    }
    if outcome.state == "cancelled" {
        return format!(
            "run {run_id} was cancelled: {} of {} jobs succeeded, {} cancelled, {} dead",
            jobs.succeeded, jobs.total, jobs.cancelled, jobs.dead
        );
    }
    let mut text = format!(
        "run {run_id} {}: {} of {} jobs dead, {} succeeded; retry them with `coordinator retry {run_id}`",
        outcome.state, jobs.dead, jobs.total, jobs.succeeded
    );
    for job in &outcome.dead_jobs {
        let _ = write!(
            text,
            "\n  job {} (attempt {}): {}",
            job.job_key,
            job.attempt,
            one_line(&job.last_error)
        );
    }
    text
}

/// `status`: a run as labelled lines, with the jobs table under `--jobs`.
pub fn run_text(run: &Run, now: DateTime<Utc>, with_jobs: bool) -> String {
    let view = RunView::new(run, false);
    let jobs = view.jobs;
    let mut model = view.model_id.clone();
    if !view.model_revision.is_empty() {
        let _ = write!(model, " @ {}", view.model_revision);
    }
    let mut lines = vec![
        ("run", view.run_id.clone()),
        ("state", view.state.to_owned()),
        ("experiment", view.experiment.clone()),
        ("model", model),
        ("modes", view.modes.join(", ")),
        (
            "jobs",
            format!(
                "{}/{} done: {} succeeded, {} dead, {} cancelled, {} leased, {} queued",
                jobs.finished(),
                jobs.total,
                jobs.succeeded,
                jobs.dead,
                jobs.cancelled,
                jobs.leased,
                jobs.queued
            ),
        ),
        ("created", time_text(run.created_at.as_ref())),
        ("started", time_text(run.started_at.as_ref())),
        ("finished", time_text(run.finished_at.as_ref())),
    ];
    if let Some(elapsed) = elapsed(run, now) {
        lines.push(("elapsed", duration_text(elapsed)));
    }
    lines.push(("artifacts", view.artifact_root.clone()));
    lines.push((
        "captured",
        format!(
            "{} tokens, {} {} ({})",
            HumanCount(view.tokens_captured),
            HumanCount(view.artifacts_written),
            plural(view.artifacts_written, "artifact", "artifacts"),
            HumanBytes(view.bytes_written)
        ),
    ));
    let mut text = String::new();
    for (label, value) in lines {
        let _ = writeln!(text, "{label:<10}  {value}");
    }
    if with_jobs {
        text.push('\n');
        text.push_str(&jobs_table(&run.job_details));
    }
    text
}

/// `status --jobs`: one row per job.
pub fn jobs_table(jobs: &[JobInfo]) -> String {
    if jobs.is_empty() {
        return "no jobs\n".to_owned();
    }
    let rows = jobs
        .iter()
        .map(|job| {
            vec![
                job.job_key.clone(),
                job.state().short_name().to_owned(),
                format!("{}/{}", job.attempt, job.max_attempts),
                dash_if_empty(&job.worker_id),
                dash_if_empty(&truncate(&one_line(&job.last_error), TABLE_ERROR_CHARS)),
            ]
        })
        .collect();
    table(&["JOB", "STATE", "ATTEMPT", "WORKER", "LAST ERROR"], rows)
}

/// `runs`: one row per run, newest first as the coordinator lists them.
pub fn runs_table(runs: &[Run]) -> String {
    if runs.is_empty() {
        return "no runs\n".to_owned();
    }
    let rows = runs
        .iter()
        .map(|run| {
            let view = RunView::new(run, false);
            vec![
                view.run_id,
                view.state.to_owned(),
                view.experiment,
                view.model_id,
                format!("{}/{}", view.jobs.finished(), view.jobs.total),
                view.jobs.dead.to_string(),
                HumanCount(view.tokens_captured).to_string(),
                time_text(run.created_at.as_ref()),
            ]
        })
        .collect();
    table(
        &[
            "RUN",
            "STATE",
            "EXPERIMENT",
            "MODEL",
            "DONE",
            "DEAD",
            "TOKENS",
            "CREATED",
        ],
        rows,
    )
}

/// Left-aligned columns two spaces apart, without trailing spaces.
fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    let mut text = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (cell, width) in row.iter().zip(&widths) {
            let _ = write!(line, "{cell:<width$}  ");
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

fn mode_name(mode: &capture_proto::v1::CaptureMode) -> String {
    let kind = mode.kind().short_name().unwrap_or("unspecified");
    if mode.kind() != capture_proto::v1::CaptureModeKind::Internals {
        return kind.to_owned();
    }
    if mode.all_layers {
        return format!("{kind} (all layers)");
    }
    let layers: Vec<String> = mode.layers.iter().map(ToString::to_string).collect();
    format!("{kind} (layers {})", layers.join(","))
}

fn datetime(timestamp: &Timestamp) -> Option<DateTime<Utc>> {
    let nanos = u32::try_from(timestamp.nanos).unwrap_or(0);
    DateTime::from_timestamp(timestamp.seconds, nanos)
}

pub fn rfc3339(timestamp: &Timestamp) -> String {
    datetime(timestamp)
        .map(|time| time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

fn time_text(timestamp: Option<&Timestamp>) -> String {
    timestamp
        .and_then(datetime)
        .map(|time| time.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| "-".to_owned())
}

/// From the first claim to the end, or to `now` while the run goes on.
fn elapsed(run: &Run, now: DateTime<Utc>) -> Option<Duration> {
    let started = datetime(run.started_at.as_ref()?)?;
    let until = run.finished_at.as_ref().and_then(datetime).unwrap_or(now);
    (until - started).to_std().ok()
}

/// A duration to a tenth of a second under 10 s (`0.8s`, `4.9s`: a small run
/// on the embedded coordinator takes about a second), else to the second
/// (`42s`, `1m 30s`, `2h 05m 00s`).
pub fn duration_text(duration: Duration) -> String {
    if duration < Duration::from_secs(10) {
        // Truncated, as whole seconds are below, so 9.96 s is not "10.0s".
        let tenths = duration.as_millis() / 100;
        return format!("{}.{}s", tenths / 10, tenths % 10);
    }
    let seconds = duration.as_secs();
    let (hours, minutes, seconds) = (seconds / 3600, seconds / 60 % 60, seconds % 60);
    if hours > 0 {
        format!("{hours}h {minutes:02}m {seconds:02}s")
    } else if minutes > 0 {
        format!("{minutes}m {seconds:02}s")
    } else {
        format!("{seconds}s")
    }
}

fn plural(count: u64, one: &'static str, many: &'static str) -> &'static str {
    if count == 1 { one } else { many }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn truncate(text: &str, max_chars: usize) -> String {
    if text.chars().count() <= max_chars {
        return text.to_owned();
    }
    let mut short: String = text.chars().take(max_chars - 1).collect();
    short.push('…');
    short
}

fn dash_if_empty(text: &str) -> String {
    if text.is_empty() {
        "-".to_owned()
    } else {
        text.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use capture_proto::v1::{CaptureMode, CaptureModeKind, JobState, RunSpec, RunState};

    use super::*;

    const RUN_ID: &str = "0190f5c2-7a3e-7b1c-9d2a-3c4b5d6e7f80";

    fn at(seconds: i64) -> Option<Timestamp> {
        Some(Timestamp { seconds, nanos: 0 })
    }

    fn counts(total: u32, succeeded: u32, dead: u32) -> Option<JobCounts> {
        Some(JobCounts {
            total,
            succeeded,
            dead,
            queued: total - succeeded - dead,
            ..Default::default()
        })
    }

    fn sample_run() -> Run {
        Run {
            run_id: RUN_ID.into(),
            spec: Some(RunSpec {
                experiment: "exp1".into(),
                model_id: "google/gemma-2-2b-it".into(),
                model_revision: "main".into(),
                modes: vec![
                    CaptureMode {
                        kind: CaptureModeKind::Residual as i32,
                        ..Default::default()
                    },
                    CaptureMode {
                        kind: CaptureModeKind::Internals as i32,
                        layers: vec![0, 5],
                        all_layers: false,
                    },
                ],
                ..Default::default()
            }),
            state: RunState::Running as i32,
            jobs: counts(4, 2, 1),
            artifact_root: "s3://bucket/captures/exp1/run/".into(),
            created_at: at(1_735_689_600),
            started_at: at(1_735_689_610),
            finished_at: None,
            tokens_captured: 12_345,
            artifacts_written: 6,
            bytes_written: 3 * 1024 * 1024,
            job_details: vec![
                JobInfo {
                    job_key: "dynamic/residual/0".into(),
                    state: JobState::Succeeded as i32,
                    attempt: 1,
                    max_attempts: 3,
                    worker_id: "w-1".into(),
                    ..Default::default()
                },
                JobInfo {
                    job_key: "dynamic/internals/1".into(),
                    state: JobState::Dead as i32,
                    attempt: 3,
                    max_attempts: 3,
                    worker_id: "w-2".into(),
                    last_error: "cuda out of memory\n  while capturing layer 5".into(),
                    ..Default::default()
                },
            ],
        }
    }

    #[test]
    fn status_text_has_every_field() {
        let now = DateTime::from_timestamp(1_735_689_700, 0).unwrap();
        let text = run_text(&sample_run(), now, true);
        let expected = "\
run         0190f5c2-7a3e-7b1c-9d2a-3c4b5d6e7f80
state       running
experiment  exp1
model       google/gemma-2-2b-it @ main
modes       residual, internals (layers 0,5)
jobs        3/4 done: 2 succeeded, 1 dead, 0 cancelled, 0 leased, 1 queued
created     2025-01-01 00:00:00 UTC
started     2025-01-01 00:00:10 UTC
finished    -
elapsed     1m 30s
artifacts   s3://bucket/captures/exp1/run/
captured    12,345 tokens, 6 artifacts (3.00 MiB)

JOB                  STATE      ATTEMPT  WORKER  LAST ERROR
dynamic/residual/0   succeeded  1/3      w-1     -
dynamic/internals/1  dead       3/3      w-2     cuda out of memory while capturing layer 5
";
        assert_eq!(text, expected);
        assert!(!run_text(&sample_run(), now, false).contains("LAST ERROR"));
    }

    #[test]
    fn runs_table_lists_newest_first_as_given() {
        let mut older = sample_run();
        older.run_id = "older".into();
        older.state = RunState::Succeeded as i32;
        let text = runs_table(&[sample_run(), older]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("RUN "), "{text}");
        assert!(lines[1].starts_with(RUN_ID), "{text}");
        assert!(
            lines[1].contains("running") && lines[1].contains("3/4"),
            "{text}"
        );
        assert!(lines[2].starts_with("older ") && lines[2].contains("succeeded"));
        assert_eq!(runs_table(&[]), "no runs\n");
    }

    #[test]
    fn json_views_are_plain_and_complete() {
        let view = RunView::new(&sample_run(), true);
        let json: serde_json::Value = serde_json::from_str(&to_json(&view)).unwrap();
        assert_eq!(json["run_id"], RUN_ID);
        assert_eq!(json["state"], "running");
        assert_eq!(json["jobs"]["dead"], 1);
        assert_eq!(json["created_at"], "2025-01-01T00:00:00.000Z");
        assert_eq!(json["finished_at"], serde_json::Value::Null);
        assert_eq!(json["job_details"][1]["state"], "dead");
        assert_eq!(
            json["job_details"][1]["last_error"],
            "cuda out of memory\n  while capturing layer 5"
        );
        let without = serde_json::to_value(RunView::new(&sample_run(), false)).unwrap();
        assert!(without.get("job_details").is_none());
    }

    fn progress(state: RunState, jobs: Option<JobCounts>) -> RunProgress {
        RunProgress {
            run_id: RUN_ID.into(),
            state: state as i32,
            jobs,
            tokens_captured: 2048,
            artifacts_written: 1,
            bytes_written: 1536,
            finished: state.is_terminal(),
            observed_at: None,
        }
    }

    #[test]
    fn outcomes_read_as_success_or_as_the_list_of_dead_jobs() {
        let done = OutcomeView::new(&progress(RunState::Succeeded, counts(2, 2, 0)), vec![]);
        assert!(done.is_success());
        assert_eq!(
            outcome_text(RUN_ID, &done, Duration::from_secs(3)),
            format!(
                "run {RUN_ID} succeeded: 2/2 jobs, 2,048 tokens, 1 artifact (1.50 KiB) in 3.0s"
            )
        );

        let dead = vec![DeadJobView {
            job_id: "j".into(),
            job_key: "dynamic/residual/1".into(),
            attempt: 3,
            last_error: "boom\nat layer 2".into(),
        }];
        let failed = OutcomeView::new(&progress(RunState::Failed, counts(2, 1, 1)), dead);
        assert!(!failed.is_success());
        assert_eq!(
            outcome_text(RUN_ID, &failed, Duration::ZERO),
            format!(
                "run {RUN_ID} failed: 1 of 2 jobs dead, 1 succeeded; retry them with `coordinator retry {RUN_ID}`\n  \
                 job dynamic/residual/1 (attempt 3): boom at layer 2"
            )
        );

        let mut cancelled_counts = counts(2, 1, 0).unwrap();
        cancelled_counts.queued = 0;
        cancelled_counts.cancelled = 1;
        let cancelled = OutcomeView::new(
            &progress(RunState::Cancelled, Some(cancelled_counts)),
            vec![],
        );
        assert!(!cancelled.is_success());
        assert!(outcome_text(RUN_ID, &cancelled, Duration::ZERO).contains("was cancelled"));
    }

    #[test]
    fn small_texts() {
        let response = SubmitRunResponse {
            run_id: RUN_ID.into(),
            job_count: 1,
            artifact_root: "file:///tmp/x/".into(),
        };
        assert_eq!(
            submitted_text(&response),
            format!("submitted run {RUN_ID}: 1 job, artifacts at file:///tmp/x/")
        );
        assert_eq!(
            progress_message(&progress(RunState::Running, counts(4, 1, 1))),
            "running · 2,048 tokens · 0 leased · 1 dead"
        );
        let retry = RetryView {
            run_id: "r".into(),
            state: "running",
            jobs_requeued: 0,
        };
        assert!(retry.to_text().contains("no dead jobs"));
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(jobs_table(&[]), "no jobs\n");
        assert_eq!(duration_text(Duration::from_millis(4_960)), "4.9s");
        assert_eq!(duration_text(Duration::from_millis(80)), "0.0s");
        assert_eq!(duration_text(Duration::from_millis(9_990)), "9.9s");
        assert_eq!(duration_text(Duration::from_millis(10_900)), "10s");
        assert_eq!(duration_text(Duration::from_secs(7_205)), "2h 00m 05s");
    }
}
