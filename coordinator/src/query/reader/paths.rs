//! Names and paths inside the two documented layouts: [`Phase`],
//! [`Sublayer`] parsing, and the free functions that find tensors, texts and
//! layers in a [`PtSkeleton`] (the reader's methods of the same names add
//! the artifact's URL to their errors).

use std::fmt;
use std::str::FromStr;

use capture_worker::pt::{PtSkeleton, PtTree, TensorRef};

use super::LISTED_KEYS;

/// The two halves of a capture: the prompt pass and the generated response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    Prompt,
    Response,
}

impl Phase {
    pub const ALL: [Phase; 2] = [Phase::Prompt, Phase::Response];

    /// The artifact's top-level key.
    pub fn as_str(&self) -> &'static str {
        match self {
            Phase::Prompt => "prompt",
            Phase::Response => "response",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Phase {
    type Err = ParseNameError;

    fn from_str(s: &str) -> Result<Self, ParseNameError> {
        Phase::ALL
            .into_iter()
            .find(|phase| phase.as_str() == s)
            .ok_or_else(|| ParseNameError {
                kind: "phase",
                value: s.to_owned(),
                expected: "prompt or response",
            })
    }
}

/// Where in a layer a residual stream tensor was taken.
pub use crate::query::analysis::Sublayer;

impl Sublayer {
    /// The key in a layer internals file (`residual.{key}`).
    pub fn internals_key(&self) -> &'static str {
        match self {
            Sublayer::ResidualIn => "input",
            Sublayer::AfterAttn => "after_attn",
            Sublayer::ResidualOut => "output",
        }
    }
}

impl fmt::Display for Sublayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Sublayer {
    type Err = ParseNameError;

    fn from_str(s: &str) -> Result<Self, ParseNameError> {
        Sublayer::from_name(s).ok_or_else(|| ParseNameError {
            kind: "sublayer",
            value: s.to_owned(),
            expected: "residual_in, after_attn or residual_out",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {value:?}: use {expected}")]
pub struct ParseNameError {
    kind: &'static str,
    value: String,
    expected: &'static str,
}

/// A path that does not lead to what was asked for in an artifact's value.
/// Messages read as the predicate of a sentence about the artifact:
/// [`ReaderError::Path`] puts its URL in front.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Nothing at `path`; `present` says what there is instead.
    #[error("has no {path}; {present}")]
    Missing { path: String, present: String },
    /// Something of the wrong type at `path`.
    #[error("has {path} as a {found}, not a {expected}")]
    WrongType {
        path: String,
        expected: &'static str,
        found: &'static str,
    },
}

/// The residual stream tensor `{phase}.activations.{layer}.{sublayer}` of a
/// raw residual artifact (`[tokens, hidden]`).
pub fn residual_tensor(
    skeleton: &PtSkeleton,
    phase: Phase,
    layer: usize,
    sublayer: Sublayer,
) -> Result<&TensorRef, PathError> {
    let layer_key = layer.to_string();
    let path = [phase.as_str(), "activations", &layer_key, sublayer.as_str()];
    let activations = value_at(skeleton, &path[..2])?;
    if activations.get(&layer_key).is_none() && activations.as_dict().is_some() {
        let present = layers_of(activations);
        return Err(PathError::Missing {
            path: path.join("."),
            present: format!("layers present: {}", describe_layers(&present)),
        });
    }
    tensor_at(skeleton, &path)
}

/// The residual stream tensor `{phase}.residual.{input|after_attn|output}`
/// of a layer internals artifact (`[tokens, hidden]` for the prompt,
/// `[tokens, 1, hidden]` for the response).
pub fn internals_residual_tensor(
    skeleton: &PtSkeleton,
    phase: Phase,
    sublayer: Sublayer,
) -> Result<&TensorRef, PathError> {
    tensor_at(
        skeleton,
        &[phase.as_str(), "residual", sublayer.internals_key()],
    )
}

/// The tensor at `path`: dict keys, and list indices for lists (negative
/// ones count from the end, as in Python).
pub fn tensor_at<'a>(skeleton: &'a PtSkeleton, path: &[&str]) -> Result<&'a TensorRef, PathError> {
    let value = value_at(skeleton, path)?;
    value.as_tensor().ok_or_else(|| PathError::WrongType {
        path: path.join("."),
        expected: "tensor",
        found: value.type_name(),
    })
}

/// The value at `path`, as [`tensor_at`] walks it.
pub fn value_at<'a>(skeleton: &'a PtSkeleton, path: &[&str]) -> Result<&'a PtSkeleton, PathError> {
    let mut node = skeleton;
    for (depth, part) in path.iter().enumerate() {
        let here = || path[..=depth].join(".");
        let parent = || {
            if depth == 0 {
                "the top-level value".to_owned()
            } else {
                path[..depth].join(".")
            }
        };
        node = match node {
            PtTree::Dict(entries) => match entries.iter().find(|(key, _)| key == part) {
                Some((_, value)) => value,
                None => {
                    return Err(PathError::Missing {
                        path: here(),
                        present: describe_keys(entries),
                    });
                }
            },
            PtTree::List(items) | PtTree::Tuple(items) => {
                let index = part.parse::<i64>().ok().and_then(|i| {
                    let len = i64::try_from(items.len()).ok()?;
                    let i = if i < 0 { i + len } else { i };
                    usize::try_from(i).ok().filter(|&i| i < items.len())
                });
                match index {
                    Some(i) => &items[i],
                    None => {
                        return Err(PathError::Missing {
                            path: here(),
                            present: format!(
                                "{} is a {} of {} items",
                                parent(),
                                node.type_name(),
                                items.len()
                            ),
                        });
                    }
                }
            }
            other => {
                return Err(PathError::WrongType {
                    path: parent(),
                    expected: "dict or list",
                    found: other.type_name(),
                });
            }
        };
    }
    Ok(node)
}

/// The `text`, `tokens` and `token_ids` of one phase.
pub fn text_fields(
    skeleton: &PtSkeleton,
    phase: Phase,
) -> Result<(String, Vec<String>, Vec<i64>), PathError> {
    let section = phase.as_str();
    let text = value_at(skeleton, &[section, "text"])?;
    let text = text.as_str().ok_or_else(|| PathError::WrongType {
        path: format!("{section}.text"),
        expected: "str",
        found: text.type_name(),
    })?;
    let items = |key: &str| -> Result<&[PtSkeleton], PathError> {
        let value = value_at(skeleton, &[section, key])?;
        value.as_list().ok_or_else(|| PathError::WrongType {
            path: format!("{section}.{key}"),
            expected: "list",
            found: value.type_name(),
        })
    };
    let item_error = |key: &str, i: usize, expected, item: &PtSkeleton| PathError::WrongType {
        path: format!("{section}.{key}.{i}"),
        expected,
        found: item.type_name(),
    };
    let tokens = items("tokens")?
        .iter()
        .enumerate()
        .map(|(i, item)| {
            item.as_str()
                .map(str::to_owned)
                .ok_or_else(|| item_error("tokens", i, "str", item))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let token_ids = items("token_ids")?
        .iter()
        .enumerate()
        .map(|(i, item)| {
            item.as_int()
                .ok_or_else(|| item_error("token_ids", i, "int", item))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((text.to_owned(), tokens, token_ids))
}

/// The layer numbers of a raw residual artifact (the numeric keys of
/// `prompt.activations`, or of `response.activations` without a prompt),
/// ascending.
pub fn layers(skeleton: &PtSkeleton) -> Result<Vec<usize>, PathError> {
    let activations = value_at(skeleton, &["prompt", "activations"])
        .or_else(|err| value_at(skeleton, &["response", "activations"]).map_err(|_| err))?;
    if activations.as_dict().is_none() {
        return Err(PathError::WrongType {
            path: "prompt.activations".to_owned(),
            expected: "dict",
            found: activations.type_name(),
        });
    }
    Ok(layers_of(activations))
}

/// The numeric keys of a dict, ascending.
fn layers_of(activations: &PtSkeleton) -> Vec<usize> {
    let mut layers: Vec<usize> = activations
        .as_dict()
        .unwrap_or_default()
        .iter()
        .filter_map(|(key, _)| key.parse().ok())
        .collect();
    layers.sort_unstable();
    layers.dedup();
    layers
}

/// `0-3, 5, 7-9`; `none` for no layers.
pub(crate) fn describe_layers(layers: &[usize]) -> String {
    let mut runs: Vec<String> = Vec::new();
    let mut i = 0;
    while i < layers.len() {
        let start = layers[i];
        while i + 1 < layers.len() && layers[i + 1] == layers[i] + 1 {
            i += 1;
        }
        runs.push(if layers[i] == start {
            start.to_string()
        } else {
            format!("{start}-{}", layers[i])
        });
        i += 1;
    }
    if runs.is_empty() {
        "none".to_owned()
    } else {
        runs.join(", ")
    }
}

fn describe_keys(entries: &[(String, PtSkeleton)]) -> String {
    if entries.is_empty() {
        return "the dict is empty".to_owned();
    }
    let mut listed: Vec<&str> = entries
        .iter()
        .take(LISTED_KEYS)
        .map(|(key, _)| key.as_str())
        .collect();
    if entries.len() > LISTED_KEYS {
        listed.push("...");
    }
    format!("keys present: {}", listed.join(", "))
}
