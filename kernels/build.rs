//! With the `cuda` feature, compiles the kernels (`src/*.cu`) to PTX with nvcc, as candle's kernels are:
//! nvcc from `$CUDA_HOME/bin` or the PATH, for the compute capability in
//! `CUDA_COMPUTE_CAP` (e.g. `90`) or else the first GPU's, from nvidia-smi.
//! Without the feature it does nothing.

use std::path::PathBuf;
use std::process::Command;

const KERNELS: &[&str] = &[
    "rms_norm",
    "attention_softmax",
    "decode_attention",
    "rotary",
    "gelu_mul",
    "matvec",
    "gather",
    "head",
];

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    for kernel in KERNELS {
        println!("cargo::rerun-if-changed=src/{kernel}.cu");
    }
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=CUDA_HOME");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = match std::env::var_os("CUDA_HOME") {
        Some(home) if PathBuf::from(&home).join("bin/nvcc").exists() => {
            PathBuf::from(home).join("bin/nvcc")
        }
        _ => PathBuf::from("nvcc"),
    };
    let cap = compute_cap();
    for kernel in KERNELS {
        let ptx = out.join(format!("{kernel}.ptx"));
        let status = Command::new(&nvcc)
            .arg(format!("--gpu-architecture=sm_{cap}"))
            .args(["--ptx", "-O3", "-o"])
            .arg(&ptx)
            .arg(format!("src/{kernel}.cu"))
            .status()
            .unwrap_or_else(|e| panic!("running {} (set CUDA_HOME or PATH): {e}", nvcc.display()));
        assert!(status.success(), "nvcc failed on {kernel}.cu: {status}");
    }
}

/// `CUDA_COMPUTE_CAP`, else the first GPU's compute capability.
fn compute_cap() -> String {
    if let Ok(cap) = std::env::var("CUDA_COMPUTE_CAP") {
        return cap.replace('.', "");
    }
    let output = Command::new("nvidia-smi")
        .args(["--query-gpu=compute_cap", "--format=csv,noheader"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .expect(
            "no CUDA_COMPUTE_CAP and no GPU for nvidia-smi to ask: set CUDA_COMPUTE_CAP (e.g. 90)",
        );
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .next()
        .expect("nvidia-smi listed no GPU")
        .trim()
        .replace('.', "")
}
