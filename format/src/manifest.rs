//! `manifest.json`: what a capture directory holds and how it was made
//! (model identity and hashes, parameters, and every artifact's key, size,
//! sha256 and tensor shapes).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::pt::{PtError, PtValue};

/// Why a manifest could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("i/o error on {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read manifest {origin}: {message}")]
    Parse { origin: String, message: String },
    #[error(transparent)]
    Write(#[from] PtError),
}

type Result<T, E = ManifestError> = std::result::Result<T, E>;

pub const MANIFEST_FORMAT: &str = "capture-manifest/1";

/// The model a capture ran.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelIdentity {
    pub id: String,
    pub revision: Option<String>,
    pub config_sha256: String,
    pub tokenizer_sha256: String,
    /// Compute dtype (`f32`, `bf16`, ...).
    pub compute_dtype: String,
}

/// One written artifact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArtifactEntry {
    /// Path relative to the capture root, `/`-separated.
    pub key: String,
    pub prompt_set: String,
    pub prompt_id: String,
    pub mode: String,
    pub layer: Option<usize>,
    pub bytes: u64,
    pub sha256: String,
    pub prompt_tokens: usize,
    pub response_tokens: usize,
    /// Dotted key path to shape; a list of tensors is summarised as
    /// `"list of R: [a, b] .. [c, d]"`.
    pub shapes: BTreeMap<String, serde_json::Value>,
}

/// The manifest of a capture directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub code_version: String,
    pub model: ModelIdentity,
    /// Decoding, end tokens, storage dtype, replay source, chat template and
    /// device: what every artifact under the root shares. Mode, prompt set
    /// and layer are per artifact.
    pub parameters: serde_json::Value,
    pub artifacts: Vec<ArtifactEntry>,
}

impl Manifest {
    pub fn new(model: ModelIdentity, parameters: serde_json::Value) -> Self {
        Self {
            format: MANIFEST_FORMAT.into(),
            code_version: env!("CARGO_PKG_VERSION").into(),
            model,
            parameters,
            artifacts: Vec::new(),
        }
    }

    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// Parses a manifest; `source` names it in the error.
    pub fn from_json(text: &str, source: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|e| ManifestError::Parse {
            origin: source.to_owned(),
            message: e.to_string(),
        })
    }

    /// The manifest as written to `manifest.json`.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a manifest serialises")
    }

    /// Adds or replaces the entry with the same key.
    pub fn upsert(&mut self, entry: ArtifactEntry) {
        match self.artifacts.iter_mut().find(|a| a.key == entry.key) {
            Some(existing) => *existing = entry,
            None => self.artifacts.push(entry),
        }
    }

    /// Writes the manifest atomically (temporary file, then rename).
    pub fn write(&self, path: &Path) -> Result<()> {
        crate::pt::write_file_atomic(path, self.to_json().as_bytes())?;
        Ok(())
    }
}

/// Shapes of every tensor in an artifact, by dotted key path.
pub fn tensor_shapes(value: &PtValue) -> BTreeMap<String, serde_json::Value> {
    let mut out = BTreeMap::new();
    collect_shapes(value, String::new(), &mut out);
    out
}

fn collect_shapes(value: &PtValue, path: String, out: &mut BTreeMap<String, serde_json::Value>) {
    let join = |key: &str| {
        if path.is_empty() {
            key.to_string()
        } else {
            format!("{path}.{key}")
        }
    };
    match value {
        PtValue::Tensor(t) => {
            out.insert(path, serde_json::json!(t.shape));
        }
        PtValue::Dict(entries) => {
            for (key, v) in entries {
                collect_shapes(v, join(key), out);
            }
        }
        PtValue::List(items) => {
            let shapes: Vec<&Vec<usize>> = items
                .iter()
                .filter_map(|v| match v {
                    PtValue::Tensor(t) => Some(&t.shape),
                    _ => None,
                })
                .collect();
            if let (Some(first), Some(last)) = (shapes.first(), shapes.last()) {
                out.insert(
                    path,
                    serde_json::json!(format!("list of {}: {first:?} .. {last:?}", shapes.len())),
                );
            }
        }
        _ => {}
    }
}
