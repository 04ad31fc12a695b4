//! The engine on a CUDA GPU (`--features cuda`, run on a machine with one):
//! capture in f32 and bf16 against the CPU in f32, the worker's kernels
//! against their CPU references, batched against one-at-a-time on the GPU,
//! and the device memory read for `--batch-size auto`. Run with `--nocapture` to see the measured errors.

use candle_core::{DType, Device};

use super::batch_tests::{batched_equals_one_at_a_time, everything, tiny_on};
use super::decode::Sampling;
use super::engine::{ResponsePlan, capture_prompt};
use super::trace::{PromptTrace, Rows};
use crate::loader::DeviceArg;
use crate::model::{CaptureRequest, LayerWants};
use crate::run::free_device_memory;

/// The GPU as the worker opens it (`--device cuda`, set up by
/// `capture_kernels::device::prepare`).
fn cuda() -> Device {
    DeviceArg::Cuda(0)
        .open()
        .expect("a CUDA device (these tests need a GPU)")
}

/// `|a - b| / |b|` over whole tensors (Euclidean norms).
fn norm_error(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut diff, mut base) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        diff += f64::from(x - y).powi(2);
        base += f64::from(*y).powi(2);
    }
    (diff / base.max(f64::MIN_POSITIVE)).sqrt()
}

/// The worst norm-relative error over every recorded tensor of two traces
/// of the same tokens, with the tensor that had it.
fn worst_error(gpu: &PromptTrace, cpu: &PromptTrace) -> (f64, String) {
    assert_eq!(gpu.prompt_ids, cpu.prompt_ids);
    assert_eq!(gpu.response_ids, cpu.response_ids);
    assert_eq!(gpu.layers.len(), cpu.layers.len());
    let mut worst = (0f64, String::new());
    let mut see = |what: String, a: &Rows, b: &Rows| {
        assert_eq!((a.width, a.data.len()), (b.width, b.data.len()), "{what}");
        let e = norm_error(&a.data, &b.data);
        if e > worst.0 {
            worst = (e, what);
        }
    };
    for (g, c) in gpu.layers.iter().zip(&cpu.layers) {
        for (kind, x, y) in [
            ("residual_in", &g.residual_in, &c.residual_in),
            ("after_attn", &g.after_attn, &c.after_attn),
            ("residual_out", &g.residual_out, &c.residual_out),
            ("q_proj", &g.q_proj, &c.q_proj),
            ("k_proj", &g.k_proj, &c.k_proj),
            ("v_proj", &g.v_proj, &c.v_proj),
            ("up_proj", &g.up_proj, &c.up_proj),
            ("gelu", &g.gelu, &c.gelu),
            ("down_proj", &g.down_proj, &c.down_proj),
        ] {
            see(format!("layer {} {kind}", c.layer), x, y);
        }
        assert_eq!(g.attention.heads, c.attention.heads);
        let flat = |rows: &Vec<Vec<Vec<f32>>>| Rows {
            width: 1,
            data: rows.iter().flatten().flatten().copied().collect(),
        };
        see(
            format!("layer {} attention", c.layer),
            &flat(&g.attention.rows),
            &flat(&c.attention.rows),
        );
    }
    worst
}

/// Teacher-forced capture of one prompt on the GPU in `dtype` and on the
/// CPU in f32: the same tokens, every tensor of every layer within
/// `tolerance`.
fn gpu_matches_cpu(dtype: DType, tolerance: f64) {
    let layers = tiny_on(&Device::Cpu, DType::F32)
        .1
        .config()
        .num_hidden_layers;
    gpu_matches_cpu_for(&everything(layers), dtype, tolerance);
}

/// [`gpu_matches_cpu`] for what `request` records (residual only: the
/// MLP's fused GELU-times-up runs, which recording the activations skips).
fn gpu_matches_cpu_for(request: &CaptureRequest, dtype: DType, tolerance: f64) {
    let (meta, _) = tiny_on(&Device::Cpu, DType::F32);
    let prompt = meta
        .tokenizer
        .encode_prompt("Write a careful answer about the history of bridges and tunnels, please.")
        .unwrap();
    gpu_matches_cpu_on(&prompt, request, dtype, tolerance);
}

/// [`gpu_matches_cpu_for`] on the prompt `prompt`.
fn gpu_matches_cpu_on(prompt: &[u32], request: &CaptureRequest, dtype: DType, tolerance: f64) {
    let (_, cpu_model) = tiny_on(&Device::Cpu, DType::F32);
    let (_, gpu_model) = tiny_on(&cuda(), dtype);
    let response = [3u32, 30, 300, 12, 44, 9, 700, 5];
    let plan = ResponsePlan::Replay(&response);
    let cpu = capture_prompt(&cpu_model, prompt, request, plan, &mut || {}).unwrap();
    let gpu = capture_prompt(&gpu_model, prompt, request, plan, &mut || {}).unwrap();
    let (error, at) = worst_error(&gpu, &cpu);
    let what = if request.layers.iter().all(|w| w.projections) {
        "everything"
    } else {
        "some"
    };
    eprintln!(
        "cuda {dtype:?} vs cpu f32, {what} recorded, {} prompt tokens: worst norm-relative error {error:.2e} ({at}), tolerance {tolerance:.0e}",
        prompt.len()
    );
    assert!(error < tolerance, "{at}: {error} >= {tolerance}");
}

#[test]
fn cuda_f32_capture_matches_the_cpu() {
    gpu_matches_cpu(DType::F32, 1e-4);
}

#[test]
fn cuda_bf16_capture_matches_the_cpu_within_bf16_tolerance() {
    // bf16 keeps 8 significant bits (relative step 2^-8 = 3.9e-3); errors
    // compound over layers, so allow a few steps.
    gpu_matches_cpu(DType::BF16, 3e-2);
}

#[test]
fn cuda_residual_capture_matches_the_cpu_with_the_fused_mlp() {
    let layers = tiny_on(&Device::Cpu, DType::F32)
        .1
        .config()
        .num_hidden_layers;
    let residual = LayerWants {
        residual: true,
        ..LayerWants::default()
    };
    let request = CaptureRequest {
        layers: vec![residual; layers],
    };
    gpu_matches_cpu_for(&request, DType::F32, 1e-4);
    gpu_matches_cpu_for(&request, DType::BF16, 3e-2);
}

#[test]
fn cuda_long_prompt_capture_matches_the_cpu_with_the_split_decode_attention() {
    // Past 256 keys a decode step's attention is split over the keys (the
    // default); the fixture's sliding window masks whole parts of it.
    let residual = LayerWants {
        residual: true,
        ..LayerWants::default()
    };
    let (meta, model) = tiny_on(&Device::Cpu, DType::F32);
    let request = CaptureRequest {
        layers: vec![residual; model.config().num_hidden_layers],
    };
    let vocab = meta.tokenizer.vocab_size() as u32;
    let prompt: Vec<u32> = std::iter::once(2)
        .chain((1..300u32).map(|i| 10 + (i * 37) % (vocab - 10)))
        .collect();
    assert!(prompt.len() > capture_kernels::DECODE_SPLIT_FROM);
    gpu_matches_cpu_on(&prompt, &request, DType::F32, 1e-4);
    gpu_matches_cpu_on(&prompt, &request, DType::BF16, 3e-2);
}

#[test]
fn cuda_greedy_generation_picks_the_cpu_tokens_in_f32() {
    let (meta, cpu_model) = tiny_on(&Device::Cpu, DType::F32);
    let (_, gpu_model) = tiny_on(&cuda(), DType::F32);
    let prompt = meta.tokenizer.encode_prompt("Is it safe?").unwrap();
    let request = everything(cpu_model.config().num_hidden_layers);
    let plan = ResponsePlan::Generate {
        sampling: &Sampling::Greedy,
        max_new_tokens: 12,
        eos_ids: &[],
        prompt_key: "gpu/1",
    };
    let cpu = capture_prompt(&cpu_model, &prompt, &request, plan, &mut || {}).unwrap();
    let gpu = capture_prompt(&gpu_model, &prompt, &request, plan, &mut || {}).unwrap();
    assert_eq!(gpu.response_ids, cpu.response_ids);
    let (error, at) = worst_error(&gpu, &cpu);
    eprintln!("cuda f32 greedy vs cpu: worst {error:.2e} ({at})");
    assert!(error < 1e-4, "{at}: {error}");
}

#[test]
fn cuda_batched_capture_equals_one_at_a_time() {
    let (meta, model) = tiny_on(&cuda(), DType::F32);
    batched_equals_one_at_a_time(&meta, &model);
}

#[test]
fn cuda_free_memory_is_read_from_the_driver() {
    let free = free_device_memory(&cuda()).expect("the driver's free memory");
    eprintln!(
        "cuda free memory: {:.1} GiB",
        free as f64 / (1u64 << 30) as f64
    );
    assert!(free > 1 << 30, "{free} bytes free on a GPU");
}

#[test]
fn cuda_freed_memory_stays_in_the_pool_and_counts_as_free() {
    use candle_core::Tensor;
    let gpu = cuda();
    let Device::Cuda(device) = &gpu else {
        unreachable!()
    };
    let pool = |what: &str| pool_now(device, what);
    assert_eq!(pool("at start").release_threshold, u64::MAX);
    let size = 256 << 20;
    let before = free_device_memory(&gpu).unwrap();
    let buffer = Tensor::zeros(size / 4, DType::F32, &gpu).unwrap();
    gpu.synchronize().unwrap();
    assert!(pool("in use").used >= size as u64);
    drop(buffer);
    // A synchronisation releases pooled memory above the threshold.
    gpu.synchronize().unwrap();
    let after = pool("after the free");
    assert!(after.idle() >= size as u64, "{after:?}");
    let free = free_device_memory(&gpu).unwrap();
    // Other processes may allocate meanwhile: allow 64 MiB either way.
    assert!(free.abs_diff(before) < 64 << 20, "{before} -> {free}");
}

#[test]
fn cuda_pool_peak_is_the_most_in_use_since_its_reset() {
    use candle_core::Tensor;
    let gpu = cuda();
    let Device::Cuda(device) = &gpu else {
        unreachable!()
    };
    let pool = |what: &str| pool_now(device, what);
    let size = 256 << 20;
    let kept = Tensor::zeros(size / 4, DType::F32, &gpu).unwrap();
    let freed = Tensor::zeros(size / 4, DType::F32, &gpu).unwrap();
    gpu.synchronize().unwrap();
    let both = pool("with two buffers").used;
    drop(freed);
    gpu.synchronize().unwrap();
    assert!(pool("after freeing one").peak() >= both);
    assert!(capture_kernels::device::reset_pool_peak(device).unwrap());
    let reset = pool("after the reset");
    // Back to what is in use: the kept buffer, not the freed one.
    assert!(reset.peak() >= size as u64, "{reset:?}");
    assert!(reset.peak() < both, "{reset:?} after {both} in use");
    let half = Tensor::zeros(size / 8, DType::F32, &gpu).unwrap();
    gpu.synchronize().unwrap();
    assert!(pool("with a new buffer").peak() >= reset.used + size as u64 / 2);
    drop((kept, half));
}

/// The device's pool memory now, logged as `what`.
fn pool_now(device: &candle_core::CudaDevice, what: &str) -> capture_kernels::device::PoolMemory {
    let pool = capture_kernels::device::pool_memory(device)
        .unwrap()
        .expect("the H100/H200's stream-ordered allocator");
    eprintln!("cuda pool {what}: {pool:?}, peak {}", pool.peak());
    pool
}

/// A tensor's elements on the host, as f32.
fn host_values(t: candle_core::Tensor) -> Vec<f32> {
    let t = t
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn cuda_fused_norms_match_the_cpu() {
    use crate::model::norm::{NormPair, RmsNorm};
    use candle_core::Tensor;
    let gpu = cuda();
    // Rows narrower than a warp, a block of rows and gemma-2-2b's width.
    for (shape, seed) in [
        (vec![3, 5, 24], 1u64),
        (vec![40, 64], 2),
        (vec![2, 3, 2304], 3),
    ] {
        let size = *shape.last().unwrap();
        let n: usize = shape.iter().product();
        let values = |count: usize, seed: u64| -> Vec<f32> {
            (0..count)
                .map(|i| (((i as u64 + 1) * (seed * 7919 + 13)) % 1000) as f32 / 125.0 - 4.0)
                .collect()
        };
        let weight = Tensor::from_vec(values(size, seed + 5), size, &Device::Cpu).unwrap();
        let (cpu_norm, gpu_norm) = (
            RmsNorm::new(&(weight.clone() * 0.1).unwrap(), 1e-6).unwrap(),
            RmsNorm::new(&(weight.to_device(&gpu).unwrap() * 0.1).unwrap(), 1e-6).unwrap(),
        );
        // A second norm for the pairs (`NormPair`: norm, add, norm).
        let (cpu_norm_2, gpu_norm_2) = (
            RmsNorm::new(&(weight.clone() * -0.2).unwrap(), 1e-5).unwrap(),
            RmsNorm::new(&(weight.to_device(&gpu).unwrap() * -0.2).unwrap(), 1e-5).unwrap(),
        );
        let x = Tensor::from_vec(values(n, seed), shape.as_slice(), &Device::Cpu).unwrap();
        let r = Tensor::from_vec(values(n, seed + 9), shape.as_slice(), &Device::Cpu).unwrap();
        for (dtype, tolerance) in [(DType::F32, 1e-6), (DType::BF16, 8e-3), (DType::F16, 1e-3)] {
            let (x, r) = (x.to_dtype(dtype).unwrap(), r.to_dtype(dtype).unwrap());
            let (gx, gr) = (x.to_device(&gpu).unwrap(), r.to_device(&gpu).unwrap());
            let plain = norm_error(
                &host_values(gpu_norm.forward(&gx).unwrap()),
                &host_values(cpu_norm.forward(&x).unwrap()),
            );
            let added = norm_error(
                &host_values(gpu_norm.forward_add(&gx, &gr).unwrap()),
                &host_values(cpu_norm.forward_add(&x, &r).unwrap()),
            );
            let pair = |first: &RmsNorm, second: &RmsNorm, x: &Tensor, r: &Tensor| {
                let (sum, normed) = NormPair::new(first, second)
                    .unwrap()
                    .forward(x, r, false)
                    .unwrap();
                [host_values(sum), host_values(normed)].concat()
            };
            let paired = norm_error(
                &pair(&gpu_norm, &gpu_norm_2, &gx, &gr),
                &pair(&cpu_norm, &cpu_norm_2, &x, &r),
            );
            eprintln!(
                "fused norm {dtype:?} {shape:?}: {plain:.2e}, with the residual {added:.2e}, paired {paired:.2e}"
            );
            assert!(
                plain < tolerance && added < tolerance && paired < tolerance,
                "{dtype:?} {shape:?}"
            );
        }
    }
}

#[test]
fn cuda_fused_attention_softmax_matches_the_cpu() {
    use crate::model::attention_softmax::AttentionSoftmax;
    use crate::model::fused::tests::window_mask;
    use candle_core::Tensor;
    let gpu = cuda();
    // A decode step, a prompt pass with padding and a window, a long context.
    for (shape, seed) in [
        ([1, 8, 1, 37], 1u64),
        ([3, 8, 6, 6], 2),
        ([2, 8, 2, 3000], 3),
    ] {
        let [b, heads, t, ctx] = shape;
        let n = b * heads * t * ctx;
        let raw: Vec<f32> = (0..n)
            .map(|i| (((i as u64 + 1) * (seed * 7919 + 13)) % 2000) as f32 / 4.0 - 250.0)
            .collect();
        let raw = Tensor::from_vec(raw, shape.as_slice(), &Device::Cpu).unwrap();
        let mask = window_mask(b, t, ctx, 4096, 2);
        let gpu_mask = mask.to_device(&gpu).unwrap();
        for cap in [Some(50.0), None] {
            let op = AttentionSoftmax {
                scale: 256f64.powf(-0.5),
                cap,
            };
            for (dtype, out, tolerance) in [
                (DType::F32, DType::F32, 1e-6),
                (DType::BF16, DType::F32, 1e-6),
                (DType::BF16, DType::BF16, 8e-3),
            ] {
                let raw = raw.to_dtype(dtype).unwrap();
                let gpu_raw = raw.to_device(&gpu).unwrap();
                for masked in [false, true] {
                    let (m, gm) = match masked {
                        true => (Some(&mask), Some(&gpu_mask)),
                        false => (None, None),
                    };
                    let error = norm_error(
                        &host_values(op.forward(&gpu_raw, gm, out).unwrap()),
                        &host_values(op.forward(&raw, m, out).unwrap()),
                    );
                    eprintln!(
                        "fused attention softmax {shape:?} {dtype:?} to {out:?}, cap {cap:?}, mask {masked}: {error:.2e}"
                    );
                    assert!(
                        error < tolerance,
                        "{shape:?} {dtype:?} {out:?} {cap:?} {masked}"
                    );
                }
            }
        }
    }
}

#[test]
fn cuda_decode_attention_matches_the_cpu() {
    use crate::model::attention_softmax::AttentionSoftmax;
    use crate::model::decode_attention::DecodeAttention;
    use crate::model::fused::tests::{random, window_mask};
    use crate::model::rotary::QkvHeads;
    use candle_core::{IndexOp, Tensor};
    let gpu = cuda();
    // Keys and values as the cache holds them: views of a buffer `[2, b,
    // kv_heads, capacity, d]` with room to spare.
    let views = |buffer: &Tensor, ctx: usize| {
        let view = |i: usize| buffer.i(i).unwrap().narrow(2, 0, ctx).unwrap();
        (view(0), view(1))
    };
    let (heads, kv_heads, d) = (8, 4, 256);
    let op = |cap, split_from| DecodeAttention {
        softmax: AttentionSoftmax {
            scale: 256f64.powf(-0.5),
            cap,
        },
        heads: QkvHeads { heads, kv_heads },
        split_from,
    };
    // One block per query row, and split over the keys (parts of 64; with
    // the 4,096-key window, the 8,000-key context's first parts are all
    // masked).
    let (one_block, split) = (usize::MAX, 0);
    // gemma-2-2b's heads: a decode step, a batch of two queries each with
    // padding (a rotary table per sequence), a context near the model's
    // 8,192.
    for ([b, t, ctx], seed) in [([1, 1, 600], 1u64), ([4, 2, 37], 2), ([2, 1, 8000], 3)] {
        let buffer = random(&[2, b, kv_heads, ctx + 5, d], seed, 1.0);
        let qkv = random(&[b, t, heads + 2 * kv_heads, d], seed + 10, 2.0);
        let angles = random(&[b, t, d / 2], seed + 20, 3.0);
        let table = Tensor::cat(&[angles.cos().unwrap(), angles.sin().unwrap()], 2).unwrap();
        let table = if b == 1 {
            table.squeeze(0).unwrap()
        } else {
            table
        };
        let mask = window_mask(b, t, ctx, 4096, 2);
        let gpu_mask = mask.to_device(&gpu).unwrap();
        for (cap, split_from) in [Some(50.0), None]
            .into_iter()
            .flat_map(|cap| [(cap, one_block), (cap, split)])
        {
            let op = op(cap, split_from);
            for (dtype, tolerance) in [(DType::F32, 1e-5), (DType::BF16, 8e-3), (DType::F16, 2e-3)]
            {
                let [qkv, table, buffer] =
                    [&qkv, &table, &buffer].map(|x| x.to_dtype(dtype).unwrap());
                let [gpu_qkv, gpu_table, gpu_buffer] =
                    [&qkv, &table, &buffer].map(|x| x.to_device(&gpu).unwrap());
                let ((k, v), (gk, gv)) = (views(&buffer, ctx), views(&gpu_buffer, ctx));
                for masked in [false, true] {
                    let (m, gm) = match masked {
                        true => (Some(&mask), Some(&gpu_mask)),
                        false => (None, None),
                    };
                    let kernel =
                        host_values(op.forward(&gpu_qkv, &gpu_table, (&gk, &gv), gm).unwrap());
                    let cpu = host_values(op.forward(&qkv, &table, (&k, &v), m).unwrap());
                    let separate =
                        host_values(op.candle_ops(&gpu_qkv, &gpu_table, (&gk, &gv), gm).unwrap());
                    let (error, against_separate) =
                        (norm_error(&kernel, &cpu), norm_error(&kernel, &separate));
                    let how = if split_from == split {
                        "split"
                    } else {
                        "one block per row"
                    };
                    eprintln!(
                        "decode attention b {b} t {t} ctx {ctx} {dtype:?}, cap {cap:?}, mask {masked}, {how}: {error:.2e} against the CPU, {against_separate:.2e} against the GPU's separate operations"
                    );
                    let what = format!("b {b} t {t} ctx {ctx} {dtype:?} {cap:?} {masked} {how}");
                    assert!(error < tolerance, "{what}");
                    assert!(against_separate < tolerance, "{what}");
                }
            }
        }
    }
    // A context past one block's shared memory is an error there, not a
    // launch (the model uses the separate operations), and split it is the
    // CPU's attention.
    assert!(!op(None, one_block).fits(12_000, 256));
    assert!(op(None, capture_kernels::DECODE_SPLIT_FROM).fits(12_000, 256));
    let buffer = random(&[2, 1, 4, 12_000, 256], 4, 1.0);
    let qkv = random(&[1, 1, 16, 256], 5, 1.0);
    let table = random(&[1, 256], 6, 1.0);
    let [gpu_buffer, gpu_qkv, gpu_table] =
        [&buffer, &qkv, &table].map(|x| x.to_device(&gpu).unwrap());
    let ((k, v), (gk, gv)) = (views(&buffer, 12_000), views(&gpu_buffer, 12_000));
    let error = op(None, one_block)
        .forward(&gpu_qkv, &gpu_table, (&gk, &gv), None)
        .unwrap_err()
        .to_string();
    assert!(error.contains("shared memory"), "{error}");
    let kernel = host_values(
        op(None, split)
            .forward(&gpu_qkv, &gpu_table, (&gk, &gv), None)
            .unwrap(),
    );
    let cpu = host_values(
        op(None, split)
            .forward(&qkv, &table, (&k, &v), None)
            .unwrap(),
    );
    let error = norm_error(&kernel, &cpu);
    eprintln!("decode attention over 12,000 keys, split: {error:.2e} against the CPU");
    assert!(error < 1e-5);
}

#[test]
fn cuda_logit_softcap_and_argmax_match_candle_and_the_host() {
    use super::decode::{argmax, argmax_rows, candle_argmax_rows};
    use crate::model::fused::tests::{bits, random};
    use crate::model::softcap::logit_softcap;
    let gpu = cuda();
    // Eight rows of gemma-2's vocabulary, far past the cap.
    let logits = random(&[8, 256_000], 1, 200.0);
    for dtype in [DType::F32, DType::BF16] {
        let x = logits.to_dtype(dtype).unwrap();
        let gx = x.to_device(&gpu).unwrap();
        let kernel = logit_softcap(&gx, 30.0).unwrap();
        let candle = ((gx.to_dtype(DType::F32).unwrap() / 30.0)
            .unwrap()
            .tanh()
            .unwrap()
            * 30.0)
            .unwrap();
        let host = host_values(logit_softcap(&x, 30.0).unwrap());
        let error = norm_error(&host_values(kernel.clone()), &host);
        eprintln!("logit soft-cap {dtype:?}: {error:.2e} against the CPU");
        assert_eq!(
            bits(&kernel),
            bits(&candle),
            "{dtype:?}: the GPU's own operations"
        );
        assert!(error < 1e-6, "{dtype:?}");
    }
    // Ties (the first wins), a maximum in the last column, a NaN row, a row
    // of -inf, and random rows.
    let mut rows = host_values(logits.clone());
    let vocab = 256_000;
    rows[..vocab].fill(-1.0);
    rows[3] = 50.0;
    rows[4] = 50.0;
    rows[vocab + 1000] = 1e9;
    rows[2 * vocab - 1] = 1e9;
    rows[2 * vocab + 77] = f32::NAN;
    rows[3 * vocab..4 * vocab].fill(f32::NEG_INFINITY);
    let logits = candle_core::Tensor::from_vec(rows.clone(), (8, vocab), &gpu).unwrap();
    let chosen = argmax_rows(&logits).unwrap();
    let separate = candle_argmax_rows(&logits).unwrap();
    for (r, row) in rows.chunks(vocab).enumerate() {
        let want = (!row.iter().any(|v| v.is_nan())).then(|| argmax(row));
        assert_eq!(chosen[r], want, "row {r}");
        assert_eq!(separate[r], want, "row {r}, candle's operations");
    }
    assert_eq!(chosen[0], Some(3));
    assert_eq!(chosen[1], Some(1000));
    assert_eq!(chosen[2], None);
    assert_eq!(chosen[3], Some(0));
}

#[test]
fn cuda_fused_rotary_and_cache_write_match_the_cpu() {
    use crate::model::rotary::{KeysValues, QkvHeads, Queries};
    use candle_core::Tensor;
    let gpu = cuda();
    let values = |shape: &[usize], seed: u64| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| (((i as u64 + 1) * (seed * 7919 + 13)) % 1000) as f32 / 250.0 - 2.0)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    };
    // (b, t, heads, kv_heads, d, table per sequence, capacity, start): a
    // padded prompt pass, a decode step of a batch at gemma-2-2b's heads,
    // one sequence with a shared table.
    for (b, t, heads, kv_heads, d, batched, capacity, start) in [
        (3, 6, 8, 4, 16, true, 10, 0),
        (4, 1, 8, 4, 256, true, 40, 33),
        (1, 5, 4, 2, 8, false, 8, 2),
    ] {
        let qkv_heads = QkvHeads { heads, kv_heads };
        let table_shape = if batched { vec![b, t, d] } else { vec![t, d] };
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let qkv = values(&[b, t, heads + 2 * kv_heads, d], 1)
                .to_dtype(dtype)
                .unwrap();
            let table = values(&table_shape, 2).to_dtype(dtype).unwrap();
            let buffer = values(&[2, b, kv_heads, capacity, d], 3)
                .to_dtype(dtype)
                .unwrap();
            let (gqkv, gtable) = (qkv.to_device(&gpu).unwrap(), table.to_device(&gpu).unwrap());
            let gbuffer = buffer.to_device(&gpu).unwrap();
            let queries = Queries { heads: qkv_heads };
            let q_error = norm_error(
                &host_values(gqkv.apply_op2_no_bwd(&gtable, &queries).unwrap()),
                &host_values(qkv.apply_op2_no_bwd(&table, &queries).unwrap()),
            );
            let op = KeysValues {
                heads: qkv_heads,
                start,
            };
            buffer.inplace_op3(&qkv, &table, &op).unwrap();
            gbuffer.inplace_op3(&gqkv, &gtable, &op).unwrap();
            // The whole buffer: the pass's columns and every other one.
            let (got, want) = (host_values(gbuffer), host_values(buffer));
            let exact = got == want;
            let kv_error = norm_error(&got, &want);
            eprintln!(
                "fused rotary {dtype:?} b {b} t {t} d {d}: queries {q_error:.2e}, cache {kv_error:.2e} (bit for bit: {exact})"
            );
            // Each step is rounded as on the CPU, so this is expected to be
            // exact; the tolerance only absorbs a library's rounding mode.
            assert!(q_error < 1e-6 && kv_error < 1e-6, "{dtype:?} {b} {t} {d}");
        }
    }
}

#[test]
fn cuda_fused_gelu_mul_matches_the_cpu() {
    use crate::model::gelu_mul::GeluMul;
    use candle_core::Tensor;
    let gpu = cuda();
    for (shape, seed) in [
        (vec![1, 1, 2 * 9216], 1u64),
        (vec![3, 7, 2 * 64], 2),
        (vec![5, 2 * 7], 3),
    ] {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| (((i as u64 + 1) * (seed * 7919 + 13)) % 1000) as f32 / 125.0 - 4.0)
            .collect();
        let gate_up = Tensor::from_vec(v, shape.as_slice(), &Device::Cpu).unwrap();
        // f32: the same formula, tanh from another library; bf16 and f16:
        // the GPU rounds the GELU once where candle's CPU GELU rounds every
        // step, a few units of the last place.
        for (dtype, tolerance) in [(DType::F32, 1e-6), (DType::BF16, 1e-2), (DType::F16, 2e-3)] {
            let x = gate_up.to_dtype(dtype).unwrap();
            let error = norm_error(
                &host_values(
                    x.to_device(&gpu)
                        .unwrap()
                        .apply_op1_no_bwd(&GeluMul)
                        .unwrap(),
                ),
                &host_values(x.apply_op1_no_bwd(&GeluMul).unwrap()),
            );
            eprintln!("fused gelu-mul {dtype:?} {shape:?}: {error:.2e}");
            assert!(error < tolerance, "{dtype:?} {shape:?}");
        }
    }
}

#[test]
fn cuda_gather_equals_concatenation_bit_for_bit() {
    use crate::model::fused::tests::{bits, random};
    use candle_core::Tensor;
    let gpu = cuda();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        // Whole tensors, a contiguous view at an offset (rows of a norm
        // pair's output, as residual records are), an empty view (CUDA
        // allocates no empty buffers), and a residual decode step's 53
        // records of gemma-2-2b's width.
        let pair = random(&[2, 3, 2304], 1, 1.0).to_dtype(dtype).unwrap();
        let view = |t: &Tensor| t.get(1)?.narrow(0, 1, 2)?.flatten_all();
        let mut sources = vec![random(&[5], 2, 1.0).to_dtype(dtype).unwrap()];
        sources.extend((0..53).map(|i| random(&[2304], 10 + i, 1.0).to_dtype(dtype).unwrap()));
        let mut on_gpu: Vec<Tensor> = sources.iter().map(|t| t.to_device(&gpu).unwrap()).collect();
        sources.insert(1, view(&pair).unwrap());
        on_gpu.insert(1, view(&pair.to_device(&gpu).unwrap()).unwrap());
        sources.insert(2, sources[0].narrow(0, 5, 0).unwrap());
        on_gpu.insert(2, on_gpu[0].narrow(0, 5, 0).unwrap());
        let want = Tensor::cat(&sources, 0).unwrap();
        let got = capture_kernels::gather(&on_gpu).unwrap();
        assert_eq!(got.dims(), want.dims());
        assert_eq!(got.dtype(), dtype);
        assert_eq!(
            bits(&got.to_device(&Device::Cpu).unwrap()),
            bits(&want),
            "{dtype:?}"
        );
    }
    // Mixed dtypes, host tensors and nothing at all are errors, not copies
    // of the wrong bytes.
    let a = Tensor::zeros(4, DType::F32, &gpu).unwrap();
    let b = Tensor::zeros(4, DType::BF16, &gpu).unwrap();
    assert!(capture_kernels::gather(&[a.clone(), b]).is_err());
    assert!(
        capture_kernels::gather(&[Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap()]).is_err()
    );
    assert!(capture_kernels::gather(&[a.narrow(0, 0, 0).unwrap()]).is_err());
    assert!(capture_kernels::gather(&[]).is_err());
}

#[test]
fn cuda_decode_projection_matches_the_cpu_and_cublas() {
    use crate::model::decode_projection::{DecodeProjection, applies, project};
    use crate::model::fused::tests::random;
    let gpu = cuda();
    // gemma-2-2b's projections at batches 1 to 4 (q/k/v, o, the MLP's gate
    // and up, down, a quarter of the LM head), and odd sizes: a column
    // count no warp fills, one vector per row.
    let shapes = [
        (1, 2304, 4096),
        (1, 2048, 2304),
        (4, 2304, 18_432),
        (4, 9216, 2304),
        (2, 2304, 65_536),
        (3, 8, 7),
        (3, 24, 33),
    ];
    // f32: the CPU adds 9,216 products in order, with a rounding error of a
    // few 1e-6 relative; the kernel's lanes add them in another order.
    // bf16 and f16: the same sums, rounded (a rounding apart at most).
    for (dtype, tolerance) in [(DType::F32, 2e-5), (DType::BF16, 3e-3), (DType::F16, 5e-4)] {
        for (i, &(n, k, out)) in shapes.iter().enumerate() {
            let x = random(&[n, k], 2 * i as u64, 1.0).to_dtype(dtype).unwrap();
            let w = random(&[out, k], 2 * i as u64 + 1, 0.05)
                .to_dtype(dtype)
                .unwrap();
            let (gx, gw) = (x.to_device(&gpu).unwrap(), w.to_device(&gpu).unwrap());
            assert!(applies(&gx, &gw), "{dtype:?} {n}x{k}x{out}");
            let kernel = project(&gx, &gw).unwrap();
            assert_eq!(kernel.dims(), &[n, out]);
            assert_eq!(kernel.dtype(), dtype);
            let kernel = host_values(kernel);
            let host = host_values(project(&x, &w).unwrap());
            let cublas = host_values(gx.matmul(&gw.t().unwrap()).unwrap());
            let (to_host, to_cublas) = (norm_error(&kernel, &host), norm_error(&kernel, &cublas));
            eprintln!(
                "decode projection {dtype:?} {n}x{k}x{out}: {to_host:.2e} against the CPU, \
                 {to_cublas:.2e} against cuBLAS"
            );
            assert!(
                to_host < tolerance,
                "{dtype:?} {n}x{k}x{out}: {to_host:.2e}"
            );
            assert!(
                to_cublas < tolerance,
                "{dtype:?} {n}x{k}x{out}: {to_cublas:.2e}"
            );
        }
    }
    // Activations starting 8 bytes into their storage: the model keeps
    // cuBLAS for them, and the kernel refuses them.
    let wide = random(&[1, 2312], 20, 1.0)
        .to_dtype(DType::BF16)
        .unwrap()
        .to_device(&gpu)
        .unwrap();
    let x = wide.narrow(1, 4, 2304).unwrap();
    let w = random(&[16, 2304], 21, 1.0)
        .to_dtype(DType::BF16)
        .unwrap()
        .to_device(&gpu)
        .unwrap();
    assert!(!applies(&x, &w));
    let e = x
        .apply_op2_no_bwd(&w, &DecodeProjection)
        .unwrap_err()
        .to_string();
    assert!(e.contains("16-byte boundary"), "{e}");
}
