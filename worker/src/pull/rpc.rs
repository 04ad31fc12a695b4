//! Calling the coordinator: per-call time limits, which failures are
//! transient (the coordinator or its database restarting, the network),
//! and retrying those with capped, jittered exponential backoff.

use std::future::Future;
use std::time::{Duration, Instant};

use capture_proto::tonic::{Code, Response, Status};
use capture_proto::{CaptureServiceError, WorkerClient};
use tracing::warn;

use super::error::with_causes;

/// Longest wait for one answer, a claim's long poll included.
const CALL_TIMEOUT: Duration = Duration::from_secs(40);
/// Bounds of the pause between retries of a transient failure.
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(10);

/// Capped exponential backoff with jitter: each delay is drawn from the
/// upper half of the current step, and the step doubles up to the cap.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    step: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(RETRY_MIN, RETRY_MAX)
    }
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            step: min,
        }
    }

    /// Starts over from the smallest step.
    pub(crate) fn reset(&mut self) {
        self.step = self.min;
    }

    /// The next pause, between half the current step and the step.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(self.max);
        step.mul_f64(0.5 + rand::random::<f64>() / 2.0)
    }
}

/// Whether a failed call may succeed if repeated: the coordinator said it is
/// unavailable (or the call timed out, was cut off, was throttled), or the
/// status was made on this side from a transport failure (no connection, a
/// connection reset mid-call) rather than sent by the coordinator.
pub(crate) fn is_transient(status: &Status) -> bool {
    if capture_proto::tls_hint(&status_text(status)).is_some() {
        // An untrusted certificate or a TLS/plaintext mismatch never heals.
        return false;
    }
    std::error::Error::source(status).is_some()
        || status.code() == Code::Unknown
        || CaptureServiceError::from_status(status).is_retryable()
}

/// A status's message with its sources, for recognising TLS failures.
pub(crate) fn status_text(status: &Status) -> String {
    let mut text = status.message().to_owned();
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        text.push(' ');
        text.push_str(&error.to_string());
        source = error.source();
    }
    text
}

/// A TLS failure (untrusted certificate, TLS/plaintext mismatch) as the
/// worker's fatal error: it never heals by retrying.
pub(crate) fn fail_on_tls(status: &Status) -> Result<(), super::PullError> {
    let text = status_text(status);
    match capture_proto::tls_hint(&text) {
        Some(hint) => Err(super::PullError::Tls { error: text, hint }),
        None => Ok(()),
    }
}

/// Whether an answer means this worker cannot work with this coordinator at
/// all (a missing or wrong token, a malformed registration).
pub(crate) fn is_fatal(error: &CaptureServiceError) -> bool {
    matches!(
        error,
        CaptureServiceError::Unauthenticated(_)
            | CaptureServiceError::PermissionDenied(_)
            | CaptureServiceError::InvalidArgument(_)
    )
}

/// One call, limited to [`CALL_TIMEOUT`] (a connection that silently died
/// must not hang the worker).
pub(crate) async fn call<T>(
    what: &'static str,
    call: impl Future<Output = Result<Response<T>, Status>>,
) -> Result<T, Status> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(answer) => answer.map(Response::into_inner),
        Err(_) => Err(Status::deadline_exceeded(format!(
            "the coordinator did not answer {what} within {} s",
            CALL_TIMEOUT.as_secs()
        ))),
    }
}

/// Repeats `make_call` while it fails transiently, pausing with [`Backoff`]
/// and logging each failure; gives up after `give_up_after` (never when
/// `None`) with the last failure. Other failures return at once.
pub(crate) async fn call_with_retry<T, F, Fut>(
    what: &'static str,
    give_up_after: Option<Duration>,
    mut make_call: F,
) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Response<T>, Status>>,
{
    let deadline = give_up_after.map(|limit| Instant::now() + limit);
    let mut backoff = Backoff::default();
    let mut failures = 0u32;
    loop {
        let status = match call(what, make_call()).await {
            Ok(answer) => return Ok(answer),
            Err(status) => status,
        };
        let delay = backoff.next_delay();
        let out_of_time = deadline.is_some_and(|deadline| Instant::now() + delay > deadline);
        if !is_transient(&status) || out_of_time {
            return Err(status);
        }
        failures += 1;
        warn!(
            call = what,
            failures,
            retry_in_ms = delay.as_millis() as u64,
            error = %describe(&status),
            "coordinator unavailable, retrying"
        );
        tokio::time::sleep(delay).await;
    }
}

/// [`call_with_retry`] of one `WorkerService` method, e.g.
/// `|mut client, request| async move { client.fail_job(request).await }`,
/// on a fresh handle of `client` and a copy of `request` each time.
pub(crate) async fn retried<R: Clone, T, Fut>(
    client: &WorkerClient,
    what: &'static str,
    give_up_after: Option<Duration>,
    request: &R,
    method: impl Fn(WorkerClient, R) -> Fut,
) -> Result<T, Status>
where
    Fut: Future<Output = Result<Response<T>, Status>>,
{
    call_with_retry(what, give_up_after, || {
        method(client.clone(), request.clone())
    })
    .await
}

/// A status's code, message and the transport failure behind it, on one line.
pub(crate) fn describe(status: &Status) -> String {
    with_causes(
        format!("{:?}: {}", status.code(), status.message()),
        std::error::Error::source(status),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
        let delays: Vec<Duration> = (0..5).map(|_| backoff.next_delay()).collect();
        let steps = [100, 200, 400, 400, 400];
        for (delay, step) in delays.iter().zip(steps) {
            let step = Duration::from_millis(step);
            assert!(
                *delay >= step / 2 && *delay <= step,
                "{delay:?} vs {step:?}"
            );
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn transient_failures_are_told_from_answers() {
        assert!(is_transient(&Status::unavailable("database restarting")));
        assert!(is_transient(&Status::deadline_exceeded("slow")));
        assert!(is_transient(&Status::unknown("transport error")));
        let local = Status::from_error(Box::new(std::io::Error::other("connection reset")));
        assert!(is_transient(&local));
        assert!(!is_transient(&Status::internal("manifest write failed")));
        let untrusted = Status::unavailable("invalid peer certificate: UnknownIssuer");
        assert!(!is_transient(&untrusted));
        assert!(fail_on_tls(&untrusted).is_err());
        assert!(fail_on_tls(&Status::unavailable("connection refused")).is_ok());
        assert!(!is_transient(&Status::failed_precondition(
            "lease lost: job x attempt 1 no longer holds the lease"
        )));
        assert!(!is_transient(&Status::invalid_argument("bad worker id")));
        assert!(is_fatal(&CaptureServiceError::Unauthenticated("no".into())));
        assert!(!is_fatal(&CaptureServiceError::Internal("boom".into())));
    }

    #[tokio::test]
    async fn retries_transient_failures_then_answers() {
        let mut tries = 0;
        let answer = call_with_retry("heartbeat", None, || {
            tries += 1;
            let fail = tries < 3;
            async move {
                if fail {
                    Err(Status::unavailable("restarting"))
                } else {
                    Ok(Response::new(7))
                }
            }
        })
        .await;
        assert_eq!(answer.unwrap(), 7);
        assert_eq!(tries, 3);

        let refused: Result<u8, Status> = call_with_retry("complete", None, || async {
            Err(Status::failed_precondition("lease lost"))
        })
        .await;
        assert_eq!(refused.unwrap_err().code(), Code::FailedPrecondition);

        let gave_up: Result<u8, Status> =
            call_with_retry("release", Some(Duration::from_millis(300)), || async {
                Err(Status::unavailable("down"))
            })
            .await;
        assert_eq!(gave_up.unwrap_err().code(), Code::Unavailable);
    }
}
