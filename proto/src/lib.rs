//! The wire contract of capture: the gRPC services between clients, the
//! coordinator and workers, their typed ids, and the one mapping between
//! domain errors and gRPC status codes.
//!
//! Every other crate talks gRPC through this one and uses its re-exports of
//! [`tonic`], [`prost`], [`prost_types`] and [`tonic_health`], so the
//! workspace has exactly one version of each.
//!
//! # Services (package `capture.v1`, in `proto/capture/v1/`)
//!
//! - [`CaptureService`] (clients such as `coordinator submit`): submit a run
//!   (an experiment name, prompt sets x capture modes, decoding parameters,
//!   model id and revision, storage dtype, shard size), get, list, cancel and
//!   retry runs, and watch a run's progress as a server stream that ends
//!   after the message whose state is terminal.
//! - [`WorkerService`] (workers pulling jobs): claim a job for the model the
//!   worker has loaded, heartbeat it, complete it with the list of artifacts
//!   it wrote, fail it (retryable or not), release it on shutdown, and
//!   register / deregister the worker.
//! - [`QueryService`] (clients such as `coordinator query`): list runs and
//!   artifacts with filters, project a run's residual artifacts onto trait
//!   vectors, score dynamics, compare runs and read tensor slices, all
//!   served from ranged reads of the artifacts.
//! - The standard `grpc.health.v1` health service, from [`tonic_health`]:
//!   servers add the service returned by
//!   `tonic_health::server::health_reporter()` next to their own.
//!
//! The generated messages, clients and servers live in [`v1`]; the services'
//! client and server types are re-exported at the crate root. Implement a
//! server trait with `#[capture_proto::tonic::async_trait]`.
//!
//! # Fencing contract
//!
//! A claim leases one job to one worker for one *attempt*: the claim bumps
//! the job's attempt number (starting at 1) and sets a lease expiry, which
//! heartbeats extend. Every later state change of the job (heartbeat,
//! complete, fail, release) carries the pair (job id, attempt) — a [`Fence`]
//! — and is applied only while that attempt still holds the lease. A stale
//! attempt (its lease expired and the job was claimed again, or the job
//! already finished) gets [`CaptureServiceError::LeaseLost`]: gRPC
//! `FAILED_PRECONDITION` with a message starting with `"lease lost"`
//! ([`LEASE_LOST_PREFIX`]), and its result is discarded, never merged.
//!
//! Workers write an attempt's files under the job's `staging_prefix`, never
//! at the documented keys. An accepted `CompleteJob` records the job as
//! succeeded and its artifact rows in one transaction; the coordinator then
//! promotes exactly that attempt's staged files (again at run finalization,
//! idempotently, so a crash in between is repaired), so a late worker can
//! never overwrite the accepted attempt's artifacts.
//!
//! A cancelled run's heartbeats answer `cancel_requested = true`; its later
//! completions fail with [`CaptureServiceError::Cancelled`] (`ABORTED`).
//!
//! # Errors
//!
//! Servers return [`CaptureServiceError`] and convert it with
//! `tonic::Status::from`; clients read a status back with
//! [`CaptureServiceError::from_status`] and can match
//! [`CaptureServiceError::is_lease_lost`].

pub mod client;
mod error;
mod ids;
mod wire;

#[cfg(test)]
mod service_tests;

pub use prost;
pub use prost_types;
pub use tonic;
pub use tonic_health;

pub use client::{
    CaptureClient, ClientConfig, ConnectError, QueryClient, Token, WorkerClient, capture_client,
    connect, connect_lazy, query_client, tls_hint, worker_client,
};
pub use error::{CaptureServiceError, LEASE_LOST_PREFIX};
pub use ids::{Attempt, Fence, IdParseError, JobId, RunId, WorkerId};
pub use v1::capture_service_client::CaptureServiceClient;
pub use v1::capture_service_server::{CaptureService, CaptureServiceServer};
pub use v1::query_service_client::QueryServiceClient;
pub use v1::query_service_server::{QueryService, QueryServiceServer};
pub use v1::worker_service_client::WorkerServiceClient;
pub use v1::worker_service_server::{WorkerService, WorkerServiceServer};
pub use wire::{DEFAULT_LIST_LIMIT, DEFAULT_MAX_NEW_TOKENS, DEFAULT_SHARD_SIZE};

/// Messages, enums, clients and servers generated from
/// `proto/capture/v1/*.proto` (protobuf package `capture.v1`).
#[allow(
    missing_docs,
    unreachable_pub,
    clippy::all,
    clippy::pedantic,
    rustdoc::invalid_html_tags,
    rustdoc::bare_urls
)]
pub mod v1 {
    tonic::include_proto!("capture.v1");
}
