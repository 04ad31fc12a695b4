//! [`PtBytes`]: owned bytes of a `.pt` file's part or a tensor's data,
//! either a byte vector or `f32` values moved in whole (a capture's trace
//! rows become a tensor's data without a copy).

use std::fmt;
use std::ops::{Deref, DerefMut};

/// Owned bytes: a `Vec<u8>`, or `f32` values viewed as their
/// little-endian bytes (what an `f32` tensor's data is). Dereferences to
/// `[u8]`.
#[derive(Clone)]
pub struct PtBytes(Repr);

#[derive(Clone)]
enum Repr {
    Bytes(Vec<u8>),
    F32(Vec<f32>),
}

impl PtBytes {
    /// The little-endian bytes of `values`, without copying them (on a
    /// big-endian machine they are converted).
    pub fn from_f32(values: Vec<f32>) -> Self {
        if cfg!(target_endian = "little") {
            PtBytes(Repr::F32(values))
        } else {
            PtBytes(Repr::Bytes(
                values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ))
        }
    }

    /// The bytes as a vector (copied if they were `f32` values).
    pub fn into_vec(self) -> Vec<u8> {
        match self.0 {
            Repr::Bytes(bytes) => bytes,
            Repr::F32(_) => self.to_vec(),
        }
    }
}

impl Default for PtBytes {
    fn default() -> Self {
        PtBytes(Repr::Bytes(Vec::new()))
    }
}

impl From<Vec<u8>> for PtBytes {
    fn from(bytes: Vec<u8>) -> Self {
        PtBytes(Repr::Bytes(bytes))
    }
}

impl FromIterator<u8> for PtBytes {
    fn from_iter<I: IntoIterator<Item = u8>>(iter: I) -> Self {
        PtBytes(Repr::Bytes(iter.into_iter().collect()))
    }
}

impl Deref for PtBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.0 {
            Repr::Bytes(bytes) => bytes,
            // Only built on little-endian machines (`from_f32`), where
            // these are the values' little-endian bytes.
            Repr::F32(values) => bytemuck::cast_slice(values),
        }
    }
}

impl DerefMut for PtBytes {
    fn deref_mut(&mut self) -> &mut [u8] {
        match &mut self.0 {
            Repr::Bytes(bytes) => bytes,
            Repr::F32(values) => bytemuck::cast_slice_mut(values),
        }
    }
}

impl AsRef<[u8]> for PtBytes {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl PartialEq for PtBytes {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for PtBytes {}

impl PartialEq<Vec<u8>> for PtBytes {
    fn eq(&self, other: &Vec<u8>) -> bool {
        **self == **other
    }
}

impl PartialEq<[u8]> for PtBytes {
    fn eq(&self, other: &[u8]) -> bool {
        **self == *other
    }
}

impl fmt::Debug for PtBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_values_are_their_little_endian_bytes() {
        let values = vec![1.5f32, -0.0, f32::MAX, 3.25e-7];
        let expected: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut bytes = PtBytes::from_f32(values);
        assert_eq!(&*bytes, expected.as_slice());
        assert_eq!(bytes, PtBytes::from(expected.clone()));
        assert_eq!(bytes.clone().into_vec(), expected);
        bytes[0..4].copy_from_slice(&2.0f32.to_le_bytes());
        assert_eq!(&bytes[0..4], 2.0f32.to_le_bytes().as_slice());
        assert_eq!(&bytes[4..], &expected[4..]);
    }
}
