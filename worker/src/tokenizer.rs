//! The tokenizer side of the capture contract: prompts are encoded without
//! special tokens and `<bos>` is prepended; `tokens` are per-id decodings with
//! special tokens kept; response text skips special tokens.

use std::path::Path;

use crate::error::{CaptureError, Result};

/// A `tokenizer.json` tokenizer with the capture conventions.
#[derive(Debug, Clone)]
pub struct CaptureTokenizer {
    inner: tokenizers::Tokenizer,
    bos_id: u32,
}

impl CaptureTokenizer {
    pub fn from_file(path: &Path, bos_id: u32) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| CaptureError::Tokenizer(format!("cannot load {}: {e}", path.display())))?;
        Ok(Self { inner, bos_id })
    }

    /// `<bos>` followed by the encoding of `text`.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| CaptureError::Tokenizer(format!("cannot encode prompt: {e}")))?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        ids.push(self.bos_id);
        ids.extend_from_slice(encoding.get_ids());
        Ok(ids)
    }

    /// The decoding of each id on its own, special tokens kept.
    pub fn token_strings(&self, ids: &[u32]) -> Result<Vec<String>> {
        ids.iter()
            .map(|&id| {
                self.inner
                    .decode(&[id], false)
                    .map_err(|e| CaptureError::Tokenizer(format!("cannot decode token {id}: {e}")))
            })
            .collect()
    }

    /// The decoding of all ids, special tokens skipped.
    pub fn text(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| CaptureError::Tokenizer(format!("cannot decode response: {e}")))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
