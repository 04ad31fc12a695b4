//! The HTTP endpoint both binaries serve their metrics on
//! (`--metrics-listen ADDR`): `GET /metrics` in the OpenMetrics text format
//! that Prometheus scrapes, `GET /healthz` answering `ok` for liveness
//! probes, and 404 for any other path. HTTP/1.1 on hyper, one task per
//! connection; dropping the [`MetricsEndpoint`] stops it.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, warn};

/// The content type of `GET /metrics`.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Longest a scrape waits for [`Refresh`] before serving the last values.
const REFRESH_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a client may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed accept (out of file descriptors, ...).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// The future a [`Refresh`] returns.
pub type RefreshFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Brings gauges up to date before each scrape, for values read from
/// elsewhere (the coordinator's job counts come from its database).
pub type Refresh = Arc<dyn Fn() -> RefreshFuture + Send + Sync>;

/// The registry and its refresh, shared by every connection.
#[derive(Clone)]
struct Exposition {
    registry: Arc<Registry>,
    refresh: Option<Refresh>,
    refresh_timeout: Duration,
}

/// A running metrics endpoint; stops (with its connections) when dropped.
#[derive(Debug)]
pub struct MetricsEndpoint {
    local_addr: SocketAddr,
    task: JoinHandle<()>,
}

impl MetricsEndpoint {
    /// Listens on `addr` and serves `registry` until dropped.
    pub async fn bind(
        addr: SocketAddr,
        registry: Registry,
        refresh: Option<Refresh>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        Self::serve(listener, registry, refresh)
    }

    /// Serves `registry` on an already bound `listener` until dropped.
    pub fn serve(
        listener: TcpListener,
        registry: Registry,
        refresh: Option<Refresh>,
    ) -> std::io::Result<Self> {
        let local_addr = listener.local_addr()?;
        let exposition = Exposition {
            registry: Arc::new(registry),
            refresh,
            refresh_timeout: REFRESH_TIMEOUT,
        };
        let task = tokio::spawn(accept_connections(listener, exposition));
        Ok(Self { local_addr, task })
    }

    /// Where the endpoint listens (the port chosen for `:0`).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl Drop for MetricsEndpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Accepts connections until aborted; aborting drops (and so ends) every
/// connection it started.
async fn accept_connections(listener: TcpListener, exposition: Exposition) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    connections.spawn(serve_connection(stream, peer, exposition.clone()));
                }
                Err(error) => {
                    warn!(%error, "cannot accept a metrics connection");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve_connection(stream: tokio::net::TcpStream, peer: SocketAddr, exposition: Exposition) {
    let service = service_fn(move |request: Request<hyper::body::Incoming>| {
        let exposition = exposition.clone();
        async move {
            Ok::<_, Infallible>(
                exposition
                    .respond(request.method(), request.uri().path())
                    .await,
            )
        }
    });
    let served = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(error) = served {
        debug!(%peer, %error, "metrics connection ended with an error");
    }
}

impl Exposition {
    async fn respond(&self, method: &Method, path: &str) -> Response<Full<Bytes>> {
        if path != "/metrics" && path != "/healthz" {
            return text(
                StatusCode::NOT_FOUND,
                format!("no {path} here: the endpoints are /metrics and /healthz\n"),
            );
        }
        if method != Method::GET && method != Method::HEAD {
            let mut response = text(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{path} answers GET only\n"),
            );
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            return response;
        }
        if path == "/healthz" {
            return text(StatusCode::OK, "ok".to_owned());
        }
        if let Some(refresh) = &self.refresh
            && tokio::time::timeout(self.refresh_timeout, refresh())
                .await
                .is_err()
        {
            warn!(
                timeout_seconds = self.refresh_timeout.as_secs_f64(),
                "refreshing the metrics timed out: serving the last values"
            );
        }
        match super::encode_text(&self.registry) {
            Ok(body) => {
                let mut response = Response::new(Full::new(Bytes::from(body)));
                response.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static(OPENMETRICS_CONTENT_TYPE),
                );
                response
            }
            Err(error) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot encode the metrics: {error}\n"),
            ),
        }
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::gauge::Gauge;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpStream;

    use super::*;

    /// Sends one raw HTTP/1.1 request and returns (status line, head, body).
    async fn request(addr: SocketAddr, method: &str, path: &str) -> (String, String, String) {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let request =
            format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .expect("send the request");
        let mut answer = String::new();
        stream
            .read_to_string(&mut answer)
            .await
            .expect("read the answer");
        let (head, body) = answer.split_once("\r\n\r\n").expect("a head and a body");
        let status = head.lines().next().unwrap_or_default().to_owned();
        (status, head.to_ascii_lowercase(), body.to_owned())
    }

    #[tokio::test]
    async fn serves_metrics_health_and_404_over_tcp() {
        let mut registry = Registry::default();
        let requests: Counter = Counter::default();
        registry.register("demo_requests", "Requests seen", requests.clone());
        let refreshed: Gauge = Gauge::default();
        registry.register("demo_refreshed", "Refreshes done", refreshed.clone());
        let refreshes = Arc::new(AtomicU64::new(0));
        let refresh: Refresh = {
            let refreshes = Arc::clone(&refreshes);
            let refreshed = refreshed.clone();
            Arc::new(move || {
                let count = refreshes.fetch_add(1, Ordering::Relaxed) + 1;
                refreshed.set(i64::try_from(count).unwrap_or(i64::MAX));
                Box::pin(async {})
            })
        };
        requests.inc_by(3);
        let endpoint =
            MetricsEndpoint::bind("127.0.0.1:0".parse().unwrap(), registry, Some(refresh))
                .await
                .expect("bind the metrics endpoint");
        let addr = endpoint.local_addr();
        assert_ne!(addr.port(), 0);

        let (status, head, body) = request(addr, "GET", "/metrics").await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(
            head.contains("content-type: application/openmetrics-text; version=1.0.0"),
            "{head}"
        );
        assert!(body.contains("# TYPE demo_requests counter\n"), "{body}");
        assert!(body.contains("\ndemo_requests_total 3\n"), "{body}");
        assert!(body.contains("\ndemo_refreshed 1\n"), "{body}");
        assert!(body.ends_with("# EOF\n"), "{body}");

        let (_, _, body) = request(addr, "GET", "/metrics").await;
        assert!(body.contains("\ndemo_refreshed 2\n"), "{body}");

        let (status, _, body) = request(addr, "GET", "/healthz").await;
        assert_eq!((status.as_str(), body.as_str()), ("HTTP/1.1 200 OK", "ok"));
        assert_eq!(
            refreshes.load(Ordering::Relaxed),
            2,
            "health checks do not refresh"
        );

        let (status, _, body) = request(addr, "GET", "/nope").await;
        assert_eq!(status, "HTTP/1.1 404 Not Found");
        assert!(body.contains("/metrics and /healthz"), "{body}");

        let (status, head, _) = request(addr, "POST", "/metrics").await;
        assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
        assert!(head.contains("allow: get, head"), "{head}");

        drop(endpoint);
        // The listener closes once the accept task is gone.
        let mut refused = false;
        for _ in 0..50 {
            if TcpStream::connect(addr).await.is_err() {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(refused, "the endpoint still accepts after being dropped");
    }

    #[tokio::test]
    async fn a_stuck_refresh_serves_the_last_values() {
        let mut registry = Registry::default();
        let value: Gauge = Gauge::default();
        value.set(7);
        registry.register("demo_value", "A value", value);
        let refresh: Refresh = Arc::new(|| Box::pin(std::future::pending()));
        let exposition = Exposition {
            registry: Arc::new(registry),
            refresh: Some(refresh),
            refresh_timeout: Duration::from_millis(50),
        };
        let response = exposition.respond(&Method::GET, "/metrics").await;
        assert_eq!(response.status(), StatusCode::OK);
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap()
            .to_bytes();
        assert!(
            String::from_utf8_lossy(&body).contains("\ndemo_value 7\n"),
            "{body:?}"
        );
    }
}
