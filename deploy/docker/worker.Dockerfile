# syntax=docker/dockerfile:1.7
# The worker image, in two variants (build targets):
#
#   worker-cuda (default): built with `--features cuda` on NVIDIA's CUDA
#     devel image, run on the matching runtime image (cuBLAS, cuRAND, NVRTC;
#     the driver comes from the host through the NVIDIA container toolkit).
#     candle compiles its kernels for one compute capability: set
#     CUDA_COMPUTE_CAP to your GPUs' (80 A100, 86 A10/RTX 30xx, 89 L4/L40S,
#     90 H100/H200). Newer GPUs than the one built for run the PTX through the
#     driver's JIT; older ones cannot run it (bf16 needs 80 or newer anyway).
#   worker-cpu: the CPU build on Debian slim.
#
#   docker build -f deploy/docker/worker.Dockerfile --target worker-cuda \
#       --build-arg CUDA_COMPUTE_CAP=90 -t capture-worker:cuda .
#   docker build -f deploy/docker/worker.Dockerfile --target worker-cpu -t capture-worker:cpu .
#
# Both run as the unprivileged user 10001 with the Hugging Face cache at
# /models/huggingface (HF_HOME; mount a volume on /models to keep the model
# between containers). Secrets can come as files: the entrypoint
# (worker-entrypoint.sh) sets HF_TOKEN from HF_TOKEN_FILE, and the same for
# CAPTURE_WORKER_TOKEN, CAPTURE_TOKEN, AWS_ACCESS_KEY_ID and
# AWS_SECRET_ACCESS_KEY, e.g. a compose or swarm secret in /run/secrets/.

ARG RUST_VERSION=1.95
ARG CUDA_VERSION=12.6.3
ARG UBUNTU_VERSION=24.04

# ---- CPU build
FROM rust:${RUST_VERSION}-bookworm AS build-cpu
WORKDIR /src
COPY . .
RUN --mount=type=cache,id=capture-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=capture-target-cpu,target=/src/target \
    cargo build --release --locked -p capture-worker --bin worker \
 && install -D -m 0755 target/release/worker /out/worker

# ---- CUDA build: nvcc from the devel image, Rust from rustup
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu${UBUNTU_VERSION} AS build-cuda
ARG RUST_VERSION
ARG CUDA_COMPUTE_CAP=80
ENV CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP} \
    RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:${PATH}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl gcc g++ make pkg-config \
 && rm -rf /var/lib/apt/lists/*
RUN curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
    | sh -s -- -y --profile minimal --default-toolchain "${RUST_VERSION}"
WORKDIR /src
COPY . .
RUN --mount=type=cache,id=capture-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=capture-target-cuda-${CUDA_COMPUTE_CAP},target=/src/target \
    cargo build --release --locked -p capture-worker --bin worker --features cuda \
 && install -D -m 0755 target/release/worker /out/worker

# ---- CPU runtime
FROM debian:bookworm-slim AS worker-cpu
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --user-group --create-home --home-dir /home/capture capture \
 && mkdir -p /models/huggingface \
 && chown -R 10001:10001 /models
COPY --chmod=0755 deploy/docker/worker-entrypoint.sh /usr/local/bin/capture-entrypoint
COPY --from=build-cpu /out/worker /usr/local/bin/worker
# glibc keeps freed memory instead of handing it back and faulting it in
# again at the next batch (traces, artifacts): see docker/README.md.
ENV HF_HOME=/models/huggingface \
    GLIBC_TUNABLES=glibc.malloc.trim_threshold=17179869184:glibc.malloc.mmap_threshold=33554432
VOLUME ["/models"]
USER 10001:10001
# Prometheus metrics and /healthz (CAPTURE_METRICS_LISTEN)
EXPOSE 9091
# Keep the shutdown signal: `worker run` drains on SIGTERM; give it more than
# --drain-timeout (120 s) before a SIGKILL (docker stop -t 150).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/capture-entrypoint"]
CMD ["run", "--device", "cpu"]

# ---- CUDA runtime (the default target: last)
FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_VERSION} AS worker-cuda
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --user-group --create-home --home-dir /home/capture capture \
 && mkdir -p /models/huggingface \
 && chown -R 10001:10001 /models
COPY --chmod=0755 deploy/docker/worker-entrypoint.sh /usr/local/bin/capture-entrypoint
COPY --from=build-cuda /out/worker /usr/local/bin/worker
ENV HF_HOME=/models/huggingface \
    GLIBC_TUNABLES=glibc.malloc.trim_threshold=17179869184:glibc.malloc.mmap_threshold=33554432 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
VOLUME ["/models"]
USER 10001:10001
EXPOSE 9091
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/capture-entrypoint"]
CMD ["run", "--device", "cuda:0"]
