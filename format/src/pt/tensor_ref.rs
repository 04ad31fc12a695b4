//! Tensors as the pickle describes them: strided views into storages.

use std::ops::Range;

use super::PtError;
use super::tensor::{PtDtype, PtTensor};

/// A tensor as `_rebuild_tensor_v2` sees it: a view of `shape` and `stride`
/// (in elements) starting `storage_offset` elements into the storage
/// `<archive>/data/<storage_key>`. Views saved from one tensor share a storage.
///
/// Only the reader builds these, after checking that every element of the
/// view lies inside the storage and that all sizes fit in `usize`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorRef {
    dtype: PtDtype,
    storage_key: String,
    storage_numel: u64,
    storage_offset: u64,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

/// Where a tensor's bytes are: `len` bytes starting `offset` bytes into the
/// data of zip entry `entry`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpan {
    pub entry: String,
    pub offset: u64,
    pub len: u64,
}

impl TensorRef {
    /// Checks the view against its storage and builds it.
    pub(super) fn new(
        dtype: PtDtype,
        storage_key: String,
        storage_numel: u64,
        storage_offset: u64,
        shape: Vec<usize>,
        stride: Vec<usize>,
    ) -> Result<Self, PtError> {
        let fail = |what: &str| {
            PtError::Tensor(format!(
                "{what} (storage {storage_key} of {storage_numel} elements, offset \
                 {storage_offset}, shape {shape:?}, stride {stride:?})"
            ))
        };
        if shape.len() != stride.len() {
            return Err(fail("shape and stride differ in length"));
        }
        let element_size = dtype.element_size() as u64;
        storage_numel
            .checked_mul(element_size)
            .and_then(|b| usize::try_from(b).ok())
            .ok_or_else(|| fail("storage too large"))?;
        let numel = shape
            .iter()
            .try_fold(element_size as usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| fail("tensor too large"))?;
        let outside = if numel == 0 {
            storage_offset > storage_numel
        } else {
            // Offset of the last element; every other one lies below it.
            let last = shape
                .iter()
                .zip(&stride)
                .try_fold(storage_offset, |acc, (&size, &step)| {
                    let span = (size as u64 - 1).checked_mul(step as u64)?;
                    acc.checked_add(span)
                });
            last.is_none_or(|last| last >= storage_numel)
        };
        if outside {
            return Err(fail("view reaches past the end of its storage"));
        }
        Ok(TensorRef {
            dtype,
            storage_key,
            storage_numel,
            storage_offset,
            shape,
            stride,
        })
    }

    pub fn dtype(&self) -> PtDtype {
        self.dtype
    }

    /// Key of the storage: its data is the entry `<archive>/data/<key>`.
    pub fn storage_key(&self) -> &str {
        &self.storage_key
    }

    /// Elements in the whole storage.
    pub fn storage_numel(&self) -> u64 {
        self.storage_numel
    }

    /// Index of the view's first element in the storage.
    pub fn storage_offset(&self) -> u64 {
        self.storage_offset
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Strides in elements, one per dimension.
    pub fn stride(&self) -> &[usize] {
        &self.stride
    }

    /// Number of elements of the view.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes of the materialised tensor.
    pub fn nbytes(&self) -> usize {
        self.numel() * self.dtype.element_size()
    }

    /// Whether the view is one run of consecutive elements in row-major order
    /// (torch's rule: dimensions of size 1 may have any stride).
    pub fn is_contiguous(&self) -> bool {
        if self.numel() == 0 {
            return true;
        }
        let mut expected = 1usize;
        for (&size, &step) in self.shape.iter().zip(&self.stride).rev() {
            if size != 1 && step != expected {
                return false;
            }
            expected *= size;
        }
        true
    }

    /// Name of the zip entry holding the storage, in archive `prefix`.
    pub fn storage_entry(&self, prefix: &str) -> String {
        format!("{prefix}/data/{}", self.storage_key)
    }

    /// Byte range of the view within its storage, for a contiguous view.
    pub fn storage_byte_range(&self) -> Result<Range<u64>, PtError> {
        if !self.is_contiguous() {
            return Err(PtError::Tensor(format!(
                "view of storage {} with shape {:?} and stride {:?} is not contiguous; \
                 read the whole storage",
                self.storage_key, self.shape, self.stride
            )));
        }
        let element_size = self.dtype.element_size() as u64;
        let start = self.storage_offset * element_size;
        Ok(start..start + self.nbytes() as u64)
    }

    /// Copies the view's elements out of `storage` (the bytes of its whole
    /// storage) into a dense row-major tensor.
    pub(super) fn materialise(&self, storage: &[u8]) -> Result<PtTensor, PtError> {
        let element_size = self.dtype.element_size();
        let expected = self.storage_numel as usize * element_size;
        if storage.len() != expected {
            return Err(PtError::Tensor(format!(
                "storage {} has {} bytes but {} {:?} elements need {expected}",
                self.storage_key,
                storage.len(),
                self.storage_numel,
                self.dtype
            )));
        }
        let data = if self.numel() == 0 {
            Vec::new()
        } else if self.is_contiguous() {
            let range = self.storage_byte_range()?;
            storage
                .get(range.start as usize..range.end as usize)
                .ok_or_else(|| PtError::Tensor("view outside its storage".into()))?
                .to_vec()
        } else {
            self.gather(storage, element_size)
        };
        Ok(PtTensor {
            dtype: self.dtype,
            shape: self.shape.clone(),
            data: data.into(),
        })
    }

    /// Row-major copy of a strided, non-empty view (bounds checked in `new`).
    fn gather(&self, storage: &[u8], element_size: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.nbytes());
        let ndim = self.shape.len();
        // A dimension of size 1 never steps, whatever its stride says.
        let stride: Vec<usize> = (self.shape.iter().zip(&self.stride))
            .map(|(&size, &step)| if size == 1 { 0 } else { step })
            .collect();
        let mut index = vec![0usize; ndim];
        let mut pos = self.storage_offset as usize;
        loop {
            let start = pos * element_size;
            out.extend_from_slice(&storage[start..start + element_size]);
            // Advance the multi-index like an odometer, last dimension fastest.
            let mut dim = ndim;
            loop {
                if dim == 0 {
                    return out;
                }
                dim -= 1;
                index[dim] += 1;
                pos += stride[dim];
                if index[dim] < self.shape[dim] {
                    break;
                }
                pos -= stride[dim] * self.shape[dim];
                index[dim] = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn storage(n: u64) -> Vec<u8> {
        (0..n).flat_map(|i| (i as f32).to_le_bytes()).collect()
    }

    fn view(offset: u64, shape: Vec<usize>, stride: Vec<usize>) -> Result<TensorRef, PtError> {
        TensorRef::new(PtDtype::F32, "0".into(), 12, offset, shape, stride)
    }

    #[test]
    fn transposed_view_is_gathered() {
        let t = view(0, vec![4, 3], vec![1, 4]).unwrap();
        assert!(!t.is_contiguous());
        assert!(t.storage_byte_range().is_err());
        let values = t.materialise(&storage(12)).unwrap().to_f32_vec().unwrap();
        assert_eq!(
            values,
            vec![0., 4., 8., 1., 5., 9., 2., 6., 10., 3., 7., 11.]
        );
    }

    #[test]
    fn offset_slice() {
        let t = view(6, vec![2, 2], vec![4, 1]).unwrap();
        assert!(!t.is_contiguous());
        let values = t.materialise(&storage(12)).unwrap().to_f32_vec().unwrap();
        assert_eq!(values, vec![6., 7., 10., 11.]);
        let row = view(4, vec![1, 4], vec![99, 1]).unwrap();
        assert!(row.is_contiguous());
        assert_eq!(row.storage_byte_range().unwrap(), 16..32);
    }

    #[test]
    fn scalar_and_empty_views() {
        let scalar = view(11, vec![], vec![]).unwrap();
        let t = scalar.materialise(&storage(12)).unwrap();
        assert_eq!(t.to_f32_vec().unwrap(), vec![11.0]);
        let empty = view(12, vec![0, 5], vec![5, 1]).unwrap();
        assert_eq!(empty.materialise(&storage(12)).unwrap().data.len(), 0);
        let broadcast = view(3, vec![3], vec![0]).unwrap();
        let values = broadcast.materialise(&storage(12)).unwrap().to_f32_vec();
        assert_eq!(values.unwrap(), vec![3., 3., 3.]);
    }

    #[test]
    fn out_of_bounds_views_are_rejected() {
        assert!(view(12, vec![], vec![]).is_err());
        assert!(view(13, vec![0], vec![1]).is_err());
        assert!(view(0, vec![4, 4], vec![4, 1]).is_err());
        assert!(view(0, vec![2], vec![1, 1]).is_err());
        assert!(view(u64::MAX, vec![2], vec![1]).is_err());
        assert!(view(0, vec![usize::MAX, 2], vec![0, 0]).is_err());
        let t = view(0, vec![12], vec![1]).unwrap();
        assert!(t.materialise(&storage(11)).is_err());
    }
}
