//! Host-side traces of one prompt's capture: the rows each forward pass adds,
//! kept so that the prompt tensors, the per-step response tensors and the
//! growing response attention matrices can be assembled without recompute.

use candle_core::{CpuStorage, DType, Storage, Tensor};

use crate::model::{LayerRecord, LayerWants};

/// Position-wise activations of one tensor kind: `width` floats per position.
#[derive(Debug, Clone, Default)]
pub struct Rows {
    pub width: usize,
    /// Row-major `[positions, width]`.
    pub data: Vec<f32>,
}

impl Rows {
    pub fn positions(&self) -> usize {
        self.data.len().checked_div(self.width).unwrap_or(0)
    }

    /// Row `p`.
    pub fn row(&self, p: usize) -> &[f32] {
        &self.data[p * self.width..(p + 1) * self.width]
    }

    /// Rows `start..end`, row-major.
    pub fn range(&self, start: usize, end: usize) -> &[f32] {
        &self.data[start * self.width..end * self.width]
    }

    /// Appends a pass's `[t, width]` rows; the first pass reserves room for
    /// `expected` positions, so that later passes append without moving
    /// (and page-faulting) everything recorded so far.
    fn push(&mut self, tensor: &Tensor, expected: usize) -> candle_core::Result<()> {
        let (_, width) = tensor.dims2()?;
        self.width = width;
        if self.data.is_empty() {
            self.data.reserve_exact(expected * width);
        }
        // Straight from the tensor's memory when it is contiguous f32 or
        // bf16 (widened exactly) on the host, as records are once `capture`
        // moved them there, without an intermediate vector.
        let (storage, layout) = tensor.storage_and_layout();
        if let (Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) {
            match cpu {
                CpuStorage::F32(values) => {
                    self.data.extend_from_slice(&values[start..end]);
                    return Ok(());
                }
                CpuStorage::BF16(values) => {
                    self.data
                        .extend(values[start..end].iter().map(|v| v.to_f32()));
                    return Ok(());
                }
                _ => {}
            }
        }
        drop(storage);
        self.data.extend(to_host(tensor)?);
        Ok(())
    }
}

/// Attention probabilities by query position for `heads` matrices: row `p`
/// has the `p + 1`-or-more weights of the pass that computed it (the pass's
/// whole context); later keys are zero by causality.
#[derive(Debug, Clone, Default)]
pub struct AttentionRows {
    pub heads: usize,
    /// `rows[h][p]`: head `h`, query position `p`.
    pub rows: Vec<Vec<Vec<f32>>>,
}

impl AttentionRows {
    pub fn positions(&self) -> usize {
        self.rows.first().map_or(0, Vec::len)
    }

    /// The `[heads, size, size]` matrix of the pass whose context was `size`
    /// positions, row-major, zero-padded on the right.
    #[cfg(test)]
    pub fn square(&self, size: usize) -> Vec<f32> {
        let mut out = vec![0f32; self.heads * size * size];
        self.write_square(size, |at, row| out[at..at + row.len()].copy_from_slice(row));
        out
    }

    /// Hands `write` each stored part of [`AttentionRows::square`]'s matrix
    /// with the element index where it starts; the rest is zeros.
    pub fn write_square(&self, size: usize, mut write: impl FnMut(usize, &[f32])) {
        for (h, head_rows) in self.rows.iter().enumerate() {
            for (p, row) in head_rows.iter().take(size).enumerate() {
                let n = row.len().min(size);
                write((h * size + p) * size, &row[..n]);
            }
        }
    }

    /// Appends the rows of `[heads, t, context]` (or `[t, context]` for one
    /// averaged matrix).
    fn push(&mut self, tensor: &Tensor) -> candle_core::Result<()> {
        let tensor = if tensor.rank() == 2 {
            tensor.unsqueeze(0)?
        } else {
            tensor.clone()
        };
        let (heads, t, context) = tensor.dims3()?;
        if self.rows.is_empty() {
            self.heads = heads;
            self.rows = vec![Vec::new(); heads];
        }
        let data = to_host(&tensor)?;
        for (h, head_rows) in self.rows.iter_mut().enumerate() {
            for i in 0..t {
                let at = (h * t + i) * context;
                head_rows.push(data[at..at + context].to_vec());
            }
        }
        Ok(())
    }
}

/// Positions a trace reserves room for beyond the prompt: a long
/// `--max-new-tokens` that ends early at an end token must not reserve
/// gigabytes; longer responses grow the vectors as usual.
const RESERVED_RESPONSE_POSITIONS: usize = 256;

/// Everything recorded for one layer over all passes of one prompt.
#[derive(Debug, Clone, Default)]
pub struct LayerTrace {
    pub layer: usize,
    pub wants: LayerWants,
    /// Positions the rows reserve room for at the first pass.
    expected_positions: usize,
    pub residual_in: Rows,
    pub after_attn: Rows,
    pub residual_out: Rows,
    pub attention: AttentionRows,
    pub q_proj: Rows,
    pub k_proj: Rows,
    pub v_proj: Rows,
    pub up_proj: Rows,
    pub gelu: Rows,
    pub down_proj: Rows,
}

impl LayerTrace {
    /// A trace for a prompt of `prompt_len` tokens and up to `max_steps`
    /// response tokens, reserving its rows up front (bounded by
    /// [`RESERVED_RESPONSE_POSITIONS`]).
    pub fn for_prompt(
        layer: usize,
        wants: LayerWants,
        prompt_len: usize,
        max_steps: usize,
    ) -> Self {
        Self {
            layer,
            wants,
            expected_positions: prompt_len + max_steps.min(RESERVED_RESPONSE_POSITIONS),
            ..Self::default()
        }
    }

    /// Copies one pass's records of this layer to the host.
    pub fn push(&mut self, record: &LayerRecord) -> candle_core::Result<()> {
        let pairs = [
            (&mut self.residual_in, &record.residual_in),
            (&mut self.after_attn, &record.after_attn),
            (&mut self.residual_out, &record.residual_out),
            (&mut self.q_proj, &record.q_proj),
            (&mut self.k_proj, &record.k_proj),
            (&mut self.v_proj, &record.v_proj),
            (&mut self.up_proj, &record.up_proj),
            (&mut self.gelu, &record.gelu),
            (&mut self.down_proj, &record.down_proj),
        ];
        for (rows, tensor) in pairs {
            if let Some(tensor) = tensor {
                rows.push(tensor, self.expected_positions)?;
            }
        }
        if let Some(t) = record
            .attention_heads
            .as_ref()
            .or(record.attention_mean.as_ref())
        {
            self.attention.push(t)?;
        }
        Ok(())
    }
}

fn to_host(tensor: &Tensor) -> candle_core::Result<Vec<f32>> {
    tensor.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// One prompt's capture: its tokens, the response and the layer traces.
#[derive(Debug, Clone)]
pub struct PromptTrace {
    pub prompt_ids: Vec<u32>,
    pub response_ids: Vec<u32>,
    pub layers: Vec<LayerTrace>,
}

impl PromptTrace {
    pub fn prompt_len(&self) -> usize {
        self.prompt_ids.len()
    }

    pub fn layer(&self, layer: usize) -> Option<&LayerTrace> {
        self.layers.iter().find(|t| t.layer == layer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn attention_rows_assemble_growing_squares() {
        let mut rows = AttentionRows::default();
        // a 2-position prompt pass, then one decode step over 3 positions
        let prompt = Tensor::new(&[[1f32, 0.0], [0.5, 0.5]], &Device::Cpu).unwrap();
        rows.push(&prompt).unwrap();
        let step = Tensor::new(&[[0.2f32, 0.3, 0.5]], &Device::Cpu).unwrap();
        rows.push(&step).unwrap();
        assert_eq!(rows.square(2), vec![1.0, 0.0, 0.5, 0.5]);
        assert_eq!(
            rows.square(3),
            vec![1.0, 0.0, 0.0, 0.5, 0.5, 0.0, 0.2, 0.3, 0.5]
        );
    }

    #[test]
    fn rows_copy_views_and_other_dtypes_as_their_values() {
        let t = Tensor::new(
            &[[[1f32, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]],
            &Device::Cpu,
        )
        .unwrap();
        let mut rows = Rows::default();
        // A contiguous view into the middle of the storage (the second
        // sequence's last row), a strided view (a column), another dtype.
        rows.push(&t.get(1).unwrap().narrow(0, 1, 1).unwrap(), 3)
            .unwrap();
        rows.push(&t.get(0).unwrap().t().unwrap().narrow(0, 1, 1).unwrap(), 3)
            .unwrap();
        rows.push(
            &t.get(1)
                .unwrap()
                .narrow(0, 0, 1)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap(),
            3,
        )
        .unwrap();
        assert_eq!(rows.data, vec![7.0, 8.0, 2.0, 4.0, 5.0, 6.0]);
    }

    #[test]
    fn rows_append_passes() {
        let mut rows = Rows::default();
        rows.push(
            &Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap(),
            4,
        )
        .unwrap();
        assert!(rows.data.capacity() >= 8, "reserved for 4 positions");
        rows.push(&Tensor::new(&[[5f32, 6.0]], &Device::Cpu).unwrap(), 4)
            .unwrap();
        assert_eq!(rows.positions(), 3);
        assert_eq!(rows.row(2), &[5.0, 6.0]);
        assert_eq!(rows.range(1, 3), &[3.0, 4.0, 5.0, 6.0]);
    }
}
