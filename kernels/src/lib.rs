//! The worker's own CUDA kernels and their launch, for operations that
//! candle computes as several kernels where one does (a decode step at
//! batch 1 on a GPU waits mostly for kernel launches; see the worker's
//! docs/benchmarks.md):
//!
//! - [`rms_norm`]: Gemma-2's RMS norm in f32 arithmetic for any float
//!   input, optionally followed by the residual addition (`rms_norm.cu`);
//! - [`attention_softmax`]: the scaling, soft-capping, masking and softmax
//!   of attention scores (`attention_softmax.cu`).
//!
//! Each function checks its inputs' shapes and contiguity against what its
//! kernel reads and writes, so it is safe to call. The CPU references, and
//! the candle operations they replace, are in the worker (`model::norm`,
//! `model::attention_softmax`); `capture::gpu_tests` compares the two on a
//! GPU. Without the `cuda` feature this crate is empty (the kernels are
//! compiled to PTX by `build.rs`, which needs nvcc).

#[cfg(feature = "cuda")]
mod launch;

#[cfg(feature = "cuda")]
pub use launch::{attention_softmax, rms_norm};
