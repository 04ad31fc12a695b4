//! The generation loop: one forward pass per response step with a KV cache,
//! recording from the same passes that choose the tokens (capture-semantics.md,
//! "Generation steps").

use candle_core::Tensor;

use super::decode::{Sampling, TokenChooser};
use super::trace::{LayerTrace, PromptTrace};
use crate::model::{CaptureRequest, Gemma2, KvCache, LayerRecord};

/// Where the response tokens come from.
#[derive(Debug, Clone, Copy)]
pub enum ResponsePlan<'a> {
    /// Generate up to `max_new_tokens`, stopping after an end token.
    Generate {
        sampling: &'a Sampling,
        max_new_tokens: usize,
        eos_ids: &'a [u32],
        /// Identifies the prompt for seeding (`{set}/{id}`).
        prompt_key: &'a str,
    },
    /// Teacher forcing: capture on exactly these response tokens.
    Replay(&'a [u32]),
}

impl ResponsePlan<'_> {
    /// The most response tokens this plan can produce.
    pub fn max_steps(&self) -> usize {
        match self {
            ResponsePlan::Generate { max_new_tokens, .. } => *max_new_tokens,
            ResponsePlan::Replay(ids) => ids.len(),
        }
    }
}

/// Runs the steps of `plan` after `prompt_ids`, calling `pass` for every
/// forward pass (given the tokens to append and the cache) and `on_token`
/// after each response token. Returns the response ids.
fn run_steps(
    model: &Gemma2,
    prompt_ids: &[u32],
    plan: ResponsePlan<'_>,
    mut pass: impl FnMut(&[u32], &mut KvCache) -> candle_core::Result<Tensor>,
    on_token: &mut dyn FnMut(),
) -> candle_core::Result<Vec<u32>> {
    let mut cache = model.new_cache();
    let mut chooser = match plan {
        ResponsePlan::Generate {
            sampling,
            prompt_key,
            ..
        } => Some(TokenChooser::new(sampling, prompt_key)),
        ResponsePlan::Replay(_) => None,
    };
    let mut response = Vec::with_capacity(plan.max_steps());
    let mut input: Vec<u32> = prompt_ids.to_vec();
    for step in 0..plan.max_steps() {
        let logits = pass(&input, &mut cache)?;
        let token = match (&plan, chooser.as_mut()) {
            (ResponsePlan::Replay(ids), _) => ids[step],
            (_, Some(chooser)) => chooser.choose(&logits.to_vec1::<f32>()?),
            (ResponsePlan::Generate { .. }, None) => unreachable!("a generate plan has a chooser"),
        };
        response.push(token);
        on_token();
        if let ResponsePlan::Generate { eos_ids, .. } = plan
            && eos_ids.contains(&token)
        {
            break;
        }
        input = vec![token];
    }
    Ok(response)
}

/// Generates without capturing anything (the baseline of the benchmarks).
pub fn generate(
    model: &Gemma2,
    prompt_ids: &[u32],
    plan: ResponsePlan<'_>,
    on_token: &mut dyn FnMut(),
) -> candle_core::Result<Vec<u32>> {
    run_steps(
        model,
        prompt_ids,
        plan,
        |tokens, cache| model.forward(tokens, cache),
        on_token,
    )
}

/// Generates (or replays) a response and records what `request` asks for at
/// every step.
pub fn capture_prompt(
    model: &Gemma2,
    prompt_ids: &[u32],
    request: &CaptureRequest,
    plan: ResponsePlan<'_>,
    on_token: &mut dyn FnMut(),
) -> candle_core::Result<PromptTrace> {
    let mut layers: Vec<LayerTrace> = request
        .layers
        .iter()
        .enumerate()
        .filter(|(_, wants)| **wants != Default::default())
        .map(|(layer, wants)| LayerTrace::new(layer, *wants))
        .collect();
    let response_ids = run_steps(
        model,
        prompt_ids,
        plan,
        |tokens, cache| {
            let (logits, records) = model.forward_with_capture(tokens, cache, request)?;
            record_pass(&mut layers, &records)?;
            Ok(logits)
        },
        on_token,
    )?;
    Ok(PromptTrace {
        prompt_ids: prompt_ids.to_vec(),
        response_ids,
        layers,
    })
}

fn record_pass(layers: &mut [LayerTrace], records: &[LayerRecord]) -> candle_core::Result<()> {
    for trace in layers {
        trace.push(&records[trace.layer])?;
    }
    Ok(())
}
