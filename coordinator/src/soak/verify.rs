//! The checks `coordinator soak` makes once its run is finalized: from the
//! database, every job succeeded exactly once and no lease was held twice;
//! from the store, every artifact promoted, staging clean, manifest complete.

use std::collections::{HashMap, HashSet};

use anyhow::Context as _;
use capture_worker::store::ArtifactStore;

use super::{MAX_LISTED, PROMPT_SET, SoakReport};
use crate::queue::{
    AttemptOutcome, AttemptRecord, JobId, JobQueue, JobState, Queue, RunId, RunState,
};
use crate::service::RUN_MANIFEST_FORMAT;

/// Every job succeeded exactly once (one succeeded attempt, one accepted
/// completion, matching), every attempt ended, no two attempts of a job
/// overlap in time, one artifact row per job from its accepted attempt, and
/// the run succeeded.
pub(super) async fn verify_database(
    queue: &Queue,
    run_id: RunId,
    accepted: &HashMap<String, Vec<u32>>,
    report: &mut SoakReport,
) -> anyhow::Result<()> {
    let jobs = queue.list_jobs(run_id).await?;
    let attempts = queue.list_attempts(run_id).await?;
    let artifacts = queue.list_artifacts(run_id).await?;
    let status = queue.run_status(run_id).await?;
    report.attempts = attempts.len();
    report.lease_expiries = attempts
        .iter()
        .filter(|a| a.outcome == Some(AttemptOutcome::LeaseExpired))
        .count();
    let problems = &mut report.problems;
    let mut note = |problem: String| {
        if problems.len() < MAX_LISTED {
            problems.push(problem);
        }
    };
    if jobs.len() != report.config.jobs {
        note(format!(
            "the run has {} jobs, expected {}",
            jobs.len(),
            report.config.jobs
        ));
    }
    let mut attempts_by_job: HashMap<JobId, Vec<&AttemptRecord>> = HashMap::new();
    for attempt in &attempts {
        attempts_by_job
            .entry(attempt.job_id)
            .or_default()
            .push(attempt);
    }
    let mut artifacts_by_job: HashMap<JobId, Vec<i32>> = HashMap::new();
    for artifact in &artifacts {
        artifacts_by_job
            .entry(artifact.job_id)
            .or_default()
            .push(artifact.attempt);
    }
    for job in &jobs {
        let mut job_attempts = attempts_by_job.remove(&job.id).unwrap_or_default();
        job_attempts.sort_by_key(|a| a.attempt);
        if let Some(overlap) = overlapping_attempts(&job_attempts) {
            report.overlapping_attempts += 1;
            note(format!("job {} ({}): {overlap}", job.id, job.key));
        }
        let succeeded: Vec<i32> = job_attempts
            .iter()
            .filter(|a| a.outcome == Some(AttemptOutcome::Succeeded))
            .map(|a| a.attempt)
            .collect();
        let accepted_here = accepted
            .get(&job.id.to_string())
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let artifact_attempts = artifacts_by_job
            .get(&job.id)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let once = job.state == JobState::Succeeded
            && succeeded == [job.attempt]
            && accepted_here == [u32::try_from(job.attempt).unwrap_or(0)]
            && artifact_attempts == [job.attempt];
        if once {
            report.jobs_succeeded_once += 1;
        } else {
            note(format!(
                "job {} ({}): state {}, attempt {}, succeeded attempts {succeeded:?}, accepted completions {accepted_here:?}, artifact rows from attempts {artifact_attempts:?}",
                job.id, job.key, job.state, job.attempt
            ));
        }
    }
    if !attempts_by_job.is_empty() {
        note(format!(
            "{} jobs have attempts but are not in the run",
            attempts_by_job.len()
        ));
    }
    if status.run.state != RunState::Succeeded {
        note(format!(
            "the run is {}, expected succeeded",
            status.run.state
        ));
    }
    Ok(())
}

/// Why the attempts of one job (sorted by attempt) show two leases at
/// once: an attempt not ended, or one starting before the previous ended.
fn overlapping_attempts(sorted: &[&AttemptRecord]) -> Option<String> {
    if let Some(open) = sorted.iter().find(|a| a.ended_at.is_none()) {
        return Some(format!("attempt {} never ended", open.attempt));
    }
    sorted.windows(2).find_map(|pair| {
        let ended = pair[0].ended_at?;
        (pair[1].started_at < ended).then(|| {
            format!(
                "attempt {} started at {} before attempt {} ended at {ended}",
                pair[1].attempt, pair[1].started_at, pair[0].attempt
            )
        })
    })
}

/// The store holds every artifact at its documented key, nothing in
/// staging, and a manifest.json that counts every job as succeeded.
pub(super) async fn verify_store(
    store: &ArtifactStore,
    spec: &crate::queue::RunSpec,
    run_id: RunId,
    zombies: &HashSet<(String, u32)>,
    report: &mut SoakReport,
) -> anyhow::Result<()> {
    let run = store.run(&spec.experiment, &run_id.to_string())?;
    let jobs = report.config.jobs;
    report.promoted_objects = run
        .list(&format!("inference/raw/residual/{PROMPT_SET}"))
        .await?
        .len();
    for object in run.list("_staging").await? {
        // Keys are `_staging/{job_id}/{attempt}/{relative key}`.
        let mut parts = object.key.split('/').skip(1);
        let fence = parts
            .next()
            .zip(parts.next().and_then(|attempt| attempt.parse::<u32>().ok()))
            .map(|(job, attempt)| (job.to_owned(), attempt));
        // A zombie's files are deleted when its completion is refused;
        // anything else is collected by finalization. Either left is a
        // violation.
        let zombie = fence.is_some_and(|fence| zombies.contains(&fence));
        if zombie {
            report.zombie_staged_objects_left += 1;
        } else {
            report.staged_objects_left += 1;
        }
        if report.problems.len() < MAX_LISTED {
            report.problems.push(format!(
                "left in staging after finalization{}: {}",
                if zombie {
                    " (a refused zombie's upload)"
                } else {
                    ""
                },
                object.key
            ));
        }
    }
    if report.promoted_objects != jobs {
        report.problems.push(format!(
            "{} artifacts at documented keys, expected {jobs}",
            report.promoted_objects
        ));
    }
    match run.get("manifest.json").await {
        Ok(bytes) => {
            let manifest: serde_json::Value =
                serde_json::from_slice(&bytes).context("the run's manifest.json is not JSON")?;
            report.manifest_jobs_succeeded = manifest["totals"]["jobs_succeeded"].as_i64();
            let artifacts = manifest["artifacts"].as_array().map_or(0, Vec::len);
            if manifest["format"] != RUN_MANIFEST_FORMAT
                || report.manifest_jobs_succeeded != Some(jobs as i64)
                || artifacts != jobs
            {
                report.problems.push(format!(
                    "manifest.json: format {}, {:?} jobs succeeded and {artifacts} artifacts, expected {jobs} of each",
                    manifest["format"], report.manifest_jobs_succeeded
                ));
            }
        }
        Err(error) => report
            .problems
            .push(format!("the run has no readable manifest.json: {error}")),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};

    fn attempt(number: i32, start: i64, end: Option<i64>) -> AttemptRecord {
        AttemptRecord {
            job_id: JobId(uuid::Uuid::nil()),
            attempt: number,
            worker_id: format!("w{number}"),
            started_at: Utc.timestamp_opt(start, 0).unwrap(),
            ended_at: end.map(|end| Utc.timestamp_opt(end, 0).unwrap()),
            outcome: None,
            error: None,
        }
    }

    #[test]
    fn overlapping_attempts_are_found() {
        let first = attempt(1, 10, Some(20));
        let second = attempt(2, 20, Some(25));
        assert_eq!(overlapping_attempts(&[&first, &second]), None);
        let early = attempt(2, 19, Some(25));
        assert!(
            overlapping_attempts(&[&first, &early])
                .unwrap()
                .contains("before attempt 1 ended")
        );
        let open = attempt(2, 21, None);
        assert_eq!(
            overlapping_attempts(&[&first, &open]).as_deref(),
            Some("attempt 2 never ended")
        );
    }
}
