//! Flags of `coordinator query ...`.

use std::ops::Range;
use std::path::PathBuf;

use chrono::{DateTime, NaiveDate, Utc};
use clap::{Args, Subcommand, ValueEnum};

use crate::client::{ConnectionArgs, RunStateArg};

/// `coordinator query <what>`.
#[derive(Debug, Subcommand)]
pub enum QueryCommand {
    /// List runs matching filters (experiment, prompt set, mode, model, dates), newest first.
    ///
    /// Example:
    ///
    ///   coordinator query runs --experiment exp1 --prompt-set dynamic --since 2026-11-01
    Runs(RunsQueryArgs),
    /// List artifacts of one run, or of every run matching filters.
    ///
    /// Each row has the run, its object URL, prompt set and id, mode, layer,
    /// size, sha256 and token counts. Examples:
    ///
    ///   coordinator query artifacts --run 0190f5c2-... --prompt-set dynamic
    ///
    ///   coordinator query artifacts --experiment exp1 --mode internals --layer 16 --format csv
    Artifacts(ArtifactsQueryArgs),
    /// Project a run's residual stream onto trait vectors, per token, layer and sublayer.
    ///
    /// The score of a token is (act . v) / |v|, shaped [tokens, layers, 3]
    /// (residual_in, after_attn, residual_out) for the prompt and the
    /// response. Vectors are `.pt` files saved with torch.save(tensor)
    /// (f32, f16 or bf16), local or at a store URL, or whole trees in the
    /// layout experiments/{exp}/extraction/{category}/{trait}/vectors/{method}_layer{L}.pt
    /// (the vector of each requested layer is picked; method preference
    /// probe, mean_diff, ica, gradient unless --method is given). Only the
    /// needed tensors are read from the store (ranged reads); the bytes read
    /// are reported on stderr. Examples:
    ///
    ///   coordinator query project RUN --vector experiments/my_exp --trait behavior/refusal --layers 12,16
    ///
    ///   coordinator query project RUN --vector s3://bucket/vectors/probe_layer16.pt --format csv --output scores.csv
    ///
    ///   coordinator query project RUN --vector refusal.pt --plot refusal.png
    Project(ProjectArgs),
    /// Per-token dynamics of the response score: velocity, acceleration, commitment, peak, persistence.
    ///
    /// For each trait and prompt, on the response's scores s[t] at one layer
    /// and sublayer: velocity v[t] = s[t+1] - s[t]; acceleration
    /// a[t] = v[t+1] - v[t]; commitment token = t + 2 for the first t with
    /// |a[t]| < --threshold (default 0.1); peak velocity = the v[t] of
    /// largest magnitude; mean |velocity|; peak score = the s[p] of largest
    /// magnitude; persistence = tokens after p with |s| > |s[p]| / 2. The
    /// layer is --layer, else the trait's only vector layer, else the
    /// model's middle layer (16 of 26). Example:
    ///
    ///   coordinator query dynamics RUN --vector experiments/my_exp --trait behavior/refusal --plot refusal-dynamics.png
    Dynamics(DynamicsArgs),
    /// Compare two or more runs on the same prompts (e.g. two model variants, or a replay).
    ///
    /// Per prompt and trait: per-token differences run - baseline (the
    /// first run), and a per-layer summary over every token: mean
    /// difference and Cohen's d (pooled standard deviation). Example:
    ///
    ///   coordinator query compare BASELINE_RUN VARIANT_RUN --vector experiments/my_exp --layers 16 --format csv
    Compare(CompareArgs),
    /// Read one tensor (or a token range of it) from one artifact, as .npy or JSON.
    ///
    /// Residual files: --tensor residual_in | after_attn | residual_out with
    /// --layer, or attention with --layer; internals files: a dotted path
    /// below the phase such as mlp.gelu, attention.attn_weights,
    /// residual.output (per-token lists are stacked when their shapes
    /// agree). Examples:
    ///
    ///   coordinator query tensor RUN --prompt-set dynamic --prompt-id 1 --phase response --layer 16 --tensor residual_out --tokens 0:10 --output r.npy
    ///
    ///   coordinator query tensor RUN --key inference/raw/internals/dynamic/1_L16.pt --phase prompt --tensor mlp.gelu --format json
    Tensor(TensorArgs),
}

/// Where queries go: a coordinator, or the local embedded state.
#[derive(Debug, Clone, Args)]
pub struct QueryConnection {
    #[command(flatten)]
    pub connection: ConnectionArgs,
    #[command(flatten)]
    pub local: crate::embedded::LocalStateArgs,
}

/// Output format of tables and results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum FormatArg {
    /// One JSON document
    #[default]
    Json,
    /// Comma-separated values with a header row
    Csv,
}

/// Output flags shared by the commands.
#[derive(Debug, Clone, Args)]
pub struct OutputArgs {
    /// Output format
    #[arg(long, value_enum, default_value_t = FormatArg::Json)]
    pub format: FormatArg,
    /// Write the result to this file instead of stdout
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// Filters on runs.
#[derive(Debug, Clone, Args)]
pub struct RunFilterArgs {
    /// Only runs of this experiment
    #[arg(long)]
    pub experiment: Option<String>,
    /// Only runs that captured this prompt set
    #[arg(long)]
    pub prompt_set: Option<String>,
    /// Only runs with this capture mode
    #[arg(long, value_enum)]
    pub mode: Option<ModeFilter>,
    /// Only runs of this model id (e.g. google/gemma-2-2b-it)
    #[arg(long)]
    pub model: Option<String>,
    /// Only runs of this model revision
    #[arg(long)]
    pub revision: Option<String>,
    /// Only runs created at or after this date or time (2026-11-01 or RFC 3339)
    #[arg(long, value_parser = parse_time)]
    pub since: Option<DateTime<Utc>>,
    /// Only runs created before this date or time (2026-11-30 or RFC 3339)
    #[arg(long, value_parser = parse_time)]
    pub until: Option<DateTime<Utc>>,
    /// Only runs in this state
    #[arg(long, value_enum)]
    pub state: Option<RunStateArg>,
    /// Most runs
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub limit: u32,
}

/// A capture mode filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeFilter {
    Residual,
    Internals,
}

#[derive(Debug, Clone, Args)]
pub struct RunsQueryArgs {
    #[command(flatten)]
    pub filter: RunFilterArgs,
    #[command(flatten)]
    pub output: OutputArgs,
    #[command(flatten)]
    pub connection: QueryConnection,
}

#[derive(Debug, Clone, Args)]
pub struct ArtifactsQueryArgs {
    /// Only this run's artifacts (the run filters are then ignored)
    #[arg(long)]
    pub run: Option<String>,
    #[command(flatten)]
    pub filter: RunFilterArgs,
    /// Only artifacts of this prompt id
    #[arg(long)]
    pub prompt_id: Option<String>,
    /// Only internals artifacts of this layer
    #[arg(long)]
    pub layer: Option<u32>,
    /// Most artifacts
    #[arg(long = "max-artifacts", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_artifacts: u32,
    #[command(flatten)]
    pub output: OutputArgs,
    #[command(flatten)]
    pub connection: QueryConnection,
}

/// Trait vectors and the prompts to project.
#[derive(Debug, Clone, Args)]
pub struct VectorArgs {
    /// A trait vector: a .pt file, a directory tree, or a store URL (s3://, gs://, az://, file://) of either; repeatable
    #[arg(long = "vector", value_name = "PATH|URL", required = true)]
    pub vectors: Vec<String>,
    /// Only these traits of the trees (category/trait); repeatable [default: every trait]
    #[arg(long = "trait", value_name = "NAME")]
    pub traits: Vec<String>,
    /// Extraction method to take from trees [default: probe, then mean_diff, ica, gradient]
    #[arg(long)]
    pub method: Option<String>,
    /// The experiment to read in a tree holding several (experiments/{exp}/...)
    #[arg(long, value_name = "EXP")]
    pub vector_experiment: Option<String>,
    /// Use single files at every layer even when named {method}_layer{L}.pt
    #[arg(long)]
    pub every_layer: bool,
    /// Only these prompt sets of the run; repeatable [default: all]
    #[arg(long = "prompt-set", value_name = "SET")]
    pub prompt_sets: Vec<String>,
    /// Only these prompt ids; repeatable [default: all]
    #[arg(long = "prompt-id", value_name = "ID")]
    pub prompt_ids: Vec<String>,
}

#[derive(Debug, Clone, Args)]
pub struct ProjectArgs {
    /// The run to project
    pub run: String,
    #[command(flatten)]
    pub vectors: VectorArgs,
    /// Layers to project, e.g. 12,16 [default: the layers the vectors are for, or all]
    #[arg(long, value_delimiter = ',')]
    pub layers: Vec<u32>,
    #[command(flatten)]
    pub output: OutputArgs,
    #[command(flatten)]
    pub plot: PlotArgs,
    #[command(flatten)]
    pub connection: QueryConnection,
}

/// `--plot` and what it shows.
#[derive(Debug, Clone, Args)]
pub struct PlotArgs {
    /// Write PNG plots of one prompt and trait: FILE (token x layer heatmap) and FILE with -response before .png (score over the response)
    #[arg(long, value_name = "FILE.png")]
    pub plot: Option<PathBuf>,
    /// The prompt to plot, as set/id [default: the first]
    #[arg(long, value_name = "SET/ID")]
    pub plot_prompt: Option<String>,
    /// The trait to plot [default: the first]
    #[arg(long, value_name = "NAME")]
    pub plot_trait: Option<String>,
    /// The sublayer to plot
    #[arg(long, value_enum, default_value_t = SublayerArg::ResidualOut)]
    pub plot_sublayer: SublayerArg,
}

/// A residual-stream point of a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum SublayerArg {
    /// The layer's input
    #[value(name = "residual_in", alias = "residual-in")]
    ResidualIn,
    /// After the attention block's residual add
    #[value(name = "after_attn", alias = "after-attn")]
    AfterAttn,
    /// The layer's output
    #[default]
    #[value(name = "residual_out", alias = "residual-out")]
    ResidualOut,
}

#[derive(Debug, Clone, Args)]
pub struct DynamicsArgs {
    /// The run to analyse
    pub run: String,
    #[command(flatten)]
    pub vectors: VectorArgs,
    /// The layer whose response scores are analysed [default: the trait's vector layer, else the middle layer]
    #[arg(long)]
    pub layer: Option<u32>,
    /// The sublayer whose scores are analysed
    #[arg(long, value_enum, default_value_t = SublayerArg::ResidualOut)]
    pub sublayer: SublayerArg,
    /// |acceleration| below this marks the commitment token
    #[arg(long, default_value_t = 0.1)]
    pub threshold: f64,
    #[command(flatten)]
    pub output: OutputArgs,
    /// Write a PNG line plot of the score over the response (one prompt, every trait, commitment marked)
    #[arg(long, value_name = "FILE.png")]
    pub plot: Option<PathBuf>,
    /// The prompt to plot, as set/id [default: the first]
    #[arg(long, value_name = "SET/ID")]
    pub plot_prompt: Option<String>,
    #[command(flatten)]
    pub connection: QueryConnection,
}

#[derive(Debug, Clone, Args)]
pub struct CompareArgs {
    /// Two or more runs; the first is the baseline
    #[arg(required = true, num_args = 2..)]
    pub runs: Vec<String>,
    #[command(flatten)]
    pub vectors: VectorArgs,
    /// Layers to compare, e.g. 16 [default: the layers the vectors are for, or all]
    #[arg(long, value_delimiter = ',')]
    pub layers: Vec<u32>,
    #[command(flatten)]
    pub output: OutputArgs,
    /// Write a PNG heatmap of the response differences (one prompt and trait, second run minus baseline)
    #[arg(long, value_name = "FILE.png")]
    pub plot: Option<PathBuf>,
    /// The prompt to plot, as set/id [default: the first]
    #[arg(long, value_name = "SET/ID")]
    pub plot_prompt: Option<String>,
    #[command(flatten)]
    pub connection: QueryConnection,
}

/// The tensor file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TensorFormat {
    /// NumPy .npy (float32)
    Npy,
    /// JSON with shape and nested values
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct TensorArgs {
    /// The run
    pub run: String,
    /// The artifact's key below the run root (instead of --prompt-set/--prompt-id)
    #[arg(long)]
    pub key: Option<String>,
    /// The artifact's prompt set
    #[arg(long, conflicts_with = "key")]
    pub prompt_set: Option<String>,
    /// The artifact's prompt id
    #[arg(long, conflicts_with = "key")]
    pub prompt_id: Option<String>,
    /// The artifact's capture mode
    #[arg(long, value_enum, default_value_t = ModeFilter::Residual)]
    pub mode: ModeFilter,
    /// prompt or response
    #[arg(long, value_enum)]
    pub phase: PhaseArg,
    /// Residual files: the layer; internals files: the file's layer
    #[arg(long)]
    pub layer: Option<u32>,
    /// residual_in, after_attn, residual_out, attention, or a dotted path such as mlp.gelu
    #[arg(long, default_value = "residual_out")]
    pub tensor: String,
    /// Token range START:END (end exclusive; either may be left out)
    #[arg(long, value_parser = parse_token_range, value_name = "START:END")]
    pub tokens: Option<TokenRange>,
    /// File format [default: from --output's extension, else json]
    #[arg(long, value_enum)]
    pub format: Option<TensorFormat>,
    /// Write the tensor here instead of stdout (.npy needs a file)
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
    #[command(flatten)]
    pub connection: QueryConnection,
}

/// prompt or response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PhaseArg {
    Prompt,
    Response,
}

/// A token range with open ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenRange {
    pub start: Option<u32>,
    pub end: Option<u32>,
}

impl TokenRange {
    /// The range with ends filled in (`available` for an open end).
    pub fn resolve(self, available: u32) -> Range<u32> {
        self.start.unwrap_or(0)..self.end.unwrap_or(available)
    }
}

fn parse_token_range(text: &str) -> Result<TokenRange, String> {
    let (start, end) = text
        .split_once(':')
        .ok_or_else(|| format!("{text:?}: write START:END, e.g. 0:10, 5: or :8"))?;
    let bound = |part: &str| -> Result<Option<u32>, String> {
        let part = part.trim();
        if part.is_empty() {
            Ok(None)
        } else {
            part.parse::<u32>()
                .map(Some)
                .map_err(|_| format!("{part:?} is not a token index"))
        }
    };
    let range = TokenRange {
        start: bound(start)?,
        end: bound(end)?,
    };
    if let (Some(start), Some(end)) = (range.start, range.end)
        && start > end
    {
        return Err(format!("the range {start}:{end} ends before it starts"));
    }
    Ok(range)
}

fn parse_time(text: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(time) = DateTime::parse_from_rfc3339(text) {
        return Ok(time.with_timezone(&Utc));
    }
    NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .map(|date| date.and_hms_opt(0, 0, 0).expect("midnight").and_utc())
        .map_err(|_| {
            format!(
                "{text:?}: write a date (2026-11-01) or an RFC 3339 time (2026-11-01T12:00:00Z)"
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_ranges_parse_with_open_ends() {
        assert_eq!(
            parse_token_range("2:5").unwrap(),
            TokenRange {
                start: Some(2),
                end: Some(5)
            }
        );
        assert_eq!(parse_token_range(":5").unwrap().resolve(9), 0..5);
        assert_eq!(parse_token_range("3:").unwrap().resolve(9), 3..9);
        assert!(
            parse_token_range("5:2")
                .unwrap_err()
                .contains("ends before")
        );
        assert!(parse_token_range("5").unwrap_err().contains("START:END"));
        assert!(
            parse_token_range("a:2")
                .unwrap_err()
                .contains("not a token index")
        );
    }

    #[test]
    fn times_parse_as_dates_or_rfc3339() {
        assert_eq!(
            parse_time("2026-11-01").unwrap().to_rfc3339(),
            "2026-11-01T00:00:00+00:00"
        );
        assert_eq!(
            parse_time("2026-11-01T12:30:00+01:00")
                .unwrap()
                .to_rfc3339(),
            "2026-11-01T11:30:00+00:00"
        );
        assert!(parse_time("yesterday").unwrap_err().contains("RFC 3339"));
    }

    #[test]
    fn sublayers_parse_under_their_artifact_names() {
        for (text, sublayer) in [
            ("residual_in", SublayerArg::ResidualIn),
            ("after_attn", SublayerArg::AfterAttn),
            ("residual_out", SublayerArg::ResidualOut),
            ("after-attn", SublayerArg::AfterAttn),
        ] {
            assert_eq!(SublayerArg::from_str(text, false).unwrap(), sublayer);
        }
    }
}
