//! Tests of the `.pt` writer and reader as a whole: round trips, torch
//! fixtures, file layout and corrupt input. Shared helpers live here.

mod corruption;
mod fixtures;
mod layout;
mod proptests;
mod round_trip;
mod torch_loads;

use serde_json::{Value as Json, json};
use sha2::{Digest, Sha256};

use super::{PtDtype, PtTensor, PtValue, StoreDtype};
use crate::pt::zip::{EntryData, ZipWriter};

/// The description `scripts/check_pt.py` prints for a value torch loaded.
fn describe(value: &PtValue) -> Json {
    describe_with(value, false)
}

/// [`describe`] with each tensor's values given as the SHA-256 of its
/// little-endian bytes if `sha256` (`check_pt.py verify --sha256`).
fn describe_with(value: &PtValue, sha256: bool) -> Json {
    let all = |items: &[PtValue]| {
        items
            .iter()
            .map(|v| describe_with(v, sha256))
            .collect::<Vec<_>>()
    };
    match value {
        PtValue::None => Json::Null,
        PtValue::Bool(b) => json!({ "bool": b }),
        PtValue::Int(i) => json!({ "int": i }),
        PtValue::Float(x) => json!({ "float": x }),
        PtValue::Str(s) => json!({ "str": s }),
        PtValue::List(items) => json!({ "list": all(items) }),
        PtValue::Tuple(items) => json!({ "tuple": all(items) }),
        PtValue::Dict(entries) => {
            let entries: Vec<Json> = entries
                .iter()
                .map(|(k, v)| json!([k, describe_with(v, sha256)]))
                .collect();
            json!({ "dict": entries })
        }
        PtValue::Tensor(t) => {
            let dtype = match t.dtype {
                PtDtype::I64 => "int64",
                PtDtype::F32 => "float32",
                PtDtype::F16 => "float16",
                PtDtype::BF16 => "bfloat16",
            };
            if sha256 {
                let digest = hex::encode(Sha256::digest(&t.data));
                return json!({ "tensor": { "dtype": dtype, "shape": t.shape, "sha256": digest } });
            }
            let values = match t.dtype {
                PtDtype::I64 => json!(i64_values(t)),
                _ => {
                    let values: Vec<f64> =
                        t.to_f32_vec().unwrap().into_iter().map(f64::from).collect();
                    json!(values)
                }
            };
            json!({ "tensor": { "dtype": dtype, "shape": t.shape, "values": values } })
        }
    }
}

fn i64_values(t: &PtTensor) -> Vec<i64> {
    t.data
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// A tensor of `shape` with distinct, irregular values.
fn tensor(shape: &[usize], seed: f32, store: StoreDtype) -> PtValue {
    let numel = shape.iter().product();
    let values: Vec<f32> = (0..numel)
        .map(|i| ((i as f32) * 0.37 + seed).sin() * 10.0)
        .collect();
    PtValue::Tensor(PtTensor::from_f32(shape.to_vec(), &values, store))
}

fn dict(entries: Vec<(&str, PtValue)>) -> PtValue {
    PtValue::Dict(
        entries
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
    )
}

fn text(s: &str) -> PtValue {
    PtValue::Str(s.to_owned())
}

/// A capture artifact shaped like the worker's, with `n` prompt tokens.
fn artifact(store: StoreDtype, n: usize) -> PtValue {
    let ids = [2i64, 651, 1 << 40, -7, i64::MAX, i64::MIN];
    dict(vec![
        (
            "prompt",
            dict(vec![
                ("text", text("héllo wörld ✓ 日本語")),
                (
                    "tokens",
                    PtValue::List(vec![text("<bos>"), text("h"), text("é")]),
                ),
                ("token_ids", PtValue::List(ids.map(PtValue::Int).to_vec())),
                (
                    "activations",
                    dict(vec![(
                        "0",
                        dict(vec![
                            ("residual_in", tensor(&[n, 64], 0.0, store)),
                            ("mlp_out", tensor(&[n, 64], 1.0, store)),
                        ]),
                    )]),
                ),
                (
                    "attention",
                    dict(vec![("layer_0", tensor(&[n, n], 2.0, store))]),
                ),
            ]),
        ),
        (
            "response",
            dict(vec![
                ("text", text("")),
                ("num_tokens", PtValue::Int(n as i64 + 1)),
                ("temperature", PtValue::Float(0.7)),
                (
                    "attention",
                    dict(vec![(
                        "layer_0",
                        PtValue::List(vec![
                            tensor(&[n, n], 3.0, store),
                            tensor(&[n + 1, n + 1], 4.0, store),
                        ]),
                    )]),
                ),
            ]),
        ),
    ])
}

/// Edge cases on top of [`artifact`]: empty and 0-dim tensors, int64
/// tensors, extreme numbers, every container shape.
fn edge_cases(store: StoreDtype) -> PtValue {
    let ints = PtTensor {
        dtype: PtDtype::I64,
        shape: vec![2, 2],
        data: [i64::MIN, -1, 0, i64::MAX]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
    };
    dict(vec![
        ("empty_rows", tensor(&[0, 3], 0.0, store)),
        ("empty_cols", tensor(&[3, 0], 0.0, store)),
        ("scalar", tensor(&[], 5.0, store)),
        ("ints", PtValue::Tensor(ints)),
        (
            "numbers",
            PtValue::List(
                [
                    0,
                    255,
                    256,
                    65535,
                    65536,
                    -1,
                    1 << 31,
                    -(1 << 31) - 1,
                    i64::MIN,
                    i64::MAX,
                ]
                .map(PtValue::Int)
                .into_iter()
                .chain([0.1, -0.0, f64::MAX, f64::MIN_POSITIVE, -1e-300].map(PtValue::Float))
                .collect(),
            ),
        ),
        (
            "containers",
            PtValue::Tuple(vec![
                PtValue::None,
                PtValue::Bool(true),
                PtValue::Bool(false),
                PtValue::Tuple(vec![]),
                PtValue::Tuple(vec![PtValue::Int(1)]),
                PtValue::Tuple((0..5).map(PtValue::Int).collect()),
                PtValue::List(vec![]),
                PtValue::Dict(vec![]),
                PtValue::List(vec![PtValue::List(vec![PtValue::Dict(vec![])])]),
            ]),
        ),
        ("", text("ünïcödé 🦀 \u{0} \n")),
    ])
}

/// A stored zip with `pickle` as `t/data.pkl` and `storages` as `t/data/<i>`.
fn archive(pickle: &[u8], storages: &[&[u8]]) -> Vec<u8> {
    let mut zip = ZipWriter::with_capacity(4096, crate::pt::zip::Zip64::AS_TORCH);
    zip.add("t/data.pkl", EntryData::Copied(pickle)).unwrap();
    for (key, data) in storages.iter().enumerate() {
        zip.add(&format!("t/data/{key}"), EntryData::Copied(data))
            .unwrap();
    }
    zip.finish_bytes()
}
