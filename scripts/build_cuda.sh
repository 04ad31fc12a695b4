#!/usr/bin/env bash
# Builds the worker with `--features cuda` on a machine without a GPU or a
# CUDA installation, for a GPU machine that has the driver (and, for the
# libraries, CUDA 13 as the GPU images here have it):
#
#   bash scripts/build_cuda.sh            # -> .gpu/worker.xz, .gpu/engine-tests.xz
#
# The compiler comes from PyPI: NVIDIA's CUDA 13.0 wheels (nvcc, its headers,
# cicc, and the runtime, cuBLAS, cuRAND and NVRTC libraries to link against)
# go to ~/.cache/capture/cuda13 (CAPTURE_CUDA_HOME). 13.0 matches the lent
# GPU machines' driver (580, CUDA 13.0): PTX from a newer nvcc would not load
# there. The driver library itself (libcuda.so.1) is not on PyPI; a stub
# with the driver API's names, made here, satisfies the linker, and the real
# driver is found at run time. Kernels are built for compute capability 9.0
# (H100, H200); set CUDA_COMPUTE_CAP for another card.
#
# Before building, the kernels' bodies run on the CPU against their
# references (scripts/check_kernels.sh); a mismatch stops the build.
#
# Outputs (stripped and xz-compressed, about 10 MB each, to travel to the
# GPU machine; see scripts/gpu_check.sh):
#   .gpu/worker.xz        the release `worker` binary
#   .gpu/engine-tests.xz  the worker's library tests, with capture::gpu_tests
set -euo pipefail
cd "$(dirname "$0")/.."

CUDA_HOME=${CAPTURE_CUDA_HOME:-$HOME/.cache/capture/cuda13}/nvidia/cu13
export CUDA_HOME
export PATH=$CUDA_HOME/bin:$PATH
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CUDARC_CUDA_VERSION=13000
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}
export LIBRARY_PATH=$CUDA_HOME/lib:$CUDA_HOME/lib64/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}

if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
    echo "installing the CUDA 13.0 compiler and libraries from PyPI into $(dirname "$(dirname "$CUDA_HOME")")"
    python3 -m pip install -q --no-deps --target "$(dirname "$(dirname "$CUDA_HOME")")" \
        nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
        nvidia-cuda-cccl==13.0.85 nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvrtc==13.0.88 \
        nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35
fi
nvcc --version | tail -1

# The kernels' bodies (rotary, GELU times up, gather, decode attention,
# soft-cap, argmax) run here, on the CPU, against references written apart
# from them: their indexing and arithmetic checked before any GPU sees them.
bash scripts/check_kernels.sh

# Unversioned names for the linker.
for lib in cudart cublas cublasLt nvrtc; do
    ln -sf "lib$lib.so.13" "$CUDA_HOME/lib/lib$lib.so"
done
ln -sf libcurand.so.10 "$CUDA_HOME/lib/libcurand.so"

# The driver stub: every cu* function cudarc declares, SONAME libcuda.so.1.
stub=$CUDA_HOME/lib64/stubs/libcuda.so
if [ ! -f "$stub" ]; then
    mkdir -p "$(dirname "$stub")"
    # cudarc is an optional dependency: only the cuda feature's resolve has it.
    cudarc=$(cargo metadata --format-version 1 --features capture-worker/cuda 2>/dev/null |
        python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"))')
    grep -ohE '^\s+fn (cu[A-Za-z0-9_]+)\(' "$(dirname "$cudarc")/src/driver/sys/mod.rs" |
        sed -E 's/\s+fn (\w+)\(/\1/' | sort -u |
        awk '{ print "int " $1 "(void) { return 999; }" }' > "$stub.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub" "$stub.c"
fi

cargo build --release -p capture-worker --features cuda --bin worker
tests=$(cargo test --release -p capture-worker --features cuda --lib --no-run --message-format json 2>/dev/null |
    python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("profile", {}).get("test") and m.get("executable"):
        print(m["executable"])')
mkdir -p .gpu
rm -f .gpu/*
for pair in "worker:$CARGO_TARGET_DIR/release/worker" "engine-tests:$tests"; do
    strip -o ".gpu/${pair%%:*}" "${pair#*:}"
    xz -T0 -6 ".gpu/${pair%%:*}"
done
ls -la .gpu
