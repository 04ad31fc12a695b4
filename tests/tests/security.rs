//! Access control and TLS end to end: `coordinator serve` with a
//! self-signed certificate, a client token and a separate worker token. A
//! worker over TLS completes a real run; callers with no token, a wrong one
//! or the other side's token are refused with a message about the token and
//! change nothing; plaintext and untrusted TLS connections fail naming the
//! problem; and no token ever shows in any process's output at
//! `RUST_LOG=debug`.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use capture_tests::cluster::{
    Cluster, ClusterOptions, ClusterSecurity, ClusterTiming, Credentials, Process, TlsFiles,
    coordinator, sql, unique_name,
};
use capture_tests::sandbox::{run, tiny_model};

const RUN_TIMEOUT: Duration = Duration::from_secs(300);
const WORKER_EXIT_TIMEOUT: Duration = Duration::from_secs(90);

/// A self-signed certificate for `localhost` and `127.0.0.1`, and its key,
/// written below `dir`. Made in-process with rcgen (on the aws-lc-rs that
/// rustls already links) rather than with the `openssl` CLI: nothing to
/// install on a fresh machine, and the certificate is a plain end-entity
/// one, which webpki accepts as its own trust anchor (`openssl req -x509`
/// marks it `CA:TRUE`, which webpki refuses as a server certificate).
fn self_signed_localhost(dir: &Path) -> TlsFiles {
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .expect("a self-signed certificate");
    let files = TlsFiles {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    std::fs::write(&files.cert, cert.pem()).expect("write cert.pem");
    std::fs::write(&files.key, signing_key.serialize_pem()).expect("write key.pem");
    files
}

/// A cluster serving TLS with distinct client and worker tokens, every
/// process at `RUST_LOG=debug`, and a transcript of the client commands'
/// output for the secrets check.
struct SecureCluster {
    cluster: Cluster,
    client_token: String,
    worker_token: String,
    /// Output of every client command run through [`SecureCluster::client_run`].
    transcript: Vec<(String, Output)>,
    _certificates: tempfile::TempDir,
}

impl SecureCluster {
    fn start() -> Self {
        let certificates = tempfile::tempdir().expect("a certificate directory");
        let tls = self_signed_localhost(certificates.path());
        let client_token = unique_name("client-secret");
        let worker_token = unique_name("worker-secret");
        let cluster = Cluster::start_with(ClusterOptions {
            timing: ClusterTiming::default(),
            security: ClusterSecurity {
                tls: Some(tls),
                client_token: Some(client_token.clone()),
                worker_token: Some(worker_token.clone()),
            },
            log_filter: Some("debug".to_owned()),
            s3_endpoint: None,
        });
        Self {
            cluster,
            client_token,
            worker_token,
            transcript: Vec::new(),
            _certificates: certificates,
        }
    }

    fn tls_ca(&self) -> std::path::PathBuf {
        self.cluster
            .security
            .tls
            .as_ref()
            .map(|tls| tls.cert.clone())
            .expect("the cluster serves TLS")
    }

    /// Trusting the certificate, sending `token`.
    fn credentials(&self, token: Option<&str>) -> Credentials {
        Credentials {
            token: token.map(str::to_owned),
            tls_ca: Some(self.tls_ca()),
        }
    }

    /// Runs a client command and keeps its output for the secrets check.
    fn client_run(&mut self, what: &str, cmd: &mut Command) -> Output {
        let out = run(cmd.env("RUST_LOG", "debug"));
        self.transcript.push((what.to_owned(), out.clone()));
        out
    }

    /// `coordinator submit` of a small run on the tiny model; the command.
    fn submit_command(&self, credentials: &Credentials, experiment: &str) -> Command {
        let mut cmd = self.cluster.client_as("submit", credentials);
        cmd.arg("--model")
            .arg(tiny_model())
            .args(["--prompt-set", "baseline", "--mode", "residual"])
            .args([
                "--max-new-tokens",
                "4",
                "--experiment",
                experiment,
                "--json",
            ]);
        cmd
    }

    /// Submits with the client credentials; returns the run id.
    fn submit(&mut self, experiment: &str) -> String {
        let mut cmd = self.submit_command(&self.cluster.client_credentials(), experiment);
        let out = self.client_run("submit", &mut cmd);
        assert!(
            out.status.success(),
            "submit with the client token failed: {}\n--- coordinator\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.cluster.coordinator_log()
        );
        let answer: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("submit --json prints JSON");
        answer["run_id"]
            .as_str()
            .unwrap_or_else(|| panic!("no run_id in {answer}"))
            .to_owned()
    }

    /// `coordinator status RUN --json` with the client credentials.
    fn status(&mut self, run_id: &str) -> serde_json::Value {
        let mut cmd = self.cluster.client("status");
        cmd.args([run_id, "--json"]);
        let out = self.client_run("status", &mut cmd);
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status --json prints JSON")
    }

    /// Asserts that no token (nor `extra` secrets) appears in the output of
    /// the coordinator, any worker or any client command, and that the
    /// servers did log at debug level (so the check saw something).
    fn assert_no_secret_logged(&self, extra: &[&str]) {
        let mut outputs: Vec<(String, String)> = Vec::new();
        if let Some(coordinator) = &self.cluster.coordinator {
            outputs.push(("coordinator".to_owned(), coordinator.log_text()));
        }
        for worker in &self.cluster.workers {
            outputs.push((worker.name.clone(), worker.log_text()));
        }
        for (what, out) in &self.transcript {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            outputs.push((what.clone(), text));
        }
        let coordinator_log = self.cluster.coordinator_log();
        assert!(
            coordinator_log.contains("DEBUG"),
            "the coordinator did not log at debug level:\n{coordinator_log}"
        );
        let secrets = [self.client_token.as_str(), self.worker_token.as_str()];
        for secret in secrets.iter().chain(extra) {
            for (name, text) in &outputs {
                assert!(
                    !text.contains(secret),
                    "a token shows in the output of {name}:\n{text}"
                );
            }
        }
    }
}

/// Asserts the command failed and its stderr contains every one of
/// `needles` (case-insensitive); returns the stderr.
fn assert_refused(what: &str, out: &Output, needles: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "{what} succeeded but should be refused: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let lower = stderr.to_lowercase();
    for needle in needles {
        assert!(
            lower.contains(&needle.to_lowercase()),
            "{what}: the message should mention {needle:?}: {stderr}"
        );
    }
    eprintln!("{what}: {}", last_error_line(&stderr));
    stderr
}

/// The `error: ...` line of a failed command (its last line otherwise).
fn last_error_line(text: &str) -> &str {
    text.lines()
        .rev()
        .find(|line| line.starts_with("error"))
        .or_else(|| text.lines().last())
        .unwrap_or_default()
}

/// Waits for `process` to exit; its status, or `None` after `timeout`.
fn wait_for_exit(process: &mut Process, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(status) = process.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

#[test]
fn a_worker_with_its_own_token_completes_a_run_over_tls_and_no_token_is_logged() {
    let started = Instant::now();
    let mut secure = SecureCluster::start();
    let run_id = secure.submit("tls");

    // The certificate names 127.0.0.1 as well as localhost.
    let mut by_ip = coordinator();
    by_ip
        .args(["runs", "--json"])
        .args([
            "--coordinator",
            &format!("https://127.0.0.1:{}", secure.cluster.port()),
        ])
        .args(["--token", &secure.client_token])
        .arg("--tls-ca")
        .arg(secure.tls_ca());
    let out = secure.client_run("runs by IP", &mut by_ip);
    assert!(
        out.status.success(),
        "https://127.0.0.1 with --tls-ca failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let worker = secure.cluster.start_worker(&["--exit-when-idle"]);
    let status = secure.cluster.wait_for_run(&run_id, RUN_TIMEOUT);
    assert_eq!(status["state"], "succeeded", "{status}");
    let status = secure.status(&run_id);
    assert_eq!(status["state"], "succeeded", "{status}");
    let artifacts = status["artifacts_written"].as_u64().unwrap_or_default();
    assert!(artifacts > 0, "no artifacts in {status}");

    let objects = secure.cluster.run_objects("tls", &run_id);
    let keys: Vec<&str> = objects.iter().map(|(key, _)| key.as_str()).collect();
    assert!(keys.contains(&"manifest.json"), "{keys:?}");
    let residuals = keys
        .iter()
        .filter(|key| key.starts_with("inference/raw/residual/baseline/"))
        .count();
    assert_eq!(residuals as u64, artifacts, "{keys:?}");

    let exit = wait_for_exit(&mut secure.cluster.workers[worker], WORKER_EXIT_TIMEOUT);
    assert!(
        exit.is_some_and(|status| status.success()),
        "the worker did not stop cleanly once idle ({exit:?}):\n{}",
        secure.cluster.workers[worker].log_text()
    );
    secure.assert_no_secret_logged(&[]);
    eprintln!(
        "tls run: {artifacts} artifacts in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn callers_without_the_right_token_are_refused_clearly_and_change_nothing() {
    let mut secure = SecureCluster::start();
    // A run no worker has touched: a wrongly admitted caller would cancel
    // or claim it.
    let run_id = secure.submit("tokens");
    let wrong_token = unique_name("wrong-secret");

    let worker_token = secure.worker_token.clone();
    let callers = [
        ("no token", None, "needs a bearer token"),
        ("a wrong token", Some(wrong_token.as_str()), "not valid"),
        ("the worker token", Some(worker_token.as_str()), "not valid"),
    ];
    for (label, token, reason) in callers {
        let credentials = secure.credentials(token);
        let mut submit = secure.submit_command(&credentials, "tokens");
        let out = secure.client_run(&format!("submit with {label}"), &mut submit);
        assert_refused(&format!("submit with {label}"), &out, &["token", reason]);

        let mut cancel = secure.cluster.client_as("cancel", &credentials);
        cancel.arg(&run_id);
        let out = secure.client_run(&format!("cancel with {label}"), &mut cancel);
        assert_refused(&format!("cancel with {label}"), &out, &["token", reason]);

        let mut runs = secure.cluster.client_as("runs", &credentials);
        runs.arg("--json");
        let out = secure.client_run(&format!("runs with {label}"), &mut runs);
        assert_refused(&format!("runs with {label}"), &out, &["token", reason]);
    }

    // Workers sending the client token, or none, are refused at
    // registration and exit non-zero instead of retrying.
    let workers = [
        (
            "the client token",
            Some(secure.client_token.clone()),
            "not valid",
        ),
        ("no token", None, "needs a bearer token"),
    ];
    for (label, token, reason) in workers {
        let credentials = secure.credentials(token.as_deref());
        let index = secure
            .cluster
            .start_worker_as(&credentials, &["--exit-when-idle"]);
        let worker = &mut secure.cluster.workers[index];
        let exit = wait_for_exit(worker, WORKER_EXIT_TIMEOUT);
        let log = worker.log_text();
        let exit = exit.unwrap_or_else(|| {
            panic!("a worker with {label} still runs after {WORKER_EXIT_TIMEOUT:?}:\n{log}")
        });
        assert!(!exit.success(), "a worker with {label} exited 0:\n{log}");
        let error = last_error_line(&log);
        for needle in ["refused this worker", "token", reason] {
            assert!(
                error.contains(needle),
                "a worker with {label}: the error should mention {needle:?}: {error}\n{log}"
            );
        }
        eprintln!("worker with {label}: {error}");
    }

    let status = secure.status(&run_id);
    assert_eq!(status["state"], "pending", "{status}");
    let database = &secure.cluster.database_url;
    assert_eq!(sql(database, "SELECT count(*) FROM runs"), "1");
    assert_eq!(
        sql(database, "SELECT string_agg(DISTINCT state, ',') FROM jobs"),
        "queued"
    );
    assert_eq!(sql(database, "SELECT count(*) FROM attempts"), "0");
    assert_eq!(sql(database, "SELECT count(*) FROM workers"), "0");
    secure.assert_no_secret_logged(&[&wrong_token]);
}

#[test]
fn plaintext_and_untrusted_tls_connections_fail_naming_the_problem() {
    let mut secure = SecureCluster::start();
    let port = secure.cluster.port();

    // Plain HTTP/2 against the TLS listener: refused, and the message says
    // the coordinator may be serving TLS (whether the transport reports
    // `h2 protocol error` or a cancelled operation, as the race goes, the
    // call fails).
    let mut plaintext = coordinator();
    plaintext
        .args(["runs", "--json"])
        .args(["--coordinator", &format!("http://localhost:{port}")])
        .args(["--token", &secure.client_token]);
    let out = secure.client_run("runs over http://", &mut plaintext);
    let stderr = assert_refused("runs over http:// against TLS", &out, &["listing runs"]);
    let line = last_error_line(&stderr);
    assert!(line.starts_with("error: listing runs"), "{stderr}");
    if line.contains("h2 protocol error") {
        assert!(line.contains("use an https:// URL"), "{stderr}");
    }

    // TLS without --tls-ca: the self-signed certificate is not trusted.
    let untrusted = Credentials {
        token: Some(secure.client_token.clone()),
        tls_ca: None,
    };
    let mut runs = secure.cluster.client_as("runs", &untrusted);
    runs.arg("--json");
    let out = secure.client_run("runs without --tls-ca", &mut runs);
    assert_refused("runs without --tls-ca", &out, &["certificate"]);
    let mut submit = secure.submit_command(&untrusted, "untrusted");
    let out = secure.client_run("submit without --tls-ca", &mut submit);
    assert_refused("submit without --tls-ca", &out, &["certificate"]);

    // A worker without --tls-ca exits non-zero naming the certificate
    // problem and what to pass: an untrusted certificate never heals, so
    // it does not retry.
    let untrusted_worker = Credentials {
        token: Some(secure.worker_token.clone()),
        tls_ca: None,
    };
    let index = secure
        .cluster
        .start_worker_as(&untrusted_worker, &["--exit-when-idle"]);
    let worker = &mut secure.cluster.workers[index];
    let exit = wait_for_exit(worker, WORKER_EXIT_TIMEOUT);
    let log = worker.log_text();
    let exit = exit.unwrap_or_else(|| {
        panic!("a worker without --tls-ca still runs after {WORKER_EXIT_TIMEOUT:?}:\n{log}")
    });
    assert!(!exit.success(), "{log}");
    assert!(
        log.contains("invalid peer certificate") && log.contains("--tls-ca"),
        "a worker without --tls-ca should say the certificate is not trusted:\n{log}"
    );

    // Nothing was submitted or registered by any of them.
    assert_eq!(
        sql(&secure.cluster.database_url, "SELECT count(*) FROM workers"),
        "0"
    );
    assert_eq!(
        sql(&secure.cluster.database_url, "SELECT count(*) FROM runs"),
        "0"
    );
    secure.assert_no_secret_logged(&[]);
}
