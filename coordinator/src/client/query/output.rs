//! What `coordinator query` writes: JSON views, CSV tables, `.npy` files,
//! and the one-line read report.

use std::io::Write;
use std::path::Path;

use anyhow::Context as _;
use capture_proto::v1 as pb;
use serde::Serialize;

/// Scores of one phase as nested arrays `[tokens][layers][3]`, the shape
/// `numpy.array(...)` turns into a `[tokens, layers, 3]` array.
pub fn nest(values: &[f32], layers: usize) -> Vec<Vec<[f32; 3]>> {
    if layers == 0 {
        return Vec::new();
    }
    values
        .chunks(layers * 3)
        .map(|token| {
            token
                .chunks(3)
                .map(|s| [s[0], s[1], s.get(2).copied().unwrap_or(0.0)])
                .collect()
        })
        .collect()
}

/// One trait's scores of one prompt.
#[derive(Debug, Serialize)]
pub struct TraitScoresView {
    #[serde(rename = "trait")]
    pub trait_name: String,
    pub layers: Vec<u32>,
    /// `[prompt tokens][layers][residual_in, after_attn, residual_out]`.
    pub prompt: Vec<Vec<[f32; 3]>>,
    pub response: Vec<Vec<[f32; 3]>>,
}

/// One prompt's projections.
#[derive(Debug, Serialize)]
pub struct PromptProjectionView {
    pub prompt_set: String,
    pub prompt_id: String,
    pub artifact_key: String,
    pub prompt_tokens: Vec<String>,
    pub response_tokens: Vec<String>,
    pub traits: Vec<TraitScoresView>,
    pub bytes_read: u64,
    pub file_bytes: u64,
}

impl From<&pb::PromptProjection> for PromptProjectionView {
    fn from(p: &pb::PromptProjection) -> Self {
        Self {
            prompt_set: p.prompt_set.clone(),
            prompt_id: p.prompt_id.clone(),
            artifact_key: p.artifact_key.clone(),
            prompt_tokens: p.prompt_tokens.clone(),
            response_tokens: p.response_tokens.clone(),
            traits: p
                .traits
                .iter()
                .map(|t| TraitScoresView {
                    trait_name: t.trait_name.clone(),
                    layers: t.layers.clone(),
                    prompt: nest(&t.prompt, t.layers.len()),
                    response: nest(&t.response, t.layers.len()),
                })
                .collect(),
            bytes_read: p.bytes_read,
            file_bytes: p.file_bytes,
        }
    }
}

/// Bytes read versus the artifacts' size.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ReadView {
    pub artifacts: u32,
    pub bytes_read: u64,
    pub file_bytes: u64,
    pub requests: u64,
}

impl From<&pb::ReadStats> for ReadView {
    fn from(s: &pb::ReadStats) -> Self {
        Self {
            artifacts: s.artifacts,
            bytes_read: s.bytes_read,
            file_bytes: s.file_bytes,
            requests: s.requests,
        }
    }
}

impl ReadView {
    /// `read 1.2 MiB of 45.3 MiB (2.6%) in 58 requests from 8 artifacts`.
    pub fn to_text(&self) -> String {
        let share = if self.file_bytes == 0 {
            0.0
        } else {
            100.0 * self.bytes_read as f64 / self.file_bytes as f64
        };
        format!(
            "read {} of {} ({share:.1}%) in {} requests from {} artifacts",
            human_bytes(self.bytes_read),
            human_bytes(self.file_bytes),
            self.requests,
            self.artifacts
        )
    }
}

pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `coordinator query project` as JSON.
#[derive(Debug, Serialize)]
pub struct ProjectView {
    pub run_id: String,
    pub prompts: Vec<PromptProjectionView>,
    pub read: ReadView,
}

/// One trait's dynamics on one prompt.
#[derive(Debug, Serialize)]
pub struct TraitDynamicsView {
    #[serde(rename = "trait")]
    pub trait_name: String,
    pub layer: u32,
    pub sublayer: &'static str,
    pub scores: Vec<f32>,
    pub velocity: Vec<f32>,
    pub acceleration: Vec<f32>,
    pub commitment_token: Option<u32>,
    pub peak_velocity: f64,
    pub peak_velocity_index: u32,
    pub mean_abs_velocity: f64,
    pub peak_score: f64,
    pub peak_score_token: u32,
    pub persistence: u32,
}

pub fn sublayer_name(value: i32) -> &'static str {
    match pb::Sublayer::try_from(value).unwrap_or(pb::Sublayer::Unspecified) {
        pb::Sublayer::ResidualIn => "residual_in",
        pb::Sublayer::AfterAttn => "after_attn",
        pb::Sublayer::ResidualOut | pb::Sublayer::Unspecified => "residual_out",
    }
}

pub fn phase_name(value: i32) -> &'static str {
    match pb::Phase::try_from(value).unwrap_or(pb::Phase::Unspecified) {
        pb::Phase::Prompt => "prompt",
        pb::Phase::Response | pb::Phase::Unspecified => "response",
    }
}

impl From<&pb::TraitDynamics> for TraitDynamicsView {
    fn from(d: &pb::TraitDynamics) -> Self {
        Self {
            trait_name: d.trait_name.clone(),
            layer: d.layer,
            sublayer: sublayer_name(d.sublayer),
            scores: d.scores.clone(),
            velocity: d.velocity.clone(),
            acceleration: d.acceleration.clone(),
            commitment_token: d.commitment_token,
            peak_velocity: d.peak_velocity,
            peak_velocity_index: d.peak_velocity_index,
            mean_abs_velocity: d.mean_abs_velocity,
            peak_score: d.peak_score,
            peak_score_token: d.peak_score_token,
            persistence: d.persistence,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct PromptDynamicsView {
    pub prompt_set: String,
    pub prompt_id: String,
    pub artifact_key: String,
    pub response_tokens: Vec<String>,
    pub traits: Vec<TraitDynamicsView>,
}

impl From<&pb::PromptDynamics> for PromptDynamicsView {
    fn from(p: &pb::PromptDynamics) -> Self {
        Self {
            prompt_set: p.prompt_set.clone(),
            prompt_id: p.prompt_id.clone(),
            artifact_key: p.artifact_key.clone(),
            response_tokens: p.response_tokens.clone(),
            traits: p.traits.iter().map(Into::into).collect(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct DynamicsView {
    pub run_id: String,
    pub threshold: f64,
    pub prompts: Vec<PromptDynamicsView>,
    pub read: ReadView,
}

#[derive(Debug, Serialize)]
pub struct PromptComparisonView {
    pub prompt_set: String,
    pub prompt_id: String,
    pub baseline_run_id: String,
    pub run_id: String,
    #[serde(rename = "trait")]
    pub trait_name: String,
    pub layers: Vec<u32>,
    /// `[tokens][layers][3]`: run - baseline.
    pub prompt_diff: Vec<Vec<[f32; 3]>>,
    pub response_diff: Vec<Vec<[f32; 3]>>,
    pub lengths_differ: bool,
    pub same_tokens: bool,
}

impl From<&pb::PromptComparison> for PromptComparisonView {
    fn from(c: &pb::PromptComparison) -> Self {
        Self {
            prompt_set: c.prompt_set.clone(),
            prompt_id: c.prompt_id.clone(),
            baseline_run_id: c.baseline_run_id.clone(),
            run_id: c.run_id.clone(),
            trait_name: c.trait_name.clone(),
            layers: c.layers.clone(),
            prompt_diff: nest(&c.prompt_diff, c.layers.len()),
            response_diff: nest(&c.response_diff, c.layers.len()),
            lengths_differ: c.lengths_differ,
            same_tokens: c.same_tokens,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct LayerComparisonView {
    pub run_id: String,
    #[serde(rename = "trait")]
    pub trait_name: String,
    pub layer: u32,
    pub sublayer: &'static str,
    pub phase: &'static str,
    pub mean_difference: f64,
    pub cohens_d: Option<f64>,
    pub baseline_tokens: u64,
    pub tokens: u64,
}

impl From<&pb::LayerComparison> for LayerComparisonView {
    fn from(l: &pb::LayerComparison) -> Self {
        Self {
            run_id: l.run_id.clone(),
            trait_name: l.trait_name.clone(),
            layer: l.layer,
            sublayer: sublayer_name(l.sublayer),
            phase: phase_name(l.phase),
            mean_difference: l.mean_difference,
            cohens_d: l.cohens_d,
            baseline_tokens: l.baseline_tokens,
            tokens: l.tokens,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct CompareView {
    pub baseline_run_id: String,
    pub run_ids: Vec<String>,
    pub prompts: Vec<PromptComparisonView>,
    pub summary: Vec<LayerComparisonView>,
    pub unmatched: Vec<String>,
    pub read: ReadView,
}

/// A CSV table: a header and rows, quoted where needed.
#[derive(Debug, Default)]
pub struct Csv {
    text: String,
}

impl Csv {
    pub fn new(header: &[&str]) -> Self {
        let mut csv = Self::default();
        csv.row(header.iter().map(|h| (*h).to_owned()));
        csv
    }

    pub fn row(&mut self, fields: impl IntoIterator<Item = String>) {
        let line: Vec<String> = fields.into_iter().map(|f| quote(&f)).collect();
        self.text.push_str(&line.join(","));
        self.text.push('\n');
    }

    pub fn into_string(self) -> String {
        self.text
    }
}

fn quote(field: &str) -> String {
    if field.contains([',', '"', '\n', '\r']) || field.starts_with(' ') || field.ends_with(' ') {
        format!("\"{}\"", field.replace('"', "\"\""))
    } else {
        field.to_owned()
    }
}

/// Writes `text` to `output`, or stdout.
pub fn emit(output: Option<&Path>, text: &str) -> anyhow::Result<()> {
    match output {
        Some(path) => write_atomic(path, text.as_bytes()),
        None => {
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(text.as_bytes())?;
            if !text.ends_with('\n') {
                stdout.write_all(b"\n")?;
            }
            Ok(())
        }
    }
}

/// Writes a file through a temporary sibling and a rename, so a failed
/// write never leaves half a file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let mut temp = tempfile::NamedTempFile::new_in(parent)
        .with_context(|| format!("cannot write {}", path.display()))?;
    temp.write_all(bytes)
        .with_context(|| format!("cannot write {}", path.display()))?;
    temp.persist(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// A little-endian float32 `.npy` file (format version 1.0).
pub fn npy_bytes(shape: &[u64], values: &[f32]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(u64::to_string).collect();
    let shape_text = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_text}, }}");
    // magic (6) + version (2) + header length (2) + header, padded with
    // spaces to a multiple of 64 and ended by a newline.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut bytes = Vec::with_capacity(10 + header.len() + values.len() * 4);
    bytes.extend_from_slice(b"\x93NUMPY\x01\x00");
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for value in values {
        bytes.extend_from_slice(&value.to_le_bytes());
    }
    bytes
}

/// A tensor as JSON: `{"shape": [...], "values": nested}`.
pub fn tensor_json(answer: &pb::ReadTensorResponse) -> serde_json::Value {
    fn nested(shape: &[u64], values: &[f32]) -> serde_json::Value {
        match shape {
            [] => values
                .first()
                .map_or(serde_json::Value::Null, |v| serde_json::json!(v)),
            [_] => serde_json::json!(values),
            [first, rest @ ..] => {
                let stride: usize = rest.iter().map(|&d| d as usize).product();
                let items: Vec<serde_json::Value> = (0..*first as usize)
                    .map(|i| nested(rest, &values[i * stride..(i + 1) * stride]))
                    .collect();
                serde_json::Value::Array(items)
            }
        }
    }
    serde_json::json!({
        "artifact_key": answer.artifact_key,
        "path": answer.path,
        "dtype": answer.dtype,
        "shape": answer.shape,
        "values": nested(&answer.shape, &answer.values),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_headers_are_aligned_and_parseable() {
        let bytes = npy_bytes(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + header_len) % 64, 0);
        let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
        assert!(header.contains("'shape': (2, 3)"), "{header}");
        assert!(header.ends_with('\n'));
        assert_eq!(bytes.len(), 10 + header_len + 24);
        let one = npy_bytes(&[4], &[0.0; 4]);
        let len = u16::from_le_bytes([one[8], one[9]]) as usize;
        assert!(
            std::str::from_utf8(&one[10..10 + len])
                .unwrap()
                .contains("(4,)")
        );
    }

    #[test]
    fn nesting_keeps_the_token_layer_sublayer_order() {
        let values: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let nested = nest(&values, 2);
        assert_eq!(nested.len(), 2);
        assert_eq!(nested[1][0], [6.0, 7.0, 8.0]);
        assert_eq!(nested[0][1], [3.0, 4.0, 5.0]);
    }

    #[test]
    fn csv_fields_are_quoted_when_needed() {
        let mut csv = Csv::new(&["a", "b"]);
        csv.row(["x,y".to_owned(), "say \"hi\"".to_owned()]);
        csv.row([" lead".to_owned(), "plain".to_owned()]);
        assert_eq!(
            csv.into_string(),
            "a,b\n\"x,y\",\"say \"\"hi\"\"\"\n\" lead\",plain\n"
        );
    }

    #[test]
    fn read_reports_give_the_share_read() {
        let view = ReadView {
            artifacts: 8,
            bytes_read: 1024 * 1024,
            file_bytes: 40 * 1024 * 1024,
            requests: 58,
        };
        assert_eq!(
            view.to_text(),
            "read 1.0 MiB of 40.0 MiB (2.5%) in 58 requests from 8 artifacts"
        );
        assert_eq!(human_bytes(512), "512 B");
    }

    #[test]
    fn tensors_nest_as_json() {
        let answer = pb::ReadTensorResponse {
            artifact_key: "k".into(),
            path: "prompt.x".into(),
            dtype: "f32".into(),
            shape: vec![2, 2],
            values: vec![1.0, 2.0, 3.0, 4.0],
            stats: None,
        };
        assert_eq!(
            tensor_json(&answer)["values"],
            serde_json::json!([[1.0, 2.0], [3.0, 4.0]])
        );
    }
}
