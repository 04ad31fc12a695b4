//! Gemma-2 as transformers defines it (`Gemma2ForCausalLM`, eager attention),
//! with a KV cache and capture hooks: [`Gemma2::forward_batch`] runs one pass
//! over a batch of sequences of any lengths (left padded, see
//! [`super::cache`]) and records the tensors a [`CaptureRequest`] asks for,
//! from the same pass; [`Gemma2::forward`] is the single-sequence form.

use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::Embedding;

use super::attention_softmax::AttentionSoftmax;
use super::cache::{KvCache, PassLayout};
use super::config::{Gemma2Config, LayerKind};
use super::decode_attention::{self, DecodeAttention};
use super::gelu_mul::{gelu_and_up, gelu_mul};
use super::norm::{NormPair, RmsNorm};
use super::rotary::{PassRotary, QkvHeads, Rotary};
use super::softcap::logit_softcap;
use super::weights::Weights;
use super::{bf16_weights, decode_projection, matvec};

/// What one layer records during a pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayerWants {
    /// `residual_in`, `after_attn`, `residual_out`.
    pub residual: bool,
    /// Attention probabilities averaged over the query heads.
    pub attention_mean: bool,
    /// Attention probabilities of every query head.
    pub attention_heads: bool,
    /// q/k/v projections and the MLP's up, gelu and down activations.
    pub projections: bool,
}

/// Which tensors to record, per layer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CaptureRequest {
    pub layers: Vec<LayerWants>,
}

/// Tensors recorded from one layer during one pass over `t` new columns,
/// still on the model's device and dtype except attention, which is f32.
/// From [`Gemma2::forward_batch`] they have a leading batch dimension
/// (`[b, t, width]`, attention `[b, t, context]` / `[b, heads, t, context]`);
/// [`BatchOutput::sequence`] selects one sequence's rows and real key
/// columns, without the batch dimension.
#[derive(Debug, Clone, Default)]
pub struct LayerRecord {
    pub residual_in: Option<Tensor>,
    pub after_attn: Option<Tensor>,
    pub residual_out: Option<Tensor>,
    /// `[t, context]`.
    pub attention_mean: Option<Tensor>,
    /// `[heads, t, context]`.
    pub attention_heads: Option<Tensor>,
    pub q_proj: Option<Tensor>,
    pub k_proj: Option<Tensor>,
    pub v_proj: Option<Tensor>,
    pub up_proj: Option<Tensor>,
    pub gelu: Option<Tensor>,
    pub down_proj: Option<Tensor>,
}

impl LayerRecord {
    /// Applies `f` to every recorded tensor, in field order.
    pub fn map(
        self,
        f: &mut impl FnMut(&Tensor) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Self> {
        let mut map = |x: Option<Tensor>| x.as_ref().map(&mut *f).transpose();
        Ok(Self {
            residual_in: map(self.residual_in)?,
            after_attn: map(self.after_attn)?,
            residual_out: map(self.residual_out)?,
            attention_mean: map(self.attention_mean)?,
            attention_heads: map(self.attention_heads)?,
            q_proj: map(self.q_proj)?,
            k_proj: map(self.k_proj)?,
            v_proj: map(self.v_proj)?,
            up_proj: map(self.up_proj)?,
            gelu: map(self.gelu)?,
            down_proj: map(self.down_proj)?,
        })
    }
}

/// A bias-free linear layer, `[out, in]` weights as in the checkpoint.
#[derive(Debug, Clone)]
struct Linear {
    weight: Tensor,
}

impl Linear {
    fn load(
        w: &mut Weights,
        name: &str,
        out_dim: usize,
        in_dim: usize,
    ) -> crate::error::Result<Self> {
        Ok(Self {
            weight: w.take(&format!("{name}.weight"), &[out_dim, in_dim])?,
        })
    }

    /// The checkpoint's `parts` (name, output size) stacked along the output
    /// axis, computed in one product: a layer's q/k/v projections, or its
    /// MLP's gate and up projections, all read the same input. One product
    /// instead of three (or two) is fewer kernel launches per decode step on
    /// a GPU and one pass over the activations on the CPU; each output
    /// element is the same dot product as before. The parts are taken out
    /// of `w`, so each layer's originals are freed as soon as they are
    /// stacked.
    fn stacked(
        w: &mut Weights,
        parts: &[(&str, usize)],
        in_dim: usize,
    ) -> crate::error::Result<Self> {
        let parts = parts
            .iter()
            .map(|(name, out_dim)| w.take(&format!("{name}.weight"), &[*out_dim, in_dim]))
            .collect::<crate::error::Result<Vec<_>>>()?;
        Ok(Self {
            weight: Tensor::cat(&parts, 0)?,
        })
    }

    /// `xs @ W^T` for `xs` of shape `[b, t, in]`.
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, k) = xs.dims3()?;
        project(&self.weight, &xs.reshape((b * t, k))?)?.reshape((b, t, ()))
    }
}

/// Largest number of activation rows for which `W @ X^T` is used on the CPU:
/// there it beat `X @ W^T` at every size measured up to 128 rows (decode
/// steps of a batch), see `matvec::tests::row_dot_speed`.
const WEIGHT_LEFT_MAX_ROWS: usize = 128;

/// `x @ w^T` for `x` `[n, in]` and row-major `w` `[out, in]`, returning
/// `[n, out]`: bf16-stored weights through [`bf16_weights`]; otherwise on
/// the CPU one vector (a batch-1 decode step) through the streaming
/// [`matvec::row_dot`], a few through `W @ X^T`, many (prompt passes)
/// through `X @ W^T`. On a GPU a decode step's few rows through
/// [`decode_projection`], more through `X @ W^T`: one product with the
/// weight read transposed, where `W @ X^T` would add a kernel to transpose
/// its result back.
fn project(w: &Tensor, x: &Tensor) -> candle_core::Result<Tensor> {
    let n = x.dim(0)?;
    if decode_projection::applies(x, w) {
        decode_projection::project(x, w)
    } else if bf16_weights::applies(x, w) {
        bf16_weights::project(x, w)
    } else if matvec::applies(x, w) {
        matvec::row_dot(x, w)
    } else if x.device().is_cpu() && n <= WEIGHT_LEFT_MAX_ROWS {
        w.matmul(&x.t()?)?.t()?.contiguous()
    } else {
        x.matmul(&w.t()?)
    }
}

#[derive(Debug, Clone)]
struct Attention {
    /// `q_proj`, `k_proj` and `v_proj` stacked: `[q_dim + 2 kv_dim, hidden]`.
    qkv_proj: Linear,
    o_proj: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    softmax: AttentionSoftmax,
    window: Option<usize>,
}

impl Attention {
    fn load(
        w: &mut Weights,
        prefix: &str,
        cfg: &Gemma2Config,
        kind: LayerKind,
    ) -> crate::error::Result<Self> {
        let (h, q_dim, kv_dim) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim());
        let part = |name: &str| format!("{prefix}.{name}");
        Ok(Self {
            qkv_proj: Linear::stacked(
                w,
                &[
                    (&part("q_proj"), q_dim),
                    (&part("k_proj"), kv_dim),
                    (&part("v_proj"), kv_dim),
                ],
                h,
            )?,
            o_proj: Linear::load(w, &format!("{prefix}.o_proj"), h, q_dim)?,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            softmax: AttentionSoftmax {
                scale: cfg.query_pre_attn_scalar.powf(-0.5),
                cap: cfg.attn_logit_softcapping,
            },
            window: (kind == LayerKind::Sliding).then_some(cfg.sliding_window),
        })
    }

    /// Attention over `xs` (`[b, t, hidden]`, already normalised).
    fn forward(
        &self,
        xs: &Tensor,
        pass: &PassContext,
        cache: &mut KvCache,
        layer: usize,
        wants: LayerWants,
        record: &mut LayerRecord,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = xs.dims3()?;
        let (heads, kv_heads) = (self.heads, self.kv_heads);
        let qkv = self.qkv_proj.forward(xs)?;
        if wants.projections {
            let (q_dim, kv_dim) = (heads * self.head_dim, kv_heads * self.head_dim);
            record.q_proj = Some(qkv.narrow(2, 0, q_dim)?);
            record.k_proj = Some(qkv.narrow(2, q_dim, kv_dim)?);
            record.v_proj = Some(qkv.narrow(2, q_dim + kv_dim, kv_dim)?);
        }
        // The query heads, then the key heads, then the value heads; the
        // keys and values go into the cache as they are rotated.
        let qkv = qkv.reshape((b, t, heads + 2 * kv_heads, self.head_dim))?;
        let qkv_heads = QkvHeads { heads, kv_heads };
        let (k, v) = pass.rotary.keys_values(&qkv, qkv_heads, cache, layer)?;
        let context = k.dim(2)?;
        let mask = match self.window {
            Some(_) => pass.sliding_mask.as_ref(),
            None => pass.full_mask.as_ref(),
        };
        // f32 probabilities when they are recorded, else straight in the
        // compute dtype for the product with the values.
        let recorded = wants.attention_heads || wants.attention_mean;
        let decode = DecodeAttention {
            softmax: self.softmax,
            heads: qkv_heads,
            split_from: decode_attention::split_from(),
        };
        if let Some(table) = pass.rotary.table()
            && pass.decode_attention
            && !recorded
            && decode.fits(context, self.head_dim)
        {
            return self
                .o_proj
                .forward(&decode.forward(&qkv, table, (&k, &v), mask)?);
        }
        let q = pass.rotary.queries(&qkv, qkv_heads)?;

        // Grouped-query attention without copying keys: the query heads that
        // share a key/value head are stacked along the row axis.
        let groups = self.heads / self.kv_heads;
        let q = q.reshape((b, self.kv_heads, groups * t, self.head_dim))?;
        let scores = q.matmul(&k.t()?)?.reshape((b, self.heads, t, context))?;
        // Scaling, soft-capping, the mask and the softmax in one operation.
        let out = if recorded { DType::F32 } else { v.dtype() };
        let probs = self.softmax.forward(&scores, mask, out)?;
        if wants.attention_heads {
            record.attention_heads = Some(probs.clone());
        }
        if wants.attention_mean {
            record.attention_mean = Some(probs.mean(1)?);
        }
        let probs = probs
            .to_dtype(v.dtype())?
            .reshape((b, self.kv_heads, groups * t, context))?;
        let out = probs.matmul(&v)?;
        let out = out
            .reshape((b, self.heads, t, self.head_dim))?
            .transpose(1, 2)?
            .reshape((b, t, self.heads * self.head_dim))?;
        self.o_proj.forward(&out)
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    /// `gate_proj` and `up_proj` stacked: `[2 intermediate, hidden]`.
    gate_up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn load(w: &mut Weights, prefix: &str, cfg: &Gemma2Config) -> crate::error::Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_up_proj: Linear::stacked(
                w,
                &[
                    (&format!("{prefix}.gate_proj"), i),
                    (&format!("{prefix}.up_proj"), i),
                ],
                h,
            )?,
            down_proj: Linear::load(w, &format!("{prefix}.down_proj"), h, i)?,
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        wants: LayerWants,
        record: &mut LayerRecord,
    ) -> candle_core::Result<Tensor> {
        let gate_up = self.gate_up_proj.forward(xs)?;
        if !wants.projections {
            return self.down_proj.forward(&gelu_mul(&gate_up)?);
        }
        let (gelu, up) = gelu_and_up(&gate_up)?;
        let down = self.down_proj.forward(&(&gelu * &up)?)?;
        record.up_proj = Some(up);
        record.gelu = Some(gelu);
        record.down_proj = Some(down.clone());
        Ok(down)
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    /// The post-attention norm, the residual addition and the
    /// pre-feedforward norm.
    post_attention_then_pre_feedforward: NormPair,
    mlp: Mlp,
    post_feedforward_layernorm: RmsNorm,
    /// The post-feedforward norm, the residual addition and the next
    /// layer's input norm; `None` for the last layer (see
    /// [`DecoderLayer::assemble`]).
    post_feedforward_then_next: Option<NormPair>,
}

/// A decoder layer's weights as loaded, before its norms are paired (see
/// [`DecoderLayer::assemble`]).
struct LayerParts {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    pre_feedforward_layernorm: RmsNorm,
    mlp: Mlp,
    post_feedforward_layernorm: RmsNorm,
}

impl DecoderLayer {
    fn load(w: &mut Weights, index: usize, cfg: &Gemma2Config) -> crate::error::Result<LayerParts> {
        let p = format!("model.layers.{index}");
        let norm = |w: &mut Weights, name: &str| {
            RmsNorm::load(
                w,
                &format!("{p}.{name}.weight"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )
        };
        Ok(LayerParts {
            input_layernorm: norm(w, "input_layernorm")?,
            self_attn: Attention::load(w, &format!("{p}.self_attn"), cfg, cfg.layer_kinds[index])?,
            post_attention_layernorm: norm(w, "post_attention_layernorm")?,
            pre_feedforward_layernorm: norm(w, "pre_feedforward_layernorm")?,
            mlp: Mlp::load(w, &format!("{p}.mlp"), cfg)?,
            post_feedforward_layernorm: norm(w, "post_feedforward_layernorm")?,
        })
    }

    /// The layers from their loaded parts, with each layer's norms paired:
    /// post-attention with pre-feedforward, post-feedforward with the next
    /// layer's input norm, so that a pass normalises the next block's
    /// input as it adds the residual. Done once every layer is loaded: the
    /// pairs' small allocations, made among the large transient ones of
    /// loading, kept glibc from returning about 360 MB of freed memory at
    /// gemma-2-2b's size.
    fn assemble(parts: Vec<LayerParts>) -> candle_core::Result<Vec<Self>> {
        let next_inputs: Vec<Option<RmsNorm>> = parts
            .iter()
            .skip(1)
            .map(|next| Some(next.input_layernorm.clone()))
            .chain([None])
            .collect();
        parts
            .into_iter()
            .zip(next_inputs)
            .map(|(p, next)| {
                Ok(Self {
                    post_attention_then_pre_feedforward: NormPair::new(
                        &p.post_attention_layernorm,
                        &p.pre_feedforward_layernorm,
                    )?,
                    post_feedforward_then_next: next
                        .map(|next| NormPair::new(&p.post_feedforward_layernorm, &next))
                        .transpose()?,
                    input_layernorm: p.input_layernorm,
                    self_attn: p.self_attn,
                    mlp: p.mlp,
                    post_feedforward_layernorm: p.post_feedforward_layernorm,
                })
            })
            .collect()
    }

    /// The layer over the residual stream; returns the stream after it.
    fn forward(
        &self,
        stream: Stream,
        pass: &PassContext,
        cache: &mut KvCache,
        layer: usize,
        wants: LayerWants,
        record: &mut LayerRecord,
    ) -> candle_core::Result<Stream> {
        let Stream { residual, normed } = stream;
        let xs = match normed {
            Some(normed) => normed,
            None => self.input_layernorm.forward(&residual)?,
        };
        let xs = self
            .self_attn
            .forward(&xs, pass, cache, layer, wants, record)?;
        // A paired norm's two outputs share one storage: a residual record
        // of a pass over many columns (a prompt) would hold twice its size
        // until the pass ends, so such passes run this layer's norms apart.
        // (The record of `residual_in` comes from the previous layer, which
        // pairs its norms unless it records too: in internals mode, one
        // extra `[b, t, hidden]` per chosen layer, beside its attention
        // heads and projections.)
        let apart = wants.residual && xs.dim(1)? > 1;
        let (after_attn, xs) = self
            .post_attention_then_pre_feedforward
            .forward(&xs, &residual, apart)?;
        if wants.residual {
            record.residual_in = Some(residual);
            record.after_attn = Some(after_attn.clone());
        }
        let xs = self.mlp.forward(&xs, wants, record)?;
        let (out, next) = match &self.post_feedforward_then_next {
            Some(pair) => {
                let (out, next) = pair.forward(&xs, &after_attn, apart)?;
                (out, Some(next))
            }
            None => (
                self.post_feedforward_layernorm
                    .forward_add(&xs, &after_attn)?,
                None,
            ),
        };
        if wants.residual {
            record.residual_out = Some(out.clone());
        }
        Ok(Stream {
            residual: out,
            normed: next,
        })
    }
}

/// The residual stream between two layers (`[b, t, hidden]`), and the
/// next layer's normalised input when the previous layer computed it with
/// its last norm (see [`NormPair`]).
struct Stream {
    residual: Tensor,
    normed: Option<Tensor>,
}

/// A Gemma-2 causal language model with capture hooks.
#[derive(Debug, Clone)]
pub struct Gemma2 {
    embed_tokens: Embedding,
    embedding_weight: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    rotary: Rotary,
    /// `sqrt(hidden_size)` in the compute dtype, scaling the embeddings.
    normalizer: Tensor,
    cfg: Gemma2Config,
    dtype: DType,
    device: Device,
    /// Whether decode steps use [`DecodeAttention`] on the CPU too (tests;
    /// it is for CUDA devices).
    decode_attention_on_cpu: bool,
}

impl Gemma2 {
    /// Builds the model from checkpoint weights, checking every name and
    /// shape. It takes the tensors it uses out of `weights`, so that
    /// stacking a layer's projections (see `Linear::stacked`) frees the
    /// originals as it goes instead of holding two copies until the end.
    pub fn new(cfg: &Gemma2Config, mut weights: Weights) -> crate::error::Result<Self> {
        let weights = &mut weights;
        let embedding_weight = weights.take(
            "model.embed_tokens.weight",
            &[cfg.vocab_size, cfg.hidden_size],
        )?;
        let parts = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::load(weights, i, cfg))
            .collect::<crate::error::Result<Vec<_>>>()?;
        let layers = DecoderLayer::assemble(parts)?;
        Ok(Self {
            embed_tokens: Embedding::new(embedding_weight.clone(), cfg.hidden_size),
            embedding_weight,
            layers,
            norm: RmsNorm::load(
                weights,
                "model.norm.weight",
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
            rotary: Rotary::new(cfg, weights.dtype(), weights.device())?,
            normalizer: Tensor::new(&[(cfg.hidden_size as f32).sqrt()], weights.device())?
                .to_dtype(weights.dtype())?,
            cfg: cfg.clone(),
            dtype: weights.dtype(),
            device: weights.device().clone(),
            decode_attention_on_cpu: false,
        })
    }

    /// Makes decode steps compute their attention as one operation on the
    /// CPU too, as they do on a GPU (see [`DecodeAttention`]).
    #[cfg(test)]
    pub(crate) fn with_decode_attention_on_cpu(mut self) -> Self {
        self.decode_attention_on_cpu = true;
        self
    }

    pub fn config(&self) -> &Gemma2Config {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The dtype the weight matrices are kept in: the compute dtype, or bf16
    /// as stored (see `weights::keeps_bf16`).
    pub fn matrix_dtype(&self) -> DType {
        self.embedding_weight.dtype()
    }

    /// A fresh, empty cache for `batch` sequences.
    pub fn new_cache(&self, batch: usize) -> KvCache {
        KvCache::new(self.layers.len(), batch)
    }

    /// Runs `tokens` (appended after the cached positions of a one-sequence
    /// cache) and returns the soft-capped f32 logits of the last position,
    /// `[vocab]`.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> candle_core::Result<Tensor> {
        let none = CaptureRequest::default();
        let out = self.forward_batch(&[tokens], cache, &none, Head::Logits)?;
        out.logits.expect("logits were asked for").i(0)
    }

    /// One pass over a batch: appends `tokens[i]` to sequence `i` of `cache`
    /// (any lengths, at least one token each) and returns what `head` asks
    /// for at each sequence's last position and the tensors `request` asks
    /// for.
    pub fn forward_batch(
        &self,
        tokens: &[&[u32]],
        cache: &mut KvCache,
        request: &CaptureRequest,
        head: Head,
    ) -> candle_core::Result<BatchOutput> {
        let lens: Vec<usize> = tokens.iter().map(|t| t.len()).collect();
        let layout = cache.layout(&lens)?;
        let (b, t) = (tokens.len(), layout.t);
        if let Some(longest) = (0..b).map(|i| cache.positions(i) + lens[i]).max()
            && longest > self.cfg.max_position_embeddings
        {
            candle_core::bail!(
                "context of {longest} tokens exceeds the model's {} positions",
                self.cfg.max_position_embeddings
            );
        }
        // Left padding with token 0 (its rows are never seen, see `cache`).
        let ids: Vec<u32> = tokens
            .iter()
            .flat_map(|seq| std::iter::repeat_n(0, t - seq.len()).chain(seq.iter().copied()))
            .collect();
        let ids = Tensor::from_vec(ids, (b, t), &self.device)?;
        let positions = cache.rotary_positions(&layout, &self.device)?;
        let pass = PassContext {
            rotary: self
                .rotary
                .for_pass(b, layout.start, t, positions.as_ref())?,
            full_mask: cache.mask(&layout, None, &self.device)?,
            sliding_mask: cache.mask(&layout, Some(self.cfg.sliding_window), &self.device)?,
            decode_attention: DecodeAttention::applies_to_pass(
                &self.device,
                t,
                self.decode_attention_on_cpu,
            ),
        };
        // The embedding may be stored in bf16 (see `weights::keeps_bf16`).
        let xs = self.embed_tokens.forward(&ids)?.to_dtype(self.dtype)?;
        let mut stream = Stream {
            residual: xs.broadcast_mul(&self.normalizer)?,
            normed: None,
        };
        let mut records = Vec::with_capacity(self.layers.len());
        for (i, layer) in self.layers.iter().enumerate() {
            let wants = request.layers.get(i).copied().unwrap_or_default();
            let mut record = LayerRecord::default();
            stream = layer.forward(stream, &pass, cache, i, wants, &mut record)?;
            records.push(record);
        }
        let xs = stream.residual;
        drop(pass);
        let logits = match head {
            Head::Skip => None,
            Head::Logits => {
                // Left padding puts every sequence's last token in the last
                // column.
                let last = xs.narrow(1, t - 1, 1)?.squeeze(1)?.contiguous()?;
                let last = self.norm.forward(&last)?;
                let logits = project(&self.embedding_weight, &last)?;
                Some(match self.cfg.final_logit_softcapping {
                    Some(cap) => logit_softcap(&logits, cap)?,
                    None => logits.to_dtype(DType::F32)?,
                })
            }
        };
        cache.commit(layout.clone());
        let real_columns = (0..b).map(|i| cache.real_columns(i)).collect();
        Ok(BatchOutput {
            logits,
            records,
            layout,
            real_columns,
            device: self.device.clone(),
        })
    }
}

/// What one pass shares across layers: positions and masks, built once.
struct PassContext {
    rotary: PassRotary,
    full_mask: Option<Tensor>,
    sliding_mask: Option<Tensor>,
    /// Whether the layers whose attention probabilities are not recorded
    /// compute their attention as one operation (see [`DecodeAttention`]).
    decode_attention: bool,
}

/// Whether a pass computes the logits at each sequence's last position
/// (see [`Gemma2::forward_batch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// The soft-capped logits.
    Logits,
    /// Nothing: every next token is already known (teacher forcing), so
    /// the LM head (a fifth of gemma-2-2b's weights) is not read.
    Skip,
}

/// The result of [`Gemma2::forward_batch`].
#[derive(Debug, Clone)]
pub struct BatchOutput {
    /// Soft-capped f32 logits of each sequence's last token, `[b, vocab]`,
    /// unless the pass skipped the head.
    pub logits: Option<Tensor>,
    /// One record per layer, with the batch dimension.
    pub records: Vec<LayerRecord>,
    pub layout: PassLayout,
    /// Per sequence, the cache columns (after the pass) holding real tokens.
    real_columns: Vec<Vec<u32>>,
    device: Device,
}

impl BatchOutput {
    /// An output built by hand (tests of code that consumes outputs).
    #[cfg(test)]
    pub(crate) fn for_tests(logits: Tensor, records: Vec<LayerRecord>, layout: PassLayout) -> Self {
        let real_columns = layout
            .new
            .iter()
            .map(|cols| {
                (0..cols.len() as u32)
                    .filter(|&c| cols[c as usize].is_some())
                    .collect()
            })
            .collect();
        Self {
            device: logits.device().clone(),
            logits: Some(logits),
            records,
            layout,
            real_columns,
        }
    }

    /// Where the pass ran.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Applies `f` to the logits (if any), then to every recorded tensor in
    /// layer order (e.g. to move them to the host).
    pub fn map_tensors(
        self,
        mut f: impl FnMut(&Tensor) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Self> {
        let logits = self.logits.as_ref().map(&mut f).transpose()?;
        let records = self
            .records
            .into_iter()
            .map(|r| r.map(&mut f))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            logits,
            records,
            layout: self.layout,
            real_columns: self.real_columns,
            device: self.device,
        })
    }

    /// Sequence `i`'s records of every layer: its own rows of the pass
    /// (padding dropped) and, for attention, only its real key columns, so
    /// they equal what the sequence alone would record.
    pub fn sequence(&self, i: usize) -> candle_core::Result<Vec<LayerRecord>> {
        let rows = self.layout.rows(i);
        let columns = &self.real_columns[i];
        let contiguous = columns.first().is_some_and(|&c| {
            columns
                .iter()
                .enumerate()
                .all(|(j, &x)| x as usize == c as usize + j)
        });
        // On the records' device: after `capture`'s transfer they are on the
        // host while the pass ran on a GPU.
        let records_device = self
            .records
            .iter()
            .find_map(|r| r.attention_heads.as_ref().or(r.attention_mean.as_ref()))
            .map_or(&self.device, Tensor::device);
        let key_index = if contiguous {
            None
        } else {
            Some(Tensor::new(columns.as_slice(), records_device)?)
        };
        let first_key = columns.first().copied().unwrap_or(0) as usize;
        let select_rows = |x: &Option<Tensor>| -> candle_core::Result<Option<Tensor>> {
            x.as_ref()
                .map(|x| x.i(i)?.narrow(0, rows.start, rows.len()))
                .transpose()
        };
        // Attention rows and real key columns; the last axis is keys.
        let select_attention = |x: &Option<Tensor>| -> candle_core::Result<Option<Tensor>> {
            let Some(x) = x else { return Ok(None) };
            let x = x.i(i)?;
            let query_axis = x.rank() - 2;
            let x = x.narrow(query_axis, rows.start, rows.len())?;
            let x = match &key_index {
                None => x.narrow(query_axis + 1, first_key, columns.len())?,
                Some(index) => x.contiguous()?.index_select(index, query_axis + 1)?,
            };
            Ok(Some(x))
        };
        self.records
            .iter()
            .map(|r| {
                Ok(LayerRecord {
                    residual_in: select_rows(&r.residual_in)?,
                    after_attn: select_rows(&r.after_attn)?,
                    residual_out: select_rows(&r.residual_out)?,
                    attention_mean: select_attention(&r.attention_mean)?,
                    attention_heads: select_attention(&r.attention_heads)?,
                    q_proj: select_rows(&r.q_proj)?,
                    k_proj: select_rows(&r.k_proj)?,
                    v_proj: select_rows(&r.v_proj)?,
                    up_proj: select_rows(&r.up_proj)?,
                    gelu: select_rows(&r.gelu)?,
                    down_proj: select_rows(&r.down_proj)?,
                })
            })
            .collect()
    }
}
