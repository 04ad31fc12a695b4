//! Gemma-2's rotary position embedding, read straight from a layer's stacked
//! q/k/v projection, and the write of a pass's keys and values into the KV
//! cache:
//!
//! ```text
//! q          = rope(query heads)              [b, heads, t, head_dim]
//! cache.k[c] = rope(key heads)                columns c = start..start + t, in place
//! cache.v[c] = value heads
//! rope(x)[j]       = T(T(x[j] cos[j]) - T(x[j + d/2] sin[j]))
//! rope(x)[j + d/2] = T(T(x[j] sin[j]) + T(x[j + d/2] cos[j]))     j < d/2
//! ```
//!
//! This is candle's `rope` and transformers' `q * cos + rotate_half(q) * sin`.
//! With candle's operations a pass makes q, k and v contiguous (three copies
//! beyond a batch of one), rotates q and k (two kernels) and copies k and v
//! into the cache (two more); here it is two operations, one for the queries
//! and one in place on the cache's buffer (`capture_kernels::rotary_queries`,
//! `capture_kernels::rotary_keys_values` on a GPU, where a decode step waits
//! mostly for kernel launches). On the CPU the results are candle's bit for
//! bit (the same operations in T's arithmetic; test
//! `fused_rotary_equals_candles_operations_bit_for_bit`), and so are the CUDA
//! kernels' (`capture::gpu_tests`; `kernels/tests/host_emulation.cu`).
//!
//! `CAPTURE_UNFUSED=1` selects candle's operations instead (see
//! [`super::fused`]).

use std::ops::{Add, Mul, Sub};

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp2, DType, Device, InplaceOp3, Layout, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

pub use capture_kernels::QkvHeads;

use super::cache::{KvCache, KvShape};
use super::config::Gemma2Config;
use super::fused::{contiguous, unfused};

/// The operations' name in errors.
const NAME: &str = "rotary";

/// Rotary tables for every position: `[max_positions, head_dim]` with each
/// position's cos in the first half and its sin in the second, or, for
/// candle's operations, the two halves apart.
#[derive(Debug, Clone)]
pub struct Rotary {
    tables: Tables,
}

#[derive(Debug, Clone)]
enum Tables {
    /// `[rows, head_dim]`: cos, then sin.
    Fused(Tensor),
    /// `[rows, head_dim / 2]` each.
    Unfused { cos: Tensor, sin: Tensor },
}

impl Tables {
    /// Rows `start..start + t`, or `positions` (`[b * t]`) as `[b, t, _]`.
    fn rows(
        &self,
        b: usize,
        start: usize,
        t: usize,
        positions: Option<&Tensor>,
    ) -> candle_core::Result<Self> {
        let select = |x: &Tensor| match positions {
            None => x.narrow(0, start, t),
            Some(ids) => x.index_select(ids, 0)?.reshape((b, t, ())),
        };
        Ok(match self {
            Self::Fused(table) => Self::Fused(select(table)?),
            Self::Unfused { cos, sin } => Self::Unfused {
                cos: select(cos)?,
                sin: select(sin)?,
            },
        })
    }
}

impl Rotary {
    pub fn new(cfg: &Gemma2Config, dtype: DType, device: &Device) -> candle_core::Result<Self> {
        let half = cfg.head_dim / 2;
        // f32 arithmetic, as transformers computes the tables.
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / (cfg.rope_theta as f32).powf((2 * i) as f32 / cfg.head_dim as f32))
            .collect();
        let positions = cfg.max_position_embeddings;
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            for f in &inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (positions, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (positions, half), device)?.to_dtype(dtype)?;
        let tables = if unfused() {
            Tables::Unfused { cos, sin }
        } else {
            Tables::Fused(Tensor::cat(&[&cos, &sin], 1)?)
        };
        Ok(Self { tables })
    }

    /// The tables of one pass's positions: rows `start..start+t` when
    /// `positions` is `None`, else `positions` (`[b * t]`, see
    /// [`KvCache::rotary_positions`]) as `[b, t, _]`. Selected once per
    /// pass: every layer rotates at the same positions.
    pub fn for_pass(
        &self,
        b: usize,
        start: usize,
        t: usize,
        positions: Option<&Tensor>,
    ) -> candle_core::Result<PassRotary> {
        Ok(PassRotary {
            tables: self.tables.rows(b, start, t, positions)?,
        })
    }
}

/// The rotary tables at one pass's positions (see [`Rotary::for_pass`]).
pub struct PassRotary {
    tables: Tables,
}

impl PassRotary {
    /// The pass's rows of the fused table (`[t, d]`, or `[b, t, d]` per
    /// sequence: cos, then sin), or `None` with `CAPTURE_UNFUSED=1`.
    pub fn table(&self) -> Option<&Tensor> {
        match &self.tables {
            Tables::Fused(table) => Some(table),
            Tables::Unfused { .. } => None,
        }
    }

    /// The rotated query heads of `qkv` (`[b, t, heads + 2 kv_heads,
    /// head_dim]`), `[b, heads, t, head_dim]`.
    pub fn queries(&self, qkv: &Tensor, heads: QkvHeads) -> candle_core::Result<Tensor> {
        match &self.tables {
            Tables::Fused(table) => qkv
                .contiguous()?
                .apply_op2_no_bwd(table, &Queries { heads }),
            Tables::Unfused { cos, sin } => {
                let q = qkv.narrow(2, 0, heads.heads)?.transpose(1, 2)?;
                candle_nn::rotary_emb::rope(&q.contiguous()?, cos, sin)
            }
        }
    }

    /// Rotates the key heads of `qkv` (see [`PassRotary::queries`]) and
    /// writes them, with the value heads, into `layer`'s buffer of `cache`
    /// at the pass's columns; returns every cached key and value of the
    /// layer (views, `[b, kv_heads, columns, head_dim]` each).
    pub fn keys_values(
        &self,
        qkv: &Tensor,
        heads: QkvHeads,
        cache: &mut KvCache,
        layer: usize,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (_, t, _, head_dim) = qkv.dims4()?;
        match &self.tables {
            Tables::Fused(table) => {
                let shape = KvShape {
                    kv_heads: heads.kv_heads,
                    head_dim,
                    dtype: qkv.dtype(),
                };
                let slot = cache.slot(layer, t, shape, qkv.device())?;
                let op = KeysValues {
                    heads,
                    start: slot.start,
                };
                slot.buffer.inplace_op3(&qkv.contiguous()?, table, &op)?;
                slot.cached()
            }
            Tables::Unfused { cos, sin } => {
                let k = qkv
                    .narrow(2, heads.heads, heads.kv_heads)?
                    .transpose(1, 2)?;
                let k = candle_nn::rotary_emb::rope(&k.contiguous()?, cos, sin)?;
                let v = qkv
                    .narrow(2, heads.heads + heads.kv_heads, heads.kv_heads)?
                    .transpose(1, 2)?;
                cache.append(layer, &k, &v)
            }
        }
    }
}

/// `(b, t, head_dim, table batched)` of a pass, checking `qkv` (`[b, t,
/// heads + 2 kv_heads, head_dim]`) against `heads` and the table (`[t,
/// head_dim]`, or `[b, t, head_dim]` for per-sequence positions).
fn pass_dims(
    qkv: &Layout,
    table: &Layout,
    heads: QkvHeads,
) -> candle_core::Result<(usize, usize, usize, bool)> {
    let &[b, t, total, d] = qkv.dims() else {
        candle_core::bail!("{NAME}: qkv {:?}, not [b, t, heads, head_dim]", qkv.dims());
    };
    if total != heads.total() || !d.is_multiple_of(2) {
        candle_core::bail!("{NAME}: qkv {:?} for {heads:?}", qkv.dims());
    }
    let batched = match table.dims() {
        [rows, width] if (*rows, *width) == (t, d) => false,
        [tb, rows, width] if (*tb, *rows, *width) == (b, t, d) => true,
        other => candle_core::bail!("{NAME}: table {other:?} for qkv {:?}", qkv.dims()),
    };
    Ok((b, t, d, batched))
}

/// The arithmetic candle's `rope` computes in (T's own: each product and
/// sum rounded to T).
trait RopeValue: WithDType + Mul<Output = Self> + Sub<Output = Self> + Add<Output = Self> {}
impl<T: WithDType + Mul<Output = T> + Sub<Output = T> + Add<Output = T>> RopeValue for T {}

/// Rotates the head row `x` into `out` with the table row `table` (cos,
/// then sin), as candle's CPU `rope` does.
fn rotate<T: RopeValue>(x: &[T], table: &[T], out: &mut [T]) {
    let half = x.len() / 2;
    let (cos, sin) = table.split_at(half);
    for j in 0..half {
        let (x1, x2) = (x[j], x[j + half]);
        out[j] = x1 * cos[j] - x2 * sin[j];
        out[j + half] = x1 * sin[j] + x2 * cos[j];
    }
}

/// Row-major `[b, t, heads + 2 kv_heads, d]` and its table, on the CPU.
struct CpuPass<'a, T> {
    qkv: &'a [T],
    table: &'a [T],
    t: usize,
    d: usize,
    total: usize,
    batched: bool,
}

impl<T> CpuPass<'_, T> {
    fn head(&self, batch: usize, query: usize, head: usize) -> &[T] {
        &self.qkv[((batch * self.t + query) * self.total + head) * self.d..][..self.d]
    }

    fn table_row(&self, batch: usize, query: usize) -> &[T] {
        let row = if self.batched { batch * self.t } else { 0 } + query;
        &self.table[row * self.d..][..self.d]
    }
}

/// Elements written above which the CPU implementations work in parallel:
/// a rotation is a few operations per element, so below this the wake-up of
/// rayon's threads costs more than it saves (a decode step's rows are
/// rotated one after the other, as candle's `rope` does at one position).
const PARALLEL_ELEMENTS: usize = 1 << 16;

/// The query rotation: `(qkv, table)` through [`CustomOp2`].
pub(crate) struct Queries {
    pub heads: QkvHeads,
}

impl Queries {
    fn cpu_rows<T: RopeValue>(
        &self,
        qkv: (&CpuStorage, &Layout),
        table: (&CpuStorage, &Layout),
    ) -> candle_core::Result<CpuStorage> {
        let (_, t, d, batched) = pass_dims(qkv.1, table.1, self.heads)?;
        let pass = CpuPass {
            qkv: contiguous(qkv.0.as_slice::<T>()?, qkv.1, NAME)?,
            table: contiguous(table.0.as_slice::<T>()?, table.1, NAME)?,
            t,
            d,
            total: self.heads.total(),
            batched,
        };
        let rows = pass.qkv.len() / (pass.total * d) * self.heads.heads;
        let mut out = vec![T::zero(); rows * d];
        // Output rows in `[b, heads, t]` order.
        let row = |(r, out): (usize, &mut [T])| {
            let (query, head, batch) = (r % t, r / t % self.heads.heads, r / t / self.heads.heads);
            rotate(
                pass.head(batch, query, head),
                pass.table_row(batch, query),
                out,
            );
        };
        if out.len() > PARALLEL_ELEMENTS {
            out.par_chunks_mut(d).enumerate().for_each(row);
        } else {
            out.chunks_mut(d).enumerate().for_each(row);
        }
        Ok(WithDType::to_cpu_storage_owned(out))
    }
}

impl CustomOp2 for Queries {
    fn name(&self) -> &'static str {
        "capture-rotary-queries"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, t, d, _) = pass_dims(l1, l2, self.heads)?;
        let storage = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => self.cpu_rows::<f32>((s1, l1), (s2, l2))?,
            (CpuStorage::BF16(_), CpuStorage::BF16(_)) => {
                self.cpu_rows::<half::bf16>((s1, l1), (s2, l2))?
            }
            (CpuStorage::F16(_), CpuStorage::F16(_)) => {
                self.cpu_rows::<half::f16>((s1, l1), (s2, l2))?
            }
            _ => candle_core::bail!("{NAME}: qkv {:?}, table {:?}", s1.dtype(), s2.dtype()),
        };
        Ok((storage, Shape::from((b, self.heads.heads, t, d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (b, t, d, _) = pass_dims(l1, l2, self.heads)?;
        let out = capture_kernels::rotary_queries((s1, l1), (s2, l2), self.heads)?;
        Ok((out, Shape::from((b, self.heads.heads, t, d))))
    }
}

/// The key rotation and the write of keys and values into a cache buffer
/// `[2, b, kv_heads, capacity, head_dim]` from column `start` on:
/// `(buffer, qkv, table)` through [`InplaceOp3`].
pub(crate) struct KeysValues {
    pub heads: QkvHeads,
    pub start: usize,
}

impl KeysValues {
    fn cpu_write<T: RopeValue>(
        &self,
        buffer: (&mut [T], &Layout),
        qkv: (&CpuStorage, &Layout),
        table: (&CpuStorage, &Layout),
    ) -> candle_core::Result<()> {
        let (b, t, d, batched) = pass_dims(qkv.1, table.1, self.heads)?;
        let kv_heads = self.heads.kv_heads;
        let capacity = match buffer.1.dims() {
            &[2, bb, kh, capacity, bd] if (bb, kh, bd) == (b, kv_heads, d) => capacity,
            other => {
                candle_core::bail!("{NAME}: cache buffer {other:?} for qkv {:?}", qkv.1.dims())
            }
        };
        let whole = buffer.1.shape().elem_count();
        if self.start + t > capacity || buffer.1.contiguous_offsets() != Some((0, whole)) {
            candle_core::bail!(
                "{NAME}: {t} columns from {} into a cache buffer {:?}",
                self.start,
                buffer.1.dims()
            );
        }
        let pass = CpuPass {
            qkv: contiguous(qkv.0.as_slice::<T>()?, qkv.1, NAME)?,
            table: contiguous(table.0.as_slice::<T>()?, table.1, NAME)?,
            t,
            d,
            total: self.heads.total(),
            batched,
        };
        // One chunk of `capacity` columns per (keys or values, sequence,
        // head), in the buffer's order.
        let chunk = |(e, columns): (usize, &mut [T])| {
            let (head, batch, values) = (e % kv_heads, e / kv_heads % b, e / kv_heads / b == 1);
            for query in 0..t {
                let out = &mut columns[(self.start + query) * d..][..d];
                if values {
                    out.copy_from_slice(pass.head(
                        batch,
                        query,
                        self.heads.heads + kv_heads + head,
                    ));
                } else {
                    let x = pass.head(batch, query, self.heads.heads + head);
                    rotate(x, pass.table_row(batch, query), out);
                }
            }
        };
        let buffer = &mut buffer.0[..whole];
        if 2 * b * kv_heads * t * d > PARALLEL_ELEMENTS {
            buffer
                .par_chunks_mut(capacity * d)
                .enumerate()
                .for_each(chunk);
        } else {
            buffer.chunks_mut(capacity * d).enumerate().for_each(chunk);
        }
        Ok(())
    }
}

impl InplaceOp3 for KeysValues {
    fn name(&self) -> &'static str {
        "capture-rotary-keys-values"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        let (qkv, table) = ((s2, l2), (s3, l3));
        match (s1, s2, s3) {
            (CpuStorage::F32(buffer), CpuStorage::F32(_), CpuStorage::F32(_)) => {
                self.cpu_write::<f32>((buffer, l1), qkv, table)
            }
            (CpuStorage::BF16(buffer), CpuStorage::BF16(_), CpuStorage::BF16(_)) => {
                self.cpu_write::<half::bf16>((buffer, l1), qkv, table)
            }
            (CpuStorage::F16(buffer), CpuStorage::F16(_), CpuStorage::F16(_)) => {
                self.cpu_write::<half::f16>((buffer, l1), qkv, table)
            }
            (buffer, _, _) => candle_core::bail!(
                "{NAME}: cache buffer {:?}, qkv {:?}, table {:?}",
                buffer.dtype(),
                s2.dtype(),
                s3.dtype()
            ),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        capture_kernels::rotary_keys_values((s1, l1), (s2, l2), (s3, l3), self.heads, self.start)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, IndexOp, Tensor};

    use crate::model::fused::tests::{bits, random};

    use super::{KeysValues, QkvHeads, Queries};

    /// candle's `rope` of heads `first..first + count` of `qkv`.
    fn candle_rope(qkv: &Tensor, first: usize, count: usize, table: &Tensor) -> Tensor {
        let half = qkv.dim(3).unwrap() / 2;
        let last = table.rank() - 1;
        let (cos, sin) = (
            table.narrow(last, 0, half).unwrap().contiguous().unwrap(),
            table
                .narrow(last, half, half)
                .unwrap()
                .contiguous()
                .unwrap(),
        );
        let x = qkv
            .narrow(2, first, count)
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        candle_nn::rotary_emb::rope(&x.contiguous().unwrap(), &cos, &sin).unwrap()
    }

    #[test]
    fn fused_rotary_equals_candles_operations_bit_for_bit() {
        // (b, t, heads, kv_heads, d, table per sequence, capacity, start):
        // a prompt pass large enough to run in parallel, a small one, decode
        // steps of a batch and of one sequence, odd head counts.
        let cases = [
            (2, 40, 8, 4, 256, true, 45, 3),
            (2, 5, 8, 4, 16, true, 9, 0),
            (3, 1, 8, 4, 256, true, 12, 7),
            (1, 1, 4, 2, 8, false, 6, 5),
            (1, 4, 3, 1, 6, false, 4, 0),
        ];
        for (seed, (b, t, heads, kv_heads, d, batched, capacity, start)) in
            cases.into_iter().enumerate()
        {
            let seed = seed as u64 * 10;
            let table_shape = if batched { vec![b, t, d] } else { vec![t, d] };
            let qkv_heads = QkvHeads { heads, kv_heads };
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let what = format!("{dtype:?} b {b} t {t} heads {heads}/{kv_heads} d {d}");
                let qkv = random(&[b, t, heads + 2 * kv_heads, d], seed + 1, 2.0)
                    .to_dtype(dtype)
                    .unwrap();
                let table = random(&table_shape, seed + 2, 2.0).to_dtype(dtype).unwrap();
                let q = qkv
                    .apply_op2_no_bwd(&table, &Queries { heads: qkv_heads })
                    .unwrap();
                assert_eq!(q.dims(), [b, heads, t, d]);
                assert_eq!(
                    bits(&q),
                    bits(&candle_rope(&qkv, 0, heads, &table)),
                    "{what}"
                );

                let buffer = random(&[2, b, kv_heads, capacity, d], seed + 3, 2.0)
                    .to_dtype(dtype)
                    .unwrap();
                let before = buffer.copy().unwrap();
                let op = KeysValues {
                    heads: qkv_heads,
                    start,
                };
                buffer.inplace_op3(&qkv, &table, &op).unwrap();
                let k = candle_rope(&qkv, heads, kv_heads, &table);
                let v = qkv
                    .narrow(2, heads + kv_heads, kv_heads)
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap();
                let written = |i: usize| buffer.i(i).unwrap().narrow(2, start, t).unwrap();
                assert_eq!(bits(&written(0)), bits(&k), "keys, {what}");
                assert_eq!(bits(&written(1)), bits(&v), "values, {what}");
                // Every other column is as it was.
                let kept = |x: &Tensor| {
                    let end = start + t;
                    let before = x.narrow(3, 0, start).unwrap();
                    let after = x.narrow(3, end, capacity - end).unwrap();
                    (bits(&before), bits(&after))
                };
                assert_eq!(kept(&buffer), kept(&before), "other columns, {what}");
            }
        }
    }

    #[test]
    fn mismatched_shapes_are_errors_not_writes_out_of_bounds() {
        let heads = QkvHeads {
            heads: 4,
            kv_heads: 2,
        };
        let qkv = random(&[2, 3, 8, 8], 1, 2.0);
        let err = |r: candle_core::Result<()>| r.unwrap_err().to_string();
        // three columns from column 4 of a buffer of 6
        let buffer = random(&[2, 2, 2, 6, 8], 2, 2.0);
        let op = KeysValues { heads, start: 4 };
        let e = err(buffer.inplace_op3(&qkv, &random(&[3, 8], 3, 2.0), &op));
        assert!(e.contains("3 columns from 4"), "{e}");
        // a table for other positions, a buffer for other heads
        let op = KeysValues { heads, start: 0 };
        let e = err(buffer.inplace_op3(&qkv, &random(&[4, 8], 3, 2.0), &op));
        assert!(e.contains("table [4, 8]"), "{e}");
        let e =
            err(random(&[2, 2, 3, 6, 8], 4, 2.0).inplace_op3(&qkv, &random(&[3, 8], 3, 2.0), &op));
        assert!(e.contains("cache buffer [2, 2, 3, 6, 8]"), "{e}");
        // a view of a buffer rather than its whole storage
        let e = err(random(&[2, 2, 2, 9, 8], 5, 2.0)
            .narrow(3, 0, 6)
            .unwrap()
            .inplace_op3(&qkv, &random(&[3, 8], 3, 2.0), &op));
        assert!(e.contains("into a cache buffer"), "{e}");
        let e = random(&[2, 3, 9, 8], 6, 2.0)
            .apply_op2_no_bwd(&random(&[3, 8], 3, 2.0), &Queries { heads })
            .unwrap_err()
            .to_string();
        assert!(e.contains("qkv [2, 3, 9, 8]"), "{e}");
    }
}
