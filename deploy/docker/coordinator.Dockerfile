# syntax=docker/dockerfile:1.7
# The coordinator image: `coordinator` (serve, migrate and the client
# commands) on distroless (glibc, CA certificates, no shell), as the
# unprivileged user 65532. Build from the repository root:
#
#   docker build -f deploy/docker/coordinator.Dockerfile -t capture-coordinator .
#
# coordinator.Dockerfile.dockerignore (beside this file) keeps target/ and .git
# out of the context (BuildKit reads a Dockerfile's own ignore file).

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
# The cache mounts keep the registry and the build directory between builds;
# the binary is copied out of the cached target directory.
RUN --mount=type=cache,id=capture-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=capture-target-cpu,target=/src/target \
    cargo build --release --locked -p capture-coordinator --bin coordinator \
 && install -D -m 0755 target/release/coordinator /out/coordinator

FROM gcr.io/distroless/cc-debian12:nonroot AS coordinator
COPY --from=build /out/coordinator /usr/local/bin/coordinator
USER 65532:65532
# gRPC (CAPTURE_LISTEN) and Prometheus metrics (CAPTURE_METRICS_LISTEN)
EXPOSE 50051 9090
ENTRYPOINT ["/usr/local/bin/coordinator"]
CMD ["serve"]
