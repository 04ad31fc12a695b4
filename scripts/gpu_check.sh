#!/usr/bin/env bash
# The GPU checks of the CUDA build, in one run on a machine with an NVIDIA GPU
# (driver with CUDA 13, Python with torch and transformers), from the
# repository root, after `bash scripts/build_cuda.sh` made .gpu/:
#
#   bash scripts/gpu_check.sh [OUT_DIR]
#
# 1. the engine's GPU tests (capture::gpu_tests: CUDA f32 and bf16 against
#    the CPU, the worker's kernels against their CPU references, batched
#    against one-at-a-time on the GPU, device memory) and the CPU batch
#    tests, from the test binary built with --features cuda;
# 2. `worker capture` end to end on the tiny fixture: CPU f32, then CUDA bf16
#    teacher-forced on the CPU's tokens, then CUDA f32 greedy; every artifact
#    loaded with torch.load(weights_only=True) and compared with the CPU's
#    (scripts/compare_captures.py);
# 3. `worker bench --device cuda --compare-transformers` at gemma-2-2b's
#    dimensions (bf16), batches of 1 to 128;
# 4. the same bench without transformers, with CAPTURE_CUBLAS_PROJECTIONS=1
#    (cuBLAS's matmul for the decode steps' projections instead of the
#    worker's matvec kernel), batches of 1 and 4, for the side-by-side ratio;
#    with CAPTURE_UNFUSED=1 (candle's separate operations instead of the
#    capture-kernels crate's: norms,
#    attention softmax, decode attention, rotary, GELU times up, gather,
#    soft-cap, argmax and the projections' matvec), batches of 1 and 16;
# 5. the same with CAPTURE_CUDA_DEFAULTS=1 (the driver's memory pool
#    releasing freed memory at every synchronisation, cudarc's events on
#    every allocation; see capture_kernels::device), batches of 1 and 16;
# 6. batch 1 after a 2,000-token prompt: the default (the decode attention
#    split over the keys in parts of 64, past 256 keys), one block per
#    query row (CAPTURE_DECODE_SPLIT_FROM=1000000: 8 of the GPU's
#    multiprocessors read the context at batch 1), and CAPTURE_UNFUSED=1
#    (candle's matmuls spread it over the card).
#
# Every step runs even when an earlier one fails; the summary at the end
# gives each step's exit status. All output goes to OUT_DIR/all.log, the bench results to bench.json.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/gpu-check}}
mkdir -p "$out" /tmp/gpu-bin
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"

# The CUDA libraries: the toolkit's, else the ones PyTorch's wheels bring.
torch_libs=$(python3 -c 'import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null)
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${torch_libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
for binary in worker engine-tests; do
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
        ".gpu/$binary.xz" "/tmp/gpu-bin/$binary" && chmod +x "/tmp/gpu-bin/$binary"
done
ldd /tmp/gpu-bin/worker | grep -E 'cuda|cublas|curand|nvrtc|not found'
export CAPTURE_TINY_MODEL=$PWD/tests/fixtures/tiny-gemma2

declare -A status
step() {
    local name=$1 limit=$2
    shift 2
    echo "=== $name: $*"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$out/all.log"
    status[$name]="${PIPESTATUS[0]} ($((SECONDS - start)) s)"
}

step tests 180 /tmp/gpu-bin/engine-tests --test-threads 1 --nocapture gpu_tests batch_tests

fixture=tests/fixtures/tiny-gemma2
capture=(/tmp/gpu-bin/worker capture --model "$fixture" --prompt-set adversarial --mode residual --max-new-tokens 8 --quiet)
step capture-cpu 60 "${capture[@]}" --device cpu --out /tmp/run-cpu
step capture-cuda-bf16 60 "${capture[@]}" --device cuda --dtype bf16 --replay /tmp/run-cpu --out /tmp/run-bf16
step capture-cuda-f32 60 "${capture[@]}" --device cuda --dtype f32 --out /tmp/run-f32
step compare-f32 60 python3 scripts/compare_captures.py /tmp/run-cpu /tmp/run-f32 --atol 1e-3 --rtol 1e-3 -q
step compare-bf16 60 python3 scripts/compare_captures.py /tmp/run-cpu /tmp/run-bf16 --atol 0.1 --rtol 0.05

step bench 360 /tmp/gpu-bin/worker bench --device cuda --new-tokens 20 --prompt-tokens 30 \
    --batch-sizes 4,16,64,128 --repeats 2 --compare-transformers --python python3 \
    --json "$out/bench.json"
step bench-cublas 120 env CAPTURE_CUBLAS_PROJECTIONS=1 /tmp/gpu-bin/worker bench --device cuda \
    --new-tokens 20 --prompt-tokens 30 --batch-sizes 4 --repeats 2 --json "$out/bench-cublas.json"
step bench-unfused 120 env CAPTURE_UNFUSED=1 /tmp/gpu-bin/worker bench --device cuda \
    --new-tokens 20 --prompt-tokens 30 --batch-sizes 16 --repeats 2 --json "$out/bench-unfused.json"
step bench-cuda-defaults 120 env CAPTURE_CUDA_DEFAULTS=1 /tmp/gpu-bin/worker bench --device cuda \
    --new-tokens 20 --prompt-tokens 30 --batch-sizes 16 --repeats 2 --json "$out/bench-cuda-defaults.json"

long=(--new-tokens 20 --prompt-tokens 2000 --batch-sizes 1 --repeats 2)
step bench-long 90 /tmp/gpu-bin/worker bench --device cuda "${long[@]}" --json "$out/bench-long.json"
step bench-long-one-block 90 env CAPTURE_DECODE_SPLIT_FROM=1000000 /tmp/gpu-bin/worker bench \
    --device cuda "${long[@]}" --json "$out/bench-long-one-block.json"
step bench-long-unfused 90 env CAPTURE_UNFUSED=1 /tmp/gpu-bin/worker bench --device cuda \
    "${long[@]}" --json "$out/bench-long-unfused.json"
echo "=== summary"
for name in tests capture-cpu capture-cuda-bf16 capture-cuda-f32 compare-f32 compare-bf16 bench bench-cublas bench-unfused bench-cuda-defaults bench-long bench-long-one-block bench-long-unfused; do
    echo "$name: exit ${status[$name]:-not run}"
done | tee "$out/summary.txt"
