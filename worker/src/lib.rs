//! Hooked Gemma-2 capture engine: model, generation with capture, `.pt`
//! artifacts, prompt sets, the pulling worker (`worker run`) and the
//! `worker` command's library side.

pub mod bench;
pub mod capture;
pub mod cli;
pub mod error;
pub mod fuzzing;
pub mod loader;
pub mod manifest;
pub mod metrics;
pub mod model;
pub mod model_files;
pub mod prompts;
pub mod pt;
pub mod pull;
pub mod run;
pub mod store;
pub mod tokenizer;

pub use error::CaptureError;
