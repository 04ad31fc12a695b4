//! Malformed input gives errors, never panics.

use super::{archive, dict, tensor, text};
use crate::pt::pickle_write::pickle_value;
use crate::pt::{PtDtype, PtTensor, PtValue, StoreDtype, decode_pt, encode_pt};

/// A small value with every kind of node and tensors of each dtype.
fn small_value() -> PtValue {
    let ints = PtTensor {
        dtype: PtDtype::I64,
        shape: vec![2],
        data: [-3i64, 1 << 40]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
    };
    dict(vec![
        ("t", tensor(&[2, 3], 0.0, StoreDtype::F16)),
        ("s", tensor(&[], 1.0, StoreDtype::BF16)),
        ("e", tensor(&[0, 2], 0.0, StoreDtype::F32)),
        ("i", PtValue::Tensor(ints)),
        (
            "l",
            PtValue::List(vec![
                PtValue::Int(70000),
                PtValue::Int(-1 << 40),
                PtValue::Float(0.5),
                text("é"),
                PtValue::Tuple(vec![PtValue::None, PtValue::Bool(true)]),
            ]),
        ),
    ])
}

const MASKS: [u8; 3] = [0x01, 0x80, 0xFF];

#[test]
fn every_truncation_is_an_error() {
    let bytes = encode_pt(&small_value(), "small").unwrap();
    for len in 0..bytes.len() {
        assert!(decode_pt(&bytes[..len]).is_err(), "truncated to {len}");
    }
}

#[test]
fn flipped_file_bytes_never_panic() {
    let value = small_value();
    let bytes = encode_pt(&value, "small").unwrap();
    for pos in 0..bytes.len() {
        for mask in MASKS {
            let mut corrupt = bytes.clone();
            corrupt[pos] ^= mask;
            // CRCs catch flips in entry data; flips in padding, timestamps or
            // unused fields may still decode, but only to the same value.
            if let Ok(decoded) = decode_pt(&corrupt) {
                assert_eq!(decoded, value, "flip {mask:#x} at {pos}");
            }
        }
    }
}

/// Corrupts the pickle itself (CRCs recomputed) to reach the unpickler and
/// the tensor checks with every truncation and flip.
#[test]
fn corrupt_pickles_never_panic() {
    let value = small_value();
    let pickled = pickle_value(&value).unwrap();
    let storages: Vec<&[u8]> = pickled.storages.iter().map(|t| &t.data[..]).collect();
    let pickle = pickled.pickle;
    assert_eq!(decode_pt(&archive(&pickle, &storages)).unwrap(), value);
    for len in 0..pickle.len() {
        let err = decode_pt(&archive(&pickle[..len], &storages)).unwrap_err();
        assert!(
            err.to_string().contains("pickle"),
            "truncated to {len}: {err}"
        );
    }
    for pos in 0..pickle.len() {
        for mask in MASKS {
            let mut corrupt = pickle.clone();
            corrupt[pos] ^= mask;
            let _ = decode_pt(&archive(&corrupt, &storages));
        }
    }
}

#[test]
fn errors_say_what_failed() {
    let message = |bytes: &[u8]| decode_pt(bytes).unwrap_err().to_string();
    assert_eq!(
        message(b"plainly not a zip file at all"),
        "not a zip file: end of central directory not found"
    );
    assert_eq!(
        message(&archive(b"\x80\x02K", &[])),
        "truncated pickle at byte 3"
    );
    // pickle.dumps(os.system, protocol=2)
    let global = message(&archive(b"\x80\x02cposix\nsystem\nq\x00.", &[]));
    assert_eq!(global, "pickle global posix.system is not allowed");
    let double = message(&archive(b"\x80\x02ctorch\nDoubleStorage\n.", &[]));
    assert_eq!(double, "pickle global torch.DoubleStorage is not allowed");
    // pickle.dumps({1: 2}, protocol=4)
    let int_key = b"\x80\x04\x95\x08\x00\x00\x00\x00\x00\x00\x00}\x94K\x01K\x02s.";
    assert_eq!(
        message(&archive(int_key, &[])),
        "unsupported value: dict key of type int"
    );
    assert!(message(&archive(b"\x80\x02\xff.", &[])).contains("opcode 0xff at byte 2"));

    let one = tensor(&[2], 0.0, StoreDtype::F32);
    let pickled = pickle_value(&one).unwrap();
    assert_eq!(
        message(&archive(&pickled.pickle, &[])),
        "entry t/data/0 missing"
    );
    let short = message(&archive(&pickled.pickle, &[&[0; 4]]));
    assert!(short.contains("entry t/data/0 has 4 bytes"), "{short}");

    let mut no_pickle = encode_pt(&PtValue::None, "n").unwrap();
    while let Some(at) = no_pickle.windows(8).position(|w| w == b"data.pkl") {
        no_pickle[at..at + 8].copy_from_slice(b"data.pkx");
    }
    assert_eq!(message(&no_pickle), "entry n/data.pkl missing");
}
