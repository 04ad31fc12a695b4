//! Store-level reads outside any run: whole objects and listings addressed by
//! keys relative to the store's prefix (trait vectors, shared inputs).

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectMeta, ObjectStoreExt};

use super::ArtifactStore;
use super::error::StoreError;
use super::keys::{KeyUse, MAX_OBJECT_KEY_BYTES, validate_list_prefix, validate_relative_key};
use super::run::ObjectInfo;

impl ArtifactStore {
    /// Reads a whole object at `key`, relative to the store's prefix (e.g.
    /// `experiments/exp/extraction/refusal/harmful/vectors/probe_layer16.pt`
    /// for a store opened at `s3://bucket/repo`). The key is checked like a
    /// run key: '/'-separated safe parts, no `..`, not absolute.
    pub async fn get_object(&self, key: &str) -> Result<Bytes, StoreError> {
        validate_relative_key(key, KeyUse::Read)?;
        let path = self.object_path(key)?;
        let location = || self.location(&path);
        let result = self
            .inner
            .get(&path)
            .await
            .map_err(|source| StoreError::backend("read", location(), source))?;
        result
            .bytes()
            .await
            .map_err(|source| StoreError::backend("read", location(), source))
    }

    /// Every object below a folder relative to the store's prefix (`""` for
    /// the whole store), sorted by key. The keys of the result are relative
    /// to the store's prefix too; a folder that holds nothing gives an empty
    /// list.
    pub async fn list_objects(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        validate_list_prefix(prefix)?;
        let folder = prefix.trim_end_matches('/');
        let path = if folder.is_empty() {
            self.prefix.clone()
        } else {
            self.object_path(folder)?
        };
        let listing = if path.as_ref().is_empty() {
            self.inner.list(None)
        } else {
            self.inner.list(Some(&path))
        };
        let metas: Vec<ObjectMeta> = listing
            .try_collect()
            .await
            .map_err(|source| StoreError::backend("list", self.location(&path), source))?;
        let mut infos: Vec<ObjectInfo> = metas
            .into_iter()
            .map(|meta| self.store_object_info(meta))
            .collect();
        infos.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(infos)
    }

    /// Joins an already validated relative key to the store's prefix.
    fn object_path(&self, relative: &str) -> Result<ObjectPath, StoreError> {
        let joined = if self.prefix.as_ref().is_empty() {
            relative.to_owned()
        } else {
            format!("{}/{relative}", self.prefix.as_ref())
        };
        if joined.len() > MAX_OBJECT_KEY_BYTES {
            return Err(StoreError::KeyTooLong {
                location: self.url.location_of(relative),
                bytes: joined.len(),
                max: MAX_OBJECT_KEY_BYTES,
            });
        }
        ObjectPath::parse(&joined).map_err(|err| StoreError::UnsafeKey {
            key: relative.to_owned(),
            reason: err.to_string(),
        })
    }

    fn store_object_info(&self, meta: ObjectMeta) -> ObjectInfo {
        let full = meta.location.as_ref();
        let key = if self.prefix.as_ref().is_empty() {
            full
        } else {
            full.strip_prefix(self.prefix.as_ref())
                .map(|rest| rest.trim_start_matches('/'))
                .unwrap_or(full)
        };
        ObjectInfo {
            key: key.to_owned(),
            bytes: meta.size,
            last_modified: meta.last_modified.into(),
            e_tag: meta.e_tag,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::store::StoreOptions;

    fn write(root: &Path, key: &str, content: &[u8]) {
        let path = root.join(key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }

    fn open(root: &Path) -> ArtifactStore {
        let options = StoreOptions {
            fsync: false,
            ..StoreOptions::default()
        };
        ArtifactStore::from_url(root.to_str().unwrap(), &options).unwrap()
    }

    #[tokio::test]
    async fn objects_are_read_and_listed_relative_to_the_store_root() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a/b/one.pt", b"one");
        write(dir.path(), "a/b/two.pt", b"second");
        write(dir.path(), "a/c/three.pt", b"3");
        write(dir.path(), "top.json", b"{}");
        let store = open(dir.path());

        assert_eq!(
            store.get_object("a/b/two.pt").await.unwrap(),
            Bytes::from_static(b"second")
        );
        let keys = |infos: Vec<ObjectInfo>| -> Vec<(String, u64)> {
            infos
                .into_iter()
                .map(|info| (info.key, info.bytes))
                .collect()
        };
        assert_eq!(
            keys(store.list_objects("a/b").await.unwrap()),
            vec![("a/b/one.pt".to_owned(), 3), ("a/b/two.pt".to_owned(), 6)]
        );
        assert_eq!(
            keys(store.list_objects("a/").await.unwrap()).len(),
            3,
            "a trailing '/' names the same folder"
        );
        let all = keys(store.list_objects("").await.unwrap());
        assert_eq!(all.len(), 4);
        assert_eq!(all[3].0, "top.json");
        assert!(store.list_objects("missing").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_store_below_a_folder_sees_only_that_folder() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "outer/inner/x.pt", b"x");
        write(dir.path(), "outer/y.pt", b"y");
        let store = open(&dir.path().join("outer"));
        let listed: Vec<String> = store
            .list_objects("")
            .await
            .unwrap()
            .into_iter()
            .map(|info| info.key)
            .collect();
        assert_eq!(listed, vec!["inner/x.pt", "y.pt"]);
        assert_eq!(store.get_object("y.pt").await.unwrap().as_ref(), b"y");
    }

    /// An S3-style store (a bucket and a key prefix) over memory, to check
    /// that keys are joined to and stripped of the prefix.
    fn prefixed_memory_store() -> ArtifactStore {
        ArtifactStore {
            inner: std::sync::Arc::new(object_store::memory::InMemory::new()),
            url: crate::store::StoreUrl::S3 {
                bucket: "bucket".into(),
                prefix: "team/captures".into(),
            },
            prefix: ObjectPath::from("team/captures"),
            options: std::sync::Arc::new(StoreOptions::default()),
        }
    }

    #[tokio::test]
    async fn keys_are_relative_to_the_store_prefix() {
        let store = prefixed_memory_store();
        for (key, content) in [
            ("team/captures/vectors/a/probe_layer1.pt", "a"),
            ("team/captures/vectors/b.pt", "bb"),
            ("team/captures-old/vectors/c.pt", "c"),
            ("team/other.pt", "o"),
        ] {
            store
                .inner
                .put(&ObjectPath::from(key), Bytes::from(content).into())
                .await
                .unwrap();
        }
        let listed: Vec<(String, u64)> = store
            .list_objects("")
            .await
            .unwrap()
            .into_iter()
            .map(|info| (info.key, info.bytes))
            .collect();
        assert_eq!(
            listed,
            vec![
                ("vectors/a/probe_layer1.pt".to_owned(), 1),
                ("vectors/b.pt".to_owned(), 2)
            ]
        );
        assert_eq!(store.list_objects("vectors/a").await.unwrap().len(), 1);
        assert_eq!(
            store.get_object("vectors/b.pt").await.unwrap().as_ref(),
            b"bb"
        );
        let err = store.get_object("vectors/gone.pt").await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "s3://bucket/team/captures/vectors/gone.pt not found"
        );
    }

    #[tokio::test]
    async fn missing_and_unsafe_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let err = store.get_object("a/missing.pt").await.unwrap_err();
        assert!(err.is_not_found(), "{err:?}");
        assert!(err.to_string().ends_with("a/missing.pt not found"), "{err}");
        for bad in ["../escape.pt", "/abs.pt", "a//b.pt", ""] {
            let err = store.get_object(bad).await.unwrap_err();
            assert!(
                matches!(err, StoreError::UnsafeKey { .. }),
                "{bad}: {err:?}"
            );
        }
        let err = store.list_objects("../up").await.unwrap_err();
        assert!(matches!(err, StoreError::UnsafeKey { .. }), "{err:?}");
    }
}
