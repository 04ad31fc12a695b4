//! Replay from the object store: the earlier capture a job replays lives
//! below a root in this worker's store, named by a URL (`s3://bucket/prefix/
//! exp/run/`, `file:///dir/exp/run/`) or by a path relative to the store
//! (`exp/run`). Artifacts are read one prompt at a time, from the capture
//! thread.

use std::path::Path;

use tokio::runtime::Handle;

use super::error::JobError;
use crate::error::{CaptureError, Result};
use crate::pt::{PtValue, decode_pt};
use crate::run::{
    ReplaySource, first_internals_file, internals_dir, nothing_to_replay, residual_key,
};
use crate::store::{ArtifactStore, RunStore, StoreError, StoreUrl};

/// An earlier capture below a run root of the store.
#[derive(Debug, Clone)]
pub(crate) struct StoreReplay {
    run: RunStore,
    /// Folder below the run root that holds the capture (`""` for the root).
    prefix: String,
    handle: Handle,
}

impl StoreReplay {
    /// Finds the replay root `root` in `store`; call it inside the runtime
    /// whose `handle` the capture thread will read through.
    pub(crate) fn open(store: &ArtifactStore, root: &str) -> Result<Self, JobError> {
        let relative = relative_root(store.url(), root)?;
        let mut parts = relative.split('/');
        let (Some(experiment), Some(run_id)) = (parts.next(), parts.next()) else {
            return Err(JobError::Invalid(format!(
                "replay root {root:?} does not name a run: use {}/EXPERIMENT/RUN_ID",
                store.url()
            )));
        };
        let prefix = parts.collect::<Vec<_>>().join("/");
        Ok(Self {
            run: store.run(experiment, run_id)?,
            prefix,
            handle: Handle::current(),
        })
    }

    fn key(&self, relative: &str) -> String {
        if self.prefix.is_empty() {
            relative.to_owned()
        } else {
            format!("{}/{relative}", self.prefix)
        }
    }

    async fn find(&self, set: &str, prompt_id: &str) -> Result<(String, bytes::Bytes)> {
        let residual = self.key(&residual_key(set, prompt_id));
        match self.run.get(&residual).await {
            Ok(bytes) => return Ok((self.run.url_of(&residual), bytes)),
            Err(error) if error.is_not_found() => {}
            Err(error) => return Err(store_error(error)),
        }
        let folder = self.key(&internals_dir(set));
        let listed = match self.run.list(&folder).await {
            Ok(listed) => listed,
            Err(error) if error.is_not_found() => Vec::new(),
            Err(error) => return Err(store_error(error)),
        };
        let names = listed.iter().filter_map(|info| {
            let name = info.key.strip_prefix(&folder)?.strip_prefix('/')?;
            (!name.contains('/')).then(|| name.to_owned())
        });
        let Some(name) = first_internals_file(names, prompt_id) else {
            return Err(nothing_to_replay(
                set,
                prompt_id,
                &self.run.url_of(&residual),
                &self.run.url_of(&folder),
            ));
        };
        let key = format!("{folder}/{name}");
        let bytes = self.run.get(&key).await.map_err(store_error)?;
        Ok((self.run.url_of(&key), bytes))
    }
}

impl ReplaySource for StoreReplay {
    fn artifact(&self, set: &str, prompt_id: &str) -> Result<(String, PtValue)> {
        let (location, bytes) = self.handle.block_on(self.find(set, prompt_id))?;
        let value = decode_pt(&bytes).map_err(|e| {
            CaptureError::InvalidArgument(format!("{location} is not a readable .pt file: {e}"))
        })?;
        Ok((location, value))
    }
}

/// A store failure while reading a replay artifact, as a capture error (the
/// engine's replay checks speak [`CaptureError`]); retryable.
fn store_error(error: StoreError) -> CaptureError {
    CaptureError::Io {
        path: "replay artifact".into(),
        source: std::io::Error::other(error.to_string()),
    }
}

/// `root` as a path relative to the store's root, without leading or
/// trailing '/'.
pub(crate) fn relative_root(store: &StoreUrl, root: &str) -> Result<String, JobError> {
    let outside = || {
        JobError::Invalid(format!(
            "replay root {root:?} is not in this worker's store {store}: replay needs a capture in the same store"
        ))
    };
    if !root.contains("://") && !root.starts_with('/') {
        return Ok(root.trim_matches('/').to_owned());
    }
    let url = StoreUrl::parse(root)?;
    let relative = match (store, &url) {
        (ours, theirs) if ours.bucket_and_prefix().is_some() => {
            let (scheme, bucket, prefix) = ours.bucket_and_prefix().expect("checked");
            let (their_scheme, their_bucket, their_prefix) =
                theirs.bucket_and_prefix().ok_or_else(outside)?;
            if (scheme, bucket) != (their_scheme, their_bucket) {
                return Err(outside());
            }
            if prefix.is_empty() {
                their_prefix.to_owned()
            } else {
                their_prefix
                    .strip_prefix(prefix)
                    .and_then(|rest| rest.strip_prefix('/'))
                    .ok_or_else(outside)?
                    .to_owned()
            }
        }
        (StoreUrl::Local { root: ours }, StoreUrl::Local { root: theirs }) => theirs
            .strip_prefix(ours)
            .ok()
            .and_then(Path::to_str)
            .ok_or_else(outside)?
            .to_owned(),
        _ => return Err(outside()),
    };
    Ok(relative.trim_matches('/').to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s3(prefix: &str) -> StoreUrl {
        StoreUrl::S3 {
            bucket: "bucket".into(),
            prefix: prefix.into(),
        }
    }

    #[test]
    fn replay_roots_resolve_below_the_store() {
        let store = s3("team/captures");
        assert_eq!(relative_root(&store, "exp/run/").unwrap(), "exp/run");
        assert_eq!(
            relative_root(&store, "s3://bucket/team/captures/exp/run/").unwrap(),
            "exp/run"
        );
        assert_eq!(
            relative_root(&s3(""), "s3://bucket/exp/run").unwrap(),
            "exp/run"
        );
        let local = StoreUrl::Local {
            root: "/data/store".into(),
        };
        assert_eq!(
            relative_root(&local, "file:///data/store/exp/run/").unwrap(),
            "exp/run"
        );
        assert_eq!(
            relative_root(&local, "/data/store/exp/run").unwrap(),
            "exp/run"
        );
    }

    /// A replay root names a run by experiment and run id, maybe with a
    /// folder below: hostile parts never reach a read.
    #[tokio::test]
    async fn hostile_replay_roots_are_refused_before_any_read() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let store = ArtifactStore::from_url(root.to_str().unwrap(), &Default::default()).unwrap();
        // `a/b` is hostile as one name but fine as two parts of a root.
        for name in crate::store::hostile_names::hostile_names()
            .into_iter()
            .filter(|name| name != "a/b")
        {
            for replay_root in [
                format!("{name}/run"),
                format!("exp/{name}"),
                format!("s3://bucket/{name}/run"),
            ] {
                if let Ok(replay) = StoreReplay::open(&store, &replay_root) {
                    // Only a root with a folder below the run opens; its
                    // reads are refused as unsafe keys, not attempted.
                    let error = replay.find("set", "1").await.unwrap_err();
                    assert!(
                        error.to_string().contains("unsafe artifact key"),
                        "{replay_root:?}: {error}"
                    );
                    continue;
                }
                let error = StoreReplay::open(&store, &replay_root).unwrap_err();
                assert!(!error.is_retryable(), "{replay_root:?}: {error}");
            }
        }
        // Nothing was created in the store.
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
    }

    #[test]
    fn replay_roots_elsewhere_are_refused() {
        let store = s3("team/captures");
        for root in [
            "s3://other-bucket/team/captures/exp/run",
            "s3://bucket/team/captures-old/exp/run",
            "file:///data/exp/run",
        ] {
            let error = relative_root(&store, root).unwrap_err();
            assert!(!error.is_retryable());
            assert!(
                error.to_string().contains("is not in this worker's store"),
                "{error}"
            );
        }
    }
}
