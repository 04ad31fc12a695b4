//! Loading a checkpoint for capture: files, config, tokenizer, end tokens and
//! weights, on the chosen device and compute dtype.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};

use crate::error::{CaptureError, Result};
use crate::model::config::eos_ids_from_generation_config;
use crate::model::{Gemma2, Gemma2Config, Weights};
use crate::model_files::{ModelFiles, ModelSource, resolve_model};
use crate::tokenizer::CaptureTokenizer;

/// `--device`: `cpu` or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceArg {
    #[default]
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceArg {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceArg::Cpu),
            "cuda" => Ok(DeviceArg::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceArg::Cuda)
                .ok_or_else(|| format!("invalid device \"{s}\": use cpu, cuda or cuda:N")),
        }
    }
}

impl fmt::Display for DeviceArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceArg::Cpu => f.write_str("cpu"),
            DeviceArg::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceArg {
    /// The candle device; a clear error when CUDA was not compiled in.
    pub fn open(&self) -> Result<Device> {
        match self {
            DeviceArg::Cpu => Ok(Device::Cpu),
            DeviceArg::Cuda(n) => {
                if !cfg!(feature = "cuda") {
                    return Err(CaptureError::InvalidArgument(format!(
                        "--device {self} needs a worker built with `--features cuda`; this build is CPU-only"
                    )));
                }
                let device = Device::new_cuda(*n).map_err(|e| {
                    CaptureError::InvalidArgument(format!(
                        "cannot open {self}: {} (is the NVIDIA driver installed, the GPU visible to this process, and {n} below the GPU count of nvidia-smi -L?)",
                        e.to_string().lines().next().unwrap_or_default()
                    ))
                })?;
                prepare_cuda(&device).map_err(|e| e.context(format!("cannot set up {self}")))?;
                Ok(device)
            }
        }
    }

    /// The compute dtype used when none is given: f32 on the CPU, bf16 on GPUs.
    pub fn default_dtype(&self) -> DType {
        match self {
            DeviceArg::Cpu => DType::F32,
            DeviceArg::Cuda(_) => DType::BF16,
        }
    }
}

/// Sets a newly opened CUDA device up for a decode step's many small
/// allocations ([`capture_kernels::device::prepare`]: freed memory stays in
/// the pool between steps, no per-allocation events), unless
/// `CAPTURE_CUDA_DEFAULTS=1` asks for the driver's and cudarc's defaults
/// (to measure the difference).
fn prepare_cuda(device: &Device) -> candle_core::Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device
        && !crate::model::fused::env_flag("CAPTURE_CUDA_DEFAULTS")
    {
        capture_kernels::device::prepare(cuda)?;
    }
    let _ = device;
    Ok(())
}

/// Parses `--dtype` (compute dtype).
pub fn parse_compute_dtype(s: &str) -> std::result::Result<DType, String> {
    match s {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        _ => Err(format!(
            "invalid compute dtype \"{s}\": use f32, bf16 or f16"
        )),
    }
}

pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "other",
    }
}

/// Everything needed before the weights: cheap to load, enough to validate
/// every input.
#[derive(Debug, Clone)]
pub struct ModelMeta {
    pub files: ModelFiles,
    pub config: Gemma2Config,
    pub tokenizer: CaptureTokenizer,
    /// End tokens from `generation_config.json`, else from `config.json`.
    pub eos_ids: Vec<u32>,
}

impl ModelMeta {
    pub fn load(source: &ModelSource) -> Result<Self> {
        let files = resolve_model(source)?;
        let read = |path: &std::path::Path| {
            std::fs::read_to_string(path).map_err(|source| CaptureError::Io {
                path: path.to_path_buf(),
                source,
            })
        };
        let config_source = files.config_json.display().to_string();
        let config = Gemma2Config::from_json(&read(&files.config_json)?, &config_source)
            .map_err(CaptureError::InvalidArgument)?;
        let tokenizer = CaptureTokenizer::from_file(&files.tokenizer_json, config.bos_token_id)?;
        if tokenizer.vocab_size() > config.vocab_size {
            return Err(CaptureError::InvalidArgument(format!(
                "tokenizer {} has {} tokens but config.json says vocab_size {}: the files do not belong together",
                files.tokenizer_json.display(),
                tokenizer.vocab_size(),
                config.vocab_size
            )));
        }
        let mut eos_ids = match &files.generation_config_json {
            Some(path) => eos_ids_from_generation_config(&read(path)?, &path.display().to_string())
                .map_err(CaptureError::InvalidArgument)?,
            None => Vec::new(),
        };
        if eos_ids.is_empty() {
            eos_ids = config.eos_token_ids.clone();
        }
        Ok(Self {
            files,
            config,
            tokenizer,
            eos_ids,
        })
    }

    /// Reads the weights and builds the model.
    pub fn load_model(&self, device: &Device, dtype: DType) -> Result<Gemma2> {
        let weights = Weights::from_safetensors(&self.files.safetensors, dtype, device)?;
        Gemma2::new(&self.config, weights)
    }
}
