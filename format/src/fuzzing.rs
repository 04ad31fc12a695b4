//! What the fuzz targets in `fuzz/` check on arbitrary input, shared with
//! the corpus replay test (`fuzzing::tests`), so every committed corpus file
//! is re-checked by `cargo test` on the stable toolchain. Each check panics
//! when an invariant breaks; any error return from the code under test is
//! fine, a panic, hang or out-of-bounds access is not.

use crate::manifest::Manifest;
use crate::prompts::{PromptSet, validate_path_component};
use crate::pt::{PtError, PtIndex, ZipDirectory, decode_pt, encode_pt};

/// The `.pt` reader, both ways it reads: whole files (`decode_pt`; a value
/// that decodes re-encodes to a fixed point) and ranged (directory from a
/// short tail then from the whole file, `data.pkl`, every tensor's span
/// inside its entry).
pub fn check_pt(data: &[u8]) {
    if let Ok(value) = decode_pt(data) {
        let bytes = encode_pt(&value, "archive").expect("a decoded value encodes");
        let again = decode_pt(&bytes).expect("an encoded value decodes");
        let twice = encode_pt(&again, "archive").expect("a decoded value encodes");
        assert!(twice == bytes, "encode(decode(x)) is not a fixed point");
    }
    let len = data.len() as u64;
    for tail in [data.len().min(64), data.len()] {
        match ZipDirectory::parse_from_tail(&data[data.len() - tail..], len) {
            Ok(directory) => check_index(data, directory),
            Err(PtError::TailTooShort { needed }) => {
                assert!(
                    needed > tail as u64 && needed <= len,
                    "asked for a {needed}-byte tail of a {len}-byte file, having {tail}"
                );
            }
            Err(_) => {}
        }
    }
}

fn check_index(data: &[u8], directory: ZipDirectory) {
    let Ok(pickle) = PtIndex::pickle_entry(&directory).and_then(|entry| entry.data(data)) else {
        return;
    };
    let pickle = pickle.to_vec();
    let Ok(index) = PtIndex::new(directory, &pickle) else {
        return;
    };
    let mut tensors = Vec::new();
    let _ = index.root().clone().try_map(&mut |t| {
        tensors.push(t);
        Ok::<(), ()>(())
    });
    for tensor in &tensors {
        if let Ok(span) = index.locate(tensor) {
            let entry = index
                .directory()
                .get(&span.entry)
                .expect("a located span names an entry of the directory");
            let end = span.offset.checked_add(span.len);
            assert!(
                end.is_some_and(|end| end <= entry.size),
                "span {span:?} runs past its entry of {} bytes",
                entry.size
            );
        }
    }
}

/// The prompt-file parser: a set it accepts has prompts, unique ids that are
/// safe path components (they become object keys) and non-blank texts.
pub fn check_prompt_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(set) = PromptSet::from_json_str("fuzz", text, "fuzz input") else {
        return;
    };
    assert!(!set.prompts.is_empty(), "an accepted set has prompts");
    let mut ids = std::collections::HashSet::new();
    for prompt in &set.prompts {
        assert!(
            validate_path_component("prompt id", &prompt.id).is_ok(),
            "accepted an unsafe prompt id {:?}",
            prompt.id
        );
        assert!(
            ids.insert(&prompt.id),
            "accepted a duplicate id {:?}",
            prompt.id
        );
        assert!(!prompt.text.trim().is_empty(), "accepted a blank prompt");
    }
}

/// The manifest reader: a manifest it accepts writes back to JSON that reads
/// back equal.
pub fn check_manifest(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(manifest) = Manifest::from_json(text, "fuzz input") else {
        return;
    };
    let json = manifest.to_json();
    let again = Manifest::from_json(&json, "rewritten").expect("a written manifest reads back");
    assert!(
        again.to_json() == json,
        "the manifest changed through a write and a read"
    );
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;

    fn corpus(target: &str) -> Vec<PathBuf> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus")
            .join(target);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|entry| entry.unwrap().path())
            .collect();
        files.sort();
        assert!(files.len() >= 3, "{} holds a corpus", dir.display());
        files
    }

    fn replay(target: &str, check: fn(&[u8])) {
        for file in corpus(target) {
            let data = std::fs::read(&file).unwrap();
            let outcome = std::panic::catch_unwind(|| check(&data));
            assert!(outcome.is_ok(), "{} fails {target}", file.display());
        }
    }

    #[test]
    fn the_pt_reader_corpus_holds() {
        replay("pt_reader", check_pt);
    }

    #[test]
    fn the_prompt_file_corpus_holds() {
        replay("prompt_file", check_prompt_file);
    }

    #[test]
    fn the_manifest_corpus_holds() {
        replay("manifest", check_manifest);
    }

    #[test]
    fn the_checks_can_fail() {
        // A manifest check that passes on everything would prove nothing:
        // the seeds must include accepted inputs of each kind.
        let accepted = |target: &str, ok: fn(&[u8]) -> bool| {
            corpus(target)
                .iter()
                .any(|f| ok(&std::fs::read(f).unwrap()))
        };
        assert!(accepted("pt_reader", |d| decode_pt(d).is_ok()));
        assert!(accepted("prompt_file", |d| std::str::from_utf8(d)
            .is_ok_and(|t| PromptSet::from_json_str("x", t, "x").is_ok())));
        assert!(accepted("manifest", |d| std::str::from_utf8(d)
            .is_ok_and(|t| Manifest::from_json(t, "x").is_ok())));
    }
}
