//! Reaching the coordinator from the client commands: connecting with
//! messages that say what to do, and turning a failed call into a one-line
//! error (through [`CaptureServiceError::from_status`]).

use anyhow::anyhow;
use capture_proto::tonic::{Code, Status};
use capture_proto::{
    CaptureClient, CaptureServiceError, ClientConfig, ConnectError, capture_client, connect,
};

use super::args::ConnectionArgs;

/// Opens clients of one coordinator, again and again: the first connection
/// and every reconnection while a run is watched.
#[derive(Debug, Clone)]
pub struct Connector {
    config: ClientConfig,
    suggest_embedded: bool,
}

impl Connector {
    /// A connector for `config`.
    pub fn new(config: ClientConfig) -> Self {
        Self {
            config,
            suggest_embedded: false,
        }
    }

    /// The coordinator of `--coordinator`, for `coordinator COMMAND`; an
    /// error that says how to name one when the flag is absent.
    pub fn from_args(args: &ConnectionArgs, command: &str) -> anyhow::Result<Self> {
        let url = args.coordinator.as_deref().ok_or_else(|| {
            anyhow!(
                "`coordinator {command}` talks to a running coordinator: pass --coordinator URL or set \
                 CAPTURE_COORDINATOR (start one with `coordinator serve`)"
            )
        })?;
        Ok(Self::new(args.client_config(url)))
    }

    /// Also suggest leaving out `--coordinator` (to run embedded) when the
    /// coordinator cannot be reached, as `submit` can.
    pub fn suggesting_embedded(mut self) -> Self {
        self.suggest_embedded = true;
        self
    }

    /// The coordinator's URL.
    /// The connection settings.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    pub fn url(&self) -> &str {
        &self.config.url
    }

    /// A connected client, or an error that says the coordinator cannot be
    /// reached and what to do about it.
    pub async fn connect(&self) -> anyhow::Result<CaptureClient> {
        match connect(&self.config).await {
            Ok(channel) => Ok(capture_client(channel, self.config.token.as_ref())),
            Err(ConnectError::Unreachable { url, reason }) => {
                if let Some(hint) = capture_proto::tls_hint(&reason) {
                    return Err(anyhow!(
                        "cannot reach the coordinator at {url}: {reason} ({hint})"
                    ));
                }
                let embedded = if self.suggest_embedded {
                    ", or leave out --coordinator to run an embedded one"
                } else {
                    ""
                };
                Err(anyhow!(
                    "cannot reach the coordinator at {url}: {reason} (start one with `coordinator serve`{embedded})"
                ))
            }
            Err(other) => Err(other.into()),
        }
    }
}

/// The error of a failed call, read as the domain error and prefixed with
/// what was being done (`getting run ...: run not found: ...`); the
/// [`CaptureServiceError`] stays reachable with `downcast_ref`.
pub fn call_error(doing: impl Into<String>, status: &Status) -> anyhow::Error {
    let error = CaptureServiceError::from_status(status);
    let mut doing = doing.into();
    if let Some(hint) = capture_proto::tls_hint(&format!("{status} {}", error_chain(status))) {
        doing = format!("{doing} ({hint})");
    }
    match (&error, status.code()) {
        (CaptureServiceError::Unavailable(_), Code::Unavailable) => anyhow::Error::new(error)
            .context(format!(
                "{doing} (the coordinator is unreachable or restarting)"
            )),
        _ => anyhow::Error::new(error).context(doing),
    }
}

/// The sources of `status`, joined, for recognising transport failures.
fn error_chain(status: &Status) -> String {
    let mut text = String::new();
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        text.push_str(&error.to_string());
        text.push(' ');
        source = error.source();
    }
    text
}

/// Whether a watch that failed with `status` should reconnect and go on:
/// the transport broke or the coordinator is restarting, as opposed to an
/// answer that will not change (unknown run, bad token).
pub fn is_reconnectable(status: &Status) -> bool {
    match status.code() {
        Code::Unavailable
        | Code::Unknown
        | Code::Cancelled
        | Code::DeadlineExceeded
        | Code::ResourceExhausted => true,
        // A run cancelled is reported as a state, so ABORTED here is a
        // transient conflict.
        Code::Aborted => !matches!(
            CaptureServiceError::from_status(status),
            CaptureServiceError::Cancelled { .. }
        ),
        // A broken HTTP/2 connection can surface as INTERNAL with the
        // transport error as its source; a server's own INTERNAL has none.
        Code::Internal => std::error::Error::source(status).is_some(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_errors_say_what_failed_on_one_line() {
        let status = Status::not_found("run not found: 0190f5c2-7a3e-7b1c-9d2a-3c4b5d6e7f80");
        let error = call_error("getting run 0190f5c2", &status);
        assert_eq!(
            format!("{error:#}"),
            "getting run 0190f5c2: run not found: 0190f5c2-7a3e-7b1c-9d2a-3c4b5d6e7f80"
        );
        assert!(matches!(
            error.downcast_ref::<CaptureServiceError>(),
            Some(CaptureServiceError::NotFound { .. })
        ));
        let error = call_error(
            "submitting the run",
            &Status::unavailable("connection refused"),
        );
        assert!(format!("{error:#}").contains("unreachable or restarting"));
    }

    #[test]
    fn only_transport_failures_reconnect() {
        assert!(is_reconnectable(&Status::unavailable("x")));
        assert!(is_reconnectable(&Status::unknown("h2 protocol error")));
        assert!(is_reconnectable(&Status::cancelled("")));
        assert!(!is_reconnectable(&Status::not_found("run not found: x")));
        assert!(!is_reconnectable(&Status::unauthenticated("no token")));
        assert!(!is_reconnectable(&Status::internal("bug")));
        assert!(!is_reconnectable(&Status::invalid_argument("bad id")));
    }

    #[test]
    fn a_missing_coordinator_url_is_explained() {
        let error = Connector::from_args(&ConnectionArgs::default(), "status").unwrap_err();
        let message = error.to_string();
        assert!(message.contains("--coordinator URL"), "{message}");
        assert!(message.contains("coordinator serve"), "{message}");
    }
}
