//! `QueryService`: the gRPC face of the [`QueryEngine`], hosted by
//! `coordinator serve` (and by the embedded mode) next to `CaptureService`,
//! behind the same client token.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;

use capture_proto::tonic::{self, Request, Response, Status};
use capture_proto::v1 as pb;
use capture_proto::{CaptureServiceError, QueryService};
use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt};

use super::analysis::{self, DEFAULT_COMMITMENT_THRESHOLD, effect_size};
use super::engine::{DynamicsLayer, ProjectQuery, PromptProjection, QueryEngine, ReadTotals};
use super::error::QueryError;
use super::reader::{Phase, Sublayer};
use super::tensor::{ArtifactRef, TensorQuery};
use super::vectors::TraitVector;
use crate::queue::{JobQueue, RunFilter};
use crate::service::Coordinator;
use crate::service::convert::{self, queue_error};

type Reply<T> = Result<Response<T>, Status>;
type ReplyStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Most runs a query covers.
const MAX_RUNS: u32 = 1_000;
/// Default and largest artifact listing.
const DEFAULT_ARTIFACTS: u32 = 1_000;
const MAX_ARTIFACTS: u32 = 100_000;

/// The query gRPC service.
#[derive(Debug, Clone)]
pub struct QueryApi {
    engine: QueryEngine,
}

impl QueryApi {
    pub fn new(coordinator: Arc<Coordinator>) -> Self {
        Self {
            engine: QueryEngine::new(coordinator),
        }
    }

    fn coordinator(&self) -> &Coordinator {
        self.engine.coordinator()
    }
}

fn invalid(message: impl Into<String>) -> Status {
    CaptureServiceError::InvalidArgument(message.into()).into()
}

fn time(stamp: &Option<capture_proto::prost_types::Timestamp>) -> Option<DateTime<Utc>> {
    stamp
        .as_ref()
        .and_then(|t| DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0)))
}

fn mode_name(kind: i32) -> Option<String> {
    match pb::CaptureModeKind::try_from(kind).unwrap_or(pb::CaptureModeKind::Unspecified) {
        pb::CaptureModeKind::Residual => Some("residual".to_owned()),
        pb::CaptureModeKind::Internals => Some("internals".to_owned()),
        pb::CaptureModeKind::Unspecified => None,
    }
}

fn non_empty(text: &str) -> Option<String> {
    (!text.is_empty()).then(|| text.to_owned())
}

/// The queue filter of a [`pb::RunQuery`].
pub(crate) fn run_filter(query: Option<&pb::RunQuery>) -> RunFilter {
    let Some(query) = query else {
        return RunFilter {
            limit: capture_proto::DEFAULT_LIST_LIMIT,
            ..RunFilter::default()
        };
    };
    let state = pb::RunState::try_from(query.state).unwrap_or(pb::RunState::Unspecified);
    RunFilter {
        experiment: non_empty(&query.experiment),
        state: convert::run_state_filter(state),
        prompt_set: non_empty(&query.prompt_set),
        mode: mode_name(query.mode),
        model_id: non_empty(&query.model_id),
        model_revision: non_empty(&query.model_revision),
        created_after: time(&query.created_after),
        created_before: time(&query.created_before),
        limit: match query.limit {
            0 => capture_proto::DEFAULT_LIST_LIMIT,
            n => n.min(MAX_RUNS),
        },
    }
}

fn vectors(given: Vec<pb::TraitVector>) -> Result<Vec<TraitVector>, Status> {
    given
        .into_iter()
        .map(|v| {
            if v.trait_name.trim().is_empty() {
                return Err(invalid(format!(
                    "a trait vector from {:?} has no name",
                    v.source
                )));
            }
            if let Some(bad) = v.values.iter().position(|x| !x.is_finite()) {
                return Err(invalid(format!(
                    "vector {} has a non-finite value at index {bad}",
                    v.trait_name
                )));
            }
            if v.values.iter().all(|&x| x == 0.0) {
                return Err(invalid(format!(
                    "vector {} is all zeros: it has no direction",
                    v.trait_name
                )));
            }
            Ok(TraitVector {
                trait_name: v.trait_name,
                method: non_empty(&v.method),
                layer: v.layer.map(|l| l as usize),
                source: v.source,
                values: v.values,
            })
        })
        .collect()
}

fn project_query(request: pb::ProjectRequest) -> Result<ProjectQuery, Status> {
    Ok(ProjectQuery {
        run: convert::run_id(&request.run_id)?,
        vectors: vectors(request.vectors)?,
        layers: request.layers.iter().map(|&l| l as usize).collect(),
        prompt_sets: request.prompt_sets,
        prompt_ids: request.prompt_ids,
    })
}

fn stats(totals: &ReadTotals) -> pb::ReadStats {
    pb::ReadStats {
        artifacts: totals.artifacts,
        bytes_read: totals.bytes_read,
        file_bytes: totals.file_bytes,
        requests: totals.requests,
    }
}

fn sublayer_to_wire(sublayer: Sublayer) -> pb::Sublayer {
    match sublayer {
        Sublayer::ResidualIn => pb::Sublayer::ResidualIn,
        Sublayer::AfterAttn => pb::Sublayer::AfterAttn,
        Sublayer::ResidualOut => pb::Sublayer::ResidualOut,
    }
}

fn sublayer_from_wire(value: i32) -> Sublayer {
    match pb::Sublayer::try_from(value).unwrap_or(pb::Sublayer::Unspecified) {
        pb::Sublayer::ResidualIn => Sublayer::ResidualIn,
        pb::Sublayer::AfterAttn => Sublayer::AfterAttn,
        pb::Sublayer::ResidualOut | pb::Sublayer::Unspecified => Sublayer::ResidualOut,
    }
}

fn u32_of(value: usize) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

fn prompt_message(prompt: PromptProjection) -> pb::PromptProjection {
    pb::PromptProjection {
        prompt_set: prompt.prompt_set,
        prompt_id: prompt.prompt_id,
        artifact_key: prompt.key,
        prompt_tokens: prompt.prompt_tokens,
        response_tokens: prompt.response_tokens,
        traits: prompt
            .traits
            .into_iter()
            .map(|t| pb::TraitScores {
                trait_name: t.trait_name,
                layers: t.projection.layers.iter().map(|&l| u32_of(l)).collect(),
                prompt: t.projection.prompt.values,
                response: t.projection.response.values,
            })
            .collect(),
        bytes_read: prompt.bytes_read,
        file_bytes: prompt.file_bytes,
    }
}

fn dynamics_message(
    prompt: PromptProjection,
    sublayer: Sublayer,
    threshold: f64,
) -> pb::PromptDynamics {
    let traits = prompt
        .traits
        .iter()
        .map(|t| {
            let layer = t.projection.layers[0];
            let scores = t.projection.response.series(0, sublayer);
            let d = analysis::dynamics(&scores, threshold);
            pb::TraitDynamics {
                trait_name: t.trait_name.clone(),
                layer: u32_of(layer),
                sublayer: sublayer_to_wire(sublayer) as i32,
                velocity: d.velocity.iter().map(|&v| v as f32).collect(),
                acceleration: d.acceleration.iter().map(|&a| a as f32).collect(),
                commitment_token: d.commitment_token.map(u32_of),
                peak_velocity: d.peak_velocity.map_or(0.0, |p| p.value),
                peak_velocity_index: d.peak_velocity.map_or(0, |p| u32_of(p.index)),
                mean_abs_velocity: d.mean_abs_velocity.unwrap_or(0.0),
                peak_score: d.peak_score.map_or(0.0, |p| p.value),
                peak_score_token: d.peak_score.map_or(0, |p| u32_of(p.index)),
                persistence: u32_of(d.persistence),
                scores,
            }
        })
        .collect();
    pb::PromptDynamics {
        prompt_set: prompt.prompt_set,
        prompt_id: prompt.prompt_id,
        artifact_key: prompt.key,
        response_tokens: prompt.response_tokens,
        traits,
    }
}

/// Per (run, trait, layer, sublayer, phase): every token's score, baseline
/// and compared, for the Cohen's d of the summary.
type Samples = BTreeMap<(String, String, usize, usize, i32), (Vec<f32>, Vec<f32>)>;

fn phase_key(phase: Phase) -> i32 {
    match phase {
        Phase::Prompt => pb::Phase::Prompt as i32,
        Phase::Response => pb::Phase::Response as i32,
    }
}

/// Compares one prompt of `run` with the baseline's, adding to `samples`.
fn compare_prompt(
    baseline_run: &str,
    run: &str,
    baseline: &PromptProjection,
    other: &PromptProjection,
    samples: &mut Samples,
) -> Vec<pb::PromptComparison> {
    let same_tokens = baseline.prompt_token_ids == other.prompt_token_ids
        && baseline.response_token_ids == other.response_token_ids;
    let mut out = Vec::new();
    for base in &baseline.traits {
        let Some(theirs) = other
            .traits
            .iter()
            .find(|t| t.trait_name == base.trait_name)
        else {
            continue;
        };
        let comparison = analysis::compare(&base.projection, &theirs.projection);
        for &layer in &comparison.layers {
            let base_index = base.projection.layer_index(layer).expect("compared layer");
            let their_index = theirs
                .projection
                .layer_index(layer)
                .expect("compared layer");
            for (sub_index, sublayer) in Sublayer::ALL.into_iter().enumerate() {
                for phase in Phase::ALL {
                    let (a, b) = match phase {
                        Phase::Prompt => (&base.projection.prompt, &theirs.projection.prompt),
                        Phase::Response => (&base.projection.response, &theirs.projection.response),
                    };
                    let entry = samples
                        .entry((
                            run.to_owned(),
                            base.trait_name.clone(),
                            layer,
                            sub_index,
                            phase_key(phase),
                        ))
                        .or_default();
                    entry.0.extend(a.series(base_index, sublayer));
                    entry.1.extend(b.series(their_index, sublayer));
                }
            }
        }
        out.push(pb::PromptComparison {
            prompt_set: baseline.prompt_set.clone(),
            prompt_id: baseline.prompt_id.clone(),
            baseline_run_id: baseline_run.to_owned(),
            run_id: run.to_owned(),
            trait_name: base.trait_name.clone(),
            layers: comparison.layers.iter().map(|&l| u32_of(l)).collect(),
            prompt_diff: comparison.prompt.differences.values,
            response_diff: comparison.response.differences.values,
            prompt_tokens: u32_of(comparison.prompt.differences.tokens),
            response_tokens: u32_of(comparison.response.differences.tokens),
            lengths_differ: comparison.prompt.lengths_differ || comparison.response.lengths_differ,
            same_tokens,
        });
    }
    out
}

fn summary(samples: &Samples) -> Vec<pb::LayerComparison> {
    samples
        .iter()
        .filter_map(|((run, trait_name, layer, sub_index, phase), (a, b))| {
            let effect = effect_size(a, b)?;
            Some(pb::LayerComparison {
                run_id: run.clone(),
                trait_name: trait_name.clone(),
                layer: u32_of(*layer),
                sublayer: sublayer_to_wire(Sublayer::ALL[*sub_index]) as i32,
                phase: *phase,
                mean_difference: effect.mean_difference,
                cohens_d: effect.cohens_d,
                baseline_tokens: effect.n_a as u64,
                tokens: effect.n_b as u64,
            })
        })
        .collect()
}

#[tonic::async_trait]
impl QueryService for QueryApi {
    async fn query_runs(
        &self,
        request: Request<pb::QueryRunsRequest>,
    ) -> Reply<pb::QueryRunsResponse> {
        let filter = run_filter(request.into_inner().filter.as_ref());
        let coordinator = self.coordinator();
        let records = coordinator
            .queue
            .list_runs(&filter)
            .await
            .map_err(queue_error)?;
        let mut runs = Vec::with_capacity(records.len());
        for record in records {
            runs.push(coordinator.run_message(record.id, false).await?);
        }
        Ok(Response::new(pb::QueryRunsResponse { runs }))
    }

    async fn query_artifacts(
        &self,
        request: Request<pb::QueryArtifactsRequest>,
    ) -> Reply<pb::QueryArtifactsResponse> {
        let request = request.into_inner();
        let limit = match request.limit {
            0 => DEFAULT_ARTIFACTS,
            n => n.min(MAX_ARTIFACTS),
        } as usize;
        let runs = if request.run_id.is_empty() {
            self.coordinator()
                .queue
                .list_runs(&run_filter(request.runs.as_ref()))
                .await
                .map_err(queue_error)?
        } else {
            let run = convert::run_id(&request.run_id)?;
            vec![self.engine.run(run).await?.0]
        };
        let mode = mode_name(request.mode);
        let mut artifacts = Vec::new();
        let mut truncated = false;
        'runs: for run in runs {
            let store = self.engine.run_store(&run)?;
            let records = self
                .coordinator()
                .queue
                .list_artifacts(run.id)
                .await
                .map_err(queue_error)?;
            for record in records {
                let row = &record.artifact;
                let keep = (request.prompt_set.is_empty() || row.prompt_set == request.prompt_set)
                    && (request.prompt_id.is_empty() || row.prompt_id == request.prompt_id)
                    && mode.as_ref().is_none_or(|m| *m == row.mode)
                    && request
                        .layer
                        .is_none_or(|l| row.layer.and_then(|x| u32::try_from(x).ok()) == Some(l));
                if !keep {
                    continue;
                }
                if artifacts.len() == limit {
                    truncated = true;
                    break 'runs;
                }
                artifacts.push(pb::RunArtifact {
                    run_id: run.id.to_string(),
                    experiment: run.spec.experiment.clone(),
                    url: store.url_of(&row.key),
                    artifact: Some(convert::artifact_record(row)),
                    created_at: Some(convert::timestamp(record.created_at)),
                });
            }
        }
        Ok(Response::new(pb::QueryArtifactsResponse {
            artifacts,
            truncated,
        }))
    }

    type ProjectStream = ReplyStream<pb::ProjectReply>;

    async fn project(&self, request: Request<pb::ProjectRequest>) -> Reply<Self::ProjectStream> {
        let query = project_query(request.into_inner())?;
        let plan = self.engine.plan_projection(&query, None).await?;
        let prompts = self.engine.project(plan);
        let stream = async_stream(prompts, |prompt, totals| {
            totals.add(&prompt);
            pb::ProjectReply {
                item: Some(pb::project_reply::Item::Prompt(prompt_message(prompt))),
            }
        })
        .map(|item| {
            item.map(|either| match either {
                Either::Item(reply) => reply,
                Either::Done(totals) => pb::ProjectReply {
                    item: Some(pb::project_reply::Item::Done(stats(&totals))),
                },
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    type DynamicsStream = ReplyStream<pb::DynamicsReply>;

    async fn dynamics(&self, request: Request<pb::DynamicsRequest>) -> Reply<Self::DynamicsStream> {
        let request = request.into_inner();
        let projection = request
            .projection
            .ok_or_else(|| invalid("the request has no projection"))?;
        let query = project_query(projection)?;
        if !query.layers.is_empty() {
            return Err(invalid(
                "dynamics analyse one layer: set `layer`, not the projection's layers",
            ));
        }
        let threshold = if request.threshold == 0.0 {
            DEFAULT_COMMITMENT_THRESHOLD
        } else if request.threshold.is_finite() && request.threshold > 0.0 {
            request.threshold
        } else {
            return Err(invalid(format!(
                "threshold {} must be a positive number",
                request.threshold
            )));
        };
        let sublayer = sublayer_from_wire(request.sublayer);
        let layer = request
            .layer
            .map_or(DynamicsLayer::Default, |l| DynamicsLayer::Given(l as usize));
        let plan = self.engine.plan_projection(&query, Some(layer)).await?;
        let prompts = self.engine.project(plan);
        let stream = async_stream(prompts, move |prompt, totals| {
            totals.add(&prompt);
            pb::DynamicsReply {
                item: Some(pb::dynamics_reply::Item::Prompt(dynamics_message(
                    prompt, sublayer, threshold,
                ))),
            }
        })
        .map(|item| {
            item.map(|either| match either {
                Either::Item(reply) => reply,
                Either::Done(totals) => pb::DynamicsReply {
                    item: Some(pb::dynamics_reply::Item::Done(stats(&totals))),
                },
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    type CompareStream = ReplyStream<pb::CompareReply>;

    async fn compare(&self, request: Request<pb::CompareRequest>) -> Reply<Self::CompareStream> {
        let request = request.into_inner();
        if request.run_ids.len() < 2 {
            return Err(invalid("compare needs two or more runs"));
        }
        let mut plans = Vec::with_capacity(request.run_ids.len());
        let vectors = vectors(request.vectors)?;
        for (index, run) in request.run_ids.iter().enumerate() {
            if request.run_ids[..index].contains(run) {
                return Err(invalid(format!("run {run} is named twice")));
            }
            let query = ProjectQuery {
                run: convert::run_id(run)?,
                vectors: vectors.clone(),
                layers: request.layers.iter().map(|&l| l as usize).collect(),
                prompt_sets: request.prompt_sets.clone(),
                prompt_ids: request.prompt_ids.clone(),
            };
            plans.push(self.engine.plan_projection(&query, None).await?);
        }
        let engine = self.engine.clone();
        let run_ids = request.run_ids;
        let stream = async_stream_compare(engine, plans, run_ids);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn read_tensor(
        &self,
        request: Request<pb::ReadTensorRequest>,
    ) -> Reply<pb::ReadTensorResponse> {
        let request = request.into_inner();
        let run = convert::run_id(&request.run_id)?;
        let artifact = if !request.artifact_key.is_empty() {
            ArtifactRef::Key(request.artifact_key.clone())
        } else {
            if request.prompt_set.is_empty() || request.prompt_id.is_empty() {
                return Err(invalid(
                    "name the artifact: its key, or its prompt set and prompt id",
                ));
            }
            ArtifactRef::Prompt {
                prompt_set: request.prompt_set.clone(),
                prompt_id: request.prompt_id.clone(),
                mode: mode_name(request.mode).unwrap_or_else(|| "residual".to_owned()),
                layer: request.layer.map(|l| l as usize),
            }
        };
        let phase = match pb::Phase::try_from(request.phase).unwrap_or(pb::Phase::Unspecified) {
            pb::Phase::Prompt => Phase::Prompt,
            pb::Phase::Response => Phase::Response,
            pb::Phase::Unspecified => return Err(invalid("name the phase: prompt or response")),
        };
        let tokens = match (request.token_start, request.token_end) {
            (None, None) => None,
            (start, end) => {
                let start = start.unwrap_or(0) as usize;
                let end = end.map_or(usize::MAX, |e| e as usize);
                Some(start..end)
            }
        };
        let answer = self
            .engine
            .read_tensor(&TensorQuery {
                run,
                artifact,
                phase,
                layer: request.layer.map(|l| l as usize),
                tensor: request.tensor,
                tokens,
            })
            .await?;
        Ok(Response::new(pb::ReadTensorResponse {
            artifact_key: answer.key,
            path: answer.path,
            dtype: answer.dtype,
            shape: answer.shape.iter().map(|&d| d as u64).collect(),
            values: answer.values,
            stats: Some(stats(&answer.totals)),
        }))
    }
}

enum Either<T> {
    Item(T),
    Done(ReadTotals),
}

/// Maps each projected prompt with `item`, then appends the totals; the
/// first error ends the stream.
fn async_stream<T: Send + 'static>(
    prompts: impl Stream<Item = Result<PromptProjection, QueryError>> + Send + 'static,
    mut item: impl FnMut(PromptProjection, &mut ReadTotals) -> T + Send + 'static,
) -> impl Stream<Item = Result<Either<T>, Status>> + Send + 'static {
    let mut totals = ReadTotals::default();
    let mut prompts = Box::pin(prompts);
    let mut done = false;
    futures::stream::poll_fn(move |cx| {
        if done {
            return std::task::Poll::Ready(None);
        }
        match prompts.as_mut().poll_next(cx) {
            std::task::Poll::Pending => std::task::Poll::Pending,
            std::task::Poll::Ready(Some(Ok(prompt))) => {
                std::task::Poll::Ready(Some(Ok(Either::Item(item(prompt, &mut totals)))))
            }
            std::task::Poll::Ready(Some(Err(error))) => {
                done = true;
                std::task::Poll::Ready(Some(Err(Status::from(error))))
            }
            std::task::Poll::Ready(None) => {
                done = true;
                std::task::Poll::Ready(Some(Ok(Either::Done(totals))))
            }
        }
    })
}

/// Projects the baseline run, then each other run, streaming per-prompt
/// comparisons and ending with the per-layer summary.
fn async_stream_compare(
    engine: QueryEngine,
    plans: Vec<super::engine::ProjectionPlan>,
    run_ids: Vec<String>,
) -> impl Stream<Item = Result<pb::CompareReply, Status>> + Send + 'static {
    let (sender, receiver) = tokio::sync::mpsc::channel::<Result<pb::CompareReply, Status>>(16);
    tokio::spawn(async move {
        let result = compare_runs(&engine, plans, &run_ids, &sender).await;
        if let Err(error) = result {
            let _ = sender.send(Err(Status::from(error))).await;
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(receiver)
}

async fn compare_runs(
    engine: &QueryEngine,
    mut plans: Vec<super::engine::ProjectionPlan>,
    run_ids: &[String],
    sender: &tokio::sync::mpsc::Sender<Result<pb::CompareReply, Status>>,
) -> Result<(), QueryError> {
    let mut totals = ReadTotals::default();
    let baseline_plan = plans.remove(0);
    let mut baseline: HashMap<(String, String), PromptProjection> = HashMap::new();
    let mut prompts = Box::pin(engine.project(baseline_plan));
    while let Some(prompt) = prompts.next().await {
        let prompt = prompt?;
        totals.add(&prompt);
        baseline.insert(
            (prompt.prompt_set.clone(), prompt.prompt_id.clone()),
            prompt,
        );
    }
    let mut samples = Samples::new();
    let mut unmatched = Vec::new();
    for (plan, run) in plans.into_iter().zip(&run_ids[1..]) {
        let mut seen = std::collections::HashSet::new();
        let mut prompts = Box::pin(engine.project(plan));
        while let Some(prompt) = prompts.next().await {
            let prompt = prompt?;
            totals.add(&prompt);
            let key = (prompt.prompt_set.clone(), prompt.prompt_id.clone());
            let Some(base) = baseline.get(&key) else {
                unmatched.push(format!("{run}: {}/{}", key.0, key.1));
                continue;
            };
            seen.insert(key);
            for comparison in compare_prompt(&run_ids[0], run, base, &prompt, &mut samples) {
                let reply = pb::CompareReply {
                    item: Some(pb::compare_reply::Item::Prompt(comparison)),
                };
                if sender.send(Ok(reply)).await.is_err() {
                    return Ok(());
                }
            }
        }
        let mut missing: Vec<_> = baseline
            .keys()
            .filter(|key| !seen.contains(*key))
            .map(|(set, id)| format!("{}: {set}/{id}", run_ids[0]))
            .collect();
        missing.sort();
        unmatched.extend(missing);
    }
    let reply = pb::CompareReply {
        item: Some(pb::compare_reply::Item::Summary(pb::CompareSummary {
            layers: summary(&samples),
            unmatched,
            stats: Some(stats(&totals)),
        })),
    };
    let _ = sender.send(Ok(reply)).await;
    Ok(())
}
