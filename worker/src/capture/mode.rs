//! Capture modes and layer selections (`--mode`, `--layers`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::model::{CaptureRequest, LayerWants};

/// `--layers`: one layer, a comma-separated list, or `all`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum LayerSelection {
    All,
    List(Vec<usize>),
}

impl Default for LayerSelection {
    /// Layer 16, the reference's default monitoring layer.
    fn default() -> Self {
        LayerSelection::List(vec![16])
    }
}

impl FromStr for LayerSelection {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("all") {
            return Ok(LayerSelection::All);
        }
        let mut layers = Vec::new();
        for part in s.split(',') {
            let part = part.trim();
            let parsed = match part.split_once('-') {
                Some((a, b)) => match (a.trim().parse::<usize>(), b.trim().parse::<usize>()) {
                    (Ok(a), Ok(b)) if a <= b => (a..=b).collect(),
                    _ => Vec::new(),
                },
                None => part.parse::<usize>().map(|l| vec![l]).unwrap_or_default(),
            };
            if parsed.is_empty() {
                return Err(format!(
                    "invalid layer \"{part}\" in \"{s}\": use a layer number (16), a list (1,3), a range (0-5) or all"
                ));
            }
            layers.extend(parsed);
        }
        layers.sort_unstable();
        layers.dedup();
        Ok(LayerSelection::List(layers))
    }
}

impl fmt::Display for LayerSelection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LayerSelection::All => f.write_str("all"),
            LayerSelection::List(layers) => {
                let parts: Vec<String> = layers.iter().map(ToString::to_string).collect();
                f.write_str(&parts.join(","))
            }
        }
    }
}

impl From<LayerSelection> for String {
    fn from(s: LayerSelection) -> String {
        s.to_string()
    }
}

impl TryFrom<String> for LayerSelection {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl LayerSelection {
    /// The selected layers of a model with `num_layers` layers, checked.
    pub fn resolve(&self, num_layers: usize) -> Result<Vec<usize>, String> {
        match self {
            LayerSelection::All => Ok((0..num_layers).collect()),
            LayerSelection::List(layers) => {
                if let Some(bad) = layers.iter().find(|&&l| l >= num_layers) {
                    return Err(format!(
                        "layer {bad} is out of range: the model has {num_layers} layers (0-{})",
                        num_layers.saturating_sub(1)
                    ));
                }
                Ok(layers.clone())
            }
        }
    }
}

/// What a capture records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum CaptureMode {
    /// Three residuals per layer and head-averaged attention, every layer,
    /// one file per prompt.
    Residual,
    /// Every internal tensor of the given layers, one file per prompt and layer.
    Internals { layers: Vec<usize> },
}

impl CaptureMode {
    pub fn name(&self) -> &'static str {
        match self {
            CaptureMode::Residual => "residual",
            CaptureMode::Internals { .. } => "internals",
        }
    }

    /// The per-layer request for the model: only what this mode needs.
    pub fn request(&self, num_layers: usize) -> CaptureRequest {
        let mut layers = vec![LayerWants::default(); num_layers];
        match self {
            CaptureMode::Residual => {
                for wants in &mut layers {
                    wants.residual = true;
                    wants.attention_mean = true;
                }
            }
            CaptureMode::Internals { layers: chosen } => {
                for &l in chosen {
                    layers[l] = LayerWants {
                        residual: true,
                        attention_mean: false,
                        attention_heads: true,
                        projections: true,
                    };
                }
            }
        }
        CaptureRequest { layers }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_layer_selections() {
        assert_eq!("16".parse(), Ok(LayerSelection::List(vec![16])));
        assert_eq!("3,1,3".parse(), Ok(LayerSelection::List(vec![1, 3])));
        assert_eq!("0-2,5".parse(), Ok(LayerSelection::List(vec![0, 1, 2, 5])));
        assert_eq!("all".parse(), Ok(LayerSelection::All));
        assert!(
            "x".parse::<LayerSelection>()
                .unwrap_err()
                .contains("invalid layer \"x\"")
        );
        assert!("3-1".parse::<LayerSelection>().is_err());
    }

    #[test]
    fn out_of_range_layer_is_named() {
        let err = LayerSelection::List(vec![1, 26]).resolve(26).unwrap_err();
        assert_eq!(
            err,
            "layer 26 is out of range: the model has 26 layers (0-25)"
        );
        assert_eq!(LayerSelection::All.resolve(3).unwrap(), vec![0, 1, 2]);
    }

    #[test]
    fn residual_mode_requests_no_internals() {
        let r = CaptureMode::Residual.request(2);
        assert!(
            r.layers
                .iter()
                .all(|w| w.residual && w.attention_mean && !w.projections)
        );
        let r = CaptureMode::Internals { layers: vec![1] }.request(3);
        assert_eq!(r.layers[0], LayerWants::default());
        assert!(r.layers[1].projections && r.layers[1].attention_heads);
    }
}
