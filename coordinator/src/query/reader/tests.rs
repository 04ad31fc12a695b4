//! Tests of the parent module.
use capture_worker::pt::PtTree;

use super::paths::describe_layers;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use capture_worker::pt::{PtValue, StoreDtype, decode_pt, encode_pt};
use capture_worker::store::{ArtifactStore, StoreOptions};

use super::*;

const KEY: &str = "inference/raw/residual/dynamic/1.pt";
const PROMPT_LEN: usize = 6;
const RESPONSE_LEN: usize = 4;

fn values(numel: usize, seed: f32) -> Vec<f32> {
    (0..numel)
        .map(|i| ((i as f32) * 0.37 + seed).sin() * 10.0)
        .collect()
}

fn tensor(shape: &[usize], seed: f32, store: StoreDtype) -> PtValue {
    let numel = shape.iter().product();
    PtValue::Tensor(PtTensor::from_f32(
        shape.to_vec(),
        &values(numel, seed),
        store,
    ))
}

fn dict(entries: Vec<(String, PtValue)>) -> PtValue {
    PtValue::Dict(entries)
}

fn texts(phase: Phase, tokens: usize) -> Vec<(String, PtValue)> {
    let words: Vec<String> = (0..tokens).map(|i| format!("{phase}{i}")).collect();
    vec![
        ("text".into(), PtValue::Str(words.concat())),
        (
            "tokens".into(),
            PtValue::List(words.into_iter().map(PtValue::Str).collect()),
        ),
        (
            "token_ids".into(),
            PtValue::List((0..tokens as i64).map(|i| PtValue::Int(1000 + i)).collect()),
        ),
    ]
}

/// A raw residual artifact as the worker lays it out, `width` wide.
fn residual_value(store: StoreDtype, layers: usize, width: usize) -> PtValue {
    let section = |phase: Phase| {
        let rows = match phase {
            Phase::Prompt => PROMPT_LEN,
            Phase::Response => RESPONSE_LEN,
        };
        let seed = |layer: usize, k: usize| (layer * 3 + k) as f32 + rows as f32 * 0.1;
        let activations = (0..layers)
            .map(|layer| {
                let sublayers = Sublayer::ALL
                    .iter()
                    .enumerate()
                    .map(|(k, s)| {
                        let t = tensor(&[rows, width], seed(layer, k), store);
                        (s.as_str().to_owned(), t)
                    })
                    .collect();
                (layer.to_string(), dict(sublayers))
            })
            .collect();
        let attention = (0..layers)
            .map(|layer| {
                let t = match phase {
                    Phase::Prompt => tensor(&[PROMPT_LEN, PROMPT_LEN], layer as f32, store),
                    Phase::Response => PtValue::List(
                        (0..RESPONSE_LEN)
                            .map(|i| {
                                let n = PROMPT_LEN + i;
                                tensor(&[n, n], (layer * 10 + i) as f32, store)
                            })
                            .collect(),
                    ),
                };
                (format!("layer_{layer}"), t)
            })
            .collect();
        let mut entries = texts(phase, rows);
        entries.push(("activations".into(), dict(activations)));
        entries.push(("attention".into(), dict(attention)));
        dict(entries)
    };
    dict(vec![
        ("prompt".into(), section(Phase::Prompt)),
        ("response".into(), section(Phase::Response)),
    ])
}

/// A layer internals artifact (a few of its tensors), `width` wide.
fn internals_value(store: StoreDtype, width: usize) -> PtValue {
    let prompt = {
        let mut entries = texts(Phase::Prompt, PROMPT_LEN);
        entries.push((
            "residual".into(),
            dict(vec![
                ("input".into(), tensor(&[PROMPT_LEN, width], 1.0, store)),
                (
                    "after_attn".into(),
                    tensor(&[PROMPT_LEN, width], 2.0, store),
                ),
                ("output".into(), tensor(&[PROMPT_LEN, width], 3.0, store)),
            ]),
        ));
        dict(entries)
    };
    let response = {
        let mut entries = texts(Phase::Response, RESPONSE_LEN);
        let q_proj = (0..RESPONSE_LEN)
            .map(|i| tensor(&[1, 8], 10.0 + i as f32, store))
            .collect();
        entries.push((
            "attention".into(),
            dict(vec![("q_proj".into(), PtValue::List(q_proj))]),
        ));
        let residual = |seed| tensor(&[RESPONSE_LEN, 1, width], seed, store);
        entries.push((
            "residual".into(),
            dict(vec![
                ("input".into(), residual(4.0)),
                ("after_attn".into(), residual(5.0)),
                ("output".into(), residual(6.0)),
            ]),
        ));
        dict(entries)
    };
    dict(vec![
        ("prompt".into(), prompt),
        ("response".into(), response),
    ])
}

/// The tensor at `path` of a fully decoded value, as (shape, values).
fn decoded_at(value: &PtValue, path: &[&str]) -> TensorValues {
    let mut node = value;
    for part in path {
        node = match node {
            PtTree::Dict(_) => node.get(part).unwrap(),
            _ => {
                let items = node.as_list().unwrap();
                let i: i64 = part.parse().unwrap();
                &items[if i < 0 {
                    items.len() - i.unsigned_abs() as usize
                } else {
                    i as usize
                }]
            }
        };
    }
    let t = node.as_tensor().unwrap();
    (t.shape.clone(), t.to_f32_vec().unwrap())
}

struct LocalRun {
    _dir: tempfile::TempDir,
    run: RunStore,
}

fn local_run() -> LocalRun {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let options = StoreOptions {
        fsync: false,
        ..StoreOptions::default()
    };
    let store = ArtifactStore::from_url(root.to_str().unwrap(), &options).unwrap();
    let run = store.run("exp", "run1").unwrap();
    LocalRun { _dir: dir, run }
}

async fn put(run: &RunStore, key: &str, bytes: &[u8]) {
    run.put_root_file(key, Bytes::copy_from_slice(bytes))
        .await
        .unwrap();
}

fn directory(bytes: &[u8]) -> ZipDirectory {
    ZipDirectory::parse_from_tail(bytes, bytes.len() as u64).unwrap()
}

/// File offset of an entry's data, from the whole file.
fn data_offset(bytes: &[u8], entry: &ZipEntry) -> u64 {
    entry
        .data_offset(&bytes[entry.header_offset as usize..])
        .unwrap()
}

/// What `open` reads after the tail: `data.pkl`'s local header and data
/// up to the end of the `byteorder` record's data.
fn pickle_read_len(bytes: &[u8]) -> u64 {
    let directory = directory(bytes);
    let pickle = PtIndex::pickle_entry(&directory).unwrap();
    let prefix = pickle.name.strip_suffix("/data.pkl").unwrap();
    let order = directory.get(&format!("{prefix}/byteorder")).unwrap();
    data_offset(bytes, order) + order.size - pickle.header_offset
}

fn all_residual_paths(layers: usize) -> Vec<(Phase, usize, Sublayer)> {
    let mut paths = Vec::new();
    for phase in Phase::ALL {
        for layer in 0..layers {
            for sublayer in Sublayer::ALL {
                paths.push((phase, layer, sublayer));
            }
        }
    }
    paths
}

#[tokio::test]
async fn values_match_the_full_decode_for_every_dtype() {
    let local = local_run();
    for store in [StoreDtype::F32, StoreDtype::F16, StoreDtype::BF16] {
        let key = format!("inference/raw/residual/dynamic/{store}.pt");
        let value = residual_value(store, 4, 1024);
        let bytes = encode_pt(&value, store.as_str()).unwrap();
        let decoded = decode_pt(&bytes).unwrap();
        put(&local.run, &key, &bytes).await;
        let reader = ArtifactReader::open(&local.run, &key, &ByteCounter::new())
            .await
            .unwrap();
        assert_eq!(reader.file_bytes(), bytes.len() as u64);
        assert_eq!(reader.key(), key);
        assert_eq!(reader.layers().unwrap(), vec![0, 1, 2, 3]);
        let (text, tokens, ids) = reader.text_fields(Phase::Response).unwrap();
        assert_eq!(text, "response0response1response2response3");
        assert_eq!(tokens[1], "response1");
        assert_eq!(ids, vec![1000, 1001, 1002, 1003]);

        let mut wanted = Vec::new();
        let mut expected = Vec::new();
        for (phase, layer, sublayer) in all_residual_paths(4) {
            let layer_key = layer.to_string();
            let path = [phase.as_str(), "activations", &layer_key, sublayer.as_str()];
            let (shape, full) = decoded_at(&decoded, &path);
            let tensor = reader.residual_tensor(phase, layer, sublayer).unwrap();
            assert_eq!(
                reader.read_f32(tensor, None).await.unwrap(),
                (shape.clone(), full.clone()),
                "{store} {path:?}"
            );
            let width = shape[1];
            let rows = reader.read_f32(tensor, Some(1..3)).await.unwrap();
            assert_eq!(rows, (vec![2, width], full[width..3 * width].to_vec()));
            let empty = reader.read_f32(tensor, Some(2..2)).await.unwrap();
            assert_eq!(empty, (vec![0, width], Vec::new()));
            wanted.push((tensor.clone(), None));
            expected.push((shape, full));
        }
        for path in [
            ["prompt", "attention", "layer_2", ""],
            ["response", "attention", "layer_1", "-1"],
        ] {
            let path: Vec<&str> = path.into_iter().filter(|p| !p.is_empty()).collect();
            wanted.push((reader.tensor_at(&path).unwrap().clone(), None));
            expected.push(decoded_at(&decoded, &path));
        }
        assert_eq!(
            reader.read_many(&wanted).await.unwrap(),
            expected,
            "{store}"
        );
    }
}

/// Opens the standard f32 artifact in `run` and checks, to the byte,
/// what opening and reading cost; returns (bytes read, file size).
async fn check_ranged_costs(run: &RunStore) -> (u64, u64) {
    let value = residual_value(StoreDtype::F32, 4, 1024);
    let bytes = encode_pt(&value, "1").unwrap();
    let decoded = decode_pt(&bytes).unwrap();
    let len = bytes.len() as u64;
    put(run, KEY, &bytes).await;
    let counter = ByteCounter::new();
    let reader = ArtifactReader::open(run, KEY, &counter).await.unwrap();
    let directory = directory(&bytes);
    let opened = TAIL_BYTES + pickle_read_len(&bytes);
    assert_eq!((counter.bytes_read(), counter.requests()), (opened, 2));

    // First read of an entry: its local header and its data, one GET.
    let tensor = reader
        .residual_tensor(Phase::Prompt, 2, Sublayer::ResidualOut)
        .unwrap()
        .clone();
    let span = reader.index().locate(&tensor).unwrap();
    let entry = directory.get(&span.entry).unwrap();
    let data = data_offset(&bytes, entry);
    assert!(
        data + span.len < len - TAIL_BYTES,
        "the tensor is not in the tail"
    );
    let (shape, full) = reader.read_f32(&tensor, None).await.unwrap();
    assert_eq!(
        (shape.clone(), full.clone()),
        decoded_at(&decoded, &["prompt", "activations", "2", "residual_out"])
    );
    let header_and_data = data - entry.header_offset + span.len;
    assert_eq!(counter.bytes_read(), opened + header_and_data);
    assert_eq!(counter.requests(), 3);

    // The offset is cached: rows cost exactly their bytes.
    let row_bytes = span.len / shape[0] as u64;
    let rows = reader.read_f32(&tensor, Some(1..3)).await.unwrap();
    assert_eq!(rows.1, full[shape[1]..3 * shape[1]]);
    assert_eq!(
        counter.bytes_read(),
        opened + header_and_data + 2 * row_bytes
    );
    assert_eq!(counter.requests(), 4);

    // Tensors inside the tail already read cost nothing.
    let path = ["response", "attention", "layer_3", "-1"];
    let last = reader.tensor_at(&path).unwrap();
    let last_span = reader.index().locate(last).unwrap();
    let last_entry = directory.get(&last_span.entry).unwrap();
    assert!(
        last_entry.header_offset >= len - TAIL_BYTES,
        "the tensor is in the tail"
    );
    let before = counter.bytes_read();
    assert_eq!(
        reader.read_f32(last, None).await.unwrap(),
        decoded_at(&decoded, &path)
    );
    assert_eq!((counter.bytes_read(), counter.requests()), (before, 4));
    eprintln!(
        "ranged read of {}: file {len} bytes; open {opened} bytes (tail {TAIL_BYTES} + \
         pickle {}); one [6, 1024] f32 tensor {header_and_data} bytes ({} of data); two \
         rows {} bytes; total {} bytes in {} requests",
        reader.url(),
        opened - TAIL_BYTES,
        span.len,
        2 * row_bytes,
        counter.bytes_read(),
        counter.requests()
    );
    // The 128 KiB tail is a quarter of this small file; on real artifacts
    // (tens of MiB) it is well under 1%.
    assert!(
        counter.bytes_read() * 2 < len,
        "{} of {len}",
        counter.bytes_read()
    );
    (counter.bytes_read(), len)
}

#[tokio::test]
async fn reads_cost_the_tail_the_pickle_and_the_tensor_bytes() {
    let local = local_run();
    check_ranged_costs(&local.run).await;
}

#[tokio::test]
async fn nearby_tensors_share_one_get_and_distant_ones_do_not() {
    let local = local_run();
    let bytes = encode_pt(&residual_value(StoreDtype::BF16, 4, 1024), "1").unwrap();
    let decoded = decode_pt(&bytes).unwrap();
    put(&local.run, KEY, &bytes).await;
    let counter = ByteCounter::new();
    let reader = ArtifactReader::open(&local.run, KEY, &counter)
        .await
        .unwrap();
    let directory = directory(&bytes);
    let entry_of = |t: &TensorRef| {
        directory
            .get(&reader.index().locate(t).unwrap().entry)
            .unwrap()
    };

    // The three sublayers of a layer are consecutive storages.
    let wanted: Vec<_> = Sublayer::ALL
        .iter()
        .map(|&s| {
            (
                reader.residual_tensor(Phase::Prompt, 1, s).unwrap().clone(),
                None,
            )
        })
        .collect();
    let (first, last) = (entry_of(&wanted[0].0), entry_of(&wanted[2].0));
    let (bytes_before, requests_before) = (counter.bytes_read(), counter.requests());
    let read = reader.read_many(&wanted).await.unwrap();
    for (sublayer, got) in Sublayer::ALL.iter().zip(&read) {
        assert_eq!(
            *got,
            decoded_at(&decoded, &["prompt", "activations", "1", sublayer.as_str()])
        );
    }
    assert_eq!(counter.requests(), requests_before + 1);
    let expected = data_offset(&bytes, last) + last.size - first.header_offset;
    assert_eq!(counter.bytes_read(), bytes_before + expected);

    // Layer 0's input and layer 2's output are far apart (and before the
    // tail): two GETs, of a header and a tensor each.
    let far = [
        reader
            .residual_tensor(Phase::Prompt, 0, Sublayer::ResidualIn)
            .unwrap(),
        reader
            .residual_tensor(Phase::Prompt, 2, Sublayer::ResidualOut)
            .unwrap(),
    ];
    let (bytes_before, requests_before) = (counter.bytes_read(), counter.requests());
    let wanted: Vec<_> = far.iter().map(|t| ((*t).clone(), None)).collect();
    let read = reader.read_many(&wanted).await.unwrap();
    assert_eq!(
        read[0],
        decoded_at(&decoded, &["prompt", "activations", "0", "residual_in"])
    );
    assert_eq!(
        read[1],
        decoded_at(&decoded, &["prompt", "activations", "2", "residual_out"])
    );
    assert_eq!(counter.requests(), requests_before + 2);
    let expected: u64 = far
        .iter()
        .map(|t| {
            let entry = entry_of(t);
            data_offset(&bytes, entry) + entry.size - entry.header_offset
        })
        .sum();
    assert_eq!(counter.bytes_read(), bytes_before + expected);
}

#[tokio::test]
async fn small_files_are_read_once_whole() {
    let local = local_run();
    let value = residual_value(StoreDtype::F16, 2, 8);
    let bytes = encode_pt(&value, "1").unwrap();
    assert!((bytes.len() as u64) < TAIL_BYTES);
    put(&local.run, KEY, &bytes).await;
    let counter = ByteCounter::new();
    let reader = ArtifactReader::open(&local.run, KEY, &counter)
        .await
        .unwrap();
    assert_eq!(
        (counter.bytes_read(), counter.requests()),
        (bytes.len() as u64, 1)
    );
    let decoded = decode_pt(&bytes).unwrap();
    let tensor = reader
        .residual_tensor(Phase::Response, 1, Sublayer::AfterAttn)
        .unwrap();
    let read = reader.read_f32(tensor, None).await.unwrap();
    assert_eq!(
        read,
        decoded_at(&decoded, &["response", "activations", "1", "after_attn"])
    );
    assert_eq!(
        (counter.bytes_read(), counter.requests()),
        (bytes.len() as u64, 1)
    );
}

#[tokio::test]
async fn internals_paths_index_lists() {
    let local = local_run();
    let key = "inference/raw/internals/dynamic/1_L16.pt";
    let bytes = encode_pt(&internals_value(StoreDtype::BF16, 256), "1_L16").unwrap();
    let decoded = decode_pt(&bytes).unwrap();
    put(&local.run, key, &bytes).await;
    let reader = ArtifactReader::open(&local.run, key, &ByteCounter::new())
        .await
        .unwrap();
    let url = local.run.url_of(key);

    let residual = reader
        .internals_residual_tensor(Phase::Response, Sublayer::ResidualIn)
        .unwrap();
    let (shape, full) = decoded_at(&decoded, &["response", "residual", "input"]);
    assert_eq!(shape, vec![RESPONSE_LEN, 1, 256]);
    let rows = reader.read_f32(residual, Some(1..3)).await.unwrap();
    assert_eq!(rows, (vec![2, 1, 256], full[256..3 * 256].to_vec()));
    for index in ["2", "-1", "-4"] {
        let path = ["response", "attention", "q_proj", index];
        let tensor = reader.tensor_at(&path).unwrap();
        assert_eq!(
            reader.read_f32(tensor, None).await.unwrap(),
            decoded_at(&decoded, &path)
        );
    }

    let message = |path: &[&str]| reader.tensor_at(path).unwrap_err().to_string();
    assert_eq!(
        message(&["response", "attention", "q_proj", "4"]),
        format!(
            "{url} has no response.attention.q_proj.4; response.attention.q_proj is a list \
             of 4 items"
        )
    );
    assert_eq!(
        message(&["prompt", "mlp", "gelu"]),
        format!("{url} has no prompt.mlp; keys present: text, tokens, token_ids, residual")
    );
    assert_eq!(
        message(&["prompt", "text"]),
        format!("{url} has prompt.text as a str, not a tensor")
    );
    assert_eq!(
        message(&["prompt", "text", "x"]),
        format!("{url} has prompt.text as a str, not a dict or list")
    );
    let err = reader.layers().unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("{url} has no prompt.activations; keys present: text, tokens, token_ids, residual")
    );
}

#[tokio::test]
async fn missing_layers_rows_and_objects_are_named() {
    let local = local_run();
    let bytes = encode_pt(&residual_value(StoreDtype::F32, 4, 16), "1").unwrap();
    put(&local.run, KEY, &bytes).await;
    let url = local.run.url_of(KEY);
    let reader = ArtifactReader::open(&local.run, KEY, &ByteCounter::new())
        .await
        .unwrap();
    let err = reader
        .residual_tensor(Phase::Prompt, 7, Sublayer::ResidualIn)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("{url} has no prompt.activations.7.residual_in; layers present: 0-3")
    );
    assert_eq!(err.url(), url);

    let tensor = reader
        .residual_tensor(Phase::Prompt, 0, Sublayer::AfterAttn)
        .unwrap();
    let err = reader.read_f32(tensor, Some(5..9)).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "cannot read F32 tensor of shape [6, 16] in storage {} of {url}: rows 5..9 out \
             of range: the tensor has 6 rows",
            tensor.storage_key()
        )
    );

    let missing = "inference/raw/residual/dynamic/99.pt";
    let err = ArtifactReader::open(&local.run, missing, &ByteCounter::new())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ReaderError::Store { source, .. } if source.is_not_found()),
        "{err:?}"
    );
    assert!(
        err.to_string().contains(&local.run.url_of(missing)),
        "{err}"
    );
}

#[tokio::test]
async fn torch_written_views_read_when_contiguous() {
    let local = local_run();
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../format/tests/fixtures/pt/views.pt"
    );
    let bytes = std::fs::read(path).unwrap();
    let key = "inference/raw/residual/fixtures/views.pt";
    put(&local.run, key, &bytes).await;
    let url = local.run.url_of(key);
    let reader = ArtifactReader::open(&local.run, key, &ByteCounter::new())
        .await
        .unwrap();
    let read = |name: &'static str, rows| {
        let reader = &reader;
        async move {
            reader
                .read_f32(reader.tensor_at(&[name]).unwrap(), rows)
                .await
        }
    };
    assert_eq!(
        read("row", None).await.unwrap(),
        (vec![4], vec![0.75, 1.0, 1.25, 1.5])
    );
    assert_eq!(read("element", None).await.unwrap(), (vec![], vec![0.0]));
    let base = read("base", Some(1..3)).await.unwrap();
    assert_eq!(
        base,
        (
            vec![2, 4],
            vec![-0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
        )
    );
    let err = read("transposed", None).await.unwrap_err().to_string();
    assert!(
        err.starts_with("cannot read F32 tensor of shape [4, 3] in storage 0 of "),
        "{err}"
    );
    assert!(
        err.contains(&url) && err.contains("is not contiguous"),
        "{err}"
    );
    let err = read("element", Some(0..1)).await.unwrap_err().to_string();
    assert!(err.ends_with("a 0-dim tensor has no rows 0..1"), "{err}");
}

/// Opens `bytes` stored at `key` and returns the error's message.
async fn open_error(run: &RunStore, key: &str, bytes: &[u8]) -> String {
    put(run, key, bytes).await;
    match ArtifactReader::open(run, key, &ByteCounter::new()).await {
        Ok(reader) => panic!("{key} opened: {reader:?}"),
        Err(err) => err.to_string(),
    }
}

fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Offset of the central directory record of entry `name`.
fn central_record(bytes: &[u8], name: &str) -> usize {
    (0..bytes.len() - 46)
        .find(|&at| {
            bytes[at..at + 4] == [0x50, 0x4b, 0x01, 0x02]
                && usize::from(u16::from_le_bytes([bytes[at + 28], bytes[at + 29]])) == name.len()
                && &bytes[at + 46..at + 46 + name.len()] == name.as_bytes()
        })
        .unwrap()
}

#[tokio::test]
async fn corrupt_files_are_errors_naming_the_artifact() {
    let local = local_run();
    let run = &local.run;
    let good = encode_pt(&residual_value(StoreDtype::F32, 4, 1024), "1").unwrap();
    let not_zip = "not a zip file: end of central directory not found";
    for (name, bytes) in [
        ("noise.pt", noise(100_000, 1)),
        ("short_noise.pt", noise(100, 2)),
        ("half.pt", good[..good.len() / 2].to_vec()),
        ("cut_end.pt", good[..good.len() - 10].to_vec()),
    ] {
        let key = format!("inference/raw/residual/corrupt/{name}");
        let message = open_error(run, &key, &bytes).await;
        assert_eq!(
            message,
            format!("corrupt artifact {}: {not_zip}", run.url_of(&key))
        );
    }
    let key = "inference/raw/residual/corrupt/empty.pt";
    assert_eq!(
        open_error(run, key, b"").await,
        format!(
            "corrupt artifact {}: not a zip file: the object is empty",
            run.url_of(key)
        )
    );

    // Garbage pickle: caught by its checksum, and by the unpickler once
    // the checksum is made to match.
    let directory = directory(&good);
    let pickle = PtIndex::pickle_entry(&directory).unwrap();
    let start = data_offset(&good, pickle) as usize;
    let mut garbage = good.clone();
    garbage[start..start + pickle.size as usize].fill(0xFF);
    let key = "inference/raw/residual/corrupt/pickle_crc.pt";
    assert_eq!(
        open_error(run, key, &garbage).await,
        format!(
            "corrupt artifact {}: entry 1/data.pkl: crc32 mismatch",
            run.url_of(key)
        )
    );
    let record = central_record(&garbage, "1/data.pkl");
    let crc = crc32(&garbage[start..start + pickle.size as usize]);
    garbage[record + 16..record + 20].copy_from_slice(&crc.to_le_bytes());
    let key = "inference/raw/residual/corrupt/pickle.pt";
    assert_eq!(
        open_error(run, key, &garbage).await,
        format!(
            "corrupt artifact {}: unsupported pickle opcode 0xff at byte 0",
            run.url_of(key)
        )
    );
}

#[tokio::test]
async fn corrupt_storages_are_errors_naming_the_artifact() {
    let local = local_run();
    let run = &local.run;
    let good = encode_pt(&residual_value(StoreDtype::F32, 4, 1024), "1").unwrap();
    let index = {
        let directory = directory(&good);
        let pickle = PtIndex::pickle_entry(&directory).unwrap();
        let start = data_offset(&good, pickle) as usize;
        PtIndex::new(
            directory.clone(),
            &good[start..start + pickle.size as usize],
        )
        .unwrap()
    };
    let entry_of = |path: &[&str]| {
        let span = index
            .locate(tensor_at(index.root(), path).unwrap())
            .unwrap();
        index.directory().get(&span.entry).unwrap().clone()
    };
    let read_error = |key: &'static str, bytes: Vec<u8>, path: &'static [&'static str]| async move {
        put(run, key, &bytes).await;
        let reader = ArtifactReader::open(run, key, &ByteCounter::new())
            .await
            .unwrap();
        let tensor = reader.tensor_at(path).unwrap();
        reader.read_f32(tensor, None).await.unwrap_err().to_string()
    };

    // A clobbered local header.
    const MIDDLE: &[&str] = &["prompt", "activations", "1", "residual_in"];
    let entry = entry_of(MIDDLE);
    let mut bytes = good.clone();
    bytes[entry.header_offset as usize..][..4].fill(0);
    let key = "inference/raw/residual/corrupt/header.pt";
    assert_eq!(
        read_error(key, bytes, MIDDLE).await,
        format!(
            "corrupt artifact {}: corrupt zip archive: bad local header for entry {} at \
             byte {}",
            run.url_of(key),
            entry.name,
            entry.header_offset
        )
    );

    // Flipped data bits: whole-storage reads check the checksum.
    let mut bytes = good.clone();
    bytes[data_offset(&good, &entry) as usize + 5] ^= 0x10;
    let key = "inference/raw/residual/corrupt/data.pt";
    assert_eq!(
        read_error(key, bytes, MIDDLE).await,
        format!(
            "corrupt artifact {}: entry {}: crc32 mismatch",
            run.url_of(key),
            entry.name
        )
    );

    // A header whose extra field pushes the data past the end.
    const LAST: &[&str] = &["response", "attention", "layer_3", "-1"];
    let entry = entry_of(LAST);
    let mut bytes = good.clone();
    let at = entry.header_offset as usize + 28;
    bytes[at..at + 2].copy_from_slice(&u16::MAX.to_le_bytes());
    let key = "inference/raw/residual/corrupt/truncated.pt";
    let message = read_error(key, bytes, LAST).await;
    assert!(
        message.starts_with(&format!(
            "truncated artifact {}: entry {} reaches byte ",
            run.url_of(key),
            entry.name
        )) && message.ends_with(&format!("but the file is {} bytes long", good.len())),
        "{message}"
    );
}

#[test]
fn names_parse_and_print() {
    for phase in Phase::ALL {
        assert_eq!(phase.to_string().parse::<Phase>().unwrap(), phase);
    }
    for sublayer in Sublayer::ALL {
        assert_eq!(sublayer.as_str().parse::<Sublayer>().unwrap(), sublayer);
    }
    assert_eq!(
        "x".parse::<Sublayer>().unwrap_err().to_string(),
        "unknown sublayer \"x\": use residual_in, after_attn or residual_out"
    );
    assert_eq!(
        "Prompt".parse::<Phase>().unwrap_err().to_string(),
        "unknown phase \"Prompt\": use prompt or response"
    );
    assert_eq!(Sublayer::ResidualOut.internals_key(), "output");
}

#[test]
fn layer_lists_are_compressed() {
    assert_eq!(describe_layers(&[0, 1, 2, 3, 5, 7, 8, 9]), "0-3, 5, 7-9");
    assert_eq!(describe_layers(&[4]), "4");
    assert_eq!(describe_layers(&[]), "none");
}

#[test]
fn spans_coalesce_within_the_gap_and_size_limits() {
    let merged = coalesce(
        vec![100..110, 0..10, 15..20, 105..200, 1000..1001],
        10,
        1000,
    );
    assert_eq!(merged, vec![0..20, 100..200, 1000..1001]);
    // Too long a merge is not made, but overlapping spans always merge.
    assert_eq!(coalesce(vec![0..10, 12..20], 10, 15), vec![0..10, 12..20]);
    assert_eq!(coalesce(vec![0..10, 5..20], 0, 1), vec![0..20]);
    assert_eq!(coalesce(vec![0..10, 10..20], 0, 100), vec![0..20]);
}

/// `PUT /{bucket}`: object_store cannot create buckets; moto takes an
/// unsigned request.
fn create_bucket(endpoint: &str, bucket: &str) {
    let authority = endpoint
        .strip_prefix("http://")
        .unwrap_or_else(|| panic!("the S3 endpoint {endpoint} must be plain http"))
        .trim_end_matches('/');
    let mut stream = TcpStream::connect(authority).unwrap_or_else(|err| {
        panic!("cannot reach the S3 endpoint {endpoint}: {err}; is moto running?")
    });
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "PUT /{bucket} HTTP/1.1\r\nHost: {authority}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response.lines().next().unwrap_or_default();
    assert!(
        status.contains(" 200"),
        "creating bucket {bucket} at {endpoint} failed: {status}"
    );
}

/// Against a real S3 endpoint (moto): `source scripts/services.sh &&
/// start_moto` exports `CAPTURE_S3_ENDPOINT` (`CAPTURE_TEST_S3_ENDPOINT`
/// works too). Skipped, saying so, when neither is set.
#[tokio::test]
async fn s3_reads_cost_the_same_bytes() {
    let endpoint = ["CAPTURE_TEST_S3_ENDPOINT", "CAPTURE_S3_ENDPOINT"]
        .iter()
        .find_map(|name| std::env::var(name).ok().filter(|v| !v.is_empty()));
    let Some(endpoint) = endpoint else {
        eprintln!(
            "skipped: CAPTURE_S3_ENDPOINT is not set; run `source scripts/services.sh && \
             start_moto` first to test against moto"
        );
        return;
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let bucket = format!(
        "capture-reader-{}-{}",
        std::process::id(),
        nanos % 1_000_000_000_000
    );
    tokio::task::spawn_blocking({
        let (endpoint, bucket) = (endpoint.clone(), bucket.clone());
        move || create_bucket(&endpoint, &bucket)
    })
    .await
    .unwrap();
    let options = StoreOptions {
        s3_endpoint: Some(endpoint),
        max_retries: 2,
        retry_timeout: Duration::from_secs(10),
        ..StoreOptions::default()
    };
    let store = ArtifactStore::from_url(&format!("s3://{bucket}/captures"), &options).unwrap();
    let run = store.run("exp", "run1").unwrap();
    assert_eq!(
        run.url_of(KEY),
        format!("s3://{bucket}/captures/exp/run1/{KEY}")
    );
    check_ranged_costs(&run).await;

    let key = "inference/raw/residual/dynamic/noise.pt";
    assert_eq!(
        open_error(&run, key, &noise(70_000, 3)).await,
        format!(
            "corrupt artifact s3://{bucket}/captures/exp/run1/{key}: not a zip file: end of \
             central directory not found"
        )
    );
}
