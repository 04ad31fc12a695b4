//! The hub path of `model_files::resolve_model_with` against a local HTTP
//! server that answers like the Hugging Face hub (no network, no
//! environment variables: each test has its own server and cache).

use std::path::{Path, PathBuf};

use capture_tests::hub_server::{HubRepo, HubServer};
use capture_worker::model_files::{
    HubSettings, ModelFiles, ModelSource, resolve_model, resolve_model_with,
};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const OTHER_COMMIT: &str = "fedcba9876543210fedcba9876543210fedcba98";
const TOKEN: &str = "hf_test_token";

/// The tiny checkpoint if it is there, else a small fake one with the same
/// file names (finding files does not look inside them).
fn checkpoint(tmp: &Path) -> PathBuf {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny-gemma2");
    if ["config.json", "tokenizer.json", "model.safetensors"]
        .iter()
        .all(|f| fixture.join(f).is_file())
    {
        return fixture;
    }
    let dir = tmp.join("fake-checkpoint");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), r#"{"model_type":"gemma2"}"#).unwrap();
    std::fs::write(dir.join("tokenizer.json"), r#"{"version":"1.0"}"#).unwrap();
    std::fs::write(dir.join("generation_config.json"), r#"{"eos_token_id":1}"#).unwrap();
    std::fs::write(dir.join("model.safetensors"), vec![7u8; 4096]).unwrap();
    dir
}

fn settings(server_endpoint: &str, tmp: &Path, token: Option<&str>) -> HubSettings {
    HubSettings {
        endpoint: server_endpoint.to_string(),
        cache_dir: tmp.join("hf-home/hub"),
        token: token.map(str::to_string),
        progress: false,
    }
}

fn source(spec: &str, revision: Option<&str>) -> ModelSource {
    ModelSource {
        spec: spec.to_string(),
        revision: revision.map(str::to_string),
    }
}

fn file_name(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

/// The hub files are the same bytes as the directory's, in the snapshot.
fn assert_same_checkpoint(hub: &ModelFiles, local: &ModelFiles) {
    assert_eq!(hub.config_sha256, local.config_sha256);
    assert_eq!(hub.tokenizer_sha256, local.tokenizer_sha256);
    assert_eq!(
        hub.generation_config_json.is_some(),
        local.generation_config_json.is_some()
    );
    let names = |f: &ModelFiles| {
        f.safetensors
            .iter()
            .map(|p| file_name(p))
            .collect::<Vec<_>>()
    };
    assert_eq!(names(hub), names(local));
    for (h, l) in hub.safetensors.iter().zip(&local.safetensors) {
        assert_eq!(std::fs::read(h).unwrap(), std::fs::read(l).unwrap());
    }
    assert_eq!(
        std::fs::read(&hub.tokenizer_json).unwrap(),
        std::fs::read(&local.tokenizer_json).unwrap()
    );
}

#[test]
fn hub_id_downloads_into_the_cache_at_the_servers_commit() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = checkpoint(tmp.path());
    let local = resolve_model(&ModelSource::new(ckpt.to_str().unwrap())).unwrap();
    let server = HubServer::start([(
        "tiny/gemma2".to_string(),
        HubRepo::from_dir(&ckpt, COMMIT).unwrap().lfs(),
    )])
    .unwrap();
    let hub = settings(&server.endpoint(), tmp.path(), None);

    let files = resolve_model_with(&source("tiny/gemma2", None), &hub).unwrap();
    let snapshot = hub
        .cache_dir
        .join("models--tiny--gemma2/snapshots")
        .join(COMMIT);
    assert_eq!(files.model_id, "tiny/gemma2");
    assert_eq!(files.revision.as_deref(), Some(COMMIT));
    assert_eq!(files.dir, snapshot);
    assert_eq!(files.config_json, snapshot.join("config.json"));
    assert_eq!(files.tokenizer_json, snapshot.join("tokenizer.json"));
    assert_eq!(files.safetensors, vec![snapshot.join("model.safetensors")]);
    assert_same_checkpoint(&files, &local);
    assert_eq!(
        std::fs::read_to_string(hub.cache_dir.join("models--tiny--gemma2/refs/main")).unwrap(),
        COMMIT
    );

    // hf-hub asked for the metadata with a one-byte range, then the file.
    let requests = server.requests();
    let config_url = "/tiny/gemma2/resolve/main/config.json";
    assert!(requests.iter().any(|r| r.path == config_url
        && r.range.as_deref() == Some("bytes=0-0")
        && r.status == 206));
    assert!(requests.iter().any(|r| r.path == config_url
        && r.range.as_deref() == Some("bytes=0-")
        && r.status == 206));
    // The weights went through the LFS-style redirect.
    assert!(
        requests
            .iter()
            .any(|r| r.path.starts_with("/lfs/") && r.status == 206)
    );
    assert!(requests.iter().all(|r| r.authorization.is_none()));

    // Once cached, the files are found without the hub.
    drop(server);
    let again = resolve_model_with(&source("tiny/gemma2", None), &hub).unwrap();
    assert_eq!(again, files);
}

#[test]
fn pinned_revision() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = checkpoint(tmp.path());
    let server = HubServer::start([(
        "tiny/gemma2".to_string(),
        HubRepo::from_dir(&ckpt, OTHER_COMMIT).unwrap(),
    )])
    .unwrap();
    let hub = settings(&server.endpoint(), tmp.path(), None);

    let files = resolve_model_with(&source("tiny/gemma2", Some(OTHER_COMMIT)), &hub).unwrap();
    assert_eq!(files.revision.as_deref(), Some(OTHER_COMMIT));
    assert!(files.dir.ends_with(format!("snapshots/{OTHER_COMMIT}")));
    assert!(
        server
            .requests()
            .iter()
            .any(|r| r.path == format!("/tiny/gemma2/resolve/{OTHER_COMMIT}/config.json"))
    );

    let err = resolve_model_with(&source("tiny/gemma2", Some("v9")), &hub)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!(
            "repo or revision not found: model tiny/gemma2 at revision v9 on {} (http 404 for config.json): check the hub id and the revision",
            server.endpoint()
        )
    );
}

#[test]
fn gated_repo_needs_hf_token() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = checkpoint(tmp.path());
    let server = HubServer::start([(
        "google/gemma-2-2b-it".to_string(),
        HubRepo::from_dir(&ckpt, COMMIT).unwrap().gated(TOKEN).lfs(),
    )])
    .unwrap();
    let spec = source("google/gemma-2-2b-it", None);

    let err = resolve_model_with(&spec, &settings(&server.endpoint(), tmp.path(), None))
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(
            "model google/gemma-2-2b-it is gated or private: accept its license on the hub and set HF_TOKEN"
        ),
        "{err}"
    );
    assert!(err.contains("without a token"), "{err}");
    assert_eq!(server.requests().last().unwrap().status, 401);

    let err = resolve_model_with(
        &spec,
        &settings(&server.endpoint(), tmp.path(), Some("hf_wrong")),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("is gated or private"), "{err}");
    assert!(err.contains("invalid or expired"), "{err}");

    let files = resolve_model_with(
        &spec,
        &settings(&server.endpoint(), tmp.path(), Some(TOKEN)),
    )
    .unwrap();
    assert_eq!(files.revision.as_deref(), Some(COMMIT));
    let bearer = format!("Bearer {TOKEN}");
    assert!(
        server
            .requests()
            .iter()
            .filter(|r| r.path.contains("/resolve/"))
            .any(|r| r.authorization.as_deref() == Some(bearer.as_str()) && r.status == 206)
    );
}

#[test]
fn unknown_repo_is_not_found() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = checkpoint(tmp.path());
    let server = HubServer::start([(
        "tiny/gemma2".to_string(),
        HubRepo::from_dir(&ckpt, COMMIT).unwrap(),
    )])
    .unwrap();
    let err = resolve_model_with(
        &source("nobody/nothing", None),
        &settings(&server.endpoint(), tmp.path(), None),
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        err,
        format!(
            "repo or revision not found: model nobody/nothing at revision main on {} (http 404 for config.json): check the hub id and the revision",
            server.endpoint()
        )
    );
}

#[test]
fn endpoint_with_nothing_listening_is_unreachable() {
    let tmp = tempfile::tempdir().unwrap();
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let endpoint = format!("http://127.0.0.1:{port}");
    let err = resolve_model_with(
        &source("google/gemma-2-2b-it", None),
        &settings(&endpoint, tmp.path(), None),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with(&format!("cannot reach the hub at {endpoint} (")),
        "{err}"
    );
    assert!(
        err.ends_with(
            "): no network? set HF_ENDPOINT for a mirror, or pass --model with a local directory"
        ),
        "{err}"
    );
}

#[test]
fn sharded_repo_without_generation_config() {
    let tmp = tempfile::tempdir().unwrap();
    let index = r#"{"metadata":{},"weight_map":{
        "b":"model-00002-of-00002.safetensors",
        "a":"model-00001-of-00002.safetensors",
        "c":"model-00002-of-00002.safetensors"}}"#;
    let repo = HubRepo::new(COMMIT)
        .file("config.json", r#"{"model_type":"gemma2"}"#)
        .file("tokenizer.json", "{}")
        .file("model.safetensors.index.json", index)
        .file("model-00001-of-00002.safetensors", vec![1u8; 100])
        .file("model-00002-of-00002.safetensors", vec![2u8; 200]);
    let server = HubServer::start([
        ("tiny/sharded".to_string(), repo.clone()),
        (
            "tiny/broken".to_string(),
            repo.clone().without("model-00002-of-00002.safetensors"),
        ),
        (
            "tiny/no-tokenizer".to_string(),
            repo.clone().without("tokenizer.json"),
        ),
        (
            "tiny/no-weights".to_string(),
            repo.without("model.safetensors.index.json"),
        ),
    ])
    .unwrap();
    let hub = settings(&server.endpoint(), tmp.path(), None);

    let files = resolve_model_with(&source("tiny/sharded", None), &hub).unwrap();
    let names: Vec<String> = files.safetensors.iter().map(|p| file_name(p)).collect();
    assert_eq!(
        names,
        [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors"
        ]
    );
    assert_eq!(
        std::fs::read(&files.safetensors[1]).unwrap(),
        vec![2u8; 200]
    );
    assert_eq!(files.generation_config_json, None);
    // The 404s are remembered the way huggingface_hub does, and not asked again.
    let no_exist = hub
        .cache_dir
        .join("models--tiny--sharded/.no_exist")
        .join(COMMIT);
    assert!(no_exist.join("generation_config.json").is_file());
    assert!(no_exist.join("model.safetensors").is_file());
    let asked = server.requests().len();
    assert_eq!(
        resolve_model_with(&source("tiny/sharded", None), &hub).unwrap(),
        files
    );
    assert_eq!(server.requests().len(), asked);
    // A cached index is enough even without the marker (caches hf-hub filled).
    std::fs::remove_file(no_exist.join("model.safetensors")).unwrap();
    assert_eq!(
        resolve_model_with(&source("tiny/sharded", None), &hub).unwrap(),
        files
    );
    assert_eq!(server.requests().len(), asked);

    let err = |id: &str| {
        resolve_model_with(&source(id, None), &hub)
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        err("tiny/broken"),
        "model.safetensors.index.json of model tiny/broken at revision main names shard model-00002-of-00002.safetensors, which the hub does not have (http 404)"
    );
    assert!(
        err("tiny/no-tokenizer").starts_with(
            "model tiny/no-tokenizer at revision main has no tokenizer.json on the hub"
        ),
    );
    assert_eq!(
        err("tiny/no-weights"),
        "model tiny/no-weights at revision main has neither model.safetensors nor model.safetensors.index.json on the hub: it has no safetensors weights"
    );
}

#[test]
fn moved_branch_is_downloaded_again() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = checkpoint(tmp.path());
    let hub_dir = tmp.path().to_path_buf();
    let first = HubServer::start([(
        "tiny/gemma2".to_string(),
        HubRepo::from_dir(&ckpt, COMMIT)
            .unwrap()
            .without("model.safetensors")
            .file("model.safetensors", vec![0u8; 16]),
    )])
    .unwrap();
    let hub = settings(&first.endpoint(), &hub_dir, None);
    let files = resolve_model_with(&source("tiny/gemma2", None), &hub).unwrap();
    assert_eq!(files.revision.as_deref(), Some(COMMIT));
    drop(first);

    // Only config.json stays in the old snapshot; main moved meanwhile.
    std::fs::remove_file(&files.safetensors[0]).unwrap();
    let second = HubServer::start([(
        "tiny/gemma2".to_string(),
        HubRepo::from_dir(&ckpt, OTHER_COMMIT).unwrap(),
    )])
    .unwrap();
    let hub = settings(&second.endpoint(), &hub_dir, None);
    let files = resolve_model_with(&source("tiny/gemma2", None), &hub).unwrap();
    assert_eq!(files.revision.as_deref(), Some(OTHER_COMMIT));
    assert!(files.dir.ends_with(OTHER_COMMIT));
    for path in [
        &files.config_json,
        &files.tokenizer_json,
        &files.safetensors[0],
    ] {
        assert!(path.starts_with(&files.dir), "{}", path.display());
    }
    assert_eq!(
        std::fs::read(&files.safetensors[0]).unwrap(),
        std::fs::read(ckpt.join("model.safetensors")).unwrap()
    );
}
