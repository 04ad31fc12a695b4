//! The generation loop: one forward pass per response step with a KV cache,
//! recording from the same passes that choose the tokens (capture-semantics.md,
//! "Generation steps").

use std::collections::HashMap;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor, TensorId};
use rayon::prelude::*;

use super::decode::{Sampling, TokenChooser, argmax_rows};
use super::trace::{LayerTrace, PromptTrace};
use crate::model::{BatchOutput, CaptureRequest, Gemma2, Head, LayerRecord};

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

/// Where greedy tokens are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TokenSite {
    /// From the logits copied to the host (any sampling).
    Host,
    /// On the model's device ([`argmax_rows`]), which then sends one number
    /// per sequence instead of its logits; only when every generated
    /// response is greedy.
    Device,
}

impl TokenSite {
    /// The device when it is not the CPU (where logits already are on the
    /// host) and every generating item is greedy.
    pub(super) fn for_batch(model: &Gemma2, items: &[BatchItem<'_>]) -> Self {
        let greedy = items.iter().all(|item| match item.plan {
            ResponsePlan::Generate { sampling, .. } => *sampling == Sampling::Greedy,
            ResponsePlan::Replay(_) => true,
        });
        if greedy && !model.device().is_cpu() {
            TokenSite::Device
        } else {
            TokenSite::Host
        }
    }
}

/// What a pass leaves to choose the next tokens from.
enum Scores {
    /// `[running, vocab]` f32 logits on the host.
    Host(Tensor),
    /// Greedy tokens chosen on the device; a row it left (`None`: a NaN
    /// among its logits) or a sampled one is chosen on the host from the
    /// device's logits.
    Device {
        chosen: Vec<Option<u32>>,
        logits: Tensor,
    },
}

impl Scores {
    fn choose(&self, row: usize, chooser: &mut TokenChooser) -> candle_core::Result<u32> {
        let logits = match self {
            Scores::Host(logits) => logits,
            Scores::Device { chosen, logits } => match chosen[row] {
                Some(token) if chooser.is_greedy() => return Ok(token),
                _ => logits,
            },
        };
        Ok(chooser.choose(&logits.get(row)?.to_vec1::<f32>()?))
    }
}

/// Where a batch's time goes, summed over its passes (`worker bench`'s
/// breakdown). Timing the forward pass apart waits for the device to finish
/// it, so a profiled batch on a GPU runs a little slower than a plain one.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepPhases {
    pub passes: usize,
    /// The forward passes, until the device has finished them.
    pub forward: Duration,
    /// The part of `forward` until the pass was queued (the host's work:
    /// launching kernels, allocating). On the CPU a pass computes before it
    /// returns, so this is all of `forward`; on a GPU, `forward` much
    /// longer than this means the device is the bound, about equal means
    /// the host is (kernel launches and their bookkeeping).
    pub queued: Duration,
    /// Records (and logits, or tokens chosen on the device) to the host.
    pub to_host: Duration,
    /// Each sequence's records appended to its trace.
    pub record: Duration,
    /// Next tokens chosen, finished sequences dropped from the cache.
    pub choose: Duration,
}

/// Runs the steps of every item's plan in lock step: one pass over the
/// padded prompts, then one decode pass per step over the sequences still
/// running; a sequence leaves the batch (and the cache) once its plan is done.
/// Each pass computes what `request` asks for and logits unless every running
/// item replays ([`head_for`]); `record` gets each pass's records, on the
/// host in f32, and that pass's running sequences' item indices, in pass
/// order, once the next pass is queued; `on_token` runs after
/// each response token with its item index; `phases`, when given, sums
/// where the time went. Returns every item's response ids.
fn run_steps(
    model: &Gemma2,
    items: &[BatchItem<'_>],
    request: &CaptureRequest,
    site: TokenSite,
    mut phases: Option<&mut StepPhases>,
    mut record: impl FnMut(&BatchOutput, &[usize]) -> candle_core::Result<()>,
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
    // Room for the longest prompt and every decode step (the last response
    // token is not fed back): passes write into the cache in place.
    let longest_prompt = inputs.iter().map(Vec::len).max().unwrap_or(0);
    let most_steps = running.iter().map(|&i| items[i].plan.max_steps()).max();
    cache.reserve(longest_prompt + most_steps.unwrap_or(0).saturating_sub(1));
    // A pass's records are appended to the traces once the next pass is
    // queued: a GPU runs that pass's kernels while the host appends, instead
    // of waiting for it. (On the CPU a pass computes before it returns, so
    // this changes nothing there but the order.)
    let mut unrecorded: Option<(BatchOutput, Vec<usize>)> = None;
    while !running.is_empty() {
        let tokens: Vec<&[u32]> = inputs.iter().map(Vec::as_slice).collect();
        let started = Instant::now();
        let out = model.forward_batch(&tokens, &mut cache, request, head_for(items, &running))?;
        let queued = Instant::now();
        if phases.is_some() {
            model.device().synchronize()?;
        }
        let forwarded = Instant::now();
        if let Some((previous, rows)) = unrecorded.take() {
            record(&previous, &rows)?;
        }
        let recorded = Instant::now();
        let (out, scores) = host(out, site)?;
        let hosted = Instant::now();
        let mut keep = Vec::with_capacity(running.len());
        let mut next_inputs = Vec::with_capacity(running.len());
        for (row, &i) in running.iter().enumerate() {
            let step = responses[i].len();
            let token = match (&items[i].plan, choosers[i].as_mut(), &scores) {
                (ResponsePlan::Replay(ids), _, _) => ids[step],
                (_, Some(chooser), Some(scores)) => scores.choose(row, chooser)?,
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
        let next_running = keep.iter().map(|&row| running[row]).collect();
        unrecorded = Some((out, std::mem::replace(&mut running, next_running)));
        inputs = next_inputs;
        if let Some(phases) = phases.as_deref_mut() {
            model.device().synchronize()?;
            phases.passes += 1;
            phases.forward += forwarded - started;
            phases.queued += queued - started;
            phases.record += recorded - forwarded;
            phases.to_host += hosted - recorded;
            phases.choose += hosted.elapsed();
        }
    }
    if let Some((last, rows)) = unrecorded {
        let started = Instant::now();
        record(&last, &rows)?;
        if let Some(phases) = phases {
            phases.record += started.elapsed();
        }
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
    let mut responses = run_steps(
        model,
        &items,
        &CaptureRequest::default(),
        TokenSite::for_batch(model, &items),
        None,
        |_, _| Ok(()),
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
    let site = TokenSite::for_batch(model, items);
    capture_batch_at(model, items, request, site, None, on_token)
}

/// [`capture_batch`], summing where its time goes into `phases`.
pub fn capture_batch_profiled(
    model: &Gemma2,
    items: &[BatchItem<'_>],
    request: &CaptureRequest,
    phases: &mut StepPhases,
) -> candle_core::Result<Vec<PromptTrace>> {
    let site = TokenSite::for_batch(model, items);
    capture_batch_at(model, items, request, site, Some(phases), &mut |_| {})
}

/// [`capture_batch`] choosing tokens at `site`.
pub(super) fn capture_batch_at(
    model: &Gemma2,
    items: &[BatchItem<'_>],
    request: &CaptureRequest,
    site: TokenSite,
    phases: Option<&mut StepPhases>,
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
        request,
        site,
        phases,
        |out, running| {
            // Sequences in parallel: appending a batch's records is memory
            // bound (0.7 MB per sequence and step for a residual capture of
            // gemma-2-2b) and a GPU waits for it.
            let mut traces: Vec<(usize, &mut Vec<LayerTrace>)> = Vec::with_capacity(running.len());
            let mut rest = layers.iter_mut().enumerate();
            for (row, &i) in running.iter().enumerate() {
                let traces_of_i = rest
                    .find(|(item, _)| *item == i)
                    .map(|(_, traces)| traces)
                    .expect("running items are distinct and in item order");
                traces.push((row, traces_of_i));
            }
            traces
                .into_par_iter()
                .try_for_each(|(row, traces)| record_pass(traces, &out.sequence(row)?))
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

/// Moves a pass's records to the host in f32 and returns what to choose the
/// next tokens from: the logits, moved with the records, or at
/// [`TokenSite::Device`] the tokens chosen where the logits are.
fn host(
    mut out: BatchOutput,
    site: TokenSite,
) -> candle_core::Result<(BatchOutput, Option<Scores>)> {
    let chosen = match (site, out.logits.take()) {
        (TokenSite::Device, Some(logits)) => Some(Scores::Device {
            chosen: argmax_rows(&logits)?,
            logits,
        }),
        (_, logits) => {
            out.logits = logits;
            None
        }
    };
    let mut out = records_to_host(out)?;
    let scores = chosen.or_else(|| out.logits.take().map(Scores::Host));
    Ok((out, scores))
}

/// Moves a pass's logits and records to the host, for the traces to append
/// (`LayerTrace::push` widens any dtype to f32 exactly as it copies). On the
/// CPU they already are there; off it everything goes in one transfer per
/// dtype ([`gather_to_host`]).
fn records_to_host(out: BatchOutput) -> candle_core::Result<BatchOutput> {
    if out.device().is_cpu() {
        Ok(out)
    } else {
        gather_to_host(out)
    }
}

/// [`records_to_host`] in as few transfers as there are dtypes: every
/// distinct tensor (a layer's `residual_in` is the previous layer's
/// `residual_out`, so a residual capture moves 53 tensors, not 78) is
/// flattened into one buffer per dtype on its device ([`concatenate`]),
/// copied once, and split back into views of the host copy. bf16 tensors
/// travel as bf16 (half the bytes of f32) and are widened on the host as
/// they are appended; other dtypes travel as f32. Each copy from a GPU
/// synchronises, and every small tensor moved alone would cost a kernel and
/// a copy.
fn gather_to_host(out: BatchOutput) -> candle_core::Result<BatchOutput> {
    let wire = |t: &Tensor| match t.dtype() {
        DType::BF16 => DType::BF16,
        _ => DType::F32,
    };
    // The distinct tensors in order, and each visited tensor's index there.
    let mut distinct: Vec<Tensor> = Vec::new();
    let mut index_of: HashMap<TensorId, usize> = HashMap::new();
    let mut visited = Vec::new();
    let out = out.map_tensors(|t| {
        let index = *index_of.entry(t.id()).or_insert_with(|| {
            distinct.push(t.clone());
            distinct.len() - 1
        });
        visited.push(index);
        Ok(t.clone())
    })?;
    let mut hosted: Vec<Option<Tensor>> = vec![None; distinct.len()];
    for dtype in [DType::BF16, DType::F32] {
        let group: Vec<usize> = (0..distinct.len())
            .filter(|&i| wire(&distinct[i]) == dtype)
            .collect();
        if group.is_empty() {
            continue;
        }
        let flat = group
            .iter()
            .map(|&i| distinct[i].to_dtype(dtype)?.flatten_all())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let all = concatenate(&flat)?.to_device(&Device::Cpu)?;
        let mut offset = 0;
        for &i in &group {
            let n = distinct[i].elem_count();
            hosted[i] = Some(all.narrow(0, offset, n)?.reshape(distinct[i].shape())?);
            offset += n;
        }
    }
    let mut visited = visited.into_iter();
    out.map_tensors(|_| {
        let index = visited.next().expect("both walks visit the same tensors");
        Ok(hosted[index]
            .clone()
            .expect("every distinct tensor was moved"))
    })
}

/// `Tensor::cat(flat, 0)` of one-dimensional tensors of one dtype: on a GPU
/// one kernel (`capture_kernels::gather`) instead of a copy kernel per
/// tensor (53 for a residual capture of gemma-2-2b), unless
/// `CAPTURE_UNFUSED=1` asks for candle's operations.
fn concatenate(flat: &[Tensor]) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if flat.first().is_some_and(|t| t.device().is_cuda()) && !crate::model::fused::unfused() {
        return capture_kernels::gather(flat);
    }
    Tensor::cat(flat, 0)
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
    fn one_gathered_transfer_per_dtype_equals_per_tensor_copies() {
        let t = |shape: &[usize], seed: f32, dtype: DType| {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n).map(|i| seed + i as f32 * 0.5).collect();
            Tensor::from_vec(data, shape, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        // Layer 0's output is layer 2's input: the same tensor, twice.
        let shared = t(&[2, 3, 4], 4.0, DType::BF16);
        let out = BatchOutput::for_tests(
            t(&[2, 5], 0.0, DType::F32),
            vec![
                LayerRecord {
                    residual_in: Some(t(&[2, 3, 4], 1.0, DType::BF16)),
                    residual_out: Some(shared.clone()),
                    attention_heads: Some(t(&[2, 2, 3, 3], 2.0, DType::F32)),
                    ..LayerRecord::default()
                },
                LayerRecord::default(),
                LayerRecord {
                    residual_in: Some(shared),
                    gelu: Some(t(&[2, 3, 6], 3.0, DType::F16)),
                    ..LayerRecord::default()
                },
            ],
            PassLayout {
                start: 0,
                t: 3,
                new: vec![vec![Some(0), Some(1), Some(2)]; 2],
            },
        );
        let tensors = |o: &BatchOutput| {
            let mut all = vec![o.logits.clone().expect("logits")];
            for r in &o.records {
                all.extend(
                    [&r.residual_in, &r.residual_out, &r.attention_heads, &r.gelu]
                        .into_iter()
                        .flatten()
                        .cloned(),
                );
            }
            all
        };
        let before = tensors(&out);
        let gathered = gather_to_host(out).unwrap();
        let after = tensors(&gathered);
        assert_eq!(after.len(), before.len());
        for (a, b) in after.iter().zip(&before) {
            // bf16 travels as bf16, anything else as f32; same values.
            let wire = if b.dtype() == DType::BF16 {
                DType::BF16
            } else {
                DType::F32
            };
            assert_eq!(a.dtype(), wire);
            assert_eq!(a.dims(), b.dims());
            assert_eq!(f32_values(a), f32_values(b));
        }
        // The shared tensor moved once: both records view the same bytes.
        let start = |x: &Option<Tensor>| x.as_ref().unwrap().layout().start_offset();
        assert_eq!(
            start(&gathered.records[0].residual_out),
            start(&gathered.records[2].residual_in)
        );
        assert_ne!(
            start(&gathered.records[0].residual_in),
            start(&gathered.records[0].residual_out)
        );
        assert!(gathered.records[1].residual_in.is_none());
    }

    fn f32_values(x: &Tensor) -> Vec<f32> {
        x.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }

    #[test]
    fn a_layers_input_is_the_last_layers_output_and_moves_once() {
        use crate::capture::batch_tests::{everything, tiny_on};
        let (_, model) = tiny_on(&Device::Cpu, DType::BF16);
        let request = everything(model.config().num_hidden_layers);
        let mut cache = model.new_cache(2);
        let out = model
            .forward_batch(
                &[&[2, 10, 11], &[2, 12]],
                &mut cache,
                &request,
                Head::Logits,
            )
            .unwrap();
        let id = |x: &Option<Tensor>| x.as_ref().expect("recorded").id();
        for pair in out.records.windows(2) {
            assert_eq!(id(&pair[1].residual_in), id(&pair[0].residual_out));
        }
        // The model's real records (bf16 rows, f32 attention, projections
        // that are views of the stacked q/k/v output) through the gather.
        let gathered = gather_to_host(out.clone()).unwrap();
        let tensors = |o: &BatchOutput| {
            let mut all = Vec::new();
            o.clone()
                .map_tensors(|x| {
                    all.push(x.clone());
                    Ok(x.clone())
                })
                .unwrap();
            all
        };
        let (after, before) = (tensors(&gathered), tensors(&out));
        // Logits, and per layer 3 residual rows, 1 attention, 6 projections.
        assert_eq!(before.len(), 1 + 10 * model.config().num_hidden_layers);
        assert_eq!(after.len(), before.len());
        for (x, y) in after.iter().zip(&before) {
            assert_eq!(x.dims(), y.dims());
            assert_eq!(f32_values(x), f32_values(y));
        }
    }
}
