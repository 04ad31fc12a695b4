//! The generation loop: one forward pass per response step with a KV cache,
//! recording from the same passes that choose the tokens (capture-semantics.md,
//! "Generation steps").

use candle_core::{DType, Device, Tensor};

use super::decode::{Sampling, TokenChooser};
use super::trace::{LayerTrace, PromptTrace};
use crate::model::{BatchOutput, CaptureRequest, Gemma2, Head, KvCache, LayerRecord};

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

/// One sequence of a batched capture: its prompt and where its response
/// comes from.
#[derive(Debug, Clone, Copy)]
pub struct BatchItem<'a> {
    pub prompt_ids: &'a [u32],
    pub plan: ResponsePlan<'a>,
}

/// Whether a pass over `running` items needs the logits: not when every
/// one of them replays its response.
fn head_for(items: &[BatchItem<'_>], running: &[usize]) -> Head {
    if running
        .iter()
        .all(|&i| matches!(items[i].plan, ResponsePlan::Replay(_)))
    {
        Head::Skip
    } else {
        Head::Logits
    }
}

/// Runs the steps of every item's plan in lock step: one pass over the
/// padded prompts, then one decode pass per step over the sequences still
/// running; a sequence leaves the batch (and the cache) once its plan is done.
/// `pass` gets the tokens to append per running sequence, the cache, the
/// running sequences' item indices and whether logits are needed
/// ([`head_for`]), and returns `[running, vocab]` logits on the host if so;
/// `on_token` runs after each response token with its item index.
/// Returns every item's response ids.
fn run_steps(
    model: &Gemma2,
    items: &[BatchItem<'_>],
    mut pass: impl FnMut(&[&[u32]], &mut KvCache, &[usize], Head) -> candle_core::Result<Option<Tensor>>,
    on_token: &mut dyn FnMut(usize),
) -> candle_core::Result<Vec<Vec<u32>>> {
    let mut choosers: Vec<Option<TokenChooser>> = items
        .iter()
        .map(|item| match item.plan {
            ResponsePlan::Generate {
                sampling,
                prompt_key,
                ..
            } => Some(TokenChooser::new(sampling, prompt_key)),
            ResponsePlan::Replay(_) => None,
        })
        .collect();
    let mut responses: Vec<Vec<u32>> = items
        .iter()
        .map(|item| Vec::with_capacity(item.plan.max_steps()))
        .collect();
    let mut running: Vec<usize> = (0..items.len())
        .filter(|&i| items[i].plan.max_steps() > 0)
        .collect();
    let mut inputs: Vec<Vec<u32>> = running
        .iter()
        .map(|&i| items[i].prompt_ids.to_vec())
        .collect();
    let mut cache = model.new_cache(running.len());
    while !running.is_empty() {
        let tokens: Vec<&[u32]> = inputs.iter().map(Vec::as_slice).collect();
        let logits = pass(&tokens, &mut cache, &running, head_for(items, &running))?;
        let mut keep = Vec::with_capacity(running.len());
        let mut next_inputs = Vec::with_capacity(running.len());
        for (row, &i) in running.iter().enumerate() {
            let step = responses[i].len();
            let token = match (&items[i].plan, choosers[i].as_mut(), &logits) {
                (ResponsePlan::Replay(ids), _, _) => ids[step],
                (_, Some(chooser), Some(logits)) => {
                    chooser.choose(&logits.get(row)?.to_vec1::<f32>()?)
                }
                (ResponsePlan::Generate { .. }, _, _) => {
                    unreachable!("a generate plan has a chooser and its passes compute logits")
                }
            };
            responses[i].push(token);
            on_token(i);
            let ended = match items[i].plan {
                ResponsePlan::Generate { eos_ids, .. } => eos_ids.contains(&token),
                ResponsePlan::Replay(_) => false,
            };
            if !ended && responses[i].len() < items[i].plan.max_steps() {
                keep.push(row);
                next_inputs.push(vec![token]);
            }
        }
        cache.retain(&keep)?;
        running = keep.iter().map(|&row| running[row]).collect();
        inputs = next_inputs;
    }
    Ok(responses)
}

/// Generates without capturing anything (the baseline of the benchmarks).
pub fn generate(
    model: &Gemma2,
    prompt_ids: &[u32],
    plan: ResponsePlan<'_>,
    on_token: &mut dyn FnMut(),
) -> candle_core::Result<Vec<u32>> {
    let items = [BatchItem { prompt_ids, plan }];
    let none = CaptureRequest::default();
    let mut responses = run_steps(
        model,
        &items,
        |tokens, cache, _, head| Ok(host(model.forward_batch(tokens, cache, &none, head)?)?.logits),
        &mut |_| on_token(),
    )?;
    Ok(responses.remove(0))
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
    let items = [BatchItem { prompt_ids, plan }];
    let mut traces = capture_batch(model, &items, request, &mut |_| on_token())?;
    Ok(traces.remove(0))
}

/// [`capture_prompt`] for a batch: every item's prompt and response steps
/// run in shared passes, and each item's trace equals the one it would get
/// alone (within float tolerance: batched products sum in another order).
/// `on_token` gets the item index of each response token.
pub fn capture_batch(
    model: &Gemma2,
    items: &[BatchItem<'_>],
    request: &CaptureRequest,
    on_token: &mut dyn FnMut(usize),
) -> candle_core::Result<Vec<PromptTrace>> {
    let new_traces = |item: &BatchItem<'_>| -> Vec<LayerTrace> {
        let (prompt_len, max_steps) = (item.prompt_ids.len(), item.plan.max_steps());
        request
            .layers
            .iter()
            .enumerate()
            .filter(|(_, wants)| **wants != Default::default())
            .map(|(layer, wants)| LayerTrace::for_prompt(layer, *wants, prompt_len, max_steps))
            .collect()
    };
    let mut layers: Vec<Vec<LayerTrace>> = items.iter().map(new_traces).collect();
    let responses = run_steps(
        model,
        items,
        |tokens, cache, running, head| {
            let out = host(model.forward_batch(tokens, cache, request, head)?)?;
            for (row, &i) in running.iter().enumerate() {
                record_pass(&mut layers[i], &out.sequence(row)?)?;
            }
            Ok(out.logits)
        },
        on_token,
    )?;
    Ok(items
        .iter()
        .zip(responses)
        .zip(layers)
        .map(|((item, response_ids), layers)| PromptTrace {
            prompt_ids: item.prompt_ids.to_vec(),
            response_ids,
            layers,
        })
        .collect())
}

/// Moves a pass's logits and records to the host in f32 (a no-op on the CPU
/// in f32). Off the CPU everything goes in one transfer: each copy from a GPU
/// synchronises, and a residual pass records 78 tensors.
fn host(out: BatchOutput) -> candle_core::Result<BatchOutput> {
    if out.device().is_cpu() {
        out.map_tensors(|t| t.to_dtype(DType::F32))
    } else {
        gather_to_host(out)
    }
}

/// [`host`] in one transfer: every tensor flattened into one f32 buffer on
/// its device, copied once, and split back into views of the host copy.
fn gather_to_host(out: BatchOutput) -> candle_core::Result<BatchOutput> {
    let mut flat = Vec::new();
    let out = out.map_tensors(|t| {
        flat.push(t.to_dtype(DType::F32)?.flatten_all()?);
        Ok(t.clone())
    })?;
    if flat.is_empty() {
        // Neither logits nor records (a replayed pass capturing nothing).
        return Ok(out);
    }
    let all = Tensor::cat(&flat, 0)?.to_device(&Device::Cpu)?;
    let mut offset = 0;
    out.map_tensors(|t| {
        let n = t.elem_count();
        let host = all.narrow(0, offset, n)?.reshape(t.shape())?;
        offset += n;
        Ok(host)
    })
}

fn record_pass(layers: &mut [LayerTrace], records: &[LayerRecord]) -> candle_core::Result<()> {
    for trace in layers {
        trace.push(&records[trace.layer])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{LayerRecord, PassLayout};

    #[test]
    fn a_pass_with_nothing_to_transfer_gathers_nothing() {
        // A replayed pass (no logits) capturing nothing.
        let logits = Tensor::zeros((1, 5), DType::F32, &Device::Cpu).unwrap();
        let layout = PassLayout {
            start: 0,
            t: 1,
            new: vec![vec![Some(0)]],
        };
        let mut out = BatchOutput::for_tests(logits, vec![LayerRecord::default(); 2], layout);
        out.logits = None;
        let gathered = gather_to_host(out).unwrap();
        assert!(gathered.logits.is_none());
        assert!(gathered.records.iter().all(|r| r.residual_in.is_none()));
    }

    #[test]
    fn one_gathered_transfer_equals_per_tensor_copies() {
        let t = |shape: &[usize], seed: f32| {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n).map(|i| seed + i as f32 * 0.5).collect();
            Tensor::from_vec(data, shape, &Device::Cpu)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap()
        };
        let out = BatchOutput::for_tests(
            t(&[2, 5], 0.0),
            vec![
                LayerRecord {
                    residual_in: Some(t(&[2, 3, 4], 1.0)),
                    attention_heads: Some(t(&[2, 2, 3, 3], 2.0)),
                    ..LayerRecord::default()
                },
                LayerRecord::default(),
                LayerRecord {
                    gelu: Some(t(&[2, 3, 6], 3.0)),
                    ..LayerRecord::default()
                },
            ],
            PassLayout {
                start: 0,
                t: 3,
                new: vec![vec![Some(0), Some(1), Some(2)]; 2],
            },
        );
        let expected = out.clone().map_tensors(|t| t.to_dtype(DType::F32)).unwrap();
        let gathered = gather_to_host(out).unwrap();
        let values = |o: &BatchOutput| {
            let logits = o.logits.as_ref().expect("logits");
            let mut all = vec![logits.flatten_all().unwrap().to_vec1::<f32>().unwrap()];
            for r in &o.records {
                for x in [&r.residual_in, &r.attention_heads, &r.gelu]
                    .into_iter()
                    .flatten()
                {
                    assert_eq!(x.dtype(), DType::F32);
                    all.push(x.flatten_all().unwrap().to_vec1::<f32>().unwrap());
                }
            }
            all
        };
        assert_eq!(values(&gathered), values(&expected));
        assert_eq!(
            gathered.records[0].attention_heads.as_ref().unwrap().dims(),
            &[2, 2, 3, 3]
        );
        assert!(gathered.records[1].residual_in.is_none());
    }
}
