//! Choosing the next token: greedy, or temperature sampling with optional
//! top-p, driven by an explicit seed so that runs are reproducible.

use candle_core::{D, DType, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::model::fused::{contiguous, unfused};

/// How response tokens are chosen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "strategy", rename_all = "snake_case")]
pub enum Sampling {
    /// The most likely token (the first one on ties, as `torch.argmax`).
    Greedy,
    /// Sample from `softmax(logits / temperature)`, restricted to the smallest
    /// set of tokens whose probability reaches `top_p` when given.
    Temperature {
        temperature: f64,
        top_p: Option<f64>,
        seed: u64,
    },
}

impl Sampling {
    /// Checks the parameters' ranges.
    pub fn validate(&self) -> Result<(), String> {
        if let Sampling::Temperature {
            temperature, top_p, ..
        } = self
        {
            if !(temperature.is_finite() && *temperature > 0.0) {
                return Err(format!(
                    "--temperature must be a positive number, got {temperature} (use --greedy for argmax)"
                ));
            }
            if let Some(p) = top_p
                && !(*p > 0.0 && *p <= 1.0)
            {
                return Err(format!("--top-p must be in (0, 1], got {p}"));
            }
        }
        Ok(())
    }
}

/// A token chooser for one prompt. Sampling seeds are derived from the run's
/// seed and the prompt's identity, so a prompt gets the same response whatever
/// order, shard or batch it runs in.
#[derive(Debug)]
pub struct TokenChooser {
    sampling: Sampling,
    rng: Option<ChaCha8Rng>,
}

impl TokenChooser {
    pub fn new(sampling: &Sampling, prompt_key: &str) -> Self {
        let rng = match sampling {
            Sampling::Greedy => None,
            Sampling::Temperature { seed, .. } => Some(ChaCha8Rng::seed_from_u64(
                seed ^ fnv1a(prompt_key.as_bytes()),
            )),
        };
        Self {
            sampling: sampling.clone(),
            rng,
        }
    }

    /// Whether it picks the most likely token (no randomness).
    pub fn is_greedy(&self) -> bool {
        self.rng.is_none()
    }

    /// Picks a token id from final logits.
    pub fn choose(&mut self, logits: &[f32]) -> u32 {
        match (&self.sampling, self.rng.as_mut()) {
            (
                Sampling::Temperature {
                    temperature, top_p, ..
                },
                Some(rng),
            ) => sample(logits, *temperature, *top_p, rng),
            _ => argmax(logits),
        }
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Index of the largest logit; the first on ties; NaN never wins.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_value = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_value {
            best = i;
            best_value = v;
        }
    }
    best as u32
}

/// [`argmax`] of every row of `[rows, vocab]` logits, computed where they
/// are, so that a GPU sends a few bytes per sequence to the host instead of
/// its whole vocabulary of f32 logits (1 MB per sequence and step for
/// gemma-2). Exactly [`argmax`]'s choice: the row's maximum (a reduction,
/// exact in any order) and the first column holding it (a maximum of
/// `vocab - column` over those columns, exact in f32 below 2^24 columns).
/// A row with a NaN is `None`, left to [`argmax`] on the host: how a device
/// reduction orders NaN against numbers is not specified.
///
/// One operation ([`ArgmaxRows`]; on a GPU one kernel,
/// `capture_kernels::argmax_rows`), or with `CAPTURE_UNFUSED=1` about a
/// dozen of candle's.
pub fn argmax_rows(logits: &Tensor) -> candle_core::Result<Vec<Option<u32>>> {
    let (_, vocab) = logits.dims2()?;
    if vocab == 0 || vocab >= 1 << 24 {
        candle_core::bail!("{vocab} columns: none to choose from, or beyond exact f32 indices");
    }
    if unfused() {
        return candle_argmax_rows(logits);
    }
    let chosen = logits
        .to_dtype(DType::F32)?
        .contiguous()?
        .apply_op1_no_bwd(&ArgmaxRows)?
        .to_vec1::<u32>()?;
    Ok(chosen
        .into_iter()
        .map(|c| (c != ArgmaxRows::NAN_ROW).then_some(c))
        .collect())
}

/// Per row of `[rows, vocab]` f32 logits, [`argmax`]'s choice, or
/// [`ArgmaxRows::NAN_ROW`] for a row with a NaN: `[rows]` u32.
pub struct ArgmaxRows;

impl ArgmaxRows {
    /// The choice for a row holding a NaN.
    pub const NAN_ROW: u32 = u32::MAX;
}

impl candle_core::CustomOp1 for ArgmaxRows {
    fn name(&self) -> &'static str {
        "capture-argmax-rows"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (rows, vocab) = l1.shape().dims2()?;
        let logits = contiguous(s1.as_slice::<f32>()?, l1, "argmax-rows")?;
        let chosen = logits
            .chunks(vocab.max(1))
            .take(rows)
            .map(|row| match row.iter().any(|v| v.is_nan()) {
                true => Self::NAN_ROW,
                false => argmax(row),
            })
            .collect();
        Ok((candle_core::CpuStorage::U32(chosen), rows.into()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        let rows = l1.shape().dims2()?.0;
        Ok((capture_kernels::argmax_rows((s1, l1))?, rows.into()))
    }
}

/// [`argmax_rows`] with candle's operations.
pub(super) fn candle_argmax_rows(logits: &Tensor) -> candle_core::Result<Vec<Option<u32>>> {
    let (_, vocab) = logits.dims2()?;
    let logits = logits.to_dtype(DType::F32)?;
    let max = logits.max_keepdim(D::Minus1)?;
    let hits = logits.broadcast_eq(&max)?.to_dtype(DType::F32)?;
    // `vocab - column`: the largest marks the first hit; 0 means no hit.
    let from_end = Tensor::arange(0u32, vocab as u32, logits.device())?
        .to_dtype(DType::F32)?
        .affine(-1.0, vocab as f64)?;
    let first = hits.broadcast_mul(&from_end)?.max(D::Minus1)?;
    let nan = logits.ne(&logits)?.to_dtype(DType::F32)?.max(D::Minus1)?;
    let rows = Tensor::stack(&[first, nan], 0)?.to_vec2::<f32>()?;
    Ok(rows[0]
        .iter()
        .zip(&rows[1])
        .map(|(&first, &nan)| (nan == 0.0 && first > 0.0).then(|| vocab as u32 - first as u32))
        .collect())
}

fn sample(logits: &[f32], temperature: f64, top_p: Option<f64>, rng: &mut ChaCha8Rng) -> u32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i, ((l as f64 - max) / temperature).exp()))
        .filter(|(_, p)| p.is_finite() && *p > 0.0)
        .collect();
    if probs.is_empty() {
        return argmax(logits);
    }
    let total: f64 = probs.iter().map(|(_, p)| p).sum();
    probs.iter_mut().for_each(|(_, p)| *p /= total);
    if let Some(top_p) = top_p {
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut cumulative = 0.0;
        let mut keep = probs.len();
        for (n, (_, p)) in probs.iter().enumerate() {
            cumulative += p;
            if cumulative >= top_p {
                keep = n + 1;
                break;
            }
        }
        probs.truncate(keep);
        let kept: f64 = probs.iter().map(|(_, p)| p).sum();
        probs.iter_mut().for_each(|(_, p)| *p /= kept);
    }
    let draw: f64 = rng.random();
    let mut cumulative = 0.0;
    for (i, p) in &probs {
        cumulative += p;
        if draw < cumulative {
            return *i as u32;
        }
    }
    probs.last().map_or(0, |(i, _)| *i as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.0, 3.0, 3.0, -1.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 1.0]), 1);
    }

    #[test]
    fn rows_choose_on_the_device_as_argmax_does_on_the_host() {
        let rows: Vec<Vec<f32>> = vec![
            vec![0.0, 3.0, 3.0, -1.0, 3.0],                    // ties: the first
            vec![f32::NEG_INFINITY; 5],                        // nothing wins: 0
            vec![1.0, 2.0, f32::INFINITY, f32::INFINITY, 0.0], // infinities tie
            vec![-5.0, -4.0, -3.0, -2.0, -1.0],                // the last column
            vec![7.0, -1.0, 0.5, 6.9, 7.0 - 1e-6],             // close values
            vec![f32::NAN, 1.0, 4.0, 2.0, 0.0],                // left to the host
        ];
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        let logits = Tensor::from_vec(flat, (rows.len(), 5), &candle_core::Device::Cpu).unwrap();
        // A real vocabulary's width, with the maximum late in the row.
        let mut wide = vec![0.25f32; 256_000];
        wide[255_998] = 9.0;
        wide[255_999] = 9.0;
        let wide_logits =
            Tensor::from_vec(wide.clone(), (1, 256_000), &candle_core::Device::Cpu).unwrap();
        // The operation, and candle's operations (`CAPTURE_UNFUSED=1`).
        for rows_of in [argmax_rows, candle_argmax_rows] {
            let chosen = rows_of(&logits).unwrap();
            for (row, choice) in rows.iter().zip(&chosen).take(5) {
                assert_eq!(*choice, Some(argmax(row)), "{row:?}");
            }
            assert_eq!(chosen[5], None);
            assert_eq!(rows_of(&wide_logits).unwrap(), vec![Some(argmax(&wide))]);
        }
    }

    #[test]
    fn sampling_is_reproducible_per_seed_and_prompt() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let sampling = Sampling::Temperature {
            temperature: 1.0,
            top_p: None,
            seed: 7,
        };
        let draw = |key: &str| {
            let mut c = TokenChooser::new(&sampling, key);
            (0..20).map(|_| c.choose(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw("set/1"), draw("set/1"));
        assert_ne!(draw("set/1"), draw("set/2"));
    }

    #[test]
    fn tiny_top_p_is_greedy() {
        let logits = [0.1f32, 2.0, 1.9, -3.0];
        let sampling = Sampling::Temperature {
            temperature: 1.0,
            top_p: Some(1e-6),
            seed: 1,
        };
        let mut c = TokenChooser::new(&sampling, "k");
        assert!((0..30).all(|_| c.choose(&logits) == 1));
    }

    #[test]
    fn validation_rejects_bad_parameters() {
        let bad = Sampling::Temperature {
            temperature: 0.0,
            top_p: None,
            seed: 0,
        };
        assert!(bad.validate().unwrap_err().contains("--temperature"));
        let bad = Sampling::Temperature {
            temperature: 1.0,
            top_p: Some(1.5),
            seed: 0,
        };
        assert!(bad.validate().unwrap_err().contains("--top-p"));
    }
}
