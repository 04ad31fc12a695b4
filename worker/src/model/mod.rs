//! The hooked Gemma-2 model: configuration, weights and the forward pass.

pub mod config;
pub mod gemma2;
pub mod weights;

pub use config::{Gemma2Config, LayerKind};
pub use gemma2::{CaptureRequest, Gemma2, KvCache, LayerRecord, LayerWants};
pub use weights::Weights;
