//! Where `coordinator query` sends its calls: a coordinator's
//! `QueryService` over gRPC, or the same service in this process over the
//! embedded state (SQLite queue in the state directory, local store).

use std::pin::Pin;

use capture_proto::tonic::{Request, Status};
use capture_proto::v1 as pb;
use capture_proto::{QueryClient, QueryService, query_client};
use futures::{Stream, StreamExt};

use super::args::QueryConnection;
use crate::client::{Connector, call_error};
use crate::query::QueryApi;

/// A stream of one query's replies.
pub type Replies<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// A connected query service.
pub enum QueryBackend {
    Remote(QueryClient),
    Local(QueryApi),
}

impl QueryBackend {
    /// Connects to `--coordinator`, or opens the embedded state.
    pub async fn open(args: &QueryConnection, command: &str) -> anyhow::Result<Self> {
        if args.connection.coordinator.is_some() {
            let connector = Connector::from_args(&args.connection, command)?;
            let config = connector.config().clone();
            let channel = capture_proto::connect(&config)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            return Ok(QueryBackend::Remote(query_client(
                channel,
                config.token.as_ref(),
            )));
        }
        let coordinator =
            crate::embedded::open_local(args.local.state_dir.as_ref(), &args.local.store, false)
                .await?;
        Ok(QueryBackend::Local(QueryApi::new(coordinator)))
    }

    pub async fn query_runs(
        &mut self,
        request: pb::QueryRunsRequest,
    ) -> anyhow::Result<pb::QueryRunsResponse> {
        let answer = match self {
            QueryBackend::Remote(client) => client.query_runs(request).await,
            QueryBackend::Local(api) => api.query_runs(Request::new(request)).await,
        };
        answer
            .map(|r| r.into_inner())
            .map_err(|status| call_error("listing runs", &status))
    }

    pub async fn query_artifacts(
        &mut self,
        request: pb::QueryArtifactsRequest,
    ) -> anyhow::Result<pb::QueryArtifactsResponse> {
        let answer = match self {
            QueryBackend::Remote(client) => client.query_artifacts(request).await,
            QueryBackend::Local(api) => api.query_artifacts(Request::new(request)).await,
        };
        answer
            .map(|r| r.into_inner())
            .map_err(|status| call_error("listing artifacts", &status))
    }

    pub async fn project(
        &mut self,
        request: pb::ProjectRequest,
    ) -> anyhow::Result<Replies<pb::ProjectReply>> {
        let doing = format!("projecting run {}", request.run_id);
        let answer = match self {
            QueryBackend::Remote(client) => client
                .project(request)
                .await
                .map(|r| r.into_inner().boxed()),
            QueryBackend::Local(api) => api
                .project(Request::new(request))
                .await
                .map(|r| r.into_inner()),
        };
        answer.map_err(|status| call_error(doing, &status))
    }

    pub async fn dynamics(
        &mut self,
        request: pb::DynamicsRequest,
    ) -> anyhow::Result<Replies<pb::DynamicsReply>> {
        let run = request
            .projection
            .as_ref()
            .map(|p| p.run_id.clone())
            .unwrap_or_default();
        let doing = format!("analysing the dynamics of run {run}");
        let answer = match self {
            QueryBackend::Remote(client) => client
                .dynamics(request)
                .await
                .map(|r| r.into_inner().boxed()),
            QueryBackend::Local(api) => api
                .dynamics(Request::new(request))
                .await
                .map(|r| r.into_inner()),
        };
        answer.map_err(|status| call_error(doing, &status))
    }

    pub async fn compare(
        &mut self,
        request: pb::CompareRequest,
    ) -> anyhow::Result<Replies<pb::CompareReply>> {
        let doing = format!("comparing runs {}", request.run_ids.join(", "));
        let answer = match self {
            QueryBackend::Remote(client) => client
                .compare(request)
                .await
                .map(|r| r.into_inner().boxed()),
            QueryBackend::Local(api) => api
                .compare(Request::new(request))
                .await
                .map(|r| r.into_inner()),
        };
        answer.map_err(|status| call_error(doing, &status))
    }

    pub async fn read_tensor(
        &mut self,
        request: pb::ReadTensorRequest,
    ) -> anyhow::Result<pb::ReadTensorResponse> {
        let doing = format!("reading a tensor of run {}", request.run_id);
        let answer = match self {
            QueryBackend::Remote(client) => client.read_tensor(request).await,
            QueryBackend::Local(api) => api.read_tensor(Request::new(request)).await,
        };
        answer
            .map(|r| r.into_inner())
            .map_err(|status| call_error(doing, &status))
    }
}

/// The next reply of a stream, with what was being done on failure.
pub async fn next_reply<T>(replies: &mut Replies<T>, doing: &str) -> anyhow::Result<Option<T>> {
    match replies.next().await {
        Some(Ok(reply)) => Ok(Some(reply)),
        Some(Err(status)) => Err(call_error(doing.to_owned(), &status)),
        None => Ok(None),
    }
}
