//! What a pulling worker (`worker run`) counts: jobs by how they ended,
//! tokens captured (their `rate()` is the worker's tokens per second),
//! bytes uploaded, job durations, the jobs it holds, how many jobs and
//! prompts share its batches, and lost leases. Cheap to clone: clones share the same values.

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::pull::JobOutcome;

/// One label, `outcome`.
type OutcomeLabel = [(&'static str, &'static str); 1];

/// The pulling worker's metrics; record into them, register them once.
#[derive(Debug, Clone)]
pub struct WorkerMetrics {
    jobs: Family<OutcomeLabel, Counter>,
    tokens_captured: Counter,
    upload_bytes: Counter,
    job_seconds: Histogram,
    busy: Gauge,
    batch_jobs: Histogram,
    batch_prompts: Histogram,
    lease_losses: Counter,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        let metrics = Self {
            jobs: Family::default(),
            tokens_captured: Counter::default(),
            upload_bytes: Counter::default(),
            // 1 s to about 2.3 hours.
            job_seconds: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            busy: Gauge::default(),
            // 1 to 64.
            batch_jobs: Histogram::new(exponential_buckets(1.0, 2.0, 7)),
            // 1 to 128.
            batch_prompts: Histogram::new(exponential_buckets(1.0, 2.0, 8)),
            lease_losses: Counter::default(),
        };
        // Every outcome is exposed from the start, at zero.
        for outcome in JobOutcome::LABELS {
            let _ = metrics.jobs.get_or_create(&[("outcome", outcome)]);
        }
        metrics
    }
}

impl WorkerMetrics {
    /// Adds the metrics to `registry` (once per registry).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "capture_worker_jobs",
            "Jobs this worker claimed, by how they ended: completed, failed, released, lease_lost, skipped",
            self.jobs.clone(),
        );
        registry.register(
            "capture_worker_tokens_captured",
            "Prompt plus response tokens captured, as they are computed (rate() is tokens per second)",
            self.tokens_captured.clone(),
        );
        registry.register_with_unit(
            "capture_worker_upload",
            "Artifact bytes uploaded to the store",
            Unit::Bytes,
            self.upload_bytes.clone(),
        );
        registry.register_with_unit(
            "capture_worker_job",
            "Wall time of each job, from claim to the coordinator's answer",
            Unit::Seconds,
            self.job_seconds.clone(),
        );
        registry.register(
            "capture_worker_busy",
            "Jobs this worker holds (claimed and not yet answered), 0 when idle",
            self.busy.clone(),
        );
        registry.register(
            "capture_worker_batch_jobs",
            "Jobs whose prompts shared each batch of forward passes",
            self.batch_jobs.clone(),
        );
        registry.register(
            "capture_worker_batch_prompts",
            "Prompts in each batch of forward passes",
            self.batch_prompts.clone(),
        );
        registry.register(
            "capture_worker_lease_losses",
            "Jobs abandoned because their lease was lost (heartbeat or completion refused)",
            self.lease_losses.clone(),
        );
    }

    /// Counts one more job held until the guard is dropped.
    pub(crate) fn busy(&self) -> BusyGuard {
        self.busy.inc();
        BusyGuard(self.busy.clone())
    }

    /// Records one batch: the jobs its prompts come from and the prompts.
    pub(crate) fn batch(&self, jobs: usize, prompts: usize) {
        self.batch_jobs.observe(jobs as f64);
        self.batch_prompts.observe(prompts as f64);
    }

    /// Counts `tokens` more captured tokens (called from capture threads).
    pub(crate) fn tokens_captured(&self, tokens: u64) {
        self.tokens_captured.inc_by(tokens);
    }

    /// Counts one staged artifact of `bytes`.
    pub(crate) fn uploaded(&self, bytes: u64) {
        self.upload_bytes.inc_by(bytes);
    }

    /// Records how a job ended and how long it took.
    pub(crate) fn job_finished(&self, outcome: JobOutcome, elapsed: Duration) {
        self.jobs
            .get_or_create(&[("outcome", outcome.label())])
            .inc();
        self.job_seconds.observe(elapsed.as_secs_f64());
        if outcome == JobOutcome::LeaseLost {
            self.lease_losses.inc();
        }
    }
}

/// Counts its job off the busy gauge when dropped.
pub(crate) struct BusyGuard(Gauge);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::encode_text;

    fn exposition(metrics: &WorkerMetrics) -> String {
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        encode_text(&registry).unwrap()
    }

    #[test]
    fn a_fresh_worker_exposes_every_metric_at_zero() {
        let text = exposition(&WorkerMetrics::default());
        for line in [
            "# TYPE capture_worker_jobs counter",
            "capture_worker_jobs_total{outcome=\"completed\"} 0",
            "capture_worker_jobs_total{outcome=\"failed\"} 0",
            "capture_worker_jobs_total{outcome=\"released\"} 0",
            "capture_worker_jobs_total{outcome=\"lease_lost\"} 0",
            "capture_worker_jobs_total{outcome=\"skipped\"} 0",
            "# TYPE capture_worker_tokens_captured counter",
            "capture_worker_tokens_captured_total 0",
            "# TYPE capture_worker_upload_bytes counter",
            "# UNIT capture_worker_upload_bytes bytes",
            "capture_worker_upload_bytes_total 0",
            "# TYPE capture_worker_job_seconds histogram",
            "capture_worker_job_seconds_count 0",
            "# TYPE capture_worker_busy gauge",
            "capture_worker_busy 0",
            "# TYPE capture_worker_batch_jobs histogram",
            "capture_worker_batch_jobs_count 0",
            "# TYPE capture_worker_batch_prompts histogram",
            "capture_worker_batch_prompts_count 0",
            "# TYPE capture_worker_lease_losses counter",
            "capture_worker_lease_losses_total 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "no line {line:?} in\n{text}"
            );
        }
    }

    #[test]
    fn recorded_values_show_in_the_exposition() {
        let metrics = WorkerMetrics::default();
        let recorder = metrics.clone();
        let busy = recorder.busy();
        assert!(exposition(&metrics).contains("\ncapture_worker_busy 1\n"));
        let second = recorder.busy();
        assert!(exposition(&metrics).contains("\ncapture_worker_busy 2\n"));
        drop(second);
        recorder.batch(3, 12);
        recorder.tokens_captured(10);
        recorder.tokens_captured(5);
        recorder.uploaded(4096);
        recorder.job_finished(JobOutcome::Completed { tokens: 15 }, Duration::from_secs(3));
        recorder.job_finished(JobOutcome::LeaseLost, Duration::from_millis(500));
        drop(busy);
        let text = exposition(&metrics);
        for line in [
            "capture_worker_jobs_total{outcome=\"completed\"} 1",
            "capture_worker_jobs_total{outcome=\"lease_lost\"} 1",
            "capture_worker_jobs_total{outcome=\"failed\"} 0",
            "capture_worker_tokens_captured_total 15",
            "capture_worker_upload_bytes_total 4096",
            "capture_worker_job_seconds_count 2",
            "capture_worker_job_seconds_sum 3.5",
            "capture_worker_job_seconds_bucket{le=\"1.0\"} 1",
            "capture_worker_job_seconds_bucket{le=\"4.0\"} 2",
            "capture_worker_busy 0",
            "capture_worker_batch_jobs_sum 3.0",
            "capture_worker_batch_jobs_bucket{le=\"2.0\"} 0",
            "capture_worker_batch_jobs_bucket{le=\"4.0\"} 1",
            "capture_worker_batch_prompts_sum 12.0",
            "capture_worker_lease_losses_total 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "no line {line:?} in\n{text}"
            );
        }
    }
}
