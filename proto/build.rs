//! Compiles `proto/capture/v1/*.proto` with protox (pure Rust, no system
//! `protoc`) and generates the prost messages and tonic clients and servers.

use std::path::PathBuf;

const PROTO_ROOT: &str = "proto";
const PROTO_FILES: &[&str] = &[
    "proto/capture/v1/common.proto",
    "proto/capture/v1/capture_service.proto",
    "proto/capture/v1/worker_service.proto",
    "proto/capture/v1/query_service.proto",
];

fn main() {
    println!("cargo:rerun-if-changed={PROTO_ROOT}");
    for file in PROTO_FILES {
        println!("cargo:rerun-if-changed={file}");
    }
    let fds = match protox::compile(PROTO_FILES, [PROTO_ROOT]) {
        Ok(fds) => fds,
        Err(err) => {
            // miette's Debug output shows the file, line and a caret.
            eprintln!("{err:?}");
            panic!("compiling the .proto files failed: {err}");
        }
    };
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    tonic_prost_build::configure()
        .out_dir(&out_dir)
        .compile_fds(fds)
        .unwrap_or_else(|err| panic!("generating code from the .proto files failed: {err}"));
}
