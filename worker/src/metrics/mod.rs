//! Prometheus metrics: the HTTP endpoint both binaries serve with
//! `--metrics-listen` ([`MetricsEndpoint`]) and the pulling worker's own
//! metrics ([`WorkerMetrics`]). The coordinator registers its metrics into
//! the same kind of [`Registry`] and serves them with the same endpoint.

mod endpoint;
mod worker;

use std::net::SocketAddr;

pub use endpoint::{MetricsEndpoint, OPENMETRICS_CONTENT_TYPE, Refresh, RefreshFuture};
pub use prometheus_client::registry::Registry;
pub use worker::WorkerMetrics;

/// The registry in the OpenMetrics text format, `# EOF` included.
pub fn encode_text(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry)?;
    Ok(text)
}

/// Serves `metrics` on `addr` (`worker run --metrics-listen`) until the
/// returned endpoint is dropped.
pub async fn serve_worker_metrics(
    addr: SocketAddr,
    metrics: &WorkerMetrics,
) -> std::io::Result<MetricsEndpoint> {
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    MetricsEndpoint::bind(addr, registry, None).await
}
