//! Hostile names and keys, run through every place a name becomes part of
//! an object key: experiment names, run and job ids, relative and staged
//! keys, listing prefixes, store URLs, prompt set names and prompt ids. Each
//! must be refused with a clear error before any I/O.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;

use super::{ArtifactStore, RunStore, S3Credentials, StoreError, StoreOptions, StoreUrl};
use crate::prompts::{PromptError, PromptSet, validate_path_component};
use crate::run::{internals_key, residual_key};

/// Names an attacker (or a typo) might hand over as an experiment, run id,
/// job id, prompt set or prompt id. None is a safe single path part.
pub(crate) fn hostile_names() -> Vec<String> {
    let fixed = [
        // traversal
        ".",
        "..",
        "...",
        "../x",
        "a/../../b",
        "./a",
        "a/.",
        // absolute and Windows paths
        "/",
        "/etc/passwd",
        "C:\\x",
        "C:x",
        "\\\\server\\share",
        "a\\b",
        "a/b",
        // NUL and control characters
        "a\0b",
        "\0",
        "a\u{1}b",
        "a\nb",
        "a\rb",
        "a\tb",
        "\u{7f}",
        "a\u{85}b",
        // empty and whitespace
        "",
        " ",
        "\t",
        " \n ",
        "a b",
        " a",
        "a ",
        // unicode tricks
        "a\u{202e}b",
        "\u{ff0e}\u{ff0e}",
        "\u{ff0e}\u{ff0e}\u{ff0f}x",
        "a\u{200b}b",
        "\u{feff}a",
        "é",
        "a\u{2215}b",
        // encodings and other separators
        "%2e%2e",
        "%2e%2e%2fx",
        "..%2f..",
        "a%00b",
        "a:b",
        "a?b",
        "a#b",
        "a*b",
        "~",
        "~root",
        "$HOME",
    ];
    let mut names: Vec<String> = fixed.iter().map(|s| (*s).to_owned()).collect();
    names.push("a".repeat(300));
    names.push("a".repeat(5000));
    names.push("é".repeat(150));
    names
}

/// Keys that must never reach a store, whatever they are used for: every
/// hostile name alone and as a part of an otherwise documented key.
fn hostile_keys() -> Vec<String> {
    let mut keys = Vec::new();
    // `a/b` is a fine two-part key; it is hostile only as a single name.
    for name in hostile_names().into_iter().filter(|name| name != "a/b") {
        keys.push(format!("inference/raw/residual/{name}/1.pt"));
        keys.push(format!("inference/{name}"));
        keys.push(format!("{name}/manifest.json"));
        // The prompt-id path: a hostile id in an otherwise safe set.
        keys.push(residual_key("dynamic", &name));
        if !name.is_empty() {
            // An empty id gives `_L3.pt`, a safe key: prompt checks refuse it.
            keys.push(internals_key("dynamic", &name, 3));
        }
        keys.push(residual_key(&name, "1"));
        if !name.is_empty() {
            keys.push(name);
        }
    }
    keys.extend(
        [
            "_staging/j/1/x.pt",
            "a//b",
            "a/b/",
            "inference/../manifest.json",
        ]
        .map(str::to_owned),
    );
    keys.push(vec!["a"; 17].join("/"));
    keys.push(format!("inference/{}", "a/".repeat(300)));
    keys
}

/// A clear refusal of a name or key, never an I/O error.
fn assert_refused<T: std::fmt::Debug>(what: &str, result: Result<T, StoreError>) {
    match result {
        Err(err @ (StoreError::UnsafeName { .. } | StoreError::UnsafeKey { .. })) => {
            let msg = err.to_string();
            assert!(msg.starts_with("unsafe "), "{what}: {msg}");
            assert!(msg.contains(": "), "{what}: no reason in {msg}");
            assert!(msg.len() < 400, "{what}: message not shortened: {msg}");
        }
        other => panic!("{what} was not refused as unsafe: {other:?}"),
    }
}

/// Every file and folder below `dir`.
fn entries_below(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(entries_below(&path));
        }
        found.push(path);
    }
    found
}

/// Runs every name and key operation of `store` with hostile input.
async fn refuse_everything(store: &ArtifactStore, scratch: &Path) {
    let payload = Bytes::from_static(b"payload");
    let upload = scratch.join("upload.bin");
    std::fs::write(&upload, b"payload").unwrap();
    for name in hostile_names() {
        let shown = format!("{name:?}");
        assert_refused(&format!("experiment {shown}"), store.run(&name, "run"));
        assert_refused(&format!("run id {shown}"), store.run("exp", &name));
        assert_refused(
            &format!("staging job id {shown}"),
            RunStore::staging_prefix(&name, 1),
        );
        let run = store.run("exp", "run").unwrap();
        assert_refused(
            &format!("stage_put job id {shown}"),
            run.stage_put(&name, 1, "manifest.json", payload.clone())
                .await,
        );
        assert_refused(
            &format!("stage_put_file job id {shown}"),
            run.stage_put_file(&name, 1, "manifest.json", &upload).await,
        );
        assert_refused(
            &format!("promote job id {shown}"),
            run.promote(&name, 1, &["manifest.json"]).await,
        );
        assert_refused(
            &format!("discard_attempt {shown}"),
            run.discard_attempt(&name, 1).await,
        );
        assert_refused(
            &format!("discard_job_staging {shown}"),
            run.discard_job_staging(&name).await,
        );
    }
    let run = store.run("exp", "run").unwrap();
    assert_refused("attempt 0", RunStore::staging_prefix("job", 0));
    assert_refused(
        "stage_put attempt 0",
        run.stage_put("job", 0, "manifest.json", payload.clone())
            .await,
    );
    for key in hostile_keys() {
        let shown = format!("{key:?}");
        assert_refused(
            &format!("stage_put {shown}"),
            run.stage_put("job", 1, &key, payload.clone()).await,
        );
        assert_refused(
            &format!("stage_put_file {shown}"),
            run.stage_put_file("job", 1, &key, &upload).await,
        );
        assert_refused(
            &format!("promote {shown}"),
            run.promote("job", 1, &["manifest.json", key.as_str()])
                .await,
        );
        assert_refused(
            &format!("put_root_file {shown}"),
            run.put_root_file(&key, payload.clone()).await,
        );
        if key.starts_with("_staging/") {
            // Staged objects may be read and listed, only not documented.
            continue;
        }
        assert_refused(&format!("get {shown}"), run.get(&key).await);
        assert_refused(
            &format!("get_range {shown}"),
            run.get_range(&key, 0..1).await,
        );
        assert_refused(&format!("get_tail {shown}"), run.get_tail(&key, 8).await);
        assert_refused(&format!("head {shown}"), run.head(&key).await);
        if !key.ends_with('/') {
            // A listing prefix may end with one '/'; `{key}/` below covers those.
            assert_refused(&format!("list {shown}"), run.list(&key).await);
        }
        assert_refused(
            &format!("list {shown}/"),
            run.list(&format!("{key}/")).await,
        );
    }
}

#[tokio::test]
async fn hostile_names_never_reach_a_local_store() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let store = ArtifactStore::from_url(root.to_str().unwrap(), &StoreOptions::default()).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    refuse_everything(&store, scratch.path()).await;
    // Nothing was written in the store, nor beside it.
    assert_eq!(entries_below(dir.path()), vec![root.clone()]);
}

/// An S3 store whose endpoint refuses connections: any request that got as
/// far as I/O would fail with a connection error, not an unsafe-name one.
#[tokio::test]
async fn hostile_names_are_refused_before_any_request() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let options = StoreOptions {
        s3_endpoint: Some(endpoint),
        s3_credentials: Some(S3Credentials {
            access_key_id: "test".into(),
            secret_access_key: "test".into(),
            session_token: None,
        }),
        connect_timeout: Duration::from_millis(200),
        max_retries: 0,
        ..StoreOptions::default()
    };
    let store = ArtifactStore::from_url("s3://capture-bucket/prefix", &options).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    refuse_everything(&store, scratch.path()).await;
    // The endpoint really is unreachable: a safe key does reach I/O and fails.
    let run = store.run("exp", "run").unwrap();
    let err = run.get("manifest.json").await.unwrap_err();
    assert!(
        !matches!(
            err,
            StoreError::UnsafeKey { .. } | StoreError::UnsafeName { .. }
        ),
        "{err:?}"
    );
}

#[test]
fn hostile_store_url_prefixes_and_buckets_are_refused() {
    for name in hostile_names() {
        if name.is_empty() || name == "a/b" {
            continue; // `s3://bucket/` and `s3://bucket/a/b` are fine
        }
        for url in [
            format!("s3://capture-bucket/{name}"),
            format!("s3://capture-bucket/ok/{name}"),
            format!("s3://capture-bucket/{name}/ok"),
            format!("gs://capture-bucket/{name}"),
            format!("az://capture/{name}"),
            format!("s3://{name}/ok"),
        ] {
            match StoreUrl::parse(&url) {
                Err(StoreError::InvalidUrl { reason, .. }) => {
                    assert!(!reason.is_empty(), "{url:?}");
                }
                other => panic!("store url {url:?} was accepted: {other:?}"),
            }
        }
    }
}

#[test]
fn hostile_prompt_set_names_and_ids_are_refused() {
    for name in hostile_names() {
        let shown = format!("{name:?}");
        let refused = |what: &str, result: Result<PromptSet, PromptError>| match result {
            Err(err @ PromptError::UnsafeName { .. }) => {
                let msg = err.to_string();
                assert!(msg.starts_with("unsafe prompt "), "{what} {shown}: {msg}");
            }
            other => panic!("{what} {shown} was accepted: {other:?}"),
        };
        let one_prompt = |id: &str| {
            serde_json::json!({ "prompts": [{ "id": id, "text": "hello" }] }).to_string()
        };
        refused(
            "set name",
            PromptSet::from_json_str(&name, &one_prompt("1"), "test.json"),
        );
        refused(
            "prompt id",
            PromptSet::from_json_str("set", &one_prompt(&name), "test.json"),
        );
        // A later prompt with a hostile id fails the whole set.
        let json = serde_json::json!({ "prompts": [
            { "id": 1, "text": "fine" },
            { "id": name, "text": "hello" },
        ] })
        .to_string();
        refused(
            "second prompt id",
            PromptSet::from_json_str("set", &json, "test.json"),
        );
        assert!(
            validate_path_component("prompt id", &name).is_err(),
            "{shown}"
        );
        if !name.contains(['/', '\0']) && name.len() < 250 {
            // The file stem names the set; it is checked before the file is read.
            let path = Path::new("/nonexistent-dir").join(format!("{name}.json"));
            let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned());
            if stem.as_deref() == Some(name.as_str()) {
                refused("file stem", PromptSet::from_file(&path));
            }
        }
    }
}
