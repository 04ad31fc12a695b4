//! `CaptureService`: clients submit, inspect, cancel, retry and watch runs.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use capture_proto::tonic::{self, Request, Response, Status};
use capture_proto::v1 as pb;
use capture_proto::{CaptureService, CaptureServiceError};
use chrono::Utc;
use futures::Stream;
use tracing::info;

use super::Coordinator;
use super::convert::{self, queue_error};
use crate::plan::plan_run;
use crate::queue::{JobQueue, RunFilter};

/// How often WatchRun looks at the run.
const WATCH_POLL: Duration = Duration::from_millis(300);

/// The client-facing gRPC service.
#[derive(Debug, Clone)]
pub struct CaptureApi {
    coordinator: Arc<Coordinator>,
}

impl CaptureApi {
    pub fn new(coordinator: Arc<Coordinator>) -> Self {
        Self { coordinator }
    }

    /// The root URL of a run named by a replay source.
    async fn replay_root(
        &self,
        decoding: Option<&pb::Decoding>,
    ) -> Result<Option<String>, CaptureServiceError> {
        let Some(source) = decoding
            .and_then(|d| d.replay.as_ref())
            .and_then(|r| r.source.as_ref())
        else {
            return Ok(None);
        };
        match source {
            pb::replay_source::Source::RunId(text) => {
                let run = convert::run_id(text)?;
                let status = self
                    .coordinator
                    .queue
                    .run_status(run)
                    .await
                    .map_err(queue_error)?;
                Ok(Some(self.coordinator.artifact_root(run, &status.run.spec)))
            }
            pb::replay_source::Source::RootUrl(url) if url.trim().is_empty() => Err(
                CaptureServiceError::InvalidArgument("the replay root URL is empty".into()),
            ),
            pb::replay_source::Source::RootUrl(url) => Ok(Some(url.clone())),
        }
    }
}

type Reply<T> = Result<Response<T>, Status>;
type ProgressStream = Pin<Box<dyn Stream<Item = Result<pb::RunProgress, Status>> + Send>>;

#[tonic::async_trait]
impl CaptureService for CaptureApi {
    async fn submit_run(
        &self,
        request: Request<pb::SubmitRunRequest>,
    ) -> Reply<pb::SubmitRunResponse> {
        let spec = request.into_inner().spec.ok_or_else(|| {
            CaptureServiceError::InvalidArgument("the request has no run spec".into())
        })?;
        let model = self
            .coordinator
            .catalog
            .resolve(&spec.model_id, &spec.model_revision)
            .await?;
        let replay = self.replay_root(spec.decoding.as_ref()).await?;
        let planned = plan_run(&spec, &model, replay)?;
        let created = self
            .coordinator
            .queue
            .create_run(&planned.run, &planned.jobs)
            .await
            .map_err(queue_error)?;
        let root = self
            .coordinator
            .artifact_root(planned.run.id, &planned.run.spec);
        info!(
            run_id = %created.run_id,
            experiment = planned.run.spec.experiment,
            jobs = planned.jobs.len(),
            model = planned.run.spec.model.id,
            root,
            "run submitted"
        );
        Ok(Response::new(pb::SubmitRunResponse {
            run_id: created.run_id.to_string(),
            job_count: u32::try_from(planned.jobs.len()).unwrap_or(u32::MAX),
            artifact_root: root,
        }))
    }

    async fn get_run(&self, request: Request<pb::GetRunRequest>) -> Reply<pb::Run> {
        let request = request.into_inner();
        let run = convert::run_id(&request.run_id)?;
        Ok(Response::new(
            self.coordinator
                .run_message(run, request.include_jobs)
                .await?,
        ))
    }

    async fn list_runs(
        &self,
        request: Request<pb::ListRunsRequest>,
    ) -> Reply<pb::ListRunsResponse> {
        let request = request.into_inner();
        let limit = match request.limit {
            0 => capture_proto::DEFAULT_LIST_LIMIT,
            n => n.min(1_000),
        };
        let state = pb::RunState::try_from(request.state).unwrap_or(pb::RunState::Unspecified);
        let filter = RunFilter {
            experiment: (!request.experiment.is_empty()).then_some(request.experiment),
            state: convert::run_state_filter(state),
            limit,
            ..RunFilter::default()
        };
        let records = self
            .coordinator
            .queue
            .list_runs(&filter)
            .await
            .map_err(queue_error)?;
        let mut runs = Vec::with_capacity(records.len());
        for record in records {
            runs.push(self.coordinator.run_message(record.id, false).await?);
        }
        Ok(Response::new(pb::ListRunsResponse {
            runs,
            next_page_token: String::new(),
        }))
    }

    async fn cancel_run(
        &self,
        request: Request<pb::CancelRunRequest>,
    ) -> Reply<pb::CancelRunResponse> {
        let run = convert::run_id(&request.into_inner().run_id)?;
        let report = self
            .coordinator
            .queue
            .cancel_run(run)
            .await
            .map_err(queue_error)?;
        info!(%run, cancelled = report.queued_jobs_cancelled, leased = report.leased_jobs_flagged, "run cancel requested");
        if report.run_state != crate::queue::RunState::Running {
            self.coordinator.finalize_run(run).await.ok();
        }
        let status = self
            .coordinator
            .queue
            .run_status(run)
            .await
            .map_err(queue_error)?;
        Ok(Response::new(pb::CancelRunResponse {
            state: convert::run_state(&status) as i32,
            jobs_cancelled: u32::try_from(
                report.queued_jobs_cancelled + report.leased_jobs_flagged,
            )
            .unwrap_or(u32::MAX),
        }))
    }

    async fn retry_run(
        &self,
        request: Request<pb::RetryRunRequest>,
    ) -> Reply<pb::RetryRunResponse> {
        let run = convert::run_id(&request.into_inner().run_id)?;
        let requeued = self
            .coordinator
            .queue
            .retry_run(run)
            .await
            .map_err(queue_error)?;
        info!(%run, requeued, "dead jobs requeued");
        let status = self
            .coordinator
            .queue
            .run_status(run)
            .await
            .map_err(queue_error)?;
        Ok(Response::new(pb::RetryRunResponse {
            state: convert::run_state(&status) as i32,
            jobs_requeued: u32::try_from(requeued).unwrap_or(u32::MAX),
        }))
    }

    type WatchRunStream = ProgressStream;

    async fn watch_run(
        &self,
        request: Request<pb::WatchRunRequest>,
    ) -> Reply<Self::WatchRunStream> {
        let run = convert::run_id(&request.into_inner().run_id)?;
        // Fail fast on an unknown run, before the stream starts.
        self.coordinator
            .queue
            .run_status(run)
            .await
            .map_err(queue_error)?;
        let coordinator = Arc::clone(&self.coordinator);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut last: Option<pb::RunProgress> = None;
            loop {
                let message = match coordinator.queue.run_status(run).await {
                    Ok(status) => convert::progress(&status, Utc::now()),
                    Err(error) if error.is_retryable() => {
                        tokio::time::sleep(WATCH_POLL).await;
                        continue;
                    }
                    Err(error) => {
                        let _ = tx.send(Err(Status::from(queue_error(error)))).await;
                        return;
                    }
                };
                let changed = last.as_ref().is_none_or(|previous| {
                    let mut previous = previous.clone();
                    previous.observed_at = message.observed_at;
                    previous != message
                });
                if changed {
                    let finished = message.finished;
                    last = Some(message.clone());
                    if tx.send(Ok(message)).await.is_err() || finished {
                        return;
                    }
                }
                tokio::time::sleep(WATCH_POLL).await;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
