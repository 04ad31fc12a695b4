//! The one error enum at the boundary of the capture engine.

use std::path::PathBuf;

/// Everything that can go wrong while loading a model, reading prompts,
/// capturing or writing artifacts.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(transparent)]
    Pt(#[from] crate::pt::PtError),
    #[error(transparent)]
    Prompt(#[from] crate::prompts::PromptError),
    #[error(transparent)]
    Manifest(#[from] crate::manifest::ManifestError),
    #[error(transparent)]
    ModelFiles(#[from] crate::model_files::ModelFilesError),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("model error: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    #[error("i/o error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = CaptureError> = std::result::Result<T, E>;
