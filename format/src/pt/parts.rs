//! An encoded `.pt` file held as the parts [`super::encode_pt_parts`]
//! leaves it in: runs of zip records and pickle, and tensors' data moved in
//! whole.

use sha2::{Digest, Sha256};

use super::PtBytes;

/// A `.pt` file in parts; the file is their concatenation, in order. No
/// part is empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PtParts {
    parts: Vec<PtBytes>,
}

impl PtParts {
    pub(super) fn new(parts: Vec<PtBytes>) -> Self {
        debug_assert!(parts.iter().all(|part| !part.is_empty()));
        PtParts { parts }
    }

    /// Size of the file.
    pub fn len(&self) -> u64 {
        self.parts.iter().map(|part| part.len() as u64).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// The parts, in file order.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        self.parts.iter().map(|part| &part[..])
    }

    /// The parts, in file order, to hand on without copying.
    pub fn into_parts(self) -> Vec<PtBytes> {
        self.parts
    }

    /// The whole file (copied together unless it is one part).
    pub fn into_bytes(mut self) -> Vec<u8> {
        if self.parts.len() == 1 {
            return self.parts.pop().unwrap_or_default().into_vec();
        }
        let mut bytes = Vec::with_capacity(usize::try_from(self.len()).unwrap_or(0));
        for part in &self.parts {
            bytes.extend_from_slice(part);
        }
        bytes
    }

    /// SHA-256 of the whole file, lowercase hex.
    pub fn sha256(&self) -> String {
        let mut hasher = Sha256::new();
        for part in &self.parts {
            hasher.update(part);
        }
        hex::encode(hasher.finalize())
    }
}
