//! Flags of the client commands (`submit`, `status`, `runs`, `cancel`,
//! `retry`) and the small value types they parse into.

use std::path::PathBuf;
use std::str::FromStr;

use capture_proto::v1::RunState;
use capture_proto::{ClientConfig, RunId, Token};
use clap::{Args, ValueEnum};

/// How to reach a coordinator: shared by every client command.
#[derive(Debug, Clone, Default, Args)]
pub struct ConnectionArgs {
    /// The coordinator to talk to (one started with `coordinator serve`): http://host:port or
    /// https://host:port
    #[arg(long, env = "CAPTURE_COORDINATOR", value_name = "URL")]
    pub coordinator: Option<String>,
    /// Bearer token the coordinator expects (never printed)
    #[arg(long, env = "CAPTURE_TOKEN", value_name = "TOKEN", hide_env_values = true, value_parser = parse_token)]
    pub token: Option<Token>,
    /// PEM file of a certificate authority to trust for https:// URLs, besides the system's roots
    #[arg(long, env = "CAPTURE_TLS_CA", value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
}

impl ConnectionArgs {
    /// The connection settings for `url` (normally `self.coordinator`).
    pub fn client_config(&self, url: &str) -> ClientConfig {
        let mut config = ClientConfig::new(url.trim_end_matches('/'));
        config.token = self.token.clone();
        config.tls_ca = self.tls_ca.clone();
        config
    }
}

fn parse_token(text: &str) -> Result<Token, String> {
    Token::new(text).ok_or_else(|| "the token is blank".to_owned())
}

/// `--mode`: what each prompt's capture records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum ModeArg {
    /// Three residuals of every layer and head-averaged attention, one file per prompt
    #[default]
    Residual,
    /// q/k/v, per-head attention, MLP and residuals of --layers, one file per prompt and layer
    Internals,
    /// Both of the above, as separate jobs
    Both,
}

/// `--layers`: `all`, or layer numbers and ranges such as `0,5,12` or
/// `0-5,12`; kept ascending without duplicates, as the contract wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayersArg {
    All,
    List(Vec<u32>),
}

impl FromStr for LayersArg {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("all") {
            return Ok(LayersArg::All);
        }
        let bad = |part: &str| {
            format!(
                "invalid layer \"{part}\" in \"{text}\": use all, layer numbers (0,5,12) or ranges (0-5)"
            )
        };
        let mut layers = Vec::new();
        for part in text.split(',') {
            let part = part.trim();
            match part.split_once('-') {
                Some((first, last)) => {
                    let first = first.trim().parse::<u32>().map_err(|_| bad(part))?;
                    let last = last.trim().parse::<u32>().map_err(|_| bad(part))?;
                    if first > last {
                        return Err(bad(part));
                    }
                    layers.extend(first..=last);
                }
                None => layers.push(part.parse::<u32>().map_err(|_| bad(part))?),
            }
        }
        layers.sort_unstable();
        layers.dedup();
        Ok(LayersArg::List(layers))
    }
}

/// `--state` of `runs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RunStateArg {
    Pending,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl From<RunStateArg> for RunState {
    fn from(state: RunStateArg) -> RunState {
        match state {
            RunStateArg::Pending => RunState::Pending,
            RunStateArg::Running => RunState::Running,
            RunStateArg::Succeeded => RunState::Succeeded,
            RunStateArg::Failed => RunState::Failed,
            RunStateArg::Cancelled => RunState::Cancelled,
        }
    }
}

/// `--store-dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum StoreDtypeArg {
    #[default]
    F32,
    F16,
    Bf16,
}

/// Flags of `coordinator submit`. [`crate::client::run_spec`] turns them
/// into the wire [`RunSpec`](capture_proto::v1::RunSpec).
#[derive(Debug, Clone, Args)]
#[command(group(
    clap::ArgGroup::new("prompts")
        .required(true)
        .multiple(true)
        .args(["prompt_set", "prompt_file"])
))]
pub struct SubmitArgs {
    /// Built-in prompt set: adversarial, baseline, dynamic, multi_trait, real_world or single_trait
    /// (repeatable)
    #[arg(long, value_name = "NAME")]
    pub prompt_set: Vec<String>,
    /// Custom prompt file {"name","description","prompts":[{"id","text","note"}]}, read here and sent
    /// to the coordinator; its file stem names the set in artifact paths (repeatable)
    #[arg(long, value_name = "FILE")]
    pub prompt_file: Vec<PathBuf>,
    /// What to capture: residual, internals (per layer) or both
    #[arg(long, value_enum, default_value_t = ModeArg::Residual)]
    pub mode: ModeArg,
    /// Layers of internals captures: all, a list (0,5,12) or ranges (0-5) [default: all]
    #[arg(long, value_name = "LAYERS")]
    pub layers: Option<LayersArg>,
    /// Experiment name, the first path segment of the run's artifact root
    #[arg(long, default_value = "default", value_name = "NAME")]
    pub experiment: String,
    /// Hugging Face hub id, or a checkpoint directory (sent as its absolute path, which workers must
    /// see at the same place)
    #[arg(long, default_value = "google/gemma-2-2b-it", value_name = "SPEC")]
    pub model: String,
    /// Hub revision (branch, tag or commit) to pin; default: the default branch
    #[arg(long, value_name = "REV")]
    pub revision: Option<String>,
    /// Most response tokens per prompt
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_new_tokens: u32,
    /// Choose the most likely token at each step (the default when no --temperature is given)
    #[arg(long, conflicts_with_all = ["temperature", "top_p"])]
    pub greedy: bool,
    /// Sample with this temperature (needs --seed)
    #[arg(long, requires = "seed")]
    pub temperature: Option<f64>,
    /// Nucleus sampling: keep the smallest set of tokens with this much probability
    #[arg(long, requires = "temperature")]
    pub top_p: Option<f64>,
    /// Seed of the sampler; with the same model, prompt and parameters a run is reproducible
    #[arg(long)]
    pub seed: Option<u64>,
    /// Wrap each prompt in the model's chat template
    #[arg(long)]
    pub chat_template: bool,
    /// Storage dtype of the captured tensors
    #[arg(long, value_enum, default_value_t = StoreDtypeArg::F32)]
    pub store_dtype: StoreDtypeArg,
    /// Capture on the response tokens of an earlier capture (teacher forcing): a run id of this
    /// coordinator, or the root URL of a capture in the object store
    #[arg(long, value_name = "RUN_ID_OR_URL")]
    pub replay: Option<String>,
    /// Most prompts per job
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub shard_size: u32,
    /// Follow the run until it ends; exit 1 if a job is dead or the run is cancelled
    #[arg(long)]
    pub wait: bool,
    /// Print JSON instead of text, for scripts
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub embedded: crate::embedded::EmbeddedArgs,
    #[command(flatten)]
    pub connection: ConnectionArgs,
}

/// Flags of `coordinator status`.
#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// The run's id, as printed by `coordinator submit`
    #[arg(value_name = "RUN")]
    pub run: RunId,
    /// Also list every job: key, state, attempt, worker and last error
    #[arg(long)]
    pub jobs: bool,
    /// Print JSON instead of text, for scripts
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub connection: ConnectionArgs,
}

/// Flags of `coordinator runs`.
#[derive(Debug, Clone, Args)]
pub struct RunsArgs {
    /// Only runs of this experiment
    #[arg(long, value_name = "NAME")]
    pub experiment: Option<String>,
    /// Only runs in this state
    #[arg(long, value_enum)]
    pub state: Option<RunStateArg>,
    /// Most runs to show, newest first
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub limit: u32,
    /// Print JSON instead of text, for scripts
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub connection: ConnectionArgs,
}

/// Flags of `coordinator cancel` and `coordinator retry`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// The run's id, as printed by `coordinator submit`
    #[arg(value_name = "RUN")]
    pub run: RunId,
    /// Print JSON instead of text, for scripts
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub connection: ConnectionArgs,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_parse_lists_ranges_and_all() {
        assert_eq!("all".parse::<LayersArg>().unwrap(), LayersArg::All);
        assert_eq!(" ALL ".parse::<LayersArg>().unwrap(), LayersArg::All);
        assert_eq!(
            "12,0,5".parse::<LayersArg>().unwrap(),
            LayersArg::List(vec![0, 5, 12])
        );
        assert_eq!(
            "3-5, 4,1".parse::<LayersArg>().unwrap(),
            LayersArg::List(vec![1, 3, 4, 5])
        );
    }

    #[test]
    fn bad_layers_name_the_offending_part() {
        for (text, part) in [
            ("1,x", "x"),
            ("-1", "-1"),
            ("5-2", "5-2"),
            ("", ""),
            ("1,,2", ""),
            ("one", "one"),
        ] {
            let error = text.parse::<LayersArg>().unwrap_err();
            assert!(
                error.starts_with(&format!("invalid layer \"{part}\" in")),
                "{text}: {error}"
            );
            assert!(error.contains("0,5,12"), "{error}");
        }
    }

    #[test]
    fn blank_tokens_are_refused() {
        assert!(parse_token("  ").is_err());
        assert_eq!(parse_token(" abc ").unwrap().expose(), "abc");
    }

    #[test]
    fn client_config_trims_the_url_and_keeps_the_token() {
        let args = ConnectionArgs {
            coordinator: None,
            token: Token::new("secret"),
            tls_ca: Some(PathBuf::from("ca.pem")),
        };
        let config = args.client_config("http://127.0.0.1:50051/");
        assert_eq!(config.url, "http://127.0.0.1:50051");
        assert_eq!(config.token.unwrap().expose(), "secret");
        assert_eq!(config.tls_ca.unwrap(), PathBuf::from("ca.pem"));
    }
}
