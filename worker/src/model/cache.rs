//! The KV cache of a batch of sequences, and the layout of one forward pass
//! over it: which columns are padding, each token's position, the attention
//! mask and the rotary positions.
//!
//! Sequences of different lengths share a pass by left padding: a pass over
//! `t` columns puts sequence `i`'s `n_i` tokens in the last `n_i` columns and
//! padding before them. Padding columns have no position; no real query ever
//! sees them, and a padding query sees only itself (so its row stays finite
//! and is discarded). Positions count real tokens only, so a sequence's
//! tensors are those it would get alone.

use std::ops::Range;

use candle_core::{DType, Device, IndexOp, Tensor};

/// Keys and values of every layer for the columns seen so far, and the
/// position held by each column of each sequence.
///
/// Each layer's keys and values live in one buffer `[2, batch, kv_heads,
/// capacity, head_dim]` (keys at 0, values at 1) that a pass writes its new
/// columns into, in place: a decode step writes one column per sequence
/// instead of copying the whole cache (which at a batch of 64 and a few
/// hundred columns would move as many bytes per step as the weights), and
/// one kernel can write both keys and values (see [`KvCache::slot`]).
/// [`KvCache::reserve`] sizes the buffers for a whole generation up front;
/// without it, or past it, they grow geometrically.
///
/// Not `Clone`: clones would share the buffers that passes write into.
#[derive(Debug)]
pub struct KvCache {
    /// Per layer, the buffer `[2, batch, kv_heads, capacity, head_dim]`
    /// whose first [`KvCache::len`] columns are written (the rest is zeros
    /// or stale values that no pass reads).
    layers: Vec<Option<Tensor>>,
    /// `columns[i][c]`: the position of sequence `i`'s token in column `c`,
    /// `None` for padding.
    columns: Vec<Vec<Option<usize>>>,
    /// Columns allocated at a layer's first pass (at least that pass's).
    reserved: usize,
}

/// Where one pass writes one layer's new keys and values (see
/// [`KvCache::slot`]).
#[derive(Debug)]
pub struct KvSlot {
    /// The layer's buffer, `[2, batch, kv_heads, capacity, head_dim]`.
    pub buffer: Tensor,
    /// The pass's first column.
    pub start: usize,
    /// One past the pass's last column.
    pub end: usize,
}

impl KvSlot {
    /// The keys and values of every column up to the pass's last, views of
    /// the buffer: `[batch, kv_heads, end, head_dim]` each.
    pub fn cached(&self) -> candle_core::Result<(Tensor, Tensor)> {
        Ok((
            self.buffer.i(0)?.narrow(2, 0, self.end)?,
            self.buffer.i(1)?.narrow(2, 0, self.end)?,
        ))
    }
}

/// The shape of one layer's keys (or values) at one column: what a
/// buffer is allocated for.
#[derive(Debug, Clone, Copy)]
pub struct KvShape {
    pub kv_heads: usize,
    pub head_dim: usize,
    pub dtype: DType,
}

/// The layout of one pass: `t` new columns per sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassLayout {
    /// Columns in cache before the pass.
    pub start: usize,
    /// New columns.
    pub t: usize,
    /// `new[i][r]`: position of sequence `i`'s token in new column `r`.
    pub new: Vec<Vec<Option<usize>>>,
}

impl PassLayout {
    /// The rows of the pass that hold sequence `i`'s tokens (its last ones).
    pub fn rows(&self, i: usize) -> Range<usize> {
        let pad = self.new[i].iter().take_while(|p| p.is_none()).count();
        pad..self.t
    }

    /// Whether any column of the pass is padding.
    fn padded(&self) -> bool {
        self.new.iter().flatten().any(Option::is_none)
    }
}

impl KvCache {
    /// An empty cache for `batch` sequences.
    pub fn new(num_layers: usize, batch: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| None).collect(),
            columns: vec![Vec::new(); batch],
            reserved: 0,
        }
    }

    /// Allocates room for `columns` columns (padded prompt plus decode
    /// steps) at each layer's first pass, so that no later pass within them
    /// moves what is cached. Call before the first pass; a smaller or later
    /// reservation changes nothing.
    pub fn reserve(&mut self, columns: usize) {
        self.reserved = self.reserved.max(columns);
    }

    /// Columns each layer's buffer holds (0 before the first pass).
    pub fn capacity(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .find_map(|layer| layer.dim(3).ok())
            .unwrap_or(0)
    }

    /// Number of columns cached (the same for every sequence).
    pub fn len(&self) -> usize {
        self.columns.first().map_or(0, Vec::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of sequences.
    pub fn batch(&self) -> usize {
        self.columns.len()
    }

    /// Real tokens cached for sequence `i` (its next position).
    pub fn positions(&self, i: usize) -> usize {
        self.columns[i].iter().flatten().count()
    }

    /// The cached columns of sequence `i` that hold real tokens.
    pub fn real_columns(&self, i: usize) -> Vec<u32> {
        (0..self.len() as u32)
            .filter(|&c| self.columns[i][c as usize].is_some())
            .collect()
    }

    /// Lays out a pass appending `lens[i]` tokens to sequence `i`.
    pub fn layout(&self, lens: &[usize]) -> candle_core::Result<PassLayout> {
        if lens.len() != self.batch() {
            candle_core::bail!(
                "a pass over {} sequences on a cache of {}",
                lens.len(),
                self.batch()
            );
        }
        if lens.contains(&0) {
            candle_core::bail!("forward pass over zero tokens");
        }
        let t = lens.iter().copied().max().unwrap_or(0);
        let new = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let first = self.positions(i);
                std::iter::repeat_n(None, t - n)
                    .chain((first..first + n).map(Some))
                    .collect()
            })
            .collect();
        Ok(PassLayout {
            start: self.len(),
            t,
            new,
        })
    }

    /// The position of sequence `i`'s column `c`, cached or new in `pass`.
    fn column(&self, pass: &PassLayout, i: usize, c: usize) -> Option<usize> {
        match c.checked_sub(pass.start) {
            None => self.columns[i][c],
            Some(r) => pass.new[i][r],
        }
    }

    /// The additive mask `[batch, 1, t, start + t]` of `pass`, or `None` when
    /// every query sees every key (one unpadded decode step, no window).
    pub fn mask(
        &self,
        pass: &PassLayout,
        window: Option<usize>,
        device: &Device,
    ) -> candle_core::Result<Option<Tensor>> {
        let context = pass.start + pass.t;
        let longest = (0..self.batch())
            .map(|i| self.positions(i) + pass.t)
            .max()
            .unwrap_or(0);
        let window_bites = window.is_some_and(|w| longest > w);
        let any_padding = pass.padded() || self.columns.iter().flatten().any(Option::is_none);
        if pass.t == 1 && !window_bites && !any_padding {
            return Ok(None);
        }
        let mut mask = Vec::with_capacity(self.batch() * pass.t * context);
        for i in 0..self.batch() {
            for r in 0..pass.t {
                let query = pass.new[i][r];
                for c in 0..context {
                    let visible = match (query, self.column(pass, i, c)) {
                        (Some(q), Some(k)) => k <= q && window.is_none_or(|w| q - k < w),
                        (None, _) => c == pass.start + r,
                        (Some(_), None) => false,
                    };
                    mask.push(if visible { 0f32 } else { f32::NEG_INFINITY });
                }
            }
        }
        Ok(Some(Tensor::from_vec(
            mask,
            (self.batch(), 1, pass.t, context),
            device,
        )?))
    }

    /// Rotary positions of the pass's columns, `[batch * t]` (padding at 0),
    /// or `None` when they are `start..start + t` for a single sequence.
    pub fn rotary_positions(
        &self,
        pass: &PassLayout,
        device: &Device,
    ) -> candle_core::Result<Option<Tensor>> {
        if self.batch() == 1 && !pass.padded() && self.positions(0) == pass.start {
            return Ok(None);
        }
        let ids: Vec<u32> = pass
            .new
            .iter()
            .flatten()
            .map(|p| p.unwrap_or(0) as u32)
            .collect();
        Ok(Some(Tensor::new(ids, device)?))
    }

    /// The buffer that `layer`'s keys and values of a pass over `t` new
    /// columns go into, holding at least the cached columns and the pass's:
    /// allocated (zeroed) at the layer's first pass for the reservation, or
    /// grown to twice its capacity (copying what it holds) when the pass
    /// would not fit. The caller writes the pass's keys and values at
    /// columns `start..end` of every sequence, as [`KvCache::append`] does.
    pub(super) fn slot(
        &mut self,
        layer: usize,
        t: usize,
        shape: KvShape,
        device: &Device,
    ) -> candle_core::Result<KvSlot> {
        // Every layer appends at the same columns: the pass is committed
        // once all have.
        let start = self.len();
        let end = start + t;
        let batch = self.batch();
        let zeros = |capacity: usize| {
            let dims = (2, batch, shape.kv_heads, capacity, shape.head_dim);
            Tensor::zeros(dims, shape.dtype, device)
        };
        let buffer = match self.layers[layer].take() {
            None => zeros(end.max(self.reserved))?,
            Some(old) => {
                let capacity = old.dim(3)?;
                if end > capacity {
                    let grown = zeros(end.max(2 * capacity))?;
                    grown.slice_set(&old, 3, 0)?;
                    grown
                } else {
                    old
                }
            }
        };
        self.layers[layer] = Some(buffer.clone());
        Ok(KvSlot { buffer, start, end })
    }

    /// Appends `k`, `v` (`[batch, kv_heads, t, head_dim]`) of `layer` and
    /// returns the full cached keys and values, views of the layer's buffer:
    /// `[batch, kv_heads, len + t, head_dim]`.
    pub(super) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (_, kv_heads, t, head_dim) = k.dims4()?;
        let shape = KvShape {
            kv_heads,
            head_dim,
            dtype: k.dtype(),
        };
        let slot = self.slot(layer, t, shape, k.device())?;
        slot.buffer
            .slice_set(&Tensor::stack(&[k, v], 0)?, 3, slot.start)?;
        slot.cached()
    }

    /// Records the pass's columns once every layer has appended its keys.
    pub(super) fn commit(&mut self, pass: PassLayout) {
        for (columns, new) in self.columns.iter_mut().zip(pass.new) {
            columns.extend(new);
        }
    }

    /// Keeps only the sequences at `keep` (indices into the current batch, in
    /// the order given), e.g. to drop sequences that finished.
    pub fn retain(&mut self, keep: &[usize]) -> candle_core::Result<()> {
        if keep.len() == self.batch() && keep.iter().enumerate().all(|(a, &b)| a == b) {
            return Ok(());
        }
        if keep.is_empty() {
            // Every sequence finished. (An empty index is also an empty
            // allocation, which CUDA refuses.)
            self.layers.iter_mut().for_each(|layer| *layer = None);
            self.columns.clear();
            return Ok(());
        }
        let columns = keep.iter().map(|&i| self.columns[i].clone()).collect();
        // One index on the cache's device for every layer.
        let device = self
            .layers
            .iter()
            .flatten()
            .next()
            .map(|l| l.device().clone());
        if let Some(device) = device {
            let index = Tensor::new(keep.iter().map(|&i| i as u32).collect::<Vec<_>>(), &device)?;
            for layer in self.layers.iter_mut().flatten() {
                *layer = layer.index_select(&index, 1)?;
            }
        }
        self.columns = columns;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn visible(cache: &KvCache, pass: &PassLayout, window: Option<usize>) -> Vec<Vec<Vec<bool>>> {
        let context = pass.start + pass.t;
        match cache.mask(pass, window, &Device::Cpu).unwrap() {
            None => vec![vec![vec![true; context]; pass.t]; cache.batch()],
            Some(m) => m
                .squeeze(1)
                .unwrap()
                .to_vec3::<f32>()
                .unwrap()
                .into_iter()
                .map(|seq| {
                    seq.into_iter()
                        .map(|row| row.into_iter().map(|x| x == 0.0).collect())
                        .collect()
                })
                .collect(),
        }
    }

    /// A cache holding `lens` tokens per sequence from one left-padded pass.
    fn filled(lens: &[usize]) -> KvCache {
        let mut cache = KvCache::new(0, lens.len());
        let pass = cache.layout(lens).unwrap();
        cache.commit(pass);
        cache
    }

    #[test]
    fn sliding_window_follows_transformers_rule() {
        // window 3: a query at q sees q-2, q-1, q
        let cache = KvCache::new(0, 1);
        let pass = cache.layout(&[6]).unwrap();
        let rows = &visible(&cache, &pass, Some(3))[0];
        assert_eq!(rows[5], vec![false, false, false, true, true, true]);
        assert_eq!(rows[1], vec![true, true, false, false, false, false]);
        // cached decode step at position 6 sees 4, 5, 6
        let cache = filled(&[6]);
        let pass = cache.layout(&[1]).unwrap();
        assert_eq!(
            visible(&cache, &pass, Some(3))[0][0],
            vec![false, false, false, false, true, true, true]
        );
    }

    #[test]
    fn full_attention_is_causal() {
        let cache = filled(&[2]);
        let pass = cache.layout(&[3]).unwrap();
        let rows = &visible(&cache, &pass, None)[0];
        assert_eq!(rows[0], vec![true, true, true, false, false]);
        assert_eq!(rows[2], vec![true; 5]);
        let cache = filled(&[9]);
        let pass = cache.layout(&[1]).unwrap();
        assert!(cache.mask(&pass, None, &Device::Cpu).unwrap().is_none());
        assert!(
            cache
                .rotary_positions(&pass, &Device::Cpu)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn padding_is_invisible_and_positions_count_real_tokens() {
        // sequence 0 has 3 tokens, sequence 1 has 1: one padded prompt pass
        let cache = KvCache::new(0, 2);
        let pass = cache.layout(&[3, 1]).unwrap();
        assert_eq!(pass.rows(0), 0..3);
        assert_eq!(pass.rows(1), 2..3);
        let rows = visible(&cache, &pass, None);
        assert_eq!(rows[1][2], vec![false, false, true]);
        // padding queries see only themselves
        assert_eq!(rows[1][0], vec![true, false, false]);
        assert_eq!(rows[1][1], vec![false, true, false]);
        let positions = cache
            .rotary_positions(&pass, &Device::Cpu)
            .unwrap()
            .unwrap();
        assert_eq!(positions.to_vec1::<u32>().unwrap(), vec![0, 1, 2, 0, 0, 0]);

        // a decode step: sequence 1 is at position 1, window 2
        let mut cache = cache;
        cache.commit(pass);
        assert_eq!(cache.real_columns(1), vec![2]);
        let pass = cache.layout(&[1, 1]).unwrap();
        let rows = visible(&cache, &pass, Some(2));
        assert_eq!(rows[0][0], vec![false, false, true, true]);
        assert_eq!(rows[1][0], vec![false, false, true, true]);
        let positions = cache
            .rotary_positions(&pass, &Device::Cpu)
            .unwrap()
            .unwrap();
        assert_eq!(positions.to_vec1::<u32>().unwrap(), vec![3, 1]);
    }

    #[test]
    fn retain_drops_finished_sequences() {
        let mut cache = filled(&[3, 1, 2]);
        cache.retain(&[2, 0]).unwrap();
        assert_eq!(cache.batch(), 2);
        assert_eq!(cache.positions(0), 2);
        assert_eq!(cache.positions(1), 3);
        assert!(
            cache
                .layout(&[0, 1])
                .unwrap_err()
                .to_string()
                .contains("zero")
        );
    }

    /// Keys or values `[batch, 2 heads, t, 3]` numbered from `first` on.
    fn numbered(batch: usize, t: usize, first: f32) -> Tensor {
        let n = batch * 2 * t * 3;
        let values: Vec<f32> = (0..n).map(|x| first + x as f32).collect();
        Tensor::from_vec(values, (batch, 2, t, 3), &Device::Cpu).unwrap()
    }

    /// Appends one pass of `t` new columns per sequence to layer 0 (and
    /// commits it), checks that the cached keys and values are `everything`
    /// with the pass's columns concatenated, and updates `everything`.
    fn append_pass(cache: &mut KvCache, t: usize, everything: &mut Option<(Tensor, Tensor)>) {
        let first = 1000.0 * cache.len() as f32;
        let (k, v) = (
            numbered(cache.batch(), t, first),
            numbered(cache.batch(), t, -first),
        );
        let pass = cache.layout(&vec![t; cache.batch()]).unwrap();
        let (ck, cv) = cache.append(0, &k, &v).unwrap();
        cache.commit(pass);
        let want = match everything.take() {
            None => (k, v),
            Some((pk, pv)) => (
                Tensor::cat(&[&pk, &k], 2).unwrap(),
                Tensor::cat(&[&pv, &v], 2).unwrap(),
            ),
        };
        for (got, want) in [(&ck, &want.0), (&cv, &want.1)] {
            assert_eq!(got.dims(), want.dims());
            assert_eq!(
                got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }
        *everything = Some(want);
    }

    #[test]
    fn reserved_buffers_are_written_in_place_and_grow_past_the_reservation() {
        let mut cache = KvCache::new(1, 2);
        cache.reserve(5);
        let mut everything = None;
        append_pass(&mut cache, 3, &mut everything);
        assert_eq!(cache.capacity(), 5);
        let buffer = cache.layers[0].as_ref().unwrap().id();
        for _ in 0..2 {
            append_pass(&mut cache, 1, &mut everything);
        }
        // two decode steps written into the buffer the prompt pass allocated
        assert_eq!(cache.capacity(), 5);
        assert_eq!(cache.layers[0].as_ref().unwrap().id(), buffer);
        // past the reservation the buffers double, keeping what they hold
        append_pass(&mut cache, 1, &mut everything);
        assert_eq!(cache.capacity(), 10);
        append_pass(&mut cache, 2, &mut everything);
        assert_eq!(cache.len(), 8);

        // dropping a sequence keeps the other's columns, in place after it
        cache.retain(&[1]).unwrap();
        let (pk, pv) = everything.take().unwrap();
        let index = Tensor::new(&[1u32], &Device::Cpu).unwrap();
        everything = Some((
            pk.index_select(&index, 0).unwrap(),
            pv.index_select(&index, 0).unwrap(),
        ));
        append_pass(&mut cache, 1, &mut everything);
        assert_eq!(cache.capacity(), 10);
    }

    #[test]
    fn without_a_reservation_the_buffer_holds_the_first_pass() {
        let mut cache = KvCache::new(1, 1);
        let mut everything = None;
        append_pass(&mut cache, 4, &mut everything);
        assert_eq!(cache.capacity(), 4);
        append_pass(&mut cache, 1, &mut everything);
        assert_eq!(cache.capacity(), 8);
        // a reservation after the first pass changes nothing
        cache.reserve(100);
        append_pass(&mut cache, 1, &mut everything);
        assert_eq!(cache.capacity(), 8);
    }

    #[test]
    fn retaining_nothing_empties_the_cache_without_an_empty_index() {
        let mut cache = filled(&[3, 1]);
        cache.retain(&[]).unwrap();
        assert_eq!(cache.batch(), 0);
        assert!(cache.is_empty());
        assert!(cache.layers.iter().all(Option::is_none));
    }
}
