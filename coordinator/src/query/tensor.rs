//! `ReadTensor`: one tensor, or a token range of it, from one artifact of
//! a run, found by key or by prompt set, id, mode and layer.

use std::ops::Range;

use capture_worker::pt::{PtDtype, PtTree};

use super::engine::{QueryEngine, ReadTotals, recorded_size};
use super::error::QueryError;
use super::reader::{ArtifactReader, ByteCounter, Phase, Sublayer};
use crate::queue::{ArtifactRow, RunId};

/// Most values one ReadTensor answer carries (16 MiB messages).
pub const MAX_TENSOR_VALUES: usize = 3_500_000;

/// Where a tensor query looks.
#[derive(Debug, Clone)]
pub enum ArtifactRef {
    Key(String),
    Prompt {
        prompt_set: String,
        prompt_id: String,
        mode: String,
        layer: Option<usize>,
    },
}

/// One tensor slice to read.
#[derive(Debug, Clone)]
pub struct TensorQuery {
    pub run: RunId,
    pub artifact: ArtifactRef,
    pub phase: Phase,
    /// Residual files: the `activations` layer.
    pub layer: Option<usize>,
    /// A sublayer name (residual files) or a dotted path below the phase.
    pub tensor: String,
    pub tokens: Option<Range<usize>>,
}

/// A tensor slice read back.
#[derive(Debug, Clone)]
pub struct TensorAnswer {
    pub key: String,
    pub path: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
    pub totals: ReadTotals,
}

impl QueryEngine {
    /// One tensor (or a token range of it) of one artifact.
    pub async fn read_tensor(&self, query: &TensorQuery) -> Result<TensorAnswer, QueryError> {
        let (_, store) = self.run(query.run).await?;
        let artifacts = self.artifacts(query.run).await?;
        let key = match &query.artifact {
            ArtifactRef::Key(key) => key.clone(),
            ArtifactRef::Prompt {
                prompt_set,
                prompt_id,
                mode,
                layer,
            } => documented_key(prompt_set, prompt_id, mode, *layer)?,
        };
        let Some(row) = artifacts.iter().find(|a| a.key == key) else {
            let known: Vec<_> = artifacts.iter().take(5).map(|a| a.key.as_str()).collect();
            return Err(QueryError::NotFound {
                what: "artifact",
                id: format!(
                    "{key} in run {} (it has {} artifacts, e.g. {})",
                    query.run,
                    artifacts.len(),
                    known.join(", ")
                ),
            });
        };
        let counter = ByteCounter::new();
        let reader =
            ArtifactReader::open_expecting(&store, &row.key, &counter, recorded_size(row)).await?;
        let path = tensor_path(row, query)?;
        let parts: Vec<&str> = path.iter().map(String::as_str).collect();
        let value = reader.value_at(&parts)?;
        let dotted = path.join(".");
        let (shape, values, dtype) = match value {
            PtTree::Tensor(tensor) => {
                let rows = tensor.shape().first().copied().unwrap_or(0);
                let range = token_range(query.tokens.clone(), rows, &dotted)?;
                let width: usize = tensor.shape().iter().skip(1).product();
                check_size(range.len() * width, &dotted)?;
                let dtype = tensor.dtype();
                let (shape, values) = reader.read_f32(tensor, Some(range)).await?;
                (shape, values, dtype)
            }
            PtTree::List(items) => {
                let range = token_range(query.tokens.clone(), items.len(), &dotted)?;
                let mut wanted = Vec::with_capacity(range.len());
                for index in range.clone() {
                    match &items[index] {
                        PtTree::Tensor(tensor) => wanted.push((tensor.clone(), None)),
                        other => {
                            return Err(QueryError::Invalid(format!(
                                "{dotted}[{index}] of {} is a {}, not a tensor",
                                row.key,
                                other.type_name()
                            )));
                        }
                    }
                }
                let Some((first, _)) = wanted.first() else {
                    return Err(QueryError::Invalid(format!(
                        "{dotted} of {} is empty in tokens {}..{}",
                        row.key, range.start, range.end
                    )));
                };
                let dtype = first.dtype();
                let item_shape = first.shape().to_vec();
                if let Some((odd, _)) = wanted.iter().find(|(t, _)| t.shape() != item_shape) {
                    return Err(QueryError::Invalid(format!(
                        "{dotted} of {} holds tensors of different shapes ({item_shape:?} and {:?}, attention grows with each token): ask for one token with a range of length 1",
                        row.key,
                        odd.shape()
                    )));
                }
                let total: usize = wanted.iter().map(|(t, _)| t.numel()).sum();
                check_size(total, &dotted)?;
                let read = reader.read_many(&wanted).await?;
                let mut shape = vec![read.len()];
                shape.extend(item_shape);
                (
                    shape,
                    read.into_iter().flat_map(|(_, v)| v).collect(),
                    dtype,
                )
            }
            other => {
                return Err(QueryError::Invalid(format!(
                    "{dotted} of {} is a {}, not a tensor or a list of tensors",
                    row.key,
                    other.type_name()
                )));
            }
        };
        Ok(TensorAnswer {
            key: row.key.clone(),
            path: dotted,
            dtype: dtype_name(dtype).to_owned(),
            shape,
            values,
            totals: ReadTotals {
                artifacts: 1,
                bytes_read: counter.bytes_read(),
                file_bytes: reader.file_bytes(),
                requests: counter.requests(),
            },
        })
    }
}

fn dtype_name(dtype: PtDtype) -> &'static str {
    match dtype {
        PtDtype::F32 => "f32",
        PtDtype::F16 => "f16",
        PtDtype::BF16 => "bf16",
        PtDtype::I64 => "i64",
    }
}

fn documented_key(
    prompt_set: &str,
    prompt_id: &str,
    mode: &str,
    layer: Option<usize>,
) -> Result<String, QueryError> {
    match (mode, layer) {
        ("residual", _) => Ok(format!(
            "inference/raw/residual/{prompt_set}/{prompt_id}.pt"
        )),
        ("internals", Some(layer)) => Ok(format!(
            "inference/raw/internals/{prompt_set}/{prompt_id}_L{layer}.pt"
        )),
        ("internals", None) => Err(QueryError::Invalid(
            "internals files hold one layer each: name it with --layer".to_owned(),
        )),
        (other, _) => Err(QueryError::Invalid(format!(
            "unknown capture mode {other:?}: use residual or internals"
        ))),
    }
}

/// The path of the asked tensor inside the artifact, phase first.
fn tensor_path(row: &ArtifactRow, query: &TensorQuery) -> Result<Vec<String>, QueryError> {
    let tensor = query.tensor.trim();
    if tensor.is_empty() {
        return Err(QueryError::Invalid(
            "name the tensor: a sublayer (residual_in, after_attn, residual_out), attention, or a dotted path such as mlp.gelu".to_owned(),
        ));
    }
    let mut path = vec![query.phase.as_str().to_owned()];
    if row.mode == "residual" {
        let need_layer = || {
            query.layer.ok_or_else(|| {
                QueryError::Invalid(format!(
                    "{tensor} of a residual file is per layer: name the layer with --layer"
                ))
            })
        };
        if tensor.parse::<Sublayer>().is_ok() {
            path.extend([
                "activations".to_owned(),
                need_layer()?.to_string(),
                tensor.to_owned(),
            ]);
            return Ok(path);
        }
        if tensor == "attention" {
            path.extend(["attention".to_owned(), format!("layer_{}", need_layer()?)]);
            return Ok(path);
        }
    } else if let Ok(sublayer) = tensor.parse::<Sublayer>() {
        path.extend(["residual".to_owned(), sublayer.internals_key().to_owned()]);
        return Ok(path);
    }
    for part in tensor.split('.') {
        if part.is_empty() {
            return Err(QueryError::Invalid(format!(
                "bad tensor path {tensor:?}: empty part"
            )));
        }
        path.push(part.to_owned());
    }
    Ok(path)
}

fn token_range(
    asked: Option<Range<usize>>,
    available: usize,
    what: &str,
) -> Result<Range<usize>, QueryError> {
    let range = asked.unwrap_or(0..available);
    if range.start > range.end || range.end > available {
        return Err(QueryError::Invalid(format!(
            "token range {}..{} is outside {what}, which has {available} tokens",
            range.start, range.end
        )));
    }
    Ok(range)
}

fn check_size(values: usize, what: &str) -> Result<(), QueryError> {
    if values > MAX_TENSOR_VALUES {
        return Err(QueryError::Invalid(format!(
            "{what} slice has {values} values, more than one answer carries ({MAX_TENSOR_VALUES}): ask for a narrower token range"
        )));
    }
    Ok(())
}
