//! The coordinator's Prometheus metrics: jobs by state (read from the queue
//! at scrape time), claims and how long jobs waited for them, attempts
//! ended by workers, what accepted completions captured, and lost leases.
//! `coordinator serve --metrics-listen ADDR` serves them with the worker
//! crate's [`MetricsEndpoint`].

use std::net::SocketAddr;
use std::sync::Arc;

use capture_worker::metrics::{MetricsEndpoint, Refresh, Registry};
use chrono::{DateTime, Utc};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Unit;
use tracing::warn;

use crate::queue::{ArtifactRow, JobCounts, JobQueue, JobRecord, JobState};
use crate::service::Coordinator;

/// One label set of one label.
type Label = [(&'static str, &'static str); 1];

/// Which fenced call found its lease gone, or `expired` for a lease the
/// sweeper reaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseLossKind {
    Heartbeat,
    Complete,
    Fail,
    Release,
    Expired,
}

impl LeaseLossKind {
    const ALL: [Self; 5] = [
        Self::Heartbeat,
        Self::Complete,
        Self::Fail,
        Self::Release,
        Self::Expired,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::Heartbeat => "heartbeat",
            Self::Complete => "complete",
            Self::Fail => "fail",
            Self::Release => "release",
            Self::Expired => "expired",
        }
    }
}

/// How a worker's report ended an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptEnd {
    /// The completion was accepted.
    Succeeded,
    /// Failed, queued again after a backoff.
    Retried,
    /// Failed for good.
    Dead,
    /// Failed while its run was cancelled.
    Cancelled,
    /// Given back unfinished.
    Released,
}

impl AttemptEnd {
    const ALL: [Self; 5] = [
        Self::Succeeded,
        Self::Retried,
        Self::Dead,
        Self::Cancelled,
        Self::Released,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Retried => "retried",
            Self::Dead => "dead",
            Self::Cancelled => "cancelled",
            Self::Released => "released",
        }
    }

    /// The end of a failed attempt whose job is now in `state`.
    pub(crate) fn of_failure(state: JobState) -> Self {
        match state {
            JobState::Dead => Self::Dead,
            JobState::Cancelled => Self::Cancelled,
            JobState::Queued | JobState::Leased | JobState::Succeeded => Self::Retried,
        }
    }
}

const JOB_STATES: [JobState; 5] = [
    JobState::Queued,
    JobState::Leased,
    JobState::Succeeded,
    JobState::Dead,
    JobState::Cancelled,
];

/// The coordinator's metrics; cheap to clone, clones share the values.
#[derive(Debug, Clone)]
pub struct CoordinatorMetrics {
    jobs: Family<Label, Gauge>,
    lease_losses: Family<Label, Counter>,
    claims: Counter,
    claim_wait: Histogram,
    job_completions: Family<Label, Counter>,
    tokens_captured: Counter,
    artifact_bytes: Counter,
}

impl Default for CoordinatorMetrics {
    fn default() -> Self {
        let metrics = Self {
            jobs: Family::default(),
            lease_losses: Family::default(),
            claims: Counter::default(),
            // 0.1 s to about 7 hours.
            claim_wait: Histogram::new(exponential_buckets(0.1, 4.0, 10)),
            job_completions: Family::default(),
            tokens_captured: Counter::default(),
            artifact_bytes: Counter::default(),
        };
        // Every label value is exposed from the start, at zero.
        for state in JOB_STATES {
            let _ = metrics.jobs.get_or_create(&[("state", state.as_str())]);
        }
        for kind in LeaseLossKind::ALL {
            let _ = metrics
                .lease_losses
                .get_or_create(&[("kind", kind.label())]);
        }
        for end in AttemptEnd::ALL {
            let _ = metrics
                .job_completions
                .get_or_create(&[("outcome", end.label())]);
        }
        metrics
    }
}

impl CoordinatorMetrics {
    /// Adds the metrics to `registry` (once per registry).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "capture_jobs",
            "Jobs of every run by state, read from the queue at scrape time",
            self.jobs.clone(),
        );
        registry.register(
            "capture_lease_losses",
            "Leases lost: late heartbeat, complete, fail or release calls refused, and expired leases reaped",
            self.lease_losses.clone(),
        );
        registry.register(
            "capture_claims",
            "Jobs handed to workers",
            self.claims.clone(),
        );
        registry.register_with_unit(
            "capture_claim_wait",
            "Queue latency: how long a claimed job had been claimable (since created, retry backoff or reaping)",
            Unit::Seconds,
            self.claim_wait.clone(),
        );
        registry.register(
            "capture_job_completions",
            "Attempts ended by their worker's report: succeeded, retried, dead, cancelled, released",
            self.job_completions.clone(),
        );
        registry.register(
            "capture_tokens_captured",
            "Prompt plus response tokens of the artifacts of accepted completions",
            self.tokens_captured.clone(),
        );
        registry.register_with_unit(
            "capture_artifact",
            "Size of the artifacts of accepted completions",
            Unit::Bytes,
            self.artifact_bytes.clone(),
        );
    }

    /// Sets the jobs-by-state gauge.
    pub fn set_job_counts(&self, counts: &JobCounts) {
        for (state, count) in [
            (JobState::Queued, counts.queued),
            (JobState::Leased, counts.leased),
            (JobState::Succeeded, counts.succeeded),
            (JobState::Dead, counts.dead),
            (JobState::Cancelled, counts.cancelled),
        ] {
            self.jobs
                .get_or_create(&[("state", state.as_str())])
                .set(count);
        }
    }

    /// Counts a claim and how long its job had been claimable.
    pub(crate) fn job_claimed(&self, job: &JobRecord) {
        self.claims.inc();
        if let Some(started_at) = job.started_at {
            self.claim_wait.observe(claim_wait_seconds(job, started_at));
        }
    }

    pub(crate) fn lease_lost(&self, kind: LeaseLossKind, count: u64) {
        self.lease_losses
            .get_or_create(&[("kind", kind.label())])
            .inc_by(count);
    }

    pub(crate) fn attempt_ended(&self, end: AttemptEnd) {
        self.job_completions
            .get_or_create(&[("outcome", end.label())])
            .inc();
    }

    /// Counts what an accepted completion recorded.
    pub(crate) fn artifacts_accepted(&self, rows: &[ArtifactRow]) {
        let non_negative = |value: i64| u64::try_from(value).unwrap_or(0);
        let tokens: i64 = rows
            .iter()
            .map(|row| {
                i64::from(row.prompt_tokens.unwrap_or(0))
                    + i64::from(row.response_tokens.unwrap_or(0))
            })
            .sum();
        let bytes: i64 = rows.iter().map(|row| row.size_bytes).sum();
        self.tokens_captured.inc_by(non_negative(tokens));
        self.artifact_bytes.inc_by(non_negative(bytes));
    }
}

/// Seconds from when the job became claimable (created, or due again after
/// a backoff or a reaped lease) to `claimed_at`; never negative.
fn claim_wait_seconds(job: &JobRecord, claimed_at: DateTime<Utc>) -> f64 {
    let claimable_since = job.created_at.max(job.run_after);
    let millis = (claimed_at - claimable_since).num_milliseconds().max(0);
    millis as f64 / 1000.0
}

/// Reads the job counts from the queue into the gauge; on error the gauge
/// keeps its last values.
pub async fn refresh_job_counts(coordinator: &Coordinator) {
    match coordinator.queue().job_counts().await {
        Ok(counts) => coordinator.metrics().set_job_counts(&counts),
        Err(error) => warn!(%error, "cannot count the jobs for the metrics"),
    }
}

/// Serves the coordinator's metrics on `addr` until the endpoint is
/// dropped, refreshing the job counts at each scrape.
pub async fn serve_metrics(
    coordinator: &Arc<Coordinator>,
    addr: SocketAddr,
) -> std::io::Result<MetricsEndpoint> {
    let mut registry = Registry::default();
    coordinator.metrics().register(&mut registry);
    let scraped = Arc::clone(coordinator);
    let refresh: Refresh = Arc::new(move || {
        let coordinator = Arc::clone(&scraped);
        Box::pin(async move { refresh_job_counts(&coordinator).await })
    });
    MetricsEndpoint::bind(addr, registry, Some(refresh)).await
}

#[cfg(test)]
mod tests {
    use capture_worker::metrics::encode_text;
    use chrono::Duration;

    use super::*;
    use crate::queue::{CaptureMode, JobId, JobPayload, ModelRef, RunId};

    fn exposition(metrics: &CoordinatorMetrics) -> String {
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        encode_text(&registry).unwrap()
    }

    #[track_caller]
    fn assert_lines(text: &str, lines: &[&str]) {
        for line in lines {
            assert!(
                text.lines().any(|l| l == *line),
                "no line {line:?} in\n{text}"
            );
        }
    }

    fn job_created_at(created_at: DateTime<Utc>, run_after: DateTime<Utc>) -> JobRecord {
        JobRecord {
            id: JobId::new_time_ordered(),
            run_id: RunId::new_time_ordered(),
            key: "set/residual/0".into(),
            payload: JobPayload {
                prompt_set: "set".into(),
                prompts: Vec::new(),
                mode: CaptureMode::Residual,
            },
            model: ModelRef {
                id: "m".into(),
                revision: String::new(),
            },
            state: JobState::Leased,
            attempt: 1,
            max_attempts: 3,
            lease_owner: Some("w".into()),
            lease_expires_at: None,
            run_after,
            last_error: None,
            created_at,
            first_started_at: None,
            started_at: None,
            finished_at: None,
        }
    }

    fn row(tokens: (i32, i32), bytes: i64) -> ArtifactRow {
        ArtifactRow {
            key: "k".into(),
            size_bytes: bytes,
            sha256: "ab".repeat(32),
            prompt_set: "set".into(),
            prompt_id: "1".into(),
            mode: "residual".into(),
            layer: None,
            prompt_tokens: Some(tokens.0),
            response_tokens: Some(tokens.1),
            shapes: serde_json::json!({}),
        }
    }

    #[test]
    fn fresh_metrics_expose_every_label_value_at_zero() {
        let text = exposition(&CoordinatorMetrics::default());
        assert_lines(
            &text,
            &[
                "# TYPE capture_jobs gauge",
                "capture_jobs{state=\"queued\"} 0",
                "capture_jobs{state=\"leased\"} 0",
                "capture_jobs{state=\"succeeded\"} 0",
                "capture_jobs{state=\"dead\"} 0",
                "capture_jobs{state=\"cancelled\"} 0",
                "# TYPE capture_lease_losses counter",
                "capture_lease_losses_total{kind=\"heartbeat\"} 0",
                "capture_lease_losses_total{kind=\"expired\"} 0",
                "capture_claims_total 0",
                "# TYPE capture_claim_wait_seconds histogram",
                "# UNIT capture_claim_wait_seconds seconds",
                "capture_claim_wait_seconds_count 0",
                "capture_job_completions_total{outcome=\"succeeded\"} 0",
                "capture_job_completions_total{outcome=\"released\"} 0",
                "capture_tokens_captured_total 0",
                "# UNIT capture_artifact_bytes bytes",
                "capture_artifact_bytes_total 0",
            ],
        );
    }

    #[test]
    fn recorded_values_show_in_the_exposition() {
        let metrics = CoordinatorMetrics::default();
        metrics.set_job_counts(&JobCounts {
            queued: 5,
            leased: 2,
            succeeded: 9,
            dead: 1,
            cancelled: 0,
        });
        let created = Utc::now() - Duration::seconds(60);
        let mut fresh = job_created_at(created, created);
        fresh.started_at = Some(created + Duration::milliseconds(300));
        metrics.job_claimed(&fresh);
        // A retry due 50 s after creation waited from then, not from creation.
        let mut retried = job_created_at(created, created + Duration::seconds(50));
        retried.started_at = Some(created + Duration::seconds(52));
        metrics.job_claimed(&retried);
        metrics.lease_lost(LeaseLossKind::Heartbeat, 1);
        metrics.lease_lost(LeaseLossKind::Expired, 3);
        metrics.attempt_ended(AttemptEnd::Succeeded);
        metrics.attempt_ended(AttemptEnd::of_failure(JobState::Queued));
        metrics.attempt_ended(AttemptEnd::of_failure(JobState::Dead));
        metrics.artifacts_accepted(&[row((7, 8), 1000), row((7, 0), 24)]);
        let text = exposition(&metrics);
        assert_lines(
            &text,
            &[
                "capture_jobs{state=\"queued\"} 5",
                "capture_jobs{state=\"leased\"} 2",
                "capture_jobs{state=\"succeeded\"} 9",
                "capture_jobs{state=\"dead\"} 1",
                "capture_jobs{state=\"cancelled\"} 0",
                "capture_claims_total 2",
                "capture_claim_wait_seconds_count 2",
                "capture_claim_wait_seconds_sum 2.3",
                "capture_claim_wait_seconds_bucket{le=\"0.4\"} 1",
                "capture_claim_wait_seconds_bucket{le=\"1.6\"} 1",
                "capture_claim_wait_seconds_bucket{le=\"6.4\"} 2",
                "capture_lease_losses_total{kind=\"heartbeat\"} 1",
                "capture_lease_losses_total{kind=\"expired\"} 3",
                "capture_lease_losses_total{kind=\"complete\"} 0",
                "capture_job_completions_total{outcome=\"succeeded\"} 1",
                "capture_job_completions_total{outcome=\"retried\"} 1",
                "capture_job_completions_total{outcome=\"dead\"} 1",
                "capture_tokens_captured_total 22",
                "capture_artifact_bytes_total 1024",
            ],
        );
    }

    /// Sends one raw HTTP/1.1 GET and returns the answer's body.
    async fn get(addr: SocketAddr, path: &str) -> String {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        answer.split_once("\r\n\r\n").unwrap().1.to_owned()
    }

    #[tokio::test]
    async fn a_scrape_reads_the_job_counts_from_the_queue() {
        let test = crate::service::test_support::coordinator_with_run("metrics", 3).await;
        let (coordinator, model) = (test.coordinator, test.model);
        let endpoint = serve_metrics(&coordinator, "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();

        let text = get(endpoint.local_addr(), "/metrics").await;
        assert_lines(
            &text,
            &[
                "capture_jobs{state=\"queued\"} 3",
                "capture_jobs{state=\"leased\"} 0",
            ],
        );
        coordinator
            .queue()
            .claim("worker-a", &model, std::time::Duration::from_secs(60))
            .await
            .unwrap()
            .expect("a job");
        let text = get(endpoint.local_addr(), "/metrics").await;
        assert_lines(
            &text,
            &[
                "capture_jobs{state=\"queued\"} 2",
                "capture_jobs{state=\"leased\"} 1",
            ],
        );
        assert_eq!(get(endpoint.local_addr(), "/healthz").await, "ok");
    }

    #[test]
    fn a_claim_before_the_job_was_due_waited_zero_seconds() {
        let created = Utc::now();
        let job = job_created_at(created, created + Duration::seconds(5));
        assert_eq!(claim_wait_seconds(&job, created), 0.0);
    }
}
