//! `StoreUrl`: where a store lives, parsed from `s3://bucket/prefix`,
//! `gs://bucket/prefix`, `az://container/prefix`, `file:///abs/path` or a
//! plain local path. Parsing does no I/O.

use std::fmt;
use std::path::{Component, Path, PathBuf};

use super::error::StoreError;
use super::keys::{KeyUse, validate_relative_key};

const URL_FORMS: &str = "use s3://bucket/prefix, gs://bucket/prefix, az://container/prefix, file:///absolute/path or a local directory";

/// A parsed store location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// An S3 (or S3-compatible) bucket and a key prefix (no leading or
    /// trailing '/', empty for the bucket root).
    S3 { bucket: String, prefix: String },
    /// A Google Cloud Storage bucket and a key prefix (as for S3).
    Gcs { bucket: String, prefix: String },
    /// An Azure Blob Storage container and a key prefix (as for S3); the
    /// storage account comes from `AZURE_STORAGE_ACCOUNT_NAME`.
    Azure { container: String, prefix: String },
    /// A local directory (absolute, without `.` parts).
    Local { root: PathBuf },
}

impl StoreUrl {
    /// Parses `s3://bucket/prefix`, `gs://bucket/prefix`,
    /// `az://container/prefix` (or `azure://`), `file:///abs/path` or a plain local path;
    /// relative paths are resolved against the current directory.
    pub fn parse(input: &str) -> Result<Self, StoreError> {
        let cwd = if looks_like_url(input) || Path::new(input).is_absolute() {
            PathBuf::from("/")
        } else {
            std::env::current_dir()
                .map_err(|err| invalid(input, format!("cannot resolve a relative path: {err}")))?
        };
        Self::parse_relative_to(input, &cwd)
    }

    /// As [`StoreUrl::parse`], resolving relative paths against `base`.
    pub fn parse_relative_to(input: &str, base: &Path) -> Result<Self, StoreError> {
        if input.trim().is_empty() {
            return Err(invalid(input, format!("it is empty; {URL_FORMS}")));
        }
        if input.contains('\0') {
            return Err(invalid(input, "contains a NUL byte".to_owned()));
        }
        if !looks_like_url(input) {
            return Ok(StoreUrl::Local {
                root: normalize_local(&base.join(input)),
            });
        }
        let url = url::Url::parse(input)
            .map_err(|err| invalid(input, format!("not a url: {err}; {URL_FORMS}")))?;
        if url.query().is_some() || url.fragment().is_some() {
            return Err(invalid(
                input,
                "must not have a query ('?') or fragment ('#')".to_owned(),
            ));
        }
        match url.scheme() {
            "s3" | "s3a" => {
                let (bucket, prefix) = parse_bucket(input, &url, Cloud::S3)?;
                Ok(StoreUrl::S3 { bucket, prefix })
            }
            "gs" => {
                let (bucket, prefix) = parse_bucket(input, &url, Cloud::Gcs)?;
                Ok(StoreUrl::Gcs { bucket, prefix })
            }
            "az" | "azure" => {
                let (container, prefix) = parse_bucket(input, &url, Cloud::Azure)?;
                Ok(StoreUrl::Azure { container, prefix })
            }
            "file" => parse_file(input, &url),
            other => Err(invalid(
                input,
                format!("unsupported scheme \"{other}\"; {URL_FORMS}"),
            )),
        }
    }

    /// The scheme, bucket (or container) and prefix of a cloud store; `None`
    /// for a local directory.
    pub fn bucket_and_prefix(&self) -> Option<(&'static str, &str, &str)> {
        match self {
            StoreUrl::S3 { bucket, prefix } => Some(("s3", bucket, prefix)),
            StoreUrl::Gcs { bucket, prefix } => Some(("gs", bucket, prefix)),
            StoreUrl::Azure { container, prefix } => Some(("az", container, prefix)),
            StoreUrl::Local { .. } => None,
        }
    }

    /// Whether this is a local directory store.
    pub fn is_local(&self) -> bool {
        matches!(self, StoreUrl::Local { .. })
    }

    /// The URL of a key below the store root, for messages and manifests.
    pub fn location_of(&self, key: &str) -> String {
        let base = self.to_string();
        if key.is_empty() {
            base
        } else {
            format!("{}/{key}", base.trim_end_matches('/'))
        }
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::S3 { .. } | StoreUrl::Gcs { .. } | StoreUrl::Azure { .. } => {
                let (scheme, bucket, prefix) = self
                    .bucket_and_prefix()
                    .expect("cloud stores have a bucket");
                if prefix.is_empty() {
                    write!(f, "{scheme}://{bucket}")
                } else {
                    write!(f, "{scheme}://{bucket}/{prefix}")
                }
            }
            StoreUrl::Local { root } => match url::Url::from_file_path(root) {
                Ok(url) => write!(f, "{url}"),
                Err(()) => write!(f, "{}", root.display()),
            },
        }
    }
}

/// `scheme:` at the start (RFC 3986 scheme characters) marks a URL; anything
/// else is a local path (write `./a:b` for a local directory named `a:b`).
fn looks_like_url(input: &str) -> bool {
    let Some((scheme, _)) = input.split_once(':') else {
        return false;
    };
    let mut chars = scheme.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// The cloud object stores a URL can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cloud {
    S3,
    Gcs,
    Azure,
}

impl Cloud {
    fn scheme(self) -> &'static str {
        match self {
            Cloud::S3 => "s3",
            Cloud::Gcs => "gs",
            Cloud::Azure => "az",
        }
    }

    /// What the bucket is called and where credentials come from.
    fn bucket_word(self) -> &'static str {
        match self {
            Cloud::S3 | Cloud::Gcs => "bucket",
            Cloud::Azure => "container",
        }
    }

    fn credentials_hint(self) -> &'static str {
        match self {
            Cloud::S3 => "use the AWS_* environment variables and the endpoint option",
            Cloud::Gcs => "use GOOGLE_APPLICATION_CREDENTIALS or GOOGLE_SERVICE_ACCOUNT",
            Cloud::Azure => "use the AZURE_STORAGE_* environment variables",
        }
    }
}

fn parse_bucket(input: &str, url: &url::Url, cloud: Cloud) -> Result<(String, String), StoreError> {
    let scheme = cloud.scheme();
    let word = cloud.bucket_word();
    let bucket = url.host_str().unwrap_or_default();
    if bucket.is_empty() {
        return Err(invalid(
            input,
            format!("missing {word}; use {scheme}://{word}/prefix"),
        ));
    }
    if !url.username().is_empty() || url.password().is_some() || url.port().is_some() {
        // Never echo credentials back: name the URL without its user part.
        let shown = format!("{scheme}://{bucket}{}", url.path());
        return Err(invalid(
            &shown,
            format!(
                "must not carry credentials or a port; {}",
                cloud.credentials_hint()
            ),
        ));
    }
    if let Some(reason) = bucket_problem(bucket, cloud) {
        return Err(invalid(input, format!("{word} \"{bucket}\" {reason}")));
    }
    // The raw text, not `url.path()`: URL parsing would silently resolve
    // `a/../b` to `b`, and a prefix should mean exactly what it says.
    let after_scheme = input.split_once("://").map_or("", |(_, rest)| rest);
    let path = after_scheme.split_once('/').map_or("", |(_, path)| path);
    let prefix = path.strip_suffix('/').unwrap_or(path);
    if prefix.is_empty() && !path.is_empty() {
        // `s3://bucket//` would otherwise silently mean the bucket root.
        return Err(invalid(
            input,
            format!(
                "bad prefix: has an empty part (\"//\"); use {scheme}://{word}/ or {scheme}://{word}/prefix"
            ),
        ));
    }
    if !prefix.is_empty() {
        validate_relative_key(prefix, KeyUse::Documented)
            .map_err(|err| invalid(input, format!("bad prefix: {}", reason_of(err))))?;
    }
    Ok((bucket.to_owned(), prefix.to_owned()))
}

fn parse_file(input: &str, url: &url::Url) -> Result<StoreUrl, StoreError> {
    let path = url.to_file_path().map_err(|()| {
        invalid(
            input,
            "not a local absolute path; write file:///absolute/path (three slashes)".to_owned(),
        )
    })?;
    Ok(StoreUrl::Local {
        root: normalize_local(&path),
    })
}

/// Bucket naming rules: S3's common subset (every S3-compatible store takes
/// it), GCS's (which also allows '_') and Azure's containers (no '.').
fn bucket_problem(bucket: &str, cloud: Cloud) -> Option<&'static str> {
    if !(3..=63).contains(&bucket.len()) {
        return Some("must be 3 to 63 characters long");
    }
    let allowed = |b: u8| {
        b.is_ascii_lowercase()
            || b.is_ascii_digit()
            || b == b'-'
            || (b == b'.' && cloud != Cloud::Azure)
            || (b == b'_' && cloud == Cloud::Gcs)
    };
    if !bucket.bytes().all(allowed) {
        return Some(match cloud {
            Cloud::S3 => "may only hold lowercase letters, digits, '.' and '-'",
            Cloud::Gcs => "may only hold lowercase letters, digits, '.', '_' and '-'",
            Cloud::Azure => "may only hold lowercase letters, digits and '-'",
        });
    }
    let first_last_ok =
        |b: Option<u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !first_last_ok(bucket.bytes().next()) || !first_last_ok(bucket.bytes().last()) {
        return Some("must start and end with a letter or digit");
    }
    if bucket.contains("..") {
        return Some("must not contain \"..\"");
    }
    None
}

/// Drops `.` parts and a trailing '/'; `..` parts are kept (the directory is
/// canonicalized when the store opens it).
fn normalize_local(path: &Path) -> PathBuf {
    path.components()
        .filter(|component| !matches!(component, Component::CurDir))
        .collect()
}

fn invalid(input: &str, reason: String) -> StoreError {
    StoreError::InvalidUrl {
        url: input.to_owned(),
        reason,
    }
}

fn reason_of(err: StoreError) -> String {
    match err {
        StoreError::UnsafeKey { reason, .. } | StoreError::UnsafeName { reason, .. } => reason,
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(input: &str) -> Result<StoreUrl, StoreError> {
        StoreUrl::parse_relative_to(input, Path::new("/work/here"))
    }

    fn error(input: &str) -> String {
        let msg = parse(input).unwrap_err().to_string();
        assert!(msg.starts_with("invalid store url "), "{msg}");
        assert!(!msg.ends_with('.'), "{msg}");
        msg
    }

    #[test]
    fn s3_urls_give_bucket_and_prefix() {
        let url = parse("s3://my-bucket/team/captures/").unwrap();
        assert_eq!(
            url,
            StoreUrl::S3 {
                bucket: "my-bucket".into(),
                prefix: "team/captures".into()
            }
        );
        assert_eq!(url.to_string(), "s3://my-bucket/team/captures");
        assert_eq!(
            url.location_of("exp/run/manifest.json"),
            "s3://my-bucket/team/captures/exp/run/manifest.json"
        );
        let root = parse("s3://my-bucket").unwrap();
        assert_eq!(root.to_string(), "s3://my-bucket");
        assert_eq!(parse("s3://my-bucket/").unwrap(), root);
    }

    #[test]
    fn local_forms_resolve_to_the_same_directory() {
        let want = StoreUrl::Local {
            root: PathBuf::from("/work/here/captures"),
        };
        assert_eq!(parse("captures").unwrap(), want);
        assert_eq!(parse("./captures/").unwrap(), want);
        assert_eq!(parse("/work/here/captures").unwrap(), want);
        assert_eq!(parse("file:///work/here/captures").unwrap(), want);
        assert_eq!(
            parse("file://localhost/work/here/./captures/").unwrap(),
            want
        );
        assert_eq!(want.to_string(), "file:///work/here/captures");
        assert_eq!(
            parse("file:///tmp/a%20b").unwrap(),
            StoreUrl::Local {
                root: PathBuf::from("/tmp/a b")
            }
        );
        assert_eq!(
            parse("./a:b").unwrap(),
            StoreUrl::Local {
                root: PathBuf::from("/work/here/a:b")
            }
        );
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        assert!(error("").contains("it is empty"));
        assert!(error("gcs://bucket/x").contains("unsupported scheme \"gcs\""));
        assert!(error("https://example.com/x").contains("unsupported scheme \"https\""));
        assert!(error("s3://").contains("missing bucket"));
        assert!(error("s3:///prefix").contains("missing bucket"));
        assert!(error("s3://My_Bucket/x").contains("lowercase letters"));
        assert!(error("s3://ab/x").contains("3 to 63"));
        assert!(error("s3://bucket/a/../b").contains("bad prefix"));
        assert!(error("s3://bucket/a//b").contains("bad prefix"));
        let msg = error("s3://key:secret@bucket/x");
        assert!(
            msg.contains("credentials") && !msg.contains("secret"),
            "{msg}"
        );
        assert!(error("s3://bucket/x?versionId=1").contains("query"));
        assert!(error("file://host/dir").contains("three slashes"));
        assert!(error("dir\0x").contains("NUL"));
    }

    #[test]
    fn gcs_and_azure_urls_give_bucket_and_prefix() {
        let gcs = parse("gs://team_bucket.v2/captures/").unwrap();
        assert_eq!(
            gcs,
            StoreUrl::Gcs {
                bucket: "team_bucket.v2".into(),
                prefix: "captures".into()
            }
        );
        assert_eq!(gcs.to_string(), "gs://team_bucket.v2/captures");
        assert_eq!(
            gcs.bucket_and_prefix(),
            Some(("gs", "team_bucket.v2", "captures"))
        );
        let azure = parse("az://captures/team/a").unwrap();
        assert_eq!(
            azure,
            StoreUrl::Azure {
                container: "captures".into(),
                prefix: "team/a".into()
            }
        );
        assert_eq!(azure.to_string(), "az://captures/team/a");
        assert_eq!(
            parse("azure://captures").unwrap().to_string(),
            "az://captures"
        );
        assert_eq!(
            azure.location_of("exp/run/manifest.json"),
            "az://captures/team/a/exp/run/manifest.json"
        );
        assert!(!azure.is_local());
        assert_eq!(parse("/tmp/x").unwrap().bucket_and_prefix(), None);
    }

    #[test]
    fn bad_gcs_and_azure_urls_say_what_is_wrong() {
        assert!(error("az://").contains("missing container; use az://container/prefix"));
        assert!(error("az://my.container/x").contains("container \"my.container\""));
        assert!(error("gs://Bucket/x").contains("lowercase letters, digits, '.', '_' and '-'"));
        let msg = error("gs://user:secret@bucket/x");
        assert!(
            msg.contains("GOOGLE_APPLICATION_CREDENTIALS") && !msg.contains("secret"),
            "{msg}"
        );
        assert!(error("az://container/../x").contains("bad prefix"));
    }
}
