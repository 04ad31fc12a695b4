//! The store's behaviour suite, run against a local directory (tempdir) and
//! against a real S3 endpoint (moto, a fresh bucket per test), plus the
//! tests that only make sense for one backend.
//!
//! The S3 half needs `CAPTURE_S3_ENDPOINT` (and `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`); `scripts/test.sh` starts moto and exports them.
//! Without them those tests fail, saying so.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use object_store::{ObjectStoreExt, PutPayload};
use sha2::{Digest, Sha256};

use super::{
    ArtifactStore, RunStore, S3Credentials, StagedObject, StoreError, StoreOptions, StoreUrl,
};

const MIB: usize = 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Local,
    S3,
}

struct Fixture {
    store: ArtifactStore,
    backend: Backend,
    _dir: Option<tempfile::TempDir>,
}

fn test_options() -> StoreOptions {
    StoreOptions {
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(30),
        max_retries: 2,
        retry_timeout: Duration::from_secs(10),
        ..StoreOptions::default()
    }
}

async fn local_fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let store = ArtifactStore::from_url(root.to_str().unwrap(), &test_options()).unwrap();
    Fixture {
        store,
        backend: Backend::Local,
        _dir: Some(dir),
    }
}

fn required_env(name: &str) -> String {
    match std::env::var(name) {
        Ok(value) if !value.is_empty() => value,
        _ => panic!(
            "{name} is not set: the S3 store tests need a running S3 endpoint; run them with \
             `bash scripts/test.sh`, or `source scripts/services.sh && start_moto` first"
        ),
    }
}

async fn s3_fixture() -> Fixture {
    let endpoint = required_env("CAPTURE_S3_ENDPOINT");
    required_env("AWS_ACCESS_KEY_ID");
    required_env("AWS_SECRET_ACCESS_KEY");
    let bucket = unique_bucket_name();
    let (endpoint_for_create, bucket_for_create) = (endpoint.clone(), bucket.clone());
    tokio::task::spawn_blocking(move || create_bucket(&endpoint_for_create, &bucket_for_create))
        .await
        .unwrap();
    let options = StoreOptions {
        s3_endpoint: Some(endpoint),
        ..test_options()
    };
    let store = ArtifactStore::from_url(&format!("s3://{bucket}/captures"), &options).unwrap();
    Fixture {
        store,
        backend: Backend::S3,
        _dir: None,
    }
}

fn unique_bucket_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "capture-test-{}-{}-{}",
        std::process::id(),
        nanos % 1_000_000_000_000,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// `PUT /{bucket}` with a plain HTTP/1.1 request: object_store cannot create
/// buckets, and moto accepts unsigned bucket creation.
fn create_bucket(endpoint: &str, bucket: &str) {
    let url = url::Url::parse(endpoint)
        .unwrap_or_else(|err| panic!("CAPTURE_S3_ENDPOINT {endpoint:?} is not a url: {err}"));
    assert_eq!(
        url.scheme(),
        "http",
        "the test bucket helper speaks plain http only"
    );
    let host = url.host_str().expect("CAPTURE_S3_ENDPOINT has a host");
    let port = url
        .port_or_known_default()
        .expect("CAPTURE_S3_ENDPOINT has a port");
    let mut stream = TcpStream::connect((host, port)).unwrap_or_else(|err| {
        panic!(
            "cannot reach the S3 endpoint {endpoint} (CAPTURE_S3_ENDPOINT): {err}; is moto running?"
        )
    });
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "PUT /{bucket} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response.lines().next().unwrap_or_default();
    assert!(
        status.contains(" 200"),
        "creating bucket {bucket} at {endpoint} failed: {status}"
    );
}

/// Deterministic, incompressible-looking bytes (xorshift).
fn payload(len: usize, seed: u64) -> Bytes {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    Bytes::from(out)
}

fn sha_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

async fn keys(run: &RunStore, prefix: &str) -> Vec<String> {
    run.list(prefix)
        .await
        .unwrap()
        .into_iter()
        .map(|info| info.key)
        .collect()
}

const RESIDUAL_1: &str = "inference/raw/residual/dynamic/p01.pt";
const RESIDUAL_2: &str = "inference/raw/residual/dynamic/p02.pt";
const INTERNALS_1: &str = "inference/raw/internals/dynamic/p01_L3.pt";
const INTERNALS_2: &str = "inference/raw/internals/dynamic/p02_L3.pt";

async fn staging_and_promotion_publish_exactly_the_documented_keys(fixture: Fixture) {
    let run = fixture.store.run("exp-1", "run-0001").unwrap();
    let artifacts = [
        (RESIDUAL_1, payload(1000, 1)),
        (RESIDUAL_2, payload(2500, 2)),
        (INTERNALS_1, payload(4096, 3)),
    ];
    for (key, bytes) in &artifacts {
        let staged = run.stage_put("job-a", 1, key, bytes.clone()).await.unwrap();
        assert_eq!(staged.key, *key);
        assert_eq!(staged.bytes, bytes.len() as u64);
        assert_eq!(staged.sha256, sha_hex(bytes));
    }

    // Before promotion only the attempt's staging prefix holds anything.
    let listed = keys(&run, "").await;
    assert_eq!(listed.len(), 3, "{listed:?}");
    assert!(
        listed
            .iter()
            .all(|key| key.starts_with("_staging/job-a/1/inference/")),
        "{listed:?}"
    );
    for (key, _) in &artifacts {
        assert!(run.get(key).await.unwrap_err().is_not_found());
    }

    let keys_to_promote: Vec<&str> = artifacts.iter().map(|(key, _)| *key).collect();
    let promotion = run.promote("job-a", 1, &keys_to_promote).await.unwrap();
    assert_eq!(promotion.copied, 3);
    assert_eq!(promotion.already_promoted, 0);
    assert_eq!(promotion.staging_deleted, 3);

    let mut want: Vec<String> = keys_to_promote.iter().map(|key| key.to_string()).collect();
    want.sort();
    assert_eq!(keys(&run, "").await, want);
    assert!(keys(&run, "_staging").await.is_empty());
    for (key, bytes) in &artifacts {
        assert_eq!(run.get(key).await.unwrap(), *bytes);
        assert_eq!(run.head(key).await.unwrap().bytes, bytes.len() as u64);
    }
    assert_eq!(
        keys(&run, "inference/raw/residual").await,
        vec![RESIDUAL_1.to_owned(), RESIDUAL_2.to_owned()]
    );

    let manifest = Bytes::from_static(b"{\"format_version\": 1}\n");
    run.put_root_file("manifest.json", manifest.clone())
        .await
        .unwrap();
    assert_eq!(run.get("manifest.json").await.unwrap(), manifest);
    assert_eq!(keys(&run, "").await.len(), 4);

    // The documented layout, seen from outside the store.
    let root_url = run.root_url();
    match fixture.backend {
        Backend::Local => {
            let StoreUrl::Local { root } = fixture.store.url() else {
                unreachable!()
            };
            assert_eq!(root_url, format!("{}/exp-1/run-0001", fixture.store.url()));
            let on_disk = std::fs::read(root.join("exp-1/run-0001").join(RESIDUAL_2)).unwrap();
            assert_eq!(on_disk, artifacts[1].1);
            assert!(
                !root.join("exp-1/run-0001/_staging").exists(),
                "empty staging folders are removed"
            );
        }
        Backend::S3 => {
            assert!(root_url.starts_with("s3://capture-test-"), "{root_url}");
            assert!(root_url.ends_with("/captures/exp-1/run-0001"), "{root_url}");
            let raw = fixture
                .store
                .inner
                .head(&object_store::path::Path::from(format!(
                    "captures/exp-1/run-0001/{INTERNALS_1}"
                )))
                .await
                .unwrap();
            assert_eq!(raw.size, 4096);
        }
    }
}

async fn promotion_is_idempotent(fixture: Fixture) {
    let run = fixture.store.run("exp", "run-idem").unwrap();
    let (first, second) = (payload(3000, 10), payload(5000, 11));
    run.stage_put("job-b", 2, RESIDUAL_1, first.clone())
        .await
        .unwrap();
    run.stage_put("job-b", 2, RESIDUAL_2, second.clone())
        .await
        .unwrap();
    let keys_to_promote = [RESIDUAL_1, RESIDUAL_2];
    let once = run.promote("job-b", 2, &keys_to_promote).await.unwrap();
    assert_eq!((once.copied, once.already_promoted), (2, 0));
    let twice = run.promote("job-b", 2, &keys_to_promote).await.unwrap();
    assert_eq!(twice.copied, 0);
    assert_eq!(twice.already_promoted, 2);
    assert_eq!(twice.staging_deleted, 0);
    assert_eq!(run.get(RESIDUAL_1).await.unwrap(), first);
    assert_eq!(run.get(RESIDUAL_2).await.unwrap(), second);

    // A crash in the middle of a promotion: the first object was copied and
    // its staged copy deleted, the second is still only staged.
    let (third, fourth) = (payload(700, 12), payload(900, 13));
    run.stage_put("job-c", 1, INTERNALS_1, third.clone())
        .await
        .unwrap();
    run.stage_put(
        "job-c",
        1,
        "inference/raw/internals/dynamic/p01_L4.pt",
        fourth.clone(),
    )
    .await
    .unwrap();
    let from = run.staged_path("job-c", 1, INTERNALS_1).unwrap();
    let to = run.documented_path(INTERNALS_1).unwrap();
    run.store.inner.copy(&from, &to).await.unwrap();
    run.store.inner.delete(&from).await.unwrap();
    let resumed = run
        .promote(
            "job-c",
            1,
            &[INTERNALS_1, "inference/raw/internals/dynamic/p01_L4.pt"],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            resumed.copied,
            resumed.already_promoted,
            resumed.staging_deleted
        ),
        (1, 1, 1)
    );
    assert_eq!(run.get(INTERNALS_1).await.unwrap(), third);
    assert_eq!(
        run.get("inference/raw/internals/dynamic/p01_L4.pt")
            .await
            .unwrap(),
        fourth
    );
    assert!(keys(&run, "_staging").await.is_empty());

    // A key that was never staged fails the promotion and writes nothing.
    run.stage_put(
        "job-d",
        1,
        "inference/raw/residual/dynamic/p09.pt",
        payload(10, 14),
    )
    .await
    .unwrap();
    let err = run
        .promote(
            "job-d",
            1,
            &[
                "inference/raw/residual/dynamic/p09.pt",
                "inference/raw/residual/dynamic/never.pt",
            ],
        )
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, StoreError::MissingStaged { .. }), "{err:?}");
    assert!(
        msg.contains("job-d attempt 1") && msg.contains("never.pt"),
        "{msg}"
    );
    assert!(
        run.get("inference/raw/residual/dynamic/p09.pt")
            .await
            .unwrap_err()
            .is_not_found()
    );
    assert_eq!(run.discard_attempt("job-d", 1).await.unwrap(), 1);
}

async fn multipart_upload_round_trips(fixture: Fixture) {
    let run = fixture.store.run("exp", "run-big").unwrap();
    let big = payload(20 * MIB + 123, 20);
    let staged = run
        .stage_put("job-m", 1, RESIDUAL_1, big.clone())
        .await
        .unwrap();
    assert_eq!(staged.bytes, big.len() as u64);
    assert_eq!(staged.sha256, sha_hex(&big));

    // The same payload streamed from a local file, part by part.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("big.pt");
    std::fs::write(&file, &big).unwrap();
    let from_file = run
        .stage_put_file("job-m", 1, RESIDUAL_2, &file)
        .await
        .unwrap();
    assert_eq!(from_file.bytes, staged.bytes);
    assert_eq!(from_file.sha256, staged.sha256);
    let small_file = dir.path().join("small.pt");
    std::fs::write(&small_file, b"tiny").unwrap();
    let small = run
        .stage_put_file("job-m", 1, INTERNALS_1, &small_file)
        .await
        .unwrap();
    assert_eq!(
        (small.bytes, small.sha256.as_str()),
        (4, sha_hex(b"tiny").as_str())
    );
    // The same payload in uneven buffers (an encoded artifact's parts:
    // headers, a large tensor, headers, ...), gathered into the same parts.
    let cuts = [0, 100, 9 * MIB + 7, 9 * MIB + 8, 17 * MIB, big.len()];
    let pieces: PutPayload = cuts.windows(2).map(|w| big.slice(w[0]..w[1])).collect();
    assert_eq!(pieces.iter().count(), 5);
    let from_pieces = run
        .stage_put("job-m", 1, INTERNALS_2, pieces)
        .await
        .unwrap();
    assert_eq!(
        from_pieces,
        StagedObject {
            key: INTERNALS_2.into(),
            ..staged.clone()
        }
    );

    if fixture.backend == Backend::S3 {
        // 20 MiB + 123 bytes in 8 MiB parts: S3 tags a 3-part upload "...-3"
        // (the promoted copy gets a plain tag again).
        for key in [RESIDUAL_1, RESIDUAL_2, INTERNALS_2] {
            let staged_key = format!("_staging/job-m/1/{key}");
            let e_tag = run
                .head(&staged_key)
                .await
                .unwrap()
                .e_tag
                .unwrap_or_default();
            assert!(
                e_tag.trim_matches('"').ends_with("-3"),
                "{key} not in 3 parts: {e_tag}"
            );
        }
    }
    run.promote(
        "job-m",
        1,
        &[RESIDUAL_1, RESIDUAL_2, INTERNALS_1, INTERNALS_2],
    )
    .await
    .unwrap();
    for key in [RESIDUAL_1, RESIDUAL_2, INTERNALS_2] {
        let back = run.get(key).await.unwrap();
        assert_eq!(back.len(), big.len());
        assert!(back == big, "{key} differs after the round trip");
        assert_eq!(sha_hex(&back), staged.sha256);
    }
}

async fn stale_attempt_never_reaches_documented_keys(fixture: Fixture) {
    let run = fixture.store.run("exp", "run-stale").unwrap();
    // Attempt 1 starts, loses its lease; attempt 2 runs and is accepted.
    run.stage_put(
        "job-z",
        1,
        RESIDUAL_1,
        Bytes::from_static(b"attempt 1, early"),
    )
    .await
    .unwrap();
    run.stage_put("job-z", 2, RESIDUAL_1, Bytes::from_static(b"attempt 2"))
        .await
        .unwrap();
    run.stage_put(
        "job-z",
        2,
        RESIDUAL_2,
        Bytes::from_static(b"attempt 2, second"),
    )
    .await
    .unwrap();
    run.promote("job-z", 2, &[RESIDUAL_1, RESIDUAL_2])
        .await
        .unwrap();

    // The zombie keeps uploading after the promotion: only its own prefix changes.
    run.stage_put(
        "job-z",
        1,
        RESIDUAL_1,
        Bytes::from_static(b"attempt 1, late"),
    )
    .await
    .unwrap();
    run.stage_put(
        "job-z",
        1,
        INTERNALS_1,
        Bytes::from_static(b"attempt 1 only"),
    )
    .await
    .unwrap();
    assert_eq!(
        run.get(RESIDUAL_1).await.unwrap(),
        Bytes::from_static(b"attempt 2")
    );
    assert!(run.get(INTERNALS_1).await.unwrap_err().is_not_found());
    assert_eq!(
        keys(&run, "_staging").await,
        vec![
            format!("_staging/job-z/1/{INTERNALS_1}"),
            format!("_staging/job-z/1/{RESIDUAL_1}"),
        ]
    );

    assert_eq!(run.discard_attempt("job-z", 1).await.unwrap(), 2);
    assert_eq!(run.discard_attempt("job-z", 1).await.unwrap(), 0);
    assert_eq!(
        keys(&run, "").await,
        vec![RESIDUAL_1.to_owned(), RESIDUAL_2.to_owned()]
    );
    assert_eq!(
        run.get(RESIDUAL_1).await.unwrap(),
        Bytes::from_static(b"attempt 2")
    );

    // Leftovers of any attempt of a job go with discard_job_staging.
    run.stage_put("job-z", 3, RESIDUAL_1, Bytes::from_static(b"x"))
        .await
        .unwrap();
    run.stage_put("job-z", 4, RESIDUAL_1, Bytes::from_static(b"y"))
        .await
        .unwrap();
    assert_eq!(run.discard_job_staging("job-z").await.unwrap(), 2);
    assert!(keys(&run, "_staging").await.is_empty());
    assert_eq!(
        run.get(RESIDUAL_1).await.unwrap(),
        Bytes::from_static(b"attempt 2")
    );
}

async fn ranged_reads_return_exactly_the_bytes_asked(fixture: Fixture) {
    let run = fixture.store.run("exp", "run-range").unwrap();
    let data = payload(10_000, 30);
    run.put_root_file(RESIDUAL_1, data.clone()).await.unwrap();
    for range in [0..10, 1234..5678, 9990..10_000, 0..10_000, 9999..10_000] {
        let got = run.get_range(RESIDUAL_1, range.clone()).await.unwrap();
        assert_eq!(
            got,
            data.slice(range.start as usize..range.end as usize),
            "{range:?}"
        );
    }
    assert!(run.get_range(RESIDUAL_1, 50..50).await.unwrap().is_empty());
    for (range, want) in [
        (Range { start: 20, end: 10 }, "the start is after the end"),
        (9990..10_001, "10000 bytes long"),
        (20_000..20_010, "10000 bytes long"),
    ] {
        let err = run.get_range(RESIDUAL_1, range.clone()).await.unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, StoreError::InvalidRange { .. }),
            "{range:?}: {err:?}"
        );
        assert!(msg.contains(want), "{range:?}: {msg}");
    }
    let missing = run.get_range(RESIDUAL_2, 0..10).await.unwrap_err();
    assert!(missing.is_not_found(), "{missing:?}");
    assert!(
        missing.to_string().ends_with("p02.pt not found"),
        "{missing}"
    );
}

const UNSAFE_KEYS: [&str; 8] = [
    "../x", "/abs", "a//b", "a\0b", "a\\b", "", "a/./b", ".hidden",
];

async fn unsafe_names_are_refused_and_write_nothing(fixture: Fixture) {
    let long = "n".repeat(300);
    for bad in ["../x", ".x", "a/b", "", "a\0b", long.as_str()] {
        let err = fixture.store.run(bad, "run").unwrap_err();
        assert!(
            err.to_string().starts_with("unsafe experiment name"),
            "{err}"
        );
        let err = fixture.store.run("exp", bad).unwrap_err();
        assert!(err.to_string().starts_with("unsafe run id"), "{err}");
    }
    let run = fixture.store.run("exp", "run-unsafe").unwrap();
    let long_key = format!("inference/{long}.pt");
    let data = Bytes::from_static(b"data");
    for key in UNSAFE_KEYS.iter().copied().chain([long_key.as_str()]) {
        let is_unsafe = |err: StoreError| matches!(err, StoreError::UnsafeKey { .. });
        assert!(
            is_unsafe(
                run.stage_put("job", 1, key, data.clone())
                    .await
                    .unwrap_err()
            ),
            "{key:?}"
        );
        assert!(
            is_unsafe(run.put_root_file(key, data.clone()).await.unwrap_err()),
            "{key:?}"
        );
        assert!(is_unsafe(run.get(key).await.unwrap_err()), "{key:?}");
        assert!(
            is_unsafe(run.get_range(key, 0..1).await.unwrap_err()),
            "{key:?}"
        );
        assert!(is_unsafe(run.head(key).await.unwrap_err()), "{key:?}");
        assert!(
            is_unsafe(run.promote("job", 1, &[key]).await.unwrap_err()),
            "{key:?}"
        );
    }
    assert!(matches!(
        run.put_root_file("_staging/job/1/x.pt", data.clone())
            .await
            .unwrap_err(),
        StoreError::UnsafeKey { .. }
    ));
    for bad_job in ["../j", "j/k", ""] {
        let err = run
            .stage_put(bad_job, 1, RESIDUAL_1, data.clone())
            .await
            .unwrap_err();
        assert!(err.to_string().starts_with("unsafe job id"), "{err}");
        assert!(run.discard_job_staging(bad_job).await.is_err());
    }
    let err = run
        .stage_put("job", 0, RESIDUAL_1, data.clone())
        .await
        .unwrap_err();
    assert!(err.to_string().starts_with("unsafe attempt \"0\""), "{err}");
    assert!(run.list("../").await.is_err());
    assert!(
        keys(&run, "").await.is_empty(),
        "a refused call wrote something"
    );
}

async fn runs_are_separate(fixture: Fixture) {
    let first = fixture.store.run("exp", "run-1").unwrap();
    let second = fixture.store.run("exp", "run-10").unwrap();
    let other = fixture.store.run("exp-other", "run-1").unwrap();
    first
        .put_root_file("manifest.json", Bytes::from_static(b"1"))
        .await
        .unwrap();
    second
        .put_root_file("manifest.json", Bytes::from_static(b"10"))
        .await
        .unwrap();
    other
        .put_root_file("manifest.json", Bytes::from_static(b"other"))
        .await
        .unwrap();
    assert_eq!(keys(&first, "").await, vec!["manifest.json".to_owned()]);
    assert_eq!(
        first.get("manifest.json").await.unwrap(),
        Bytes::from_static(b"1")
    );
    assert_eq!(
        second.get("manifest.json").await.unwrap(),
        Bytes::from_static(b"10")
    );
    assert_eq!(
        other.get("manifest.json").await.unwrap(),
        Bytes::from_static(b"other")
    );
    let info = first.head("manifest.json").await.unwrap();
    assert_eq!((info.key.as_str(), info.bytes), ("manifest.json", 1));
}

macro_rules! store_suite {
    ($($name:ident),* $(,)?) => {
        mod local {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::local_fixture().await).await;
                }
            )*
        }
        mod s3 {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::s3_fixture().await).await;
                }
            )*
        }
    };
}

store_suite!(
    staging_and_promotion_publish_exactly_the_documented_keys,
    promotion_is_idempotent,
    multipart_upload_round_trips,
    stale_attempt_never_reaches_documented_keys,
    ranged_reads_return_exactly_the_bytes_asked,
    unsafe_names_are_refused_and_write_nothing,
    runs_are_separate,
);

#[tokio::test]
async fn file_urls_and_plain_paths_resolve_to_the_same_place() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("captures");
    let plain = ArtifactStore::from_url(root.to_str().unwrap(), &test_options()).unwrap();
    let as_url =
        ArtifactStore::from_url(&format!("file://{}/", root.display()), &test_options()).unwrap();
    let relative_url = StoreUrl::parse_relative_to("./captures", dir.path()).unwrap();
    let relative = ArtifactStore::open(relative_url, &test_options()).unwrap();
    assert_eq!(plain.url(), as_url.url());
    assert_eq!(plain.url(), relative.url());

    let written = plain.run("exp", "run").unwrap();
    written
        .put_root_file("manifest.json", Bytes::from_static(b"{}"))
        .await
        .unwrap();
    for store in [&as_url, &relative] {
        let run = store.run("exp", "run").unwrap();
        assert_eq!(run.root_url(), written.root_url());
        assert_eq!(
            run.get("manifest.json").await.unwrap(),
            Bytes::from_static(b"{}")
        );
    }
    assert!(root.join("exp/run/manifest.json").is_file());
}

/// A store on an S3 endpoint nobody answers at, with short limits.
fn unreachable_store(endpoint: String) -> ArtifactStore {
    let options = StoreOptions {
        s3_endpoint: Some(endpoint),
        s3_credentials: Some(S3Credentials {
            access_key_id: "testing".to_owned(),
            secret_access_key: "testing-secret".to_owned(),
            session_token: None,
        }),
        connect_timeout: Duration::from_millis(500),
        request_timeout: Duration::from_secs(1),
        max_retries: 1,
        retry_timeout: Duration::from_secs(2),
        ..StoreOptions::default()
    };
    ArtifactStore::from_url("s3://unreachable-bucket/prefix", &options).unwrap()
}

#[tokio::test]
async fn unreachable_s3_endpoint_fails_fast_with_a_clear_error() {
    // Bound but not listening: connections are refused (and no other
    // socket can be given the port while the test runs).
    let refused = tokio::net::TcpSocket::new_v4().unwrap();
    refused.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let refused_port = refused.local_addr().unwrap().port();
    // Something listens but never answers: requests time out.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    for (port, cause) in [(refused_port, "refused"), (silent_port, "timed out")] {
        let run = unreachable_store(format!("http://127.0.0.1:{port}"))
            .run("exp", "run")
            .unwrap();
        let started = Instant::now();
        let err = run
            .stage_put("job", 1, RESIDUAL_1, Bytes::from_static(b"data"))
            .await
            .unwrap_err();
        let elapsed = started.elapsed();
        let msg = err.to_string();
        assert!(matches!(err, StoreError::Backend { .. }), "{err:?}");
        assert!(
            msg.starts_with(&format!(
                "cannot upload s3://unreachable-bucket/prefix/exp/run/_staging/job/1/{RESIDUAL_1}: "
            )),
            "{msg}"
        );
        assert!(
            msg.contains(&format!("127.0.0.1:{port}")),
            "the endpoint is named: {msg}"
        );
        assert!(
            msg.to_lowercase().contains(cause),
            "the cause is named: {msg}"
        );
        assert!(elapsed < Duration::from_secs(15), "took {elapsed:?}: {msg}");
        let err = run.get(RESIDUAL_1).await.unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot read s3://unreachable-bucket/"),
            "{err}"
        );
    }
    drop(silent);
}

#[tokio::test]
async fn unsafe_keys_are_refused_before_any_io() {
    // Any request to this store would fail with a backend error after a
    // timeout; validation answers first and at once.
    let run = unreachable_store("http://127.0.0.1:9".to_owned())
        .run("exp", "run")
        .unwrap();
    let started = Instant::now();
    for key in UNSAFE_KEYS {
        let err = run
            .stage_put("job", 1, key, Bytes::from_static(b"x"))
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::UnsafeKey { .. }),
            "{key:?}: {err:?}"
        );
        let err = run.promote("job", 1, &[RESIDUAL_1, key]).await.unwrap_err();
        assert!(
            matches!(err, StoreError::UnsafeKey { .. }),
            "{key:?}: {err:?}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn s3_endpoint_option_is_validated() {
    let options = StoreOptions {
        s3_endpoint: Some("ftp://127.0.0.1:21".to_owned()),
        ..StoreOptions::default()
    };
    let err = ArtifactStore::from_url("s3://bucket/x", &options).unwrap_err();
    assert!(err.to_string().contains("bad s3 endpoint"), "{err}");
}

#[test]
fn debug_output_names_the_store_only() {
    let store = unreachable_store("http://127.0.0.1:9".to_owned());
    let shown = format!("{store:?}");
    assert_eq!(
        shown,
        "ArtifactStore { url: \"s3://unreachable-bucket/prefix\", .. }"
    );
    let options = format!("{:?}", store.options());
    assert!(!options.contains("testing-secret"), "{options}");
    assert!(options.contains("<hidden>"), "{options}");
}

/// GCS and Azure stores open from their URLs with the same options as S3
/// (no request is made at open time); without an Azure account the error
/// names the store and what is missing.
#[tokio::test]
async fn gcs_and_azure_urls_open_stores() {
    let options = StoreOptions::default();
    match ArtifactStore::from_url("gs://capture-test-bucket/team", &options) {
        Ok(store) => {
            assert_eq!(store.url().to_string(), "gs://capture-test-bucket/team");
            let run = store.run("exp", "run1").unwrap();
            assert_eq!(run.root_url(), "gs://capture-test-bucket/team/exp/run1");
        }
        Err(err) => panic!("opening a GCS store needs no request: {err}"),
    }
    if std::env::var_os("AZURE_STORAGE_ACCOUNT_NAME").is_none() {
        let err = ArtifactStore::from_url("az://captures/team", &options).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("az://captures/team"), "{msg}");
        assert!(msg.to_lowercase().contains("account"), "{msg}");
    }
}
