#!/usr/bin/env python3
"""Time the transformers reference at the real gemma-2-2b dimensions.

The competitor of `worker bench`: the same shapes (random weights, f32 on the
CPU by default; --device cuda --dtype bf16 on a GPU), the same prompt length
and number of new tokens, greedy. Three workloads:

* plain generation with a KV cache;
* KV cache plus capture hooks (residuals of every layer and eager attention
  probabilities, head-averaged, copied off each step): the fair competitor;
* the original tool's method: full recompute of the whole context at every
  step, with the same hooks;
* with --batch-sizes, KV cache plus hooks over batches of distinct prompts of
  the same length (no padding needed), as `worker bench` batches them.

On a GPU the hooks copy what they capture to the host at every step, as a
capture tool must (and as `worker bench` does), and the clock stops after
the device has finished.

Prints seconds per generated token and peak resident memory (on a GPU also
each workload's peak of allocated device memory), as a markdown table (and
JSON with --json).
"""

import argparse
import json
import resource
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=30, help="prompt length including <bos> (default 30)")
    parser.add_argument("--new-tokens", type=int, default=20, help="generated tokens per workload (default 20)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument(
        "--workloads", default="plain,hooks,recompute", help="comma-separated subset of plain,hooks,recompute"
    )
    parser.add_argument(
        "--batch-sizes", default="", help="comma-separated batch sizes of extra KV cache + hooks workloads (e.g. 4,16)"
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"], help="weights and compute (default f32)")
    parser.add_argument("--json", help="also write the results as JSON here")
    args = parser.parse_args()

    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.set_num_threads(args.threads)
    config = Gemma2Config(
        vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
        sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
        max_position_embeddings=8192, attn_implementation="eager",
    )
    print("building random weights", flush=True)
    with torch.device("meta"):
        model = Gemma2ForCausalLM(config)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[args.dtype]
    device = torch.device(args.device)
    model = model.to_empty(device=device).to(dtype).eval()
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.02 * 3**0.5, 0.02 * 3**0.5, generator=gen)
    model.tie_weights()
    base = [2] + [(1000 + 37 * i) % 256000 for i in range(args.prompt_tokens - 1)]

    def prompts(batch):
        # the same distinct prompts as `worker bench`: token p of prompt i
        # shifted by 7919 * i, <bos> kept
        return torch.tensor([[t if p == 0 else (t + 7919 * i) % 256000 for p, t in enumerate(base)]
                             for i in range(batch)], device=device)

    def keep(t):
        return t.detach().to("cpu") if device.type != "cpu" else t.detach().clone()

    captured = []

    def hook(module, inputs, output):
        # every position of the pass: the whole prompt, then one per step
        captured.append(keep(inputs[0]))
        captured.append(keep(output[0] if isinstance(output, tuple) else output))

    def run(kind, batch=1):
        if device.type == "cuda":
            # each workload's own peak (the weights included, as in `worker bench`)
            torch.cuda.reset_peak_memory_stats()
        handles = []
        if kind != "plain":
            handles = [layer.register_forward_hook(hook) for layer in model.model.layers]
        ids = prompts(batch)
        past = None
        start = time.perf_counter()
        with torch.no_grad():
            for _ in range(args.new_tokens):
                if kind == "recompute":
                    out = model(ids, use_cache=False, output_attentions=True)
                    for a in out.attentions:
                        captured.append(keep(a[0].mean(0)))
                    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                    ids = torch.cat([ids, nxt], 1)
                else:
                    out = model(ids, past_key_values=past, use_cache=True, output_attentions=kind == "hooks")
                    if kind == "hooks":
                        for a in out.attentions:
                            captured.append(keep(a.mean(1)))
                    past = out.past_key_values
                    ids = out.logits[:, -1].argmax(-1, keepdim=True)
                captured.clear()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        for h in handles:
            h.remove()
        return elapsed / (args.new_tokens * batch)

    names = {
        "plain": "transformers: plain generation (KV cache)",
        "hooks": "transformers: KV cache + capture hooks",
        "recompute": "transformers: full recompute + hooks (original tool)",
    }

    def measured(name, batch, seconds):
        # GPU only: the most memory torch allocated during this workload
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        print(f"{name}: {seconds:.3f} s/token" + (f", peak {peak:.1f} GiB allocated" if peak else ""), flush=True)
        return {"workload": name, "batch": batch, "seconds_per_token": seconds, "peak_device_gib": peak}

    run("plain")  # warm-up
    rows = []
    for kind in args.workloads.split(","):
        rows.append(measured(names[kind], 1, run(kind)))
    for batch in [int(b) for b in args.batch_sizes.split(",") if b.strip() and int(b) > 1]:
        rows.append(measured(f"{names['hooks']}, batch of {batch}", batch, run("hooks", batch)))
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    device_gib = max(r["peak_device_gib"] for r in rows) if device.type == "cuda" else None
    on = f"{args.device} {args.dtype}" + (f" (peak {device_gib:.1f} GiB allocated)" if device_gib else "")
    print(f"\ntorch {torch.__version__}, {on}, {args.threads} threads, {args.prompt_tokens}-token prompt, "
          f"{args.new_tokens} new tokens, peak RSS {peak_gib:.1f} GiB\n")
    print("| workload | s / generated token |\n|---|---|")
    for row in rows:
        print(f"| {row['workload']} | {row['seconds_per_token']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            import transformers

            json.dump(
                {"rows": rows, "peak_rss_gib": peak_gib, "peak_device_gib": device_gib, "torch": torch.__version__,
                 "transformers": transformers.__version__},
                f, indent=2,
            )


if __name__ == "__main__":
    main()
