//! Assembling a prompt's trace into the nested dict/list/tensor structures of
//! the format reference (`gemma-2-2b-it-format.md`), in both capture modes.

use super::mode::CaptureMode;
use super::trace::{AttentionRows, LayerTrace, PromptTrace, Rows};
use crate::model::Gemma2Config;
use crate::pt::{PtTensor, PtValue, StoreDtype};

/// The `text`, `tokens` and `token_ids` of the prompt or the response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenTexts {
    pub text: String,
    pub tokens: Vec<String>,
    pub token_ids: Vec<u32>,
}

impl TokenTexts {
    fn entries(&self) -> Vec<(String, PtValue)> {
        vec![
            ("text".into(), PtValue::Str(self.text.clone())),
            (
                "tokens".into(),
                PtValue::List(self.tokens.iter().cloned().map(PtValue::Str).collect()),
            ),
            (
                "token_ids".into(),
                PtValue::List(
                    self.token_ids
                        .iter()
                        .map(|&id| PtValue::Int(i64::from(id)))
                        .collect(),
                ),
            ),
        ]
    }
}

fn dict(entries: Vec<(&str, PtValue)>) -> PtValue {
    PtValue::Dict(
        entries
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    )
}

/// Which positions of a trace make the prompt and the response: the prompt
/// pass covers positions `0..n`; response step `i` is the last position of its
/// pass, `n - 1 + i`.
#[derive(Debug, Clone, Copy)]
struct Span {
    prompt_len: usize,
    response_len: usize,
}

impl Span {
    fn of(trace: &PromptTrace) -> Self {
        Self {
            prompt_len: trace.prompt_len(),
            response_len: trace.response_ids.len(),
        }
    }

    fn response_position(&self, step: usize) -> usize {
        self.prompt_len - 1 + step
    }

    /// `[prompt_len, width]`.
    fn prompt(&self, rows: &Rows, store: StoreDtype) -> PtValue {
        let data = rows.range(0, self.prompt_len);
        PtValue::Tensor(PtTensor::from_f32(
            vec![self.prompt_len, rows.width],
            data,
            store,
        ))
    }

    /// [`Span::prompt`], taking the rows: stored in f32, their buffer
    /// becomes the tensor's data without a copy (the response's rows are
    /// dropped, so take them first).
    fn take_prompt(&self, rows: &mut Rows, store: StoreDtype) -> PtValue {
        let mut data = std::mem::take(&mut rows.data);
        data.truncate(self.prompt_len * rows.width);
        PtValue::Tensor(PtTensor::from_f32_vec(
            vec![self.prompt_len, rows.width],
            data,
            store,
        ))
    }

    /// The response rows stacked with `shape_of(response_len, width)`.
    fn response_stacked(
        &self,
        rows: &Rows,
        store: StoreDtype,
        shape: impl Fn(usize, usize) -> Vec<usize>,
    ) -> PtValue {
        let start = self.response_position(0);
        let data = rows.range(start, start + self.response_len);
        PtValue::Tensor(PtTensor::from_f32(
            shape(self.response_len, rows.width),
            data,
            store,
        ))
    }

    /// The response rows as a list of `[1, width]` tensors.
    fn response_list(&self, rows: &Rows, store: StoreDtype) -> PtValue {
        PtValue::List(
            (0..self.response_len)
                .map(|i| {
                    let row = rows.row(self.response_position(i));
                    PtValue::Tensor(PtTensor::from_f32(vec![1, rows.width], row, store))
                })
                .collect(),
        )
    }

    /// The prompt pass's attention matrix: `[N, N]` averaged, `[heads, N, N]`
    /// per head.
    fn prompt_attention(&self, rows: &AttentionRows, per_head: bool, store: StoreDtype) -> PtValue {
        square(rows, self.prompt_len, per_head, store)
    }

    /// One attention matrix per response step, over `N + i` positions.
    fn response_attention(
        &self,
        rows: &AttentionRows,
        per_head: bool,
        store: StoreDtype,
    ) -> PtValue {
        PtValue::List(
            (0..self.response_len)
                .map(|i| square(rows, self.prompt_len + i, per_head, store))
                .collect(),
        )
    }
}

fn square(rows: &AttentionRows, size: usize, per_head: bool, store: StoreDtype) -> PtValue {
    let shape = if per_head {
        vec![rows.heads, size, size]
    } else {
        vec![size, size]
    };
    // Written straight into the tensor: for long prompts these matrices
    // are most of the artifact.
    let mut tensor = PtTensor::zeros(shape, store);
    rows.write_square(size, |at, row| tensor.write_f32(at, row));
    PtValue::Tensor(tensor)
}

/// The names of the residual artifact's three tensors of a layer.
const RESIDUALS: [&str; 3] = ["residual_in", "after_attn", "residual_out"];

fn residual_rows(layer: &LayerTrace) -> [&Rows; 3] {
    [&layer.residual_in, &layer.after_attn, &layer.residual_out]
}

/// One layer's entry of an `activations` dict.
fn layer_activations(layer: usize, tensors: [PtValue; 3]) -> (String, PtValue) {
    let entries = RESIDUALS.into_iter().zip(tensors).collect();
    (layer.to_string(), dict(entries))
}

/// The residual-mode artifact `inference/raw/residual/{set}/{id}.pt`: three
/// residuals of every layer and head-averaged attention.
pub fn residual_artifact(
    trace: &PromptTrace,
    prompt: &TokenTexts,
    response: &TokenTexts,
    store: StoreDtype,
) -> PtValue {
    let span = Span::of(trace);
    let prompt_activations = trace
        .layers
        .iter()
        .map(|layer| {
            let tensors = residual_rows(layer).map(|rows| span.prompt(rows, store));
            layer_activations(layer.layer, tensors)
        })
        .collect();
    let response_activations = response_activations(trace, span, store);
    residual_value(
        trace,
        [prompt_activations, response_activations],
        prompt,
        response,
        store,
    )
}

/// [`residual_artifact`] taking the trace: stored in f32, the prompt's
/// rows (most of the artifact but its attention) become its tensors
/// without a copy.
pub fn residual_artifact_owned(
    mut trace: PromptTrace,
    prompt: &TokenTexts,
    response: &TokenTexts,
    store: StoreDtype,
) -> PtValue {
    let span = Span::of(&trace);
    let response_activations = response_activations(&trace, span, store);
    let prompt_activations = trace
        .layers
        .iter_mut()
        .map(|layer| {
            let rows = [
                &mut layer.residual_in,
                &mut layer.after_attn,
                &mut layer.residual_out,
            ];
            let tensors = rows.map(|rows| span.take_prompt(rows, store));
            layer_activations(layer.layer, tensors)
        })
        .collect();
    residual_value(
        &trace,
        [prompt_activations, response_activations],
        prompt,
        response,
        store,
    )
}

/// Every layer's stacked `[response_len, width]` residuals.
fn response_activations(
    trace: &PromptTrace,
    span: Span,
    store: StoreDtype,
) -> Vec<(String, PtValue)> {
    trace
        .layers
        .iter()
        .map(|layer| {
            let tensors = residual_rows(layer)
                .map(|rows| span.response_stacked(rows, store, |r, w| vec![r, w]));
            layer_activations(layer.layer, tensors)
        })
        .collect()
}

/// The residual artifact around the prompt's and the response's
/// `activations`, with the attention of `trace`.
fn residual_value(
    trace: &PromptTrace,
    activations: [Vec<(String, PtValue)>; 2],
    prompt: &TokenTexts,
    response: &TokenTexts,
    store: StoreDtype,
) -> PtValue {
    let span = Span::of(trace);
    let [prompt_activations, response_activations] = activations;
    let section = |is_prompt: bool, texts: &TokenTexts, activations| {
        let attention = trace
            .layers
            .iter()
            .map(|layer| {
                let t = if is_prompt {
                    span.prompt_attention(&layer.attention, false, store)
                } else {
                    span.response_attention(&layer.attention, false, store)
                };
                (format!("layer_{}", layer.layer), t)
            })
            .collect();
        let mut entries = texts.entries();
        entries.push(("activations".into(), PtValue::Dict(activations)));
        entries.push(("attention".into(), PtValue::Dict(attention)));
        PtValue::Dict(entries)
    };
    dict(vec![
        ("prompt", section(true, prompt, prompt_activations)),
        ("response", section(false, response, response_activations)),
    ])
}

/// A layer's position-wise rows as the internals artifact's prompt section
/// orders them: q, k, v; up, gelu, down; residual input, after attention,
/// output.
fn internals_rows(layer: &LayerTrace) -> [&Rows; 9] {
    [
        &layer.q_proj,
        &layer.k_proj,
        &layer.v_proj,
        &layer.up_proj,
        &layer.gelu,
        &layer.down_proj,
        &layer.residual_in,
        &layer.after_attn,
        &layer.residual_out,
    ]
}

/// The internals-mode artifact of one layer,
/// `inference/raw/internals/{set}/{id}_L{layer}.pt`.
pub fn internals_artifact(
    trace: &PromptTrace,
    layer: &LayerTrace,
    prompt: &TokenTexts,
    response: &TokenTexts,
    store: StoreDtype,
) -> PtValue {
    let span = Span::of(trace);
    let tensors = internals_rows(layer).map(|rows| span.prompt(rows, store));
    let response_section = internals_response(span, layer, response, store);
    internals_value(span, layer, tensors, response_section, prompt, store)
}

/// [`internals_artifact`] of `trace`'s layer `layer`, taking the trace:
/// stored in f32, the prompt's rows become its tensors without a copy.
///
/// # Panics
/// If `trace` has no layer `layer`.
pub fn internals_artifact_owned(
    trace: PromptTrace,
    layer: usize,
    prompt: &TokenTexts,
    response: &TokenTexts,
    store: StoreDtype,
) -> PtValue {
    let span = Span::of(&trace);
    let mut layer = trace
        .layers
        .into_iter()
        .find(|t| t.layer == layer)
        .expect("the layer is traced");
    let response_section = internals_response(span, &layer, response, store);
    let l = &mut layer;
    let rows = [
        &mut l.q_proj,
        &mut l.k_proj,
        &mut l.v_proj,
        &mut l.up_proj,
        &mut l.gelu,
        &mut l.down_proj,
        &mut l.residual_in,
        &mut l.after_attn,
        &mut l.residual_out,
    ];
    let tensors = rows.map(|rows| span.take_prompt(rows, store));
    internals_value(span, &layer, tensors, response_section, prompt, store)
}

/// The internals artifact: the prompt section around its `tensors`
/// (ordered as [`internals_rows`]) and `layer`'s attention, and the
/// response section.
fn internals_value(
    span: Span,
    layer: &LayerTrace,
    tensors: [PtValue; 9],
    response_section: PtValue,
    prompt: &TokenTexts,
    store: StoreDtype,
) -> PtValue {
    let attention = span.prompt_attention(&layer.attention, true, store);
    dict(vec![
        ("prompt", internals_section(prompt, tensors, attention)),
        ("response", response_section),
    ])
}

/// The internals artifact's response section: per-step lists of the
/// projections, stacked residuals and one attention matrix per step.
fn internals_response(
    span: Span,
    layer: &LayerTrace,
    response: &TokenTexts,
    store: StoreDtype,
) -> PtValue {
    let [q, k, v, up, gelu, down, input, after_attn, output] = internals_rows(layer);
    let l = |rows: &Rows| span.response_list(rows, store);
    let s = |rows: &Rows| span.response_stacked(rows, store, |r, w| vec![r, 1, w]);
    let tensors = [
        l(q),
        l(k),
        l(v),
        l(up),
        l(gelu),
        l(down),
        s(input),
        s(after_attn),
        s(output),
    ];
    let attention = span.response_attention(&layer.attention, true, store);
    internals_section(response, tensors, attention)
}

/// One section of the internals artifact: `texts`, then the `tensors`
/// (ordered as [`internals_rows`]) and `attention` grouped by module.
fn internals_section(texts: &TokenTexts, tensors: [PtValue; 9], attention: PtValue) -> PtValue {
    let [q, k, v, up, gelu, down, input, after_attn, output] = tensors;
    let mut entries = texts.entries();
    entries.push((
        "attention".into(),
        dict(vec![
            ("q_proj", q),
            ("k_proj", k),
            ("v_proj", v),
            ("attn_weights", attention),
        ]),
    ));
    entries.push((
        "mlp".into(),
        dict(vec![("up_proj", up), ("gelu", gelu), ("down_proj", down)]),
    ));
    entries.push((
        "residual".into(),
        dict(vec![
            ("input", input),
            ("after_attn", after_attn),
            ("output", output),
        ]),
    ));
    PtValue::Dict(entries)
}

/// Bytes of tensor data in the artifact of a prompt of `prompt_len` tokens
/// with a response of `response_len` tokens, stored in `store` (in
/// internals mode, one layer's artifact; the file adds headers, texts and
/// the pickle). Long runs are mostly attention matrices: the prompt's and
/// one per response step over `N + i` positions, so they grow with the
/// square of the prompt and the cube of the response.
pub fn artifact_data_bytes(
    cfg: &Gemma2Config,
    mode: &CaptureMode,
    prompt_len: usize,
    response_len: usize,
    store: StoreDtype,
) -> u64 {
    let (n, r) = (prompt_len as u64, response_len as u64);
    let squares = n * n + (0..r).map(|i| (n + i) * (n + i)).sum::<u64>();
    let hidden = cfg.hidden_size as u64;
    // Elements per position, and attention matrices per square.
    let (width, matrices) = match mode {
        CaptureMode::Residual => {
            let layers = cfg.num_hidden_layers as u64;
            (layers * 3 * hidden, layers)
        }
        CaptureMode::Internals { .. } => (
            (cfg.q_dim() + 2 * cfg.kv_dim() + 2 * cfg.intermediate_size) as u64 + 4 * hidden,
            cfg.num_attention_heads as u64,
        ),
    };
    (width * (n + r) + matrices * squares) * store.element_size() as u64
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;
    use crate::capture::batch_tests::tiny_on;
    use crate::capture::engine::{ResponsePlan, capture_prompt};

    /// The estimate behind `--batch-size auto` counts exactly the bytes of
    /// the tensors the artifacts hold.
    #[test]
    fn artifact_data_bytes_counts_what_artifacts_hold() {
        let (meta, model) = tiny_on(&Device::Cpu, DType::F32);
        let cfg = &meta.config;
        let prompt = meta
            .tokenizer
            .encode_prompt("Count the bytes of this artifact, please.")
            .unwrap();
        let replay = [5u32, 6, 7, 8, 9];
        let texts = TokenTexts {
            text: String::new(),
            tokens: Vec::new(),
            token_ids: Vec::new(),
        };
        for mode in [
            CaptureMode::Residual,
            CaptureMode::Internals { layers: vec![1] },
        ] {
            let request = mode.request(cfg.num_hidden_layers);
            let plan = ResponsePlan::Replay(&replay);
            let trace = capture_prompt(&model, &prompt, &request, plan, &mut || {}).unwrap();
            for store in [StoreDtype::F32, StoreDtype::BF16] {
                let value = match &mode {
                    CaptureMode::Residual => residual_artifact(&trace, &texts, &texts, store),
                    CaptureMode::Internals { .. } => {
                        let layer = trace.layer(1).unwrap();
                        internals_artifact(&trace, layer, &texts, &texts, store)
                    }
                };
                let mut held = 0u64;
                value
                    .try_map(&mut |t| {
                        held += t.data.len() as u64;
                        Ok::<_, ()>(())
                    })
                    .unwrap();
                let counted = artifact_data_bytes(cfg, &mode, prompt.len(), replay.len(), store);
                assert_eq!(counted, held, "{mode:?} {store}");
            }
        }
    }

    /// A trace of a short prompt and a 3-token replay on the tiny model,
    /// its prompt length, and placeholder texts.
    fn short_trace(mode: &CaptureMode) -> (PromptTrace, usize, TokenTexts) {
        let (meta, model) = tiny_on(&Device::Cpu, DType::F32);
        let prompt = meta.tokenizer.encode_prompt("Move, do not copy.").unwrap();
        let request = mode.request(meta.config.num_hidden_layers);
        let plan = ResponsePlan::Replay(&[5, 6, 7]);
        let trace = capture_prompt(&model, &prompt, &request, plan, &mut || {}).unwrap();
        let texts = TokenTexts {
            text: "t".into(),
            tokens: vec!["a".into()],
            token_ids: vec![1],
        };
        (trace, prompt.len(), texts)
    }

    /// Where the data of `value`'s tensors that `pick` accepts lives, in
    /// document order.
    fn data_addresses(value: PtValue, pick: impl Fn(&PtTensor) -> bool) -> Vec<usize> {
        let mut held = Vec::new();
        value
            .try_map(&mut |t| {
                if pick(&t) {
                    held.push(t.data.as_ptr() as usize);
                }
                Ok::<_, ()>(())
            })
            .unwrap();
        held
    }

    /// Taking the trace assembles the same value; in f32 the prompt's
    /// residual tensors hold the trace's own row buffers.
    #[test]
    fn an_owned_trace_assembles_the_same_artifact_without_copying_rows() {
        let (trace, prompt_len, texts) = short_trace(&CaptureMode::Residual);
        for store in [StoreDtype::F32, StoreDtype::BF16, StoreDtype::F16] {
            let borrowed = residual_artifact(&trace, &texts, &texts, store);
            let owned = residual_artifact_owned(trace.clone(), &texts, &texts, store);
            assert_eq!(owned, borrowed, "{store}");
        }
        let buffers: Vec<usize> = trace
            .layers
            .iter()
            .flat_map(|l| residual_rows(l).map(|rows| rows.data.as_ptr() as usize))
            .collect();
        assert_eq!(buffers.len(), 3 * trace.layers.len());
        let hidden = trace.layers[0].residual_in.width;
        let owned = residual_artifact_owned(trace, &texts, &texts, StoreDtype::F32);
        // The prompt's `[N, hidden]` tensors, in document order: layer by
        // layer, residual_in, after_attn, residual_out.
        let held = data_addresses(owned, |t| t.shape == [prompt_len, hidden]);
        assert_eq!(held, buffers, "the prompt tensors are the trace's buffers");
    }

    /// The same for one layer's internals: every prompt tensor but the
    /// attention matrices is the layer's own row buffer.
    #[test]
    fn an_owned_layer_assembles_the_same_internals_without_copying_rows() {
        let mode = CaptureMode::Internals { layers: vec![0, 1] };
        let (trace, _, texts) = short_trace(&mode);
        for store in [StoreDtype::F32, StoreDtype::BF16] {
            for l in [0, 1] {
                let layer = trace.layer(l).unwrap();
                let borrowed = internals_artifact(&trace, layer, &texts, &texts, store);
                let owned = internals_artifact_owned(trace.clone(), l, &texts, &texts, store);
                assert_eq!(owned, borrowed, "layer {l} {store}");
            }
        }
        let buffers: Vec<usize> = internals_rows(trace.layer(1).unwrap())
            .map(|rows| rows.data.as_ptr() as usize)
            .to_vec();
        let owned = internals_artifact_owned(trace, 1, &texts, &texts, StoreDtype::F32);
        let PtValue::Dict(sections) = owned else {
            panic!("a dict")
        };
        // Document order of the prompt section: q, k, v, the attention
        // matrix; up, gelu, down; the three residuals.
        let (_, prompt_section) = sections.into_iter().next().unwrap();
        let held = data_addresses(prompt_section, |t| t.shape.len() == 2);
        assert_eq!(held, buffers, "the prompt tensors are the layer's buffers");
    }
}
