//! The zip layout matches torch's: record order, 64-byte aligned data and
//! the entry spacing torch's `calculate_storage_offsets` relies on.

use super::{artifact, edge_cases};
use crate::pt::zip::ALIGNMENT;
use crate::pt::{LOCAL_HEADER_LEN, StoreDtype, ZipDirectory, encode_pt};

/// (name, header offset, data offset, size) of every entry, in file order.
fn layout(bytes: &[u8]) -> Vec<(String, u64, u64, u64)> {
    let directory = ZipDirectory::parse_from_tail(bytes, bytes.len() as u64).unwrap();
    directory
        .entries()
        .iter()
        .map(|e| {
            let data = e.data_offset(&bytes[e.header_offset as usize..]).unwrap();
            (e.name.clone(), e.header_offset, data, e.size)
        })
        .collect()
}

/// Checks what torch's reader assumes of a file written by torch's writer.
fn assert_torch_layout(bytes: &[u8], what: &str) {
    let entries = layout(bytes);
    let mut expected_header = 0;
    for (name, header, data, size) in &entries {
        assert_eq!(*header, expected_header, "{what}: {name} header");
        assert_eq!(data % ALIGNMENT as u64, 0, "{what}: {name} data at {data}");
        // Padding is the smallest that aligns, after a 4-byte `FB` field header.
        let unpadded = header + (LOCAL_HEADER_LEN + name.len() + 4) as u64;
        assert_eq!(
            *data,
            unpadded.next_multiple_of(ALIGNMENT as u64),
            "{what}: {name}"
        );
        // Non-empty entries are followed by a 16-byte data descriptor.
        expected_header = data + size + if *size > 0 { 16 } else { 0 };
    }
    let prefix = entries[0].0.split('/').next().unwrap();
    let names: Vec<&str> = entries
        .iter()
        .map(|(n, ..)| n.strip_prefix(prefix).unwrap())
        .collect();
    let storages = names.len() - 6;
    let mut expected = vec![
        "/data.pkl",
        "/.format_version",
        "/.storage_alignment",
        "/byteorder",
    ];
    let keys: Vec<String> = (0..storages).map(|k| format!("/data/{k}")).collect();
    expected.extend(keys.iter().map(String::as_str));
    expected.extend(["/version", "/.data/serialization_id"]);
    assert_eq!(names, expected, "{what}");
}

#[test]
fn written_files_have_torch_layout() {
    for store in [StoreDtype::F32, StoreDtype::F16, StoreDtype::BF16] {
        for (what, value) in [
            ("artifact", artifact(store, 3)),
            ("edge cases", edge_cases(store)),
        ] {
            let bytes = encode_pt(&value, "x").unwrap();
            assert_torch_layout(&bytes, &format!("{what} {store}"));
        }
    }
}

#[test]
fn torch_fixtures_have_the_layout_we_check() {
    for name in ["nested", "views", "ordered_empty"] {
        let path = format!("{}/tests/fixtures/pt/{name}.pt", env!("CARGO_MANIFEST_DIR"));
        assert_torch_layout(&std::fs::read(path).unwrap(), name);
    }
}

#[test]
fn records_hold_what_torch_writes() {
    let bytes = encode_pt(&edge_cases(StoreDtype::F32), "rec").unwrap();
    let directory = ZipDirectory::parse_from_tail(&bytes, bytes.len() as u64).unwrap();
    let record = |name: &str| {
        directory
            .get(&format!("rec/{name}"))
            .unwrap()
            .data(&bytes)
            .unwrap()
    };
    assert_eq!(record("version"), b"3\n");
    assert_eq!(record("byteorder"), b"little");
    assert_eq!(record(".format_version"), b"1");
    assert_eq!(record(".storage_alignment"), b"64");
    let id = record(".data/serialization_id");
    assert!(id.len() == 40 && id.iter().all(u8::is_ascii_digit));
}
