//! Finding a Gemma-2 checkpoint: a local directory or a Hugging Face hub id.
//!
//! [`resolve_model`] turns what the user passed (`--model`, `--revision`)
//! into the paths of a checkpoint's files: `config.json`, `tokenizer.json`,
//! the optional `generation_config.json` and the safetensors weights (one
//! `model.safetensors`, or every shard that `model.safetensors.index.json`
//! lists). A hub id is downloaded into the Hugging Face cache with hf-hub's
//! sync API. Only finding files and hashing the two small ones happens here:
//! loading tensors and checking shapes belongs to the model.

mod hub;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

pub use hub::{DEFAULT_ENDPOINT, HubSettings};

/// The checkpoint used when the user names none.
pub const DEFAULT_MODEL_ID: &str = "google/gemma-2-2b-it";

const CONFIG_JSON: &str = "config.json";
const TOKENIZER_JSON: &str = "tokenizer.json";
const GENERATION_CONFIG_JSON: &str = "generation_config.json";
const MODEL_SAFETENSORS: &str = "model.safetensors";
const SAFETENSORS_INDEX_JSON: &str = "model.safetensors.index.json";

/// What to load: a directory or a hub id, as the user gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSource {
    /// A checkpoint directory or a hub id `owner/name`, as given.
    pub spec: String,
    /// A branch, tag or commit of a hub repo (`main` when `None`).
    pub revision: Option<String>,
}

impl ModelSource {
    /// A source for `spec` at the default revision.
    pub fn new(spec: impl Into<String>) -> Self {
        Self {
            spec: spec.into(),
            revision: None,
        }
    }
}

/// The files of one checkpoint, found and checked to exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFiles {
    /// The hub id, or the canonicalised directory path for a local directory.
    pub model_id: String,
    /// For hub downloads the commit sha the files come from (the hub's
    /// `x-repo-commit`, as recorded in the cache's snapshot path), else the
    /// requested revision; `None` for directories.
    pub revision: Option<String>,
    /// The directory holding `config.json` (the snapshot directory in the hub cache).
    pub dir: PathBuf,
    pub config_json: PathBuf,
    pub tokenizer_json: PathBuf,
    pub generation_config_json: Option<PathBuf>,
    /// `model.safetensors`, or every shard listed in
    /// `model.safetensors.index.json` (deduplicated, sorted by name).
    pub safetensors: Vec<PathBuf>,
    /// Lowercase hex sha256 of `config.json`'s bytes.
    pub config_sha256: String,
    /// Lowercase hex sha256 of `tokenizer.json`'s bytes.
    pub tokenizer_sha256: String,
}

/// Errors finding or reading a checkpoint's files. Every message says what
/// happened and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ModelFilesError {
    #[error(
        "model {spec:?} is not a directory and not a hub id: pass a checkpoint directory or a hub id of the form owner/name (like {DEFAULT_MODEL_ID})"
    )]
    BadSpec { spec: String },
    #[error(
        "model path {} does not exist: pass an existing checkpoint directory or a hub id like {DEFAULT_MODEL_ID}",
        path.display()
    )]
    PathNotFound { path: PathBuf },
    #[error(
        "model path {} is not a directory: pass the directory that holds config.json, tokenizer.json and the safetensors weights",
        path.display()
    )]
    NotADirectory { path: PathBuf },
    #[error(
        "revision {revision} was given for the local directory {}: a revision only applies to hub ids",
        dir.display()
    )]
    RevisionForDirectory { dir: PathBuf, revision: String },
    #[error("revision {revision:?} is not a valid git revision: pass a branch, tag or commit sha")]
    BadRevision { revision: String },
    #[error(
        "{file} is missing in {}: a gemma-2 checkpoint directory needs config.json, tokenizer.json and model.safetensors (or model.safetensors.index.json and its shards)",
        dir.display()
    )]
    MissingFile { file: String, dir: PathBuf },
    #[error(
        "no weights in {}: expected model.safetensors or model.safetensors.index.json there",
        dir.display()
    )]
    NoWeights { dir: PathBuf },
    #[error(
        "{} names shard {shard}, which does not exist in {}: copy the missing shard there or fix the index",
        index.display(),
        dir.display()
    )]
    MissingShard {
        index: PathBuf,
        shard: String,
        dir: PathBuf,
    },
    #[error("cannot use {}: {reason}", index.display())]
    BadIndex { index: PathBuf, reason: String },
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot find the hugging face cache: none of HF_HOME, HF_HUB_CACHE, XDG_CACHE_HOME, HOME is set: set HF_HOME to a writable directory"
    )]
    NoCacheDir,
    #[error(
        "cannot reach the hub at {endpoint} ({detail}): no network? set HF_ENDPOINT for a mirror, or pass --model with a local directory"
    )]
    HubUnreachable { endpoint: String, detail: String },
    #[error(
        "model {model_id} is gated or private: accept its license on the hub and set HF_TOKEN ({})",
        hub::gated_detail(*status, *token_sent)
    )]
    HubGated {
        model_id: String,
        status: u16,
        token_sent: bool,
    },
    #[error(
        "repo or revision not found: model {model_id} at revision {revision} on {endpoint} (http 404 for config.json): check the hub id and the revision"
    )]
    HubNotFound {
        model_id: String,
        revision: String,
        endpoint: String,
    },
    #[error(
        "model {model_id} at revision {revision} has no {file} on the hub: it is not a complete gemma-2 checkpoint (it needs config.json, tokenizer.json and model.safetensors or model.safetensors.index.json)"
    )]
    HubMissingFile {
        model_id: String,
        revision: String,
        file: String,
    },
    #[error(
        "model {model_id} at revision {revision} has neither model.safetensors nor model.safetensors.index.json on the hub: it has no safetensors weights"
    )]
    HubNoWeights { model_id: String, revision: String },
    #[error(
        "model.safetensors.index.json of model {model_id} at revision {revision} names shard {shard}, which the hub does not have (http 404)"
    )]
    HubMissingShard {
        model_id: String,
        revision: String,
        shard: String,
    },
    #[error(
        "the hub at {endpoint} answered http {status} for {file} of model {model_id}: {}",
        hub::status_hint(*status)
    )]
    HubStatus {
        endpoint: String,
        model_id: String,
        file: String,
        status: u16,
    },
    #[error(
        "hub endpoint {endpoint} is not a usable url ({detail}): set HF_ENDPOINT to a url like {DEFAULT_ENDPOINT}"
    )]
    HubBadEndpoint { endpoint: String, detail: String },
    #[error(
        "the server at {endpoint} does not answer like a hugging face hub ({detail}): check HF_ENDPOINT"
    )]
    HubProtocol { endpoint: String, detail: String },
    #[error(
        "i/o error while downloading {file} of model {model_id} into the hub cache {}: {detail}: check free space and permissions there (HF_HOME moves the cache), then retry",
        cache_dir.display()
    )]
    HubCacheIo {
        model_id: String,
        file: String,
        cache_dir: PathBuf,
        detail: String,
    },
    #[error(
        "another process holds the download lock {}: wait for it to finish, or delete the lock file if no download is running",
        path.display()
    )]
    HubLocked { path: PathBuf },
    #[error(
        "a partial download of {file} of model {model_id} in the hub cache {} is corrupt: delete the *.part files in its blobs folder and retry",
        cache_dir.display()
    )]
    HubCorruptPart {
        model_id: String,
        file: String,
        cache_dir: PathBuf,
    },
    #[error(
        "revision {revision} of model {model_id} moved to a new commit during the download: run again, or pin the revision to a commit sha"
    )]
    HubRevisionMoved { model_id: String, revision: String },
    #[error("downloading {file} of model {model_id} from {endpoint} failed: {detail}")]
    HubOther {
        endpoint: String,
        model_id: String,
        file: String,
        detail: String,
    },
}

/// Finds a checkpoint's files: `source.spec` is a local directory or a hub
/// id downloaded with the settings from the environment ([`HubSettings::from_env`]:
/// `HF_ENDPOINT`, `HF_HOME`, `HF_TOKEN`, ...).
pub fn resolve_model(source: &ModelSource) -> Result<ModelFiles, ModelFilesError> {
    match parse_spec(&source.spec)? {
        Spec::Dir(dir) => resolve_dir(&dir, source.revision.as_deref()),
        Spec::Hub(id) => {
            hub::resolve_hub(&id, source.revision.as_deref(), &HubSettings::from_env()?)
        }
    }
}

/// [`resolve_model`] with explicit hub settings instead of the environment's.
pub fn resolve_model_with(
    source: &ModelSource,
    hub: &HubSettings,
) -> Result<ModelFiles, ModelFilesError> {
    match parse_spec(&source.spec)? {
        Spec::Dir(dir) => resolve_dir(&dir, source.revision.as_deref()),
        Spec::Hub(id) => hub::resolve_hub(&id, source.revision.as_deref(), hub),
    }
}

/// Only the `config.json` of a checkpoint, found (or downloaded) without its
/// tokenizer or weights: enough to learn a model's dimensions, e.g. for a
/// coordinator that checks runs against the model its workers load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelConfigFile {
    /// The id [`ModelFiles::model_id`] has for the same source: the hub id,
    /// or the canonicalised directory path.
    pub model_id: String,
    /// As [`ModelFiles::revision`]: for hub ids the commit the file comes
    /// from (else the requested revision); `None` for directories.
    pub revision: Option<String>,
    pub config_json: PathBuf,
}

/// Finds only `config.json` of `source`: the file in a checkpoint directory,
/// or the hub id's file at the revision, downloaded into the hub cache
/// (settings from the environment as in [`resolve_model`]; a cached file is
/// used without asking the hub).
pub fn resolve_model_config(source: &ModelSource) -> Result<ModelConfigFile, ModelFilesError> {
    model_config(source, HubSettings::from_env)
}

/// [`resolve_model_config`] with explicit hub settings.
pub fn resolve_model_config_with(
    source: &ModelSource,
    hub: &HubSettings,
) -> Result<ModelConfigFile, ModelFilesError> {
    model_config(source, || Ok(hub.clone()))
}

/// The hub settings are read only for a hub id.
fn model_config(
    source: &ModelSource,
    hub: impl FnOnce() -> Result<HubSettings, ModelFilesError>,
) -> Result<ModelConfigFile, ModelFilesError> {
    let revision = source.revision.as_deref();
    match parse_spec(&source.spec)? {
        Spec::Dir(dir) => config_in_dir(&dir, revision),
        Spec::Hub(id) => hub::resolve_hub_config(&id, revision, &hub()?),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Spec {
    Dir(PathBuf),
    Hub(String),
}

fn parse_spec(spec: &str) -> Result<Spec, ModelFilesError> {
    let path = Path::new(spec);
    let pathlike = looks_like_path(spec);
    if !spec.is_empty() {
        match std::fs::metadata(path) {
            Ok(meta) if meta.is_dir() => return Ok(Spec::Dir(path.to_path_buf())),
            Ok(_) => {
                return Err(ModelFilesError::NotADirectory {
                    path: path.to_path_buf(),
                });
            }
            Err(e) if pathlike && e.kind() != std::io::ErrorKind::NotFound => {
                return Err(ModelFilesError::Io {
                    path: path.to_path_buf(),
                    source: e,
                });
            }
            Err(_) => {}
        }
    }
    if pathlike {
        Err(ModelFilesError::PathNotFound {
            path: path.to_path_buf(),
        })
    } else if is_hub_id(spec) {
        Ok(Spec::Hub(spec.to_string()))
    } else {
        Err(ModelFilesError::BadSpec {
            spec: spec.to_string(),
        })
    }
}

/// A spec that can only mean a path: `./x`, `/x`, `~/x`, `a/b/c`, `a/`.
fn looks_like_path(spec: &str) -> bool {
    spec.starts_with(['.', '/', '~'])
        || spec.contains('\\')
        || spec.ends_with('/')
        || spec.matches('/').count() > 1
}

/// `owner/name` with the hub's rules for each part: 1 to 96 of
/// `[A-Za-z0-9_.-]`, starting and ending with a letter, digit or `_`, no
/// `--` or `..`, and a name not ending in `.git`.
fn is_hub_id(spec: &str) -> bool {
    fn part_ok(part: &str) -> bool {
        let edge_ok = |c: char| c.is_ascii_alphanumeric() || c == '_';
        (1..=96).contains(&part.len())
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
            && part.starts_with(edge_ok)
            && part.ends_with(edge_ok)
            && !part.contains("--")
            && !part.contains("..")
    }
    match spec.split_once('/') {
        Some((owner, name)) => part_ok(owner) && part_ok(name) && !name.ends_with(".git"),
        None => false,
    }
}

fn resolve_dir(path: &Path, revision: Option<&str>) -> Result<ModelFiles, ModelFilesError> {
    let dir = canonical_dir(path, revision)?;
    let config_json = required_file(&dir, CONFIG_JSON)?;
    let tokenizer_json = required_file(&dir, TOKENIZER_JSON)?;
    let generation_config_json = Some(dir.join(GENERATION_CONFIG_JSON)).filter(|p| p.is_file());
    let safetensors = local_weights(&dir)?;
    finish(
        dir.display().to_string(),
        None,
        dir,
        config_json,
        tokenizer_json,
        generation_config_json,
        safetensors,
    )
}

fn config_in_dir(path: &Path, revision: Option<&str>) -> Result<ModelConfigFile, ModelFilesError> {
    let dir = canonical_dir(path, revision)?;
    Ok(ModelConfigFile {
        model_id: dir.display().to_string(),
        revision: None,
        config_json: required_file(&dir, CONFIG_JSON)?,
    })
}

/// The canonical path of a checkpoint directory, which is its model id; a
/// revision cannot apply to it.
fn canonical_dir(path: &Path, revision: Option<&str>) -> Result<PathBuf, ModelFilesError> {
    let dir = std::fs::canonicalize(path).map_err(|source| ModelFilesError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    match revision {
        Some(revision) => Err(ModelFilesError::RevisionForDirectory {
            dir,
            revision: revision.to_string(),
        }),
        None => Ok(dir),
    }
}

fn required_file(dir: &Path, name: &str) -> Result<PathBuf, ModelFilesError> {
    let path = dir.join(name);
    match std::fs::metadata(&path) {
        Ok(meta) if meta.is_file() => Ok(path),
        Ok(_) => Err(ModelFilesError::MissingFile {
            file: name.to_string(),
            dir: dir.to_path_buf(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ModelFilesError::MissingFile {
            file: name.to_string(),
            dir: dir.to_path_buf(),
        }),
        Err(source) => Err(ModelFilesError::Io { path, source }),
    }
}

fn local_weights(dir: &Path) -> Result<Vec<PathBuf>, ModelFilesError> {
    let single = dir.join(MODEL_SAFETENSORS);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join(SAFETENSORS_INDEX_JSON);
    if !index.is_file() {
        return Err(ModelFilesError::NoWeights {
            dir: dir.to_path_buf(),
        });
    }
    read_index(&index)?
        .into_iter()
        .map(|shard| {
            let path = dir.join(&shard);
            if path.is_file() {
                Ok(path)
            } else {
                Err(ModelFilesError::MissingShard {
                    index: index.clone(),
                    shard,
                    dir: dir.to_path_buf(),
                })
            }
        })
        .collect()
}

#[derive(serde::Deserialize)]
struct SafetensorsIndex {
    weight_map: BTreeMap<String, String>,
}

/// The shard file names an index lists, deduplicated and sorted.
fn read_index(index: &Path) -> Result<BTreeSet<String>, ModelFilesError> {
    let bad = |reason: String| ModelFilesError::BadIndex {
        index: index.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(index).map_err(|source| ModelFilesError::Io {
        path: index.to_path_buf(),
        source,
    })?;
    let parsed: SafetensorsIndex = serde_json::from_slice(&bytes)
        .map_err(|e| bad(format!("not a safetensors index with a weight_map ({e})")))?;
    let shards: BTreeSet<String> = parsed.weight_map.into_values().collect();
    if shards.is_empty() {
        return Err(bad("its weight_map is empty".to_string()));
    }
    if let Some(shard) = shards.iter().find(|s| !is_relative_file_name(s)) {
        return Err(bad(format!(
            "shard {shard:?} is not a relative file name inside the checkpoint"
        )));
    }
    Ok(shards)
}

/// A relative path of normal components only (no `..`, no root, no `\`).
fn is_relative_file_name(name: &str) -> bool {
    !name.is_empty()
        && !name.contains('\\')
        && Path::new(name)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

fn finish(
    model_id: String,
    revision: Option<String>,
    dir: PathBuf,
    config_json: PathBuf,
    tokenizer_json: PathBuf,
    generation_config_json: Option<PathBuf>,
    safetensors: Vec<PathBuf>,
) -> Result<ModelFiles, ModelFilesError> {
    let config_sha256 = sha256_file(&config_json)?;
    let tokenizer_sha256 = sha256_file(&tokenizer_json)?;
    Ok(ModelFiles {
        model_id,
        revision,
        dir,
        config_json,
        tokenizer_json,
        generation_config_json,
        safetensors,
        config_sha256,
        tokenizer_sha256,
    })
}

fn sha256_file(path: &Path) -> Result<String, ModelFilesError> {
    let io = |source| ModelFilesError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, bytes: &[u8]) {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    fn checkpoint(dir: &Path) {
        write(dir, CONFIG_JSON, br#"{"model_type":"gemma2"}"#);
        write(dir, TOKENIZER_JSON, b"{}");
    }

    fn sha(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    fn err(spec: &str) -> String {
        resolve_model(&ModelSource::new(spec))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn directory_with_one_safetensors() {
        let tmp = tempfile::tempdir().unwrap();
        checkpoint(tmp.path());
        write(tmp.path(), MODEL_SAFETENSORS, b"weights");
        write(tmp.path(), GENERATION_CONFIG_JSON, b"{}");
        let files = resolve_model(&ModelSource::new(tmp.path().to_str().unwrap())).unwrap();
        let dir = std::fs::canonicalize(tmp.path()).unwrap();
        assert_eq!(files.model_id, dir.display().to_string());
        assert_eq!(files.revision, None);
        assert_eq!(files.config_json, dir.join(CONFIG_JSON));
        assert_eq!(files.tokenizer_json, dir.join(TOKENIZER_JSON));
        assert_eq!(
            files.generation_config_json,
            Some(dir.join(GENERATION_CONFIG_JSON))
        );
        assert_eq!(files.safetensors, vec![dir.join(MODEL_SAFETENSORS)]);
        assert_eq!(files.config_sha256, sha(br#"{"model_type":"gemma2"}"#));
        assert_eq!(
            files.tokenizer_sha256,
            "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
        assert_eq!(files.dir, dir);
    }

    #[test]
    fn relative_directory_is_canonicalised() {
        let tmp = tempfile::tempdir().unwrap();
        let sub = tmp.path().join("ckpt");
        checkpoint(&sub);
        write(&sub, MODEL_SAFETENSORS, b"w");
        let spec = format!("{}/ckpt/../ckpt/", tmp.path().display());
        let files = resolve_model(&ModelSource::new(spec)).unwrap();
        assert_eq!(files.dir, std::fs::canonicalize(&sub).unwrap());
        assert_eq!(files.generation_config_json, None);
    }

    #[test]
    fn directory_with_sharded_index() {
        let tmp = tempfile::tempdir().unwrap();
        checkpoint(tmp.path());
        let index = r#"{"metadata":{"total_size":16},"weight_map":{
            "b.weight":"model-00002-of-00002.safetensors",
            "a.weight":"model-00001-of-00002.safetensors",
            "c.weight":"model-00002-of-00002.safetensors",
            "d.weight":"model-00001-of-00002.safetensors"}}"#;
        write(tmp.path(), SAFETENSORS_INDEX_JSON, index.as_bytes());
        write(tmp.path(), "model-00002-of-00002.safetensors", b"2");
        write(tmp.path(), "model-00001-of-00002.safetensors", b"1");
        let files = resolve_model(&ModelSource::new(tmp.path().to_str().unwrap())).unwrap();
        let dir = std::fs::canonicalize(tmp.path()).unwrap();
        assert_eq!(
            files.safetensors,
            vec![
                dir.join("model-00001-of-00002.safetensors"),
                dir.join("model-00002-of-00002.safetensors"),
            ]
        );
    }

    #[test]
    fn single_file_wins_over_index() {
        let tmp = tempfile::tempdir().unwrap();
        checkpoint(tmp.path());
        write(tmp.path(), MODEL_SAFETENSORS, b"w");
        write(tmp.path(), SAFETENSORS_INDEX_JSON, b"not json");
        let files = resolve_model(&ModelSource::new(tmp.path().to_str().unwrap())).unwrap();
        assert_eq!(files.safetensors.len(), 1);
        assert!(files.safetensors[0].ends_with(MODEL_SAFETENSORS));
    }

    #[test]
    fn index_naming_a_missing_shard() {
        let tmp = tempfile::tempdir().unwrap();
        checkpoint(tmp.path());
        write(
            tmp.path(),
            SAFETENSORS_INDEX_JSON,
            br#"{"weight_map":{"a":"s1.safetensors","b":"s2.safetensors"}}"#,
        );
        write(tmp.path(), "s1.safetensors", b"1");
        let dir = std::fs::canonicalize(tmp.path()).unwrap();
        let msg = err(tmp.path().to_str().unwrap());
        assert_eq!(
            msg,
            format!(
                "{} names shard s2.safetensors, which does not exist in {}: copy the missing shard there or fix the index",
                dir.join(SAFETENSORS_INDEX_JSON).display(),
                dir.display()
            )
        );
    }

    #[test]
    fn bad_indexes() {
        let tmp = tempfile::tempdir().unwrap();
        checkpoint(tmp.path());
        let spec = tmp.path().to_str().unwrap();
        write(tmp.path(), SAFETENSORS_INDEX_JSON, b"[1,2]");
        assert!(err(spec).contains("not a safetensors index with a weight_map"));
        write(tmp.path(), SAFETENSORS_INDEX_JSON, br#"{"weight_map":{}}"#);
        assert!(err(spec).ends_with("its weight_map is empty"));
        write(
            tmp.path(),
            SAFETENSORS_INDEX_JSON,
            br#"{"weight_map":{"a":"../escape.safetensors"}}"#,
        );
        assert!(err(spec).contains("is not a relative file name inside the checkpoint"));
    }

    #[test]
    fn missing_tokenizer_json() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), CONFIG_JSON, b"{}");
        write(tmp.path(), MODEL_SAFETENSORS, b"w");
        let dir = std::fs::canonicalize(tmp.path()).unwrap();
        assert_eq!(
            err(tmp.path().to_str().unwrap()),
            format!(
                "tokenizer.json is missing in {}: a gemma-2 checkpoint directory needs config.json, tokenizer.json and model.safetensors (or model.safetensors.index.json and its shards)",
                dir.display()
            )
        );
    }

    #[test]
    fn missing_config_and_weights() {
        let tmp = tempfile::tempdir().unwrap();
        let spec = tmp.path().to_str().unwrap();
        assert!(err(spec).starts_with("config.json is missing in "));
        checkpoint(tmp.path());
        let dir = std::fs::canonicalize(tmp.path()).unwrap();
        assert_eq!(
            err(spec),
            format!(
                "no weights in {}: expected model.safetensors or model.safetensors.index.json there",
                dir.display()
            )
        );
    }

    #[test]
    fn nonexistent_path() {
        assert_eq!(
            err("./no/such/checkpoint"),
            "model path ./no/such/checkpoint does not exist: pass an existing checkpoint directory or a hub id like google/gemma-2-2b-it"
        );
        assert!(err("/no/such/dir").starts_with("model path /no/such/dir does not exist"));
        assert!(
            err("models/google/gemma").starts_with("model path models/google/gemma does not exist")
        );
        assert!(err("google/gemma-2-2b-it/").contains("does not exist"));
    }

    #[test]
    fn file_is_not_a_directory() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), CONFIG_JSON, b"{}");
        let path = tmp.path().join(CONFIG_JSON);
        assert_eq!(
            err(path.to_str().unwrap()),
            format!(
                "model path {} is not a directory: pass the directory that holds config.json, tokenizer.json and the safetensors weights",
                path.display()
            )
        );
    }

    #[test]
    fn revision_with_a_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let source = ModelSource {
            spec: tmp.path().to_str().unwrap().to_string(),
            revision: Some("main".to_string()),
        };
        let msg = resolve_model(&source).unwrap_err().to_string();
        assert!(msg.starts_with("revision main was given for the local directory "));
        assert!(msg.ends_with(": a revision only applies to hub ids"));
    }

    #[test]
    fn config_of_a_directory_has_the_model_files_id() {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-gemma2");
        let spec = format!("{}/../tiny-gemma2/", fixture.display());
        let config = resolve_model_config(&ModelSource::new(&spec)).unwrap();
        let files = resolve_model(&ModelSource::new(&spec)).unwrap();
        assert_eq!(config.model_id, files.model_id);
        assert_eq!(config.config_json, files.config_json);
        assert_eq!(config.revision, None);

        // Only config.json is needed.
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), CONFIG_JSON, b"{}");
        let config = resolve_model_config(&ModelSource::new(tmp.path().to_str().unwrap())).unwrap();
        let dir = std::fs::canonicalize(tmp.path()).unwrap();
        assert_eq!(config.config_json, dir.join(CONFIG_JSON));
    }

    #[test]
    fn config_errors_read_like_resolve_model() {
        let config_err =
            |source: &ModelSource| resolve_model_config(source).unwrap_err().to_string();
        assert_eq!(
            config_err(&ModelSource::new("./no/such/checkpoint")),
            err("./no/such/checkpoint")
        );
        assert_eq!(config_err(&ModelSource::new("gemma")), err("gemma"));
        let tmp = tempfile::tempdir().unwrap();
        let spec = tmp.path().to_str().unwrap();
        assert!(config_err(&ModelSource::new(spec)).starts_with("config.json is missing in "));
        let pinned = ModelSource {
            spec: spec.to_string(),
            revision: Some("main".to_string()),
        };
        assert!(
            config_err(&pinned).starts_with("revision main was given for the local directory ")
        );
    }

    #[test]
    fn bad_hub_id() {
        assert_eq!(
            err("gemma"),
            "model \"gemma\" is not a directory and not a hub id: pass a checkpoint directory or a hub id of the form owner/name (like google/gemma-2-2b-it)"
        );
        for spec in [
            "",
            "a b/c",
            "-owner/name",
            "owner/name.git",
            "a--b/c",
            "o/na..me",
        ] {
            assert!(
                err(spec).contains("is not a directory and not a hub id"),
                "{spec:?}"
            );
        }
    }

    #[test]
    fn hub_id_shapes() {
        for good in [
            "google/gemma-2-2b-it",
            "a/b",
            "Org_1/model.v2",
            "x/_private",
        ] {
            assert_eq!(
                parse_spec(good).unwrap(),
                Spec::Hub(good.to_string()),
                "{good}"
            );
        }
        for bad in [
            "gemma", "a/b/c", "a/-b", "a/b-", "a/b?", "a/", "/b", "a/b c",
        ] {
            assert!(!is_hub_id(bad), "{bad}");
        }
        assert!(!is_hub_id(&format!("a/{}", "x".repeat(97))));
    }
}
