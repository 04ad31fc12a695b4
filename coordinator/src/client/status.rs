//! The calls behind `coordinator status`, `runs`, `cancel` and `retry`,
//! each returning what the command prints.

use capture_proto::v1::{
    CancelRunRequest, GetRunRequest, ListRunsRequest, RetryRunRequest, Run, RunState,
};
use capture_proto::{CaptureClient, DEFAULT_LIST_LIMIT, RunId};

use super::connect::call_error;
use super::render::{CancelView, RetryView};

/// Run `run_id` (`GetRun`), with every job when `include_jobs`.
pub async fn get_run(
    client: &mut CaptureClient,
    run_id: RunId,
    include_jobs: bool,
) -> anyhow::Result<Run> {
    let request = GetRunRequest {
        run_id: run_id.to_wire(),
        include_jobs,
    };
    client
        .get_run(request)
        .await
        .map(|response| response.into_inner())
        .map_err(|status| call_error(format!("getting run {run_id}"), &status))
}

/// Which runs [`list_runs`] asks for.
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    /// Only this experiment's runs.
    pub experiment: Option<String>,
    /// Only runs in this state.
    pub state: Option<RunState>,
}

/// At most `limit` runs matching `filter`, newest first (`ListRuns`),
/// following page tokens only until `limit` runs are in hand.
pub async fn list_runs(
    client: &mut CaptureClient,
    filter: &RunFilter,
    limit: u32,
) -> anyhow::Result<Vec<Run>> {
    let limit = limit as usize;
    let mut runs = Vec::new();
    let mut page_token = String::new();
    while runs.len() < limit {
        let page_limit = (limit - runs.len()).min(DEFAULT_LIST_LIMIT as usize) as u32;
        let request = ListRunsRequest {
            experiment: filter.experiment.clone().unwrap_or_default(),
            state: filter.state.unwrap_or(RunState::Unspecified) as i32,
            limit: page_limit,
            page_token: std::mem::take(&mut page_token),
        };
        let page = client
            .list_runs(request)
            .await
            .map_err(|status| call_error("listing runs", &status))?
            .into_inner();
        runs.extend(page.runs);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    runs.truncate(limit);
    Ok(runs)
}

/// Cancels run `run_id` (`CancelRun`).
pub async fn cancel_run(client: &mut CaptureClient, run_id: RunId) -> anyhow::Result<CancelView> {
    let request = CancelRunRequest {
        run_id: run_id.to_wire(),
    };
    let response = client
        .cancel_run(request)
        .await
        .map_err(|status| call_error(format!("cancelling run {run_id}"), &status))?
        .into_inner();
    Ok(CancelView::new(&run_id.to_wire(), &response))
}

/// Queues run `run_id`'s dead jobs again (`RetryRun`).
pub async fn retry_run(client: &mut CaptureClient, run_id: RunId) -> anyhow::Result<RetryView> {
    let request = RetryRunRequest {
        run_id: run_id.to_wire(),
    };
    let response = client
        .retry_run(request)
        .await
        .map_err(|status| call_error(format!("retrying run {run_id}"), &status))?
        .into_inner();
    Ok(RetryView::new(&run_id.to_wire(), &response))
}
