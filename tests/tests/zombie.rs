//! A zombie worker — one whose lease expired and whose job another worker
//! then completed — gets "lease lost" for its heartbeat and its completion,
//! and nothing it staged reaches the run's documented keys.

use std::time::Duration;

use bytes::Bytes;
use capture_proto::v1 as pb;
use capture_proto::{CaptureServiceError, ClientConfig, connect, worker_client};
use capture_tests::cluster::{Cluster, ClusterTiming, s3_endpoint};
use capture_tests::sandbox::tiny_model;
use capture_worker::store::{ArtifactStore, StoreOptions};
use sha2::{Digest, Sha256};

#[test]
fn a_zombie_completion_is_refused_and_changes_nothing() {
    let mut cluster = Cluster::start(ClusterTiming {
        lease_seconds: 2.0,
        heartbeat_seconds: 0.5,
    });
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("zombie.json");
    std::fs::write(
        &prompts,
        r#"{"name": "zombie", "description": "one prompt", "prompts": [{"id": 1, "text": "The capital of France is"}]}"#,
    )
    .unwrap();
    let run_id = cluster.submit(&[
        "--prompt-file",
        prompts.to_str().unwrap(),
        "--max-new-tokens",
        "4",
        "--experiment",
        "zombie",
    ]);

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let zombie_id = capture_proto::WorkerId::new().to_string();
    let model_id = std::fs::canonicalize(tiny_model())
        .unwrap()
        .display()
        .to_string();
    let key = "inference/raw/residual/zombie/1.pt";
    let bogus = Bytes::from_static(b"not a capture: written by a zombie");

    // The zombie claims the job (attempt 1), stages a bogus file, then stalls.
    let (job, mut client) = runtime.block_on(async {
        let channel = connect(&ClientConfig::new(cluster.url())).await.unwrap();
        let mut client = worker_client(channel, None);
        let job = client
            .claim_job(pb::ClaimJobRequest {
                worker_id: zombie_id.clone(),
                model_id: model_id.clone(),
                model_revision: String::new(),
                capabilities: None,
                wait: Some(Duration::from_secs(5).try_into().unwrap()),
            })
            .await
            .unwrap()
            .into_inner()
            .job
            .expect("the zombie gets the job");
        assert_eq!(job.attempt, 1);
        let store = ArtifactStore::from_url(
            &cluster.store,
            &StoreOptions {
                s3_endpoint: Some(s3_endpoint()),
                ..StoreOptions::default()
            },
        )
        .unwrap();
        store
            .run(&job.experiment, &job.run_id)
            .unwrap()
            .stage_put(&job.job_id, job.attempt, key, bogus.clone())
            .await
            .unwrap();
        (job, client)
    });

    // Its lease expires; a real worker takes the job over and completes it.
    std::thread::sleep(Duration::from_secs(3));
    cluster.start_worker(&[]);
    let status = cluster.wait_for_run(&run_id, Duration::from_secs(300));
    assert_eq!(status["state"], "succeeded", "{status}");

    runtime.block_on(async {
        let heartbeat = client
            .heartbeat(pb::HeartbeatRequest {
                job_id: job.job_id.clone(),
                attempt: job.attempt,
                worker_id: zombie_id.clone(),
                progress: None,
            })
            .await
            .unwrap_err();
        assert!(
            CaptureServiceError::from_status(&heartbeat).is_lease_lost(),
            "{heartbeat:?}"
        );
        // The run is finalized (staging collected); the zombie uploads again
        // anyway. Its refused completion must leave nothing behind.
        ArtifactStore::from_url(
            &cluster.store,
            &StoreOptions {
                s3_endpoint: Some(s3_endpoint()),
                ..StoreOptions::default()
            },
        )
        .unwrap()
        .run(&job.experiment, &job.run_id)
        .unwrap()
        .stage_put(&job.job_id, job.attempt, key, bogus.clone())
        .await
        .unwrap();
        let completion = client
            .complete_job(pb::CompleteJobRequest {
                job_id: job.job_id.clone(),
                attempt: job.attempt,
                worker_id: zombie_id.clone(),
                artifacts: vec![pb::ArtifactRecord {
                    key: key.to_owned(),
                    bytes: bogus.len() as u64,
                    sha256: hex::encode(Sha256::digest(&bogus)),
                    prompt_set: "zombie".into(),
                    prompt_id: "1".into(),
                    mode: pb::CaptureModeKind::Residual as i32,
                    ..Default::default()
                }],
                stats: None,
            })
            .await
            .unwrap_err();
        assert_eq!(
            completion.code(),
            capture_proto::tonic::Code::FailedPrecondition
        );
        assert!(
            completion.message().starts_with("lease lost"),
            "{completion:?}"
        );
    });

    // No staging left: the post-finalization upload was deleted on refusal.
    let objects = cluster.run_objects("zombie", &run_id);
    let keys: Vec<&str> = objects.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, vec![key, "manifest.json"], "{keys:?}");
    let artifact = &objects[0].1;
    assert_ne!(artifact.as_slice(), bogus.as_ref());
    assert!(artifact.starts_with(b"PK"), "the artifact is a torch zip");
    let manifest: serde_json::Value = serde_json::from_slice(&objects[1].1).unwrap();
    assert_eq!(
        manifest["artifacts"][0]["sha256"],
        hex::encode(Sha256::digest(artifact))
    );
    let job = &manifest["jobs"][0];
    assert_eq!(job["attempts"][0]["worker_id"], zombie_id.as_str());
    assert_eq!(job["attempts"][0]["outcome"], "lease_expired");
    assert_eq!(job["accepted_attempt"], 2, "{job}");
}
