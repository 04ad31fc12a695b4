//! Element types and dense tensors as they are stored in `.pt` files.

use std::fmt;
use std::str::FromStr;

use half::{bf16, f16};
use serde::{Deserialize, Serialize};

use super::{PtBytes, PtError};

/// Element type a capture is stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreDtype {
    F32,
    F16,
    BF16,
}

impl StoreDtype {
    /// Bytes per element.
    pub fn element_size(&self) -> usize {
        PtDtype::from(*self).element_size()
    }

    /// The name used in configuration and on the command line.
    pub fn as_str(&self) -> &'static str {
        match self {
            StoreDtype::F32 => "f32",
            StoreDtype::F16 => "f16",
            StoreDtype::BF16 => "bf16",
        }
    }
}

impl fmt::Display for StoreDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for StoreDtype {
    type Err = PtError;

    fn from_str(s: &str) -> Result<Self, PtError> {
        match s {
            "f32" => Ok(StoreDtype::F32),
            "f16" => Ok(StoreDtype::F16),
            "bf16" => Ok(StoreDtype::BF16),
            other => Err(PtError::UnknownDtype(other.to_owned())),
        }
    }
}

/// Element type of a tensor in a `.pt` file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PtDtype {
    F32,
    F16,
    BF16,
    /// `torch.int64` (`LongStorage`).
    I64,
}

impl PtDtype {
    /// Bytes per element.
    pub fn element_size(&self) -> usize {
        match self {
            PtDtype::F32 => 4,
            PtDtype::F16 | PtDtype::BF16 => 2,
            PtDtype::I64 => 8,
        }
    }

    /// The legacy storage class torch pickles for this dtype (`torch.<name>`).
    pub(super) fn storage_class(&self) -> &'static str {
        match self {
            PtDtype::F32 => "FloatStorage",
            PtDtype::F16 => "HalfStorage",
            PtDtype::BF16 => "BFloat16Storage",
            PtDtype::I64 => "LongStorage",
        }
    }

    /// Inverse of [`PtDtype::storage_class`].
    pub(super) fn from_storage_class(name: &str) -> Option<Self> {
        [PtDtype::F32, PtDtype::F16, PtDtype::BF16, PtDtype::I64]
            .into_iter()
            .find(|dtype| dtype.storage_class() == name)
    }
}

impl From<StoreDtype> for PtDtype {
    fn from(dtype: StoreDtype) -> Self {
        match dtype {
            StoreDtype::F32 => PtDtype::F32,
            StoreDtype::F16 => PtDtype::F16,
            StoreDtype::BF16 => PtDtype::BF16,
        }
    }
}

/// A dense tensor: contiguous row-major little-endian element bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct PtTensor {
    pub dtype: PtDtype,
    pub shape: Vec<usize>,
    pub data: PtBytes,
}

impl PtTensor {
    /// Converts `values` (row-major, `shape.iter().product()` of them) to
    /// `store`, rounding to nearest even for the 16-bit types.
    ///
    /// # Panics
    /// If `values.len()` does not match `shape`.
    pub fn from_f32(shape: Vec<usize>, values: &[f32], store: StoreDtype) -> Self {
        assert_eq!(
            values.len(),
            shape.iter().product::<usize>(),
            "PtTensor::from_f32: {} values for shape {shape:?}",
            values.len()
        );
        let mut tensor = PtTensor::zeros(shape, store);
        tensor.write_f32(0, values);
        tensor
    }

    /// A tensor of `shape` in `store`, all zeros (memory the system hands
    /// out zeroed, touched only where written).
    pub fn zeros(shape: Vec<usize>, store: StoreDtype) -> Self {
        let dtype = PtDtype::from(store);
        let numel: usize = shape.iter().product();
        PtTensor {
            dtype,
            shape,
            data: vec![0; numel * dtype.element_size()].into(),
        }
    }

    /// [`PtTensor::from_f32`] taking the values: an `f32` tensor keeps
    /// them as its data, without a copy.
    ///
    /// # Panics
    /// If `values.len()` does not match `shape`.
    pub fn from_f32_vec(shape: Vec<usize>, values: Vec<f32>, store: StoreDtype) -> Self {
        if store != StoreDtype::F32 {
            return PtTensor::from_f32(shape, &values, store);
        }
        assert_eq!(
            values.len(),
            shape.iter().product::<usize>(),
            "PtTensor::from_f32_vec: {} values for shape {shape:?}",
            values.len()
        );
        PtTensor {
            dtype: PtDtype::F32,
            shape,
            data: PtBytes::from_f32(values),
        }
    }

    /// Overwrites the elements from `start` on (row-major) with `values`,
    /// converted to the tensor's dtype as [`PtTensor::from_f32`] does.
    ///
    /// # Panics
    /// If the elements run past the tensor, or it is an `int64` one.
    pub fn write_f32(&mut self, start: usize, values: &[f32]) {
        let size = self.dtype.element_size();
        let out = &mut self.data[start * size..(start + values.len()) * size];
        match self.dtype {
            PtDtype::F32 => {
                for (out, v) in out.chunks_exact_mut(4).zip(values) {
                    out.copy_from_slice(&v.to_le_bytes());
                }
            }
            PtDtype::F16 => {
                for (out, v) in out.chunks_exact_mut(2).zip(values) {
                    out.copy_from_slice(&f16::from_f32(*v).to_le_bytes());
                }
            }
            PtDtype::BF16 => {
                for (out, v) in out.chunks_exact_mut(2).zip(values) {
                    out.copy_from_slice(&bf16::from_f32(*v).to_le_bytes());
                }
            }
            PtDtype::I64 => panic!("PtTensor::write_f32 into an int64 tensor"),
        }
    }

    /// Number of elements (1 for a 0-dim tensor).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The elements as `f32` (`I64` values are cast, possibly losing precision).
    pub fn to_f32_vec(&self) -> Result<Vec<f32>, PtError> {
        self.check_len()?;
        let values = match self.dtype {
            PtDtype::F32 => self
                .data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            PtDtype::F16 => self
                .data
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            PtDtype::BF16 => self
                .data
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            PtDtype::I64 => self
                .data
                .chunks_exact(8)
                .map(|b| {
                    let mut le = [0u8; 8];
                    le.copy_from_slice(b);
                    i64::from_le_bytes(le) as f32
                })
                .collect(),
        };
        Ok(values)
    }

    /// Checks that `data` holds exactly `numel` elements of `dtype`.
    pub(super) fn check_len(&self) -> Result<(), PtError> {
        let expected = self
            .shape
            .iter()
            .try_fold(self.dtype.element_size(), |acc, &d| acc.checked_mul(d));
        match expected {
            Some(n) if n == self.data.len() => Ok(()),
            Some(n) => Err(PtError::Tensor(format!(
                "{:?} tensor of shape {:?} needs {n} bytes but has {}",
                self.dtype,
                self.shape,
                self.data.len()
            ))),
            None => Err(PtError::Tensor(format!(
                "shape {:?} overflows the address space",
                self.shape
            ))),
        }
    }
}

/// Row-major strides of a contiguous tensor, the way torch computes them
/// (a zero-sized dimension counts as 1).
pub(super) fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![0; shape.len()];
    let mut acc = 1usize;
    for (stride, &size) in strides.iter_mut().zip(shape).rev() {
        *stride = acc;
        acc = acc.saturating_mul(size.max(1));
    }
    strides
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows written into zeros at their offsets are the tensor `from_f32`
    /// builds from the padded values, in every store dtype.
    #[test]
    fn rows_written_into_zeros_equal_from_f32() {
        let padded = [1.5f32, -0.1, 0.0, 3.3e-3, 7.0, 0.0, 0.0, 0.0, 65504.0];
        for store in [StoreDtype::F32, StoreDtype::F16, StoreDtype::BF16] {
            let mut tensor = PtTensor::zeros(vec![3, 3], store);
            tensor.write_f32(0, &padded[..2]);
            tensor.write_f32(3, &padded[3..5]);
            tensor.write_f32(8, &padded[8..]);
            assert_eq!(
                tensor,
                PtTensor::from_f32(vec![3, 3], &padded, store),
                "{store}"
            );
        }
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn writes_past_the_end_panic() {
        PtTensor::zeros(vec![2], StoreDtype::F32).write_f32(1, &[1.0, 2.0]);
    }

    #[test]
    fn store_dtype_names_round_trip() {
        for dtype in [StoreDtype::F32, StoreDtype::F16, StoreDtype::BF16] {
            assert_eq!(dtype.to_string().parse::<StoreDtype>().unwrap(), dtype);
            let json = serde_json::to_string(&dtype).unwrap();
            assert_eq!(json, format!("\"{dtype}\""));
            assert_eq!(serde_json::from_str::<StoreDtype>(&json).unwrap(), dtype);
        }
        assert!("F32".parse::<StoreDtype>().is_err());
        assert_eq!(StoreDtype::BF16.element_size(), 2);
    }

    #[test]
    fn conversion_rounds_to_nearest_even() {
        // 1 + 2^-8 is halfway between two bf16 values; ties go to the even one (1.0).
        let t = PtTensor::from_f32(vec![2], &[1.0 + 1.0 / 256.0, -2.5], StoreDtype::BF16);
        assert_eq!(t.to_f32_vec().unwrap(), vec![1.0, -2.5]);
        let t = PtTensor::from_f32(vec![], &[65504.0], StoreDtype::F16);
        assert_eq!(t.numel(), 1);
        assert_eq!(t.to_f32_vec().unwrap(), vec![65504.0]);
    }

    #[test]
    fn strides_match_torch() {
        assert_eq!(contiguous_strides(&[2, 3, 4]), vec![12, 4, 1]);
        assert_eq!(contiguous_strides(&[3, 0]), vec![1, 1]);
        assert_eq!(contiguous_strides(&[0, 3]), vec![3, 1]);
        assert!(contiguous_strides(&[]).is_empty());
    }

    #[test]
    fn length_mismatch_is_an_error() {
        let t = PtTensor {
            dtype: PtDtype::I64,
            shape: vec![2],
            data: vec![0; 8].into(),
        };
        assert!(t.to_f32_vec().is_err());
    }
}
