//! Capture: the generation loop with hooks, host-side traces, and the
//! assembly of traces into the reference's artifact structures.

pub mod artifact;
pub mod decode;
pub mod engine;
pub mod mode;
pub mod trace;

#[cfg(test)]
pub(crate) mod batch_tests;
#[cfg(all(test, feature = "cuda"))]
mod gpu_tests;

pub use artifact::{
    TokenTexts, internals_artifact, internals_artifact_owned, residual_artifact,
    residual_artifact_owned,
};
pub use decode::Sampling;
pub use engine::{
    BatchItem, ResponsePlan, StepPhases, capture_batch, capture_batch_profiled, capture_prompt,
    generate,
};
pub use mode::{CaptureMode, LayerSelection};
pub use trace::{LayerTrace, PromptTrace};
