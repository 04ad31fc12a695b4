//! Pickle protocol 2 writer for [`PtValue`]s.
//!
//! Emits only opcodes torch's weights-only unpickler accepts and no memo
//! opcodes. Tensors are pickled the way `torch.save` pickles them:
//! `_rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())` with a
//! `('storage', torch.<Type>Storage, key, 'cpu', numel)` persistent id, each
//! tensor getting its own storage, keyed "0", "1", ... in document order.

use std::collections::HashSet;

use super::PtError;
use super::opcodes::*;
use super::tensor::{PtTensor, contiguous_strides};
use super::value::{MAX_DEPTH, PtValue};

/// A pickled value and the tensors whose data must be stored, in key order.
pub(super) struct Pickled<'a> {
    pub(super) pickle: Vec<u8>,
    pub(super) storages: Vec<&'a PtTensor>,
}

/// Pickles `value` (protocol 2).
pub(super) fn pickle_value(value: &PtValue) -> Result<Pickled<'_>, PtError> {
    let mut writer = Writer {
        out: vec![PROTO, 2],
        storages: Vec::new(),
    };
    writer.value(value, 0)?;
    writer.out.push(STOP);
    Ok(Pickled {
        pickle: writer.out,
        storages: writer.storages,
    })
}

struct Writer<'a> {
    out: Vec<u8>,
    storages: Vec<&'a PtTensor>,
}

impl<'a> Writer<'a> {
    fn value(&mut self, value: &'a PtValue, depth: usize) -> Result<(), PtError> {
        if depth > MAX_DEPTH {
            return Err(PtError::Limit(format!(
                "value nested deeper than {MAX_DEPTH} levels"
            )));
        }
        match value {
            PtValue::None => self.out.push(NONE),
            PtValue::Bool(b) => self.out.push(if *b { NEWTRUE } else { NEWFALSE }),
            PtValue::Int(i) => self.int(*i),
            PtValue::Float(x) => {
                self.out.push(BINFLOAT);
                self.out.extend_from_slice(&x.to_be_bytes());
            }
            PtValue::Str(s) => self.str(s)?,
            PtValue::List(items) => {
                self.out.push(EMPTY_LIST);
                if !items.is_empty() {
                    self.out.push(MARK);
                    for item in items {
                        self.value(item, depth + 1)?;
                    }
                    self.out.push(APPENDS);
                }
            }
            PtValue::Tuple(items) => {
                let close = self.open_tuple(items.len());
                for item in items {
                    self.value(item, depth + 1)?;
                }
                self.out.push(close);
            }
            PtValue::Dict(entries) => {
                self.out.push(EMPTY_DICT);
                if !entries.is_empty() {
                    let mut seen = HashSet::with_capacity(entries.len());
                    self.out.push(MARK);
                    for (key, item) in entries {
                        if !seen.insert(key.as_str()) {
                            return Err(PtError::Unsupported(format!(
                                "duplicate dict key {key:?}"
                            )));
                        }
                        self.str(key)?;
                        self.value(item, depth + 1)?;
                    }
                    self.out.push(SETITEMS);
                }
            }
            PtValue::Tensor(tensor) => self.tensor(tensor)?,
        }
        Ok(())
    }

    /// Writes the opening of a tuple of `len` items and returns the opcode
    /// that closes it.
    fn open_tuple(&mut self, len: usize) -> u8 {
        match len {
            0 => EMPTY_TUPLE,
            1 => TUPLE1,
            2 => TUPLE2,
            3 => TUPLE3,
            _ => {
                self.out.push(MARK);
                TUPLE
            }
        }
    }

    /// The smallest integer opcode, like CPython's `save_long`.
    fn int(&mut self, i: i64) {
        if let Ok(small) = u8::try_from(i) {
            self.out.extend_from_slice(&[BININT1, small]);
        } else if let Ok(small) = u16::try_from(i) {
            self.out.push(BININT2);
            self.out.extend_from_slice(&small.to_le_bytes());
        } else if let Ok(small) = i32::try_from(i) {
            self.out.push(BININT);
            self.out.extend_from_slice(&small.to_le_bytes());
        } else {
            // Minimal two's complement, little-endian: drop high bytes that
            // only repeat the sign of the byte below them.
            let bytes = i.to_le_bytes();
            let mut len = bytes.len();
            while len > 1 {
                let (top, next) = (bytes[len - 1], bytes[len - 2]);
                let redundant =
                    (top == 0x00 && next & 0x80 == 0) || (top == 0xFF && next & 0x80 != 0);
                if !redundant {
                    break;
                }
                len -= 1;
            }
            self.out.extend_from_slice(&[LONG1, len as u8]);
            self.out.extend_from_slice(&bytes[..len]);
        }
    }

    fn str(&mut self, s: &str) -> Result<(), PtError> {
        let len = u32::try_from(s.len())
            .map_err(|_| PtError::Limit(format!("string of {} bytes", s.len())))?;
        self.out.push(BINUNICODE);
        self.out.extend_from_slice(&len.to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
        Ok(())
    }

    fn global(&mut self, module: &str, name: &str) {
        self.out.push(GLOBAL);
        for part in [module, name] {
            self.out.extend_from_slice(part.as_bytes());
            self.out.push(b'\n');
        }
    }

    fn ints(&mut self, values: &[usize]) -> Result<(), PtError> {
        let close = self.open_tuple(values.len());
        for &v in values {
            let v = i64::try_from(v).map_err(|_| PtError::Limit(format!("dimension {v}")))?;
            self.int(v);
        }
        self.out.push(close);
        Ok(())
    }

    fn tensor(&mut self, tensor: &'a PtTensor) -> Result<(), PtError> {
        tensor.check_len()?;
        let key = self.storages.len().to_string();
        self.storages.push(tensor);
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.out.push(MARK);
        // Persistent id of the storage.
        self.out.push(MARK);
        self.str("storage")?;
        self.global("torch", tensor.dtype.storage_class());
        self.str(&key)?;
        self.str("cpu")?;
        let numel = i64::try_from(tensor.numel())
            .map_err(|_| PtError::Limit(format!("tensor of {} elements", tensor.numel())))?;
        self.int(numel);
        self.out.push(TUPLE);
        self.out.push(BINPERSID);
        // storage_offset, size, stride, requires_grad, backward_hooks.
        self.int(0);
        self.ints(&tensor.shape)?;
        self.ints(&contiguous_strides(&tensor.shape))?;
        self.out.push(NEWFALSE);
        self.global("collections", "OrderedDict");
        self.out.extend_from_slice(&[EMPTY_TUPLE, REDUCE]);
        self.out.extend_from_slice(&[TUPLE, REDUCE]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pickled(value: &PtValue) -> Vec<u8> {
        pickle_value(value).unwrap().pickle
    }

    #[test]
    fn integers_use_the_smallest_opcode() {
        let cases: [(i64, &[u8]); 8] = [
            (0, &[BININT1, 0]),
            (255, &[BININT1, 255]),
            (256, &[BININT2, 0, 1]),
            (-1, &[BININT, 0xFF, 0xFF, 0xFF, 0xFF]),
            (65536, &[BININT, 0, 0, 1, 0]),
            (1 << 31, &[LONG1, 5, 0, 0, 0, 0x80, 0]),
            (-(1 << 31) - 1, &[LONG1, 5, 0xFF, 0xFF, 0xFF, 0x7F, 0xFF]),
            (i64::MIN, &[LONG1, 8, 0, 0, 0, 0, 0, 0, 0, 0x80]),
        ];
        for (i, expected) in cases {
            let bytes = pickled(&PtValue::Int(i));
            assert_eq!(&bytes[2..bytes.len() - 1], expected, "{i}");
        }
    }

    #[test]
    fn matches_cpython_for_containers() {
        // pickle.dumps({'a': [1, 'x'], 'b': (1.5, None, True)}, protocol=2)
        // with the memo opcodes (BINPUT) removed.
        let value = PtValue::Dict(vec![
            (
                "a".into(),
                PtValue::List(vec![PtValue::Int(1), PtValue::Str("x".into())]),
            ),
            (
                "b".into(),
                PtValue::Tuple(vec![
                    PtValue::Float(1.5),
                    PtValue::None,
                    PtValue::Bool(true),
                ]),
            ),
        ]);
        let expected = b"\x80\x02}(X\x01\x00\x00\x00a](K\x01X\x01\x00\x00\x00xeX\x01\x00\x00\x00bG?\xf8\x00\x00\x00\x00\x00\x00N\x88\x87u.";
        assert_eq!(pickled(&value), expected.to_vec());
    }

    #[test]
    fn duplicate_keys_are_rejected() {
        let value = PtValue::Dict(vec![
            ("k".into(), PtValue::None),
            ("k".into(), PtValue::None),
        ]);
        assert!(pickle_value(&value).is_err());
    }
}
