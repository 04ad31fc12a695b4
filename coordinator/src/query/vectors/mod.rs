//! Trait vectors: `.pt` files holding one direction in the residual stream,
//! loaded from local files and directory trees or from object-store URLs,
//! and chosen one per trait and layer.
//!
//! A vector file is what `torch.save(tensor)` writes for a bare float32,
//! float16 or bfloat16 tensor of shape `[d]`, `[1, d]` or `[d, 1]`; it must be
//! non-empty, finite and not all zeros.
//!
//! A tree follows the extraction layout
//!
//! ```text
//! experiments/{exp}/extraction/{category}/{trait}/vectors/{method}_layer{L}.pt
//! ```
//!
//! and may be given at the repository root (holding `experiments/`), at
//! `experiments/{exp}` (holding `extraction/`) or at the `extraction` folder
//! itself (any folder holding `{category}/{trait}/vectors/...` works when it
//! has neither `extraction/` nor `experiments/`). Traits are named
//! `category/trait`. For every trait and wanted layer the tree gives the
//! vector of the named method, or else of the first method present in
//! [`METHOD_PREFERENCE`], or else of the alphabetically first other method.
//!
//! A single file applies to one trait: `category/trait` when its path ends in
//! `{category}/{trait}/vectors/{file}`, its file name without `.pt`
//! otherwise. A file named `{method}_layer{L}.pt` applies to layer `L` only
//! (unless [`VectorRequest::files_for_every_layer`] is set); any other name
//! applies to every layer.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use capture_worker::pt::{PtDtype, PtError, PtValue, decode_pt};
use capture_worker::store::{ArtifactStore, StoreError, StoreOptions, StoreUrl};
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;
use tracing::warn;

/// Methods in order of preference when a request names none.
pub const METHOD_PREFERENCE: [&str; 4] = ["probe", "mean_diff", "ica", "gradient"];

/// Vector files read at once.
const READ_CONCURRENCY: usize = 8;

/// One loaded trait vector.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TraitVector {
    /// `category/trait` (tree layout) or the file's name without `.pt`.
    pub trait_name: String,
    /// The extraction method, from a `{method}_layer{L}.pt` file name.
    pub method: Option<String>,
    /// The layer this vector applies to; `None`: every layer.
    pub layer: Option<usize>,
    /// Where it was read from (a local path or a store URL).
    pub source: String,
    /// The direction, `d` values.
    pub values: Vec<f32>,
}

impl TraitVector {
    /// Euclidean norm, accumulated in `f64`.
    pub fn norm(&self) -> f64 {
        self.values
            .iter()
            .map(|&x| f64::from(x) * f64::from(x))
            .sum::<f64>()
            .sqrt()
    }

    /// Number of values (the hidden size it was extracted at).
    pub fn width(&self) -> usize {
        self.values.len()
    }

    /// Whether it applies to `layer`.
    pub fn applies_to(&self, layer: usize) -> bool {
        self.layer.is_none_or(|own| own == layer)
    }
}

/// Where vectors come from: a local path, or a store URL (`s3://`,
/// `gs://`, `az://`, `file://`: whatever [`ArtifactStore`] opens).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VectorSource {
    /// One `.pt` file.
    File(String),
    /// A tree in the extraction layout.
    Tree(String),
}

impl VectorSource {
    /// A file when `location` ends in `.pt`, a tree otherwise.
    pub fn guess(location: &str) -> Self {
        if location.trim_end_matches('/').ends_with(".pt") {
            VectorSource::File(location.to_owned())
        } else {
            VectorSource::Tree(location.to_owned())
        }
    }

    /// The path or URL.
    pub fn location(&self) -> &str {
        match self {
            VectorSource::File(location) | VectorSource::Tree(location) => location,
        }
    }
}

/// Which vectors to load.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VectorRequest {
    /// Files and trees, at least one.
    pub sources: Vec<VectorSource>,
    /// Traits to load (`category/trait`, or a single file's trait name);
    /// empty: every trait the sources hold. A named trait must exist, and
    /// must have a vector at every wanted layer; unnamed traits without a
    /// vector at some wanted layer are skipped there (with a warning).
    pub traits: Vec<String>,
    /// The extraction method to take from trees; `None`: the preferred one
    /// present ([`METHOD_PREFERENCE`]). Single files are taken as they are.
    pub method: Option<String>,
    /// Layers wanted; empty: every layer the sources have vectors for.
    pub layers: Vec<usize>,
    /// For a tree given at the repository root that holds several
    /// experiments: the one to read.
    pub experiment: Option<String>,
    /// Apply single files to every layer, even when named `{method}_layer{L}.pt`.
    pub files_for_every_layer: bool,
}

/// Everything that can go wrong while loading vectors.
#[derive(Debug, thiserror::Error)]
pub enum VectorError {
    /// The request names no source.
    #[error("no vector sources given: name a .pt file, a directory tree or a store url")]
    NoSources,
    /// A source location that cannot be used.
    #[error("invalid vector source {location}: {reason}")]
    InvalidSource { location: String, reason: String },
    /// A local file or directory could not be read.
    #[error("cannot read {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The artifact store failed (the message names the object).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The file is not a readable `.pt` archive.
    #[error("cannot decode trait vector {location}: {source}")]
    Decode {
        location: String,
        #[source]
        source: PtError,
    },
    /// The file holds something other than one usable direction.
    #[error("invalid trait vector {location}: {problem}")]
    Invalid { location: String, problem: String },
    /// A tree without a single `{method}_layer{L}.pt` in the layout.
    #[error("no trait vectors under {location}: expected {expected}")]
    EmptyTree {
        location: String,
        expected: &'static str,
    },
    /// A repository-root tree with several experiments and none chosen.
    #[error(
        "{location} holds vectors of several experiments ({experiments}): name one, or point the source at experiments/{{experiment}}"
    )]
    SeveralExperiments {
        location: String,
        experiments: String,
    },
    /// The chosen experiment has no vectors in a repository-root tree.
    #[error(
        "experiment {experiment:?} has no vectors under {location}: experiments with vectors are {known}"
    )]
    UnknownExperiment {
        experiment: String,
        location: String,
        known: String,
    },
    /// A named trait that no source holds.
    #[error("unknown trait {trait_name:?}: traits available are {known}")]
    UnknownTrait { trait_name: String, known: String },
    /// A named trait without a vector where one is wanted.
    #[error("no vector for {trait_name} {wanted}: {available}")]
    NoVector {
        trait_name: String,
        /// `at layer 12` or `with method ica`.
        wanted: String,
        /// What exists instead.
        available: String,
    },
    /// Two sources give a vector for the same trait and layer.
    #[error("vector {trait_name} {at} is given twice: by {first} and by {second}")]
    Duplicate {
        trait_name: String,
        /// `at layer 12` or `at every layer`.
        at: String,
        first: String,
        second: String,
    },
    /// A vector whose width is not the model's hidden size.
    #[error(
        "vector {trait_name} (file {location}) has {width} values but the model's hidden size is {hidden}"
    )]
    WidthMismatch {
        trait_name: String,
        location: String,
        width: usize,
        hidden: usize,
    },
    /// A blocking helper task (decoding, walking a directory) failed.
    #[error("internal task failed while {operation}: {source}")]
    Task {
        operation: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
}

/// Loads the vectors `request` asks for, sorted by trait and layer.
pub async fn load_vectors(request: &VectorRequest) -> Result<Vec<TraitVector>, VectorError> {
    if request.sources.is_empty() {
        return Err(VectorError::NoSources);
    }
    let mut offers = Vec::new();
    for (index, source) in request.sources.iter().enumerate() {
        match source {
            VectorSource::File(location) => {
                offers.push(file_offer(location, index, request.files_for_every_layer).await?);
            }
            VectorSource::Tree(location) => {
                offers.extend(tree_offers(location, index, request.experiment.as_deref()).await?);
            }
        }
    }
    let chosen = choose(&offers, request)?;
    check_duplicates(&chosen)?;
    let mut vectors: Vec<TraitVector> = futures::stream::iter(chosen)
        .map(read_offer)
        .buffered(READ_CONCURRENCY)
        .try_collect()
        .await?;
    vectors.sort_by(|a, b| (&a.trait_name, a.layer).cmp(&(&b.trait_name, b.layer)));
    Ok(vectors)
}

/// The vector of `trait_name` for `layer`: the one loaded for that layer, or
/// else one that applies to every layer.
pub fn vector_for<'a>(
    vectors: &'a [TraitVector],
    trait_name: &str,
    layer: usize,
) -> Option<&'a TraitVector> {
    let of_trait = || vectors.iter().filter(|v| v.trait_name == trait_name);
    of_trait()
        .find(|v| v.layer == Some(layer))
        .or_else(|| of_trait().find(|v| v.layer.is_none()))
}

/// The distinct trait names, sorted.
pub fn trait_names(vectors: &[TraitVector]) -> Vec<&str> {
    let names: BTreeSet<&str> = vectors.iter().map(|v| v.trait_name.as_str()).collect();
    names.into_iter().collect()
}

/// Checks that every vector has the model's hidden size.
pub fn check_width(vectors: &[TraitVector], hidden: usize) -> Result<(), VectorError> {
    match vectors.iter().find(|v| v.width() != hidden) {
        None => Ok(()),
        Some(vector) => Err(VectorError::WidthMismatch {
            trait_name: vector.trait_name.clone(),
            location: vector.source.clone(),
            width: vector.width(),
            hidden,
        }),
    }
}

/// Splits `{method}_layer{L}.pt` into the method and the layer.
pub fn parse_vector_file_name(name: &str) -> Option<(String, usize)> {
    let stem = name.strip_suffix(".pt")?;
    let (method, layer) = stem.rsplit_once("_layer")?;
    if method.is_empty() || layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((method.to_owned(), layer.parse().ok()?))
}

/// Decodes and checks one vector file's bytes; `location` names it in errors.
pub fn decode_vector(bytes: &[u8], location: &str) -> Result<Vec<f32>, VectorError> {
    let invalid = |problem: String| VectorError::Invalid {
        location: location.to_owned(),
        problem,
    };
    let decode_error = |source| VectorError::Decode {
        location: location.to_owned(),
        source,
    };
    let value = decode_pt(bytes).map_err(decode_error)?;
    let tensor = match &value {
        PtValue::Tensor(tensor) => tensor,
        PtValue::Dict(entries) => {
            let keys: Vec<String> = entries.iter().map(|(key, _)| format!("{key:?}")).collect();
            return Err(invalid(format!(
                "it holds a dict with keys {}, not a tensor; save the bare vector with torch.save(tensor)",
                shorten_list(&keys)
            )));
        }
        other => {
            return Err(invalid(format!(
                "it holds a {}, not a tensor; save the bare vector with torch.save(tensor)",
                other.type_name()
            )));
        }
    };
    if tensor.dtype == PtDtype::I64 {
        return Err(invalid(
            "it holds int64 values; expected float32, float16 or bfloat16".to_owned(),
        ));
    }
    if !matches!(tensor.shape.as_slice(), [_] | [1, _] | [_, 1]) {
        return Err(invalid(format!(
            "it has shape {:?}; expected a vector of shape [d], [1, d] or [d, 1]",
            tensor.shape
        )));
    }
    if tensor.numel() == 0 {
        return Err(invalid(format!("it is empty (shape {:?})", tensor.shape)));
    }
    let values = tensor.to_f32_vec().map_err(decode_error)?;
    if let Some((index, value)) = values.iter().enumerate().find(|(_, x)| !x.is_finite()) {
        return Err(invalid(format!(
            "value {index} is {value}; every value must be finite"
        )));
    }
    if values.iter().all(|&x| x == 0.0) {
        return Err(invalid(
            "all values are zero, so it has no direction".to_owned(),
        ));
    }
    Ok(values)
}

/// Where the bytes of an offer are.
#[derive(Debug, Clone)]
enum Origin {
    /// Below a local directory.
    Local(PathBuf),
    /// Below a store's prefix.
    Store(ArtifactStore),
}

impl Origin {
    fn location_of(&self, key: &str) -> String {
        match self {
            Origin::Local(root) => root.join(key).display().to_string(),
            Origin::Store(store) => store.url().location_of(key),
        }
    }

    async fn read(&self, key: &str) -> Result<Bytes, VectorError> {
        match self {
            Origin::Local(root) => {
                let path = root.join(key);
                match tokio::fs::read(&path).await {
                    Ok(bytes) => Ok(Bytes::from(bytes)),
                    Err(source) => Err(VectorError::Io { path, source }),
                }
            }
            Origin::Store(store) => Ok(store.get_object(key).await?),
        }
    }

    /// Keys (relative to the origin) of the files exactly `depth` parts
    /// below `folder` (`""` for the origin itself).
    async fn list(&self, folder: &str, depth: usize) -> Result<Vec<String>, VectorError> {
        match self {
            Origin::Local(root) => {
                let root = root.clone();
                let folder = folder.to_owned();
                tokio::task::spawn_blocking(move || walk_local(&root, &folder, depth))
                    .await
                    .map_err(|source| VectorError::Task {
                        operation: "listing a vector tree",
                        source,
                    })?
            }
            Origin::Store(store) => {
                let below = |key: &str| {
                    let rest = if folder.is_empty() {
                        Some(key)
                    } else {
                        key.strip_prefix(folder)
                            .and_then(|rest| rest.strip_prefix('/'))
                    };
                    rest.is_some_and(|rest| rest.split('/').count() == depth)
                };
                Ok(store
                    .list_objects(folder)
                    .await?
                    .into_iter()
                    .map(|info| info.key)
                    .filter(|key| below(key))
                    .collect())
            }
        }
    }
}

/// A vector a source has, before it is read.
#[derive(Debug, Clone)]
struct Offer {
    trait_name: String,
    method: Option<String>,
    layer: Option<usize>,
    /// Index of the source in the request.
    source_index: usize,
    from_tree: bool,
    origin: Origin,
    key: String,
    location: String,
}

async fn file_offer(
    location: &str,
    source_index: usize,
    every_layer: bool,
) -> Result<Offer, VectorError> {
    let (origin, key) = if is_url(location) {
        let trimmed = location.trim_end_matches('/');
        let after_scheme = trimmed.split_once("://").map_or("", |(_, rest)| rest);
        let Some((parent, name)) = trimmed
            .rsplit_once('/')
            .filter(|_| after_scheme.contains('/'))
        else {
            return Err(VectorError::InvalidSource {
                location: location.to_owned(),
                reason: "it names no file; use e.g. s3://bucket/path/probe_layer16.pt".to_owned(),
            });
        };
        let parent = if parent.ends_with("://") {
            format!("{parent}/")
        } else {
            parent.to_owned()
        };
        (Origin::Store(open_store(&parent).await?), name.to_owned())
    } else {
        let path = Path::new(location);
        let (Some(parent), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str()))
        else {
            return Err(VectorError::InvalidSource {
                location: location.to_owned(),
                reason: "it names no file".to_owned(),
            });
        };
        (Origin::Local(parent.to_owned()), name.to_owned())
    };
    let parts: Vec<&str> = location.trim_end_matches('/').split(['/', '\\']).collect();
    let trait_name = match parts.as_slice() {
        [.., category, name, "vectors", _]
            if !category.is_empty() && !name.is_empty() && !category.contains(':') =>
        {
            format!("{category}/{name}")
        }
        _ => key.strip_suffix(".pt").unwrap_or(&key).to_owned(),
    };
    let parsed = parse_vector_file_name(&key);
    let location = origin.location_of(&key);
    Ok(Offer {
        trait_name,
        method: parsed.as_ref().map(|(method, _)| method.clone()),
        layer: parsed.filter(|_| !every_layer).map(|(_, layer)| layer),
        source_index,
        from_tree: false,
        origin,
        key,
        location,
    })
}

const EXTRACTION_LAYOUT: &str = "{category}/{trait}/vectors/{method}_layer{L}.pt below it";
const EXPERIMENT_LAYOUT: &str =
    "extraction/{category}/{trait}/vectors/{method}_layer{L}.pt below it";
const REPOSITORY_LAYOUT: &str =
    "experiments/{exp}/extraction/{category}/{trait}/vectors/{method}_layer{L}.pt below it";
const ANY_LAYOUT: &str = "experiments/{exp}/extraction/{category}/{trait}/vectors/{method}_layer{L}.pt below it, or a tree rooted at experiments/{exp} or at its extraction folder";

/// Every vector of a tree, after finding which of the three roots it is.
async fn tree_offers(
    location: &str,
    source_index: usize,
    experiment: Option<&str>,
) -> Result<Vec<Offer>, VectorError> {
    let origin = if is_url(location) {
        Origin::Store(open_store(location).await?)
    } else {
        let root = PathBuf::from(location);
        match tokio::fs::metadata(&root).await {
            Ok(meta) if meta.is_dir() => Origin::Local(root),
            Ok(_) => {
                return Err(VectorError::InvalidSource {
                    location: location.to_owned(),
                    reason: "not a directory; name .pt files as files".to_owned(),
                });
            }
            Err(source) => return Err(VectorError::Io { path: root, source }),
        }
    };
    let root_name = location
        .trim_end_matches('/')
        .rsplit(['/', '\\'])
        .next()
        .unwrap_or_default();

    let (keys, expected) = if root_name == "extraction" {
        (origin.list("", 4).await?, EXTRACTION_LAYOUT)
    } else {
        let below_extraction = origin.list("extraction", 4).await?;
        if !below_extraction.is_empty() {
            (below_extraction, EXPERIMENT_LAYOUT)
        } else {
            let below_experiments = origin.list("experiments", 6).await?;
            if !below_experiments.is_empty() {
                (below_experiments, REPOSITORY_LAYOUT)
            } else {
                (origin.list("", 4).await?, ANY_LAYOUT)
            }
        }
    };

    // (experiment, trait, method, layer, key)
    let mut found: Vec<(Option<String>, String, String, usize, String)> = Vec::new();
    for key in keys {
        let parts: Vec<&str> = key.split('/').collect();
        let (experiment, rest) = match parts.as_slice() {
            ["experiments", exp, "extraction", rest @ ..] => (Some((*exp).to_owned()), rest),
            ["extraction", rest @ ..] => (None, rest),
            rest => (None, rest),
        };
        let [category, name, "vectors", file] = rest else {
            continue;
        };
        let Some((method, layer)) = parse_vector_file_name(file) else {
            continue;
        };
        found.push((experiment, format!("{category}/{name}"), method, layer, key));
    }
    if found.is_empty() {
        return Err(VectorError::EmptyTree {
            location: location.to_owned(),
            expected,
        });
    }

    let experiments: BTreeSet<&str> = found.iter().filter_map(|f| f.0.as_deref()).collect();
    let keep: Option<String> = match (experiment, experiments.len()) {
        (_, 0) => None,
        (Some(wanted), _) if experiments.contains(wanted) => Some(wanted.to_owned()),
        (Some(wanted), _) => {
            return Err(VectorError::UnknownExperiment {
                experiment: wanted.to_owned(),
                location: location.to_owned(),
                known: join(experiments),
            });
        }
        (None, 1) => None,
        (None, _) => {
            return Err(VectorError::SeveralExperiments {
                location: location.to_owned(),
                experiments: join(experiments),
            });
        }
    };
    Ok(found
        .into_iter()
        .filter(|f| keep.is_none() || f.0 == keep)
        .map(|(_, trait_name, method, layer, key)| Offer {
            location: origin.location_of(&key),
            trait_name,
            method: Some(method),
            layer: Some(layer),
            source_index,
            from_tree: true,
            origin: origin.clone(),
            key,
        })
        .collect())
}

/// Picks the offers to read (see [`VectorRequest`] for the rules).
fn choose<'a>(offers: &'a [Offer], request: &VectorRequest) -> Result<Vec<&'a Offer>, VectorError> {
    let mut by_trait: BTreeMap<&str, Vec<&Offer>> = BTreeMap::new();
    for offer in offers {
        by_trait.entry(&offer.trait_name).or_default().push(offer);
    }
    let named = !request.traits.is_empty();
    let wanted_traits: Vec<&str> = if named {
        let mut wanted: Vec<&str> = request.traits.iter().map(String::as_str).collect();
        wanted.sort_unstable();
        wanted.dedup();
        if let Some(unknown) = wanted.iter().find(|name| !by_trait.contains_key(*name)) {
            return Err(VectorError::UnknownTrait {
                trait_name: (*unknown).to_owned(),
                known: shorten_list(&by_trait.keys().map(|k| (*k).to_owned()).collect::<Vec<_>>()),
            });
        }
        wanted
    } else {
        by_trait.keys().copied().collect()
    };
    let mut chosen = Vec::new();
    for trait_name in wanted_traits {
        chosen.extend(choose_for_trait(
            trait_name,
            &by_trait[trait_name],
            request,
            named,
        )?);
    }
    Ok(chosen)
}

/// The offers of one trait to read: every single file whose layer is
/// wanted, and per tree and wanted layer the preferred method's vector.
fn choose_for_trait<'a>(
    trait_name: &str,
    offers: &[&'a Offer],
    request: &VectorRequest,
    named: bool,
) -> Result<Vec<&'a Offer>, VectorError> {
    let method = request.method.as_deref();
    let mut picked: Vec<&Offer> = offers
        .iter()
        .copied()
        .filter(|offer| !offer.from_tree)
        .filter(|offer| {
            request.layers.is_empty()
                || offer
                    .layer
                    .is_none_or(|layer| request.layers.contains(&layer))
        })
        .collect();
    let trees: BTreeSet<usize> = offers
        .iter()
        .filter(|offer| offer.from_tree)
        .map(|offer| offer.source_index)
        .collect();
    for tree in trees {
        let candidates: Vec<&Offer> = offers
            .iter()
            .copied()
            .filter(|offer| offer.from_tree && offer.source_index == tree)
            .filter(|offer| method.is_none() || offer.method.as_deref() == method)
            .collect();
        let layers: BTreeSet<usize> = if request.layers.is_empty() {
            candidates.iter().filter_map(|offer| offer.layer).collect()
        } else {
            request.layers.iter().copied().collect()
        };
        for layer in layers {
            let best = candidates
                .iter()
                .filter(|offer| offer.layer == Some(layer))
                .min_by(|a, b| method_rank(a).cmp(&method_rank(b)));
            picked.extend(best);
        }
    }

    let missing_layers: Vec<usize> = request
        .layers
        .iter()
        .copied()
        .filter(|&layer| {
            !picked
                .iter()
                .any(|offer| offer.layer.is_none_or(|l| l == layer))
        })
        .collect();
    match (missing_layers.first(), named) {
        (Some(&layer), true) => Err(VectorError::NoVector {
            trait_name: trait_name.to_owned(),
            wanted: format!("at layer {layer}"),
            available: describe_available(offers, method, Some(layer)),
        }),
        (None, true) if picked.is_empty() => Err(VectorError::NoVector {
            trait_name: trait_name.to_owned(),
            wanted: method.map_or_else(
                || "at any layer".to_owned(),
                |method| format!("with method {method}"),
            ),
            available: describe_available(offers, method, None),
        }),
        (Some(_), false) => {
            let missing: Vec<String> = missing_layers.iter().map(usize::to_string).collect();
            warn!(
                trait_name,
                layers = %missing.join(", "),
                method = method.unwrap_or("any"),
                "no trait vector at these layers; skipping them"
            );
            Ok(picked)
        }
        _ => Ok(picked),
    }
}

/// Sort key of a method: [`METHOD_PREFERENCE`] first, then by name.
fn method_rank(offer: &Offer) -> (usize, &str) {
    let method = offer.method.as_deref().unwrap_or_default();
    let rank = METHOD_PREFERENCE
        .iter()
        .position(|preferred| *preferred == method)
        .unwrap_or(METHOD_PREFERENCE.len());
    (rank, method)
}

/// What a trait has, for an error about what it lacks, e.g.
/// `layers available 10, 14, 16 (method probe)`.
fn describe_available(offers: &[&Offer], method: Option<&str>, layer: Option<usize>) -> String {
    let methods: BTreeSet<&str> = offers.iter().filter_map(|o| o.method.as_deref()).collect();
    let mut text = match method {
        Some(method) => {
            let layers: BTreeSet<usize> = offers
                .iter()
                .filter(|o| o.method.as_deref() == Some(method))
                .filter_map(|o| o.layer)
                .collect();
            if layers.is_empty() {
                format!(
                    "it has no vectors with method {method}; methods available {}",
                    join(methods.iter())
                )
            } else {
                format!("layers available {} (method {method})", join(layers))
            }
        }
        None => {
            let layers: BTreeSet<usize> = offers.iter().filter_map(|o| o.layer).collect();
            let noun = if methods.len() == 1 {
                "method"
            } else {
                "methods"
            };
            format!(
                "layers available {} ({noun} {})",
                join(layers),
                join(methods.iter())
            )
        }
    };
    if let (Some(method), Some(layer)) = (method, layer) {
        let others: BTreeSet<&str> = offers
            .iter()
            .filter(|o| o.layer == Some(layer) && o.method.as_deref() != Some(method))
            .filter_map(|o| o.method.as_deref())
            .collect();
        if !others.is_empty() {
            text.push_str(&format!(
                "; layer {layer} has methods {}",
                join(others.iter())
            ));
        }
    }
    if offers.iter().any(|o| !o.from_tree && o.layer.is_some()) {
        text.push_str("; a file named {method}_layer{L}.pt applies to layer L only");
    }
    text
}

/// Refuses two chosen vectors of one trait that apply to a common layer.
fn check_duplicates(chosen: &[&Offer]) -> Result<(), VectorError> {
    for (index, first) in chosen.iter().enumerate() {
        for second in &chosen[index + 1..] {
            let overlap = first.trait_name == second.trait_name
                && match (first.layer, second.layer) {
                    (Some(a), Some(b)) => a == b,
                    _ => true,
                };
            if overlap {
                let at = match (first.layer, second.layer) {
                    (Some(layer), _) | (None, Some(layer)) => format!("at layer {layer}"),
                    (None, None) => "at every layer".to_owned(),
                };
                return Err(VectorError::Duplicate {
                    trait_name: first.trait_name.clone(),
                    at,
                    first: first.location.clone(),
                    second: second.location.clone(),
                });
            }
        }
    }
    Ok(())
}

async fn read_offer(offer: &Offer) -> Result<TraitVector, VectorError> {
    let bytes = offer.origin.read(&offer.key).await?;
    let location = offer.location.clone();
    let values = tokio::task::spawn_blocking(move || decode_vector(&bytes, &location))
        .await
        .map_err(|source| VectorError::Task {
            operation: "decoding a trait vector",
            source,
        })??;
    Ok(TraitVector {
        trait_name: offer.trait_name.clone(),
        method: offer.method.clone(),
        layer: offer.layer,
        source: offer.location.clone(),
        values,
    })
}

/// Opens a store URL for reading; a local (`file://`) one must exist (the
/// store would otherwise create it).
async fn open_store(url: &str) -> Result<ArtifactStore, VectorError> {
    let parsed = StoreUrl::parse(url)?;
    if let StoreUrl::Local { root } = &parsed {
        match tokio::fs::metadata(root).await {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(VectorError::InvalidSource {
                    location: url.to_owned(),
                    reason: "not a directory".to_owned(),
                });
            }
            Err(source) => {
                return Err(VectorError::Io {
                    path: root.clone(),
                    source,
                });
            }
        }
    }
    Ok(ArtifactStore::open(parsed, &StoreOptions::default())?)
}

/// `scheme://...` marks a URL; anything else is a local path.
fn is_url(location: &str) -> bool {
    location.split_once("://").is_some_and(|(scheme, _)| {
        scheme
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    })
}

/// Files exactly `depth` parts below `root/folder`, as '/'-separated keys
/// relative to `root`; a missing folder holds nothing. Hidden entries and
/// names that are not UTF-8 are skipped; symbolic links are followed (the
/// depth bounds the walk).
fn walk_local(root: &Path, folder: &str, depth: usize) -> Result<Vec<String>, VectorError> {
    let mut keys = Vec::new();
    let start = if folder.is_empty() {
        root.to_owned()
    } else {
        root.join(folder)
    };
    walk_level(&start, folder, depth, &mut keys)?;
    keys.sort();
    Ok(keys)
}

fn walk_level(
    dir: &Path,
    prefix: &str,
    depth: usize,
    keys: &mut Vec<String>,
) -> Result<(), VectorError> {
    let io_error = |path: &Path| {
        let path = path.to_owned();
        move |source| VectorError::Io { path, source }
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotADirectory => return Ok(()),
        Err(err) => return Err(io_error(dir)(err)),
    };
    for entry in entries {
        let entry = entry.map_err(io_error(dir))?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        // Follows symbolic links; a dangling one is skipped.
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        let key = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        if depth == 1 {
            if meta.is_file() {
                keys.push(key);
            }
        } else if meta.is_dir() {
            walk_level(&path, &key, depth - 1, keys)?;
        }
    }
    Ok(())
}

fn join<T: ToString>(items: impl IntoIterator<Item = T>) -> String {
    let items: Vec<String> = items.into_iter().map(|item| item.to_string()).collect();
    if items.is_empty() {
        "none".to_owned()
    } else {
        items.join(", ")
    }
}

/// At most 20 items, then how many more.
fn shorten_list(items: &[String]) -> String {
    const SHOWN: usize = 20;
    if items.len() <= SHOWN {
        return join(items);
    }
    format!(
        "{}, and {} more",
        items[..SHOWN].join(", "),
        items.len() - SHOWN
    )
}

#[cfg(test)]
mod tests;
