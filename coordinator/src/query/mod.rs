//! Cross-run analysis over captured artifacts: trait-vector projections,
//! dynamics, run-to-run comparison and tensor slices, reading only the bytes
//! each answer needs from the artifact store.
//!
//! - [`reader`]: ranged reads of `.pt` artifacts, bytes counted;
//! - [`vectors`]: trait vectors from files, trees and store URLs;
//! - [`analysis`]: projection, dynamics and comparison math;
//! - [`engine`]: a run's artifacts read and projected;
//! - [`tensor`]: one tensor slice of one artifact;
//! - [`service`]: the `QueryService` gRPC API over the engine;
//! - [`plot`]: PNG heatmaps and line plots for the CLI.

pub mod analysis;
pub mod engine;
pub mod error;
pub mod plot;
pub mod reader;
pub mod service;
pub mod tensor;
pub mod vectors;

pub use engine::QueryEngine;
pub use error::QueryError;
pub use service::QueryApi;
