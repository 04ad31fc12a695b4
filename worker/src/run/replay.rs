//! Replay (teacher forcing): finding the earlier capture's artifact of a
//! prompt and reading the response to capture on from it, with the checks
//! every replay shares (same prompt tokens, a non-empty response).

use std::path::PathBuf;

use super::residual_key;
use crate::error::{CaptureError, Result};
use crate::prompts::Prompt;
use crate::pt::{PtValue, read_pt_file};

/// Where an earlier capture lives: a local directory (`worker capture
/// --replay DIR`) or a run root in the object store (the pulling worker).
pub trait ReplaySource {
    /// The earlier artifact of prompt `prompt_id` of `set` and where it was
    /// read from (for messages); an `InvalidArgument` error naming the
    /// places looked at when there is none.
    fn artifact(&self, set: &str, prompt_id: &str) -> Result<(String, PtValue)>;
}

/// An earlier capture in a local directory.
#[derive(Debug, Clone)]
pub struct ReplayDir(pub PathBuf);

impl ReplaySource for ReplayDir {
    fn artifact(&self, set: &str, prompt_id: &str) -> Result<(String, PtValue)> {
        let dir = &self.0;
        let residual = dir.join(residual_key(set, prompt_id));
        let internals_dir = dir.join(internals_dir(set));
        let candidate = if residual.is_file() {
            Some(residual.clone())
        } else {
            std::fs::read_dir(&internals_dir).ok().and_then(|entries| {
                let names = entries
                    .filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().into_string().ok());
                first_internals_file(names, prompt_id).map(|name| internals_dir.join(name))
            })
        };
        let path = candidate.ok_or_else(|| {
            nothing_to_replay(
                set,
                prompt_id,
                &residual.display().to_string(),
                &internals_dir.display().to_string(),
            )
        })?;
        let value = read_pt_file(&path)?;
        Ok((path.display().to_string(), value))
    }
}

/// The folder of a set's internals artifacts, relative to a capture root.
pub fn internals_dir(set: &str) -> String {
    format!("inference/raw/internals/{set}")
}

/// Of the file names in a set's internals folder, the first (sorted) that is
/// an artifact of `prompt_id` (`{id}_L{layer}.pt`): every layer's file holds
/// the same tokens.
pub fn first_internals_file(
    names: impl IntoIterator<Item = String>,
    prompt_id: &str,
) -> Option<String> {
    let prefix = format!("{prompt_id}_L");
    names
        .into_iter()
        .filter(|name| {
            name.strip_prefix(&prefix)
                .and_then(|rest| rest.strip_suffix(".pt"))
                .is_some_and(|layer| layer.parse::<usize>().is_ok())
        })
        .min()
}

/// The error for a prompt without an earlier artifact; `residual` and
/// `internals_dir` name where it was looked for.
pub fn nothing_to_replay(
    set: &str,
    prompt_id: &str,
    residual: &str,
    internals_dir: &str,
) -> CaptureError {
    CaptureError::InvalidArgument(format!(
        "nothing to replay for prompt {prompt_id} of set {set}: neither {residual} nor {internals_dir}/{prompt_id}_L*.pt exists"
    ))
}

/// Response ids of `prompt` in the earlier capture, checked against this
/// capture's prompt tokens.
pub(super) fn replay_ids(
    source: &dyn ReplaySource,
    set: &str,
    prompt: &Prompt,
    prompt_ids: &[u32],
) -> Result<Vec<u32>> {
    let (location, value) = source.artifact(set, &prompt.id)?;
    let ids_at = |section: &str| -> Result<Vec<u32>> {
        value
            .get(section)
            .and_then(|s| s.get("token_ids"))
            .and_then(PtValue::as_list)
            .and_then(|items| {
                items
                    .iter()
                    .map(|v| v.as_int().and_then(|i| u32::try_from(i).ok()))
                    .collect::<Option<Vec<u32>>>()
            })
            .ok_or_else(|| {
                CaptureError::InvalidArgument(format!(
                    "{location} has no {section}.token_ids list: is it a capture artifact?"
                ))
            })
    };
    if ids_at("prompt")? != prompt_ids {
        return Err(CaptureError::InvalidArgument(format!(
            "{location} was captured on other prompt tokens than prompt {} here (another prompt text, tokenizer or chat template): replay needs the same prompt tokens",
            prompt.id
        )));
    }
    let response = ids_at("response")?;
    if response.is_empty() {
        return Err(CaptureError::InvalidArgument(format!(
            "{location} has an empty response to replay"
        )));
    }
    Ok(response)
}
