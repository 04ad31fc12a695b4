//! What `coordinator soak` reports: latency percentiles, counts, and the
//! markdown table it prints.

use std::fmt::Write as _;
use std::time::Duration;

use super::SoakConfig;
use crate::queue::RunId;

/// Nearest-rank percentiles of one call's latency.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LatencyStats {
    pub count: usize,
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl LatencyStats {
    /// Summarizes `samples` (sorting them); zeros for none.
    pub fn of(samples: &mut [Duration]) -> Self {
        samples.sort_unstable();
        let at = |percent: usize| {
            if samples.is_empty() {
                return Duration::ZERO;
            }
            let rank = (percent * samples.len()).div_ceil(100).max(1);
            samples[rank.min(samples.len()) - 1]
        };
        Self {
            count: samples.len(),
            p50: at(50),
            p90: at(90),
            p99: at(99),
            max: samples.last().copied().unwrap_or_default(),
        }
    }

    fn row(&self) -> String {
        let ms = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1e3);
        format!(
            "{} / {} / {} / {} ms ({} calls)",
            ms(self.p50),
            ms(self.p90),
            ms(self.p99),
            ms(self.max),
            self.count
        )
    }
}

/// What one soak measured and verified.
#[derive(Debug, Clone, PartialEq)]
pub struct SoakReport {
    pub backend: &'static str,
    pub run_id: RunId,
    pub config: SoakConfig,
    /// SubmitRun of the whole run (planning and inserting every job).
    pub submit: Duration,
    /// From the workers' start to the run observed finished.
    pub wall: Duration,
    /// First claim to last job finished, by the database's clock.
    pub run_seconds: f64,
    /// Last job finished to run finalized (promotion, staging cleanup,
    /// manifest.json), by the database's clock.
    pub finalize_seconds: f64,
    pub claim: LatencyStats,
    pub heartbeat: LatencyStats,
    pub complete: LatencyStats,
    pub empty_claims: u64,
    pub failures_injected: u64,
    pub zombies: u64,
    pub zombie_completions_refused: u64,
    pub heartbeat_lease_losses: u64,
    pub completion_lease_losses: u64,
    pub rpc_errors: u64,
    /// Attempt rows in the database, and how many ended by lease expiry.
    pub attempts: usize,
    pub lease_expiries: usize,
    pub jobs_succeeded_once: usize,
    pub overlapping_attempts: usize,
    /// Artifacts at their documented keys.
    pub promoted_objects: usize,
    /// Objects left in staging by zombies (their refused completion deletes
    /// what they staged, even after the run was finalized): a violation.
    pub zombie_staged_objects_left: usize,
    /// Objects left in staging by any other attempt: a violation.
    pub staged_objects_left: usize,
    pub manifest_jobs_succeeded: Option<i64>,
    /// Everything the verification found wrong; empty when the soak is clean.
    pub problems: Vec<String>,
}

impl SoakReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }

    /// Accepted completions per second of run time (database clock).
    pub fn jobs_per_second(&self) -> f64 {
        self.config.jobs as f64 / self.run_seconds.max(f64::EPSILON)
    }

    /// The results as a markdown table.
    pub fn to_markdown(&self) -> String {
        let c = &self.config;
        let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1e3);
        let rows = [
            ("backend", self.backend.to_owned()),
            ("run", self.run_id.to_string()),
            (
                "workers / jobs",
                format!("{} / {} (one connection per worker)", c.workers, c.jobs),
            ),
            (
                "fake capture, lease, heartbeat",
                format!(
                    "{} mean (0.5x-1.5x), {}, {}",
                    ms(c.job_duration),
                    ms(c.lease),
                    ms(c.heartbeat)
                ),
            ),
            (
                "fail rate / zombie rate",
                format!("{} / {}", c.fail_rate, c.zombie_rate),
            ),
            ("submit (not in run time)", ms(self.submit)),
            (
                "run time (first claim to last job, database clock)",
                format!("{:.2} s", self.run_seconds),
            ),
            (
                "wall time (workers start to run finished)",
                format!("{:.2} s", self.wall.as_secs_f64()),
            ),
            ("jobs/s", format!("{:.0}", self.jobs_per_second())),
            (
                "finalize (last job to manifest written, database clock)",
                format!("{:.2} s", self.finalize_seconds),
            ),
            (
                "claim p50 / p90 / p99 / max (claims that got a job)",
                self.claim.row(),
            ),
            ("heartbeat p50 / p90 / p99 / max", self.heartbeat.row()),
            ("complete p50 / p90 / p99 / max", self.complete.row()),
            (
                "empty claims (long polls that found no job)",
                self.empty_claims.to_string(),
            ),
            ("attempts (database)", self.attempts.to_string()),
            (
                "injected retryable failures",
                self.failures_injected.to_string(),
            ),
            (
                "zombies / their completions refused",
                format!("{} / {}", self.zombies, self.zombie_completions_refused),
            ),
            (
                "attempts ended by lease expiry (database)",
                self.lease_expiries.to_string(),
            ),
            (
                "lease losses seen by heartbeat / by completion",
                format!(
                    "{} / {}",
                    self.heartbeat_lease_losses, self.completion_lease_losses
                ),
            ),
            ("unexpected RPC errors", self.rpc_errors.to_string()),
            (
                "jobs succeeded exactly once",
                format!("{} of {}", self.jobs_succeeded_once, c.jobs),
            ),
            (
                "jobs with overlapping attempts",
                self.overlapping_attempts.to_string(),
            ),
            ("promoted artifacts", self.promoted_objects.to_string()),
            (
                "staged objects left: by zombies after finalization / by others",
                format!(
                    "{} / {}",
                    self.zombie_staged_objects_left, self.staged_objects_left
                ),
            ),
            (
                "manifest.json jobs_succeeded",
                self.manifest_jobs_succeeded
                    .map_or_else(|| "missing".to_owned(), |n| n.to_string()),
            ),
        ];
        let mut table = String::from("| metric | value |\n|---|---|\n");
        for (metric, value) in rows {
            let _ = writeln!(table, "| {metric} | {value} |");
        }
        table
    }
}
