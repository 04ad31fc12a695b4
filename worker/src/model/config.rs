//! Gemma-2 `config.json`, in both the hub's older style (`rope_theta`,
//! `sliding_window`, no `layer_types`) and the transformers 5 style
//! (`layer_types`, `rope_parameters`).

use serde::Deserialize;

/// Which attention a decoder layer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// Causal attention restricted to the last `sliding_window` keys.
    Sliding,
    /// Plain causal attention.
    Full,
}

impl LayerKind {
    /// Gemma-2's pattern: even-numbered layers slide, odd ones attend fully.
    pub fn alternating(num_layers: usize) -> Vec<LayerKind> {
        (0..num_layers)
            .map(|i| {
                if i % 2 == 0 {
                    LayerKind::Sliding
                } else {
                    LayerKind::Full
                }
            })
            .collect()
    }
}

/// The architecture parameters of a Gemma-2 checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Gemma2Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub query_pre_attn_scalar: f64,
    pub attn_logit_softcapping: Option<f64>,
    pub final_logit_softcapping: Option<f64>,
    pub sliding_window: usize,
    pub max_position_embeddings: usize,
    pub layer_kinds: Vec<LayerKind>,
    pub bos_token_id: u32,
    pub eos_token_ids: Vec<u32>,
}

/// One token id or a list of them, as `eos_token_id` may be either.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<u32> {
        match self {
            OneOrMany::One(id) => vec![id],
            OneOrMany::Many(ids) => ids,
        }
    }
}

#[derive(Debug, Deserialize)]
struct RopeParameters {
    rope_theta: Option<f64>,
    rope_type: Option<String>,
}

/// `config.json` as written by either transformers generation.
#[derive(Debug, Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_parameters: Option<RopeParameters>,
    query_pre_attn_scalar: Option<f64>,
    attn_logit_softcapping: Option<f64>,
    final_logit_softcapping: Option<f64>,
    sliding_window: Option<usize>,
    #[serde(default = "default_max_positions")]
    max_position_embeddings: usize,
    layer_types: Option<Vec<String>>,
    hidden_activation: Option<String>,
    hidden_act: Option<String>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
    tie_word_embeddings: Option<bool>,
}

fn default_eps() -> f64 {
    1e-6
}

fn default_max_positions() -> usize {
    8192
}

impl Gemma2Config {
    /// Parses `config.json`; `source` names the file in error messages.
    pub fn from_json(json: &str, source: &str) -> Result<Self, String> {
        let raw: RawConfig = serde_json::from_str(json)
            .map_err(|e| format!("cannot read model config {source}: {e}"))?;
        Self::from_raw(raw).map_err(|e| format!("unsupported model config {source}: {e}"))
    }

    fn from_raw(raw: RawConfig) -> Result<Self, String> {
        if let Some(model_type) = &raw.model_type
            && model_type != "gemma2"
        {
            return Err(format!(
                "model_type is \"{model_type}\", expected \"gemma2\" (only Gemma-2 checkpoints are supported)"
            ));
        }
        let activation = raw.hidden_activation.or(raw.hidden_act);
        if let Some(act) = &activation
            && act != "gelu_pytorch_tanh"
            && act != "gelu_tanh"
        {
            return Err(format!(
                "hidden activation \"{act}\" is not supported, expected gelu_pytorch_tanh"
            ));
        }
        if raw.tie_word_embeddings == Some(false) {
            return Err("untied word embeddings are not supported".into());
        }
        let rope_theta = match (&raw.rope_parameters, raw.rope_theta) {
            (Some(params), _) => {
                if let Some(kind) = &params.rope_type
                    && kind != "default"
                {
                    return Err(format!("rope_type \"{kind}\" is not supported"));
                }
                params.rope_theta.or(raw.rope_theta).unwrap_or(10_000.0)
            }
            (None, theta) => theta.unwrap_or(10_000.0),
        };
        let heads = raw.num_attention_heads;
        let kv_heads = raw.num_key_value_heads.unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(format!(
                "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            ));
        }
        let head_dim = raw.head_dim.unwrap_or(raw.hidden_size / heads);
        if !head_dim.is_multiple_of(2) {
            return Err(format!(
                "head_dim {head_dim} must be even for rotary embeddings"
            ));
        }
        let layer_kinds = match &raw.layer_types {
            Some(types) => {
                if types.len() != raw.num_hidden_layers {
                    return Err(format!(
                        "layer_types has {} entries for {} layers",
                        types.len(),
                        raw.num_hidden_layers
                    ));
                }
                types
                    .iter()
                    .map(|t| match t.as_str() {
                        "sliding_attention" => Ok(LayerKind::Sliding),
                        "full_attention" => Ok(LayerKind::Full),
                        other => Err(format!("unknown layer type \"{other}\"")),
                    })
                    .collect::<Result<Vec<_>, _>>()?
            }
            // transformers' rule for Gemma-2 configs without layer_types:
            // even-numbered layers slide.
            None => LayerKind::alternating(raw.num_hidden_layers),
        };
        let sliding_window = raw.sliding_window.unwrap_or(4096);
        if sliding_window == 0 {
            return Err("sliding_window must be positive".into());
        }
        Ok(Self {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta,
            query_pre_attn_scalar: raw.query_pre_attn_scalar.unwrap_or(head_dim as f64),
            attn_logit_softcapping: raw.attn_logit_softcapping,
            final_logit_softcapping: raw.final_logit_softcapping,
            sliding_window,
            max_position_embeddings: raw.max_position_embeddings,
            layer_kinds,
            bos_token_id: raw.bos_token_id.unwrap_or(2),
            eos_token_ids: raw
                .eos_token_id
                .map(OneOrMany::into_vec)
                .unwrap_or_default(),
        })
    }

    /// The dimensions of the released gemma-2-2b model (for benchmarks).
    pub fn gemma2_2b() -> Self {
        Self {
            vocab_size: 256_000,
            hidden_size: 2304,
            intermediate_size: 9216,
            num_hidden_layers: 26,
            num_attention_heads: 8,
            num_key_value_heads: 4,
            head_dim: 256,
            rms_norm_eps: 1e-6,
            rope_theta: 10_000.0,
            query_pre_attn_scalar: 256.0,
            attn_logit_softcapping: Some(50.0),
            final_logit_softcapping: Some(30.0),
            sliding_window: 4096,
            max_position_embeddings: 8192,
            layer_kinds: LayerKind::alternating(26),
            bos_token_id: 2,
            eos_token_ids: vec![1, 107],
        }
    }

    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }
}

/// `generation_config.json`: only the end tokens matter here.
#[derive(Debug, Deserialize)]
struct RawGenerationConfig {
    eos_token_id: Option<OneOrMany>,
}

/// Reads the end-of-sequence ids from `generation_config.json`.
pub fn eos_ids_from_generation_config(json: &str, source: &str) -> Result<Vec<u32>, String> {
    let raw: RawGenerationConfig = serde_json::from_str(json)
        .map_err(|e| format!("cannot read generation config {source}: {e}"))?;
    Ok(raw
        .eos_token_id
        .map(OneOrMany::into_vec)
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HUB_STYLE: &str = r#"{
      "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2",
      "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
      "bos_token_id": 2, "eos_token_id": [1, 107], "head_dim": 256,
      "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
      "hidden_size": 2304, "intermediate_size": 9216, "max_position_embeddings": 8192,
      "num_attention_heads": 8, "num_hidden_layers": 26, "num_key_value_heads": 4,
      "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
      "sliding_window": 4096, "vocab_size": 256000, "cache_implementation": "hybrid"
    }"#;

    #[test]
    fn hub_style_config_matches_gemma2_2b() {
        let cfg = Gemma2Config::from_json(HUB_STYLE, "config.json").unwrap();
        assert_eq!(cfg, Gemma2Config::gemma2_2b());
    }

    #[test]
    fn v5_style_layer_types_and_rope_parameters() {
        let json = r#"{"model_type":"gemma2","vocab_size":10,"hidden_size":64,
          "intermediate_size":128,"num_hidden_layers":3,"num_attention_heads":8,
          "num_key_value_heads":4,"head_dim":16,"query_pre_attn_scalar":24,
          "layer_types":["full_attention","sliding_attention","full_attention"],
          "rope_parameters":{"rope_theta":500.0,"rope_type":"default"},"sliding_window":8}"#;
        let cfg = Gemma2Config::from_json(json, "c").unwrap();
        assert_eq!(
            cfg.layer_kinds,
            vec![LayerKind::Full, LayerKind::Sliding, LayerKind::Full]
        );
        assert_eq!(cfg.rope_theta, 500.0);
        assert_eq!(cfg.query_pre_attn_scalar, 24.0);
        assert_eq!(cfg.attn_logit_softcapping, None);
    }

    #[test]
    fn rejects_other_architectures_with_a_clear_message() {
        let json = HUB_STYLE.replace("\"gemma2\"", "\"llama\"");
        let err = Gemma2Config::from_json(&json, "x/config.json").unwrap_err();
        assert!(
            err.contains("x/config.json") && err.contains("llama"),
            "{err}"
        );
    }

    #[test]
    fn generation_config_eos_forms() {
        assert_eq!(
            eos_ids_from_generation_config(r#"{"eos_token_id":[1,107]}"#, "g").unwrap(),
            vec![1, 107]
        );
        assert_eq!(
            eos_ids_from_generation_config(r#"{"eos_token_id":1}"#, "g").unwrap(),
            vec![1]
        );
    }
}
