//! The client commands against a real gRPC `CaptureService` on loopback that
//! answers canned runs: submit, watch to the end (also across a coordinator
//! restart), status, list, cancel, retry, dead jobs, and the `coordinator`
//! binary's output and exit codes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::{Command, ExitCode, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capture_coordinator::client::{
    self, Connector, FollowOptions, RunFilter, WatchOptions, follow_run, get_run, list_runs,
    render, submit_and_follow, submit_run,
};
use capture_proto::client::RequireToken;
use capture_proto::tonic::transport::Server;
use capture_proto::tonic::{self, Request, Response, Status};
use capture_proto::v1::{
    CancelRunRequest, CancelRunResponse, CaptureMode, CaptureModeKind, GetRunRequest, JobCounts,
    JobInfo, JobState, ListRunsRequest, ListRunsResponse, PromptSetSource, RetryRunRequest,
    RetryRunResponse, Run, RunProgress, RunSpec, RunState, SubmitRunRequest, SubmitRunResponse,
    WatchRunRequest, prompt_set_source,
};
use capture_proto::{
    CaptureService, CaptureServiceError, CaptureServiceServer, ClientConfig, RunId, Token,
};
use futures::Stream;
use tokio::sync::{oneshot, watch};

/// Experiment names that choose how a canned run plays out.
const DOOMED: &str = "doomed"; // fails at once with one dead job
const MANUAL: &str = "manual"; // stays pending until the test moves it

struct CannedRun {
    run: Run,
    progress: watch::Sender<RunProgress>,
}

/// The coordinator's state, kept across server restarts like a database.
#[derive(Default)]
struct Canned {
    runs: Mutex<BTreeMap<String, CannedRun>>,
    watch_calls: AtomicUsize,
}

impl Canned {
    fn set(&self, run_id: &str, state: RunState, succeeded: u32, dead: u32) {
        let mut runs = self.runs.lock().unwrap();
        let canned = runs.get_mut(run_id).unwrap();
        let total = canned.run.jobs.as_ref().unwrap().total;
        let jobs = JobCounts {
            total,
            succeeded,
            dead,
            cancelled: if state == RunState::Cancelled {
                total - succeeded - dead
            } else {
                0
            },
            queued: if state.is_terminal() {
                0
            } else {
                total - succeeded - dead
            },
            leased: 0,
        };
        canned.run.state = state as i32;
        canned.run.jobs = Some(jobs);
        canned.run.tokens_captured = 100 * u64::from(succeeded);
        for (index, job) in canned.run.job_details.iter_mut().enumerate() {
            let index = index as u32;
            job.state = if index < succeeded {
                JobState::Succeeded
            } else if index < succeeded + dead {
                job.last_error = "cuda out of memory\nwhile capturing layer 3".into();
                job.attempt = 3;
                JobState::Dead
            } else if state == RunState::Cancelled {
                JobState::Cancelled
            } else {
                JobState::Queued
            } as i32;
        }
        let progress = RunProgress {
            run_id: run_id.to_owned(),
            state: state as i32,
            jobs: Some(jobs),
            tokens_captured: canned.run.tokens_captured,
            artifacts_written: u64::from(succeeded),
            bytes_written: 1024 * u64::from(succeeded),
            finished: state.is_terminal(),
            observed_at: None,
        };
        canned.progress.send_replace(progress);
    }
}

#[derive(Clone)]
struct CannedService(Arc<Canned>);

type ProgressStream = Pin<Box<dyn Stream<Item = Result<RunProgress, Status>> + Send>>;

#[tonic::async_trait]
impl CaptureService for CannedService {
    async fn submit_run(
        &self,
        request: Request<SubmitRunRequest>,
    ) -> Result<Response<SubmitRunResponse>, Status> {
        let spec = request.into_inner().spec.unwrap_or_default();
        if spec.prompt_sets.is_empty() {
            return Err(CaptureServiceError::invalid_argument("a run needs a prompt set").into());
        }
        let run_id = RunId::new().to_wire();
        let job_count = (spec.prompt_sets.len() * spec.modes.len()) as u32;
        let artifact_root = format!("s3://bucket/captures/{}/{run_id}/", spec.experiment);
        let job_details = (0..job_count)
            .map(|index| JobInfo {
                job_id: format!("job-{index}"),
                job_key: format!("set/residual/{index}"),
                state: JobState::Queued as i32,
                attempt: 1,
                max_attempts: 3,
                ..Default::default()
            })
            .collect();
        let experiment = spec.experiment.clone();
        let run = Run {
            run_id: run_id.clone(),
            spec: Some(spec),
            state: RunState::Pending as i32,
            jobs: Some(JobCounts {
                total: job_count,
                queued: job_count,
                ..Default::default()
            }),
            artifact_root: artifact_root.clone(),
            job_details,
            ..Default::default()
        };
        let progress = watch::Sender::new(RunProgress {
            run_id: run_id.clone(),
            state: RunState::Pending as i32,
            jobs: run.jobs,
            ..Default::default()
        });
        self.0
            .runs
            .lock()
            .unwrap()
            .insert(run_id.clone(), CannedRun { run, progress });
        match experiment.as_str() {
            DOOMED => self.0.set(&run_id, RunState::Failed, job_count - 1, 1),
            MANUAL => {}
            _ => {
                let canned = self.0.clone();
                let id = run_id.clone();
                tokio::spawn(async move {
                    for done in 0..=job_count {
                        tokio::time::sleep(Duration::from_millis(30)).await;
                        let state = if done == job_count {
                            RunState::Succeeded
                        } else {
                            RunState::Running
                        };
                        canned.set(&id, state, done, 0);
                    }
                });
            }
        }
        Ok(Response::new(SubmitRunResponse {
            run_id,
            job_count,
            artifact_root,
        }))
    }

    async fn get_run(&self, request: Request<GetRunRequest>) -> Result<Response<Run>, Status> {
        let request = request.into_inner();
        let runs = self.0.runs.lock().unwrap();
        let canned = runs
            .get(&request.run_id)
            .ok_or_else(|| CaptureServiceError::not_found("run", &request.run_id))?;
        let mut run = canned.run.clone();
        if !request.include_jobs {
            run.job_details.clear();
        }
        Ok(Response::new(run))
    }

    /// Newest first, pages of at most two runs whatever the limit.
    async fn list_runs(
        &self,
        request: Request<ListRunsRequest>,
    ) -> Result<Response<ListRunsResponse>, Status> {
        let request = request.into_inner();
        let runs = self.0.runs.lock().unwrap();
        let matching: Vec<Run> = runs
            .values()
            .rev()
            .filter(|c| {
                request.experiment.is_empty()
                    || c.run.spec.as_ref().unwrap().experiment == request.experiment
            })
            .filter(|c| request.state == 0 || c.run.state == request.state)
            .filter(|c| request.page_token.is_empty() || c.run.run_id < request.page_token)
            .map(|c| {
                let mut run = c.run.clone();
                run.job_details.clear();
                run
            })
            .collect();
        let page_size = (request.limit as usize).clamp(1, 2);
        let page: Vec<Run> = matching.iter().take(page_size).cloned().collect();
        let next_page_token = if matching.len() > page_size {
            page.last().unwrap().run_id.clone()
        } else {
            String::new()
        };
        Ok(Response::new(ListRunsResponse {
            runs: page,
            next_page_token,
        }))
    }

    async fn cancel_run(
        &self,
        request: Request<CancelRunRequest>,
    ) -> Result<Response<CancelRunResponse>, Status> {
        let run_id = request.into_inner().run_id;
        let (state, queued) = {
            let runs = self.0.runs.lock().unwrap();
            let run = &runs
                .get(&run_id)
                .ok_or_else(|| CaptureServiceError::not_found("run", &run_id))?
                .run;
            (run.state(), run.jobs.unwrap().queued)
        };
        if state.is_terminal() {
            return Err(CaptureServiceError::already_finished("run", run_id).into());
        }
        self.0.set(&run_id, RunState::Cancelled, 0, 0);
        Ok(Response::new(CancelRunResponse {
            state: RunState::Cancelled as i32,
            jobs_cancelled: queued,
        }))
    }

    async fn retry_run(
        &self,
        request: Request<RetryRunRequest>,
    ) -> Result<Response<RetryRunResponse>, Status> {
        let run_id = request.into_inner().run_id;
        let jobs = {
            let runs = self.0.runs.lock().unwrap();
            runs.get(&run_id)
                .ok_or_else(|| CaptureServiceError::not_found("run", &run_id))?
                .run
                .jobs
                .unwrap()
        };
        self.0.set(&run_id, RunState::Running, jobs.succeeded, 0);
        Ok(Response::new(RetryRunResponse {
            state: RunState::Running as i32,
            jobs_requeued: jobs.dead,
        }))
    }

    type WatchRunStream = ProgressStream;

    async fn watch_run(
        &self,
        request: Request<WatchRunRequest>,
    ) -> Result<Response<ProgressStream>, Status> {
        let run_id = request.into_inner().run_id;
        let receiver = self
            .0
            .runs
            .lock()
            .unwrap()
            .get(&run_id)
            .ok_or_else(|| CaptureServiceError::not_found("run", &run_id))?
            .progress
            .subscribe();
        self.0.watch_calls.fetch_add(1, Ordering::SeqCst);
        // The current progress, then every change, ending after the
        // terminal one.
        let stream = futures::stream::unfold(
            (receiver, true, false),
            |(mut receiver, first, done)| async move {
                if done || (!first && receiver.changed().await.is_err()) {
                    return None;
                }
                let progress = receiver.borrow_and_update().clone();
                let finished = progress.finished;
                Some((Ok(progress), (receiver, false, finished)))
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }
}

/// A coordinator on its own thread and runtime: killing it drops every
/// connection mid-stream, like a restarted process.
struct TestServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestServer {
    fn start(state: Arc<Canned>, token: Option<&str>) -> Self {
        Self::start_at(state, token, "127.0.0.1:0".parse().unwrap())
    }

    fn start_at(state: Arc<Canned>, token: Option<&str>, addr: SocketAddr) -> Self {
        let listener = bind(addr);
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let token = token.and_then(Token::new);
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let service = CaptureServiceServer::with_interceptor(
                    CannedService(state),
                    RequireToken::new(token),
                );
                let server = Server::builder()
                    .add_service(service)
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
                tokio::select! {
                    result = server => result.unwrap(),
                    _ = stopped => {}
                }
            });
            // Dropping the runtime here drops every connection task.
        });
        Self {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn kill(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Binds `addr`, retrying briefly while a killed server's socket closes.
fn bind(addr: SocketAddr) -> std::net::TcpListener {
    for _ in 0..100 {
        if let Ok(listener) = std::net::TcpListener::bind(addr) {
            listener.set_nonblocking(true).unwrap();
            return listener;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("cannot bind {addr}");
}

fn spec(experiment: &str, sets: &[&str]) -> RunSpec {
    RunSpec {
        experiment: experiment.into(),
        prompt_sets: sets
            .iter()
            .map(|name| PromptSetSource {
                source: Some(prompt_set_source::Source::Builtin((*name).into())),
            })
            .collect(),
        modes: vec![CaptureMode {
            kind: CaptureModeKind::Residual as i32,
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn quick_watch() -> WatchOptions {
    WatchOptions {
        progress_bar: false,
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
        give_up_after: Duration::from_secs(20),
    }
}

async fn within<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), future)
        .await
        .expect("the client finished in time")
}

#[tokio::test]
async fn submit_follow_status_and_list() {
    let state = Arc::new(Canned::default());
    let server = TestServer::start(state.clone(), None);
    let connector = Connector::new(ClientConfig::new(server.url()));
    let mut client = connector.connect().await.unwrap();

    let submitted = submit_run(&mut client, spec("exp1", &["dynamic", "baseline"]))
        .await
        .unwrap();
    assert_eq!(submitted.job_count, 2);
    let run_id: RunId = submitted.run_id.parse().unwrap();

    let finished = within(follow_run(
        &mut client,
        &submitted.run_id,
        || connector.connect(),
        &quick_watch(),
    ))
    .await
    .unwrap();
    assert!(finished.outcome.is_success(), "{finished:?}");
    assert_eq!(finished.exit_code(), ExitCode::SUCCESS);
    assert_eq!(finished.outcome.jobs.succeeded, 2);
    assert_eq!(finished.outcome.tokens_captured, 200);
    assert!(
        finished.text().contains("succeeded: 2/2 jobs"),
        "{}",
        finished.text()
    );

    let run = get_run(&mut client, run_id, true).await.unwrap();
    let text = render::run_text(&run, chrono::Utc::now(), true);
    assert!(text.contains("state       succeeded"), "{text}");
    assert!(text.contains("experiment  exp1"), "{text}");
    assert!(text.contains("set/residual/1  succeeded"), "{text}");

    // More runs than one page; the limit stops the paging.
    for experiment in ["exp2", "exp2", "exp3"] {
        let mut spec = spec(experiment, &["dynamic"]);
        spec.experiment = experiment.into();
        submit_run(&mut client, spec).await.unwrap();
    }
    let all = list_runs(&mut client, &RunFilter::default(), 100)
        .await
        .unwrap();
    assert_eq!(all.len(), 4);
    assert_eq!(all[3].run_id, submitted.run_id, "newest first");
    let three = list_runs(&mut client, &RunFilter::default(), 3)
        .await
        .unwrap();
    assert_eq!(three.len(), 3);
    let filter = RunFilter {
        experiment: Some("exp2".into()),
        state: None,
    };
    assert_eq!(list_runs(&mut client, &filter, 100).await.unwrap().len(), 2);
    let succeeded = RunFilter {
        experiment: None,
        state: Some(RunState::Succeeded),
    };
    let listed = list_runs(&mut client, &succeeded, 100).await.unwrap();
    assert!(listed.iter().any(|run| run.run_id == submitted.run_id));
}

#[tokio::test]
async fn dead_jobs_exit_non_zero_with_their_last_errors() {
    let state = Arc::new(Canned::default());
    let server = TestServer::start(state.clone(), None);
    let connector = Connector::new(ClientConfig::new(server.url()));
    let mut client = connector.connect().await.unwrap();

    let options = FollowOptions {
        wait: true,
        json: false,
        watch: quick_watch(),
    };
    let exit = within(submit_and_follow(
        &mut client,
        spec(DOOMED, &["dynamic", "baseline"]),
        &options,
        || connector.connect(),
    ))
    .await
    .unwrap();
    assert_eq!(exit, ExitCode::FAILURE);

    let submitted = submit_run(&mut client, spec(DOOMED, &["a", "b", "c"]))
        .await
        .unwrap();
    let finished = within(follow_run(
        &mut client,
        &submitted.run_id,
        || connector.connect(),
        &quick_watch(),
    ))
    .await
    .unwrap();
    assert_eq!(finished.exit_code(), ExitCode::FAILURE);
    assert_eq!(finished.outcome.state, "failed");
    assert_eq!(finished.outcome.dead_jobs.len(), 1);
    assert_eq!(finished.outcome.dead_jobs[0].job_key, "set/residual/2");
    let text = finished.text();
    assert!(
        text.contains("job set/residual/2 (attempt 3): cuda out of memory while capturing layer 3"),
        "{text}"
    );
    assert!(text.contains("coordinator retry"), "{text}");

    // Retry requeues the dead job.
    let run_id: RunId = submitted.run_id.parse().unwrap();
    let retried = client::retry_run(&mut client, run_id).await.unwrap();
    assert_eq!((retried.jobs_requeued, retried.state), (1, "running"));
}

#[tokio::test]
async fn cancelled_runs_exit_non_zero_and_cannot_be_cancelled_twice() {
    let state = Arc::new(Canned::default());
    let server = TestServer::start(state.clone(), None);
    let connector = Connector::new(ClientConfig::new(server.url()));
    let mut client = connector.connect().await.unwrap();

    let submitted = submit_run(&mut client, spec(MANUAL, &["dynamic"]))
        .await
        .unwrap();
    let run_id: RunId = submitted.run_id.parse().unwrap();
    let watcher = {
        let connector = connector.clone();
        let mut client = client.clone();
        let run_id = submitted.run_id.clone();
        tokio::spawn(async move {
            follow_run(&mut client, &run_id, || connector.connect(), &quick_watch()).await
        })
    };
    let cancelled = client::cancel_run(&mut client, run_id).await.unwrap();
    assert_eq!(
        (cancelled.state, cancelled.jobs_cancelled),
        ("cancelled", 1)
    );
    let finished = within(watcher).await.unwrap().unwrap();
    assert_eq!(finished.outcome.state, "cancelled");
    assert_eq!(finished.exit_code(), ExitCode::FAILURE);

    let again = client::cancel_run(&mut client, run_id).await.unwrap_err();
    assert_eq!(
        format!("{again:#}"),
        format!("cancelling run {run_id}: run already finished: {run_id}")
    );
}

#[tokio::test]
async fn the_watch_survives_a_coordinator_restart() {
    let state = Arc::new(Canned::default());
    let mut server = TestServer::start(state.clone(), None);
    let addr = server.addr;
    let connector = Connector::new(ClientConfig::new(server.url()));
    let mut client = connector.connect().await.unwrap();
    let submitted = submit_run(&mut client, spec(MANUAL, &["a", "b"]))
        .await
        .unwrap();
    let run_id = submitted.run_id.clone();

    let watcher = {
        let connector = connector.clone();
        let run_id = run_id.clone();
        tokio::spawn(async move {
            follow_run(&mut client, &run_id, || connector.connect(), &quick_watch()).await
        })
    };
    wait_for(|| state.watch_calls.load(Ordering::SeqCst) == 1).await;
    state.set(&run_id, RunState::Running, 1, 0);

    // The coordinator dies mid-stream and comes back on the same address a
    // little later; meanwhile the run finished.
    server.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    state.set(&run_id, RunState::Succeeded, 2, 0);
    let _restarted = TestServer::start_at(state.clone(), None, addr);

    let finished = within(watcher).await.unwrap().unwrap();
    assert!(finished.outcome.is_success(), "{finished:?}");
    assert!(state.watch_calls.load(Ordering::SeqCst) >= 2);
}

async fn wait_for(mut condition: impl FnMut() -> bool) {
    within(async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn errors_are_one_clear_line() {
    let state = Arc::new(Canned::default());
    let server = TestServer::start(state, Some("s3cret"));

    // The right token passes; a missing one is refused with advice.
    let mut config = ClientConfig::new(server.url());
    config.token = Token::new("s3cret");
    let mut client = Connector::new(config).connect().await.unwrap();
    let unknown = RunId::new();
    let error = get_run(&mut client, unknown, false).await.unwrap_err();
    assert_eq!(
        format!("{error:#}"),
        format!("getting run {unknown}: run not found: {unknown}")
    );
    let mut anonymous = Connector::new(ClientConfig::new(server.url()))
        .connect()
        .await
        .unwrap();
    let error = get_run(&mut anonymous, unknown, false).await.unwrap_err();
    let message = format!("{error:#}");
    assert!(
        message.contains("pass --token or set CAPTURE_TOKEN"),
        "{message}"
    );
    assert!(!message.contains("s3cret"));

    // Nothing listening: say so, and what to do.
    let (_bound, closed) = closed_port_url();
    let error = Connector::new(ClientConfig::new(&closed))
        .suggesting_embedded()
        .connect()
        .await
        .unwrap_err();
    let message = format!("{error:#}");
    assert!(
        message.starts_with(&format!("cannot reach the coordinator at {closed}")),
        "{message}"
    );
    assert!(message.contains("`coordinator serve`"), "{message}");
    assert!(message.contains("leave out --coordinator"), "{message}");
}

/// A URL whose port refuses connections: bound but not listening, so no
/// other socket can be given the port while the returned socket lives.
fn closed_port_url() -> (tokio::net::TcpSocket, String) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    (socket, format!("http://{addr}"))
}

fn coordinator(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .args(args)
        .env_remove("CAPTURE_COORDINATOR")
        .env_remove("CAPTURE_TOKEN")
        .env_remove("CAPTURE_TLS_CA")
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn the_binary_prints_ids_summaries_json_and_errors() {
    let state = Arc::new(Canned::default());
    let server = TestServer::start(state.clone(), Some("tok"));
    let url = server.url();

    let output = tokio::task::spawn_blocking({
        let url = url.clone();
        move || {
            coordinator(&[
                "submit",
                "--coordinator",
                &url,
                "--token",
                "tok",
                "--prompt-set",
                "dynamic",
                "--mode",
                "both",
                "--layers",
                "0,2",
                "--wait",
            ])
        }
    })
    .await
    .unwrap();
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert!(output.status.success(), "{stdout}\n{stderr}");
    let run_id: RunId = stdout.trim().parse().expect("stdout is the run id");
    assert!(
        stderr.contains(&format!(
            "submitted run {run_id}: 2 jobs, artifacts at s3://"
        )),
        "{stderr}"
    );
    assert!(stderr.contains("succeeded: 2/2 jobs"), "{stderr}");
    assert!(!stderr.contains("tok\n") && !stdout.contains("tok"));
    let submitted = state.runs.lock().unwrap()[&run_id.to_wire()].run.clone();
    let modes = &submitted.spec.unwrap().modes;
    assert_eq!(modes.len(), 2);
    assert_eq!(modes[1].layers, [0, 2]);

    let output = tokio::task::spawn_blocking({
        let url = url.clone();
        move || {
            coordinator(&[
                "submit",
                "--coordinator",
                &url,
                "--token",
                "tok",
                "--prompt-set",
                "a",
                "--prompt-set",
                "b",
                "--experiment",
                DOOMED,
                "--wait",
                "--json",
            ])
        }
    })
    .await
    .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["outcome"]["state"], "failed");
    assert_eq!(json["outcome"]["dead_jobs"][0]["job_key"], "set/residual/1");
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("error: run ") && stderr.contains("cuda out of memory"),
        "{stderr}"
    );

    let run = run_id.to_wire();
    let output = tokio::task::spawn_blocking({
        let url = url.clone();
        move || {
            coordinator(&[
                "status",
                &run,
                "--jobs",
                "--coordinator",
                &url,
                "--token",
                "tok",
            ])
        }
    })
    .await
    .unwrap();
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(stdout.contains("state       succeeded"), "{stdout}");
    assert!(stdout.contains("JOB "), "{stdout}");

    let output = tokio::task::spawn_blocking({
        let url = url.clone();
        move || coordinator(&["runs", "--json", "--coordinator", &url, "--token", "tok"])
    })
    .await
    .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["runs"].as_array().unwrap().len(), 2);

    let (_bound, closed) = closed_port_url();
    let output = tokio::task::spawn_blocking(move || {
        coordinator(&["status", &RunId::new().to_wire(), "--coordinator", &closed])
    })
    .await
    .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(
        stderr.starts_with("error: cannot reach the coordinator at "),
        "{stderr}"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");

    // Embedded mode (no --coordinator) checks the model before running.
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().join("state").display().to_string();
    let store = state.path().join("captures").display().to_string();
    let output = coordinator(&[
        "submit",
        "--prompt-set",
        "dynamic",
        "--model",
        "/nonexistent/model-dir",
        "--state-dir",
        &state_dir,
        "--store",
        &store,
    ]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(
        stderr.starts_with("error:") && stderr.contains("/nonexistent/model-dir"),
        "{stderr}"
    );

    let output = coordinator(&["status", "not-a-run"]);
    assert!(!output.status.success());
    assert!(text(&output.stderr).contains("invalid run id \"not-a-run\""));
}

#[test]
fn help_teaches_with_examples() {
    for command in ["submit", "status", "runs", "cancel", "retry"] {
        let output = Command::new(env!("CARGO_BIN_EXE_coordinator"))
            .args([command, "--help"])
            .env("CAPTURE_TOKEN", "s3cret-in-env")
            .output()
            .unwrap();
        assert!(output.status.success());
        let help = text(&output.stdout);
        assert!(!help.contains("s3cret-in-env"), "{command}: {help}");
        assert!(
            help.contains(&format!("coordinator {command} ")),
            "{command}: {help}"
        );
        assert!(help.contains("--coordinator <URL>"), "{command}: {help}");
        assert!(help.contains("CAPTURE_TOKEN"), "{command}: {help}");
    }
}
