//! Validation of everything that becomes part of an object key: experiment
//! names, run and job ids, attempt numbers and the relative artifact keys
//! below a run root. Every check runs before any I/O.

use capture_format::prompts::{component_problem, quote_short};

use super::error::StoreError;

/// Longest single path part (file systems allow 255; ids and names are
/// short), as for prompt set names and ids.
pub use capture_format::prompts::MAX_COMPONENT_BYTES;
/// Longest relative key below a run root.
pub const MAX_RELATIVE_KEY_BYTES: usize = 512;
/// Most parts in a relative key (`inference/raw/internals/{set}/{id}_L{n}.pt` has 5).
pub const MAX_RELATIVE_KEY_PARTS: usize = 16;
/// Longest full object key S3 accepts.
pub const MAX_OBJECT_KEY_BYTES: usize = 1024;
/// The first part of every staging key; refused as the start of a documented key.
pub const STAGING_DIR: &str = "_staging";

/// Checks one name that becomes a single path part (experiment, run id, job
/// id): non-empty, at most 128 bytes, only `[A-Za-z0-9._-]`, not starting
/// with `.`. `kind` names the thing in the error, e.g. `experiment name`.
pub fn validate_component(kind: &'static str, value: &str) -> Result<(), StoreError> {
    match component_problem(value) {
        None => Ok(()),
        Some(reason) => Err(StoreError::UnsafeName {
            kind,
            value: value.to_owned(),
            reason,
        }),
    }
}

/// Checks an attempt number: attempts count from 1.
pub fn validate_attempt(attempt: u32) -> Result<(), StoreError> {
    if attempt == 0 {
        return Err(StoreError::UnsafeName {
            kind: "attempt",
            value: "0".to_owned(),
            reason: "attempts count from 1".to_owned(),
        });
    }
    Ok(())
}

/// What a relative key is used for: documented keys may not live under the
/// staging area; keys that are only read or listed may.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyUse {
    /// A key that is written at (or promoted to) a documented path.
    Documented,
    /// A key that is only read, listed or deleted.
    Read,
}

/// Checks a relative key below a run root, e.g.
/// `inference/raw/residual/dynamic/p01.pt`: '/'-separated parts that each pass
/// [`validate_component`]'s rules, no empty part, not absolute, no backslash,
/// no control character, at most 512 bytes and 16 parts.
pub fn validate_relative_key(key: &str, usage: KeyUse) -> Result<(), StoreError> {
    match relative_key_problem(key, usage) {
        None => Ok(()),
        Some(reason) => Err(StoreError::UnsafeKey {
            key: key.to_owned(),
            reason,
        }),
    }
}

/// Checks a listing prefix: empty (the whole run root) or a relative key.
pub(crate) fn validate_list_prefix(prefix: &str) -> Result<(), StoreError> {
    let trimmed = prefix.strip_suffix('/').unwrap_or(prefix);
    if trimmed.is_empty() && prefix.is_empty() {
        return Ok(());
    }
    validate_relative_key(trimmed, KeyUse::Read)
}

fn relative_key_problem(key: &str, usage: KeyUse) -> Option<String> {
    if key.is_empty() {
        return Some("must not be empty".to_owned());
    }
    if key.bytes().any(|b| b.is_ascii_control()) {
        return Some("contains a control character".to_owned());
    }
    if key.contains('\\') {
        return Some("contains a backslash; separate parts with '/'".to_owned());
    }
    if key.starts_with('/') {
        return Some("must be relative to the run root, not start with '/'".to_owned());
    }
    if key.len() > MAX_RELATIVE_KEY_BYTES {
        return Some(format!(
            "it is {} bytes long; use at most {MAX_RELATIVE_KEY_BYTES}",
            key.len()
        ));
    }
    let parts: Vec<&str> = key.split('/').collect();
    if parts.len() > MAX_RELATIVE_KEY_PARTS {
        return Some(format!(
            "it has {} parts; use at most {MAX_RELATIVE_KEY_PARTS}",
            parts.len()
        ));
    }
    if parts.iter().any(|part| part.is_empty()) {
        return Some("has an empty part (\"//\" or a trailing '/')".to_owned());
    }
    if let Some(part) = parts.iter().find(|part| **part == "." || **part == "..") {
        return Some(format!("has a \"{part}\" part"));
    }
    for part in &parts {
        if let Some(problem) = component_problem(part) {
            return Some(format!("part {}: {problem}", quote_short(part)));
        }
    }
    if usage == KeyUse::Documented && parts[0] == STAGING_DIR {
        return Some(format!(
            "\"{STAGING_DIR}/\" is reserved for uploads that are not yet accepted"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_reference_keys_are_accepted() {
        for key in [
            "manifest.json",
            "inference/raw/residual/dynamic/p01.pt",
            "inference/raw/internals/real_world/q-7_L16.pt",
        ] {
            validate_relative_key(key, KeyUse::Documented).unwrap();
        }
    }

    #[test]
    fn unsafe_keys_are_refused_with_a_reason() {
        let long = "a".repeat(300);
        let cases: &[(&str, &str)] = &[
            ("", "must not be empty"),
            ("../x", "has a \"..\" part"),
            ("a/../b", "has a \"..\" part"),
            ("a/./b", "has a \".\" part"),
            ("/abs", "must be relative to the run root"),
            ("a//b", "has an empty part"),
            ("a/b/", "has an empty part"),
            ("a\0b", "contains a control character"),
            ("a\\b", "contains a backslash"),
            ("a/.hidden", "must not start with '.'"),
            ("a/b c", "use letters, digits"),
            ("a/b#1", "use letters, digits"),
            (&long, "bytes long"),
            ("_staging/j/1/x.pt", "reserved"),
        ];
        for (key, want) in cases {
            let err = validate_relative_key(key, KeyUse::Documented).unwrap_err();
            let msg = err.to_string();
            assert!(
                matches!(err, StoreError::UnsafeKey { .. }),
                "{key:?}: {err:?}"
            );
            assert!(msg.starts_with("unsafe artifact key "), "{msg}");
            assert!(msg.contains(want), "{key:?}: {msg}");
            assert!(!msg.ends_with('.'), "{msg}");
        }
        let segments = vec!["a"; MAX_RELATIVE_KEY_PARTS + 1].join("/");
        assert!(validate_relative_key(&segments, KeyUse::Read).is_err());
    }

    #[test]
    fn staging_keys_may_be_read_but_not_documented() {
        validate_relative_key("_staging/j/1/x.pt", KeyUse::Read).unwrap();
        validate_list_prefix("_staging").unwrap();
        validate_list_prefix("_staging/").unwrap();
        validate_list_prefix("").unwrap();
        assert!(validate_list_prefix("/").is_err());
        assert!(validate_list_prefix("../").is_err());
    }

    #[test]
    fn names_are_single_safe_components() {
        validate_component("experiment name", "exp-1.v2_final").unwrap();
        let long = "x".repeat(300);
        for bad in [
            "",
            "../x",
            ".x",
            "a/b",
            "a\\b",
            "a\0b",
            "a b",
            long.as_str(),
        ] {
            let err = validate_component("experiment name", bad).unwrap_err();
            let msg = err.to_string();
            assert!(msg.starts_with("unsafe experiment name "), "{msg}");
        }
        let msg = validate_component("run id", &long).unwrap_err().to_string();
        assert!(msg.contains("300 bytes long; use at most 128"), "{msg}");
        assert!(msg.contains("..."), "long values are shortened: {msg}");
        assert!(validate_attempt(0).is_err());
        validate_attempt(1).unwrap();
    }
}
