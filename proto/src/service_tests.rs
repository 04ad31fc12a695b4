//! In-process gRPC round trips over loopback TCP: prove that the generated
//! clients and servers, the transport features, error mapping across the
//! wire, server streaming and the health service all work.

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Channel, Server};
use tonic::{Request, Response, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::v1::{
    CancelRunRequest, CancelRunResponse, CaptureMode, CaptureModeKind, ClaimJobRequest,
    ClaimJobResponse, CompleteJobRequest, CompleteJobResponse, DeregisterWorkerRequest,
    DeregisterWorkerResponse, FailJobRequest, FailJobResponse, GetRunRequest, HeartbeatRequest,
    HeartbeatResponse, Job, JobCounts, JobProgress, JobState, ListRunsRequest, ListRunsResponse,
    Prompt, RegisterWorkerRequest, RegisterWorkerResponse, ReleaseJobRequest, ReleaseJobResponse,
    RetryRunRequest, RetryRunResponse, Run, RunProgress, RunState, StoreDtype, SubmitRunRequest,
    SubmitRunResponse, WatchRunRequest,
};
use crate::{
    Attempt, CaptureService, CaptureServiceClient, CaptureServiceError, CaptureServiceServer,
    JobId, RunId, WorkerId, WorkerService, WorkerServiceClient, WorkerServiceServer,
};

const MODEL: &str = "tests/fixtures/tiny-gemma2";

/// Hands out one fixed job (attempt 1) to the model it was built for and
/// accepts calls fenced on exactly that attempt.
struct OneJobWorkers {
    job: Job,
}

impl OneJobWorkers {
    fn new() -> Self {
        Self {
            job: Job {
                job_id: JobId::new().to_wire(),
                run_id: RunId::new().to_wire(),
                attempt: Attempt::FIRST.get(),
                lease_expires_at: Some(prost_types::Timestamp {
                    seconds: 1_900_000_000,
                    nanos: 0,
                }),
                heartbeat_interval: Some(prost_types::Duration {
                    seconds: 10,
                    nanos: 0,
                }),
                job_key: "dynamic/residual/0".into(),
                experiment: "demo".into(),
                prompts: vec![Prompt {
                    prompt_set: "dynamic".into(),
                    prompt_id: "1".into(),
                    text: "Explain why the sky is blue.".into(),
                }],
                mode: Some(CaptureMode {
                    kind: CaptureModeKind::Internals.into(),
                    layers: vec![0, 1],
                    all_layers: false,
                }),
                store_dtype: StoreDtype::Bf16.into(),
                model_id: MODEL.into(),
                artifact_root: "s3://bucket/prefix/demo/run/".into(),
                staging_prefix: "_staging/job/1/".into(),
                ..Default::default()
            },
        }
    }

    fn check_fence(&self, job_id: &str, attempt: u32) -> Result<(), CaptureServiceError> {
        let job = JobId::parse_wire(job_id)?;
        let attempt = Attempt::from_wire(attempt)?;
        if job_id != self.job.job_id {
            return Err(CaptureServiceError::not_found("job", job));
        }
        if attempt.get() != self.job.attempt {
            return Err(CaptureServiceError::LeaseLost { job, attempt });
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl WorkerService for OneJobWorkers {
    async fn register_worker(
        &self,
        _request: Request<RegisterWorkerRequest>,
    ) -> Result<Response<RegisterWorkerResponse>, Status> {
        Ok(Response::new(RegisterWorkerResponse::default()))
    }

    async fn claim_job(
        &self,
        request: Request<ClaimJobRequest>,
    ) -> Result<Response<ClaimJobResponse>, Status> {
        let request = request.into_inner();
        WorkerId::parse_wire(&request.worker_id).map_err(CaptureServiceError::from)?;
        let job = (request.model_id == self.job.model_id).then(|| self.job.clone());
        Ok(Response::new(ClaimJobResponse {
            job,
            retry_after: None,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let request = request.into_inner();
        self.check_fence(&request.job_id, request.attempt)?;
        Ok(Response::new(HeartbeatResponse {
            lease_expires_at: self.job.lease_expires_at,
            cancel_requested: false,
        }))
    }

    async fn complete_job(
        &self,
        request: Request<CompleteJobRequest>,
    ) -> Result<Response<CompleteJobResponse>, Status> {
        let request = request.into_inner();
        self.check_fence(&request.job_id, request.attempt)?;
        Ok(Response::new(CompleteJobResponse {}))
    }

    async fn fail_job(
        &self,
        request: Request<FailJobRequest>,
    ) -> Result<Response<FailJobResponse>, Status> {
        let request = request.into_inner();
        self.check_fence(&request.job_id, request.attempt)?;
        Ok(Response::new(FailJobResponse {
            state: JobState::Dead.into(),
            retry_at: None,
        }))
    }

    async fn release_job(
        &self,
        request: Request<ReleaseJobRequest>,
    ) -> Result<Response<ReleaseJobResponse>, Status> {
        let request = request.into_inner();
        self.check_fence(&request.job_id, request.attempt)?;
        Ok(Response::new(ReleaseJobResponse {}))
    }

    async fn deregister_worker(
        &self,
        _request: Request<DeregisterWorkerRequest>,
    ) -> Result<Response<DeregisterWorkerResponse>, Status> {
        Ok(Response::new(DeregisterWorkerResponse {}))
    }
}

/// Knows no runs, but watches any run through a fixed progress sequence.
struct ScriptedRuns;

fn progress(run_id: &str, state: RunState, succeeded: u32) -> RunProgress {
    RunProgress {
        run_id: run_id.to_owned(),
        state: state.into(),
        jobs: Some(JobCounts {
            total: 2,
            queued: 2 - succeeded,
            succeeded,
            ..Default::default()
        }),
        finished: state.is_terminal(),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl CaptureService for ScriptedRuns {
    async fn submit_run(
        &self,
        _request: Request<SubmitRunRequest>,
    ) -> Result<Response<SubmitRunResponse>, Status> {
        Err(CaptureServiceError::invalid_argument("submissions are closed").into())
    }

    async fn get_run(&self, request: Request<GetRunRequest>) -> Result<Response<Run>, Status> {
        let run =
            RunId::parse_wire(&request.into_inner().run_id).map_err(CaptureServiceError::from)?;
        Err(CaptureServiceError::not_found("run", run).into())
    }

    async fn list_runs(
        &self,
        _request: Request<ListRunsRequest>,
    ) -> Result<Response<ListRunsResponse>, Status> {
        Ok(Response::new(ListRunsResponse::default()))
    }

    async fn cancel_run(
        &self,
        request: Request<CancelRunRequest>,
    ) -> Result<Response<CancelRunResponse>, Status> {
        Err(CaptureServiceError::already_finished("run", request.into_inner().run_id).into())
    }

    async fn retry_run(
        &self,
        _request: Request<RetryRunRequest>,
    ) -> Result<Response<RetryRunResponse>, Status> {
        Ok(Response::new(RetryRunResponse::default()))
    }

    type WatchRunStream = tokio_stream::Iter<std::vec::IntoIter<Result<RunProgress, Status>>>;

    async fn watch_run(
        &self,
        request: Request<WatchRunRequest>,
    ) -> Result<Response<Self::WatchRunStream>, Status> {
        let run_id = request.into_inner().run_id;
        let updates = vec![
            Ok(progress(&run_id, RunState::Pending, 0)),
            Ok(progress(&run_id, RunState::Running, 1)),
            Ok(progress(&run_id, RunState::Succeeded, 2)),
        ];
        Ok(Response::new(tokio_stream::iter(updates)))
    }
}

/// A server with both services and health on 127.0.0.1:0, stopped by the
/// returned sender.
struct TestServer {
    addr: SocketAddr,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl TestServer {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<WorkerServiceServer<OneJobWorkers>>()
            .await;
        health_reporter
            .set_not_serving::<CaptureServiceServer<ScriptedRuns>>()
            .await;
        let (shutdown, stopped) = oneshot::channel::<()>();
        let router = Server::builder()
            .add_service(health_service)
            .add_service(WorkerServiceServer::new(OneJobWorkers::new()))
            .add_service(CaptureServiceServer::new(ScriptedRuns));
        let task = tokio::spawn(router.serve_with_incoming_shutdown(
            TcpListenerStream::new(listener),
            async {
                stopped.await.ok();
            },
        ));
        Self {
            addr,
            shutdown,
            task,
        }
    }

    async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    async fn stop(self) {
        self.shutdown.send(()).unwrap();
        self.task.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn worker_claims_heartbeats_and_completes_over_grpc() {
    let server = TestServer::start().await;
    let mut client = WorkerServiceClient::connect(format!("http://{}", server.addr))
        .await
        .unwrap();
    let worker = WorkerId::new();

    let claimed = client
        .claim_job(ClaimJobRequest {
            worker_id: worker.to_wire(),
            model_id: MODEL.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let job = claimed.job.expect("a job for the served model");
    assert_eq!(job.experiment, "demo");
    assert_eq!(job.prompts[0].prompt_id, "1");
    assert_eq!(job.store_dtype(), StoreDtype::Bf16);
    let mode = job.mode.clone().unwrap();
    assert_eq!(mode.kind(), CaptureModeKind::Internals);
    assert_eq!(mode.layers, [0, 1]);
    let fence = job.fence(worker).unwrap();
    assert_eq!(fence.attempt, Attempt::FIRST);

    let beat = client
        .heartbeat(
            HeartbeatRequest {
                progress: Some(JobProgress {
                    prompts_done: 1,
                    prompts_total: 1,
                    ..Default::default()
                }),
                ..Default::default()
            }
            .with_fence(fence),
        )
        .await
        .unwrap()
        .into_inner();
    assert_eq!(beat.lease_expires_at, job.lease_expires_at);
    assert!(!beat.cancel_requested);

    client
        .complete_job(CompleteJobRequest::default().with_fence(fence))
        .await
        .unwrap();

    // Another model gets no work: an empty response, not an error.
    let none = client
        .claim_job(ClaimJobRequest {
            worker_id: worker.to_wire(),
            model_id: "google/gemma-2-2b-it".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(none.job, None);

    server.stop().await;
}

#[tokio::test]
async fn stale_attempts_and_bad_ids_map_back_to_domain_errors() {
    let server = TestServer::start().await;
    let mut client = WorkerServiceClient::new(server.channel().await);
    let worker = WorkerId::new();
    let job = client
        .claim_job(ClaimJobRequest {
            worker_id: worker.to_wire(),
            model_id: MODEL.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    let mut stale = job.fence(worker).unwrap();
    stale.attempt = stale.attempt.next();

    let status = client
        .complete_job(CompleteJobRequest::default().with_fence(stale))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(status.message().starts_with("lease lost"), "{status:?}");
    let error = CaptureServiceError::from_status(&status);
    assert!(error.is_lease_lost());
    assert_eq!(
        error,
        CaptureServiceError::LeaseLost {
            job: stale.job_id,
            attempt: stale.attempt
        }
    );

    let status = client
        .claim_job(ClaimJobRequest {
            worker_id: "worker-7".into(),
            model_id: MODEL.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status
            .message()
            .starts_with("invalid worker id \"worker-7\""),
        "{status:?}"
    );

    server.stop().await;
}

#[tokio::test]
async fn run_progress_streams_until_the_terminal_state() {
    let server = TestServer::start().await;
    let mut client = CaptureServiceClient::new(server.channel().await);
    let run = RunId::new();

    let mut stream = client
        .watch_run(WatchRunRequest {
            run_id: run.to_wire(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut states = Vec::new();
    while let Some(update) = stream.next().await {
        let update = update.unwrap();
        assert_eq!(update.run_id, run.to_wire());
        states.push(update.state());
        if update.finished {
            break;
        }
    }
    assert_eq!(
        states,
        [RunState::Pending, RunState::Running, RunState::Succeeded]
    );

    let status = client
        .get_run(GetRunRequest {
            run_id: run.to_wire(),
            include_jobs: false,
        })
        .await
        .unwrap_err();
    assert_eq!(
        CaptureServiceError::from_status(&status),
        CaptureServiceError::not_found("run", run)
    );
    let status = client
        .cancel_run(CancelRunRequest {
            run_id: run.to_wire(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        CaptureServiceError::from(status),
        CaptureServiceError::already_finished("run", run)
    );

    server.stop().await;
}

#[tokio::test]
async fn health_service_reports_each_service() {
    let server = TestServer::start().await;
    let mut health = HealthClient::new(server.channel().await);
    let check = |service: &str| HealthCheckRequest {
        service: service.to_owned(),
    };

    let worker = health
        .check(check("capture.v1.WorkerService"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(worker.status(), ServingStatus::Serving);
    let capture = health
        .check(check("capture.v1.CaptureService"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(capture.status(), ServingStatus::NotServing);
    let overall = health.check(check("")).await.unwrap().into_inner();
    assert_eq!(overall.status(), ServingStatus::Serving);
    let unknown = health.check(check("capture.v1.Nothing")).await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    server.stop().await;
}
