//! Files written by real `torch.save` (see `scripts/check_pt.py fixtures`)
//! decode to the values torch itself loads from them.

use std::path::PathBuf;

use serde_json::Value as Json;

use super::describe;
use crate::pt::{
    LOCAL_HEADER_LEN, PtError, PtIndex, PtTree, PtValue, ZipDirectory, decode_pt, encode_pt,
};

const FIXTURES: [&str; 7] = [
    "bare_f32",
    "bare_bf16",
    "bare_f16",
    "nested",
    "views",
    "int64",
    "ordered_empty",
];

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pt")
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(fixture_dir().join(format!("{name}.pt"))).unwrap()
}

fn expected(name: &str) -> Json {
    let text = std::fs::read_to_string(fixture_dir().join(format!("{name}.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// JSON equality, with floats compared to within an ulp or so (serde_json's
/// default float parser may round the last bit differently from Python).
fn same(a: &Json, b: &Json) -> bool {
    match (a, b) {
        (Json::Number(x), Json::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(x), Some(y)) => x == y,
            _ => {
                let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
                x == y || (x - y).abs() <= 1e-15 * x.abs().max(y.abs())
            }
        },
        (Json::Array(x), Json::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y))
        }
        (Json::Object(x), Json::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

#[test]
fn torch_fixtures_decode_like_torch_loads_them() {
    for name in FIXTURES {
        let value = decode_pt(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let (actual, expected) = (describe(&value), expected(name));
        assert!(
            same(&actual, &expected),
            "{name}:\n{actual}\n!=\n{expected}"
        );
    }
}

#[test]
fn bare_tensors_decode_to_tensors() {
    for name in ["bare_f32", "bare_bf16", "bare_f16", "int64"] {
        let value = decode_pt(&fixture(name)).unwrap();
        assert!(matches!(value, PtValue::Tensor(_)), "{name}: {value:?}");
    }
}

#[test]
fn torch_fixtures_survive_a_rewrite() {
    for name in FIXTURES {
        let value = decode_pt(&fixture(name)).unwrap();
        let again = decode_pt(&encode_pt(&value, name).unwrap()).unwrap();
        assert_eq!(again, value, "{name}");
    }
}

/// The ranged-read path: directory from a short tail, pickle, then each
/// contiguous tensor's bytes from its span alone.
#[test]
fn tensors_are_located_without_reading_storages() {
    let bytes = fixture("views");
    let len = bytes.len() as u64;
    let needed = match ZipDirectory::parse_from_tail(&bytes[bytes.len() - 64..], len) {
        Err(PtError::TailTooShort { needed }) => needed,
        other => panic!("expected TailTooShort, got {other:?}"),
    };
    let tail = &bytes[bytes.len() - needed as usize..];
    let directory = ZipDirectory::parse_from_tail(tail, len).unwrap();
    let read = |offset: u64, len: usize| &bytes[offset as usize..offset as usize + len];
    let data_offset = |name: &str| {
        let entry = directory.get(name).unwrap();
        entry
            .data_offset(read(entry.header_offset, LOCAL_HEADER_LEN))
            .unwrap()
    };
    let pickle_entry = PtIndex::pickle_entry(&directory).unwrap();
    let pickle = read(data_offset(&pickle_entry.name), pickle_entry.size as usize);
    let index = PtIndex::new(directory.clone(), pickle).unwrap();
    assert_eq!(index.prefix(), "views");

    let decoded = decode_pt(&bytes).unwrap();
    let mut contiguous = 0;
    for (key, value) in index.root().as_dict().unwrap() {
        let tensor = value.as_tensor().unwrap();
        let expected = decoded.get(key).and_then(PtTree::as_tensor).unwrap();
        match index.locate(tensor) {
            Ok(span) => {
                let start = data_offset(&span.entry) + span.offset;
                assert_eq!(read(start, span.len as usize), &expected.data[..], "{key}");
                contiguous += 1;
            }
            Err(e) => {
                assert!(!tensor.is_contiguous(), "{key}: {e}");
                assert!(e.to_string().contains("not contiguous"), "{e}");
            }
        }
    }
    // base, row and element are contiguous; slice, transposed and expanded are not.
    assert_eq!(contiguous, 3);
    let row = index.root().get("row").unwrap().as_tensor().unwrap();
    let span = index.locate(row).unwrap();
    assert_eq!(
        (span.entry.as_str(), span.offset, span.len),
        ("views/data/0", 32, 16)
    );
}
