//! The deployment files against the real binaries and the real schema:
//! KEDA's runnable-jobs query (`deploy/k8s/base/keda-runnable-jobs.sql`) on
//! the migrated Postgres schema, and `coordinator migrate`, `coordinator
//! serve` and `worker run` started with exactly the arguments and
//! environment that the Kubernetes manifests (the CPU overlay, rendered by
//! kustomize) give their containers. Only addresses and paths that must be
//! local are replaced, each replacement checked to exist in the manifests,
//! and secrets get test values.
//!
//! Needs PostgreSQL and moto (`scripts/services.sh`), kubectl (or kustomize)
//! to render the overlays, and python3 with PyYAML and boto3.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use capture_proto::tonic::transport::Endpoint;
use capture_proto::tonic_health::pb::HealthCheckRequest;
use capture_proto::tonic_health::pb::health_check_response::ServingStatus;
use capture_proto::tonic_health::pb::health_client::HealthClient;
use capture_tests::cluster::{free_port, fresh_database, s3_endpoint, sql, unique_name};
use capture_tests::sandbox::{repo_root, run, run_ok, tiny_model, workspace_bin};
use serde_json::Value;

/// The model the worker manifests load, and the KEDA query counts jobs of.
const MANIFEST_MODEL: &str = "google/gemma-2-2b-it";
const KEDA_QUERY: &str = "deploy/k8s/base/keda-runnable-jobs.sql";
const START_TIMEOUT: Duration = Duration::from_secs(60);
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

// ------------------------------------------------------------ manifests

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// YAML documents as JSON values, through python3 and PyYAML.
fn yaml_documents(yaml: &[u8]) -> Vec<Value> {
    let mut child = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 is needed to read the manifests (with PyYAML)");
    child
        .stdin
        .take()
        .expect("a stdin pipe")
        .write_all(yaml)
        .expect("write the YAML to python3");
    let out = child.wait_with_output().expect("python3 ran");
    assert!(
        out.status.success(),
        "python3 could not read the YAML (is PyYAML installed?): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("python3 wrote JSON")
}

/// `kustomize build deploy/k8s/DIR` (or `kubectl kustomize`), parsed.
fn render(dir: &str) -> Vec<Value> {
    let path = repo_root().join("deploy/k8s").join(dir);
    let mut cmd = if on_path("kustomize") {
        let mut cmd = Command::new("kustomize");
        cmd.arg("build");
        cmd
    } else {
        assert!(
            on_path("kubectl"),
            "kubectl (or kustomize) is needed to render deploy/k8s: install kubectl"
        );
        let mut cmd = Command::new("kubectl");
        cmd.arg("kustomize");
        cmd
    };
    let out = run_ok(cmd.arg(&path));
    yaml_documents(&out.stdout)
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|doc| doc["kind"] == kind && doc["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("the manifests have no {kind} {name}"))
}

fn string(value: &Value, what: &str) -> String {
    value
        .as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {value}"))
        .to_owned()
}

/// Values the test gives the manifests' Secrets, by (Secret, key).
struct TestSecrets(BTreeMap<(String, String), String>);

impl TestSecrets {
    fn new(database_url: &str) -> Self {
        let values = [
            ("capture-database", "DATABASE_URL", database_url.to_owned()),
            (
                "capture-tokens",
                "CAPTURE_TOKEN",
                unique_name("client-token"),
            ),
            (
                "capture-tokens",
                "CAPTURE_WORKER_TOKEN",
                unique_name("worker-token"),
            ),
            // moto's credentials (scripts/services.sh)
            ("capture-s3", "AWS_ACCESS_KEY_ID", "testing".to_owned()),
            ("capture-s3", "AWS_SECRET_ACCESS_KEY", "testing".to_owned()),
            // never sent: the test's model is a local directory
            ("capture-hf", "HF_TOKEN", "hf_deploy_test".to_owned()),
        ];
        Self(
            values
                .into_iter()
                .map(|(secret, key, value)| ((secret.to_owned(), key.to_owned()), value))
                .collect(),
        )
    }

    fn get(&self, secret: &str, key: &str) -> &str {
        &self.0[&(secret.to_owned(), key.to_owned())]
    }
}

/// The Secrets and keys `deploy/k8s/secrets.example.yaml` defines.
fn example_secret_keys() -> Vec<(String, String)> {
    let text = std::fs::read(repo_root().join("deploy/k8s/secrets.example.yaml"))
        .expect("deploy/k8s/secrets.example.yaml");
    let mut keys = Vec::new();
    for doc in yaml_documents(&text) {
        let name = string(&doc["metadata"]["name"], "a Secret's name");
        for section in ["stringData", "data"] {
            if let Some(map) = doc[section].as_object() {
                keys.extend(map.keys().map(|key| (name.clone(), key.clone())));
            }
        }
    }
    keys
}

/// A container's command line and environment as the kubelet would give
/// them: `envFrom` first, `env` over it, references resolved.
#[derive(Debug, Clone)]
struct Launch {
    what: String,
    args: Vec<String>,
    env: BTreeMap<String, String>,
}

impl Launch {
    fn of(docs: &[Value], kind: &str, name: &str, secrets: &TestSecrets) -> Self {
        let doc = find(docs, kind, name);
        let containers = doc["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap_or_else(|| panic!("{kind} {name} has no containers"));
        assert_eq!(containers.len(), 1, "{kind} {name}: one container");
        let container = &containers[0];
        assert!(
            container.get("command").is_none(),
            "{kind} {name}: the image's entrypoint runs (no command override)"
        );
        let args = container["args"]
            .as_array()
            .map(|args| args.iter().map(|a| string(a, "an argument")).collect())
            .unwrap_or_default();
        let examples = example_secret_keys();
        let secret = |reference: &Value| -> Option<String> {
            let secret_name = string(&reference["name"], "secretKeyRef.name");
            let key = string(&reference["key"], "secretKeyRef.key");
            assert!(
                examples.contains(&(secret_name.clone(), key.clone())),
                "{kind} {name} reads Secret {secret_name}/{key}, which secrets.example.yaml lacks"
            );
            Some(secrets.get(&secret_name, &key).to_owned())
        };
        let config_map = |config_map_name: &str| -> BTreeMap<String, String> {
            find(docs, "ConfigMap", config_map_name)["data"]
                .as_object()
                .map(|data| {
                    data.iter()
                        .map(|(k, v)| (k.clone(), string(v, "a ConfigMap value")))
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut env = BTreeMap::new();
        for source in container["envFrom"].as_array().into_iter().flatten() {
            let reference = &source["configMapRef"];
            assert!(
                reference.is_object(),
                "{kind} {name}: only envFrom configMapRef is resolved here: {source}"
            );
            env.extend(config_map(&string(&reference["name"], "configMapRef.name")));
        }
        for entry in container["env"].as_array().into_iter().flatten() {
            let var = string(&entry["name"], "an env name");
            let value = if let Some(value) = entry.get("value") {
                Some(string(value, "an env value"))
            } else if let Some(reference) = entry["valueFrom"].get("secretKeyRef") {
                secret(reference)
            } else if let Some(reference) = entry["valueFrom"].get("configMapKeyRef") {
                let key = string(&reference["key"], "configMapKeyRef.key");
                config_map(&string(&reference["name"], "configMapKeyRef.name")).remove(&key)
            } else {
                panic!("{kind} {name}: env {var} has a source this test does not resolve: {entry}")
            };
            let value = value.unwrap_or_else(|| panic!("{kind} {name}: env {var} has no value"));
            env.insert(var, value);
        }
        Self {
            what: format!("{kind} {name}"),
            args,
            env,
        }
    }

    /// Replaces a variable the manifests set (it must be there).
    fn replace_env(&mut self, name: &str, value: &str) -> String {
        let old = self.env.insert(name.to_owned(), value.to_owned());
        old.unwrap_or_else(|| panic!("{}: the manifests set no {name} to replace", self.what))
    }

    /// Adds a variable the manifests leave out (it must not be there).
    fn add_env(&mut self, name: &str, value: &str) {
        let old = self.env.insert(name.to_owned(), value.to_owned());
        assert!(
            old.is_none(),
            "{}: the manifests already set {name}",
            self.what
        );
    }

    /// Replaces the value after `flag` (it must be there).
    fn replace_arg(&mut self, flag: &str, value: &str) -> String {
        let at = self
            .args
            .iter()
            .position(|arg| arg == flag)
            .unwrap_or_else(|| panic!("{}: the manifests pass no {flag}", self.what));
        std::mem::replace(&mut self.args[at + 1], value.to_owned())
    }

    /// The binary with exactly this environment (nothing inherited) and
    /// these arguments, plus `extra`.
    fn command(&self, binary: &str, extra: &[&str]) -> Command {
        let mut cmd = self.environment(binary);
        cmd.args(&self.args).args(extra);
        cmd
    }

    /// The binary with exactly this environment and no arguments yet, as
    /// `kubectl exec` runs another command in the container.
    fn environment(&self, binary: &str) -> Command {
        let mut cmd = Command::new(workspace_bin(binary));
        cmd.env_clear().envs(&self.env);
        cmd
    }
}

// ------------------------------------------------------------ processes

/// A child process with its output in a log file; killed on drop.
struct Running {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Running {
    fn spawn(name: &str, cmd: &mut Command, dir: &Path) -> Self {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("a log file");
        let child = cmd
            .stdout(file.try_clone().expect("share the log file"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Self {
            name: name.to_owned(),
            child: Some(child),
            log,
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics with the log if the process has exited.
    fn assert_running(&mut self) {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            panic!("{} exited with {status}:\n{}", self.name, self.log_text());
        }
    }

    /// SIGTERM, as the kubelet sends it; the exit status within `timeout`.
    fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        run(Command::new("kill").args(["-TERM", &child.id().to_string()]));
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// grpc.health.v1 Check for the whole server (service ""), as Kubernetes'
/// grpc probe sends it.
fn health(url: &str) -> Option<i32> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async {
        let channel = Endpoint::from_shared(url.to_owned())
            .ok()?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .ok()?;
        let mut client = HealthClient::new(channel);
        let response = client
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .ok()?;
        Some(response.into_inner().status)
    })
}

/// GET `path` from `addr` over plain HTTP/1.1: status and body.
fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

/// Whether `BINARY SUBCOMMAND --help` offers `--metrics-listen`.
fn has_metrics_flag(binary: &str, subcommand: &str) -> bool {
    let out = run_ok(Command::new(workspace_bin(binary)).args([subcommand, "--help"]));
    String::from_utf8_lossy(&out.stdout).contains("--metrics-listen")
}

fn assert_metrics(addr: &str, what: &str) {
    let mut last = None;
    wait_until(
        &format!("{what} serves /metrics on {addr}"),
        START_TIMEOUT,
        || {
            last = http_get(addr, "/metrics");
            matches!(&last, Some((200, _)))
        },
    );
    let (_, body) = last.expect("a response");
    assert!(
        body.lines().any(|line| line.starts_with("# ")),
        "{what}: /metrics is not Prometheus text:\n{body}"
    );
}

// ------------------------------------------------------------------ S3

/// Creates `bucket` on the test S3 endpoint unless it exists.
fn ensure_bucket(bucket: &str) {
    run_ok(Command::new("python3").args([
        "-c",
        "import sys, boto3\n\
         s3 = boto3.client('s3', endpoint_url=sys.argv[1], region_name='us-east-1')\n\
         try:\n    \
             s3.create_bucket(Bucket=sys.argv[2])\n\
         except (s3.exceptions.BucketAlreadyOwnedByYou, s3.exceptions.BucketAlreadyExists):\n    \
             pass",
        &s3_endpoint(),
        bucket,
    ]));
}

/// The keys below `prefix` in `bucket`.
fn list_keys(bucket: &str, prefix: &str) -> Vec<String> {
    let out = run_ok(Command::new("python3").args([
        "-c",
        "import sys, boto3\n\
         s3 = boto3.client('s3', endpoint_url=sys.argv[1], region_name='us-east-1')\n\
         for page in s3.get_paginator('list_objects_v2').paginate(Bucket=sys.argv[2], Prefix=sys.argv[3]):\n    \
             for obj in page.get('Contents', []):\n        \
                 print(obj['Key'])",
        &s3_endpoint(),
        bucket,
        prefix,
    ]));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

// ------------------------------------------------------------ KEDA query

fn keda_query() -> String {
    std::fs::read_to_string(repo_root().join(KEDA_QUERY)).expect("the KEDA query file")
}

/// The KEDA query for another model and revision than the manifests'.
fn keda_query_for(model_id: &str, revision: &str) -> String {
    let query = keda_query();
    let model_literal = format!("model_id = '{MANIFEST_MODEL}'");
    let revision_literal = "model_revision = ''";
    assert_eq!(query.matches(&model_literal).count(), 1, "{KEDA_QUERY}");
    assert_eq!(query.matches(revision_literal).count(), 1, "{KEDA_QUERY}");
    let quote = |s: &str| s.replace('\'', "''");
    query
        .replace(&model_literal, &format!("model_id = '{}'", quote(model_id)))
        .replace(
            revision_literal,
            &format!("model_revision = '{}'", quote(revision)),
        )
}

fn count(database_url: &str, query: &str) -> i64 {
    let out = sql(database_url, query);
    out.parse()
        .unwrap_or_else(|_| panic!("the KEDA query returned {out:?}, not one integer"))
}

fn migrate(database_url: &str) {
    run_ok(
        Command::new(workspace_bin("coordinator"))
            .args(["migrate", "--database-url", database_url])
            .env("RUST_LOG", "warn"),
    );
}

#[test]
fn the_scaled_objects_query_is_the_tested_file() {
    for overlay in ["base", "overlays/cpu", "overlays/gpu"] {
        let docs = render(overlay);
        let scaled = find(&docs, "ScaledObject", "capture-worker");
        let triggers = scaled["spec"]["triggers"].as_array().expect("triggers");
        let postgres: Vec<_> = triggers
            .iter()
            .filter(|t| t["type"] == "postgresql")
            .collect();
        assert_eq!(postgres.len(), 1, "{overlay}: one postgresql trigger");
        assert_eq!(
            postgres[0]["metadata"]["query"].as_str().map(str::trim),
            Some(keda_query().trim()),
            "{overlay}: the ScaledObject's query is not {KEDA_QUERY}"
        );
        let worker = find(&docs, "Deployment", "capture-worker");
        let args = &worker["spec"]["template"]["spec"]["containers"][0]["args"];
        let args: Vec<&str> = args
            .as_array()
            .expect("worker args")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let model = args.windows(2).find(|w| w[0] == "--model").map(|w| w[1]);
        assert_eq!(
            model,
            Some(MANIFEST_MODEL),
            "{overlay}: the workers' --model and the KEDA query's model_id differ"
        );
        assert!(
            !args.contains(&"--revision"),
            "{overlay}: the workers pin a --revision; the KEDA query counts revision ''"
        );
    }
}

/// A run of the manifests' model, one being cancelled, one of another
/// model and one of another revision.
const LIVE: &str = "00000000-0000-4000-8000-0000000000a1";
const CANCELLING: &str = "00000000-0000-4000-8000-0000000000a2";
const OTHER_MODEL: &str = "00000000-0000-4000-8000-0000000000a3";
const OTHER_REVISION: &str = "00000000-0000-4000-8000-0000000000a4";
const OTHER: &str = "google/gemma-2-9b-it";

/// A job row the KEDA test inserts, and whether the query should count it.
struct SeedJob {
    run: &'static str,
    key: &'static str,
    model: &'static str,
    revision: &'static str,
    state: &'static str,
    run_after: &'static str,
    counted: bool,
}

/// A job of the manifests' model and revision, claimable from now on.
const fn seed(run: &'static str, key: &'static str, state: &'static str, counted: bool) -> SeedJob {
    SeedJob {
        run,
        key,
        model: MANIFEST_MODEL,
        revision: "",
        state,
        run_after: "now()",
        counted,
    }
}

impl SeedJob {
    const fn model(self, model: &'static str) -> Self {
        Self { model, ..self }
    }

    const fn revision(self, revision: &'static str) -> Self {
        Self { revision, ..self }
    }

    const fn run_after(self, run_after: &'static str) -> Self {
        Self { run_after, ..self }
    }
}

#[test]
fn keda_query_counts_the_jobs_that_need_a_worker() {
    let db = fresh_database("capture_keda");
    migrate(&db);
    let query = keda_query();
    assert_eq!(count(&db, &query), 0, "an empty queue needs no worker");

    sql(
        &db,
        &format!(
            "INSERT INTO runs (id, experiment, spec, model_id, model_revision, cancel_requested) VALUES
             ('{LIVE}', 'keda', '{{}}', '{MANIFEST_MODEL}', '', false),
             ('{CANCELLING}', 'keda', '{{}}', '{MANIFEST_MODEL}', '', true),
             ('{OTHER_MODEL}', 'keda', '{{}}', '{OTHER}', '', false),
             ('{OTHER_REVISION}', 'keda', '{{}}', '{MANIFEST_MODEL}', 'refs/pr/1', false)"
        ),
    );
    let jobs = [
        seed(LIVE, "queued-0", "queued", true),
        seed(LIVE, "queued-1", "queued", true),
        seed(LIVE, "queued-2", "queued", true),
        seed(LIVE, "retry-due", "queued", true).run_after("now() - interval '1 minute'"),
        seed(LIVE, "backing-off", "queued", false).run_after("now() + interval '1 hour'"),
        seed(LIVE, "leased-0", "leased", true),
        seed(LIVE, "leased-1", "leased", true),
        seed(LIVE, "succeeded", "succeeded", false),
        seed(LIVE, "dead", "dead", false),
        seed(LIVE, "cancelled", "cancelled", false),
        seed(CANCELLING, "queued", "queued", false),
        seed(CANCELLING, "leased", "leased", true),
        seed(OTHER_MODEL, "queued", "queued", false).model(OTHER),
        seed(OTHER_MODEL, "leased", "leased", false).model(OTHER),
        seed(OTHER_REVISION, "queued", "queued", false).revision("refs/pr/1"),
    ];
    for job in &jobs {
        let (owner, expires) = if job.state == "leased" {
            ("'worker-a'", "now() + interval '30 seconds'")
        } else {
            ("NULL", "NULL")
        };
        sql(
            &db,
            &format!(
                "INSERT INTO jobs (id, run_id, job_key, payload, model_id, model_revision, state,
                                   attempt, max_attempts, lease_owner, lease_expires_at, run_after)
                 VALUES (gen_random_uuid(), '{}', '{}', '{{}}', '{}', '{}', '{}', 1, 3, {owner},
                         {expires}, {})",
                job.run, job.key, job.model, job.revision, job.state, job.run_after
            ),
        );
    }
    let expected = jobs.iter().filter(|job| job.counted).count() as i64;
    assert_eq!(expected, 7);
    assert_eq!(
        count(&db, &query),
        expected,
        "queued and claimable, or leased, for this model and revision"
    );

    // a lease that expired but was not yet swept still holds a worker
    sql(
        &db,
        "UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE job_key = 'leased-0'",
    );
    assert_eq!(count(&db, &query), expected);

    // the backoff passes: one more job is claimable
    sql(
        &db,
        "UPDATE jobs SET run_after = now() - interval '1 second' WHERE job_key = 'backing-off'",
    );
    assert_eq!(count(&db, &query), expected + 1);

    // everything of the live run finishes: only the cancelling run's leased
    // job, still being worked on, keeps a worker
    sql(
        &db,
        &format!(
            "UPDATE jobs SET state = 'succeeded', lease_owner = NULL, lease_expires_at = NULL,
                             finished_at = now()
             WHERE run_id = '{LIVE}' AND state IN ('queued', 'leased')"
        ),
    );
    assert_eq!(count(&db, &query), 1);

    // its worker stops: nothing left, KEDA scales to zero
    sql(
        &db,
        &format!(
            "UPDATE jobs SET state = 'cancelled', lease_owner = NULL, lease_expires_at = NULL,
                             finished_at = now()
             WHERE run_id = '{CANCELLING}' AND state = 'leased'"
        ),
    );
    assert_eq!(count(&db, &query), 0);
}

// -------------------------------------------- the binaries, as deployed

#[test]
fn binaries_start_with_the_arguments_and_environment_of_the_manifests() {
    let docs = render("overlays/cpu");
    let db = fresh_database("capture_deploy");
    let secrets = TestSecrets::new(&db);
    let logs = tempfile::tempdir().expect("a log directory");
    let hf_home = tempfile::tempdir().expect("an HF_HOME");
    let grpc = format!("127.0.0.1:{}", free_port());
    let coordinator_metrics = format!("127.0.0.1:{}", free_port());
    let worker_metrics = format!("127.0.0.1:{}", free_port());
    let coordinator_url = format!("http://{grpc}");

    // The manifests' store URL as it is: its bucket on the test S3 server.
    let mut coordinator = Launch::of(&docs, "Deployment", "capture-coordinator", &secrets);
    let store = coordinator.env["CAPTURE_STORE"].clone();
    let (bucket, prefix) = store
        .strip_prefix("s3://")
        .and_then(|rest| rest.split_once('/'))
        .unwrap_or_else(|| panic!("CAPTURE_STORE {store} is not s3://bucket/prefix"));
    ensure_bucket(bucket);

    // 1. the migration Job
    let migration = Launch::of(&docs, "Job", "capture-migrate", &secrets);
    assert_eq!(migration.args, ["migrate"]);
    let out = run(&mut migration.command("coordinator", &[]));
    assert!(
        out.status.success(),
        "the migration Job failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        count(&db, "SELECT count(*) FROM _sqlx_migrations WHERE success") >= 2,
        "the migration Job applied the migrations"
    );

    // 2. the coordinator: addresses local, S3 endpoint added (the manifests
    // use AWS S3's default endpoint)
    assert_eq!(
        coordinator.replace_env("CAPTURE_LISTEN", &grpc),
        "0.0.0.0:50051"
    );
    assert_eq!(
        coordinator.replace_env("CAPTURE_METRICS_LISTEN", &coordinator_metrics),
        "0.0.0.0:9090"
    );
    assert_eq!(
        coordinator.replace_env("CAPTURE_COORDINATOR", &coordinator_url),
        "http://capture-coordinator:50051"
    );
    coordinator.add_env("AWS_ENDPOINT_URL", &s3_endpoint());
    assert_eq!(coordinator.args, ["serve"]);
    let mut coordinator_process = Running::spawn(
        "coordinator",
        &mut coordinator.command("coordinator", &[]),
        logs.path(),
    );
    wait_until("coordinator health SERVING", START_TIMEOUT, || {
        coordinator_process.assert_running();
        health(&coordinator_url) == Some(ServingStatus::Serving as i32)
    });
    let metrics_flags = (
        has_metrics_flag("coordinator", "serve"),
        has_metrics_flag("worker", "run"),
    );
    if metrics_flags.0 {
        assert_metrics(&coordinator_metrics, "the coordinator");
    } else {
        eprintln!("note: `coordinator serve` has no --metrics-listen yet; /metrics not checked");
    }

    // the client token of the Secret is in force
    let mut anonymous = coordinator.clone();
    anonymous.env.remove("CAPTURE_TOKEN");
    let out = run(anonymous.environment("coordinator").arg("runs"));
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("bearer token"),
        "a client without CAPTURE_TOKEN was not refused for its token: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // 3. a run, submitted the way docs/deploy.md does it: `coordinator
    // submit` in the coordinator's container, with its environment
    let out = run_ok(
        coordinator
            .environment("coordinator")
            .arg("submit")
            .arg("--model")
            .arg(tiny_model())
            .args(["--prompt-set", "baseline", "--max-new-tokens", "4"])
            .args(["--experiment", "deploy"]),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let run_id = stdout
        .split_whitespace()
        .find(|w| w.len() == 36 && w.chars().filter(|c| *c == '-').count() == 4)
        .unwrap_or_else(|| panic!("no run id in submit's output: {stdout}"))
        .to_owned();

    // KEDA would start workers for it: the query (for the test's model)
    // counts every job of the run, none claimed yet
    let row = sql(
        &db,
        &format!("SELECT model_id || '|' || model_revision FROM runs WHERE id = '{run_id}'"),
    );
    let (model_id, revision) = row.split_once('|').expect("model_id|model_revision");
    let keda = keda_query_for(model_id, revision);
    let jobs = count(
        &db,
        &format!("SELECT count(*) FROM jobs WHERE run_id = '{run_id}'"),
    );
    assert!(jobs >= 2, "baseline's 5 prompts make 2 jobs, not {jobs}");
    assert_eq!(count(&db, &keda), jobs);

    // 4. a worker: the test's model for the manifests' hub id, addresses
    // and the model cache local
    let mut worker = Launch::of(&docs, "Deployment", "capture-worker", &secrets);
    let tiny = tiny_model().display().to_string();
    assert_eq!(worker.replace_arg("--model", &tiny), MANIFEST_MODEL);
    assert_eq!(
        worker.replace_env("CAPTURE_COORDINATOR", &coordinator_url),
        "http://capture-coordinator:50051"
    );
    assert_eq!(
        worker.replace_env("CAPTURE_METRICS_LISTEN", &worker_metrics),
        "0.0.0.0:9091"
    );
    assert_eq!(
        worker.replace_env("HF_HOME", &hf_home.path().display().to_string()),
        "/models/huggingface"
    );
    worker.add_env("AWS_ENDPOINT_URL", &s3_endpoint());
    assert_eq!(worker.args[..1], ["run"]);
    let mut worker_process =
        Running::spawn("worker", &mut worker.command("worker", &[]), logs.path());
    wait_until("the worker registers", START_TIMEOUT, || {
        worker_process.assert_running();
        count(&db, "SELECT count(*) FROM workers") >= 1
    });
    assert_eq!(
        sql(&db, "SELECT model_id FROM workers"),
        model_id,
        "the worker serves the run's model"
    );
    if metrics_flags.1 {
        assert_eq!(
            http_get(&worker_metrics, "/healthz").map(|(status, _)| status),
            Some(200),
            "the worker's liveness probe (GET /healthz)"
        );
        assert_metrics(&worker_metrics, "the worker");
    } else {
        eprintln!(
            "note: `worker run` has no --metrics-listen yet; /healthz and /metrics not checked"
        );
    }

    // the run completes; its artifacts are where the store URL says
    wait_until("the run finishes and is finalized", RUN_TIMEOUT, || {
        worker_process.assert_running();
        coordinator_process.assert_running();
        !sql(
            &db,
            &format!("SELECT state FROM runs WHERE id = '{run_id}' AND finalized_at IS NOT NULL"),
        )
        .is_empty()
    });
    let state = sql(
        &db,
        &format!("SELECT state FROM runs WHERE id = '{run_id}'"),
    );
    assert_eq!(
        state,
        "succeeded",
        "--- coordinator\n{}\n--- worker\n{}",
        coordinator_process.log_text(),
        worker_process.log_text()
    );
    let keys = list_keys(bucket, &format!("{prefix}/deploy/{run_id}/"));
    assert!(
        keys.iter().any(|k| k.ends_with("/manifest.json"))
            && keys.iter().filter(|k| k.ends_with(".pt")).count() == 5,
        "the run's manifest and 5 .pt files in s3://{bucket}/{prefix}/deploy/{run_id}/: {keys:?}"
    );
    assert_eq!(count(&db, &keda), 0, "nothing left: KEDA scales to zero");

    // 5. shutdown as the kubelet does it: SIGTERM, then exit 0 within the
    // pod's grace period (both are idle here)
    let grace = |kind: &str, name: &str| {
        let seconds =
            find(&docs, kind, name)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
                .as_u64()
                .unwrap_or(30);
        Duration::from_secs(seconds)
    };
    let status = worker_process.terminate(grace("Deployment", "capture-worker"));
    assert!(
        status.is_some_and(|s| s.success()),
        "worker on SIGTERM: {status:?}\n{}",
        worker_process.log_text()
    );
    let status = coordinator_process.terminate(grace("Deployment", "capture-coordinator"));
    assert!(
        status.is_some_and(|s| s.success()),
        "coordinator on SIGTERM: {status:?}\n{}",
        coordinator_process.log_text()
    );
}
