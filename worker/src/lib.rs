//! Hooked Gemma-2 capture engine: model, generation with capture, `.pt`
//! artifacts, prompt sets, the pulling worker (`worker run`) and the
//! `worker` command's library side.

pub mod bench;
pub mod capture;
pub mod cli;
pub mod error;
pub mod loader;
pub mod metrics;
pub mod model;
pub mod model_files;
pub mod pull;
pub mod run;
pub mod store;
pub mod tokenizer;

pub use error::CaptureError;

pub use capture_format::{fuzzing, manifest, prompts, pt};
