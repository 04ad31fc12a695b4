//! `--plot` for the query commands: what to draw from the answers, drawn
//! by [`crate::query::plot`].

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use capture_proto::v1 as pb;

use super::args::{PlotArgs, SublayerArg};
use crate::query::plot::{Heatmap, LinePlot, heatmap_png, line_png};

/// `scores.png` -> `scores-response.png`.
pub fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "plot".to_owned());
    path.with_file_name(format!("{stem}{suffix}.png"))
}

/// The prompt named `set/id`, or the first.
fn pick<'a, T>(
    items: &'a [T],
    wanted: Option<&str>,
    key: impl Fn(&T) -> (String, String),
) -> anyhow::Result<&'a T> {
    let Some(wanted) = wanted else {
        return items
            .first()
            .context("nothing to plot: the query returned no prompts");
    };
    let (set, id) = wanted
        .split_once('/')
        .with_context(|| format!("--plot-prompt {wanted:?}: write SET/ID, e.g. dynamic/1"))?;
    items
        .iter()
        .find(|item| key(item) == (set.to_owned(), id.to_owned()))
        .with_context(|| format!("--plot-prompt {wanted}: no such prompt in the answer"))
}

fn sublayer_index(sublayer: SublayerArg) -> usize {
    match sublayer {
        SublayerArg::ResidualIn => 0,
        SublayerArg::AfterAttn => 1,
        SublayerArg::ResidualOut => 2,
    }
}

fn sublayer_label(sublayer: SublayerArg) -> &'static str {
    match sublayer {
        SublayerArg::ResidualIn => "residual_in",
        SublayerArg::AfterAttn => "after_attn",
        SublayerArg::ResidualOut => "residual_out",
    }
}

/// The heatmap (prompt then response tokens x layers) at `path` and the
/// response scores at every projected layer at `{stem}-response.png`.
pub fn projection(
    path: &Path,
    prompts: &[pb::PromptProjection],
    args: &PlotArgs,
) -> anyhow::Result<()> {
    let prompt = pick(prompts, args.plot_prompt.as_deref(), |p| {
        (p.prompt_set.clone(), p.prompt_id.clone())
    })?;
    let scores = match &args.plot_trait {
        Some(name) => prompt
            .traits
            .iter()
            .find(|t| &t.trait_name == name)
            .with_context(|| format!("--plot-trait {name}: not among the projected traits"))?,
        None => prompt.traits.first().context("nothing to plot: no trait")?,
    };
    let sub = sublayer_index(args.plot_sublayer);
    let layers = scores.layers.len();
    let pick_values = |values: &[f32]| -> Vec<f32> {
        values
            .chunks(3)
            .map(|triple| triple.get(sub).copied().unwrap_or(f32::NAN))
            .collect()
    };
    let mut row_labels: Vec<String> = prompt.prompt_tokens.clone();
    row_labels.extend(prompt.response_tokens.iter().map(|t| format!("→{t}")));
    let mut values = pick_values(&scores.prompt);
    values.extend(pick_values(&scores.response));
    let title = format!(
        "{} on {}/{} ({}; → response)",
        scores.trait_name,
        prompt.prompt_set,
        prompt.prompt_id,
        sublayer_label(args.plot_sublayer)
    );
    heatmap_png(
        path,
        &Heatmap {
            title: title.clone(),
            row_labels,
            col_labels: scores.layers.iter().map(u32::to_string).collect(),
            values,
            value_label: format!("projection onto {}", scores.trait_name),
        },
    )
    .with_context(|| format!("plotting {}", path.display()))?;
    if !prompt.response_tokens.is_empty() && layers > 0 {
        let response = pick_values(&scores.response);
        let series = scores
            .layers
            .iter()
            .enumerate()
            .map(|(index, layer)| {
                let line: Vec<f32> = response
                    .iter()
                    .skip(index)
                    .step_by(layers)
                    .copied()
                    .collect();
                (format!("layer {layer}"), line)
            })
            .collect();
        let line_path = sibling(path, "-response");
        line_png(
            &line_path,
            &LinePlot {
                title,
                x_label: "response token".to_owned(),
                y_label: format!("projection onto {}", scores.trait_name),
                x_labels: prompt.response_tokens.clone(),
                series,
                markers: Vec::new(),
            },
        )
        .with_context(|| format!("plotting {}", line_path.display()))?;
        eprintln!(
            "plots written to {} and {}",
            path.display(),
            line_path.display()
        );
    } else {
        eprintln!("plot written to {}", path.display());
    }
    Ok(())
}

/// The response scores of one prompt, one line per trait, with each
/// trait's commitment token marked.
pub fn dynamics(
    path: &Path,
    prompts: &[pb::PromptDynamics],
    wanted: Option<&str>,
) -> anyhow::Result<()> {
    let prompt = pick(prompts, wanted, |p| {
        (p.prompt_set.clone(), p.prompt_id.clone())
    })?;
    let series = prompt
        .traits
        .iter()
        .map(|t| {
            (
                format!("{} (layer {})", t.trait_name, t.layer),
                t.scores.clone(),
            )
        })
        .collect();
    let markers = prompt
        .traits
        .iter()
        .filter_map(|t| {
            let token = t.commitment_token? as usize;
            (token < prompt.response_tokens.len())
                .then(|| (format!("{} commits", t.trait_name), token))
        })
        .collect();
    line_png(
        path,
        &LinePlot {
            title: format!(
                "response scores on {}/{}",
                prompt.prompt_set, prompt.prompt_id
            ),
            x_label: "response token".to_owned(),
            y_label: "projection".to_owned(),
            x_labels: prompt.response_tokens.clone(),
            series,
            markers,
        },
    )
    .with_context(|| format!("plotting {}", path.display()))?;
    eprintln!("plot written to {}", path.display());
    Ok(())
}

/// The response differences (residual_out) of one prompt and the first
/// trait, second run minus baseline, as a token x layer heatmap.
pub fn comparison(
    path: &Path,
    prompts: &[pb::PromptComparison],
    wanted: Option<&str>,
) -> anyhow::Result<()> {
    let prompt = pick(prompts, wanted, |p| {
        (p.prompt_set.clone(), p.prompt_id.clone())
    })?;
    let values: Vec<f32> = prompt
        .response_diff
        .chunks(3)
        .map(|triple| triple.get(2).copied().unwrap_or(f32::NAN))
        .collect();
    let tokens = prompt.response_tokens as usize;
    heatmap_png(
        path,
        &Heatmap {
            title: format!(
                "{}: {} - {} on {}/{} (residual_out, response)",
                prompt.trait_name,
                short(&prompt.run_id),
                short(&prompt.baseline_run_id),
                prompt.prompt_set,
                prompt.prompt_id
            ),
            row_labels: (0..tokens).map(|t| t.to_string()).collect(),
            col_labels: prompt.layers.iter().map(u32::to_string).collect(),
            values,
            value_label: "score difference".to_owned(),
        },
    )
    .with_context(|| format!("plotting {}", path.display()))?;
    eprintln!("plot written to {}", path.display());
    Ok(())
}

fn short(run: &str) -> &str {
    run.get(..8).unwrap_or(run)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_plots_sit_beside_the_heatmap() {
        assert_eq!(
            sibling(Path::new("out/scores.png"), "-response"),
            PathBuf::from("out/scores-response.png")
        );
    }
}
