//! The math of trait queries, free of I/O: projections of residual streams
//! onto trait vectors, per-token dynamics of a projection, and run-to-run
//! comparison with Cohen's d. Every sum is accumulated in `f64`.
//!
//! # Projection
//!
//! The score of one token is the scalar projection of its activation `x`
//! onto the trait vector `v`: `score = (x · v) / |v|`, where `|v|` is the
//! Euclidean norm. Scores are kept per token, per layer and per sublayer
//! (`residual_in`, `after_attn`, `residual_out`), for the prompt and the
//! response separately ([`Projection`], [`Scores`]).
//!
//! # Dynamics
//!
//! [`dynamics`] reads one per-token score series `s[0..n]` (normally the
//! response at one layer and sublayer):
//!
//! - velocity `v[t] = s[t+1] - s[t]` for `t` in `0..n-1` (`n-1` values;
//!   `v[t]` is the change from token `t` to token `t+1`);
//! - acceleration `a[t] = v[t+1] - v[t] = s[t+2] - 2·s[t+1] + s[t]` for `t`
//!   in `0..n-2` (`n-2` values);
//! - commitment token: `t + 2` for the first `t` with `|a[t]| < threshold`
//!   (strictly less), that is the first token whose score completes a
//!   second difference below the threshold; `None` when no acceleration is
//!   below it (always when `n < 3`). The acceleration index is
//!   `commitment_token - 2`. The default threshold is
//!   [`DEFAULT_COMMITMENT_THRESHOLD`] (0.1);
//! - peak velocity: the velocity with the largest `|v[t]|` (the first such
//!   `t` on ties), reported with its index `t` and its signed value; `None`
//!   when `n < 2`;
//! - mean absolute velocity: `(1/(n-1)) · Σ |v[t]|`; `None` when `n < 2`;
//! - peak score: the token `p` with the largest `|s[p]|` (the first on ties)
//!   and its signed score; `None` when `n = 0`;
//! - persistence: the number of tokens `t > p` with `|s[t]| > 0.5 · |s[p]|`
//!   (strictly greater; counted, not required to be consecutive); 0 when
//!   `n = 0`.
//!
//! # Comparison
//!
//! [`compare`] sets run `b` against run `a` for one prompt, on the layers
//! both projected, for the prompt and the response separately:
//!
//! - per-token differences `b - a` over the aligned tokens `0..min(n_a,
//!   n_b)`, saying whether the lengths differed;
//! - per layer and sublayer, over all tokens of each run (not only the
//!   aligned ones), the means, the mean difference `mean_b - mean_a` and
//!   Cohen's d ([`effect_size`]):
//!   `d = (mean_b - mean_a) / s_pooled` with
//!   `s_pooled = sqrt(((n_a - 1)·s_a² + (n_b - 1)·s_b²) / (n_a + n_b - 2))`,
//!   where `s_a²` and `s_b²` are the sample variances (divided by `n - 1`).
//!   `d` is `None`, never NaN, when `n_a + n_b < 3` or `s_pooled` is 0.

use serde::Serialize;

/// Threshold on `|acceleration|` below which a response counts as committed.
pub const DEFAULT_COMMITMENT_THRESHOLD: f64 = 0.1;

/// The three residual-stream points captured per layer, in storage order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Sublayer {
    /// The residual stream entering the layer.
    ResidualIn,
    /// After the attention block's residual addition.
    AfterAttn,
    /// The residual stream leaving the layer.
    ResidualOut,
}

impl Sublayer {
    /// All sublayers in storage order.
    pub const ALL: [Sublayer; 3] = [
        Sublayer::ResidualIn,
        Sublayer::AfterAttn,
        Sublayer::ResidualOut,
    ];

    /// Position in [`Sublayer::ALL`] (the last axis of [`Scores::values`]).
    pub fn index(self) -> usize {
        match self {
            Sublayer::ResidualIn => 0,
            Sublayer::AfterAttn => 1,
            Sublayer::ResidualOut => 2,
        }
    }

    /// The name used in artifacts (`residual_in`, `after_attn`, `residual_out`).
    pub fn as_str(self) -> &'static str {
        match self {
            Sublayer::ResidualIn => "residual_in",
            Sublayer::AfterAttn => "after_attn",
            Sublayer::ResidualOut => "residual_out",
        }
    }

    /// The sublayer with the artifact name `name`.
    pub fn from_name(name: &str) -> Option<Sublayer> {
        Sublayer::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

/// Projects each row of `acts` (`[tokens, d]`, row-major) onto `v`:
/// `(row · v) / |v|`, accumulated in `f64`.
///
/// # Panics
/// If `d` is 0, `v.len() != d`, `acts.len()` is not a multiple of `d`, or
/// `v` is all zeros (loaded trait vectors never are).
pub fn project(acts: &[f32], d: usize, v: &[f32]) -> Vec<f32> {
    assert!(d > 0, "project: hidden size must be positive");
    assert_eq!(
        v.len(),
        d,
        "project: vector has {} values, d is {d}",
        v.len()
    );
    assert_eq!(
        acts.len() % d,
        0,
        "project: {} activation values do not split into rows of {d}",
        acts.len()
    );
    let norm = v
        .iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt();
    assert!(norm > 0.0, "project: the vector has zero norm");
    acts.chunks_exact(d)
        .map(|row| {
            let dot: f64 = row
                .iter()
                .zip(v)
                .map(|(&x, &y)| f64::from(x) * f64::from(y))
                .sum();
            (dot / norm) as f32
        })
        .collect()
}

/// Scores of one phase (prompt or response) of one prompt, shaped
/// `[tokens, layer_count, 3]` (row-major; the last axis is [`Sublayer::ALL`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scores {
    /// Number of tokens.
    pub tokens: usize,
    /// Number of layers (the length of [`Projection::layers`]).
    pub layer_count: usize,
    /// `tokens * layer_count * 3` scores.
    pub values: Vec<f32>,
}

impl Scores {
    /// All-zero scores of the given shape.
    pub fn zeros(tokens: usize, layer_count: usize) -> Self {
        Self {
            tokens,
            layer_count,
            values: vec![0.0; tokens * layer_count * Sublayer::ALL.len()],
        }
    }

    fn offset(&self, token: usize, layer_index: usize, sublayer: Sublayer) -> usize {
        assert!(
            token < self.tokens && layer_index < self.layer_count,
            "scores: token {token} / layer index {layer_index} out of [{}, {}]",
            self.tokens,
            self.layer_count
        );
        (token * self.layer_count + layer_index) * Sublayer::ALL.len() + sublayer.index()
    }

    /// The score of one token at one layer (an index into the layer list)
    /// and sublayer.
    ///
    /// # Panics
    /// If `token` or `layer_index` is out of range.
    pub fn get(&self, token: usize, layer_index: usize, sublayer: Sublayer) -> f32 {
        self.values[self.offset(token, layer_index, sublayer)]
    }

    /// Sets one score.
    ///
    /// # Panics
    /// If `token` or `layer_index` is out of range.
    pub fn set(&mut self, token: usize, layer_index: usize, sublayer: Sublayer, value: f32) {
        let offset = self.offset(token, layer_index, sublayer);
        self.values[offset] = value;
    }

    /// The per-token series of one layer index and sublayer.
    ///
    /// # Panics
    /// If `layer_index` is out of range.
    pub fn series(&self, layer_index: usize, sublayer: Sublayer) -> Vec<f32> {
        assert!(
            layer_index < self.layer_count,
            "scores: layer index {layer_index} out of {}",
            self.layer_count
        );
        (0..self.tokens)
            .map(|token| self.get(token, layer_index, sublayer))
            .collect()
    }

    /// Stores a per-token series (e.g. the output of [`project`]) at one
    /// layer index and sublayer.
    ///
    /// # Panics
    /// If `series.len() != tokens` or `layer_index` is out of range.
    pub fn set_series(&mut self, layer_index: usize, sublayer: Sublayer, series: &[f32]) {
        assert_eq!(
            series.len(),
            self.tokens,
            "scores: series of {} values for {} tokens",
            series.len(),
            self.tokens
        );
        for (token, &value) in series.iter().enumerate() {
            self.set(token, layer_index, sublayer, value);
        }
    }
}

/// The projections of one prompt onto one trait, for every captured layer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Projection {
    /// Model layer numbers; `layer_index` arguments index this list.
    pub layers: Vec<usize>,
    /// Scores of the prompt tokens.
    pub prompt: Scores,
    /// Scores of the response tokens.
    pub response: Scores,
}

impl Projection {
    /// All-zero projections for `layers` and the given token counts.
    pub fn zeros(layers: Vec<usize>, prompt_tokens: usize, response_tokens: usize) -> Self {
        let layer_count = layers.len();
        Self {
            layers,
            prompt: Scores::zeros(prompt_tokens, layer_count),
            response: Scores::zeros(response_tokens, layer_count),
        }
    }

    /// The index of model layer `layer` in [`Projection::layers`].
    pub fn layer_index(&self, layer: usize) -> Option<usize> {
        self.layers.iter().position(|&l| l == layer)
    }
}

/// One value of a series and where it is.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Indexed {
    /// Index into the series it was taken from.
    pub index: usize,
    /// The signed value there.
    pub value: f64,
}

/// Dynamics of one per-token score series; see the module docs for the
/// exact definitions.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Dynamics {
    /// Length `n` of the score series.
    pub tokens: usize,
    /// The threshold the commitment token was found with.
    pub threshold: f64,
    /// `v[t] = s[t+1] - s[t]`, `n - 1` values (none when `n < 2`).
    pub velocity: Vec<f64>,
    /// `a[t] = v[t+1] - v[t]`, `n - 2` values (none when `n < 3`).
    pub acceleration: Vec<f64>,
    /// Token `t + 2` of the first `t` with `|a[t]| < threshold`.
    pub commitment_token: Option<usize>,
    /// The velocity of largest magnitude (index into `velocity`).
    pub peak_velocity: Option<Indexed>,
    /// Mean of `|v[t]|`.
    pub mean_abs_velocity: Option<f64>,
    /// The score of largest magnitude (index is a token).
    pub peak_score: Option<Indexed>,
    /// Tokens after the peak-score token with `|s| > 0.5 · |peak score|`.
    pub persistence: usize,
}

/// Velocity, acceleration, commitment, peak and persistence of a per-token
/// score series (see the module docs). Series shorter than 3 tokens have no
/// acceleration and no commitment token; nothing here panics.
pub fn dynamics(scores: &[f32], threshold: f64) -> Dynamics {
    let s: Vec<f64> = scores.iter().map(|&x| f64::from(x)).collect();
    let velocity: Vec<f64> = s.windows(2).map(|w| w[1] - w[0]).collect();
    let acceleration: Vec<f64> = velocity.windows(2).map(|w| w[1] - w[0]).collect();
    let commitment_token = acceleration
        .iter()
        .position(|a| a.abs() < threshold)
        .map(|t| t + 2);
    let peak_velocity = peak_by_magnitude(&velocity);
    let mean_abs_velocity = (!velocity.is_empty())
        .then(|| velocity.iter().map(|v| v.abs()).sum::<f64>() / velocity.len() as f64);
    let peak_score = peak_by_magnitude(&s);
    let persistence = peak_score.map_or(0, |peak| {
        let bar = 0.5 * peak.value.abs();
        s[peak.index + 1..].iter().filter(|x| x.abs() > bar).count()
    });
    Dynamics {
        tokens: s.len(),
        threshold,
        velocity,
        acceleration,
        commitment_token,
        peak_velocity,
        mean_abs_velocity,
        peak_score,
        persistence,
    }
}

/// The first value of largest magnitude (NaN values are never chosen unless
/// every value is NaN, in which case the first is).
fn peak_by_magnitude(values: &[f64]) -> Option<Indexed> {
    let first = *values.first()?;
    let mut best = Indexed {
        index: 0,
        value: first,
    };
    for (index, &value) in values.iter().enumerate().skip(1) {
        if value.abs() > best.value.abs() || (best.value.is_nan() && !value.is_nan()) {
            best = Indexed { index, value };
        }
    }
    Some(best)
}

/// Two samples set against each other: their means, the mean difference and
/// Cohen's d with the pooled standard deviation (see the module docs).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EffectSize {
    /// Values in sample `a`.
    pub n_a: usize,
    /// Values in sample `b`.
    pub n_b: usize,
    pub mean_a: f64,
    pub mean_b: f64,
    /// `mean_b - mean_a`.
    pub mean_difference: f64,
    /// `sqrt(((n_a-1)·s_a² + (n_b-1)·s_b²) / (n_a+n_b-2))`; `None` when
    /// `n_a + n_b < 3`.
    pub pooled_sd: Option<f64>,
    /// `mean_difference / pooled_sd`; `None` when the pooled standard
    /// deviation is missing or 0.
    pub cohens_d: Option<f64>,
}

/// Means, mean difference and Cohen's d of `b` against `a`; `None` when a
/// sample is empty.
pub fn effect_size(a: &[f32], b: &[f32]) -> Option<EffectSize> {
    let (n_a, mean_a, ss_a) = moments(a)?;
    let (n_b, mean_b, ss_b) = moments(b)?;
    let mean_difference = mean_b - mean_a;
    let dof = n_a + n_b - 2;
    let pooled_sd = (dof > 0).then(|| ((ss_a + ss_b) / dof as f64).sqrt());
    let cohens_d = pooled_sd
        .filter(|&sd| sd > 0.0 && sd.is_finite())
        .map(|sd| mean_difference / sd);
    Some(EffectSize {
        n_a,
        n_b,
        mean_a,
        mean_b,
        mean_difference,
        pooled_sd,
        cohens_d,
    })
}

/// Count, mean and sum of squared deviations (`(n-1)·s²`), two-pass.
fn moments(values: &[f32]) -> Option<(usize, f64, f64)> {
    if values.is_empty() {
        return None;
    }
    let n = values.len();
    let mean = values.iter().map(|&x| f64::from(x)).sum::<f64>() / n as f64;
    let squares = values
        .iter()
        .map(|&x| (f64::from(x) - mean).powi(2))
        .sum::<f64>();
    Some((n, mean, squares))
}

/// Run `b` against run `a` for one layer and sublayer of one phase.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerSummary {
    /// Model layer number.
    pub layer: usize,
    pub sublayer: Sublayer,
    /// Over all tokens of each run; `None` when either run has no tokens.
    pub effect: Option<EffectSize>,
}

/// One phase (prompt or response) of a comparison.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PhaseComparison {
    /// Tokens of run `a`.
    pub tokens_a: usize,
    /// Tokens of run `b`.
    pub tokens_b: usize,
    /// Whether the runs had different numbers of tokens (the differences
    /// then cover only the first `min(tokens_a, tokens_b)`).
    pub lengths_differ: bool,
    /// `b - a` per aligned token, shaped `[min(tokens_a, tokens_b), layers, 3]`.
    pub differences: Scores,
    /// One entry per layer and sublayer, layers in order, sublayers in
    /// [`Sublayer::ALL`] order.
    pub summary: Vec<LayerSummary>,
}

/// Run `b` against run `a` for one prompt and trait.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    /// The layers both runs projected, in `a`'s order.
    pub layers: Vec<usize>,
    pub prompt: PhaseComparison,
    pub response: PhaseComparison,
}

/// Compares the projections of run `b` with those of run `a` on the layers
/// both have (see the module docs).
pub fn compare(a: &Projection, b: &Projection) -> Comparison {
    let pairs: Vec<(usize, usize, usize)> = a
        .layers
        .iter()
        .enumerate()
        .filter_map(|(index_a, &layer)| Some((layer, index_a, b.layer_index(layer)?)))
        .collect();
    Comparison {
        layers: pairs.iter().map(|&(layer, _, _)| layer).collect(),
        prompt: compare_phase(&a.prompt, &b.prompt, &pairs),
        response: compare_phase(&a.response, &b.response, &pairs),
    }
}

fn compare_phase(a: &Scores, b: &Scores, pairs: &[(usize, usize, usize)]) -> PhaseComparison {
    let aligned = a.tokens.min(b.tokens);
    let mut differences = Scores::zeros(aligned, pairs.len());
    let mut summary = Vec::with_capacity(pairs.len() * Sublayer::ALL.len());
    for (out_index, &(layer, index_a, index_b)) in pairs.iter().enumerate() {
        for sublayer in Sublayer::ALL {
            let series_a = a.series(index_a, sublayer);
            let series_b = b.series(index_b, sublayer);
            for token in 0..aligned {
                let difference = f64::from(series_b[token]) - f64::from(series_a[token]);
                differences.set(token, out_index, sublayer, difference as f32);
            }
            summary.push(LayerSummary {
                layer,
                sublayer,
                effect: effect_size(&series_a, &series_b),
            });
        }
    }
    PhaseComparison {
        tokens_a: a.tokens,
        tokens_b: b.tokens,
        lengths_differ: a.tokens != b.tokens,
        differences,
        summary,
    }
}

#[cfg(test)]
mod tests;
