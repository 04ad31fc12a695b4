//! Batched capture equals one-at-a-time capture: prompts of different lengths
//! (padding, a prompt longer than the sliding window), sequences finishing
//! at different steps (an end token, short and long replays, sampling).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use super::decode::Sampling;
use super::engine::{
    BatchItem, ResponsePlan, StepPhases, TokenSite, capture_batch, capture_batch_at,
    capture_batch_profiled, capture_prompt,
};
use super::trace::{PromptTrace, Rows};
use crate::loader::ModelMeta;
use crate::model::{CaptureRequest, Gemma2, LayerWants};
use crate::model_files::ModelSource;

/// The tiny fixture checkpoint on `device`, computing in `dtype`; from
/// `CAPTURE_TINY_MODEL` when set (a test binary run on another machine).
pub(crate) fn tiny_on(device: &Device, dtype: DType) -> (ModelMeta, Gemma2) {
    let dir = std::env::var_os("CAPTURE_TINY_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-gemma2")
        });
    let meta = ModelMeta::load(&ModelSource::new(dir.to_str().unwrap())).unwrap();
    let model = meta.load_model(device, dtype).unwrap();
    (meta, model)
}

/// Every tensor of every layer: even layers per-head attention, odd layers
/// the head mean.
pub(super) fn everything(layers: usize) -> CaptureRequest {
    let all = LayerWants {
        residual: true,
        attention_mean: false,
        attention_heads: true,
        projections: true,
    };
    let mean = LayerWants {
        attention_mean: true,
        attention_heads: false,
        ..all
    };
    CaptureRequest {
        layers: (0..layers)
            .map(|l| if l % 2 == 0 { all } else { mean })
            .collect(),
    }
}

/// A short prompt and one longer than the fixture's sliding window.
fn short_and_long(meta: &ModelMeta) -> (Vec<u32>, Vec<u32>) {
    let encode = |text: &str| meta.tokenizer.encode_prompt(text).unwrap();
    (
        encode("Hi"),
        encode("Write a long and careful answer about bridges, tunnels and their builders."),
    )
}

fn assert_rows_close(what: &str, a: &Rows, b: &Rows) {
    assert_eq!(a.width, b.width, "{what}: width");
    assert_eq!(a.data.len(), b.data.len(), "{what}: positions");
    let worst = a
        .data
        .iter()
        .zip(&b.data)
        .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
        .fold(0f32, |worst, d| {
            if d.is_nan() {
                f32::INFINITY
            } else {
                worst.max(d)
            }
        });
    assert!(worst < 1e-4, "{what}: relative difference {worst}");
}

fn assert_traces_close(name: &str, batched: &PromptTrace, alone: &PromptTrace) {
    assert_eq!(batched.prompt_ids, alone.prompt_ids, "{name}");
    assert_eq!(batched.response_ids, alone.response_ids, "{name}: response");
    assert_eq!(batched.layers.len(), alone.layers.len());
    for (b, a) in batched.layers.iter().zip(&alone.layers) {
        let what = |kind: &str| format!("{name} layer {} {kind}", a.layer);
        for (kind, x, y) in [
            ("residual_in", &b.residual_in, &a.residual_in),
            ("after_attn", &b.after_attn, &a.after_attn),
            ("residual_out", &b.residual_out, &a.residual_out),
            ("q_proj", &b.q_proj, &a.q_proj),
            ("k_proj", &b.k_proj, &a.k_proj),
            ("v_proj", &b.v_proj, &a.v_proj),
            ("up_proj", &b.up_proj, &a.up_proj),
            ("gelu", &b.gelu, &a.gelu),
            ("down_proj", &b.down_proj, &a.down_proj),
        ] {
            assert_rows_close(&what(kind), x, y);
        }
        assert_eq!(b.attention.heads, a.attention.heads);
        for (h, (rb, ra)) in b.attention.rows.iter().zip(&a.attention.rows).enumerate() {
            assert_eq!(rb.len(), ra.len(), "{}", what("attention rows"));
            for (p, (x, y)) in rb.iter().zip(ra).enumerate() {
                let rows = |v: &Vec<f32>| Rows {
                    width: v.len(),
                    data: v.clone(),
                };
                assert_rows_close(
                    &what(&format!("attention head {h} row {p}")),
                    &rows(x),
                    &rows(y),
                );
            }
        }
    }
}

#[test]
fn batched_capture_equals_one_at_a_time() {
    let (meta, model) = tiny_on(&Device::Cpu, DType::F32);
    batched_equals_one_at_a_time(&meta, &model);
}

/// Captures five prompts in one batch (padding, the sliding window, an end
/// token mid-batch, replays, sampling) and each alone; all within 1e-4.
pub(super) fn batched_equals_one_at_a_time(meta: &ModelMeta, model: &Gemma2) {
    let encode = |text: &str| meta.tokenizer.encode_prompt(text).unwrap();
    let short = encode("Hi");
    let medium = encode("Is it safe to eat raw cookie dough?");
    let long = encode(
        "Write a long and careful answer about the history of bridges, tunnels and the people who built them.",
    );
    assert!(
        long.len() > model.config().sliding_window,
        "exercise the window"
    );
    let greedy = Sampling::Greedy;
    let sampled = Sampling::Temperature {
        temperature: 0.8,
        top_p: Some(0.9),
        seed: 11,
    };
    let generate = |sampling, max_new_tokens, eos_ids, prompt_key| ResponsePlan::Generate {
        sampling,
        max_new_tokens,
        eos_ids,
        prompt_key,
    };
    let request = everything(model.config().num_hidden_layers);
    // An end token the greedy medium prompt produces at its third step, so it
    // leaves the batch early.
    let free = capture_prompt(
        model,
        &medium,
        &request,
        generate(&greedy, 9, &[], "t/2"),
        &mut || {},
    )
    .unwrap();
    let eos = [free.response_ids[2]];
    let replay_short = [7u32, 8];
    let replay_long = [3u32, 30, 300, 12, 44, 9, 1000];
    let items = [
        BatchItem {
            prompt_ids: &long,
            plan: generate(&greedy, 6, &[], "t/1"),
        },
        BatchItem {
            prompt_ids: &medium,
            plan: generate(&greedy, 9, &eos, "t/2"),
        },
        BatchItem {
            prompt_ids: &short,
            plan: ResponsePlan::Replay(&replay_short),
        },
        BatchItem {
            prompt_ids: &medium,
            plan: generate(&sampled, 5, &[], "t/4"),
        },
        BatchItem {
            prompt_ids: &short,
            plan: ResponsePlan::Replay(&replay_long),
        },
    ];
    let mut tokens_of = vec![0usize; items.len()];
    let batched = capture_batch(model, &items, &request, &mut |i| tokens_of[i] += 1).unwrap();
    assert!(batched[1].response_ids.len() <= 3, "ended by its end token");
    for (i, item) in items.iter().enumerate() {
        let alone =
            capture_prompt(model, item.prompt_ids, &request, item.plan, &mut || {}).unwrap();
        assert_eq!(
            tokens_of[i],
            alone.response_ids.len(),
            "item {i}: token callbacks"
        );
        assert_traces_close(&format!("item {i}"), &batched[i], &alone);
    }
}

/// The bench's profiled batch captures what an unprofiled one does and
/// counts one pass per step, each queued before it is finished.
#[test]
fn a_profiled_batch_captures_the_same_and_counts_its_passes() {
    let (meta, model) = tiny_on(&Device::Cpu, DType::F32);
    let (short, long) = short_and_long(&meta);
    let plan = ResponsePlan::Generate {
        sampling: &Sampling::Greedy,
        max_new_tokens: 4,
        eos_ids: &[],
        prompt_key: "p",
    };
    let items = [
        BatchItem {
            prompt_ids: &short,
            plan,
        },
        BatchItem {
            prompt_ids: &long,
            plan: ResponsePlan::Replay(&[5, 6]),
        },
    ];
    let request = everything(model.config().num_hidden_layers);
    let plain = capture_batch(&model, &items, &request, &mut |_| {}).unwrap();
    let mut phases = StepPhases::default();
    let profiled = capture_batch_profiled(&model, &items, &request, &mut phases).unwrap();
    for (i, (a, b)) in profiled.iter().zip(&plain).enumerate() {
        assert_eq!(a.response_ids, b.response_ids, "item {i}");
        assert_traces_close(&format!("item {i}"), a, b);
    }
    // The prompt pass and 3 decode passes (the last token is not fed back).
    assert_eq!(phases.passes, 4);
    assert!(phases.queued > std::time::Duration::ZERO);
    assert!(phases.queued <= phases.forward, "{phases:?}");
    assert!(phases.record > std::time::Duration::ZERO, "{phases:?}");
}

/// A padded batch mixing generation and replay: the long and the short
/// prompt generating `max_new_tokens` with `sampling`, and the short one
/// replaying `replay`.
fn greedy_and_replayed<'a>(
    (long, short): (&'a [u32], &'a [u32]),
    sampling: &'a Sampling,
    max_new_tokens: usize,
    replay: &'a [u32],
) -> [BatchItem<'a>; 3] {
    let generate = |prompt_key| ResponsePlan::Generate {
        sampling,
        max_new_tokens,
        eos_ids: &[],
        prompt_key,
    };
    [
        BatchItem {
            prompt_ids: long,
            plan: generate("t/1"),
        },
        BatchItem {
            prompt_ids: short,
            plan: generate("t/2"),
        },
        BatchItem {
            prompt_ids: short,
            plan: ResponsePlan::Replay(replay),
        },
    ]
}

/// Whether some recorded residual differs in its bits between two runs'
/// traces (a check that a test's two paths did run differently).
fn residuals_differ(a: &[PromptTrace], b: &[PromptTrace]) -> bool {
    a.iter().zip(b).any(|(x, y)| {
        x.layers
            .iter()
            .zip(&y.layers)
            .any(|(p, q)| p.residual_out.data != q.residual_out.data)
    })
}

/// Decode steps computing their attention as one operation (as on a GPU)
/// capture what the separate operations capture, in a padded batch that
/// passes the sliding window; layers recording attention probabilities
/// keep the separate operations in the same passes.
#[test]
fn one_operation_decode_attention_captures_what_separate_operations_do() {
    let (meta, model) = tiny_on(&Device::Cpu, DType::F32);
    let fused = model.clone().with_decode_attention_on_cpu();
    let (short, long) = short_and_long(&meta);
    let greedy = Sampling::Greedy;
    let items = greedy_and_replayed((&long, &short), &greedy, 9, &[5, 6, 7, 8]);
    let layers = meta.config.num_hidden_layers;
    let residual = LayerWants {
        residual: true,
        projections: true,
        ..LayerWants::default()
    };
    let request = CaptureRequest {
        layers: (0..layers)
            .map(|l| LayerWants {
                attention_mean: l == 1,
                ..residual
            })
            .collect(),
    };
    let run = |model| capture_batch(model, &items, &request, &mut |_| {}).unwrap();
    let (one, separate) = (run(&fused), run(&model));
    assert!(one[0].prompt_ids.len() + 9 > meta.config.sliding_window);
    for (i, (o, s)) in one.iter().zip(&separate).enumerate() {
        assert_eq!(o.response_ids.len(), s.response_ids.len(), "item {i}");
        assert_traces_close(&format!("item {i}"), o, s);
    }
    // And they are not the same bits: the operation was used.
    assert!(
        residuals_differ(&one, &separate),
        "decode steps used the separate operations"
    );
}

/// Decode steps of up to 4 sequences through the GPU's projection
/// operation (its CPU form, f32 sums in index order; the CPU is told to use
/// it here) capture what candle's matmuls do, within f32 rounding: the
/// model passes the operation its operands as the matmul takes them. A
/// batch of 3 (decode steps through it, the prompt pass through the
/// matmul) and one prompt alone.
#[test]
fn decode_projection_captures_what_the_matmuls_do() {
    use crate::model::decode_projection::tests::on_cpu_in;
    let (meta, model) = tiny_on(&Device::Cpu, DType::F32);
    let (short, long) = short_and_long(&meta);
    let greedy = Sampling::Greedy;
    let items = greedy_and_replayed((&long, &short), &greedy, 6, &[5, 6, 7]);
    let request = everything(meta.config.num_hidden_layers);
    for items in [&items[..], &items[1..2]] {
        let run = || capture_batch(&model, items, &request, &mut |_| {}).unwrap();
        let (kernel, matmul) = (on_cpu_in(run), run());
        for (i, (k, m)) in kernel.iter().zip(&matmul).enumerate() {
            assert_eq!(k.response_ids, m.response_ids, "item {i}");
            assert_traces_close(&format!("item {i} of {}", items.len()), k, m);
        }
        assert!(
            residuals_differ(&kernel, &matmul),
            "decode steps used the matmul"
        );
    }
}

/// Greedy tokens chosen where the logits are (what a GPU does) are the
/// host's choices, and the traces are the same bits; the CPU runs the device
/// path here by being told to. A sampled item in the batch still samples.
#[test]
fn tokens_chosen_on_the_device_are_the_hosts() {
    let (meta, model) = tiny_on(&Device::Cpu, DType::F32);
    let (short, long) = short_and_long(&meta);
    let greedy = Sampling::Greedy;
    let sampled = Sampling::Temperature {
        temperature: 0.8,
        top_p: None,
        seed: 3,
    };
    let generate = |sampling, prompt_key| ResponsePlan::Generate {
        sampling,
        max_new_tokens: 8,
        eos_ids: &[],
        prompt_key,
    };
    let replay = [5u32, 6, 7];
    let items = [
        BatchItem {
            prompt_ids: &long,
            plan: generate(&greedy, "t/1"),
        },
        BatchItem {
            prompt_ids: &short,
            plan: generate(&greedy, "t/2"),
        },
        BatchItem {
            prompt_ids: &short,
            plan: ResponsePlan::Replay(&replay),
        },
        BatchItem {
            prompt_ids: &long,
            plan: generate(&sampled, "t/4"),
        },
    ];
    let request = everything(meta.config.num_hidden_layers);
    let capture =
        |site| capture_batch_at(&model, &items, &request, site, None, &mut |_| {}).unwrap();
    let (device, host) = (capture(TokenSite::Device), capture(TokenSite::Host));
    assert!(device[0].response_ids.len() == 8 && device[3].response_ids.len() == 8);
    for (i, (d, h)) in device.iter().zip(&host).enumerate() {
        assert_eq!(d.response_ids, h.response_ids, "item {i}");
        for (ld, lh) in d.layers.iter().zip(&h.layers) {
            assert_eq!(ld.residual_out.data, lh.residual_out.data, "item {i}");
            assert_eq!(ld.attention.rows, lh.attention.rows, "item {i}");
        }
    }
    // On the CPU the batch's logits stay on the host unless told otherwise.
    assert_eq!(TokenSite::for_batch(&model, &items), TokenSite::Host);
}

/// The tiny fixture re-saved the way Gemma-2 is released (every tensor in
/// bf16), in a temporary checkpoint directory.
fn tiny_bf16_checkpoint() -> (tempfile::TempDir, ModelMeta) {
    let (meta, _) = tiny_on(&Device::Cpu, DType::F32);
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&meta.files.dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    let mut tensors = std::collections::HashMap::new();
    for file in &meta.files.safetensors {
        for (name, t) in candle_core::safetensors::load(file, &Device::Cpu).unwrap() {
            tensors.insert(name, t.to_dtype(DType::BF16).unwrap());
        }
    }
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
    let meta = ModelMeta::load(&ModelSource::new(dir.path().to_str().unwrap())).unwrap();
    (dir, meta)
}

#[test]
fn bf16_stored_weights_capture_what_their_f32_widening_captures() {
    use crate::model::Weights;
    let (_dir, meta) = tiny_bf16_checkpoint();
    let files = &meta.files.safetensors;
    // Computing in f32 on the CPU keeps the released bf16 matrices as they
    // are; computing in bf16 has nothing to keep apart.
    let kept = Weights::from_safetensors(files, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(kept.matrix_dtype(), DType::BF16);
    let bf16 = Weights::from_safetensors(files, DType::BF16, &Device::Cpu).unwrap();
    assert_eq!(bf16.matrix_dtype(), DType::BF16);
    let widened = kept.with_matrices_in(DType::F32).unwrap();
    assert_eq!(widened.matrix_dtype(), DType::F32);

    let model = meta.load_model(&Device::Cpu, DType::F32).unwrap();
    assert_eq!(model.matrix_dtype(), DType::BF16);
    let reference = Gemma2::new(&meta.config, widened).unwrap();
    assert_eq!(reference.matrix_dtype(), DType::F32);
    let (short, long) = short_and_long(&meta);
    // A prompt pass of this many rows alone goes through the blocked
    // product (`model::bf16_blocks`), the others through the widening one.
    let longest: Vec<u32> = long.iter().cycle().take(130).copied().collect();
    assert!(longest.len() >= crate::model::bf16_blocks::MIN_VECTORS);
    assert!(long.len() < crate::model::bf16_blocks::MIN_VECTORS);
    let greedy = Sampling::Greedy;
    let generate = |prompt_key| ResponsePlan::Generate {
        sampling: &greedy,
        max_new_tokens: 6,
        eos_ids: &[],
        prompt_key,
    };
    let items = [
        BatchItem {
            prompt_ids: &long,
            plan: generate("t/1"),
        },
        BatchItem {
            prompt_ids: &short,
            plan: generate("t/2"),
        },
        BatchItem {
            prompt_ids: &longest,
            plan: generate("t/3"),
        },
    ];
    let request = everything(meta.config.num_hidden_layers);
    // Batched (a prompt pass of many vectors, decode steps of a few) and
    // alone (prompt passes of fewer vectors but the longest's, one vector
    // per decode step): every kernel shape against the f32 GEMM path.
    let ours = capture_batch(&model, &items, &request, &mut |_| {}).unwrap();
    let theirs = capture_batch(&reference, &items, &request, &mut |_| {}).unwrap();
    for (i, item) in items.iter().enumerate() {
        assert_traces_close(&format!("batched item {i}"), &ours[i], &theirs[i]);
        let alone = capture_prompt(&model, item.prompt_ids, &request, item.plan, &mut || {});
        assert_traces_close(&format!("item {i} alone"), &alone.unwrap(), &theirs[i]);
    }
}

#[test]
fn a_pass_that_skips_the_head_records_what_a_pass_with_logits_records() {
    use crate::model::Head;
    let (meta, model) = tiny_on(&Device::Cpu, DType::F32);
    let encode = |text: &str| meta.tokenizer.encode_prompt(text).unwrap();
    let prompts = [encode("Hi"), encode("A longer prompt about rivers")];
    let inputs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let request = everything(meta.config.num_hidden_layers);
    let (mut with_cache, mut without_cache) = (model.new_cache(2), model.new_cache(2));
    let with = model
        .forward_batch(&inputs, &mut with_cache, &request, Head::Logits)
        .unwrap();
    let without = model
        .forward_batch(&inputs, &mut without_cache, &request, Head::Skip)
        .unwrap();
    assert_eq!(
        with.logits.as_ref().unwrap().dims(),
        &[2, meta.config.vocab_size]
    );
    assert!(without.logits.is_none());
    for row in 0..2 {
        let (a, b) = (with.sequence(row).unwrap(), without.sequence(row).unwrap());
        for (x, y) in a.iter().zip(&b) {
            let flat = |t: &Option<candle_core::Tensor>| {
                t.as_ref()
                    .map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            };
            assert_eq!(flat(&x.residual_out), flat(&y.residual_out));
            assert_eq!(flat(&x.attention_heads), flat(&y.attention_heads));
        }
    }
    for (row, prompt) in prompts.iter().enumerate() {
        assert_eq!(without_cache.positions(row), prompt.len());
    }
}
