//! Downloading a checkpoint from a Hugging Face hub (or a mirror) into the
//! hub cache with hf-hub's sync API, and turning its errors into messages
//! that say what to do.
//!
//! hf-hub 0.5 asks `{endpoint}/{repo}/resolve/{revision}/{file}` with
//! `Range: bytes=0-0` for the metadata (`x-repo-commit`, `etag` or
//! `x-linked-etag`, `content-range`), then downloads with `Range: bytes=N-`,
//! and stores the file as `{cache}/models--{owner}--{name}/snapshots/{commit}/{file}`
//! (a link to `blobs/{etag}`), with `refs/{revision}` holding the commit.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};

use super::{
    CONFIG_JSON, GENERATION_CONFIG_JSON, MODEL_SAFETENSORS, ModelConfigFile, ModelFiles,
    ModelFilesError, SAFETENSORS_INDEX_JSON, TOKENIZER_JSON, finish, read_index,
};

/// The public Hugging Face hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Where and how to download from a hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSettings {
    /// Base url of the hub or a mirror, like `https://huggingface.co`.
    pub endpoint: String,
    /// The hub cache folder (`$HF_HOME/hub`), holding `models--owner--name/`.
    pub cache_dir: PathBuf,
    /// Sent as `Authorization: Bearer <token>` for gated and private repos.
    pub token: Option<String>,
    /// Draw download progress bars on stderr.
    pub progress: bool,
}

impl HubSettings {
    /// Settings as the Python `huggingface_hub` reads them: `HF_ENDPOINT`
    /// (default [`DEFAULT_ENDPOINT`]); the cache in `HF_HUB_CACHE`, else
    /// `$HF_HOME/hub` with `HF_HOME` defaulting to
    /// `$XDG_CACHE_HOME/huggingface` or `~/.cache/huggingface`; the token in
    /// `HF_TOKEN` (or the older `HUGGING_FACE_HUB_TOKEN`), else the file
    /// `$HF_HOME/token` that `huggingface-cli login` writes. Progress bars
    /// when stderr is a terminal.
    pub fn from_env() -> Result<Self, ModelFilesError> {
        Self::from_lookup(
            |name| std::env::var(name).ok(),
            std::io::stderr().is_terminal(),
        )
    }

    fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
        progress: bool,
    ) -> Result<Self, ModelFilesError> {
        let var = |name: &str| {
            lookup(name)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let endpoint = var("HF_ENDPOINT")
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
            .trim_end_matches('/')
            .to_string();
        let hf_home = var("HF_HOME").map(PathBuf::from).or_else(|| {
            var("XDG_CACHE_HOME")
                .map(|x| PathBuf::from(x).join("huggingface"))
                .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface")))
        });
        let cache_dir = var("HF_HUB_CACHE")
            .map(PathBuf::from)
            .or_else(|| hf_home.as_ref().map(|h| h.join("hub")))
            .ok_or(ModelFilesError::NoCacheDir)?;
        let token = var("HF_TOKEN")
            .or_else(|| var("HUGGING_FACE_HUB_TOKEN"))
            .or_else(|| {
                let file = std::fs::read_to_string(hf_home?.join("token")).ok()?;
                Some(file.trim().to_string()).filter(|t| !t.is_empty())
            });
        Ok(Self {
            endpoint,
            cache_dir,
            token,
            progress,
        })
    }
}

/// The part of the gated message that says what the hub answered.
pub(super) fn gated_detail(status: u16, token_sent: bool) -> &'static str {
    match (status, token_sent) {
        (401, false) => {
            "the hub answered 401 to a request without a token; it answers the same for a repo that does not exist"
        }
        (401, true) => "the hub answered 401: the token that was sent is invalid or expired",
        _ => "the hub answered 403: the token that was sent has no access to it yet",
    }
}

/// What to do about an unexpected status.
pub(super) fn status_hint(status: u16) -> &'static str {
    match status {
        429 => "rate limited: wait and retry, or set HF_TOKEN",
        500..=599 => "the server failed: retry later, or set HF_ENDPOINT for a mirror",
        _ => "unexpected answer: check HF_ENDPOINT",
    }
}

/// An hf-hub error, sorted by what the user can do about it.
#[derive(Debug)]
enum Failure {
    Status(u16),
    Unreachable(String),
    BadEndpoint(String),
    Protocol(String),
    CacheIo(String),
    Locked(PathBuf),
    CorruptPart,
    Other(String),
}

/// hf-hub wraps ureq's error, whose type this crate cannot name (no direct
/// ureq dependency), so it is told apart by its `Display` prefixes (ureq 3).
fn classify(err: ApiError) -> Failure {
    match err {
        ApiError::RequestError(e) => {
            let text = e.to_string();
            if let Some(code) = text.strip_prefix("http status: ") {
                return match code.trim().parse() {
                    Ok(code) => Failure::Status(code),
                    Err(_) => Failure::Other(text),
                };
            }
            if text.starts_with("bad uri: ")
                || text.starts_with("http: ")
                || text.starts_with("configured for https only")
            {
                Failure::BadEndpoint(text)
            } else if text.starts_with("protocol: ")
                || text.starts_with("json: ")
                || text.starts_with("response header is too big")
                || text.starts_with("too many redirects")
            {
                Failure::Protocol(text)
            } else {
                // io (refused, reset, unreachable), host not found,
                // connection failed, timeout, tls, proxy.
                Failure::Unreachable(text)
            }
        }
        ApiError::MissingHeader(name) => {
            Failure::Protocol(format!("its answer has no {name} header"))
        }
        ApiError::InvalidHeader(name) => {
            Failure::Protocol(format!("its answer has an invalid {name} header"))
        }
        ApiError::ParseIntError(e) => Failure::Protocol(format!(
            "its answer has a content-range header without a size ({e})"
        )),
        ApiError::IoError(e) => Failure::CacheIo(e.to_string()),
        ApiError::LockAcquisition(path) => Failure::Locked(path),
        ApiError::InvalidResume => Failure::CorruptPart,
        other => Failure::Other(other.to_string()),
    }
}

/// One hub resolution: what goes into error messages.
struct Ctx<'a> {
    model_id: &'a str,
    revision: &'a str,
    settings: &'a HubSettings,
}

impl Ctx<'_> {
    fn error(&self, file: &str, failure: Failure) -> ModelFilesError {
        let endpoint = self.settings.endpoint.clone();
        let model_id = self.model_id.to_string();
        match failure {
            Failure::Status(status @ (401 | 403)) => ModelFilesError::HubGated {
                model_id,
                status,
                token_sent: self.settings.token.is_some(),
            },
            Failure::Status(404) if file == CONFIG_JSON => ModelFilesError::HubNotFound {
                model_id,
                revision: self.revision.to_string(),
                endpoint,
            },
            Failure::Status(404) => ModelFilesError::HubMissingFile {
                model_id,
                revision: self.revision.to_string(),
                file: file.to_string(),
            },
            Failure::Status(status) => ModelFilesError::HubStatus {
                endpoint,
                model_id,
                file: file.to_string(),
                status,
            },
            Failure::Unreachable(detail) => ModelFilesError::HubUnreachable { endpoint, detail },
            Failure::BadEndpoint(detail) => ModelFilesError::HubBadEndpoint { endpoint, detail },
            Failure::Protocol(detail) => ModelFilesError::HubProtocol { endpoint, detail },
            Failure::CacheIo(detail) => ModelFilesError::HubCacheIo {
                model_id,
                file: file.to_string(),
                cache_dir: self.settings.cache_dir.clone(),
                detail,
            },
            Failure::Locked(path) => ModelFilesError::HubLocked { path },
            Failure::CorruptPart => ModelFilesError::HubCorruptPart {
                model_id,
                file: file.to_string(),
                cache_dir: self.settings.cache_dir.clone(),
            },
            Failure::Other(detail) => ModelFilesError::HubOther {
                endpoint,
                model_id,
                file: file.to_string(),
                detail,
            },
        }
    }
}

/// Why filling one snapshot stopped.
enum Stop {
    /// A download landed in another snapshot: the revision moved on.
    Moved,
    Error(ModelFilesError),
}

impl From<ModelFilesError> for Stop {
    fn from(e: ModelFilesError) -> Self {
        Stop::Error(e)
    }
}

/// A git revision that is safe in a url path segment and as a cache file name.
fn valid_revision(revision: &str) -> bool {
    !revision.is_empty()
        && !revision.starts_with('/')
        && !revision.ends_with('/')
        && !revision.contains("..")
        && !revision.contains("//")
        && revision
            .chars()
            .all(|c| c.is_ascii_graphic() && !matches!(c, '?' | '#' | '%' | '\\'))
}

/// Finds (and downloads what is missing of) a hub checkpoint in the cache.
///
/// Files already in the cache's snapshot for the revision are used without
/// asking the hub, so a downloaded model works offline. If a download lands
/// in another snapshot (the branch moved to a new commit), every file is
/// fetched again for the new commit.
pub(super) fn resolve_hub(
    model_id: &str,
    revision: Option<&str>,
    settings: &HubSettings,
) -> Result<ModelFiles, ModelFilesError> {
    let hub = open_repo(model_id, revision, settings)?;
    let (ctx, api_repo) = (&hub.ctx, &hub.api_repo);
    let requested = ctx.revision;
    if let Some(config) = hub.cached(CONFIG_JSON) {
        tracing::debug!(model_id, revision = requested, config = %config.display(), "found in the hub cache");
        match fill_snapshot(ctx, api_repo, config, true) {
            Ok(files) => return Ok(files),
            Err(Stop::Error(e)) => return Err(e),
            Err(Stop::Moved) => {
                tracing::info!(
                    model_id,
                    revision = requested,
                    "the revision moved to a new commit: downloading it"
                );
            }
        }
    }
    let config = download(api_repo, CONFIG_JSON).map_err(|f| ctx.error(CONFIG_JSON, f))?;
    match fill_snapshot(ctx, api_repo, config, false) {
        Ok(files) => Ok(files),
        Err(Stop::Error(e)) => Err(e),
        Err(Stop::Moved) => Err(ModelFilesError::HubRevisionMoved {
            model_id: model_id.to_string(),
            revision: requested.to_string(),
        }),
    }
}

/// Finds (or downloads) only `config.json` of a hub checkpoint.
pub(super) fn resolve_hub_config(
    model_id: &str,
    revision: Option<&str>,
    settings: &HubSettings,
) -> Result<ModelConfigFile, ModelFilesError> {
    let hub = open_repo(model_id, revision, settings)?;
    let config_json = match hub.cached(CONFIG_JSON) {
        Some(path) => path,
        None => download(&hub.api_repo, CONFIG_JSON).map_err(|f| hub.ctx.error(CONFIG_JSON, f))?,
    };
    let commit = config_json.parent().and_then(snapshot_commit);
    Ok(ModelConfigFile {
        model_id: model_id.to_string(),
        revision: Some(commit.unwrap_or_else(|| hub.ctx.revision.to_string())),
        config_json,
    })
}

/// One hub repo at one revision, ready to download from.
struct OpenRepo<'a> {
    ctx: Ctx<'a>,
    repo: Repo,
    api_repo: ApiRepo,
}

impl OpenRepo<'_> {
    /// `file` in the cache's snapshot for the revision, if it is there.
    fn cached(&self, file: &str) -> Option<PathBuf> {
        Cache::new(self.ctx.settings.cache_dir.clone())
            .repo(self.repo.clone())
            .get(file)
    }
}

/// Checks the revision (default `main`) and sets up the hub client.
fn open_repo<'a>(
    model_id: &'a str,
    revision: Option<&'a str>,
    settings: &'a HubSettings,
) -> Result<OpenRepo<'a>, ModelFilesError> {
    let requested = revision.unwrap_or("main");
    if !valid_revision(requested) {
        return Err(ModelFilesError::BadRevision {
            revision: requested.to_string(),
        });
    }
    let ctx = Ctx {
        model_id,
        revision: requested,
        settings,
    };
    let api = ApiBuilder::from_cache(Cache::new(settings.cache_dir.clone()))
        .with_endpoint(settings.endpoint.trim_end_matches('/').to_string())
        .with_token(settings.token.clone())
        .with_progress(settings.progress)
        .build()
        .map_err(|e| ctx.error(CONFIG_JSON, classify(e)))?;
    let repo = Repo::with_revision(model_id.to_string(), RepoType::Model, requested.to_string());
    let api_repo = api.repo(repo.clone());
    Ok(OpenRepo {
        ctx,
        repo,
        api_repo,
    })
}

fn download(api_repo: &ApiRepo, file: &str) -> Result<PathBuf, Failure> {
    tracing::debug!(file, url = %api_repo.url(file), "downloading");
    api_repo.download(file).map_err(classify)
}

/// Completes the snapshot that holds `config`: every other file is taken
/// from the same snapshot directory or downloaded into it.
fn fill_snapshot(
    ctx: &Ctx<'_>,
    api_repo: &ApiRepo,
    config: PathBuf,
    from_cache: bool,
) -> Result<ModelFiles, Stop> {
    let dir = match config.parent() {
        Some(dir) => dir.to_path_buf(),
        None => return Err(Stop::Moved),
    };
    let snapshot = Snapshot {
        commit: snapshot_commit(&dir),
        dir,
    };
    let fetch = |file: &str| -> Result<Result<PathBuf, Failure>, Stop> {
        let path = snapshot.dir.join(file);
        if path.is_file() {
            return Ok(Ok(path));
        }
        match download(api_repo, file) {
            Ok(got) if got == path => Ok(Ok(got)),
            Ok(_) => Err(Stop::Moved),
            Err(failure) => Ok(Err(failure)),
        }
    };

    let tokenizer_json = fetch(TOKENIZER_JSON)?.map_err(|f| ctx.error(TOKENIZER_JSON, f))?;

    let generation_config_json = if snapshot.known_absent(GENERATION_CONFIG_JSON) {
        None
    } else {
        match fetch(GENERATION_CONFIG_JSON)? {
            Ok(path) => Some(path),
            Err(Failure::Status(404)) => {
                snapshot.mark_absent(GENERATION_CONFIG_JSON);
                None
            }
            Err(failure @ Failure::Unreachable(_)) if from_cache => {
                tracing::warn!(
                    model_id = ctx.model_id,
                    "{GENERATION_CONFIG_JSON} is not in the hub cache and cannot be downloaded, going on without it: {}",
                    ctx.error(GENERATION_CONFIG_JSON, failure)
                );
                None
            }
            Err(failure) => return Err(ctx.error(GENERATION_CONFIG_JSON, failure).into()),
        }
    };

    // What the snapshot already holds first, so a cached model needs no network.
    let single = if snapshot.dir.join(MODEL_SAFETENSORS).is_file() {
        Some(snapshot.dir.join(MODEL_SAFETENSORS))
    } else if snapshot.dir.join(SAFETENSORS_INDEX_JSON).is_file()
        || snapshot.known_absent(MODEL_SAFETENSORS)
    {
        None
    } else {
        match fetch(MODEL_SAFETENSORS)? {
            Ok(path) => Some(path),
            Err(Failure::Status(404)) => {
                snapshot.mark_absent(MODEL_SAFETENSORS);
                None
            }
            Err(failure) => return Err(ctx.error(MODEL_SAFETENSORS, failure).into()),
        }
    };
    let safetensors = match single {
        Some(path) => vec![path],
        None => {
            let index = match fetch(SAFETENSORS_INDEX_JSON)? {
                Ok(path) => path,
                Err(Failure::Status(404)) => {
                    return Err(ModelFilesError::HubNoWeights {
                        model_id: ctx.model_id.to_string(),
                        revision: ctx.revision.to_string(),
                    }
                    .into());
                }
                Err(failure) => return Err(ctx.error(SAFETENSORS_INDEX_JSON, failure).into()),
            };
            let mut shards = Vec::new();
            for shard in read_index(&index)? {
                match fetch(&shard)? {
                    Ok(path) => shards.push(path),
                    Err(Failure::Status(404)) => {
                        return Err(ModelFilesError::HubMissingShard {
                            model_id: ctx.model_id.to_string(),
                            revision: ctx.revision.to_string(),
                            shard,
                        }
                        .into());
                    }
                    Err(failure) => return Err(ctx.error(&shard, failure).into()),
                }
            }
            shards
        }
    };

    let revision = snapshot
        .commit
        .clone()
        .unwrap_or_else(|| ctx.revision.to_string());
    Ok(finish(
        ctx.model_id.to_string(),
        Some(revision),
        snapshot.dir,
        config,
        tokenizer_json,
        generation_config_json,
        safetensors,
    )?)
}

/// `.../snapshots/{commit}`: the commit hf-hub took from `x-repo-commit`.
fn snapshot_commit(dir: &Path) -> Option<String> {
    let parent = dir.parent()?.file_name()?;
    if parent != "snapshots" {
        return None;
    }
    Some(dir.file_name()?.to_str()?.to_string())
}

struct Snapshot {
    dir: PathBuf,
    commit: Option<String>,
}

impl Snapshot {
    /// `{repo cache}/.no_exist/{commit}/{file}`: Python's `huggingface_hub`
    /// marks files the hub answered 404 for at a commit, so they are not
    /// asked for again.
    fn no_exist_marker(&self, file: &str) -> Option<PathBuf> {
        let commit = self.commit.as_deref()?;
        let repo_dir = self.dir.parent()?.parent()?;
        Some(repo_dir.join(".no_exist").join(commit).join(file))
    }

    fn known_absent(&self, file: &str) -> bool {
        self.no_exist_marker(file).is_some_and(|m| m.is_file())
    }

    fn mark_absent(&self, file: &str) {
        if let Some(marker) = self.no_exist_marker(file) {
            let written = marker
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| std::fs::write(&marker, b""));
            if let Err(e) = written {
                tracing::debug!(marker = %marker.display(), "cannot write the no-exist marker: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn settings(vars: &[(&str, &str)]) -> Result<HubSettings, ModelFilesError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        HubSettings::from_lookup(|name| vars.get(name).cloned(), false)
    }

    #[test]
    fn settings_from_environment() {
        let s = settings(&[("HOME", "/home/u")]).unwrap();
        assert_eq!(s.endpoint, DEFAULT_ENDPOINT);
        assert_eq!(s.cache_dir, PathBuf::from("/home/u/.cache/huggingface/hub"));
        assert_eq!(s.token, None);

        let s = settings(&[
            ("HOME", "/home/u"),
            ("XDG_CACHE_HOME", "/xdg"),
            ("HF_ENDPOINT", "http://mirror.local:8080/"),
            ("HF_TOKEN", " hf_abc \n"),
        ])
        .unwrap();
        assert_eq!(s.endpoint, "http://mirror.local:8080");
        assert_eq!(s.cache_dir, PathBuf::from("/xdg/huggingface/hub"));
        assert_eq!(s.token.as_deref(), Some("hf_abc"));

        let s = settings(&[
            ("HF_HOME", "/hf"),
            ("HF_HUB_CACHE", "/elsewhere"),
            ("HF_TOKEN", ""),
            ("HUGGING_FACE_HUB_TOKEN", "hf_old"),
        ])
        .unwrap();
        assert_eq!(s.cache_dir, PathBuf::from("/elsewhere"));
        assert_eq!(s.token.as_deref(), Some("hf_old"));

        assert!(matches!(settings(&[]), Err(ModelFilesError::NoCacheDir)));
    }

    #[test]
    fn token_file_in_hf_home() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("token"), "hf_from_file\n").unwrap();
        let home = tmp.path().to_str().unwrap();
        let s = settings(&[("HF_HOME", home)]).unwrap();
        assert_eq!(s.cache_dir, tmp.path().join("hub"));
        assert_eq!(s.token.as_deref(), Some("hf_from_file"));
        let s = settings(&[("HF_HOME", home), ("HF_TOKEN", "hf_env")]).unwrap();
        assert_eq!(s.token.as_deref(), Some("hf_env"));
    }

    #[test]
    fn revisions() {
        for good in [
            "main",
            "v1.0",
            "refs/pr/1",
            "0123456789abcdef0123456789abcdef01234567",
        ] {
            assert!(valid_revision(good), "{good}");
        }
        for bad in ["", "a b", "../x", "a?b", "a#b", "%2F", "/x", "x/"] {
            assert!(!valid_revision(bad), "{bad}");
        }
        let s = HubSettings {
            endpoint: "http://127.0.0.1:9".to_string(),
            cache_dir: PathBuf::from("/nonexistent"),
            token: None,
            progress: false,
        };
        let err = resolve_hub("a/b", Some("x y"), &s).unwrap_err();
        assert_eq!(
            err.to_string(),
            "revision \"x y\" is not a valid git revision: pass a branch, tag or commit sha"
        );
    }

    #[test]
    fn error_messages() {
        let s = HubSettings {
            endpoint: "https://hub.example".to_string(),
            cache_dir: PathBuf::from("/cache/hub"),
            token: None,
            progress: false,
        };
        let ctx = Ctx {
            model_id: "google/gemma-2-2b-it",
            revision: "main",
            settings: &s,
        };
        assert_eq!(
            ctx.error(CONFIG_JSON, Failure::Status(401)).to_string(),
            "model google/gemma-2-2b-it is gated or private: accept its license on the hub and set HF_TOKEN (the hub answered 401 to a request without a token; it answers the same for a repo that does not exist)"
        );
        assert_eq!(
            ctx.error(CONFIG_JSON, Failure::Status(404)).to_string(),
            "repo or revision not found: model google/gemma-2-2b-it at revision main on https://hub.example (http 404 for config.json): check the hub id and the revision"
        );
        assert!(
            ctx.error(TOKENIZER_JSON, Failure::Status(404))
                .to_string()
                .starts_with(
                    "model google/gemma-2-2b-it at revision main has no tokenizer.json on the hub"
                )
        );
        assert_eq!(
            ctx.error(CONFIG_JSON, Failure::Status(503)).to_string(),
            "the hub at https://hub.example answered http 503 for config.json of model google/gemma-2-2b-it: the server failed: retry later, or set HF_ENDPOINT for a mirror"
        );
        assert_eq!(
            ctx.error(
                CONFIG_JSON,
                classify(ApiError::MissingHeader("x-repo-commit"))
            )
            .to_string(),
            "the server at https://hub.example does not answer like a hugging face hub (its answer has no x-repo-commit header): check HF_ENDPOINT"
        );
        assert!(matches!(
            classify(ApiError::LockAcquisition(PathBuf::from("/l"))),
            Failure::Locked(_)
        ));
        assert!(matches!(
            classify(ApiError::IoError(std::io::Error::other("disk full"))),
            Failure::CacheIo(_)
        ));
        let with_token = HubSettings {
            token: Some("t".to_string()),
            ..s.clone()
        };
        let ctx = Ctx {
            settings: &with_token,
            ..ctx
        };
        assert!(
            ctx.error(CONFIG_JSON, Failure::Status(403))
                .to_string()
                .ends_with(
                    "(the hub answered 403: the token that was sent has no access to it yet)"
                )
        );
    }

    #[test]
    fn cached_config_is_found_without_the_hub() {
        let tmp = tempfile::tempdir().unwrap();
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let repo = tmp.path().join("models--owner--tiny");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), commit).unwrap();
        let snapshot = repo.join("snapshots").join(commit);
        std::fs::create_dir_all(&snapshot).unwrap();
        std::fs::write(snapshot.join(CONFIG_JSON), b"{}").unwrap();
        let offline = HubSettings {
            endpoint: "http://127.0.0.1:9".to_string(),
            cache_dir: tmp.path().to_path_buf(),
            token: None,
            progress: false,
        };
        let config = resolve_hub_config("owner/tiny", None, &offline).unwrap();
        assert_eq!(config.model_id, "owner/tiny");
        assert_eq!(config.revision.as_deref(), Some(commit));
        assert_eq!(config.config_json, snapshot.join(CONFIG_JSON));

        // Not cached: asked of the (unreachable) hub, with resolve_model's message.
        let err = resolve_hub_config("owner/other", Some("v1"), &offline).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot reach the hub at http://127.0.0.1:9"),
            "{err}"
        );
    }

    #[test]
    fn commit_from_snapshot_path() {
        assert_eq!(
            snapshot_commit(Path::new("/c/models--a--b/snapshots/abc123")).as_deref(),
            Some("abc123")
        );
        assert_eq!(snapshot_commit(Path::new("/c/models--a--b/abc123")), None);
    }
}
