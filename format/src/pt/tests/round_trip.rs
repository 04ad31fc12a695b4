//! encode → decode gives back the value, for every store dtype.

use super::{archive, artifact, dict, edge_cases, tensor};
use crate::pt::pickle_read::unpickle;
use sha2::{Digest, Sha256};

use crate::pt::{
    PtError, PtTensor, PtTree, PtValue, StoreDtype, decode_pt, encode_pt, encode_pt_parts,
};

const STORES: [StoreDtype; 3] = [StoreDtype::F32, StoreDtype::F16, StoreDtype::BF16];

#[test]
fn artifacts_round_trip() {
    for store in STORES {
        for n in [1, 5] {
            let value = artifact(store, n);
            let bytes = encode_pt(&value, "artifact").unwrap();
            assert_eq!(decode_pt(&bytes).unwrap(), value, "{store} n={n}");
        }
    }
}

#[test]
fn edge_cases_round_trip() {
    for store in STORES {
        let value = edge_cases(store);
        let bytes = encode_pt(&value, "edge").unwrap();
        let decoded = decode_pt(&bytes).unwrap();
        assert_eq!(decoded, value, "{store}");
        let scalar = decoded.get("scalar").and_then(PtTree::as_tensor).unwrap();
        assert!(scalar.shape.is_empty());
        assert_eq!(scalar.numel(), 1);
    }
}

#[test]
fn bare_values_round_trip() {
    let bare = [
        tensor(&[4], 1.0, StoreDtype::F32),
        tensor(&[], 1.0, StoreDtype::BF16),
        PtValue::None,
        PtValue::Int(-5),
        PtValue::List(vec![tensor(&[2, 1, 2], 0.5, StoreDtype::F16); 3]),
    ];
    for value in bare {
        let bytes = encode_pt(&value, "bare").unwrap();
        assert_eq!(decode_pt(&bytes).unwrap(), value);
    }
}

#[test]
fn encoding_is_deterministic() {
    let value = artifact(StoreDtype::BF16, 3);
    assert_eq!(
        encode_pt(&value, "a").unwrap(),
        encode_pt(&value, "a").unwrap()
    );
}

/// The parts writer writes the bytes `encode_pt` writes, with tensors of
/// 64 KiB or more as parts of their own.
#[test]
fn parts_are_the_bytes_encode_pt_writes() {
    for store in [StoreDtype::F32, StoreDtype::F16, StoreDtype::BF16] {
        for (value, big_tensors) in [
            // [200, 200] attention matrices are 80 KB in 16 bits.
            (artifact(store, 200), 3),
            (artifact(store, 3), 0),
            (edge_cases(store), 0),
        ] {
            let bytes = encode_pt(&value, "p").unwrap();
            let parts = encode_pt_parts(value.clone(), "p").unwrap();
            assert_eq!(parts.len(), bytes.len() as u64);
            assert_eq!(parts.iter().count(), 1 + 2 * big_tensors, "{store}");
            assert_eq!(parts.sha256(), hex::encode(Sha256::digest(&bytes)));
            assert!(parts.into_bytes() == bytes, "{store}");
        }
    }
}

/// Tensors holding their f32 values (moved in, not converted) encode to
/// the bytes the converted ones do, big ones as parts of their own, and
/// the file keeps the values' buffer.
#[test]
fn f32_values_moved_in_encode_like_converted_ones() {
    let values: Vec<f32> = (0..40_000).map(|i| (i as f32 * 0.37).sin()).collect();
    let small = vec![1.5f32, -2.0, 3.25];
    let shapes = [vec![200, 200], vec![3]];
    let build = |moved: bool| {
        let tensors = [values.clone(), small.clone()]
            .into_iter()
            .zip(shapes.clone())
            .map(|(v, shape)| {
                let t = if moved {
                    PtTensor::from_f32_vec(shape, v, StoreDtype::F32)
                } else {
                    PtTensor::from_f32(shape, &v, StoreDtype::F32)
                };
                PtValue::Tensor(t)
            });
        PtValue::List(tensors.collect())
    };
    let (converted, moved) = (build(false), build(true));
    assert_eq!(moved, converted);
    let address = match &moved {
        PtValue::List(items) => match &items[0] {
            PtValue::Tensor(t) => t.data.as_ptr() as usize,
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    };
    let bytes = encode_pt(&converted, "p").unwrap();
    assert!(encode_pt(&moved, "p").unwrap() == bytes);
    let parts = encode_pt_parts(moved, "p").unwrap();
    assert_eq!(parts.iter().count(), 3, "headers, the big tensor, the rest");
    assert_eq!(parts.iter().nth(1).unwrap().as_ptr() as usize, address);
    assert!(parts.into_bytes() == bytes);
    // In another store dtype the values are converted.
    let half = PtTensor::from_f32_vec(vec![3], small.clone(), StoreDtype::BF16);
    assert_eq!(half, PtTensor::from_f32(vec![3], &small, StoreDtype::BF16));
}

#[test]
fn invalid_values_are_rejected_on_write() {
    let mut bad = artifact(StoreDtype::F32, 2);
    if let PtValue::Dict(entries) = &mut bad {
        entries.push(("prompt".into(), PtValue::None));
    }
    assert!(encode_pt(&bad, "a").is_err(), "duplicate key");
    assert!(encode_pt_parts(bad, "a").is_err(), "duplicate key");
    let mut short = tensor(&[3], 0.0, StoreDtype::F16);
    if let PtValue::Tensor(t) = &mut short {
        let len = t.data.len();
        t.data = t.data[..len - 1].to_vec().into();
    }
    let err = encode_pt(&short, "a").unwrap_err();
    assert!(matches!(err, PtError::Tensor(_)), "{err}");
    let err = encode_pt_parts(short, "a").unwrap_err();
    assert!(matches!(err, PtError::Tensor(_)), "{err}");
    assert!(encode_pt_parts(PtValue::None, "a/b").is_err());
    assert!(encode_pt(&PtValue::None, "a/b").is_err());
    assert!(encode_pt(&PtValue::None, "").is_err());
    let mut deep = PtValue::None;
    for _ in 0..200 {
        deep = PtValue::List(vec![deep]);
    }
    assert!(matches!(encode_pt(&deep, "a"), Err(PtError::Limit(_))));
}

/// Pickles written by CPython with other protocols and memo opcodes.
#[test]
fn reads_cpython_pickles() {
    // pickle.dumps({'a': [1, 'x', 2**40], 'b': 1.5}, protocol=4)
    let proto4 = b"\x80\x04\x95(\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\x01a\x94]\x94(K\x01\x8c\x01x\x94\x8a\x06\x00\x00\x00\x00\x00\x01e\x8c\x01b\x94G?\xf8\x00\x00\x00\x00\x00\x00u.";
    let expected = dict(vec![
        (
            "a",
            PtValue::List(vec![
                PtValue::Int(1),
                PtValue::Str("x".into()),
                PtValue::Int(1 << 40),
            ]),
        ),
        ("b", PtValue::Float(1.5)),
    ]);
    assert_eq!(decode_pt(&archive(proto4, &[])).unwrap(), expected);

    // pickle.dumps(collections.OrderedDict(k=[]), protocol=4): STACK_GLOBAL.
    let ordered = b"\x80\x04\x95)\x00\x00\x00\x00\x00\x00\x00\x8c\x0bcollections\x94\x8c\x0bOrderedDict\x94\x93\x94)R\x94\x8c\x01k\x94]\x94s.";
    let expected = dict(vec![("k", PtValue::List(vec![]))]);
    assert_eq!(decode_pt(&archive(ordered, &[])).unwrap(), expected);

    // OrderedDict with an empty BUILD state, SHORT_BINSTRING key.
    let built = b"\x80\x02ccollections\nOrderedDict\n)R}bU\x01kK\x01s.";
    let expected = dict(vec![("k", PtValue::Int(1))]);
    assert_eq!(decode_pt(&archive(built, &[])).unwrap(), expected);
}

#[test]
fn memo_references_share_objects() {
    // EMPTY_LIST BINPUT 0, BINGET 0, 7 APPEND (to the shared list), TUPLE2:
    // both items are the same list, so both see the append.
    let shared = b"\x80\x02]q\x00h\x00K\x07a\x86.";
    let seven = PtValue::List(vec![PtValue::Int(7)]);
    assert_eq!(
        decode_pt(&archive(shared, &[])).unwrap(),
        PtValue::Tuple(vec![seven.clone(), seven])
    );
    // A re-assigned key keeps its first position, as in Python.
    let reassigned =
        b"\x80\x02}(X\x01\x00\x00\x00aK\x01X\x01\x00\x00\x00bK\x02X\x01\x00\x00\x00aK\x03u.";
    assert_eq!(
        decode_pt(&archive(reassigned, &[])).unwrap(),
        dict(vec![("a", PtValue::Int(3)), ("b", PtValue::Int(2))])
    );
}

#[test]
fn hostile_pickles_hit_limits() {
    // A list appended to itself.
    let cyclic = b"\x80\x02]q\x00(h\x00e.";
    assert!(matches!(unpickle(cyclic), Err(PtError::Limit(_))));
    // Each level references the previous one twice: 2^40 leaves.
    let mut doubling = b"\x80\x02N".to_vec();
    for _ in 0..40 {
        doubling.extend_from_slice(b"q\x00h\x00\x86");
    }
    doubling.push(b'.');
    let err = unpickle(&doubling).unwrap_err();
    assert!(matches!(err, PtError::Limit(_)), "{err}");
}
