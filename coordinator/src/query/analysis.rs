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
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
    }

    #[test]
    fn projection_is_the_scalar_projection_per_token() {
        // Two tokens of width 3, v = (3, 0, 4) with |v| = 5.
        let acts = [1.0, 2.0, 3.0, -5.0, 0.0, 0.0];
        let scores = project(&acts, 3, &[3.0, 0.0, 4.0]);
        assert_eq!(scores, vec![(3.0 + 12.0) / 5.0, -15.0 / 5.0]);
        assert!(project(&[], 3, &[1.0, 0.0, 0.0]).is_empty());
    }

    #[test]
    #[should_panic(expected = "do not split into rows")]
    fn projection_refuses_ragged_activations() {
        project(&[1.0, 2.0, 3.0], 2, &[1.0, 1.0]);
    }

    #[test]
    fn scores_index_tokens_layers_and_sublayers() {
        let mut projection = Projection::zeros(vec![4, 9], 2, 3);
        projection
            .response
            .set_series(1, Sublayer::AfterAttn, &[1.0, 2.0, 3.0]);
        projection.prompt.set(1, 0, Sublayer::ResidualOut, 7.0);
        assert_eq!(projection.layer_index(9), Some(1));
        assert_eq!(projection.layer_index(5), None);
        assert_eq!(
            projection.response.series(1, Sublayer::AfterAttn),
            vec![1.0, 2.0, 3.0]
        );
        assert_eq!(projection.response.get(2, 1, Sublayer::AfterAttn), 3.0);
        // [token 2, layer index 1, after_attn] = (2 * 2 + 1) * 3 + 1.
        assert_eq!(projection.response.values[16], 3.0);
        // [token 1, layer index 0, residual_out] = (1 * 2 + 0) * 3 + 2.
        assert_eq!(projection.prompt.values[8], 7.0);
        assert_eq!(
            projection.response.series(0, Sublayer::AfterAttn),
            vec![0.0; 3]
        );
        assert_eq!(
            Sublayer::from_name("residual_out"),
            Some(Sublayer::ResidualOut)
        );
        assert_eq!(Sublayer::from_name("mlp"), None);
    }

    #[test]
    fn dynamics_follow_the_documented_definitions() {
        // s:   0, 1, 3, 3.25, 3.0, -0.5
        // v:   1, 2, 0.25, -0.25, -3.5
        // a:   1, -1.75, -0.5, -3.25
        let s = [0.0, 1.0, 3.0, 3.25, 3.0, -0.5];
        let d = dynamics(&s, DEFAULT_COMMITMENT_THRESHOLD);
        assert_eq!(d.tokens, 6);
        assert_eq!(d.velocity, vec![1.0, 2.0, 0.25, -0.25, -3.5]);
        assert_eq!(d.acceleration, vec![1.0, -1.75, -0.5, -3.25]);
        assert_eq!(d.commitment_token, None, "no |a| is below 0.1");
        assert_eq!(dynamics(&s, 0.5).commitment_token, None, "strictly below");
        let d = dynamics(&s, 0.6);
        assert_eq!(d.commitment_token, Some(4), "a[2] maps to token 4");
        assert_eq!(
            d.peak_velocity,
            Some(Indexed {
                index: 4,
                value: -3.5
            })
        );
        assert!(close(d.mean_abs_velocity.unwrap(), 7.0 / 5.0));
        assert_eq!(
            d.peak_score,
            Some(Indexed {
                index: 3,
                value: 3.25
            })
        );
        // After token 3: |3.0| > 1.625 counts, |-0.5| does not.
        assert_eq!(d.persistence, 1);
    }

    #[test]
    fn dynamics_of_short_series_do_not_panic() {
        let empty = dynamics(&[], 0.1);
        assert_eq!(empty.tokens, 0);
        assert!(empty.velocity.is_empty() && empty.acceleration.is_empty());
        assert_eq!(empty.peak_velocity, None);
        assert_eq!(empty.mean_abs_velocity, None);
        assert_eq!(empty.peak_score, None);
        assert_eq!(empty.persistence, 0);

        let one = dynamics(&[-2.0], 0.1);
        assert_eq!(
            one.peak_score,
            Some(Indexed {
                index: 0,
                value: -2.0
            })
        );
        assert_eq!(one.peak_velocity, None);
        assert_eq!(one.persistence, 0);

        let two = dynamics(&[1.0, 4.0], 0.1);
        assert_eq!(two.velocity, vec![3.0]);
        assert!(two.acceleration.is_empty());
        assert_eq!(two.commitment_token, None);
        assert_eq!(two.mean_abs_velocity, Some(3.0));

        let flat = dynamics(&[1.0, 1.0, 1.0], 0.1);
        assert_eq!(flat.commitment_token, Some(2));
        assert_eq!(
            flat.peak_velocity,
            Some(Indexed {
                index: 0,
                value: 0.0
            })
        );
        assert_eq!(
            flat.peak_score,
            Some(Indexed {
                index: 0,
                value: 1.0
            })
        );
        assert_eq!(flat.persistence, 2);
    }

    #[test]
    fn nan_scores_are_never_the_peak_when_a_number_exists() {
        let d = dynamics(&[f32::NAN, 2.0, -1.0], 0.1);
        assert_eq!(
            d.peak_score,
            Some(Indexed {
                index: 1,
                value: 2.0
            })
        );
        let all_nan = dynamics(&[f32::NAN], 0.1);
        assert_eq!(all_nan.peak_score.map(|p| p.index), Some(0));
    }

    #[test]
    fn cohens_d_uses_the_pooled_standard_deviation() {
        // a: mean 2, sample variance 1 (n 3); b: mean 5, sample variance 4 (n 3)
        let a = [1.0, 2.0, 3.0];
        let b = [3.0, 5.0, 7.0];
        let effect = effect_size(&a, &b).unwrap();
        assert_eq!((effect.n_a, effect.n_b), (3, 3));
        assert!(close(effect.mean_difference, 3.0));
        let pooled = ((2.0 * 1.0 + 2.0 * 4.0) / 4.0f64).sqrt();
        assert!(close(effect.pooled_sd.unwrap(), pooled));
        assert!(close(effect.cohens_d.unwrap(), 3.0 / pooled));

        let constant = effect_size(&[2.0, 2.0], &[3.0, 3.0]).unwrap();
        assert_eq!(constant.pooled_sd, Some(0.0));
        assert_eq!(constant.cohens_d, None, "zero variance gives None, not NaN");
        let singles = effect_size(&[1.0], &[2.0]).unwrap();
        assert_eq!(singles.pooled_sd, None);
        assert_eq!(singles.cohens_d, None);
        // One value on one side: its (n - 1)·s² term is 0.
        let lopsided = effect_size(&[1.0], &[2.0, 4.0]).unwrap();
        assert!(close(lopsided.pooled_sd.unwrap(), 2.0f64.sqrt()));
        assert!(effect_size(&[], &[1.0]).is_none());
    }

    #[test]
    fn compare_aligns_tokens_and_summarises_common_layers() {
        let mut a = Projection::zeros(vec![3, 5], 1, 3);
        let mut b = Projection::zeros(vec![5, 7], 1, 2);
        a.response
            .set_series(1, Sublayer::ResidualOut, &[1.0, 2.0, 3.0]);
        b.response.set_series(0, Sublayer::ResidualOut, &[4.0, 4.5]);
        let comparison = compare(&a, &b);
        assert_eq!(comparison.layers, vec![5]);

        let response = &comparison.response;
        assert_eq!((response.tokens_a, response.tokens_b), (3, 2));
        assert!(response.lengths_differ);
        assert_eq!(response.differences.tokens, 2);
        assert_eq!(response.differences.layer_count, 1);
        assert_eq!(
            response.differences.series(0, Sublayer::ResidualOut),
            vec![3.0, 2.5]
        );
        assert_eq!(response.summary.len(), 3);
        let out = &response.summary[2];
        assert_eq!((out.layer, out.sublayer), (5, Sublayer::ResidualOut));
        let effect = out.effect.as_ref().unwrap();
        assert_eq!((effect.n_a, effect.n_b), (3, 2));
        assert!(close(effect.mean_difference, 4.25 - 2.0));
        // residual_in is all zeros on both sides: no effect size.
        assert_eq!(response.summary[0].effect.as_ref().unwrap().cohens_d, None);

        assert!(!comparison.prompt.lengths_differ);
        assert_eq!(comparison.prompt.differences.values, vec![0.0; 3]);
        let json = serde_json::to_value(&comparison).unwrap();
        assert_eq!(json["response"]["summary"][2]["sublayer"], "residual_out");
    }

    /// Writes trait vectors with torch (float32 `[1, d]`, float16 `[d, 1]`,
    /// bfloat16 `[d]`) and two runs' activations, and prints what numpy
    /// computes from them: projections (float64, rounded to float32 as the
    /// Rust side stores them), dynamics of those projections, and the
    /// per-token differences and Cohen's d of run b against run a.
    const PARITY_SCRIPT: &str = r#"
import json, os, sys
import numpy as np
import torch

out = sys.argv[1]
threshold = float(sys.argv[2])
rng = np.random.default_rng(20240611)
d, tokens_a, tokens_b = 48, 40, 35
acts_a = rng.standard_normal((tokens_a, d)).astype(np.float32)
acts_b = (rng.standard_normal((tokens_b, d)) + 0.3).astype(np.float32)
acts_a.tofile(os.path.join(out, "acts_a.f32"))
acts_b.tofile(os.path.join(out, "acts_b.f32"))
base = rng.standard_normal(d) * 3.0

def project(acts, v):
    return ((acts.astype(np.float64) @ v) / np.linalg.norm(v)).astype(np.float32)

cases = {}
for name, dtype, shape in [
    ("f32", torch.float32, (1, d)),
    ("f16", torch.float16, (d, 1)),
    ("bf16", torch.bfloat16, (d,)),
]:
    tensor = torch.tensor(base).reshape(shape).to(dtype)
    torch.save(tensor, os.path.join(out, name + ".pt"))
    v = tensor.to(torch.float64).reshape(-1).numpy()
    pa, pb = project(acts_a, v), project(acts_b, v)
    s = pa.astype(np.float64)
    vel = np.diff(s)
    acc = np.diff(vel)
    below = np.nonzero(np.abs(acc) < threshold)[0]
    peak_v = int(np.argmax(np.abs(vel)))
    peak_s = int(np.argmax(np.abs(s)))
    a64, b64 = pa.astype(np.float64), pb.astype(np.float64)
    n1, n2 = len(a64), len(b64)
    pooled = np.sqrt(((n1 - 1) * a64.var(ddof=1) + (n2 - 1) * b64.var(ddof=1)) / (n1 + n2 - 2))
    aligned = min(n1, n2)
    cases[name] = {
        "values": v.tolist(),
        "projection_a": pa.astype(np.float64).tolist(),
        "projection_b": pb.astype(np.float64).tolist(),
        "velocity": vel.tolist(),
        "acceleration": acc.tolist(),
        "commitment_token": int(below[0]) + 2 if len(below) else None,
        "peak_velocity_index": peak_v,
        "peak_velocity": float(vel[peak_v]),
        "mean_abs_velocity": float(np.mean(np.abs(vel))),
        "peak_score_index": peak_s,
        "persistence": int(np.sum(np.abs(s[peak_s + 1:]) > 0.5 * abs(s[peak_s]))),
        "differences": (b64[:aligned] - a64[:aligned]).tolist(),
        "mean_difference": float(b64.mean() - a64.mean()),
        "pooled_sd": float(pooled),
        "cohens_d": float((b64.mean() - a64.mean()) / pooled),
    }
print(json.dumps({"d": d, "cases": cases}))
"#;

    /// `actual` within 1e-5 of `expected`, relative to `max(|expected|, 1)`.
    fn assert_parity(what: &str, actual: f64, expected: &serde_json::Value) {
        let expected = expected
            .as_f64()
            .unwrap_or_else(|| panic!("{what}: {expected}"));
        let tolerance = 1e-5 * expected.abs().max(1.0);
        assert!(
            (actual - expected).abs() <= tolerance,
            "{what}: rust {actual} numpy {expected}"
        );
    }

    fn assert_series(what: &str, actual: &[f64], expected: &serde_json::Value) {
        let expected = expected.as_array().unwrap();
        assert_eq!(actual.len(), expected.len(), "{what}: lengths");
        for (index, (a, e)) in actual.iter().zip(expected).enumerate() {
            assert_parity(&format!("{what}[{index}]"), *a, e);
        }
    }

    fn read_f32(path: &std::path::Path) -> Vec<f32> {
        std::fs::read(path)
            .unwrap()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }

    /// Runs only with `CAPTURE_PYTHON` naming a python that has numpy and torch.
    #[tokio::test]
    async fn numpy_parity_of_vectors_projections_dynamics_and_cohens_d() {
        use crate::query::vectors::{VectorRequest, VectorSource, load_vectors, vector_for};

        let Some(python) = std::env::var_os("CAPTURE_PYTHON") else {
            eprintln!("skipping numpy parity: set CAPTURE_PYTHON to a python with numpy and torch");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let threshold = 0.5;
        let output = std::process::Command::new(&python)
            .arg("-c")
            .arg(PARITY_SCRIPT)
            .arg(dir.path())
            .arg(threshold.to_string())
            .output()
            .expect("run CAPTURE_PYTHON");
        assert!(
            output.status.success(),
            "parity script failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let expected: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        let d = expected["d"].as_u64().unwrap() as usize;
        let acts_a = read_f32(&dir.path().join("acts_a.f32"));
        let acts_b = read_f32(&dir.path().join("acts_b.f32"));

        let names = ["f32", "f16", "bf16"];
        let request = VectorRequest {
            sources: names
                .iter()
                .map(|name| {
                    let path = dir.path().join(format!("{name}.pt"));
                    VectorSource::File(path.to_str().unwrap().to_owned())
                })
                .collect(),
            ..VectorRequest::default()
        };
        let vectors = load_vectors(&request).await.unwrap();
        assert_eq!(vectors.len(), 3);
        let mut commitments = 0;
        for name in names {
            let case = &expected["cases"][name];
            let vector = vector_for(&vectors, name, 0).unwrap();
            // f16 and bf16 values widen to f32 exactly; JSON numbers parse
            // to within an f64 ulp, which rounding to f32 removes.
            let want: Vec<f32> = case["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            assert_eq!(vector.values, want, "{name}: values");

            let projection_a = project(&acts_a, d, &vector.values);
            let projection_b = project(&acts_b, d, &vector.values);
            let widen = |xs: &[f32]| xs.iter().map(|&x| f64::from(x)).collect::<Vec<_>>();
            assert_series(
                &format!("{name} projection a"),
                &widen(&projection_a),
                &case["projection_a"],
            );
            assert_series(
                &format!("{name} projection b"),
                &widen(&projection_b),
                &case["projection_b"],
            );

            let dynamics = dynamics(&projection_a, threshold);
            assert_series(
                &format!("{name} velocity"),
                &dynamics.velocity,
                &case["velocity"],
            );
            assert_series(
                &format!("{name} acceleration"),
                &dynamics.acceleration,
                &case["acceleration"],
            );
            assert_eq!(
                dynamics.commitment_token,
                case["commitment_token"].as_u64().map(|t| t as usize),
                "{name}: commitment token"
            );
            commitments += usize::from(dynamics.commitment_token.is_some());
            let peak = dynamics.peak_velocity.unwrap();
            assert_eq!(
                peak.index as u64,
                case["peak_velocity_index"].as_u64().unwrap()
            );
            assert_parity(
                &format!("{name} peak velocity"),
                peak.value,
                &case["peak_velocity"],
            );
            assert_parity(
                &format!("{name} mean |velocity|"),
                dynamics.mean_abs_velocity.unwrap(),
                &case["mean_abs_velocity"],
            );
            assert_eq!(
                dynamics.peak_score.unwrap().index as u64,
                case["peak_score_index"].as_u64().unwrap()
            );
            assert_eq!(
                dynamics.persistence as u64,
                case["persistence"].as_u64().unwrap(),
                "{name}: persistence"
            );

            let mut a = Projection::zeros(vec![16], 0, projection_a.len());
            let mut b = Projection::zeros(vec![16], 0, projection_b.len());
            a.response
                .set_series(0, Sublayer::ResidualOut, &projection_a);
            b.response
                .set_series(0, Sublayer::ResidualOut, &projection_b);
            let comparison = compare(&a, &b);
            assert!(comparison.response.lengths_differ);
            let differences = comparison
                .response
                .differences
                .series(0, Sublayer::ResidualOut);
            assert_series(
                &format!("{name} differences"),
                &widen(&differences),
                &case["differences"],
            );
            let effect = comparison.response.summary[2].effect.clone().unwrap();
            assert_parity(
                &format!("{name} mean difference"),
                effect.mean_difference,
                &case["mean_difference"],
            );
            assert_parity(
                &format!("{name} pooled sd"),
                effect.pooled_sd.unwrap(),
                &case["pooled_sd"],
            );
            assert_parity(
                &format!("{name} cohen's d"),
                effect.cohens_d.unwrap(),
                &case["cohens_d"],
            );
            assert_eq!(
                comparison.prompt.summary[2].effect, None,
                "no prompt tokens"
            );
        }
        assert!(commitments > 0, "the data should commit at least once");
    }
}
