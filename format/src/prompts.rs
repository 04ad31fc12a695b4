//! Prompt sets: the built-in sets and custom prompt files.
//!
//! A prompt set is a JSON document shaped like
//! `{"name": "...", "description": "...", "prompts": [{"id": 1, "text": "...", "note": "..."}]}`.
//! Set names and prompt ids become file names (`{set}/{id}.pt`, `{id}_L{layer}.pt`),
//! so both are checked with [`validate_path_component`] before any work starts.

use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

/// Names of the built-in prompt sets, sorted alphabetically.
pub const BUILTIN_SET_NAMES: [&str; 6] = [
    "adversarial",
    "baseline",
    "dynamic",
    "multi_trait",
    "real_world",
    "single_trait",
];

/// The built-in sets, embedded at compile time, in the order of [`BUILTIN_SET_NAMES`].
const BUILTIN_SETS: [(&str, &str); 6] = [
    (
        "adversarial",
        include_str!("../../inference/prompts/adversarial.json"),
    ),
    (
        "baseline",
        include_str!("../../inference/prompts/baseline.json"),
    ),
    (
        "dynamic",
        include_str!("../../inference/prompts/dynamic.json"),
    ),
    (
        "multi_trait",
        include_str!("../../inference/prompts/multi_trait.json"),
    ),
    (
        "real_world",
        include_str!("../../inference/prompts/real_world.json"),
    ),
    (
        "single_trait",
        include_str!("../../inference/prompts/single_trait.json"),
    ),
];

/// Longest single path part accepted (set names, prompt ids, and the
/// store's experiment names and run and job ids), in bytes.
pub const MAX_COMPONENT_BYTES: usize = 128;

/// Set name used by [`PromptSet::single`].
const SINGLE_SET_NAME: &str = "custom";

/// Errors reading or validating prompts.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error(
        "unknown prompt set \"{name}\": known sets are {}",
        BUILTIN_SET_NAMES.join(", ")
    )]
    UnknownSet { name: String },

    #[error("cannot read prompt file {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "prompt file {} is not valid UTF-8 (first invalid byte at offset {offset}): save it as UTF-8",
        .path.display()
    )]
    NotUtf8 { path: PathBuf, offset: usize },

    #[error(
        "malformed JSON in {origin} at line {line}, column {column}: {message}; fix the JSON syntax"
    )]
    MalformedJson {
        origin: String,
        line: usize,
        column: usize,
        message: String,
    },

    #[error(
        "invalid prompt set in {origin} at line {line}, column {column}: {message}; \
         expected {{\"prompts\": [{{\"id\": 1, \"text\": \"...\"}}, ...]}}"
    )]
    Schema {
        origin: String,
        line: usize,
        column: usize,
        message: String,
    },

    #[error(
        "no prompts in {origin}: add at least one {{\"id\": ..., \"text\": ...}} entry to \"prompts\""
    )]
    NoPrompts { origin: String },

    #[error(
        "duplicate prompt id \"{id}\" in {origin}: prompts #{first} and #{second} (counting from 1) \
         share it; give each prompt a unique id"
    )]
    DuplicateId {
        origin: String,
        id: String,
        first: usize,
        second: usize,
    },

    #[error(
        "prompt \"{id}\" in {origin} has empty text: write the prompt text or remove the prompt"
    )]
    EmptyText { origin: String, id: String },

    #[error("empty prompt text: pass a non-empty --prompt")]
    EmptySingle,

    #[error("unsafe {kind} {}{}: {reason}", quote_short(.value), in_origin(.origin.as_deref()))]
    UnsafeName {
        kind: String,
        value: String,
        origin: Option<String>,
        reason: String,
    },
}

/// One prompt of a set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Prompt {
    /// Safe path component; integer ids in files are rendered in decimal.
    pub id: String,
    pub text: String,
    pub note: Option<String>,
}

/// A named, validated list of prompts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PromptSet {
    /// Safe path component: the built-in name, the file stem, or `custom`.
    pub name: String,
    pub description: String,
    pub prompts: Vec<Prompt>,
}

impl PromptSet {
    /// Loads one of the [`BUILTIN_SET_NAMES`].
    pub fn builtin(name: &str) -> Result<PromptSet, PromptError> {
        let (set_name, json) = BUILTIN_SETS
            .iter()
            .find(|(n, _)| *n == name)
            .ok_or_else(|| PromptError::UnknownSet {
                name: name.to_owned(),
            })?;
        PromptSet::from_json_str(set_name, json, &format!("built-in set {set_name}"))
    }

    /// Loads a custom prompt file; the set name is the file stem (the `name`
    /// field inside the file is ignored).
    pub fn from_file(path: &Path) -> Result<PromptSet, PromptError> {
        let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned());
        let origin = Some(format!("file name of {}", path.display()));
        let name = stem.unwrap_or_default();
        // A non-UTF-8 stem turns into U+FFFD here, which the check rejects.
        validate_component("prompt set name", &name, origin)?;

        let bytes = std::fs::read(path).map_err(|source| PromptError::Read {
            path: path.to_owned(),
            source,
        })?;
        let json = std::str::from_utf8(&bytes).map_err(|e| PromptError::NotUtf8 {
            path: path.to_owned(),
            offset: e.valid_up_to(),
        })?;
        PromptSet::from_json_str(&name, json, &path.display().to_string())
    }

    /// Parses and validates a prompt set document. `source` names the
    /// document in error messages (a file path or `built-in set x`).
    pub fn from_json_str(name: &str, json: &str, source: &str) -> Result<PromptSet, PromptError> {
        validate_component("prompt set name", name, Some(source.to_owned()))?;

        // Editors on some systems prepend a byte-order mark; it is not JSON.
        let json = json.strip_prefix('\u{feff}').unwrap_or(json);
        let ObjectOnly(raw): ObjectOnly<RawSet> =
            serde_json::from_str(json).map_err(|e| json_error(&e, source))?;

        if raw.prompts.is_empty() {
            return Err(PromptError::NoPrompts {
                origin: source.to_owned(),
            });
        }

        let mut seen: HashMap<String, usize> = HashMap::with_capacity(raw.prompts.len());
        let mut prompts = Vec::with_capacity(raw.prompts.len());
        for (index, ObjectOnly(p)) in raw.prompts.into_iter().enumerate() {
            let position = index + 1;
            let id = p.id.0;
            validate_component("prompt id", &id, Some(source.to_owned()))?;
            if let Some(&first) = seen.get(&id) {
                return Err(PromptError::DuplicateId {
                    origin: source.to_owned(),
                    id,
                    first,
                    second: position,
                });
            }
            if p.text.trim().is_empty() {
                return Err(PromptError::EmptyText {
                    origin: source.to_owned(),
                    id,
                });
            }
            seen.insert(id.clone(), position);
            prompts.push(Prompt {
                id,
                text: p.text,
                note: p.note,
            });
        }

        Ok(PromptSet {
            name: name.to_owned(),
            description: raw.description.unwrap_or_default(),
            prompts,
        })
    }

    /// A one-prompt set for `--prompt TEXT`: set name `custom`, prompt id `1`.
    pub fn single(text: &str) -> Result<PromptSet, PromptError> {
        if text.trim().is_empty() {
            return Err(PromptError::EmptySingle);
        }
        Ok(PromptSet {
            name: SINGLE_SET_NAME.to_owned(),
            description: "single prompt from --prompt".to_owned(),
            prompts: vec![Prompt {
                id: "1".to_owned(),
                text: text.to_owned(),
                note: None,
            }],
        })
    }
}

/// Checks that `s` can be used as one file-name component: non-empty, at most
/// 128 bytes, only `[A-Za-z0-9._-]`, and not starting with `.` (so neither
/// `.` nor `..`). `kind` names the thing in the message, e.g. `prompt id`.
pub fn validate_path_component(kind: &str, s: &str) -> Result<(), PromptError> {
    validate_component(kind, s, None)
}

fn validate_component(kind: &str, s: &str, origin: Option<String>) -> Result<(), PromptError> {
    match component_problem(s) {
        None => Ok(()),
        Some(reason) => Err(unsafe_name(kind, s, origin, &reason)),
    }
}

/// Why `value` cannot be one file-name component (the rules of
/// [`validate_path_component`]), or `None` when it can. The store checks the
/// names it puts in object keys with the same rules.
pub fn component_problem(value: &str) -> Option<String> {
    if value.is_empty() {
        return Some("must not be empty".to_owned());
    }
    if value.bytes().any(|b| b.is_ascii_control()) {
        return Some("contains a control character".to_owned());
    }
    if value.contains('/') || value.contains('\\') {
        return Some("must be a single name, without '/' or '\\'".to_owned());
    }
    if value.len() > MAX_COMPONENT_BYTES {
        return Some(format!(
            "it is {} bytes long; use at most {MAX_COMPONENT_BYTES}",
            value.len()
        ));
    }
    if value.starts_with('.') {
        return Some("must not start with '.'".to_owned());
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Some("use letters, digits, '.', '_' and '-' only".to_owned());
    }
    None
}

fn unsafe_name(kind: &str, value: &str, origin: Option<String>, reason: &str) -> PromptError {
    PromptError::UnsafeName {
        kind: kind.to_owned(),
        value: value.to_owned(),
        origin,
        reason: reason.to_owned(),
    }
}

/// Quotes `value` for a message (escaping control characters) and cuts very
/// long values so one bad name cannot flood the log. The store's key checks
/// use it too.
pub fn quote_short(value: &str) -> String {
    const MAX_CHARS: usize = 60;
    if value.chars().count() <= MAX_CHARS {
        format!("{value:?}")
    } else {
        let head: String = value.chars().take(MAX_CHARS).collect();
        format!("{head:?}...")
    }
}

fn in_origin(origin: Option<&str>) -> String {
    origin.map(|o| format!(" (in {o})")).unwrap_or_default()
}

/// Splits a `serde_json` error into syntax and shape problems, keeping the
/// position as separate fields.
fn json_error(e: &serde_json::Error, origin: &str) -> PromptError {
    let full = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    let message = full.strip_suffix(&suffix).unwrap_or(&full).to_owned();
    let (origin, line, column) = (origin.to_owned(), e.line(), e.column());
    match e.classify() {
        serde_json::error::Category::Data => PromptError::Schema {
            origin,
            line,
            column,
            message,
        },
        serde_json::error::Category::Io
        | serde_json::error::Category::Syntax
        | serde_json::error::Category::Eof => PromptError::MalformedJson {
            origin,
            line,
            column,
            message,
        },
    }
}

/// The file layout; unknown fields are ignored, `name` is not read (the set
/// name comes from the file stem or the built-in name).
#[derive(Deserialize)]
struct RawSet {
    #[serde(default)]
    description: Option<String>,
    prompts: Vec<ObjectOnly<RawPrompt>>,
}

impl Expecting for RawSet {
    const EXPECTING: &'static str = "a prompt set object with a \"prompts\" array";
}

#[derive(Deserialize)]
struct RawPrompt {
    id: RawId,
    text: String,
    #[serde(default)]
    note: Option<String>,
}

impl Expecting for RawPrompt {
    const EXPECTING: &'static str = "a prompt object with \"id\" and \"text\"";
}

/// What a JSON object stands for, for "invalid type" messages.
trait Expecting {
    const EXPECTING: &'static str;
}

/// Accepts `T` only from a JSON object: derived structs would also take an
/// array of positional fields, which no prompt file means to write.
struct ObjectOnly<T>(T);

impl<'de, T: Deserialize<'de> + Expecting> Deserialize<'de> for ObjectOnly<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor<T>(PhantomData<T>);

        impl<'de, T: Deserialize<'de> + Expecting> Visitor<'de> for ObjectVisitor<T> {
            type Value = ObjectOnly<T>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(T::EXPECTING)
            }

            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map)).map(ObjectOnly)
            }
        }

        deserializer.deserialize_map(ObjectVisitor(PhantomData))
    }
}

/// A prompt id given as a JSON integer or string, rendered as a string.
struct RawId(String);

impl<'de> Deserialize<'de> for RawId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct IdVisitor;

        impl Visitor<'_> for IdVisitor {
            type Value = RawId;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a prompt id (an integer or a string)")
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawId, E> {
                Ok(RawId(v.to_string()))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawId, E> {
                Ok(RawId(v.to_string()))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawId, E> {
                Ok(RawId(v.to_owned()))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<RawId, E> {
                Ok(RawId(v))
            }
        }

        deserializer.deserialize_any(IdVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn expected_count(name: &str) -> usize {
        match name {
            "single_trait" | "multi_trait" | "real_world" => 10,
            "dynamic" | "adversarial" => 8,
            "baseline" => 5,
            other => panic!("no expected count for {other}"),
        }
    }

    fn write_file(dir: &tempfile::TempDir, file_name: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.path().join(file_name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn parse_err(json: &str) -> String {
        PromptSet::from_json_str("t", json, "test.json")
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn builtin_names_sorted_and_match_table() {
        let mut sorted = BUILTIN_SET_NAMES;
        sorted.sort_unstable();
        assert_eq!(sorted, BUILTIN_SET_NAMES);
        let table: Vec<&str> = BUILTIN_SETS.iter().map(|(n, _)| *n).collect();
        assert_eq!(table, BUILTIN_SET_NAMES);
    }

    #[test]
    fn every_builtin_set_loads() {
        for name in BUILTIN_SET_NAMES {
            let set = PromptSet::builtin(name).unwrap();
            assert_eq!(set.name, name);
            assert_eq!(set.prompts.len(), expected_count(name), "{name}");
            assert!(!set.description.is_empty(), "{name}");

            let ids: HashSet<&str> = set.prompts.iter().map(|p| p.id.as_str()).collect();
            assert_eq!(ids.len(), set.prompts.len(), "{name}: ids unique");
            for (i, p) in set.prompts.iter().enumerate() {
                assert_eq!(p.id, (i + 1).to_string(), "{name}: ids are 1..n");
                assert!(p.note.as_deref().is_some_and(|n| !n.is_empty()));
            }
            let long = set
                .prompts
                .iter()
                .filter(|p| p.text.split_whitespace().count() > 30)
                .count();
            assert!(long >= 2, "{name}: only {long} prompts over 30 words");

            // The "name" field inside the file agrees with the file name.
            let (_, json) = BUILTIN_SETS.iter().find(|(n, _)| *n == name).unwrap();
            let value: serde_json::Value = serde_json::from_str(json).unwrap();
            assert_eq!(value["name"], name);
        }
    }

    #[test]
    fn unknown_builtin_lists_known_sets_sorted() {
        let msg = PromptSet::builtin("foo").unwrap_err().to_string();
        assert_eq!(
            msg,
            "unknown prompt set \"foo\": known sets are adversarial, baseline, dynamic, \
             multi_trait, real_world, single_trait"
        );
    }

    #[test]
    fn custom_file_uses_stem_and_accepts_int_and_string_ids() {
        let dir = tempfile::tempdir().unwrap();
        let json = r#"{
  "name": "something else",
  "extra": {"ignored": true},
  "prompts": [
    {"id": 7, "text": "hello", "unknown": 1},
    {"id": "b-2", "text": "world", "note": "n"},
    {"id": -3, "text": "negative"}
  ]
}"#;
        let path = write_file(&dir, "my_set.v2.json", json.as_bytes());
        let set = PromptSet::from_file(&path).unwrap();
        assert_eq!(set.name, "my_set.v2");
        assert_eq!(set.description, "");
        let ids: Vec<&str> = set.prompts.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids, ["7", "b-2", "-3"]);
        assert_eq!(set.prompts[0].note, None);
        assert_eq!(set.prompts[1].note.as_deref(), Some("n"));
    }

    #[test]
    fn byte_order_mark_is_accepted() {
        let set = PromptSet::from_json_str(
            "t",
            "\u{feff}{\"prompts\":[{\"id\":1,\"text\":\"x\"}]}",
            "s",
        )
        .unwrap();
        assert_eq!(set.prompts.len(), 1);
    }

    #[test]
    fn single_prompt_set() {
        let set = PromptSet::single("What is 2 + 2?").unwrap();
        assert_eq!(set.name, "custom");
        assert_eq!(set.prompts.len(), 1);
        assert_eq!(set.prompts[0].id, "1");
        assert_eq!(set.prompts[0].text, "What is 2 + 2?");
        let msg = PromptSet::single("  \n").unwrap_err().to_string();
        assert!(msg.contains("--prompt"), "{msg}");
    }

    #[test]
    fn malformed_json_reports_file_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_file(
            &dir,
            "broken.json",
            b"{\n  \"prompts\": [\n    {\"id\": 1, \"text\": \"a\",}\n  ]\n}\n",
        );
        let err = PromptSet::from_file(&path).unwrap_err();
        assert!(
            matches!(err, PromptError::MalformedJson { line: 3, .. }),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.starts_with("malformed JSON in "), "{msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("line 3, column "), "{msg}");

        let msg = parse_err("{\"prompts\": [");
        assert!(
            msg.contains("malformed JSON in test.json at line 1"),
            "{msg}"
        );
    }

    #[test]
    fn invalid_utf8_reports_byte_offset() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = b"{\"prompts\": [{\"id\": 1, \"text\": \"caf".to_vec();
        let offset = bytes.len();
        bytes.extend_from_slice(&[0xE9, b'"', b'}', b']', b'}']);
        let path = write_file(&dir, "latin1.json", &bytes);
        let msg = PromptSet::from_file(&path).unwrap_err().to_string();
        assert!(msg.contains("not valid UTF-8"), "{msg}");
        assert!(msg.contains(&format!("offset {offset}")), "{msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
    }

    #[test]
    fn missing_file_names_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.json");
        let err = PromptSet::from_file(&path).unwrap_err();
        assert!(matches!(err, PromptError::Read { .. }), "{err:?}");
        assert!(err.to_string().contains("absent.json"));
    }

    #[test]
    fn schema_errors_report_position() {
        let msg = parse_err("{\"description\": \"d\"}");
        assert!(msg.contains("missing field `prompts`"), "{msg}");
        assert!(msg.contains("test.json at line 1, column"), "{msg}");

        let msg = parse_err("{\"prompts\": [\n{\"id\": 1}\n]}");
        assert!(msg.contains("missing field `text`"), "{msg}");
        assert!(msg.contains("line 2, column"), "{msg}");

        let msg = parse_err("{\"prompts\": [{\"id\": 1.5, \"text\": \"x\"}]}");
        assert!(msg.contains("an integer or a string"), "{msg}");

        let msg = parse_err("{\"prompts\": [{\"id\": 1, \"text\": 5}]}");
        assert!(msg.contains("invalid type"), "{msg}");

        let msg = parse_err("[1, 2]");
        assert!(msg.starts_with("invalid prompt set in test.json"), "{msg}");
        assert!(msg.contains("expected a prompt set object"), "{msg}");

        // Arrays of positional fields are not prompts.
        let msg = parse_err("{\"prompts\": [[1, \"text\"]]}");
        assert!(msg.contains("expected a prompt object"), "{msg}");

        let msg = parse_err("{\"prompts\": {\"id\": 1, \"text\": \"x\"}}");
        assert!(
            msg.contains("invalid type: map, expected a sequence"),
            "{msg}"
        );
    }

    #[test]
    fn empty_prompts_rejected() {
        let msg = parse_err("{\"prompts\": []}");
        assert!(msg.starts_with("no prompts in test.json"), "{msg}");
    }

    #[test]
    fn duplicate_ids_name_id_and_positions() {
        let json = r#"{"prompts": [
            {"id": 1, "text": "a"}, {"id": 2, "text": "b"}, {"id": "1", "text": "c"}
        ]}"#;
        let err = PromptSet::from_json_str("t", json, "test.json").unwrap_err();
        assert!(
            matches!(&err, PromptError::DuplicateId { id, first: 1, second: 3, .. } if id == "1"),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains("duplicate prompt id \"1\""), "{msg}");
        assert!(msg.contains("#1 and #3"), "{msg}");
    }

    #[test]
    fn empty_text_names_id() {
        let msg =
            parse_err(r#"{"prompts": [{"id": "q1", "text": "x"}, {"id": "q2", "text": " \t\n"}]}"#);
        assert!(msg.contains("prompt \"q2\""), "{msg}");
        assert!(msg.contains("empty text"), "{msg}");
    }

    #[test]
    fn unsafe_prompt_ids_rejected() {
        for id in [
            "../x",
            "a/b",
            "a\\\\b",
            ".",
            "..",
            ".hidden",
            "",
            "a b",
            "a\\u0000b",
        ] {
            let json = format!(r#"{{"prompts": [{{"id": "{id}", "text": "x"}}]}}"#);
            let err = PromptSet::from_json_str("t", &json, "test.json").unwrap_err();
            assert!(
                matches!(err, PromptError::UnsafeName { .. }),
                "{id}: {err:?}"
            );
            let msg = err.to_string();
            assert!(msg.starts_with("unsafe prompt id "), "{msg}");
            assert!(msg.contains("test.json"), "{msg}");
        }
        let long = "a".repeat(MAX_COMPONENT_BYTES + 1);
        let json = format!(r#"{{"prompts": [{{"id": "{long}", "text": "x"}}]}}"#);
        let msg = parse_err(&json);
        assert!(msg.contains("129 bytes long"), "{msg}");
    }

    #[test]
    fn unsafe_set_names_rejected() {
        assert_eq!(
            validate_path_component("prompt set name", "../x")
                .unwrap_err()
                .to_string(),
            "unsafe prompt set name \"../x\": must be a single name, without '/' or '\\'"
        );
        assert!(validate_path_component("prompt id", "ok_1.2-b").is_ok());
        assert!(validate_path_component("prompt id", &"a".repeat(MAX_COMPONENT_BYTES)).is_ok());
        for bad in ["", ".", "..", ".x", "a/b", "a\\b", "a\0b", "é", "a b"] {
            assert!(
                validate_path_component("prompt id", bad).is_err(),
                "{bad:?}"
            );
        }
        let err = PromptSet::from_json_str("../x", "{\"prompts\": []}", "s").unwrap_err();
        assert!(matches!(err, PromptError::UnsafeName { .. }), "{err:?}");

        let dir = tempfile::tempdir().unwrap();
        let path = write_file(
            &dir,
            "my set.json",
            b"{\"prompts\": [{\"id\": 1, \"text\": \"x\"}]}",
        );
        let msg = PromptSet::from_file(&path).unwrap_err().to_string();
        assert!(
            msg.starts_with("unsafe prompt set name \"my set\""),
            "{msg}"
        );
        assert!(msg.contains("my set.json"), "{msg}");
        let path = write_file(
            &dir,
            ".json",
            b"{\"prompts\": [{\"id\": 1, \"text\": \"x\"}]}",
        );
        assert!(PromptSet::from_file(&path).is_err());
    }
}
