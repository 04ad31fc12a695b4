//! The served coordinator on loopback: requests over the message size
//! limit are refused with a clear status, and the server keeps serving.

use std::sync::Arc;
use std::time::Duration;

use capture_proto::client::{MAX_MESSAGE_BYTES, capture_client};
use capture_proto::tonic::Code;
use capture_proto::tonic::transport::Channel;
use capture_proto::tonic_health::pb::HealthCheckRequest;
use capture_proto::tonic_health::pb::health_check_response::ServingStatus;
use capture_proto::tonic_health::pb::health_client::HealthClient;
use capture_proto::v1 as pb;
use capture_proto::{CaptureServiceClient, WorkerServiceClient};
use capture_worker::store::{ArtifactStore, StoreOptions};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::queue::Queue;
use crate::server::{ServerConfig, serve};
use crate::service::{Coordinator, LeaseTiming};

struct Served {
    channel: Channel,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _store: tempfile::TempDir,
}

async fn start() -> Served {
    let store_dir = tempfile::tempdir().unwrap();
    let queue = Queue::connect("sqlite::memory:").await.unwrap();
    let store =
        ArtifactStore::from_url(store_dir.path().to_str().unwrap(), &StoreOptions::default())
            .unwrap();
    let coordinator = Coordinator::new(queue, store, LeaseTiming::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let config = ServerConfig {
        client_token: None,
        worker_token: None,
        tls: None,
        timing: LeaseTiming::default(),
        sweep_interval: Duration::from_secs(60),
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(Arc::clone(&coordinator), config, listener, async {
        let _ = stopped.await;
    }));
    let channel = Channel::from_shared(url).unwrap().connect_lazy();
    Served {
        channel,
        stop,
        task,
        _store: store_dir,
    }
}

/// A run submission whose prompt file is `bytes` long, of the model in
/// `model` (a directory; an empty one fails the lookup without the hub).
fn submission(bytes: usize, model: &std::path::Path) -> pb::SubmitRunRequest {
    let file = pb::PromptFile {
        name: "huge".into(),
        json: vec![b' '; bytes],
    };
    pb::SubmitRunRequest {
        spec: Some(pb::RunSpec {
            experiment: "exp".into(),
            model_id: model.to_str().unwrap().to_owned(),
            prompt_sets: vec![pb::PromptSetSource {
                source: Some(pb::prompt_set_source::Source::File(file)),
            }],
            ..Default::default()
        }),
    }
}

/// Still answers small requests: health, a run listing, a worker call.
async fn assert_serving(channel: &Channel) {
    let health = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: "capture.v1.CaptureService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status(), ServingStatus::Serving);
    let runs = capture_client(channel.clone(), None)
        .list_runs(pb::ListRunsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(runs.runs.is_empty(), "{runs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_are_refused_and_the_server_keeps_serving() {
    let served = start().await;
    let no_model = tempfile::tempdir().unwrap();
    assert_serving(&served.channel).await;

    // A client without the project's limit sends 1 MiB more than the
    // server accepts: the server refuses it before decoding it.
    let over = MAX_MESSAGE_BYTES + (1 << 20);
    let mut unlimited =
        CaptureServiceClient::new(served.channel.clone()).max_encoding_message_size(usize::MAX);
    let status = unlimited
        .submit_run(submission(over, no_model.path()))
        .await
        .expect_err("an oversized submission was accepted");
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{status:?}"
    );
    assert!(
        status.message().contains("message length too large"),
        "unclear status: {status:?}"
    );
    assert!(
        status
            .message()
            .contains(&format!("the limit is: {MAX_MESSAGE_BYTES}")),
        "the status should name the limit: {status:?}"
    );
    assert_serving(&served.channel).await;

    // The same for the worker service (a huge registration).
    let mut worker =
        WorkerServiceClient::new(served.channel.clone()).max_encoding_message_size(usize::MAX);
    let status = worker
        .register_worker(pb::RegisterWorkerRequest {
            worker_id: "w".repeat(over),
            ..Default::default()
        })
        .await
        .expect_err("an oversized registration was accepted");
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{status:?}"
    );
    assert_serving(&served.channel).await;

    // The project's submit refuses to send it at all, with a clear error
    // (tonic's own encoder limit would only give "h2 protocol error").
    let mut client = capture_client(served.channel.clone(), None);
    let spec = submission(over, no_model.path()).spec.unwrap();
    let error = crate::client::submit_run(&mut client, spec)
        .await
        .expect_err("the client sent an oversized submission");
    let message = format!("{error:#}");
    assert!(
        message.contains(&format!(
            "more than the {MAX_MESSAGE_BYTES} a request may carry"
        )),
        "{message}"
    );
    assert!(message.contains("split large prompt files"), "{message}");

    // Just under the limit reaches the service, which judges the content
    // (here: a model directory without config.json), not the size.
    let spec = submission(MAX_MESSAGE_BYTES - 4096, no_model.path())
        .spec
        .unwrap();
    let error = crate::client::submit_run(&mut client, spec)
        .await
        .expect_err("a run of a missing model was accepted");
    let message = format!("{error:#}");
    assert!(message.contains("config.json"), "{message}");
    assert_serving(&served.channel).await;

    served.stop.send(()).unwrap();
    served.task.await.unwrap().unwrap();
}
