//! The query engine: finds a run's artifacts in the queue's records, reads
//! just the tensors a query needs through [`ArtifactReader`] and computes
//! projections, dynamics and comparisons with [`super::analysis`].
//!
//! Layers of a trait: the layers asked for when given (each needs a vector
//! of that layer or a layer-free one); otherwise the layers of the trait's
//! layer-specific vectors, or every captured layer for a layer-free vector.
//! The dynamics default layer is the trait's only vector layer, else the
//! model's middle layer, `n_layers * 16 / 26` (16 for Gemma-2-2B's 26, the
//! reference's default monitoring layer).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use capture_worker::store::RunStore;
use futures::stream::{self, Stream, StreamExt};

use super::analysis::{Projection, Scores, project};
use super::error::QueryError;
use super::reader::paths::describe_layers;
use super::reader::{ArtifactReader, ByteCounter, Phase, Sublayer, TensorValues};
use super::vectors::TraitVector;
use crate::queue::{ArtifactRow, JobQueue, RunId, RunRecord};
use crate::service::Coordinator;

/// Residual artifacts read at once by one projection.
const ARTIFACT_CONCURRENCY: usize = 4;
/// Layers whose six tensors are read in one batch (bounds memory: a batch
/// of Gemma-2-2B's 2304-wide rows is 4 x 6 x tokens x 9 KiB).
const LAYERS_PER_BATCH: usize = 4;

/// Which prompts of which run, onto which vectors.
#[derive(Debug, Clone)]
pub struct ProjectQuery {
    pub run: RunId,
    pub vectors: Vec<TraitVector>,
    /// Empty: each trait's default layers (module docs).
    pub layers: Vec<usize>,
    pub prompt_sets: Vec<String>,
    pub prompt_ids: Vec<String>,
}

/// What one query read, in total.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadTotals {
    pub artifacts: u32,
    pub bytes_read: u64,
    pub file_bytes: u64,
    pub requests: u64,
}

impl ReadTotals {
    pub fn add(&mut self, prompt: &PromptProjection) {
        self.artifacts += 1;
        self.bytes_read += prompt.bytes_read;
        self.file_bytes += prompt.file_bytes;
        self.requests += prompt.requests;
    }
}

/// One trait's projections of one prompt.
#[derive(Debug, Clone)]
pub struct TraitProjection {
    pub trait_name: String,
    pub projection: Projection,
}

/// Every trait's projections of one prompt, with its tokens.
#[derive(Debug, Clone)]
pub struct PromptProjection {
    pub prompt_set: String,
    pub prompt_id: String,
    pub key: String,
    pub prompt_tokens: Vec<String>,
    pub response_tokens: Vec<String>,
    pub prompt_token_ids: Vec<i64>,
    pub response_token_ids: Vec<i64>,
    pub traits: Vec<TraitProjection>,
    pub bytes_read: u64,
    pub file_bytes: u64,
    pub requests: u64,
}

/// The vectors of one trait: by layer, and a layer-free one.
#[derive(Debug, Clone, Default)]
struct TraitVectors {
    by_layer: BTreeMap<usize, Arc<Vec<f32>>>,
    any_layer: Option<Arc<Vec<f32>>>,
}

/// (layer, vector) pairs of one trait, in layer order.
type LayerVectors = Vec<(usize, Arc<Vec<f32>>)>;

/// A checked projection: the run's artifacts to read and, per trait, the
/// layers and the vector of each.
#[derive(Debug, Clone)]
pub struct ProjectionPlan {
    pub run: RunRecord,
    store: RunStore,
    artifacts: Vec<ArtifactRow>,
    /// Trait name, then (layer, vector) in layer order.
    traits: Vec<(String, LayerVectors)>,
    /// Layers the artifacts hold.
    pub captured_layers: Vec<usize>,
    pub hidden_size: usize,
}

impl ProjectionPlan {
    /// Number of artifacts the projection reads.
    pub fn artifact_count(&self) -> usize {
        self.artifacts.len()
    }

    /// The layers projected for each trait.
    pub fn trait_layers(&self) -> Vec<(String, Vec<usize>)> {
        self.traits
            .iter()
            .map(|(name, layers)| (name.clone(), layers.iter().map(|(l, _)| *l).collect()))
            .collect()
    }
}

/// The query engine over the coordinator's queue and store.
#[derive(Debug, Clone)]
pub struct QueryEngine {
    coordinator: Arc<Coordinator>,
}

impl QueryEngine {
    pub fn new(coordinator: Arc<Coordinator>) -> Self {
        Self { coordinator }
    }

    pub fn coordinator(&self) -> &Arc<Coordinator> {
        &self.coordinator
    }

    /// The run's record and store root.
    pub async fn run(&self, run: RunId) -> Result<(RunRecord, RunStore), QueryError> {
        let record = self
            .coordinator
            .queue
            .get_run(run)
            .await
            .map_err(|error| match error {
                crate::queue::QueueError::NotFound { .. } => QueryError::NotFound {
                    what: "run",
                    id: run.to_string(),
                },
                other => QueryError::Queue(other),
            })?;
        let store = self.run_store(&record)?;
        Ok((record, store))
    }

    /// The store root of a run already read.
    pub fn run_store(&self, record: &RunRecord) -> Result<RunStore, QueryError> {
        self.coordinator
            .store
            .run(&record.spec.experiment, &record.id.to_string())
            .map_err(|e| QueryError::Invalid(format!("run {}: {e}", record.id)))
    }

    /// The run's recorded artifacts, by key.
    pub async fn artifacts(&self, run: RunId) -> Result<Vec<ArtifactRow>, QueryError> {
        Ok(self
            .coordinator
            .queue
            .list_artifacts(run)
            .await?
            .into_iter()
            .map(|record| record.artifact)
            .collect())
    }

    /// Checks a projection and opens its first artifact to learn the
    /// captured layers and the hidden size.
    pub async fn plan_projection(
        &self,
        query: &ProjectQuery,
        dynamics_layer: Option<DynamicsLayer>,
    ) -> Result<ProjectionPlan, QueryError> {
        if query.vectors.is_empty() {
            return Err(QueryError::Invalid(
                "no trait vectors: pass at least one".to_owned(),
            ));
        }
        let (run, store) = self.run(query.run).await?;
        let all = self.artifacts(query.run).await?;
        let residual: Vec<ArtifactRow> = all.into_iter().filter(|a| a.mode == "residual").collect();
        if residual.is_empty() {
            return Err(QueryError::Invalid(format!(
                "run {} has no residual captures: projections read inference/raw/residual/ files (submit with --mode residual or both){}",
                query.run,
                if run.finished_at.is_none() {
                    "; the run is still running"
                } else {
                    ""
                }
            )));
        }
        let artifacts = select_prompts(residual, &query.prompt_sets, &query.prompt_ids)?;
        let counter = ByteCounter::new();
        let first = ArtifactReader::open_expecting(
            &store,
            &artifacts[0].key,
            &counter,
            recorded_size(&artifacts[0]),
        )
        .await?;
        let captured_layers = first.layers()?;
        if captured_layers.is_empty() {
            return Err(QueryError::Invalid(format!(
                "{} holds no layers: it is not a residual capture",
                first.url()
            )));
        }
        let hidden_size = first
            .residual_tensor(Phase::Prompt, captured_layers[0], Sublayer::ResidualOut)?
            .shape()
            .last()
            .copied()
            .unwrap_or(0);
        let grouped = group_vectors(&query.vectors, hidden_size)?;
        let mut traits = Vec::with_capacity(grouped.len());
        for (name, vectors) in grouped {
            let layers = match dynamics_layer {
                Some(choice) => vec![choice.resolve(&vectors, &captured_layers)],
                None => trait_layers(&name, &vectors, &query.layers, &captured_layers)?,
            };
            let mut chosen = Vec::with_capacity(layers.len());
            for layer in layers {
                if !captured_layers.contains(&layer) {
                    return Err(QueryError::Invalid(format!(
                        "layer {layer} is out of range: run {} captured layers {}",
                        query.run,
                        describe_layers(&captured_layers)
                    )));
                }
                let vector = vectors
                    .by_layer
                    .get(&layer)
                    .or(vectors.any_layer.as_ref())
                    .ok_or_else(|| {
                        QueryError::Invalid(format!(
                            "trait {name} has no vector for layer {layer}: its vectors cover layers {}",
                            describe_layers(&vectors.by_layer.keys().copied().collect::<Vec<_>>())
                        ))
                    })?;
                chosen.push((layer, Arc::clone(vector)));
            }
            traits.push((name, chosen));
        }
        Ok(ProjectionPlan {
            run,
            store,
            artifacts,
            traits,
            captured_layers,
            hidden_size,
        })
    }

    /// The plan's prompts, projected in artifact key order, a few artifacts
    /// read at once.
    pub fn project(
        &self,
        plan: ProjectionPlan,
    ) -> impl Stream<Item = Result<PromptProjection, QueryError>> + Send + 'static {
        let plan = Arc::new(plan);
        stream::iter(0..plan.artifacts.len())
            .map(move |index| {
                let plan = Arc::clone(&plan);
                async move { project_artifact(&plan, index).await }
            })
            .buffered(ARTIFACT_CONCURRENCY)
    }
}

/// How the dynamics layer is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DynamicsLayer {
    /// This layer for every trait.
    Given(usize),
    /// The trait's only vector layer, else the middle layer.
    Default,
}

impl DynamicsLayer {
    fn resolve(self, vectors: &TraitVectors, captured: &[usize]) -> usize {
        match self {
            DynamicsLayer::Given(layer) => layer,
            DynamicsLayer::Default => {
                if vectors.by_layer.len() == 1 && vectors.any_layer.is_none() {
                    *vectors.by_layer.keys().next().expect("one layer")
                } else {
                    middle_layer(captured)
                }
            }
        }
    }
}

/// The model's middle layer: `n * 16 / 26` of the captured layers (16 of 26).
pub fn middle_layer(captured: &[usize]) -> usize {
    let count = captured.iter().max().map_or(0, |max| max + 1);
    count * 16 / 26
}

/// The artifacts of the chosen prompt sets and ids; unknown names are errors.
fn select_prompts(
    artifacts: Vec<ArtifactRow>,
    sets: &[String],
    ids: &[String],
) -> Result<Vec<ArtifactRow>, QueryError> {
    let known_sets: BTreeSet<&str> = artifacts.iter().map(|a| a.prompt_set.as_str()).collect();
    for set in sets {
        if !known_sets.contains(set.as_str()) {
            return Err(QueryError::Invalid(format!(
                "prompt set {set:?} is not in this run's residual captures: it has {}",
                known_sets.iter().copied().collect::<Vec<_>>().join(", ")
            )));
        }
    }
    let chosen: Vec<ArtifactRow> = artifacts
        .into_iter()
        .filter(|a| sets.is_empty() || sets.contains(&a.prompt_set))
        .filter(|a| ids.is_empty() || ids.contains(&a.prompt_id))
        .collect();
    if chosen.is_empty() {
        return Err(QueryError::Invalid(format!(
            "no residual capture matches prompt ids {}",
            ids.join(", ")
        )));
    }
    Ok(chosen)
}

/// Vectors by trait name (first-seen order), checking widths.
fn group_vectors(
    vectors: &[TraitVector],
    hidden_size: usize,
) -> Result<Vec<(String, TraitVectors)>, QueryError> {
    let mut grouped: Vec<(String, TraitVectors)> = Vec::new();
    for vector in vectors {
        if vector.values.len() != hidden_size {
            return Err(QueryError::Invalid(format!(
                "vector {} ({}) has {} values but the captured hidden size is {hidden_size}",
                vector.trait_name,
                vector.source,
                vector.values.len()
            )));
        }
        let index = match grouped.iter().position(|(n, _)| *n == vector.trait_name) {
            Some(index) => index,
            None => {
                grouped.push((vector.trait_name.clone(), TraitVectors::default()));
                grouped.len() - 1
            }
        };
        let entry = &mut grouped[index].1;
        let values = Arc::new(vector.values.clone());
        let duplicate = match vector.layer {
            Some(layer) => entry.by_layer.insert(layer, values).is_some(),
            None => entry.any_layer.replace(values).is_some(),
        };
        if duplicate {
            return Err(QueryError::Invalid(format!(
                "two vectors for trait {} at {}: keep one",
                vector.trait_name,
                vector
                    .layer
                    .map_or("every layer".to_owned(), |l| format!("layer {l}"))
            )));
        }
    }
    Ok(grouped)
}

fn trait_layers(
    name: &str,
    vectors: &TraitVectors,
    asked: &[usize],
    captured: &[usize],
) -> Result<Vec<usize>, QueryError> {
    let mut layers: Vec<usize> = if !asked.is_empty() {
        asked.to_vec()
    } else if vectors.any_layer.is_some() {
        captured.to_vec()
    } else {
        vectors.by_layer.keys().copied().collect()
    };
    layers.sort_unstable();
    layers.dedup();
    if layers.is_empty() {
        return Err(QueryError::Invalid(format!(
            "trait {name} has no layer to project"
        )));
    }
    Ok(layers)
}

/// Reads and projects one artifact of the plan.
async fn project_artifact(
    plan: &ProjectionPlan,
    index: usize,
) -> Result<PromptProjection, QueryError> {
    let row = &plan.artifacts[index];
    let counter = ByteCounter::new();
    let reader =
        ArtifactReader::open_expecting(&plan.store, &row.key, &counter, recorded_size(row)).await?;
    let (_, prompt_tokens, prompt_token_ids) = reader.text_fields(Phase::Prompt)?;
    let (_, response_tokens, response_token_ids) = reader.text_fields(Phase::Response)?;
    let mut projections: Vec<Projection> = plan
        .traits
        .iter()
        .map(|(_, layers)| {
            Projection::zeros(
                layers.iter().map(|(l, _)| *l).collect(),
                prompt_tokens.len(),
                response_tokens.len(),
            )
        })
        .collect();
    let needed: BTreeSet<usize> = plan
        .traits
        .iter()
        .flat_map(|(_, layers)| layers.iter().map(|(l, _)| *l))
        .collect();
    let needed: Vec<usize> = needed.into_iter().collect();
    for batch in needed.chunks(LAYERS_PER_BATCH) {
        let mut wanted = Vec::with_capacity(batch.len() * 6);
        let mut slots = Vec::with_capacity(batch.len() * 6);
        for &layer in batch {
            for phase in Phase::ALL {
                for sublayer in Sublayer::ALL {
                    wanted.push((
                        reader.residual_tensor(phase, layer, sublayer)?.clone(),
                        None,
                    ));
                    slots.push((layer, phase, sublayer));
                }
            }
        }
        let values = reader.read_many(&wanted).await?;
        for ((layer, phase, sublayer), (shape, acts)) in slots.into_iter().zip(values) {
            let tokens = match phase {
                Phase::Prompt => prompt_tokens.len(),
                Phase::Response => response_tokens.len(),
            };
            check_activation_shape(
                row,
                &shape,
                tokens,
                plan.hidden_size,
                layer,
                phase,
                sublayer,
            )?;
            for ((_, layers), projection) in plan.traits.iter().zip(projections.iter_mut()) {
                let Some(position) = layers.iter().position(|(l, _)| *l == layer) else {
                    continue;
                };
                let scores = project(&acts, plan.hidden_size, &layers[position].1);
                let target: &mut Scores = match phase {
                    Phase::Prompt => &mut projection.prompt,
                    Phase::Response => &mut projection.response,
                };
                target.set_series(position, sublayer, &scores);
            }
        }
    }
    Ok(PromptProjection {
        prompt_set: row.prompt_set.clone(),
        prompt_id: row.prompt_id.clone(),
        key: row.key.clone(),
        prompt_tokens,
        response_tokens,
        prompt_token_ids,
        response_token_ids,
        traits: plan
            .traits
            .iter()
            .zip(projections)
            .map(|((name, _), projection)| TraitProjection {
                trait_name: name.clone(),
                projection,
            })
            .collect(),
        bytes_read: counter.bytes_read(),
        file_bytes: reader.file_bytes(),
        requests: counter.requests(),
    })
}

/// The size the run recorded for an artifact.
pub(crate) fn recorded_size(row: &ArtifactRow) -> Option<u64> {
    u64::try_from(row.size_bytes).ok()
}

fn check_activation_shape(
    row: &ArtifactRow,
    shape: &[usize],
    tokens: usize,
    hidden: usize,
    layer: usize,
    phase: Phase,
    sublayer: Sublayer,
) -> Result<(), QueryError> {
    let expected = [tokens, hidden];
    // An empty response may be stored as [0, hidden] or [0].
    let empty_ok = tokens == 0 && shape.first() == Some(&0);
    if shape != expected && !empty_ok {
        return Err(QueryError::Invalid(format!(
            "{} {phase}.activations.{layer}.{sublayer} has shape {shape:?}, expected {expected:?} ({tokens} tokens of width {hidden})",
            row.key
        )));
    }
    Ok(())
}

/// Reads a whole tensor list's values; used by tests and tools.
pub fn flatten(values: Vec<TensorValues>) -> Vec<f32> {
    values.into_iter().flat_map(|(_, v)| v).collect()
}
