//! Connecting to the coordinator, on both sides of the wire: clients and
//! workers open a [`Channel`] with [`connect`] and attach their bearer token
//! with [`AttachToken`]; servers check it with [`RequireToken`].
//!
//! Tokens are compared in constant time and never appear in a message, a
//! log line or a `Debug` output.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

use crate::v1::capture_service_client::CaptureServiceClient;
use crate::v1::query_service_client::QueryServiceClient;
use crate::v1::worker_service_client::WorkerServiceClient;

/// Largest message either side accepts (a job's prompts, a completion's
/// artifact list, an uploaded prompt file).
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// A secret bearer token. Its `Debug` and `Display` print `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(Arc<str>);

impl Token {
    /// A token from its text; `None` for an empty or blank string, so an
    /// unset environment variable and an empty one mean the same.
    pub fn new(text: &str) -> Option<Self> {
        let text = text.trim();
        (!text.is_empty()).then(|| Self(Arc::from(text)))
    }

    /// The secret itself, for the `authorization` header only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Where and how to reach a coordinator.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `http://host:port` or `https://host:port`.
    pub url: String,
    /// Sent as `authorization: Bearer ...` on every call when set.
    pub token: Option<Token>,
    /// PEM file of the certificate authority to trust for `https://` URLs,
    /// besides the system's roots (for self-signed deployments).
    pub tls_ca: Option<PathBuf>,
    pub connect_timeout: Duration,
}

impl ClientConfig {
    /// Plain defaults for `url`: no token, system roots, 10 s to connect.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            token: None,
            tls_ca: None,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// Why a connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(
        "coordinator URL {url:?} is not valid: {reason} (expected http://host:port or https://host:port)"
    )]
    BadUrl { url: String, reason: String },
    #[error("cannot read the TLS certificate authority {path}: {source}")]
    ReadCa {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot reach the coordinator at {url}: {reason} (is `coordinator serve` running there?)"
    )]
    Unreachable { url: String, reason: String },
}

/// Attaches the bearer token, when there is one, to every request.
#[derive(Debug, Clone, Default)]
pub struct AttachToken {
    header: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl AttachToken {
    pub fn new(token: Option<&Token>) -> Self {
        let header = token.and_then(|t| format!("Bearer {}", t.expose()).parse().ok());
        Self { header }
    }
}

impl Interceptor for AttachToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(header) = &self.header {
            let mut header = header.clone();
            header.set_sensitive(true);
            request.metadata_mut().insert("authorization", header);
        }
        Ok(request)
    }
}

/// Server side: refuses calls without the expected bearer token
/// (`UNAUTHENTICATED`). With no token configured every call passes.
#[derive(Debug, Clone, Default)]
pub struct RequireToken {
    expected: Option<Token>,
}

impl RequireToken {
    pub fn new(expected: Option<Token>) -> Self {
        Self { expected }
    }
}

impl Interceptor for RequireToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(request);
        };
        let given = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            Some(given) if constant_time_eq(given.as_bytes(), expected.expose().as_bytes()) => {
                Ok(request)
            }
            Some(_) => Err(Status::unauthenticated(
                "the bearer token is not valid for this service",
            )),
            None => Err(Status::unauthenticated(
                "this service needs a bearer token: pass --token or set CAPTURE_TOKEN (workers: CAPTURE_WORKER_TOKEN)",
            )),
        }
    }
}

/// What to do about a TLS failure described by `text` (an error's message
/// or its chain): `None` when it is not a certificate problem. Certificate
/// problems never heal by retrying.
pub fn tls_hint(text: &str) -> Option<&'static str> {
    if text.contains("invalid peer certificate") || text.contains("UnknownIssuer") {
        Some(
            "the coordinator's TLS certificate is not trusted: pass --tls-ca with the certificate (or CA) it serves",
        )
    } else if text.contains("h2 protocol error") || text.contains("http2 error") {
        Some("is the coordinator serving TLS? then use an https:// URL")
    } else {
        None
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A client of the client-facing service, with its token attached.
pub type CaptureClient = CaptureServiceClient<InterceptedService<Channel, AttachToken>>;
/// A client of the query service, with its (client) token attached.
pub type QueryClient = QueryServiceClient<InterceptedService<Channel, AttachToken>>;
/// A client of the worker-facing service, with its token attached.
pub type WorkerClient = WorkerServiceClient<InterceptedService<Channel, AttachToken>>;

/// Opens a channel to the coordinator (TLS for `https://` URLs), failing
/// fast with a clear message when nothing answers.
pub async fn connect(config: &ClientConfig) -> Result<Channel, ConnectError> {
    let endpoint = endpoint(config)?;
    endpoint
        .connect()
        .await
        .map_err(|e| ConnectError::Unreachable {
            url: config.url.clone(),
            reason: error_chain(&e),
        })
}

/// A channel that connects on first use and reconnects after failures, for
/// long-lived workers that must ride out coordinator restarts.
pub fn connect_lazy(config: &ClientConfig) -> Result<Channel, ConnectError> {
    Ok(endpoint(config)?.connect_lazy())
}

fn endpoint(config: &ClientConfig) -> Result<Endpoint, ConnectError> {
    let bad = |reason: String| ConnectError::BadUrl {
        url: config.url.clone(),
        reason,
    };
    let https = config.url.starts_with("https://");
    if !https && !config.url.starts_with("http://") {
        return Err(bad("the scheme must be http or https".into()));
    }
    let mut endpoint = Endpoint::from_shared(config.url.clone())
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(config.connect_timeout)
        .tcp_keepalive(Some(Duration::from_secs(30)))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    if https {
        let mut tls = ClientTlsConfig::new().with_native_roots();
        if let Some(path) = &config.tls_ca {
            let pem = std::fs::read(path).map_err(|source| ConnectError::ReadCa {
                path: path.clone(),
                source,
            })?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        endpoint = endpoint.tls_config(tls).map_err(|e| bad(error_chain(&e)))?;
    }
    Ok(endpoint)
}

/// The client-facing service over `channel`, sending `token`.
pub fn capture_client(channel: Channel, token: Option<&Token>) -> CaptureClient {
    CaptureServiceClient::with_interceptor(channel, AttachToken::new(token))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// The query service over `channel`, sending `token` (the client token).
pub fn query_client(channel: Channel, token: Option<&Token>) -> QueryClient {
    QueryServiceClient::with_interceptor(channel, AttachToken::new(token))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// The worker-facing service over `channel`, sending `token`.
pub fn worker_client(channel: Channel, token: Option<&Token>) -> WorkerClient {
    WorkerServiceClient::with_interceptor(channel, AttachToken::new(token))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// An error and its sources on one line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_never_print_their_secret() {
        let token = Token::new("s3cr3t-value").unwrap();
        assert!(!format!("{token:?} {token}").contains("s3cr3t"));
        assert!(Token::new("  ").is_none());
    }

    #[test]
    fn require_token_checks_the_bearer_header() {
        let token = Token::new("abc").unwrap();
        let mut require = RequireToken::new(Some(token.clone()));
        let mut attach = AttachToken::new(Some(&token));
        let request = attach.call(Request::new(())).unwrap();
        assert!(require.call(request).is_ok());

        let missing = require.call(Request::new(())).unwrap_err();
        assert_eq!(missing.code(), tonic::Code::Unauthenticated);
        let wrong = AttachToken::new(Token::new("abd").as_ref())
            .call(Request::new(()))
            .unwrap();
        let wrong = require.call(wrong).unwrap_err();
        assert_eq!(wrong.code(), tonic::Code::Unauthenticated);
        assert!(!wrong.message().contains("abc"));

        assert!(RequireToken::new(None).call(Request::new(())).is_ok());
    }

    #[test]
    fn bad_urls_are_explained() {
        let err = connect_lazy(&ClientConfig::new("grpc://x:1")).unwrap_err();
        assert!(err.to_string().contains("http://host:port"), "{err}");
    }
}
