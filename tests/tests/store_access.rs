//! Artifacts are readable only through the configured store credentials: a
//! second moto server of its own, with moto's authentication on (signatures
//! checked against its IAM users, IAM policies enforced; started through
//! `scripts/moto_auth_server.py`, which fixes moto's signature check of
//! listings), holds a run
//! captured with the credentials of an IAM user allowed S3. The artifacts
//! read back whole with those credentials (through the store client the
//! coordinator and workers use) and are refused to a wrong secret, an
//! unknown key, another IAM user without S3 rights and an unsigned request;
//! a capture with a wrong secret fails, naming the refusal, and leaves
//! nothing behind.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use capture_tests::cluster::free_port;
use capture_tests::sandbox::{repo_root, run, run_ok, tiny_model, workspace_bin};
use capture_worker::pt::decode_pt;
use capture_worker::store::{ArtifactStore, S3Credentials, StoreOptions};

const BUCKET: &str = "captures-private";

/// A moto server that checks signatures and IAM policies after the first
/// `free_actions` requests (moto's `INITIAL_NO_AUTH_ACTION_COUNT`), killed
/// on drop.
struct AuthMoto {
    child: Child,
    endpoint: String,
}

impl Drop for AuthMoto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_auth_moto(free_actions: u32) -> AuthMoto {
    let port = free_port();
    let child = Command::new("python3")
        .arg(repo_root().join("scripts/moto_auth_server.py"))
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .env("INITIAL_NO_AUTH_ACTION_COUNT", free_actions.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start scripts/moto_auth_server.py (needs python3 with moto[server])");
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "moto_server did not listen");
        std::thread::sleep(Duration::from_millis(100));
    }
    AuthMoto {
        child,
        endpoint: format!("http://127.0.0.1:{port}"),
    }
}

/// The IAM users of the test: `capture` may use S3, `other` may not.
struct Keys {
    capture: S3Credentials,
    other: S3Credentials,
}

/// Creates the users, their keys, the policy and the bucket: the five
/// requests moto lets through unchecked.
fn set_up_iam(endpoint: &str) -> Keys {
    let script = r#"
import json, sys, boto3
kw = dict(endpoint_url=sys.argv[1], region_name="us-east-1", aws_access_key_id="setup", aws_secret_access_key="setup")
iam = boto3.client("iam", **kw)
keys = {}
for user in ["capture", "other"]:
    iam.create_user(UserName=user)
    keys[user] = iam.create_access_key(UserName=user)["AccessKey"]
iam.put_user_policy(UserName="capture", PolicyName="s3", PolicyDocument=json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
print(json.dumps({u: [k["AccessKeyId"], k["SecretAccessKey"]] for u, k in keys.items()}))
"#;
    let out = run_ok(Command::new("python3").args(["-c", script, endpoint]));
    let keys: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let credentials = |user: &str| S3Credentials {
        access_key_id: keys[user][0].as_str().unwrap().to_owned(),
        secret_access_key: keys[user][1].as_str().unwrap().to_owned(),
        session_token: None,
    };
    Keys {
        capture: credentials("capture"),
        other: credentials("other"),
    }
}

/// `coordinator submit` in embedded mode, storing on the private bucket
/// with `credentials` from the environment.
fn submit(
    endpoint: &str,
    credentials: &S3Credentials,
    state: &std::path::Path,
) -> std::process::Output {
    run(Command::new(workspace_bin("coordinator"))
        .env("RUST_LOG", "warn")
        .env("AWS_ENDPOINT_URL", endpoint)
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", &credentials.access_key_id)
        .env("AWS_SECRET_ACCESS_KEY", &credentials.secret_access_key)
        .env_remove("AWS_SESSION_TOKEN")
        .args([
            "submit",
            "--prompt-set",
            "baseline",
            "--max-new-tokens",
            "4",
        ])
        .args(["--experiment", "private", "--model"])
        .arg(tiny_model())
        .arg("--state-dir")
        .arg(state)
        .args(["--store", &format!("s3://{BUCKET}/team")]))
}

fn open_store(endpoint: &str, credentials: S3Credentials) -> ArtifactStore {
    let options = StoreOptions {
        s3_endpoint: Some(endpoint.to_owned()),
        s3_credentials: Some(credentials),
        max_retries: 0,
        ..StoreOptions::default()
    };
    ArtifactStore::from_url(&format!("s3://{BUCKET}/team"), &options).unwrap()
}

#[test]
fn artifacts_are_readable_only_with_the_configured_credentials() {
    let moto = start_auth_moto(5);
    let keys = set_up_iam(&moto.endpoint);
    let runtime = tokio::runtime::Runtime::new().unwrap();

    // The bucket, made by the allowed user (signed, checked).
    run_ok(Command::new("python3").args([
        "-c",
        "import sys, boto3; boto3.client('s3', endpoint_url=sys.argv[1], region_name='us-east-1', aws_access_key_id=sys.argv[2], aws_secret_access_key=sys.argv[3]).create_bucket(Bucket=sys.argv[4])",
        &moto.endpoint,
        &keys.capture.access_key_id,
        &keys.capture.secret_access_key,
        BUCKET,
    ]));

    // A capture with a wrong secret fails with the store's refusal.
    let state = tempfile::tempdir().unwrap();
    let wrong = S3Credentials {
        secret_access_key: "not-the-secret".into(),
        ..keys.capture.clone()
    };
    let refused = submit(&moto.endpoint, &wrong, &state.path().join("wrong"));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success(),
        "a capture with a wrong secret succeeded"
    );
    assert!(
        stderr.contains("SignatureDoesNotMatch") || stderr.contains("403"),
        "the refusal is named: {stderr}"
    );
    assert!(
        !stderr.contains("not-the-secret"),
        "the secret is not printed: {stderr}"
    );

    // With the configured credentials the run succeeds.
    let out = submit(&moto.endpoint, &keys.capture, &state.path().join("right"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run_id = String::from_utf8_lossy(&out.stdout).trim().to_owned();

    runtime.block_on(async {
        // The configured credentials read every artifact whole.
        let store = open_store(&moto.endpoint, keys.capture.clone());
        let prefix = format!("private/{run_id}");
        let objects = store.list_objects(&prefix).await.unwrap();
        let artifacts: Vec<_> = objects.iter().filter(|o| o.key.ends_with(".pt")).collect();
        assert_eq!(artifacts.len(), 5, "{objects:?}");
        for artifact in &artifacts {
            let body = store.get_object(&artifact.key).await.unwrap();
            decode_pt(&body).unwrap();
        }
        assert!(
            !objects.iter().any(|o| o.key.contains("_staging")),
            "{objects:?}"
        );
        let key = artifacts[0].key.clone();

        // Nobody else reads or lists them.
        let unknown = S3Credentials {
            access_key_id: "AKIAUNKNOWNKEY000000".into(),
            secret_access_key: "whatever".into(),
            session_token: None,
        };
        for (who, credentials) in [
            ("a wrong secret", wrong.clone()),
            ("an unknown key", unknown),
            ("an IAM user without S3 rights", keys.other.clone()),
        ] {
            let store = open_store(&moto.endpoint, credentials);
            let read = store.get_object(&key).await;
            let message = read
                .as_ref()
                .err()
                .map(ToString::to_string)
                .unwrap_or_default();
            assert!(read.is_err(), "{who} read {key}");
            assert!(
                [
                    "SignatureDoesNotMatch",
                    "InvalidAccessKeyId",
                    "AccessDenied",
                    "403"
                ]
                .iter()
                .any(|code| message.contains(code)),
                "{who}: {message}"
            );
            assert!(
                store.list_objects(&prefix).await.is_err(),
                "{who} listed the run"
            );
        }
    });

    // Unsigned requests are refused too.
    let url = format!(
        "{}/{BUCKET}/team/private/{run_id}/manifest.json",
        moto.endpoint
    );
    let anonymous = run(Command::new("python3").args([
        "-c",
        "import sys, urllib.request\ntry:\n    urllib.request.urlopen(sys.argv[1]); print('read')\nexcept Exception as e:\n    print(e)",
        &url,
    ]));
    let said = String::from_utf8_lossy(&anonymous.stdout);
    assert!(said.contains("403"), "an unsigned GET: {said}");
}
