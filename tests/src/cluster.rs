//! A capture cluster on loopback for end-to-end tests: a fresh Postgres
//! database and S3 bucket (moto) per test, the real `coordinator serve`
//! process and real `worker run` processes, all killed on drop.
//!
//! Needs `DATABASE_URL` and `CAPTURE_S3_ENDPOINT` (with AWS test
//! credentials), which `scripts/test.sh` exports after starting PostgreSQL
//! and moto (`scripts/services.sh`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::sandbox::{run, run_ok, tiny_model, workspace_bin};

fn required_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: run the tests with `bash scripts/test.sh` (it starts PostgreSQL and moto), or `source scripts/services.sh && start_postgres && start_moto` first"
        )
    })
}

/// A name unique to this test process and call.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A fresh database on the test Postgres; returns its URL.
pub fn fresh_database(prefix: &str) -> String {
    let admin = required_env("DATABASE_URL");
    let name = unique_name(prefix).replace('-', "_");
    run_ok(
        Command::new("psql")
            .arg(&admin)
            .args(["-qtAc", &format!("CREATE DATABASE {name}")]),
    );
    let (base, _) = admin
        .rsplit_once('/')
        .expect("DATABASE_URL ends with /database");
    format!("{base}/{name}")
}

/// Runs one SQL query on `database_url` and returns its unaligned output.
pub fn sql(database_url: &str, query: &str) -> String {
    let out = run_ok(
        Command::new("psql")
            .arg(database_url)
            .args(["-qtAc", query]),
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The S3 endpoint of the tests (moto).
pub fn s3_endpoint() -> String {
    required_env("CAPTURE_S3_ENDPOINT")
}

/// A fresh bucket on the test S3 endpoint; returns its name.
pub fn fresh_bucket() -> String {
    let bucket = unique_name("capture-e2e").to_lowercase();
    run_ok(Command::new("python3").args([
        "-c",
        "import sys, boto3; boto3.client('s3', endpoint_url=sys.argv[1], region_name='us-east-1').create_bucket(Bucket=sys.argv[2])",
        &s3_endpoint(),
        &bucket,
    ]));
    bucket
}

/// Variables that would hand a process a coordinator, token or TLS file
/// behind the test's back: the cluster passes all of them as flags.
const CONNECTION_ENV: [&str; 6] = [
    "CAPTURE_COORDINATOR",
    "CAPTURE_TOKEN",
    "CAPTURE_WORKER_TOKEN",
    "CAPTURE_TLS_CA",
    "CAPTURE_TLS_CERT",
    "CAPTURE_TLS_KEY",
];

/// Environment every cluster process gets: the S3 endpoint and logs.
fn cluster_env<'a>(cmd: &'a mut Command, endpoint: &str) -> &'a mut Command {
    for name in CONNECTION_ENV {
        cmd.env_remove(name);
    }
    cmd.env("AWS_ENDPOINT_URL", endpoint)
        .env("AWS_ALLOW_HTTP", "true")
        .env(
            "RUST_LOG",
            std::env::var("CAPTURE_E2E_LOG").unwrap_or_else(|_| "info".into()),
        )
}

/// `coordinator args...` with the cluster's environment.
pub fn coordinator() -> Command {
    coordinator_via(&s3_endpoint())
}

/// `coordinator args...` reaching S3 at `endpoint`.
fn coordinator_via(endpoint: &str) -> Command {
    let mut cmd = Command::new(workspace_bin("coordinator"));
    cluster_env(&mut cmd, endpoint);
    cmd
}

/// A running child process, killed (SIGKILL) and reaped on drop. Its
/// stderr and stdout go to a log file, kept for failure messages.
#[derive(Debug)]
pub struct Process {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Process {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then wait up to `timeout` for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        run(Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .stderr(Stdio::null()));
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Whether the process is still running (false once it has exited or
    /// was killed).
    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            None => false,
            Some(child) => child.try_wait().ok().flatten().is_none(),
        }
    }

    /// Whether it has exited, with its status.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok().flatten();
        if status.is_some() {
            self.child = None;
        }
        status
    }

    /// The process's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn(name: &str, cmd: &mut Command, log_dir: &Path) -> Process {
    let log = log_dir.join(format!("{}.log", unique_name(name)));
    let file = std::fs::File::create(&log).expect("create a log file");
    let stdout = file.try_clone().expect("share the log file");
    let child = cmd
        .stdout(stdout)
        .stderr(file)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
    Process {
        name: name.to_owned(),
        child: Some(child),
        log,
    }
}

/// Timing of a test cluster: short leases so that lost workers are noticed
/// within seconds.
#[derive(Debug, Clone, Copy)]
pub struct ClusterTiming {
    pub lease_seconds: f64,
    pub heartbeat_seconds: f64,
}

impl Default for ClusterTiming {
    fn default() -> Self {
        Self {
            lease_seconds: 4.0,
            heartbeat_seconds: 1.0,
        }
    }
}

/// The PEM certificate and key a coordinator serves TLS with.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// TLS and bearer tokens of a cluster's coordinator; none by default.
#[derive(Debug, Clone, Default)]
pub struct ClusterSecurity {
    /// Serve TLS; clients and workers then reach the coordinator at
    /// `https://localhost:PORT`, trusting `cert` (which must name
    /// `localhost`).
    pub tls: Option<TlsFiles>,
    /// `coordinator serve --token`, sent by [`Cluster::client`].
    pub client_token: Option<String>,
    /// `coordinator serve --worker-token`, sent by [`Cluster::start_worker`].
    pub worker_token: Option<String>,
}

/// How a client command or worker presents itself to the coordinator.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    /// `--token`.
    pub token: Option<String>,
    /// `--tls-ca`.
    pub tls_ca: Option<PathBuf>,
}

impl Credentials {
    fn add_to(&self, cmd: &mut Command) {
        if let Some(token) = &self.token {
            cmd.args(["--token", token]);
        }
        if let Some(ca) = &self.tls_ca {
            cmd.arg("--tls-ca").arg(ca);
        }
    }
}

/// Everything [`Cluster::start_with`] can vary.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    pub timing: ClusterTiming,
    pub security: ClusterSecurity,
    /// `RUST_LOG` of the coordinator, the workers and the client commands
    /// (default: `CAPTURE_E2E_LOG` or `info` for the servers, `warn` for
    /// the clients).
    pub log_filter: Option<String>,
    /// The S3 endpoint the coordinator and workers use (default: the test
    /// endpoint; a [`crate::fault_proxy::FaultProxy`] in front of it to
    /// inject storage faults). Buckets are made and read directly.
    pub s3_endpoint: Option<String>,
}

/// A coordinator on a fresh database and bucket, plus workers.
#[derive(Debug)]
pub struct Cluster {
    pub database_url: String,
    pub bucket: String,
    pub store: String,
    pub listen: String,
    pub timing: ClusterTiming,
    pub security: ClusterSecurity,
    pub log_filter: Option<String>,
    /// What the coordinator and workers reach S3 at.
    pub s3_endpoint: String,
    pub coordinator: Option<Process>,
    pub workers: Vec<Process>,
    pub logs: tempfile::TempDir,
}

/// The first port of the kernel's ephemeral range (Linux's default where
/// it cannot be read).
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// A loopback port that is free now (bound, then released) and below the
/// kernel's ephemeral range (`/proc/sys/net/ipv4/ip_local_port_range`). A
/// port from binding port 0 is an ephemeral one, and until the process
/// under test binds it any socket that connects out (a database or S3
/// client of this test or another, many a second) may be given it, as a
/// worker's metrics port once was in CI ("Address already in use"); below
/// the range only an explicit bind takes a port. Each process starts at
/// its own offset and counts up, so concurrent callers do not pick the
/// same one.
pub fn free_port() -> u16 {
    const FIRST: u32 = 10_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let span = u32::from(ephemeral_low()).saturating_sub(FIRST);
    let offset = std::process::id().wrapping_mul(7919);
    for _ in 0..span.min(5000) {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = FIRST + offset.wrapping_add(n) % span;
        if let Ok(port) = u16::try_from(port)
            && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
        {
            return port;
        }
    }
    // No room below the ephemeral range: any free port.
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Cluster {
    /// Fresh database and bucket, coordinator started and answering.
    pub fn start(timing: ClusterTiming) -> Self {
        Self::start_with(ClusterOptions {
            timing,
            ..ClusterOptions::default()
        })
    }

    /// [`Cluster::start`] with TLS, tokens or another log filter.
    pub fn start_with(options: ClusterOptions) -> Self {
        let bucket = fresh_bucket();
        let mut cluster = Self {
            database_url: fresh_database("capture_e2e"),
            store: format!("s3://{bucket}/captures"),
            bucket,
            listen: format!("127.0.0.1:{}", free_port()),
            timing: options.timing,
            security: options.security,
            log_filter: options.log_filter,
            s3_endpoint: options.s3_endpoint.unwrap_or_else(s3_endpoint),
            coordinator: None,
            workers: Vec::new(),
            logs: tempfile::tempdir().expect("a log directory"),
        };
        cluster.start_coordinator();
        cluster
    }

    /// `http://127.0.0.1:PORT`, or `https://localhost:PORT` with TLS.
    pub fn url(&self) -> String {
        match &self.security.tls {
            None => format!("http://{}", self.listen),
            Some(_) => format!("https://localhost:{}", self.port()),
        }
    }

    /// The port the coordinator listens on.
    pub fn port(&self) -> u16 {
        self.listen
            .rsplit_once(':')
            .and_then(|(_, port)| port.parse().ok())
            .expect("--listen ends with :PORT")
    }

    /// What [`Cluster::client`] sends: the client token, trusting the
    /// coordinator's certificate.
    pub fn client_credentials(&self) -> Credentials {
        Credentials {
            token: self.security.client_token.clone(),
            tls_ca: self.security.tls.as_ref().map(|tls| tls.cert.clone()),
        }
    }

    /// What [`Cluster::start_worker`] sends: the worker token, trusting the
    /// coordinator's certificate.
    pub fn worker_credentials(&self) -> Credentials {
        Credentials {
            token: self.security.worker_token.clone(),
            tls_ca: self.security.tls.as_ref().map(|tls| tls.cert.clone()),
        }
    }

    /// Starts (or restarts) `coordinator serve` and waits until it answers.
    pub fn start_coordinator(&mut self) {
        let mut cmd = coordinator_via(&self.s3_endpoint);
        cmd.arg("serve")
            .args(["--database-url", &self.database_url])
            .args(["--store", &self.store])
            .args(["--listen", &self.listen])
            .args(["--lease-seconds", &self.timing.lease_seconds.to_string()])
            .args([
                "--heartbeat-seconds",
                &self.timing.heartbeat_seconds.to_string(),
            ])
            .args(["--sweep-seconds", "0.5"])
            .args(["--retry-delay-seconds", "0.5"]);
        if let Some(tls) = &self.security.tls {
            cmd.arg("--tls-cert")
                .arg(&tls.cert)
                .arg("--tls-key")
                .arg(&tls.key);
        }
        if let Some(token) = &self.security.client_token {
            cmd.args(["--token", token]);
        }
        if let Some(token) = &self.security.worker_token {
            cmd.args(["--worker-token", token]);
        }
        if let Some(filter) = &self.log_filter {
            cmd.env("RUST_LOG", filter);
        }
        let process = spawn("coordinator", &mut cmd, self.logs.path());
        self.coordinator = Some(process);
        self.wait_for_coordinator();
    }

    fn wait_for_coordinator(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = run(self.client("runs").arg("--json"));
            if out.status.success() {
                return;
            }
            if let Some(status) = self.coordinator.as_mut().and_then(Process::try_wait) {
                panic!(
                    "coordinator exited with {status}:\n{}",
                    self.coordinator_log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "coordinator did not answer within 60 s:\n{}",
                self.coordinator_log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn coordinator_log(&self) -> String {
        self.coordinator
            .as_ref()
            .map(Process::log_text)
            .unwrap_or_default()
    }

    /// `coordinator SUBCOMMAND --coordinator URL` with the client
    /// credentials.
    pub fn client(&self, subcommand: &str) -> Command {
        self.client_as(subcommand, &self.client_credentials())
    }

    /// `coordinator query WHAT --coordinator URL` with the client
    /// credentials.
    pub fn query(&self, what: &str) -> Command {
        let mut cmd = coordinator();
        cmd.args(["query", what, "--coordinator", &self.url()])
            .env("RUST_LOG", self.log_filter.as_deref().unwrap_or("warn"));
        self.client_credentials().add_to(&mut cmd);
        cmd
    }

    /// `coordinator SUBCOMMAND --coordinator URL` with `credentials`.
    pub fn client_as(&self, subcommand: &str, credentials: &Credentials) -> Command {
        let mut cmd = coordinator();
        cmd.arg(subcommand)
            .args(["--coordinator", &self.url()])
            .env("RUST_LOG", self.log_filter.as_deref().unwrap_or("warn"));
        credentials.add_to(&mut cmd);
        cmd
    }

    /// Starts a `worker run` process on the tiny model, with the worker
    /// credentials.
    pub fn start_worker(&mut self, extra: &[&str]) -> usize {
        self.start_worker_as(&self.worker_credentials(), extra)
    }

    /// Starts a `worker run` process on the tiny model, with `credentials`.
    pub fn start_worker_as(&mut self, credentials: &Credentials, extra: &[&str]) -> usize {
        self.start_worker_with(&tiny_model(), credentials, extra)
    }

    /// Starts a `worker run` process on the checkpoint `model`, with the
    /// worker credentials.
    pub fn start_worker_on(&mut self, model: &Path, extra: &[&str]) -> usize {
        self.start_worker_with(model, &self.worker_credentials(), extra)
    }

    fn start_worker_with(
        &mut self,
        model: &Path,
        credentials: &Credentials,
        extra: &[&str],
    ) -> usize {
        let mut cmd = Command::new(workspace_bin("worker"));
        cluster_env(&mut cmd, &self.s3_endpoint);
        cmd.arg("run")
            .args(["--coordinator", &self.url()])
            .args(["--store", &self.store])
            .arg("--model")
            .arg(model);
        credentials.add_to(&mut cmd);
        if let Some(filter) = &self.log_filter {
            cmd.env("RUST_LOG", filter);
        }
        cmd.args(extra);
        let name = format!("worker{}", self.workers.len());
        self.workers.push(spawn(&name, &mut cmd, self.logs.path()));
        self.workers.len() - 1
    }

    /// Submits a run and returns its id.
    pub fn submit(&self, args: &[&str]) -> String {
        self.submit_on(&tiny_model(), args)
    }

    /// Submits a run on the checkpoint `model` and returns its id.
    pub fn submit_on(&self, model: &Path, args: &[&str]) -> String {
        let out = run_ok(self.client("submit").arg("--model").arg(model).args(args));
        let stdout = String::from_utf8_lossy(&out.stdout);
        stdout
            .split_whitespace()
            .find(|w| w.len() == 36 && w.chars().filter(|c| *c == '-').count() == 4)
            .unwrap_or_else(|| panic!("no run id in submit's output: {stdout}"))
            .to_owned()
    }

    /// `coordinator status RUN --json --jobs`, parsed.
    pub fn status(&self, run_id: &str) -> Option<serde_json::Value> {
        let out = run(self.client("status").args([run_id, "--json", "--jobs"]));
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Polls the run until its state is terminal; returns the last status.
    pub fn wait_for_run(&mut self, run_id: &str, timeout: Duration) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.status(run_id) {
                let state = status["state"].as_str().unwrap_or_default().to_owned();
                if matches!(state.as_str(), "succeeded" | "failed" | "cancelled") {
                    return status;
                }
            }
            assert!(
                Instant::now() < deadline,
                "run {run_id} did not finish within {timeout:?}; last status {:?}\n--- coordinator\n{}\n--- workers\n{}",
                self.status(run_id),
                self.coordinator_log(),
                self.workers
                    .iter()
                    .map(|w| format!("[{}]\n{}", w.name, w.log_text()))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// The run's objects in the bucket: key below the run root -> bytes.
    pub fn run_objects(&self, experiment: &str, run_id: &str) -> Vec<(String, Vec<u8>)> {
        let script = r#"
import os, sys, boto3
s3 = boto3.client('s3', endpoint_url=sys.argv[1], region_name='us-east-1')
prefix, out = sys.argv[3], sys.argv[4]
for page in s3.get_paginator('list_objects_v2').paginate(Bucket=sys.argv[2], Prefix=prefix):
    for obj in page.get('Contents', []):
        path = os.path.join(out, obj['Key'][len(prefix):])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'wb') as f:
            f.write(s3.get_object(Bucket=sys.argv[2], Key=obj['Key'])['Body'].read())
"#;
        let prefix = format!("captures/{experiment}/{run_id}/");
        let dir = tempfile::tempdir().expect("a download directory");
        run_ok(Command::new("python3").args([
            "-c",
            script,
            &s3_endpoint(),
            &self.bucket,
            &prefix,
            &dir.path().display().to_string(),
        ]));
        crate::sandbox::files_below(dir.path())
            .into_iter()
            .map(|key| {
                let body = std::fs::read(dir.path().join(&key)).expect("a downloaded object");
                (key, body)
            })
            .collect()
    }

    /// Writes the run's objects below `dir` (for compare_captures.py).
    pub fn download_run(&self, experiment: &str, run_id: &str, dir: &Path) -> Vec<String> {
        let mut keys = Vec::new();
        for (key, body) in self.run_objects(experiment, run_id) {
            let path = dir.join(&key);
            std::fs::create_dir_all(path.parent().expect("a parent")).unwrap();
            std::fs::write(&path, body).unwrap();
            keys.push(key);
        }
        keys.sort();
        keys
    }
}

/// Waits for a line containing `needle` in a growing log file.
pub fn wait_for_log(process: &Process, needle: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if process.log_text().contains(needle) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[cfg(test)]
mod tests {
    use super::{ephemeral_low, free_port};

    #[test]
    fn free_ports_are_distinct_and_below_the_ephemeral_range() {
        let low = ephemeral_low();
        let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
        let mut distinct = ports.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), ports.len(), "{ports:?}");
        for port in ports {
            if low > 11_000 {
                assert!(
                    (10_000..low).contains(&port),
                    "{port} (ephemeral from {low})"
                );
            }
            std::net::TcpListener::bind(("127.0.0.1", port)).expect("still free");
        }
    }
}
