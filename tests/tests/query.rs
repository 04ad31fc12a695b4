//! The query service end to end: `coordinator query` against `coordinator
//! serve` on a fresh Postgres database and moto S3 bucket (bearer tokens on),
//! with real `worker run` processes on the tiny model and on a perturbed copy
//! of it, and against the embedded state of `coordinator submit`. Every
//! number is checked against torch and numpy on the downloaded artifacts by
//! scripts/query_reference.py; failures must be one clear line.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use capture_tests::cluster::{Cluster, ClusterOptions, ClusterSecurity, s3_endpoint};
use capture_tests::sandbox::{python_script, run, run_ok, tiny_model, workspace_bin};
use serde_json::Value;
use sha2::{Digest, Sha256};

const RUN_TIMEOUT: Duration = Duration::from_secs(300);
/// The tiny model's hidden size and layers.
const HIDDEN: &str = "64";
const LAYERS: [u64; 4] = [0, 1, 2, 3];
/// The trait of the vector tree the reference script writes.
const TREE_TRAIT: &str = "behavior/refusal";
/// The dynamic prompt set's ids.
const DYNAMIC_IDS: [&str; 8] = ["1", "2", "3", "4", "5", "6", "7", "8"];

/// A cluster whose clients and workers must send bearer tokens.
fn secured_cluster() -> Cluster {
    Cluster::start_with(ClusterOptions {
        security: ClusterSecurity {
            client_token: Some("query-client-secret".into()),
            worker_token: Some("query-worker-secret".into()),
            tls: None,
        },
        ..ClusterOptions::default()
    })
}

/// `python scripts/query_reference.py args...`, which must succeed; returns
/// the JSON it prints.
fn reference_ok<S: AsRef<OsStr>>(args: impl IntoIterator<Item = S>) -> Value {
    let out = run_ok(python_script("query_reference.py").args(args));
    serde_json::from_slice(&out.stdout).expect("query_reference.py prints JSON")
}

/// Checks of scripts/query_reference.py, run together in one process
/// (`batch`: torch loads once).
#[derive(Default)]
struct Checks {
    /// What each check is, its arguments, and whether it must match.
    list: Vec<(String, Vec<String>, bool)>,
}

impl Checks {
    /// A check the answer must pass.
    fn expect_match(&mut self, what: &str, argv: Vec<String>) {
        self.list.push((what.to_owned(), argv, true));
    }

    /// A check that must find differences (the checks can fail).
    fn expect_mismatch(&mut self, what: &str, argv: Vec<String>) {
        self.list.push((what.to_owned(), argv, false));
    }

    /// Runs every check; returns the summaries by what they check.
    fn run(self) -> BTreeMap<String, Value> {
        let file = tempfile::NamedTempFile::new().unwrap();
        let argvs: Vec<&Vec<String>> = self.list.iter().map(|(_, argv, _)| argv).collect();
        std::fs::write(file.path(), serde_json::to_vec(&argvs).unwrap()).unwrap();
        let summaries = reference_ok([OsStr::new("batch"), file.path().as_os_str()]);
        let summaries = summaries.as_array().expect("a list of summaries");
        assert_eq!(summaries.len(), self.list.len());
        let mut by_what = BTreeMap::new();
        for ((what, argv, must_match), summary) in self.list.into_iter().zip(summaries) {
            let mismatches = summary["mismatches"].as_u64().unwrap();
            if must_match {
                assert_eq!(
                    mismatches, 0,
                    "{what}: the answer differs from torch/numpy: {summary:#}\n{argv:?}"
                );
            } else {
                assert!(
                    mismatches > 0,
                    "{what}: the check should have found differences: {summary}"
                );
            }
            by_what.insert(what, summary.clone());
        }
        by_what
    }
}

/// Trait vectors written with `torch.save` by the reference script: a tree
/// (probe and mean_diff at layers 1 and 2) and lone f32, f16 and bf16 files.
struct Vectors {
    dir: tempfile::TempDir,
}

impl Vectors {
    fn write() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().display().to_string();
        reference_ok(["vectors", &path, "--width", HIDDEN, "--layers", "1,2"]);
        Self { dir }
    }

    /// The repository-root form of the tree (holding `experiments/`).
    fn root(&self) -> String {
        self.dir.path().display().to_string()
    }

    /// The `experiments/e1` form of the tree.
    fn experiment(&self) -> String {
        self.dir.path().join("experiments/e1").display().to_string()
    }

    fn tree_file(&self, method: &str, layer: u32) -> PathBuf {
        self.dir.path().join(format!(
            "experiments/e1/extraction/{TREE_TRAIT}/vectors/{method}_layer{layer}.pt"
        ))
    }

    fn lone(&self, name: &str) -> String {
        self.dir
            .path()
            .join(format!("lone/{name}.pt"))
            .display()
            .to_string()
    }

    /// `--vector behavior/refusal@L=FILE` of the reference for `layers`.
    fn tree_specs(&self, method: &str, layers: &[u32]) -> Vec<String> {
        layers
            .iter()
            .flat_map(|&layer| {
                [
                    "--vector".to_owned(),
                    format!(
                        "{TREE_TRAIT}@{layer}={}",
                        self.tree_file(method, layer).display()
                    ),
                ]
            })
            .collect()
    }

    /// `--vector NAME=FILE` of the reference for a lone file (every layer).
    fn lone_spec(&self, name: &str) -> Vec<String> {
        vec!["--vector".to_owned(), format!("{name}={}", self.lone(name))]
    }
}

/// Runs a query that must succeed, saves its stdout to `save_as` and returns
/// the parsed JSON and the stderr.
fn json_answer(cmd: &mut Command, save_as: &Path) -> (Value, String) {
    let out = run_ok(cmd);
    std::fs::write(save_as, &out.stdout).unwrap();
    let value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{cmd:?} did not print JSON ({e})"));
    (value, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// `human_bytes` of coordinator/src/client/query/output.rs.
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// The stderr line `read X of Y (Z%) in N requests from M artifacts`,
/// checked against the JSON `read` object; returns (bytes read, file bytes).
fn check_read_report(stderr: &str, read: &Value) -> (u64, u64) {
    let line = stderr
        .lines()
        .find(|l| l.starts_with("read "))
        .unwrap_or_else(|| panic!("no read report on stderr: {stderr}"));
    let bytes_read = read["bytes_read"].as_u64().unwrap();
    let file_bytes = read["file_bytes"].as_u64().unwrap();
    let requests = read["requests"].as_u64().unwrap();
    let artifacts = read["artifacts"].as_u64().unwrap();
    let expected = format!(
        "read {} of {} ({:.1}%) in {requests} requests from {artifacts} artifacts",
        human_bytes(bytes_read),
        human_bytes(file_bytes),
        100.0 * bytes_read as f64 / file_bytes as f64
    );
    assert_eq!(line, expected, "the report disagrees with the JSON {read}");
    assert!(0 < bytes_read && bytes_read <= file_bytes, "{read}");
    assert!(requests >= artifacts && artifacts > 0, "{read}");
    (bytes_read, file_bytes)
}

/// Sum of the sizes of the downloaded residual artifacts.
fn residual_bytes(root: &Path) -> u64 {
    capture_tests::sandbox::files_below(&root.join("inference/raw/residual"))
        .iter()
        .map(|f| {
            std::fs::metadata(root.join("inference/raw/residual").join(f))
                .unwrap()
                .len()
        })
        .sum()
}

/// A failure as the CLI must report it: exit 1, nothing on stdout, one
/// `error: ...` line on stderr naming every needle, no panic.
fn assert_clean_failure(out: &Output, what: &str, needles: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{what}: expected exit 1, got {}: {stderr}",
        out.status
    );
    assert!(
        out.stdout.is_empty(),
        "{what}: nothing should reach stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{what}: one line expected: {stderr}");
    assert!(lines[0].starts_with("error: "), "{what}: {stderr}");
    for bad in ["panicked", "backtrace", "RUST_BACKTRACE"] {
        assert!(!stderr.contains(bad), "{what}: {stderr}");
    }
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "{what}: the message should name {needle:?}: {stderr}"
        );
    }
    println!("{what}: {}", lines[0]);
    stderr
}

/// The records of a CSV text (quoted fields may hold commas, quotes and
/// newlines, as tokens do).
fn csv_records(text: &str) -> Vec<Vec<String>> {
    let mut records = Vec::new();
    let mut record = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') => quoted = true,
            (false, ',') => record.push(std::mem::take(&mut field)),
            (false, '\n') => {
                record.push(std::mem::take(&mut field));
                records.push(std::mem::take(&mut record));
            }
            (false, c) => field.push(c),
        }
    }
    if !field.is_empty() || !record.is_empty() {
        record.push(field);
        records.push(record);
    }
    records
}

/// A CSV's rows as maps from its header's names.
fn csv_rows(text: &str) -> Vec<std::collections::BTreeMap<String, String>> {
    let mut records = csv_records(text).into_iter();
    let header = records.next().expect("a header row");
    records
        .map(|record| {
            assert_eq!(record.len(), header.len(), "{record:?}");
            header.iter().cloned().zip(record).collect()
        })
        .collect()
}

fn today_utc() -> String {
    let out = run_ok(Command::new("date").args(["-u", "+%Y-%m-%d"]));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn run_ids(answer: &Value) -> Vec<String> {
    answer["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .map(|r| r["run_id"].as_str().unwrap().to_owned())
        .collect()
}

/// Overwrites one object of the cluster's bucket.
fn put_object(cluster: &Cluster, key: &str, body: &[u8]) {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), body).unwrap();
    run_ok(Command::new("python3").args([
        "-c",
        "import sys, boto3; boto3.client('s3', endpoint_url=sys.argv[1], region_name='us-east-1').upload_file(sys.argv[4], sys.argv[2], sys.argv[3])",
        &s3_endpoint(),
        &cluster.bucket,
        key,
        &file.path().display().to_string(),
    ]));
}

fn submit_and_wait(cluster: &mut Cluster, model: Option<&Path>, args: &[&str]) -> String {
    let run_id = match model {
        Some(model) => cluster.submit_on(model, args),
        None => cluster.submit(args),
    };
    let status = cluster.wait_for_run(&run_id, RUN_TIMEOUT);
    assert_eq!(status["state"], "succeeded", "{status}");
    run_id
}

#[test]
fn projections_dynamics_and_tensors_equal_torch_and_read_few_bytes() {
    let mut cluster = secured_cluster();
    cluster.start_worker(&[]);
    let run_id = submit_and_wait(
        &mut cluster,
        None,
        &[
            "--prompt-set",
            "dynamic",
            "--mode",
            "both",
            "--layers",
            "1,2",
            "--max-new-tokens",
            "8",
            "--experiment",
            "qa",
        ],
    );
    let root_dir = tempfile::tempdir().unwrap();
    let root = root_dir.path();
    cluster.download_run("qa", &run_id, root);
    let root_arg = root.display().to_string();
    let vectors = Vectors::write();
    let scratch = tempfile::tempdir().unwrap();
    let file = |name: &str| scratch.path().join(name);
    let file_arg = |name: &str| file(name).display().to_string();
    let mut checks = Checks::default();

    // The tree at its layers (1 and 2; probe preferred over mean_diff) and
    // lone f32, f16 and bf16 files at every captured layer.
    let (answer, stderr) = json_answer(
        cluster.query("project").args([
            &run_id,
            "--vector",
            &vectors.root(),
            "--vector",
            &vectors.lone("refusal_f32"),
            "--vector",
            &vectors.lone("refusal_f16"),
            "--vector",
            &vectors.lone("refusal_bf16"),
        ]),
        &file("project.json"),
    );
    assert_eq!(answer["run_id"], run_id.as_str());
    let prompts = answer["prompts"].as_array().unwrap();
    assert_eq!(prompts.len(), DYNAMIC_IDS.len());
    let traits: Vec<(&str, Vec<u64>)> = prompts[0]["traits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let layers = t["layers"].as_array().unwrap();
            (
                t["trait"].as_str().unwrap(),
                layers.iter().map(|l| l.as_u64().unwrap()).collect(),
            )
        })
        .collect();
    assert_eq!(
        traits,
        vec![
            (TREE_TRAIT, vec![1, 2]),
            ("refusal_bf16", LAYERS.to_vec()),
            ("refusal_f16", LAYERS.to_vec()),
            ("refusal_f32", LAYERS.to_vec()),
        ]
    );
    let all_lone = [
        vectors.lone_spec("refusal_f32"),
        vectors.lone_spec("refusal_f16"),
        vectors.lone_spec("refusal_bf16"),
    ]
    .concat();
    let project_check = |answer: &str, method: &str, extra: &[String]| {
        [
            vec![
                "project".to_owned(),
                "--root".to_owned(),
                root_arg.clone(),
                "--answer".to_owned(),
                file_arg(answer),
            ],
            vectors.tree_specs(method, &[1, 2]),
            extra.to_vec(),
        ]
        .concat()
    };
    checks.expect_match("project", project_check("project.json", "probe", &all_lone));
    // The same answer is not what mean_diff vectors give.
    checks.expect_mismatch(
        "project with mean_diff vectors",
        project_check("project.json", "mean_diff", &all_lone),
    );
    check_read_report(&stderr, &answer["read"]);

    // --method mean_diff, the tree given as experiments/e1.
    json_answer(
        cluster.query("project").args([
            &run_id,
            "--vector",
            &vectors.experiment(),
            "--method",
            "mean_diff",
        ]),
        &file("mean_diff.json"),
    );
    checks.expect_match(
        "project --method mean_diff",
        project_check("mean_diff.json", "mean_diff", &[]),
    );
    checks.expect_mismatch(
        "project --method mean_diff with probe vectors",
        project_check("mean_diff.json", "probe", &[]),
    );

    // Asked layers and selected prompts.
    json_answer(
        cluster.query("project").args([
            &run_id,
            "--vector",
            &vectors.lone("refusal_bf16"),
            "--layers",
            "0,3",
            "--prompt-id",
            "2",
            "--prompt-id",
            "5",
        ]),
        &file("layers.json"),
    );
    checks.expect_match(
        "project --layers 0,3 --prompt-id 2 --prompt-id 5",
        [
            vec![
                "project".to_owned(),
                "--root".to_owned(),
                root_arg.clone(),
                "--answer".to_owned(),
                file_arg("layers.json"),
                "--layers".to_owned(),
                "0,3".to_owned(),
                "--prompt-id".to_owned(),
                "2".to_owned(),
                "--prompt-id".to_owned(),
                "5".to_owned(),
            ],
            vectors.lone_spec("refusal_bf16"),
        ]
        .concat(),
    );
    // Ranged reads: one layer of one trait reads a small share of the
    // artifacts, and less than all four layers.
    let (one_layer, stderr) = json_answer(
        cluster.query("project").args([
            &run_id,
            "--vector",
            &vectors.lone("refusal_f32"),
            "--layers",
            "1",
        ]),
        &file("one_layer.json"),
    );
    let (one_read, one_total) = check_read_report(&stderr, &one_layer["read"]);
    assert_eq!(
        one_total,
        residual_bytes(root),
        "file_bytes is the objects' size"
    );
    assert_eq!(one_layer["read"]["artifacts"], DYNAMIC_IDS.len());
    assert!(
        one_read * 5 < one_total,
        "one layer read {one_read} of {one_total} bytes"
    );
    let per_prompt: u64 = one_layer["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["bytes_read"].as_u64().unwrap())
        .sum();
    assert_eq!(per_prompt, one_read);
    let (every_layer, stderr) = json_answer(
        cluster
            .query("project")
            .args([&run_id, "--vector", &vectors.lone("refusal_f32")]),
        &file("every_layer.json"),
    );
    let (all_read, all_total) = check_read_report(&stderr, &every_layer["read"]);
    assert_eq!(all_total, one_total);
    assert!(one_read < all_read, "{one_read} vs {all_read}");

    // The CSV form (written with --output): one row per token, the JSON's
    // tokens and float32 scores.
    run_ok(cluster.query("project").args([
        &run_id,
        "--vector",
        &vectors.lone("refusal_f32"),
        "--layers",
        "2",
        "--format",
        "csv",
        "--output",
        &file_arg("scores.csv"),
    ]));
    let rows = csv_rows(&std::fs::read_to_string(file("scores.csv")).unwrap());
    let mut expected_rows = Vec::new();
    for prompt in every_layer["prompts"].as_array().unwrap() {
        let scores = &prompt["traits"][0];
        assert_eq!(scores["layers"][2], 2);
        for phase in ["prompt", "response"] {
            let tokens = prompt[format!("{phase}_tokens")].as_array().unwrap();
            for (index, token) in tokens.iter().enumerate() {
                let triple = &scores[phase][index][2];
                expected_rows.push(vec![
                    prompt["prompt_set"].as_str().unwrap().to_owned(),
                    prompt["prompt_id"].as_str().unwrap().to_owned(),
                    "refusal_f32".to_owned(),
                    phase.to_owned(),
                    index.to_string(),
                    token.as_str().unwrap().to_owned(),
                    "2".to_owned(),
                    triple[0].to_string(),
                    triple[1].to_string(),
                    triple[2].to_string(),
                ]);
            }
        }
    }
    let columns = [
        "prompt_set",
        "prompt_id",
        "trait",
        "phase",
        "token_index",
        "token",
        "layer",
        "residual_in",
        "after_attn",
        "residual_out",
    ];
    let got_rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| columns.iter().map(|c| row[*c].clone()).collect())
        .collect();
    assert_eq!(got_rows.len(), expected_rows.len(), "one CSV row per token");
    for (got, want) in got_rows.iter().zip(&expected_rows) {
        assert_eq!(got[..7], want[..7]);
        for (g, w) in got[7..].iter().zip(&want[7..]) {
            let (g, w): (f32, f32) = (g.parse().unwrap(), w.parse().unwrap());
            assert_eq!(g, w, "{got:?} vs {want:?}");
        }
    }

    // Dynamics: the default layer is the trait's only vector layer (a
    // single tree file), else the middle layer (4 * 16 / 26 = 2).
    let dynamics = |checks: &mut Checks, name: &str, flags: &[&str], expect: &[String]| {
        let (answer, _) = json_answer(
            cluster
                .query("dynamics")
                .arg(&run_id)
                .args(flags)
                .args(["--format", "json"]),
            &file(name),
        );
        checks.expect_match(
            name,
            [
                vec![
                    "dynamics".to_owned(),
                    "--root".to_owned(),
                    root_arg.clone(),
                    "--answer".to_owned(),
                    file_arg(name),
                ],
                expect.to_vec(),
            ]
            .concat(),
        );
        answer
    };
    let layer1 = vectors.tree_file("probe", 1).display().to_string();
    let answer = dynamics(
        &mut checks,
        "dynamics_single.json",
        &[
            "--vector",
            &layer1,
            "--vector",
            &vectors.lone("refusal_f32"),
        ],
        &[
            vec![
                "--expect-layer".to_owned(),
                format!("{TREE_TRAIT}=1"),
                "--expect-layer".to_owned(),
                "refusal_f32=2".to_owned(),
            ],
            vectors.tree_specs("probe", &[1]),
            vectors.lone_spec("refusal_f32"),
        ]
        .concat(),
    );
    assert_eq!(answer["threshold"], 0.1);
    dynamics(
        &mut checks,
        "dynamics_tree.json",
        &["--vector", &vectors.root()],
        &[
            vec!["--expect-layer".to_owned(), format!("{TREE_TRAIT}=2")],
            vectors.tree_specs("probe", &[2]),
        ]
        .concat(),
    );
    let answer = dynamics(
        &mut checks,
        "dynamics_given.json",
        &[
            "--vector",
            &vectors.root(),
            "--layer",
            "1",
            "--sublayer",
            "after_attn",
            "--threshold",
            "0.5",
        ],
        &[
            vec![
                "--expect-layer".to_owned(),
                format!("{TREE_TRAIT}=1"),
                "--sublayer".to_owned(),
                "after_attn".to_owned(),
                "--threshold".to_owned(),
                "0.5".to_owned(),
            ],
            vectors.tree_specs("probe", &[1]),
        ]
        .concat(),
    );
    assert_eq!(answer["prompts"][0]["traits"][0]["sublayer"], "after_attn");

    // Tensor slices equal the torch tensors exactly, as .npy and JSON.
    let tensor_cases: [(&str, &[&str], &str, &str, &str); 5] = [
        (
            "residual.npy",
            &[
                "--prompt-set",
                "dynamic",
                "--prompt-id",
                "3",
                "--phase",
                "response",
                "--layer",
                "1",
                "--tensor",
                "residual_out",
                "--tokens",
                "2:6",
            ],
            "inference/raw/residual/dynamic/3.pt",
            "response.activations.1.residual_out",
            "2:6",
        ),
        (
            "residual.json",
            &[
                "--prompt-set",
                "dynamic",
                "--prompt-id",
                "3",
                "--phase",
                "prompt",
                "--layer",
                "2",
                "--tensor",
                "after_attn",
                "--tokens",
                ":5",
                "--format",
                "json",
            ],
            "inference/raw/residual/dynamic/3.pt",
            "prompt.activations.2.after_attn",
            ":5",
        ),
        (
            "gelu.npy",
            &[
                "--key",
                "inference/raw/internals/dynamic/2_L2.pt",
                "--mode",
                "internals",
                "--phase",
                "prompt",
                "--tensor",
                "mlp.gelu",
                "--tokens",
                "1:4",
            ],
            "inference/raw/internals/dynamic/2_L2.pt",
            "prompt.mlp.gelu",
            "1:4",
        ),
        (
            "gelu.json",
            &[
                "--prompt-set",
                "dynamic",
                "--prompt-id",
                "2",
                "--mode",
                "internals",
                "--layer",
                "1",
                "--phase",
                "response",
                "--tensor",
                "mlp.gelu",
                "--tokens",
                "0:3",
            ],
            "inference/raw/internals/dynamic/2_L1.pt",
            "response.mlp.gelu",
            "0:3",
        ),
        (
            "internals_residual.npy",
            &[
                "--prompt-set",
                "dynamic",
                "--prompt-id",
                "5",
                "--mode",
                "internals",
                "--layer",
                "2",
                "--phase",
                "prompt",
                "--tensor",
                "residual_out",
            ],
            "inference/raw/internals/dynamic/5_L2.pt",
            "prompt.residual.output",
            ":",
        ),
    ];
    for (name, flags, key, path, tokens) in tensor_cases {
        let out = run_ok(
            cluster
                .query("tensor")
                .arg(&run_id)
                .args(flags)
                .arg("--output")
                .arg(file(name)),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(key) && stderr.contains(path), "{stderr}");
        let format = if name.ends_with(".npy") {
            "--npy"
        } else {
            "--json"
        };
        let check = |tokens: &str| {
            vec![
                "tensor".to_owned(),
                "--root".to_owned(),
                root_arg.clone(),
                "--key".to_owned(),
                key.to_owned(),
                "--path".to_owned(),
                path.to_owned(),
                format!("--tokens={tokens}"),
                format.to_owned(),
                file_arg(name),
            ]
        };
        checks.expect_match(name, check(tokens));
        if tokens == "2:6" {
            // the check can tell another slice apart
            checks.expect_mismatch("another slice", check("1:5"));
        }
    }

    let summaries = checks.run();
    // 8 prompts x (2 + 3 x 4 layers) x 3 sublayers x their tokens
    let values = summaries["project"]["values"].as_u64().unwrap();
    assert!(values > 8 * 14 * 3 * 8, "{values}");
    let (found, traits) = ["single", "tree", "given"]
        .iter()
        .map(|name| &summaries[&format!("dynamics_{name}.json")])
        .fold((0, 0), |(found, traits), summary| {
            (
                found + summary["commitment_tokens"].as_u64().unwrap(),
                traits + summary["traits"].as_u64().unwrap(),
            )
        });
    assert!(
        0 < found && found < traits,
        "both found and missing commitment tokens should be checked: {found} of {traits}"
    );
}

#[test]
fn compare_replays_on_a_variant_and_on_the_same_model_and_filter_runs() {
    let mut cluster = secured_cluster();
    let models = tempfile::tempdir().unwrap();
    let variant = models.path().join("tiny-variant");
    reference_ok([
        OsStr::new("variant-model"),
        tiny_model().as_os_str(),
        variant.as_os_str(),
    ]);
    let variant = variant.canonicalize().unwrap();
    cluster.start_worker(&[]);
    cluster.start_worker_on(&variant, &[]);
    let today = today_utc();
    let decoding = ["--prompt-set", "dynamic", "--max-new-tokens", "8"];
    let run_a = submit_and_wait(
        &mut cluster,
        None,
        &[
            &decoding[..],
            &["--mode", "both", "--layers", "1,2", "--experiment", "qa"],
        ]
        .concat(),
    );
    let run_b = submit_and_wait(
        &mut cluster,
        Some(&variant),
        &[&decoding[..], &["--replay", &run_a, "--experiment", "qb"]].concat(),
    );
    let run_c = submit_and_wait(
        &mut cluster,
        None,
        &[&decoding[..], &["--replay", &run_a, "--experiment", "qa"]].concat(),
    );
    let roots = tempfile::tempdir().unwrap();
    let root_of = |experiment: &str, run: &str| {
        let dir = roots.path().join(run);
        cluster.download_run(experiment, run, &dir);
        dir.display().to_string()
    };
    let (root_a, root_b, root_c) = (
        root_of("qa", &run_a),
        root_of("qb", &run_b),
        root_of("qa", &run_c),
    );
    let vectors = Vectors::write();
    let scratch = tempfile::tempdir().unwrap();

    // A against its replay on the perturbed model: the same tokens,
    // differences equal to numpy's B - A, Cohen's d with the pooled SD.
    let compare_check = |run: &str, root: &str, name: &str| {
        [
            vec![
                "compare".to_owned(),
                "--root-a".to_owned(),
                root_a.clone(),
                "--root-b".to_owned(),
                root.to_owned(),
                "--run-a".to_owned(),
                run_a.clone(),
                "--run-b".to_owned(),
                run.to_owned(),
                "--layers".to_owned(),
                "1,2".to_owned(),
                "--answer".to_owned(),
                scratch.path().join(name).display().to_string(),
            ],
            vectors.tree_specs("probe", &[1, 2]),
        ]
        .concat()
    };
    let compare = |checks: &mut Checks, run: &str, root: &str, name: &str| {
        let path = scratch.path().join(name);
        let (answer, stderr) = json_answer(
            cluster.query("compare").args([
                &run_a,
                run,
                "--vector",
                &vectors.root(),
                "--layers",
                "1,2",
            ]),
            &path,
        );
        check_read_report(&stderr, &answer["read"]);
        checks.expect_match(name, compare_check(run, root, name));
        answer
    };
    let mut checks = Checks::default();
    let variant_answer = compare(&mut checks, &run_b, &root_b, "variant.json");
    let same_answer = compare(&mut checks, &run_c, &root_c, "same.json");
    // The variant's differences are not what the same model gives.
    checks.expect_mismatch(
        "variant.json against the same-model replay",
        compare_check(&run_b, &root_c, "variant.json"),
    );
    let summaries = checks.run();
    let variant_summary = &summaries["variant.json"];
    let same_summary = &summaries["same.json"];
    assert_eq!(variant_summary["same_tokens"], true, "{variant_summary}");
    let comparisons = variant_answer["prompts"].as_array().unwrap();
    assert_eq!(comparisons.len(), DYNAMIC_IDS.len());
    for comparison in comparisons {
        assert_eq!(comparison["same_tokens"], true, "{comparison}");
        assert_eq!(comparison["lengths_differ"], false, "{comparison}");
    }
    assert!(
        variant_summary["max_abs_difference"].as_f64().unwrap() > 1e-3,
        "the variant should project differently: {variant_summary}"
    );
    let layers = variant_answer["summary"].as_array().unwrap();
    // 1 trait x 2 layers x 3 sublayers x 2 phases
    assert_eq!(layers.len(), 12);
    assert!(
        layers
            .iter()
            .any(|l| l["cohens_d"].as_f64().is_some_and(|d| d.abs() > 1e-3)),
        "{layers:?}"
    );

    // A against its replay on the same model: exactly zero differences.
    assert_eq!(same_summary["max_abs_difference"], 0.0, "{same_summary}");
    for comparison in same_answer["prompts"].as_array().unwrap() {
        assert_eq!(comparison["same_tokens"], true, "{comparison}");
        for phase in ["prompt_diff", "response_diff"] {
            let values: Vec<f64> = comparison[phase]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|token| token.as_array().unwrap())
                .flat_map(|layer| layer.as_array().unwrap())
                .map(|v| v.as_f64().unwrap())
                .collect();
            assert!(!values.is_empty());
            assert!(
                values.iter().all(|&v| v == 0.0),
                "{phase} of a same-model replay: {values:?}"
            );
        }
    }
    for layer in same_answer["summary"].as_array().unwrap() {
        assert_eq!(layer["mean_difference"], 0.0, "{layer}");
        assert_eq!(layer["cohens_d"], 0.0, "{layer}");
    }

    // Run filters, newest first.
    let runs = |flags: &[&str]| {
        let out = run_ok(cluster.query("runs").args(flags));
        run_ids(&serde_json::from_slice(&out.stdout).expect("JSON runs"))
    };
    assert_eq!(
        runs(&[
            "--prompt-set",
            "dynamic",
            "--mode",
            "internals",
            "--since",
            &today
        ]),
        [run_a.as_str()]
    );
    let newest_first = vec![run_c.clone(), run_b.clone(), run_a.clone()];
    assert_eq!(runs(&["--mode", "residual"]), newest_first);
    assert_eq!(
        runs(&["--state", "succeeded", "--since", &today]),
        newest_first
    );
    assert_eq!(
        runs(&["--model", &variant.display().to_string()]),
        [run_b.as_str()]
    );
    assert_eq!(runs(&["--experiment", "qb"]), [run_b.as_str()]);
    assert_eq!(runs(&["--limit", "1"]), [run_c.as_str()]);
    assert!(runs(&["--until", &today]).is_empty());
    assert!(runs(&["--prompt-set", "baseline"]).is_empty());
    let out = run_ok(
        cluster
            .query("runs")
            .args(["--experiment", "qa", "--format", "csv"]),
    );
    let rows = csv_rows(&String::from_utf8_lossy(&out.stdout));
    let ids: Vec<&str> = rows.iter().map(|r| r["run_id"].as_str()).collect();
    assert_eq!(ids, [run_c.as_str(), run_a.as_str()]);
    assert_eq!(rows[1]["modes"], "residual internals (layers 1,2)");
    assert_eq!(rows[1]["prompt_sets"], "dynamic");

    // Artifact listings: one run's internals of layer 2, as CSV.
    let out = run_ok(cluster.query("artifacts").args([
        "--run",
        &run_a,
        "--mode",
        "internals",
        "--layer",
        "2",
        "--format",
        "csv",
    ]));
    let csv = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut keys = BTreeSet::new();
    for row in csv_rows(&csv) {
        let key = row["key"].as_str();
        assert_eq!(row["run_id"], run_a);
        assert_eq!(row["experiment"], "qa");
        assert_eq!(row["mode"], "internals");
        assert_eq!(row["layer"], "2");
        assert_eq!(row["prompt_set"], "dynamic");
        assert_eq!(
            key,
            format!("inference/raw/internals/dynamic/{}_L2.pt", row["prompt_id"])
        );
        assert_eq!(
            row["url"],
            format!("s3://{}/captures/qa/{run_a}/{key}", cluster.bucket)
        );
        let body = std::fs::read(Path::new(&root_a).join(key)).unwrap();
        assert_eq!(row["bytes"], body.len().to_string());
        assert_eq!(row["sha256"], hex::encode(Sha256::digest(&body)));
        let response_tokens: u32 = row["response_tokens"].parse().unwrap();
        assert!((1..=8).contains(&response_tokens), "{row:?}");
        keys.insert(key.to_owned());
    }
    let expected: BTreeSet<String> = DYNAMIC_IDS
        .iter()
        .map(|id| format!("inference/raw/internals/dynamic/{id}_L2.pt"))
        .collect();
    assert_eq!(keys, expected, "{csv}");

    // Artifacts of every run matching filters: the variant's experiment.
    let out = run_ok(cluster.query("artifacts").args(["--experiment", "qb"]));
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let artifacts = listed["artifacts"].as_array().unwrap();
    assert_eq!(artifacts.len(), DYNAMIC_IDS.len(), "{listed}");
    assert!(
        artifacts
            .iter()
            .all(|a| a["run_id"] == run_b.as_str() && a["mode"] == "residual"),
        "{listed}"
    );
    assert_eq!(listed["truncated"], false);
}

#[test]
fn query_failures_are_one_line_naming_what_failed() {
    let mut cluster = secured_cluster();
    cluster.start_worker(&[]);
    let run_id = submit_and_wait(
        &mut cluster,
        None,
        &[
            "--prompt-set",
            "dynamic",
            "--max-new-tokens",
            "4",
            "--experiment",
            "qe",
        ],
    );
    let vectors = Vectors::write();
    let good = vectors.lone("refusal_f32");
    let project = |flags: &[&str]| run(cluster.query("project").args(flags));

    assert_clean_failure(
        &project(&[&run_id, "--vector", &vectors.lone("wrong_width")]),
        "a vector of the wrong width",
        &["wrong_width", "32 values", "hidden size is 64"],
    );
    let unknown = "01a21c23-0000-7000-8000-000000000000";
    assert_clean_failure(
        &project(&[unknown, "--vector", &good]),
        "an unknown run",
        &["run not found", unknown],
    );
    assert_clean_failure(
        &run(cluster.query("artifacts").args(["--run", unknown])),
        "artifacts of an unknown run",
        &["run not found", unknown],
    );
    assert_clean_failure(
        &project(&[&run_id, "--vector", &good, "--layers", "9"]),
        "a layer out of range",
        &["layer 9 is out of range", "0-3"],
    );
    assert_clean_failure(
        &run(cluster
            .query("dynamics")
            .args([&run_id, "--vector", &good, "--layer", "9"])),
        "a dynamics layer out of range",
        &["layer 9 is out of range"],
    );
    assert_clean_failure(
        &project(&[&run_id, "--vector", &good, "--prompt-set", "nope"]),
        "an unknown prompt set",
        &["\"nope\"", "dynamic"],
    );
    let absent = vectors.dir.path().join("absent/refusal.pt");
    let stderr = assert_clean_failure(
        &project(&[&run_id, "--vector", &absent.display().to_string()]),
        "a vector file that does not exist",
        &[&absent.display().to_string(), "No such file"],
    );
    assert_eq!(stderr.matches("No such file").count(), 1, "{stderr}");
    assert_clean_failure(
        &project(&[&run_id, "--vector", &vectors.root(), "--method", "ica"]),
        "a method the tree does not have",
        &["--method ica", &vectors.root()],
    );
    let mut anonymous = capture_tests::cluster::coordinator();
    anonymous
        .args(["query", "runs", "--coordinator", &cluster.url()])
        .env("RUST_LOG", "warn");
    assert_clean_failure(&run(&mut anonymous), "no token", &["token"]);

    // Broken artifacts: garbage in 2.pt, the first half of 3.pt.
    let prefix = format!("captures/qe/{run_id}/");
    let url = |id: &str| {
        format!(
            "s3://{}/{prefix}inference/raw/residual/dynamic/{id}.pt",
            cluster.bucket
        )
    };
    let objects = cluster.run_objects("qe", &run_id);
    let original = |id: &str| {
        objects
            .iter()
            .find(|(k, _)| *k == format!("inference/raw/residual/dynamic/{id}.pt"))
            .map(|(_, body)| body.clone())
            .unwrap()
    };
    let garbage: Vec<u8> = (0..original("2").len())
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    put_object(
        &cluster,
        &format!("{prefix}inference/raw/residual/dynamic/2.pt"),
        &garbage,
    );
    let three = original("3");
    put_object(
        &cluster,
        &format!("{prefix}inference/raw/residual/dynamic/3.pt"),
        &three[..three.len() / 2],
    );
    let corrupt = url("2");
    assert_clean_failure(
        &project(&[&run_id, "--vector", &good, "--prompt-id", "2"]),
        "a corrupt artifact",
        &[&corrupt, "corrupt"],
    );
    // Found while streaming, after prompt 1 was answered.
    assert_clean_failure(
        &project(&[&run_id, "--vector", &good]),
        "a corrupt artifact among good ones",
        &[&corrupt],
    );
    assert_clean_failure(
        &run(cluster.query("tensor").args([
            &run_id,
            "--key",
            "inference/raw/residual/dynamic/2.pt",
            "--phase",
            "prompt",
            "--layer",
            "0",
        ])),
        "a tensor of a corrupt artifact",
        &[&corrupt],
    );
    let truncated = url("3");
    let stderr = assert_clean_failure(
        &project(&[&run_id, "--vector", &good, "--prompt-id", "3"]),
        "a truncated artifact",
        &[&truncated],
    );
    assert!(
        stderr.contains("truncated") || stderr.contains("corrupt"),
        "{stderr}"
    );
    assert_clean_failure(
        &run(cluster
            .query("dynamics")
            .args([&run_id, "--vector", &good, "--prompt-id", "3"])),
        "dynamics of a truncated artifact",
        &[&truncated],
    );
    // The intact artifacts still answer.
    let out = project(&[&run_id, "--vector", &good, "--prompt-id", "1"]);
    assert!(
        out.status.success(),
        "an intact artifact of a run with broken ones: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn embedded_state_answers_queries_and_a_missing_state_dir_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let store = dir.path().join("captures");
    let coordinator = || {
        let mut cmd = Command::new(workspace_bin("coordinator"));
        cmd.env("RUST_LOG", "warn")
            .env_remove("CAPTURE_COORDINATOR")
            .env_remove("CAPTURE_STORE")
            .env_remove("CAPTURE_STATE_DIR");
        cmd
    };
    let out = run_ok(
        coordinator()
            .args([
                "submit",
                "--prompt-set",
                "baseline",
                "--max-new-tokens",
                "8",
            ])
            .arg("--model")
            .arg(tiny_model())
            .arg("--state-dir")
            .arg(&state)
            .arg("--store")
            .arg(&store),
    );
    let run_id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(run_id.len(), 36, "stdout is the run id: {run_id:?}");
    let vectors = Vectors::write();
    let answer = dir.path().join("project.json");
    let (projected, stderr) = json_answer(
        coordinator()
            .args(["query", "project", &run_id])
            .arg("--state-dir")
            .arg(&state)
            .arg("--store")
            .arg(&store)
            .args([
                "--vector",
                &vectors.root(),
                "--vector",
                &vectors.lone("refusal_f16"),
            ]),
        &answer,
    );
    check_read_report(&stderr, &projected["read"]);
    assert_eq!(projected["prompts"].as_array().unwrap().len(), 5);
    reference_ok(
        [
            vec![
                "project".to_owned(),
                "--root".to_owned(),
                store.join("default").join(&run_id).display().to_string(),
                "--answer".to_owned(),
                answer.display().to_string(),
            ],
            vectors.tree_specs("probe", &[1, 2]),
            vectors.lone_spec("refusal_f16"),
        ]
        .concat(),
    );
    let out = run_ok(
        coordinator()
            .args(["query", "runs", "--prompt-set", "baseline"])
            .arg("--state-dir")
            .arg(&state)
            .arg("--store")
            .arg(&store),
    );
    assert_eq!(
        run_ids(&serde_json::from_slice(&out.stdout).unwrap()),
        [run_id]
    );

    let absent = dir.path().join("nonexistent");
    let message = format!("no embedded runs in {}", absent.display());
    assert_clean_failure(
        &run(coordinator()
            .args(["query", "runs", "--state-dir"])
            .arg(&absent)),
        "a state directory that does not exist",
        &[&message, "--coordinator"],
    );
    assert!(
        !absent.exists(),
        "a query must not create the state directory"
    );
}
