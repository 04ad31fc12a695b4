//! Property tests: arbitrary values survive encode → decode (whole-file and
//! ranged), and arbitrary or corrupted bytes never make the reader panic.
//!
//! The case count is kept small so the suite stays fast; set
//! `PROPTEST_CASES` to run more (for example `PROPTEST_CASES=5000`).

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::Config;

use super::archive;
use crate::pt::pickle_read::unpickle;
use crate::pt::{
    LOCAL_HEADER_LEN, PtDtype, PtError, PtIndex, PtSkeleton, PtTensor, PtTree, PtValue,
    ZipDirectory, decode_pt, encode_pt, encode_pt_parts,
};

/// Cases per property unless `PROPTEST_CASES` says otherwise.
const DEFAULT_CASES: u32 = 256;

fn config() -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(DEFAULT_CASES);
    Config {
        cases,
        // Shrinking an encoder failure rarely needs more than this.
        max_shrink_iters: 2048,
        ..Config::default()
    }
}

/// Bit patterns worth hitting on purpose: NaNs (quiet, signalling, negative,
/// with payloads), infinities, signed zeros, subnormals and extremes.
fn special_bits(dtype: PtDtype) -> Vec<u64> {
    match dtype {
        PtDtype::F32 => [
            f32::NAN.to_bits(),
            0x7f80_0001, // signalling NaN
            0xffc0_1234, // negative NaN with payload
            f32::INFINITY.to_bits(),
            f32::NEG_INFINITY.to_bits(),
            (-0.0f32).to_bits(),
            0,
            1, // smallest subnormal
            f32::MAX.to_bits(),
            f32::MIN.to_bits(),
        ]
        .map(u64::from)
        .to_vec(),
        // f16 and bf16: NaNs, infinities, -0, a subnormal and the maxima.
        PtDtype::F16 => vec![
            0x7e00, 0x7c01, 0xfe01, 0x7c00, 0xfc00, 0x8000, 0x0001, 0x7bff,
        ],
        PtDtype::BF16 => vec![
            0x7fc0, 0x7f81, 0xffc1, 0x7f80, 0xff80, 0x8000, 0x0001, 0x7f7f,
        ],
        PtDtype::I64 => [i64::MIN, i64::MAX, -1, 0, 1].map(|v| v as u64).to_vec(),
    }
}

/// One element's little-endian bytes: mostly random bits, sometimes special.
fn element(dtype: PtDtype) -> impl Strategy<Value = Vec<u8>> {
    let size = dtype.element_size();
    prop_oneof![
        3 => any::<u64>(),
        1 => select(special_bits(dtype)),
    ]
    .prop_map(move |bits| bits.to_le_bytes()[..size].to_vec())
}

/// Tensors of every dtype with up to 3 dimensions of 0 to 3 elements,
/// including 0-dim scalars and empty dimensions.
fn any_tensor() -> impl Strategy<Value = PtTensor> {
    let dtypes = select(vec![
        PtDtype::F32,
        PtDtype::F16,
        PtDtype::BF16,
        PtDtype::I64,
    ]);
    (dtypes, vec(0usize..4, 0..=3)).prop_flat_map(|(dtype, shape)| {
        let numel: usize = shape.iter().product();
        vec(element(dtype), numel).prop_map(move |elements| PtTensor {
            dtype,
            shape: shape.clone(),
            data: elements.concat().into(),
        })
    })
}

fn any_int() -> impl Strategy<Value = i64> {
    prop_oneof![
        any::<i64>(),
        select(vec![
            i64::MIN,
            i64::MIN + 1,
            i64::MAX,
            -1,
            0,
            255,
            256,
            65535,
            65536,
            (1 << 31) - 1,
            1 << 31,
            -(1 << 31) - 1,
        ]),
    ]
}

fn any_float() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<f64>(),
        select(vec![
            f64::NAN,
            -f64::NAN,
            f64::from_bits(0x7ff0_0000_0000_0001), // signalling NaN
            f64::from_bits(0xfff8_dead_beef_0001), // negative NaN with payload
            f64::INFINITY,
            f64::NEG_INFINITY,
            -0.0,
            0.0,
            f64::MIN_POSITIVE,
            f64::from_bits(1), // smallest subnormal
            f64::MAX,
            f64::MIN,
        ]),
    ]
}

/// Strings: arbitrary unicode (NUL, control characters, astral planes) and
/// a few that look like pickle or path syntax.
fn any_string() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => any::<String>(),
        1 => select(vec!["", "\0", "data.pkl", "../x", "é🦀\u{202e}", "storage"])
            .prop_map(str::to_owned),
        1 => vec(any::<char>(), 200..400).prop_map(|chars| chars.into_iter().collect()),
    ]
}

fn any_value() -> impl Strategy<Value = PtValue> {
    let leaf = prop_oneof![
        Just(PtValue::None),
        any::<bool>().prop_map(PtValue::Bool),
        any_int().prop_map(PtValue::Int),
        any_float().prop_map(PtValue::Float),
        any_string().prop_map(PtValue::Str),
        any_tensor().prop_map(PtValue::Tensor),
    ];
    leaf.prop_recursive(5, 64, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(PtValue::List),
            vec(inner.clone(), 0..6).prop_map(PtValue::Tuple),
            vec((any_string(), inner), 0..6).prop_map(|entries| {
                // Dict keys are unique in Python; keep the first of each.
                let mut seen = std::collections::HashSet::new();
                PtValue::Dict(
                    entries
                        .into_iter()
                        .filter(|(key, _)| seen.insert(key.clone()))
                        .collect(),
                )
            }),
        ]
    })
}

/// Equality with floats compared by bits, so NaN equals the same NaN and
/// `-0.0` differs from `0.0`.
fn same_bits<T, U>(a: &PtTree<T>, b: &PtTree<U>, tensors: &impl Fn(&T, &U) -> bool) -> bool {
    let all = |xs: &[PtTree<T>], ys: &[PtTree<U>]| {
        xs.len() == ys.len() && xs.iter().zip(ys).all(|(x, y)| same_bits(x, y, tensors))
    };
    match (a, b) {
        (PtTree::None, PtTree::None) => true,
        (PtTree::Bool(x), PtTree::Bool(y)) => x == y,
        (PtTree::Int(x), PtTree::Int(y)) => x == y,
        (PtTree::Float(x), PtTree::Float(y)) => x.to_bits() == y.to_bits(),
        (PtTree::Str(x), PtTree::Str(y)) => x == y,
        (PtTree::List(xs), PtTree::List(ys)) | (PtTree::Tuple(xs), PtTree::Tuple(ys)) => {
            all(xs, ys)
        }
        (PtTree::Dict(xs), PtTree::Dict(ys)) => {
            xs.len() == ys.len()
                && xs
                    .iter()
                    .zip(ys)
                    .all(|((kx, x), (ky, y))| kx == ky && same_bits(x, y, tensors))
        }
        (PtTree::Tensor(x), PtTree::Tensor(y)) => tensors(x, y),
        _ => false,
    }
}

fn same_value(a: &PtValue, b: &PtValue) -> bool {
    same_bits(a, b, &|x: &PtTensor, y: &PtTensor| x == y)
}

/// Every tensor of `value`, in document order.
fn tensors_of<T>(value: &PtTree<T>, out: &mut Vec<T>)
where
    T: Clone,
{
    match value {
        PtTree::Tensor(t) => out.push(t.clone()),
        PtTree::List(items) | PtTree::Tuple(items) => {
            items.iter().for_each(|item| tensors_of(item, out));
        }
        PtTree::Dict(entries) => entries.iter().for_each(|(_, v)| tensors_of(v, out)),
        _ => {}
    }
}

/// The directory read the way a ranged reader does: from a small tail,
/// growing it once to what [`PtError::TailTooShort`] asks for.
fn directory_from_tail(file: &[u8]) -> Result<ZipDirectory, PtError> {
    let file_len = file.len() as u64;
    let tail_start = file.len().saturating_sub(64);
    match ZipDirectory::parse_from_tail(&file[tail_start..], file_len) {
        Err(PtError::TailTooShort { needed }) => {
            let needed = usize::try_from(needed).expect("tail fits in memory");
            assert!(needed <= file.len(), "tail of {needed} bytes asked for");
            ZipDirectory::parse_from_tail(&file[file.len() - needed..], file_len)
        }
        other => other,
    }
}

/// Reads every tensor of `file` through its span alone, as a ranged reader
/// that fetches only a local header and the span would.
fn tensors_by_span(file: &[u8]) -> Result<(PtSkeleton, Vec<Vec<u8>>), TestCaseError> {
    let directory = directory_from_tail(file).map_err(fail)?;
    let pickle = PtIndex::pickle_entry(&directory)
        .and_then(|entry| entry.data(file))
        .map_err(fail)?
        .to_vec();
    let index = PtIndex::new(directory, &pickle).map_err(fail)?;
    let mut refs = Vec::new();
    tensors_of(index.root(), &mut refs);
    let mut datas = Vec::new();
    for tensor in &refs {
        let span = index.locate(tensor).map_err(fail)?;
        let entry = index
            .directory()
            .get(&span.entry)
            .ok_or_else(|| fail(format!("span names missing entry {}", span.entry)))?;
        let header_start = entry.header_offset as usize;
        let header = &file[header_start..header_start + LOCAL_HEADER_LEN];
        let data_start = entry.data_offset(header).map_err(fail)? + span.offset;
        let start = usize::try_from(data_start).map_err(fail)?;
        let end = start + usize::try_from(span.len).map_err(fail)?;
        prop_assert!(
            span.offset + span.len <= entry.size,
            "span {span:?} beyond entry of {} bytes",
            entry.size
        );
        datas.push(file[start..end].to_vec());
    }
    Ok((index.root().clone(), datas))
}

fn fail(error: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(error.to_string())
}

/// Pickle-ish bytes: mostly opcodes the reader knows, so that random
/// programs get past the first byte.
fn pickle_program() -> impl Strategy<Value = Vec<u8>> {
    let opcodes = select(
        b"\x80\x95.(N\x88\x89JKM\x8aGX\x8c\x8dU)t\x85\x86\x87]ae}suqr\x94hjc\x93RbQ".to_vec(),
    );
    vec(prop_oneof![3 => opcodes, 2 => any::<u8>()], 0..256)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn values_round_trip_bitwise(value in any_value()) {
        let bytes = encode_pt(&value, "prop").map_err(fail)?;
        let parts = encode_pt_parts(value.clone(), "prop").map_err(fail)?;
        prop_assert!(parts.into_bytes() == bytes, "the parts writer wrote other bytes");
        let decoded = decode_pt(&bytes).map_err(fail)?;
        prop_assert!(
            same_value(&decoded, &value),
            "decoded {decoded:?}\nexpected {value:?}"
        );
    }

    #[test]
    fn ranged_reads_find_each_tensors_bytes(value in any_value()) {
        let bytes = encode_pt(&value, "ranged").map_err(fail)?;
        let (skeleton, datas) = tensors_by_span(&bytes)?;
        // The skeleton has the value's shape, tensor for tensor.
        let matches_tensor = |r: &crate::pt::TensorRef, t: &PtTensor| {
            r.dtype() == t.dtype && r.shape() == t.shape.as_slice() && r.is_contiguous()
        };
        prop_assert!(same_bits(&skeleton, &value, &matches_tensor), "{skeleton:?}");
        let mut expected = Vec::new();
        tensors_of(&value, &mut expected);
        prop_assert_eq!(datas.len(), expected.len());
        for (data, tensor) in datas.iter().zip(&expected) {
            prop_assert_eq!(&data[..], &tensor.data[..]);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..4096)) {
        let _ = decode_pt(&bytes);
        let len = bytes.len() as u64;
        let _ = ZipDirectory::parse_from_tail(&bytes, len);
        let _ = ZipDirectory::parse_from_tail(&bytes, len.saturating_mul(3));
    }

    #[test]
    fn arbitrary_pickles_never_panic(pickle in pickle_program()) {
        let _ = unpickle(&pickle);
        let storage = [0u8; 64];
        let _ = decode_pt(&archive(&pickle, &[&storage, &storage[..6]]));
    }

    #[test]
    fn flipped_bytes_decode_to_an_error_or_the_value(
        value in any_value(),
        flips in vec((any::<prop::sample::Index>(), 1u8..=255), 1..8),
    ) {
        let mut bytes = encode_pt(&value, "flip").map_err(fail)?;
        for (index, mask) in &flips {
            let pos = index.index(bytes.len());
            bytes[pos] ^= mask;
        }
        // CRCs guard entry data; flips elsewhere (padding, timestamps) may
        // still decode, but never to another value.
        if let Ok(decoded) = decode_pt(&bytes) {
            prop_assert!(same_value(&decoded, &value), "flips {flips:?} gave {decoded:?}");
        }
    }

    #[test]
    fn flipped_pickles_never_panic(
        value in any_value(),
        flips in vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        // Flips inside data.pkl, re-zipped with a valid CRC, reach the unpickler.
        let bytes = encode_pt(&value, "pkl").map_err(fail)?;
        let directory = ZipDirectory::parse_from_tail(&bytes, bytes.len() as u64).map_err(fail)?;
        let mut pickle = PtIndex::pickle_entry(&directory)
            .and_then(|entry| entry.data(&bytes))
            .map_err(fail)?
            .to_vec();
        for (index, byte) in &flips {
            let pos = index.index(pickle.len());
            pickle[pos] = *byte;
        }
        let _ = unpickle(&pickle);
        let _ = decode_pt(&archive(&pickle, &[&[0u8; 24]]));
    }

    #[test]
    fn truncations_are_errors(value in any_value(), cut in any::<prop::sample::Index>()) {
        let bytes = encode_pt(&value, "cut").map_err(fail)?;
        let len = cut.index(bytes.len());
        prop_assert!(decode_pt(&bytes[..len]).is_err(), "prefix of {len} decoded");
        // A tail of the file claims the wrong length: never a panic.
        let _ = decode_pt(&bytes[len..]);
        let _ = ZipDirectory::parse_from_tail(&bytes[len..], bytes.len() as u64);
    }
}

/// Every prefix and suffix of a small file with every node kind.
#[test]
fn every_cut_of_a_small_file_is_an_error() {
    let scalar = PtTensor {
        dtype: PtDtype::BF16,
        shape: vec![],
        data: vec![0xc0, 0x7f].into(),
    };
    let value = PtValue::Dict(vec![
        ("nan".into(), PtValue::Float(f64::NAN)),
        ("s".into(), PtValue::Tensor(scalar)),
        (
            "l".into(),
            PtValue::List(vec![PtValue::Int(i64::MIN), PtValue::Str("é".into())]),
        ),
    ]);
    let bytes = encode_pt(&value, "small").unwrap();
    let full = ZipDirectory::parse_from_tail(&bytes, bytes.len() as u64).unwrap();
    for len in 0..bytes.len() {
        assert!(decode_pt(&bytes[..len]).is_err(), "prefix of {len} bytes");
        assert!(decode_pt(&bytes[len + 1..]).is_err(), "suffix from {len}");
        // A tail either holds the whole central directory or is refused;
        // it never yields a different directory.
        if let Ok(tail) = ZipDirectory::parse_from_tail(&bytes[len..], bytes.len() as u64) {
            assert_eq!(tail.entries(), full.entries(), "tail from {len}");
        }
    }
}
