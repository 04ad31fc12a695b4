//! `StoreUrl`: where a store lives, parsed from `s3://bucket/prefix`,
//! `file:///abs/path` or a plain local path. Parsing does no I/O.

use std::fmt;
use std::path::{Component, Path, PathBuf};

use super::error::StoreError;
use super::keys::{KeyUse, validate_relative_key};

const URL_FORMS: &str = "use s3://bucket/prefix, file:///absolute/path or a local directory";

/// A parsed store location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// An S3 (or S3-compatible) bucket and a key prefix (no leading or
    /// trailing '/', empty for the bucket root).
    S3 { bucket: String, prefix: String },
    /// A local directory (absolute, without `.` parts).
    Local { root: PathBuf },
}

impl StoreUrl {
    /// Parses `s3://bucket/prefix`, `file:///abs/path` or a plain local path;
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
            "s3" | "s3a" => parse_s3(input, &url),
            "file" => parse_file(input, &url),
            other => Err(invalid(
                input,
                format!("unsupported scheme \"{other}\"; {URL_FORMS}"),
            )),
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
            StoreUrl::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            StoreUrl::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
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

fn parse_s3(input: &str, url: &url::Url) -> Result<StoreUrl, StoreError> {
    let bucket = url.host_str().unwrap_or_default();
    if bucket.is_empty() {
        return Err(invalid(
            input,
            "missing bucket; use s3://bucket/prefix".to_owned(),
        ));
    }
    if !url.username().is_empty() || url.password().is_some() || url.port().is_some() {
        // Never echo credentials back: name the URL without its user part.
        let shown = format!("s3://{bucket}{}", url.path());
        return Err(invalid(
            &shown,
            "must not carry credentials or a port; use the AWS_* environment variables and the endpoint option".to_owned(),
        ));
    }
    if let Some(reason) = bucket_problem(bucket) {
        return Err(invalid(input, format!("bucket \"{bucket}\" {reason}")));
    }
    // The raw text, not `url.path()`: URL parsing would silently resolve
    // `a/../b` to `b`, and a prefix should mean exactly what it says.
    let after_scheme = input.split_once("://").map_or("", |(_, rest)| rest);
    let path = after_scheme.split_once('/').map_or("", |(_, path)| path);
    let prefix = path.strip_suffix('/').unwrap_or(path);
    if !prefix.is_empty() {
        validate_relative_key(prefix, KeyUse::Documented)
            .map_err(|err| invalid(input, format!("bad prefix: {}", reason_of(err))))?;
    }
    Ok(StoreUrl::S3 {
        bucket: bucket.to_owned(),
        prefix: prefix.to_owned(),
    })
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

/// S3 bucket naming rules (the common subset every S3-compatible store takes).
fn bucket_problem(bucket: &str) -> Option<&'static str> {
    if !(3..=63).contains(&bucket.len()) {
        return Some("must be 3 to 63 characters long");
    }
    if !bucket
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-'))
    {
        return Some("may only hold lowercase letters, digits, '.' and '-'");
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
        assert!(error("gs://bucket/x").contains("unsupported scheme \"gs\""));
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
}
