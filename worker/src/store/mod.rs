//! Where the artifacts of a run live: an object store (S3 or S3-compatible,
//! or a local directory) opened from a URL, a run root
//! `{store prefix}/{experiment}/{run_id}/` below it, and per-attempt staging
//! with promotion so that documented keys only ever hold complete objects of
//! an accepted attempt.
//!
//! ```text
//! {run root}/inference/raw/residual/{set}/{id}.pt          documented keys: written
//! {run root}/inference/raw/internals/{set}/{id}_L{n}.pt    only by `promote`
//! {run root}/manifest.json                                 `put_root_file` (coordinator)
//! {run root}/_staging/{job_id}/{attempt}/{relative key}    `stage_put` (workers)
//! ```
//!
//! A worker uploads with [`RunStore::stage_put`] under its own attempt's
//! staging prefix. Once the coordinator has accepted that attempt's
//! completion (fenced on the attempt number), it calls [`RunStore::promote`]:
//! each staged object is copied to its documented key (a server-side copy,
//! atomic per object on S3 and on the local file system, where it is a hard
//! link renamed into place) and the attempt's staging prefix is deleted. A
//! worker whose lease was lost can keep uploading, but only below its own
//! attempt's prefix, which nothing promotes; [`RunStore::discard_attempt`]
//! and [`RunStore::discard_job_staging`] clean it up.

mod error;
mod keys;
mod read;
mod run;
mod store_url;

#[cfg(test)]
pub(crate) mod hostile_names;
#[cfg(test)]
mod suite;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{BackoffConfig, ClientConfigKey, ObjectStore, RetryConfig};

pub use error::StoreError;
pub use keys::{
    KeyUse, MAX_COMPONENT_BYTES, MAX_OBJECT_KEY_BYTES, MAX_RELATIVE_KEY_BYTES,
    MAX_RELATIVE_KEY_PARTS, STAGING_DIR, validate_attempt, validate_component,
    validate_relative_key,
};
pub use run::{ObjectInfo, Promotion, RunStore, StagedObject};
pub use store_url::StoreUrl;

/// Environment variables that name an S3 endpoint (MinIO, moto, ...), in the
/// order they are consulted when [`StoreOptions::s3_endpoint`] is not set.
pub const S3_ENDPOINT_ENV: [&str; 2] = ["AWS_ENDPOINT_URL", "AWS_ENDPOINT"];

/// S3 accepts multipart parts of at least 5 MiB (except the last).
const MIN_PART_SIZE: usize = 5 * 1024 * 1024;

/// How a store is reached and how uploads are cut.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// S3 endpoint override, e.g. `http://127.0.0.1:9000` for MinIO. When
    /// unset, `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT`) is used if present. With
    /// an endpoint, requests are path-style and `http://` is allowed.
    pub s3_endpoint: Option<String>,
    /// S3 credentials to use instead of the environment's (`AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, or the instance's role).
    pub s3_credentials: Option<S3Credentials>,
    /// Limit for establishing a connection.
    pub connect_timeout: Duration,
    /// Limit for one whole request (one part of a multipart upload, one copy).
    pub request_timeout: Duration,
    /// Retries of a failed request (0 disables retrying).
    pub max_retries: usize,
    /// No retry starts later than this after the first try.
    pub retry_timeout: Duration,
    /// Payloads larger than this are uploaded in parts.
    pub multipart_threshold: usize,
    /// Size of each part of a multipart upload (at least 5 MiB).
    pub part_size: usize,
    /// Parts (and promotion copies) in flight at once.
    pub concurrency: usize,
    /// Local stores: fsync files and directories before a write returns.
    pub fsync: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            s3_endpoint: None,
            s3_credentials: None,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(120),
            max_retries: 10,
            retry_timeout: Duration::from_secs(180),
            multipart_threshold: 8 * 1024 * 1024,
            part_size: 8 * 1024 * 1024,
            concurrency: 8,
            fsync: true,
        }
    }
}

/// Static S3 credentials. Their `Debug` output hides the secret parts.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<hidden>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<hidden>"),
            )
            .finish()
    }
}

/// An opened store: the object store client and the prefix runs live under.
/// Cheap to clone.
#[derive(Clone)]
pub struct ArtifactStore {
    inner: Arc<dyn ObjectStore>,
    url: StoreUrl,
    /// Prefix of every key of this store (the S3 URL's path; empty for local
    /// directories, whose root is the directory itself).
    prefix: ObjectPath,
    options: Arc<StoreOptions>,
}

impl fmt::Debug for ArtifactStore {
    // By hand: the client's own Debug output would include credentials.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ArtifactStore")
            .field("url", &self.url.to_string())
            .finish_non_exhaustive()
    }
}

impl ArtifactStore {
    /// Opens `s3://bucket/prefix`, `gs://bucket/prefix`,
    /// `az://container/prefix`, `file:///abs/path` or a local path (created if
    /// missing; relative paths resolve against the current directory). S3
    /// credentials and region come from the standard `AWS_*` environment
    /// variables, GCS's from `GOOGLE_APPLICATION_CREDENTIALS` (or
    /// `GOOGLE_SERVICE_ACCOUNT*`), Azure's from `AZURE_STORAGE_ACCOUNT_NAME`
    /// and `AZURE_STORAGE_ACCOUNT_KEY` (or the other `AZURE_*` variables
    /// object_store reads).
    pub fn from_url(url: &str, options: &StoreOptions) -> Result<Self, StoreError> {
        Self::open(StoreUrl::parse(url)?, options)
    }

    /// Opens a parsed store location.
    pub fn open(url: StoreUrl, options: &StoreOptions) -> Result<Self, StoreError> {
        let options = Arc::new(checked_options(options));
        match &url {
            StoreUrl::Local { root } => {
                std::fs::create_dir_all(root).map_err(|source| StoreError::LocalDirectory {
                    path: root.clone(),
                    source,
                })?;
                let store = LocalFileSystem::new_with_prefix(root)
                    .map_err(|source| StoreError::Open {
                        url: url.to_string(),
                        source,
                    })?
                    .with_fsync(options.fsync)
                    .with_automatic_cleanup(true);
                Ok(Self {
                    inner: Arc::new(store),
                    url,
                    prefix: ObjectPath::default(),
                    options,
                })
            }
            StoreUrl::S3 { .. } | StoreUrl::Gcs { .. } | StoreUrl::Azure { .. } => {
                let store: Arc<dyn ObjectStore> = match &url {
                    StoreUrl::S3 { bucket, .. } => Arc::new(build_s3(&url, bucket, &options)?),
                    StoreUrl::Gcs { bucket, .. } => Arc::new(build_gcs(&url, bucket, &options)?),
                    StoreUrl::Azure { container, .. } => {
                        Arc::new(build_azure(&url, container, &options)?)
                    }
                    StoreUrl::Local { .. } => unreachable!("handled above"),
                };
                let (_, _, prefix) = url.bucket_and_prefix().expect("cloud stores have a prefix");
                let prefix = ObjectPath::parse(prefix).map_err(|err| StoreError::InvalidUrl {
                    url: url.to_string(),
                    reason: format!("bad prefix: {err}"),
                })?;
                Ok(Self {
                    inner: store,
                    url,
                    prefix,
                    options,
                })
            }
        }
    }

    /// Where this store lives.
    pub fn url(&self) -> &StoreUrl {
        &self.url
    }

    /// The options the store was opened with (part size clamped to S3's minimum).
    pub fn options(&self) -> &StoreOptions {
        &self.options
    }

    /// The root of one run, `{store prefix}/{experiment}/{run_id}/`. Both
    /// names must be safe path parts (letters, digits, '.', '_', '-', no
    /// leading '.', at most 128 bytes).
    pub fn run(&self, experiment: &str, run_id: &str) -> Result<RunStore, StoreError> {
        validate_component("experiment name", experiment)?;
        validate_component("run id", run_id)?;
        let root = self.prefix.clone().join(experiment).join(run_id);
        Ok(RunStore::new(self.clone(), root))
    }

    /// The URL of an object key of this store (the full key, prefix included).
    fn location(&self, path: &ObjectPath) -> String {
        let key = path.as_ref();
        let relative = key
            .strip_prefix(self.prefix.as_ref())
            .map(|rest| rest.trim_start_matches('/'))
            .unwrap_or(key);
        self.url.location_of(relative)
    }
}

fn checked_options(options: &StoreOptions) -> StoreOptions {
    let mut options = options.clone();
    options.part_size = options.part_size.max(MIN_PART_SIZE);
    options.multipart_threshold = options.multipart_threshold.max(1);
    options.concurrency = options.concurrency.max(1);
    options
}

/// Client timeouts and retries shared by every cloud backend.
fn client_settings(options: &StoreOptions) -> [(ClientConfigKey, String); 2] {
    [
        (
            ClientConfigKey::ConnectTimeout,
            format!("{}ms", options.connect_timeout.as_millis().max(1)),
        ),
        (
            ClientConfigKey::Timeout,
            format!("{}ms", options.request_timeout.as_millis().max(1)),
        ),
    ]
}

fn retry_config(options: &StoreOptions) -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig::default(),
        max_retries: options.max_retries,
        retry_timeout: options.retry_timeout,
    }
}

fn build_gcs(
    url: &StoreUrl,
    bucket: &str,
    options: &StoreOptions,
) -> Result<object_store::gcp::GoogleCloudStorage, StoreError> {
    let mut builder = GoogleCloudStorageBuilder::from_env()
        .with_bucket_name(bucket)
        .with_retry(retry_config(options));
    for (key, value) in client_settings(options) {
        builder = builder.with_config(GoogleConfigKey::Client(key), value);
    }
    builder.build().map_err(|source| StoreError::Open {
        url: url.to_string(),
        source,
    })
}

fn build_azure(
    url: &StoreUrl,
    container: &str,
    options: &StoreOptions,
) -> Result<object_store::azure::MicrosoftAzure, StoreError> {
    let mut builder = MicrosoftAzureBuilder::from_env()
        .with_container_name(container)
        .with_retry(retry_config(options));
    for (key, value) in client_settings(options) {
        builder = builder.with_config(AzureConfigKey::Client(key), value);
    }
    builder.build().map_err(|source| StoreError::Open {
        url: url.to_string(),
        source,
    })
}

fn build_s3(
    url: &StoreUrl,
    bucket: &str,
    options: &StoreOptions,
) -> Result<object_store::aws::AmazonS3, StoreError> {
    let endpoint = options.s3_endpoint.clone().or_else(|| {
        S3_ENDPOINT_ENV
            .iter()
            .find_map(|name| std::env::var(name).ok().filter(|value| !value.is_empty()))
    });
    let mut builder = AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_retry(retry_config(options));
    for (key, value) in client_settings(options) {
        builder = builder.with_config(AmazonS3ConfigKey::Client(key), value);
    }
    if let Some(credentials) = &options.s3_credentials {
        builder = builder
            .with_access_key_id(&credentials.access_key_id)
            .with_secret_access_key(&credentials.secret_access_key);
        if let Some(token) = &credentials.session_token {
            builder = builder.with_token(token);
        }
    }
    if let Some(endpoint) = endpoint {
        let parsed = url::Url::parse(&endpoint).map_err(|err| StoreError::InvalidUrl {
            url: endpoint.clone(),
            reason: format!("bad s3 endpoint: {err}; use e.g. http://127.0.0.1:9000"),
        })?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(StoreError::InvalidUrl {
                url: endpoint,
                reason: "bad s3 endpoint: use http://host:port or https://host:port".to_owned(),
            });
        }
        builder = builder
            .with_endpoint(endpoint.trim_end_matches('/'))
            .with_virtual_hosted_style_request(false)
            .with_allow_http(parsed.scheme() == "http");
    }
    builder.build().map_err(|source| StoreError::Open {
        url: url.to_string(),
        source,
    })
}
