#!/usr/bin/env bash
# Runs the worker's CUDA kernels' bodies on the CPU, without a GPU:
# kernels/tests/host_emulation.cu compiles the bodies of kernels/src/rotary.cu, matvec.cu,
# gelu_mul.cu, gather.cu and decode_attention.cu for the host and runs every
# launch index (or block, as threads) against references written apart from
# them (see that file). CI runs it, and so
# does scripts/build_cuda.sh before building.
#
#   bash scripts/check_kernels.sh
#
# It needs nvcc and a host C++ compiler only (no driver, no CUDA libraries):
# the CUDA 13.0 compiler from PyPI, as scripts/build_cuda.sh installs it
# (reused when present), else its compiler packages alone into
# ~/.cache/capture/cuda13-nvcc (about 270 MB).
set -euo pipefail
cd "$(dirname "$0")/.."

cuda=${CAPTURE_CUDA_HOME:-$HOME/.cache/capture/cuda13}/nvidia/cu13
if [ ! -x "$cuda/bin/nvcc" ]; then
    root=$HOME/.cache/capture/cuda13-nvcc
    cuda=$root/nvidia/cu13
    if [ ! -x "$cuda/bin/nvcc" ]; then
        echo "installing NVIDIA's CUDA 13.0 compiler from PyPI into $root"
        python3 -m pip install -q --no-deps --target "$root" \
            nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
            nvidia-cuda-cccl==13.0.85 nvidia-cuda-runtime==13.0.96
    fi
fi
if ! command -v g++ > /dev/null; then
    echo "installing g++ (nvcc's host compiler)"
    apt-get install -y -q g++ > /dev/null
fi

out=${CARGO_TARGET_DIR:-target}/host_emulation
mkdir -p "$(dirname "$out")"
"$cuda/bin/nvcc" -std=c++20 -DCAPTURE_HOST_EMULATION -L"$cuda/lib" -o "$out" kernels/tests/host_emulation.cu
"$out"
