//! Checkpoint tensors by name, with the checks that turn a bad checkpoint into
//! a clear error (missing tensor, shape mismatch) instead of a panic later.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::config::Gemma2Config;
use crate::error::{CaptureError, Result};

/// Named tensors on the model's device: vectors (norms) in the compute
/// dtype, matrices (projections, embedding) in the compute dtype or kept in
/// bf16 (see [`keeps_bf16`]).
#[derive(Debug)]
pub struct Weights {
    tensors: HashMap<String, Tensor>,
    /// Where the tensors came from, for error messages.
    origin: String,
    dtype: DType,
    device: Device,
}

/// Whether a matrix stored in `stored` stays in it when computing in
/// `compute` on `device`: bf16 matrices on a CPU computing in f32 do, since
/// the CPU kernels widen them exactly on the fly (`bf16_weights`), which
/// halves the bytes each decode step reads (on little-endian CPUs, which
/// the kernel's pair trick assumes). Everything else is converted.
pub fn keeps_bf16(stored: DType, compute: DType, device: &Device) -> bool {
    cfg!(target_endian = "little")
        && stored == DType::BF16
        && compute == DType::F32
        && device.is_cpu()
}

impl Weights {
    /// Loads every tensor of the given safetensors files (one file or all the
    /// shards of an index), converted to `dtype`, except bf16 matrices that
    /// [`keeps_bf16`] keeps as stored.
    pub fn from_safetensors(files: &[PathBuf], dtype: DType, device: &Device) -> Result<Self> {
        let mut tensors = HashMap::new();
        for file in files {
            let bytes = std::fs::read(file).map_err(|source| CaptureError::Io {
                path: file.clone(),
                source,
            })?;
            let loaded = candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| {
                CaptureError::InvalidArgument(format!(
                    "cannot read safetensors file {}: {e}",
                    file.display()
                ))
            })?;
            drop(bytes);
            for (name, tensor) in loaded {
                // Checkpoints saved from the bare model lack the "model." prefix.
                let name = if name.starts_with("model.") || name.starts_with("lm_head.") {
                    name
                } else {
                    format!("model.{name}")
                };
                let keep = tensor.rank() == 2 && keeps_bf16(tensor.dtype(), dtype, device);
                let tensor = if keep {
                    tensor
                } else {
                    tensor.to_dtype(dtype)?
                };
                tensors.insert(name, tensor);
            }
        }
        let origin = match files {
            [one] => one.display().to_string(),
            _ => files
                .first()
                .and_then(|f| f.parent())
                .map(|d| format!("the shards in {}", d.display()))
                .unwrap_or_else(|| "no files".into()),
        };
        Ok(Self {
            tensors,
            origin,
            dtype,
            device: device.clone(),
        })
    }

    /// Random weights with the shapes of `cfg` (benchmarks and tests):
    /// uniform with standard deviation `std`, norms around zero; the same
    /// `seed` gives the same weights. Matrices are stored in `matrices`
    /// (`dtype`, or bf16 like a released checkpoint), vectors in `dtype`.
    pub fn random(
        cfg: &Gemma2Config,
        std: f32,
        seed: u64,
        dtype: DType,
        matrices: DType,
        device: &Device,
    ) -> Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut tensors = HashMap::new();
        let mut add = |name: String, shape: &[usize], std: f32| -> Result<()> {
            // uniform on [-a, a] has standard deviation a / sqrt(3)
            let a = std * 3f32.sqrt();
            let numel = shape.iter().product();
            let values: Vec<f32> = (0..numel).map(|_| rng.random_range(-a..=a)).collect();
            let stored = if shape.len() == 2 { matrices } else { dtype };
            let t = Tensor::from_vec(values, shape, device)?.to_dtype(stored)?;
            tensors.insert(name, t);
            Ok(())
        };
        let (h, i, q, kv) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.q_dim(),
            cfg.kv_dim(),
        );
        add(
            "model.embed_tokens.weight".into(),
            &[cfg.vocab_size, h],
            std,
        )?;
        add("model.norm.weight".into(), &[h], 0.1)?;
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            for (name, shape) in [
                ("self_attn.q_proj", [q, h]),
                ("self_attn.k_proj", [kv, h]),
                ("self_attn.v_proj", [kv, h]),
                ("self_attn.o_proj", [h, q]),
                ("mlp.gate_proj", [i, h]),
                ("mlp.up_proj", [i, h]),
                ("mlp.down_proj", [h, i]),
            ] {
                add(format!("{p}.{name}.weight"), &shape, std)?;
            }
            for norm in [
                "input_layernorm",
                "post_attention_layernorm",
                "pre_feedforward_layernorm",
                "post_feedforward_layernorm",
            ] {
                add(format!("{p}.{norm}.weight"), &[h], 0.1)?;
            }
        }
        Ok(Self {
            tensors,
            origin: "random weights".into(),
            dtype,
            device: device.clone(),
        })
    }

    /// Takes out the tensor called `name`, which must have exactly `shape`.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let tensor = self.tensors.remove(name).ok_or_else(|| {
            CaptureError::InvalidArgument(format!(
                "tensor {name} is missing from {}: is this a Gemma-2 checkpoint?",
                self.origin
            ))
        })?;
        if tensor.dims() != shape {
            return Err(CaptureError::InvalidArgument(format!(
                "tensor {name} in {} has shape {:?}, but config.json implies {:?}",
                self.origin,
                tensor.dims(),
                shape
            )));
        }
        Ok(tensor)
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The dtype the matrices are stored in (the compute dtype, or bf16).
    #[cfg(test)]
    pub fn matrix_dtype(&self) -> DType {
        self.tensors
            .values()
            .find(|t| t.rank() == 2)
            .map_or(self.dtype, Tensor::dtype)
    }

    /// The same weights with every matrix converted to `dtype` (tests:
    /// bf16-stored matrices widened to f32 hold exactly the same values).
    #[cfg(test)]
    pub fn with_matrices_in(&self, dtype: DType) -> Result<Self> {
        let tensors = self
            .tensors
            .iter()
            .map(|(name, t)| {
                let t = if t.rank() == 2 {
                    t.to_dtype(dtype)?
                } else {
                    t.clone()
                };
                Ok((name.clone(), t))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            tensors,
            origin: self.origin.clone(),
            dtype: self.dtype,
            device: self.device.clone(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }
}
