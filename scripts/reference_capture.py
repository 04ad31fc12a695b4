#!/usr/bin/env python3
"""Reference capture of Gemma-2 internals with Hugging Face transformers.

This is the behaviour of the original Python capture tool, written down as the
reference the Rust implementation is compared against
(``scripts/compare_captures.py``). It follows
``/work/shared/spec/gemma-2-2b-it-format.md`` (paths, keys, nesting, shapes)
and ``capture-semantics.md`` (what each tensor is, generation steps):

- the prompt is ``[bos] + tokenizer(text, add_special_tokens=False)``, no chat
  template;
- generation is greedy, and every step recomputes the whole context with no KV
  cache: step ``i`` is a forward pass over ``N + i`` tokens whose last-position
  logits choose response token ``i``; it stops after ``--max-new-tokens`` steps
  or after the step that chose an end token (the eos ids of
  ``generation_config.json``), which is kept;
- with ``--replay DIR`` the response token ids of an earlier run are
  teacher-forced instead of chosen (one step per given id);
- the prompt tensors come from step 0 (the pass over the prompt), the
  per-token response tensors of step ``i`` are the values at the last position
  of that pass, and the response attention of step ``i`` is the whole matrix of
  that pass.

Residual mode writes ``OUT/inference/raw/residual/{set}/{id}.pt`` (all layers,
head-averaged attention); internals mode writes
``OUT/inference/raw/internals/{set}/{id}_L{layer}.pt`` per requested layer
(q/k/v, per-head attention, MLP, residual). All tensors are f32. A summary
goes to ``OUT/reference.json``.

Examples::

    python scripts/reference_capture.py --model tests/fixtures/tiny-gemma2 \\
        --prompt-set dynamic --mode residual --out /tmp/ref
    python scripts/reference_capture.py --model tests/fixtures/tiny-gemma2 \\
        --prompt "Hello there" --mode internals --layers all --out /tmp/ref
    python scripts/reference_capture.py --model tests/fixtures/tiny-gemma2 \\
        --prompt-set dynamic --mode internals --layers 1,3 --replay /tmp/ref --out /tmp/ref2
    python scripts/reference_capture.py --model tests/fixtures/tiny-gemma2 \\
        --prompt-set single_trait,dynamic,adversarial --mode residual --out /tmp/ref3
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PROMPTS_DIR = REPO_ROOT / "inference" / "prompts"
DEFAULT_INTERNALS_LAYER = 16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--model", required=True, type=Path, help="local checkpoint directory (config.json, safetensors, tokenizer.json)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt-set", help=f"name of a built-in prompt set: PROMPTS_DIR/NAME.json (default dir {DEFAULT_PROMPTS_DIR}); several comma-separated (single_trait,dynamic) capture one after the other in one process")
    source.add_argument("--prompt-file", type=Path, help="a prompt set JSON file; the set name is the file stem")
    source.add_argument("--prompt", help='one prompt text; set name "custom", id "1"')
    parser.add_argument("--prompts-dir", type=Path, default=DEFAULT_PROMPTS_DIR, help="where --prompt-set looks for NAME.json")
    parser.add_argument("--mode", required=True, choices=["residual", "internals"], help="residual: all layers, residual stream + head-averaged attention; internals: per-layer q/k/v, per-head attention, MLP, residual")
    parser.add_argument("--layers", default=None, help=f'internals mode only: "16", "1,3" or "all" (default {DEFAULT_INTERNALS_LAYER}, which needs a model with more than {DEFAULT_INTERNALS_LAYER} layers)')
    parser.add_argument("--max-new-tokens", type=int, default=50, help="most response tokens (steps) per prompt (default 50)")
    parser.add_argument("--replay", type=Path, default=None, help="run root of an earlier capture whose response token ids are teacher-forced")
    parser.add_argument("--out", required=True, type=Path, help="run root to write inference/raw/... and reference.json under")
    parser.add_argument("--self-check", action="store_true", help="also recompute each prompt's last pass from the raw weights, without transformers' modules, and check the captured tensors against it")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- prompts


def load_prompt_sets(args: argparse.Namespace) -> list[tuple[str, list[dict[str, Any]]]]:
    """Return [(set name, [{"id", "text"}, ...]), ...]: one set, or each of a comma-separated --prompt-set."""
    if args.prompt is not None:
        return [("custom", [{"id": "1", "text": args.prompt}])]
    if args.prompt_file is not None:
        return [(args.prompt_file.stem, load_prompts(args.prompt_file))]
    names = [n.strip() for n in args.prompt_set.split(",") if n.strip()]
    if not names or len(set(names)) != len(names):
        raise SystemExit(f"--prompt-set {args.prompt_set!r}: name one or more different sets")
    sets = []
    for name in names:
        path = args.prompts_dir / f"{name}.json"
        if not path.is_file():
            known = sorted(p.stem for p in args.prompts_dir.glob("*.json")) if args.prompts_dir.is_dir() else []
            raise SystemExit(f"unknown prompt set {name!r}: no {path}; known sets are {', '.join(known) or '(none)'}")
        sets.append((name, load_prompts(path)))
    return sets


def load_prompts(path: Path) -> list[dict[str, Any]]:
    """Return [{"id", "text"}, ...] of the prompt set file `path`."""
    data = json.loads(path.read_text(encoding="utf-8"))
    prompts = data["prompts"] if isinstance(data, dict) else data
    out = []
    for p in prompts:
        if "id" not in p or "text" not in p:
            raise SystemExit(f"{path}: every prompt needs an id and a text, got {p!r}")
        out.append({"id": p["id"], "text": p["text"]})
    ids = [str(p["id"]) for p in out]
    if len(set(ids)) != len(ids):
        raise SystemExit(f"{path}: duplicate prompt ids")
    return out


def parse_layers(spec: str | None, mode: str, num_layers: int) -> list[int]:
    if mode == "residual":
        if spec is not None:
            raise SystemExit("--layers is for internals mode; residual mode captures every layer")
        return list(range(num_layers))
    if spec is None:
        if num_layers <= DEFAULT_INTERNALS_LAYER:
            raise SystemExit(
                f"the model has {num_layers} layers, so the default layer {DEFAULT_INTERNALS_LAYER} does not exist: "
                f"pass --layers (e.g. --layers all or --layers 0,{num_layers - 1})"
            )
        return [DEFAULT_INTERNALS_LAYER]
    if spec == "all":
        return list(range(num_layers))
    layers = sorted({int(x) for x in spec.split(",") if x.strip()})
    bad = [l for l in layers if not 0 <= l < num_layers]
    if bad or not layers:
        raise SystemExit(f"--layers {spec!r}: layers must be in 0..{num_layers - 1}")
    return layers


# --------------------------------------------------------------------------- replay


def replay_token_ids(replay_root: Path, mode: str, set_name: str, prompt_id: str) -> tuple[list[int], list[int]]:
    """(prompt token ids, response token ids) from an earlier run's artifact for this prompt."""
    raw = replay_root / "inference" / "raw"
    residual = [raw / "residual" / set_name / f"{prompt_id}.pt"]
    internals = sorted((raw / "internals" / set_name).glob(f"{prompt_id}_L*.pt"), key=lambda p: p.name)
    candidates = residual + internals if mode == "residual" else internals + residual
    for path in candidates:
        if path.is_file():
            data = torch.load(path, weights_only=True)
            return list(data["prompt"]["token_ids"]), list(data["response"]["token_ids"])
    raise SystemExit(f"--replay: no artifact for prompt {set_name}/{prompt_id} under {raw}")


# --------------------------------------------------------------------------- capture


class Recorder:
    """Forward hooks on the decoder layers that keep one pass's tensors (batch 1)."""

    def __init__(self, model, layers: list[int], internals: bool):
        self.layers = layers
        self.internals = internals
        self.handles = []
        self.pass_: dict[int, dict[str, Any]] = {}
        decoder_layers = model.model.layers
        for l in layers:
            layer = decoder_layers[l]
            self._hook(layer, self._layer_hook(l), with_kwargs=True)
            self._hook(layer.post_attention_layernorm, self._after_attn_hook(l))
            if internals:
                attn, mlp = layer.self_attn, layer.mlp
                for name, mod in (("q_proj", attn.q_proj), ("k_proj", attn.k_proj), ("v_proj", attn.v_proj),
                                  ("up_proj", mlp.up_proj), ("down_proj", mlp.down_proj)):
                    self._hook(mod, self._store_hook(l, name))
                # gelu = act_fn(gate_proj(x)), recomputed with the layer's own act_fn
                # (hooking act_fn itself is fragile: the module may be shared).
                self._hook(mlp.gate_proj, self._gelu_hook(l, mlp.act_fn))

    def _hook(self, module, fn, with_kwargs: bool = False):
        self.handles.append(module.register_forward_hook(fn, with_kwargs=with_kwargs))

    def _slot(self, l: int) -> dict[str, Any]:
        return self.pass_.setdefault(l, {})

    def _layer_hook(self, l: int):
        def hook(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output
            self._slot(l)["residual_in"] = hidden[0].detach()
            self._slot(l)["residual_out"] = out[0].detach()

        return hook

    def _after_attn_hook(self, l: int):
        # post_attention_layernorm(attn_out) is added to the layer input: after_attn.
        # The layer input is read from the layer's own pre-forward value, stored below.
        def hook(module, args, output):
            self._slot(l)["post_attn_norm"] = output[0].detach()

        return hook

    def _store_hook(self, l: int, name: str):
        def hook(module, args, output):
            self._slot(l)[name] = output[0].detach()

        return hook

    def _gelu_hook(self, l: int, act_fn):
        def hook(module, args, output):
            with torch.no_grad():
                self._slot(l)["gelu"] = act_fn(output[0].detach())

        return hook

    def run(self, model, ids: list[int]):
        """One forward pass over ``ids``: returns (last-position logits, {layer: tensors})."""
        self.pass_ = {}
        with torch.no_grad():
            out = model(torch.tensor([ids], dtype=torch.long), use_cache=False, output_attentions=True)
        if out.attentions is None or any(a is None for a in out.attentions):
            raise SystemExit("the model returned no attention probabilities: load it with attn_implementation='eager'")
        captured = self.pass_
        for l in self.layers:
            slot = captured[l]
            slot["after_attn"] = slot["residual_in"] + slot.pop("post_attn_norm")
            slot["attn_weights"] = out.attentions[l][0].detach()  # [heads, S, S]
        self.pass_ = {}
        return out.logits[0, -1].detach(), captured

    def close(self):
        for h in self.handles:
            h.remove()


def f32(t):
    """A compact, contiguous f32 copy (a view would make torch.save write its whole storage)."""
    return t.detach().to(torch.float32).contiguous().clone()


def capture_prompt(model, recorder: Recorder, prompt_ids: list[int], eos_ids: set[int],
                   max_new_tokens: int, forced: list[int] | None):
    """Run the steps for one prompt; returns (prompt pass, [per-step pass], response ids, stopped_on_eos)."""
    ids = list(prompt_ids)
    response: list[int] = []
    steps: list[dict[int, dict[str, Any]]] = []
    prompt_pass = None
    n_steps = len(forced) if forced is not None else max_new_tokens
    stopped_on_eos = False
    if n_steps == 0:
        _, prompt_pass = recorder.run(model, ids)
    for i in range(n_steps):
        logits, captured = recorder.run(model, ids)
        if i == 0:
            prompt_pass = captured
        # Keep only what the artifacts need from this step: the last position,
        # and the whole attention matrix.
        steps.append({l: {k: (v if k == "attn_weights" else v[-1:].clone()) for k, v in t.items()} for l, t in captured.items()})
        token = forced[i] if forced is not None else int(logits.argmax())
        response.append(token)
        ids.append(token)
        if token in eos_ids:
            stopped_on_eos = True
            if forced is None:
                break
    return prompt_pass, steps, response, stopped_on_eos


def texts_and_tokens(tok, ids: list[int]) -> tuple[list[str], list[int]]:
    return [tok.decode([i]) for i in ids], [int(i) for i in ids]


def residual_artifact(tok, text, prompt_ids, response_ids, prompt_pass, steps, num_layers, hidden):
    p_tokens, p_ids = texts_and_tokens(tok, prompt_ids)
    r_tokens, r_ids = texts_and_tokens(tok, response_ids)

    def stack(l, key):
        if not steps:
            return torch.zeros(0, hidden, dtype=torch.float32)
        return f32(torch.cat([s[l][key] for s in steps], dim=0))  # [R, H]

    return {
        "prompt": {
            "text": text,
            "tokens": p_tokens,
            "token_ids": p_ids,
            "activations": {
                str(l): {
                    "residual_in": f32(prompt_pass[l]["residual_in"]),
                    "after_attn": f32(prompt_pass[l]["after_attn"]),
                    "residual_out": f32(prompt_pass[l]["residual_out"]),
                }
                for l in range(num_layers)
            },
            "attention": {f"layer_{l}": f32(prompt_pass[l]["attn_weights"].mean(dim=0)) for l in range(num_layers)},
        },
        "response": {
            "text": tok.decode(response_ids, skip_special_tokens=True),
            "tokens": r_tokens,
            "token_ids": r_ids,
            "activations": {
                str(l): {
                    "residual_in": stack(l, "residual_in"),
                    "after_attn": stack(l, "after_attn"),
                    "residual_out": stack(l, "residual_out"),
                }
                for l in range(num_layers)
            },
            "attention": {
                f"layer_{l}": [f32(s[l]["attn_weights"].mean(dim=0)) for s in steps] for l in range(num_layers)
            },
        },
    }


def internals_artifact(tok, text, prompt_ids, response_ids, prompt_pass, steps, l, hidden):
    p_tokens, p_ids = texts_and_tokens(tok, prompt_ids)
    r_tokens, r_ids = texts_and_tokens(tok, response_ids)
    pp = prompt_pass[l]

    def per_step(key):
        return [f32(s[l][key]) for s in steps]  # R x [1, D]

    def stack(key):
        if not steps:
            return torch.zeros(0, 1, hidden, dtype=torch.float32)
        return f32(torch.stack([s[l][key] for s in steps], dim=0))  # [R, 1, H]

    return {
        "prompt": {
            "text": text,
            "tokens": p_tokens,
            "token_ids": p_ids,
            "attention": {
                "q_proj": f32(pp["q_proj"]),
                "k_proj": f32(pp["k_proj"]),
                "v_proj": f32(pp["v_proj"]),
                "attn_weights": f32(pp["attn_weights"]),
            },
            "mlp": {"up_proj": f32(pp["up_proj"]), "gelu": f32(pp["gelu"]), "down_proj": f32(pp["down_proj"])},
            "residual": {
                "input": f32(pp["residual_in"]),
                "after_attn": f32(pp["after_attn"]),
                "output": f32(pp["residual_out"]),
            },
        },
        "response": {
            "text": tok.decode(response_ids, skip_special_tokens=True),
            "tokens": r_tokens,
            "token_ids": r_ids,
            "attention": {
                "q_proj": per_step("q_proj"),
                "k_proj": per_step("k_proj"),
                "v_proj": per_step("v_proj"),
                "attn_weights": [f32(s[l]["attn_weights"]) for s in steps],
            },
            "mlp": {"up_proj": per_step("up_proj"), "gelu": per_step("gelu"), "down_proj": per_step("down_proj")},
            "residual": {"input": stack("residual_in"), "after_attn": stack("after_attn"), "output": stack("residual_out")},
        },
    }


# --------------------------------------------------------------------------- self-check


def manual_forward(model, ids: list[int]) -> dict[int, dict[str, Any]]:
    """Gemma-2 forward from the raw weights, written from capture-semantics.md, not from transformers' modules."""
    cfg = model.config
    sd = {k: v.detach().to(torch.float32) for k, v in model.state_dict().items()}
    H, nh, nkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    S = len(ids)
    theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    layer_types = getattr(cfg, "layer_types", None) or [
        "sliding_attention" if l % 2 == 0 else "full_attention" for l in range(cfg.num_hidden_layers)
    ]

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * (1.0 + w)

    def gelu_tanh(x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))

    pos = torch.arange(S, dtype=torch.float32)
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    angles = torch.outer(pos, inv_freq)  # [S, hd/2]
    cos, sin = torch.cos(angles).repeat(1, 2), torch.sin(angles).repeat(1, 2)

    def rope(x):  # [heads, S, hd], rotate-half convention
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    q_idx = torch.arange(S)[:, None]
    k_idx = torch.arange(S)[None, :]
    x = sd["model.embed_tokens.weight"][torch.tensor(ids)] * torch.tensor(math.sqrt(H))
    result = {}
    for l in range(cfg.num_hidden_layers):
        p = f"model.layers.{l}."
        r = {"residual_in": x}
        h = rms(x, sd[p + "input_layernorm.weight"])
        q = h @ sd[p + "self_attn.q_proj.weight"].T
        k = h @ sd[p + "self_attn.k_proj.weight"].T
        v = h @ sd[p + "self_attn.v_proj.weight"].T
        r.update(q_proj=q, k_proj=k, v_proj=v)
        qh = rope(q.view(S, nh, hd).transpose(0, 1))
        kh = rope(k.view(S, nkv, hd).transpose(0, 1)).repeat_interleave(nh // nkv, dim=0)
        vh = v.view(S, nkv, hd).transpose(0, 1).repeat_interleave(nh // nkv, dim=0)
        scores = qh @ kh.transpose(1, 2) * cfg.query_pre_attn_scalar**-0.5
        cap = cfg.attn_logit_softcapping
        scores = torch.tanh(scores / cap) * cap
        visible = k_idx <= q_idx
        if layer_types[l] == "sliding_attention":
            visible = visible & (k_idx > q_idx - cfg.sliding_window)
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        r["attn_weights"] = probs
        attn = (probs @ vh).transpose(0, 1).reshape(S, nh * hd) @ sd[p + "self_attn.o_proj.weight"].T
        x = x + rms(attn, sd[p + "post_attention_layernorm.weight"])
        r["after_attn"] = x
        h = rms(x, sd[p + "pre_feedforward_layernorm.weight"])
        gate = h @ sd[p + "mlp.gate_proj.weight"].T
        up = h @ sd[p + "mlp.up_proj.weight"].T
        r["gelu"], r["up_proj"] = gelu_tanh(gate), up
        down = (r["gelu"] * up) @ sd[p + "mlp.down_proj.weight"].T
        r["down_proj"] = down
        x = x + rms(down, sd[p + "post_feedforward_layernorm.weight"])
        r["residual_out"] = x
        result[l] = r
    return result


def self_check(model, prompt_ids, response_ids, prompt_pass, steps, layers) -> float:
    """Compare the hooked tensors with ``manual_forward``; returns the worst relative difference."""
    worst = 0.0

    def cmp(what, got, want):
        nonlocal worst
        scale = max(float(want.abs().max()), 1.0)
        diff = float((got - want).abs().max()) / scale
        worst = max(worst, diff)
        if diff > 1e-4:
            raise SystemExit(f"self-check failed: {what}: max diff {diff:.2e} (relative to {scale:.2e})")

    # The prompt pass against a manual pass over the prompt.
    manual = manual_forward(model, prompt_ids)
    for l in layers:
        for key, got in prompt_pass[l].items():
            cmp(f"prompt layer {l} {key}", got, manual[l][key])
    if steps:
        # Every step's last position against the same rows of one manual pass
        # over the whole context (causality), and the attention of the last step.
        ctx = prompt_ids + response_ids[:-1]
        manual = manual_forward(model, ctx)
        n = len(prompt_ids)
        for i, step in enumerate(steps):
            for l in layers:
                for key, got in step[l].items():
                    if key == "attn_weights":
                        want = manual[l][key][:, : n + i, : n + i]
                    else:
                        want = manual[l][key][n + i - 1 : n + i]
                    cmp(f"step {i} layer {l} {key}", got, want)
    # Semantics the doc spells out, checked on the prompt pass.
    for l in layers:
        a = prompt_pass[l]["attn_weights"]
        if not torch.allclose(a.sum(-1), torch.ones_like(a.sum(-1)), atol=1e-5):
            raise SystemExit(f"self-check failed: layer {l} attention rows do not sum to 1")
        S = a.shape[-1]
        q_idx, k_idx = torch.arange(S)[:, None], torch.arange(S)[None, :]
        masked = k_idx > q_idx
        if model.config.layer_types[l] == "sliding_attention":
            masked = masked | (k_idx <= q_idx - model.config.sliding_window)
        if float((a * masked).abs().max()) != 0.0:
            raise SystemExit(f"self-check failed: layer {l} attends to masked positions")
    return worst


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    prompt_sets = load_prompt_sets(args)

    model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="eager", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    cfg = model.config
    num_layers, hidden = cfg.num_hidden_layers, cfg.hidden_size
    layers = parse_layers(args.layers, args.mode, num_layers)
    bos = cfg.bos_token_id
    gen_path = args.model / "generation_config.json"
    eos = json.loads(gen_path.read_text())["eos_token_id"] if gen_path.is_file() else cfg.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])

    recorder = Recorder(model, layers, internals=args.mode == "internals")
    runs = {}
    for set_name, prompts in prompt_sets:
        out_dir = args.out / "inference" / "raw" / args.mode / set_name
        out_dir.mkdir(parents=True, exist_ok=True)
        summary = []
        for prompt in prompts:
            pid, text = str(prompt["id"]), prompt["text"]
            prompt_ids = [bos] + list(tok(text, add_special_tokens=False).input_ids)
            forced = None
            if args.replay is not None:
                replay_prompt_ids, forced = replay_token_ids(args.replay, args.mode, set_name, pid)
                if replay_prompt_ids != prompt_ids:
                    raise SystemExit(f"--replay: prompt {set_name}/{pid} tokenizes differently from the replayed run")
            prompt_pass, steps, response_ids, stopped = capture_prompt(
                model, recorder, prompt_ids, eos_ids, args.max_new_tokens, forced
            )
            files = []
            if args.mode == "residual":
                art = residual_artifact(tok, text, prompt_ids, response_ids, prompt_pass, steps, num_layers, hidden)
                path = out_dir / f"{pid}.pt"
                torch.save(art, path)
                files.append(path)
            else:
                for l in layers:
                    art = internals_artifact(tok, text, prompt_ids, response_ids, prompt_pass, steps, l, hidden)
                    path = out_dir / f"{pid}_L{l}.pt"
                    torch.save(art, path)
                    files.append(path)
            line = f"{set_name}/{pid}: {len(prompt_ids)} prompt tokens, {len(response_ids)} response tokens"
            if stopped:
                line += " (ends with an eos token)"
            if args.self_check:
                worst = self_check(model, prompt_ids, response_ids, prompt_pass, steps, layers)
                line += f", self-check ok (worst relative diff {worst:.1e})"
            print(line, flush=True)
            summary.append({
                "id": prompt["id"],
                "prompt_tokens": len(prompt_ids),
                "prompt_token_ids": prompt_ids,
                "response_token_ids": response_ids,
                "response_text": tok.decode(response_ids, skip_special_tokens=True),
                "ends_with_eos": stopped,
                "files": [str(p.relative_to(args.out)) for p in files],
            })
        runs[set_name] = summary
    recorder.close()

    # reference.json accumulates one entry per mode and prompt set.
    ref_path = args.out / "reference.json"
    ref = json.loads(ref_path.read_text()) if ref_path.is_file() else {"runs": {}}
    ref["tool"] = "scripts/reference_capture.py"
    ref["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    for set_name, summary in runs.items():
        ref["runs"][f"{args.mode}/{set_name}"] = {
            "model": str(args.model),
            "mode": args.mode,
            "prompt_set": set_name,
            "layers": layers,
            "max_new_tokens": args.max_new_tokens,
            "replay": str(args.replay) if args.replay is not None else None,
            "eos_token_ids": sorted(eos_ids),
            "dtype": "f32",
            "prompts": summary,
        }
    text = json.dumps(ref, indent=2, ensure_ascii=False)
    # Keep token id lists on one line each.
    text = re.sub(r"\[\s*(-?\d+(?:,\s*-?\d+)*)\s*\]", lambda m: "[" + re.sub(r",\s*", ", ", m.group(1)) + "]", text)
    ref_path.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
