//! The hooked Gemma-2 model: configuration, weights and the forward pass.

pub mod attention_softmax;
pub mod bf16_blocks;
pub mod bf16_weights;
pub mod cache;
pub mod config;
pub mod decode_attention;
pub mod decode_projection;
pub mod fused;
pub mod gelu_mul;
pub mod gemma2;
pub mod matvec;
pub mod norm;
pub mod rotary;
pub mod softcap;
pub mod weights;

pub use cache::{KvCache, PassLayout};
pub use config::{Gemma2Config, LayerKind};
pub use gemma2::{BatchOutput, CaptureRequest, Gemma2, Head, LayerRecord, LayerWants};
pub use weights::Weights;
