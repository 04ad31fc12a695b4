#!/usr/bin/env python3
"""Check ``coordinator query`` answers against torch and numpy.

Every check loads the run's artifacts itself with
``torch.load(weights_only=True)`` (a run root downloaded from the store, the
folder holding ``inference/raw/``), recomputes the answer independently and
compares it with the JSON (or ``.npy``) the CLI wrote. Prints a one-line JSON
summary on stdout; exits 1 listing the first mismatches on stderr. ``batch
FILE`` runs a JSON list of checks in one process (torch loads once) and prints
the list of their summaries, each with its ``mismatches`` count and the first
of them, exiting 0: the caller judges each.

Subcommands:

- ``variant-model MODEL OUT``: copies a checkpoint with seeded noise on its
  layer weights (same tokenizer and shapes, other activations);
- ``vectors OUT``: writes trait vectors with ``torch.save``: a tree
  ``OUT/experiments/e1/extraction/behavior/refusal/vectors/{probe,mean_diff}_layer{L}.pt``
  (float32) and lone files ``OUT/lone/refusal_{f32,f16,bf16}.pt`` (float32
  ``[d]``, float16 ``[1, d]``, bfloat16 ``[d]``) plus ``OUT/lone/wrong_width.pt``
  (float32, half the width);
- ``project``: scores ``(act . v) / |v|`` of every token, layer and sublayer
  (residual_in, after_attn, residual_out), in float64, within ``--rtol``;
  the prompts, tokens, traits and layers must be exactly the expected ones,
  and each prompt's ``file_bytes`` the artifact's size;
- ``dynamics``: the scores at the expected layer and sublayer (as above), and
  velocity, acceleration, commitment token, peak velocity, mean absolute
  velocity, peak score and persistence recomputed with numpy from the
  answer's scores (the definitions of coordinator/src/query/analysis);
- ``compare``: per-token differences ``B - A`` over the aligned tokens,
  ``same_tokens`` and ``lengths_differ`` from the token ids, and per trait,
  layer, sublayer and phase the mean difference and Cohen's d with the pooled
  standard deviation over every token of every compared prompt;
- ``tensor``: a ``.npy`` or JSON slice equal, exactly, to the torch tensor
  at the dotted path (lists of tensors stacked) sliced on its first axis.

Vectors are named ``TRAIT=FILE`` (every layer) or ``TRAIT@LAYER=FILE``.

Example::

    python scripts/query_reference.py project --root /tmp/run --answer project.json \\
        --vector behavior/refusal@16=vectors/probe_layer16.pt
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

SUBLAYERS = ("residual_in", "after_attn", "residual_out")
PHASES = ("prompt", "response")
MAX_LISTED = 20


class Mismatches:
    """Collects mismatches and counts what was compared."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.values = 0
        self.worst_rel = 0.0

    def fail(self, message: str) -> None:
        self.items.append(message)

    def close(self, where: str, got: float, want: float, rtol: float, atol: float) -> None:
        self.values += 1
        diff = abs(got - want)
        if want != 0.0:
            self.worst_rel = max(self.worst_rel, diff / abs(want))
        if not diff <= atol + rtol * abs(want):
            self.fail(f"{where}: {got!r} != expected {want!r} (diff {diff:.3g})")

    def equal(self, where: str, got: Any, want: Any) -> None:
        if got != want:
            self.fail(f"{where}: {short(got)} != expected {short(want)}")

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        summary.update(
            values=self.values,
            worst_relative_difference=self.worst_rel,
            mismatches=len(self.items),
            first_mismatches=self.items[:MAX_LISTED],
        )
        return summary


def short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


def load(path: Path) -> Any:
    return torch.load(path, weights_only=True, map_location="cpu")


def parse_vectors(specs: list[str]) -> dict[str, dict[int | None, torch.Tensor]]:
    """``TRAIT[@LAYER]=FILE`` -> {trait: {layer or None: float64 vector}}."""
    vectors: dict[str, dict[int | None, torch.Tensor]] = {}
    for spec in specs:
        name, _, file = spec.partition("=")
        if not file:
            raise SystemExit(f"error: --vector {spec!r}: write TRAIT=FILE or TRAIT@LAYER=FILE")
        trait, _, layer = name.partition("@")
        tensor = load(Path(file))
        if not isinstance(tensor, torch.Tensor):
            raise SystemExit(f"error: {file} holds a {type(tensor).__name__}, not a tensor")
        vectors.setdefault(trait, {})[int(layer) if layer else None] = tensor.to(torch.float64).reshape(-1)
    return vectors


def vector_at(vectors: dict[int | None, torch.Tensor], layer: int) -> torch.Tensor:
    vector = vectors.get(layer, vectors.get(None))
    if vector is None:
        raise SystemExit(f"error: no reference vector for layer {layer}")
    return vector


def scores(activations: torch.Tensor, vector: torch.Tensor) -> np.ndarray:
    """(act . v) / |v| per row, float64."""
    acts = activations.to(torch.float64).reshape(-1, vector.numel())
    return (acts @ vector / vector.norm()).numpy()


def residual_scores(data: dict, phase: str, layer: int, sublayer: str, vector: torch.Tensor) -> np.ndarray:
    return scores(data[phase]["activations"][str(layer)][sublayer], vector)


def residual_keys(root: Path) -> list[str]:
    base = root / "inference" / "raw" / "residual"
    return sorted(p.relative_to(root).as_posix() for p in base.rglob("*.pt"))


def captured_layers(data: dict) -> list[int]:
    return sorted(int(layer) for layer in data["prompt"]["activations"])


def wire_f32(values: Any) -> np.ndarray:
    """JSON numbers the CLI wrote from float32 values (shortest float32
    text), back to the exact float32 values, as float64."""
    return np.array(values, dtype=np.float64).astype(np.float32).astype(np.float64)


def nested_scores(values: list, tokens: int, layers: int, where: str, out: Mismatches) -> np.ndarray | None:
    array = wire_f32(values)
    if tokens == 0 and array.size == 0:
        return np.zeros((0, layers, 3))
    if array.shape != (tokens, layers, 3):
        out.fail(f"{where}: shape {array.shape}, expected {(tokens, layers, 3)}")
        return None
    return array


def check_project(args: argparse.Namespace) -> dict[str, Any]:
    out = Mismatches()
    answer = json.loads(args.answer.read_text())
    vectors = parse_vectors(args.vector)
    asked_layers = [int(x) for x in args.layers.split(",")] if args.layers else []
    keys = residual_keys(args.root)
    if args.prompt_id:
        keys = [k for k in keys if Path(k).stem in args.prompt_id]
    got_keys = [p["artifact_key"] for p in answer["prompts"]]
    out.equal("artifact keys (in key order)", got_keys, keys)
    total_file_bytes = 0
    for prompt in answer["prompts"]:
        key = prompt["artifact_key"]
        path = args.root / key
        if not path.is_file():
            continue
        data = load(path)
        total_file_bytes += path.stat().st_size
        out.equal(f"{key} file_bytes", prompt["file_bytes"], path.stat().st_size)
        if not 0 < prompt["bytes_read"] <= prompt["file_bytes"]:
            out.fail(f"{key}: bytes_read {prompt['bytes_read']} outside (0, {prompt['file_bytes']}]")
        out.equal(f"{key} prompt_set", prompt["prompt_set"], Path(key).parent.name)
        out.equal(f"{key} prompt_id", prompt["prompt_id"], Path(key).stem)
        for phase in PHASES:
            out.equal(f"{key} {phase}_tokens", prompt[f"{phase}_tokens"], list(data[phase]["tokens"]))
        all_layers = captured_layers(data)
        out.equal(f"{key} traits", sorted(t["trait"] for t in prompt["traits"]), sorted(vectors))
        for trait in prompt["traits"]:
            name = trait["trait"]
            if name not in vectors:
                continue
            own = vectors[name]
            if asked_layers:
                expected_layers = asked_layers
            elif None in own:
                expected_layers = all_layers
            else:
                expected_layers = sorted(layer for layer in own if layer is not None)
            out.equal(f"{key} {name} layers", trait["layers"], expected_layers)
            if trait["layers"] != expected_layers:
                continue
            for phase in PHASES:
                tokens = len(data[phase]["tokens"])
                got = nested_scores(trait[phase], tokens, len(expected_layers), f"{key} {name} {phase}", out)
                if got is None:
                    continue
                for li, layer in enumerate(expected_layers):
                    vector = vector_at(own, layer)
                    for si, sublayer in enumerate(SUBLAYERS):
                        want = residual_scores(data, phase, layer, sublayer, vector)
                        for t in range(tokens):
                            out.close(
                                f"{key} {name} {phase}[{t}] layer {layer} {sublayer}",
                                float(got[t, li, si]),
                                float(want[t]),
                                args.rtol,
                                args.atol,
                            )
    read = answer["read"]
    out.equal("read.artifacts", read["artifacts"], len(answer["prompts"]))
    out.equal("read.file_bytes", read["file_bytes"], total_file_bytes)
    out.equal("read.bytes_read", read["bytes_read"], sum(p["bytes_read"] for p in answer["prompts"]))
    return out.finish({"prompts": len(answer["prompts"]), "file_bytes": total_file_bytes})


def numpy_dynamics(s: np.ndarray, threshold: float) -> dict[str, Any]:
    """The definitions of coordinator/src/query/analysis, with numpy."""
    velocity = np.diff(s)
    acceleration = np.diff(s, n=2)
    below = np.flatnonzero(np.abs(acceleration) < threshold)
    peak_v = int(np.argmax(np.abs(velocity))) if velocity.size else 0
    peak_s = int(np.argmax(np.abs(s))) if s.size else 0
    return {
        "velocity": velocity,
        "acceleration": acceleration,
        "commitment_token": int(below[0]) + 2 if below.size else None,
        "peak_velocity": float(velocity[peak_v]) if velocity.size else 0.0,
        "peak_velocity_index": peak_v,
        "mean_abs_velocity": float(np.mean(np.abs(velocity))) if velocity.size else 0.0,
        "peak_score": float(s[peak_s]) if s.size else 0.0,
        "peak_score_token": peak_s,
        "persistence": int(np.sum(np.abs(s[peak_s + 1 :]) > 0.5 * abs(s[peak_s]))) if s.size else 0,
    }


def check_dynamics(args: argparse.Namespace) -> dict[str, Any]:
    out = Mismatches()
    answer = json.loads(args.answer.read_text())
    vectors = parse_vectors(args.vector)
    expected_layer = {}
    for spec in args.expect_layer:
        name, _, layer = spec.partition("=")
        expected_layer[name] = int(layer)
    out.equal("threshold", answer["threshold"], args.threshold)
    keys = residual_keys(args.root)
    out.equal("artifact keys (in key order)", [p["artifact_key"] for p in answer["prompts"]], keys)
    commitments = 0
    for prompt in answer["prompts"]:
        key = prompt["artifact_key"]
        data = load(args.root / key)
        out.equal(f"{key} response_tokens", prompt["response_tokens"], list(data["response"]["tokens"]))
        out.equal(f"{key} traits", sorted(t["trait"] for t in prompt["traits"]), sorted(vectors))
        for trait in prompt["traits"]:
            name = trait["trait"]
            if name not in vectors:
                continue
            layer = expected_layer[name]
            out.equal(f"{key} {name} layer", trait["layer"], layer)
            out.equal(f"{key} {name} sublayer", trait["sublayer"], args.sublayer)
            want = residual_scores(data, "response", layer, args.sublayer, vector_at(vectors[name], layer))
            got = wire_f32(trait["scores"])
            if got.shape != want.shape:
                out.fail(f"{key} {name} scores: shape {got.shape}, expected {want.shape}")
                continue
            for t in range(want.size):
                out.close(f"{key} {name} score[{t}]", float(got[t]), float(want[t]), args.rtol, args.atol)
            # The dynamics of the answer's own (float32) scores, with numpy.
            ref = numpy_dynamics(got, args.threshold)
            scale = max(1.0, float(np.max(np.abs(got)))) if got.size else 1.0
            for series in ("velocity", "acceleration"):
                values = wire_f32(trait[series])
                if values.shape != ref[series].shape:
                    out.fail(f"{key} {name} {series}: shape {values.shape}, expected {ref[series].shape}")
                    continue
                for t in range(values.size):
                    out.close(f"{key} {name} {series}[{t}]", float(values[t]), float(ref[series][t]), 1e-6, 1e-6 * scale)
            for field in ("commitment_token", "peak_velocity_index", "peak_score_token", "persistence"):
                out.equal(f"{key} {name} {field}", trait[field], ref[field])
            for field in ("peak_velocity", "mean_abs_velocity", "peak_score"):
                out.close(f"{key} {name} {field}", float(trait[field]), ref[field], 1e-9, 1e-12)
            commitments += ref["commitment_token"] is not None
    traits = sum(len(p["traits"]) for p in answer["prompts"])
    return out.finish({"prompts": len(answer["prompts"]), "traits": traits, "commitment_tokens": commitments})


def f32(values: np.ndarray) -> np.ndarray:
    """Scores as the service sends them: rounded to float32."""
    return values.astype(np.float32).astype(np.float64)


def check_compare(args: argparse.Namespace) -> dict[str, Any]:
    out = Mismatches()
    answer = json.loads(args.answer.read_text())
    vectors = parse_vectors(args.vector)
    layers = [int(x) for x in args.layers.split(",")]
    keys = residual_keys(args.root_a)
    out.equal("artifact keys of B", residual_keys(args.root_b), keys)
    out.equal("unmatched", answer["unmatched"], [])
    # (trait, layer, sublayer, phase) -> (A scores, B scores) over every token
    samples: dict[tuple[str, int, str, str], tuple[list[np.ndarray], list[np.ndarray]]] = {}
    by_prompt = {(c["prompt_set"], c["prompt_id"], c["trait"]): c for c in answer["prompts"]}
    out.equal("compared prompts", len(answer["prompts"]), len(keys) * len(vectors))
    max_abs_diff = 0.0
    all_same_tokens = True
    for key in keys:
        a, b = load(args.root_a / key), load(args.root_b / key)
        prompt_set, prompt_id = Path(key).parent.name, Path(key).stem
        same_tokens = all(list(a[p]["token_ids"]) == list(b[p]["token_ids"]) for p in PHASES)
        all_same_tokens &= same_tokens
        lengths_differ = any(len(a[p]["tokens"]) != len(b[p]["tokens"]) for p in PHASES)
        for name, own in vectors.items():
            comparison = by_prompt.get((prompt_set, prompt_id, name))
            if comparison is None:
                out.fail(f"{key} {name}: no comparison in the answer")
                continue
            out.equal(f"{key} {name} run_id", comparison["run_id"], args.run_b)
            out.equal(f"{key} {name} baseline_run_id", comparison["baseline_run_id"], args.run_a)
            out.equal(f"{key} {name} layers", comparison["layers"], layers)
            out.equal(f"{key} {name} same_tokens", comparison["same_tokens"], same_tokens)
            out.equal(f"{key} {name} lengths_differ", comparison["lengths_differ"], lengths_differ)
            for phase in PHASES:
                tokens = min(len(a[phase]["tokens"]), len(b[phase]["tokens"]))
                got = nested_scores(comparison[f"{phase}_diff"], tokens, len(layers), f"{key} {name} {phase}_diff", out)
                for li, layer in enumerate(layers):
                    vector = vector_at(own, layer)
                    for si, sublayer in enumerate(SUBLAYERS):
                        sa = f32(residual_scores(a, phase, layer, sublayer, vector))
                        sb = f32(residual_scores(b, phase, layer, sublayer, vector))
                        entry = samples.setdefault((name, layer, sublayer, phase), ([], []))
                        entry[0].append(sa)
                        entry[1].append(sb)
                        if got is None:
                            continue
                        for t in range(tokens):
                            want = sb[t] - sa[t]
                            max_abs_diff = max(max_abs_diff, abs(want))
                            scale = max(1.0, abs(sa[t]), abs(sb[t]))
                            out.close(
                                f"{key} {name} {phase}[{t}] layer {layer} {sublayer} diff",
                                float(got[t, li, si]),
                                float(want),
                                args.rtol,
                                1e-6 * scale,
                            )
    summary = {(s["trait"], s["layer"], s["sublayer"], s["phase"]): s for s in answer["summary"]}
    out.equal("summary rows", sorted(summary), sorted(samples))
    for (name, layer, sublayer, phase), (parts_a, parts_b) in samples.items():
        row = summary.get((name, layer, sublayer, phase))
        if row is None:
            continue
        where = f"summary {name} layer {layer} {sublayer} {phase}"
        sa, sb = np.concatenate(parts_a), np.concatenate(parts_b)
        na, nb = sa.size, sb.size
        out.equal(f"{where} baseline_tokens", row["baseline_tokens"], na)
        out.equal(f"{where} tokens", row["tokens"], nb)
        out.equal(f"{where} run_id", row["run_id"], args.run_b)
        mean_difference = float(sb.mean() - sa.mean())
        pooled = np.sqrt(((na - 1) * np.var(sa, ddof=1) + (nb - 1) * np.var(sb, ddof=1)) / (na + nb - 2))
        scale = max(1.0, float(np.abs(sa).max()), float(np.abs(sb).max()))
        out.close(f"{where} mean_difference", float(row["mean_difference"]), mean_difference, 1e-5, 1e-7 * scale)
        if pooled > 0:
            d = mean_difference / pooled
            if row["cohens_d"] is None:
                out.fail(f"{where} cohens_d: null, expected {d!r}")
            else:
                out.close(f"{where} cohens_d", float(row["cohens_d"]), float(d), 1e-5, 1e-7 * scale / pooled)
        else:
            out.equal(f"{where} cohens_d", row["cohens_d"], None)
    return out.finish(
        {"prompts": len(keys), "max_abs_difference": max_abs_diff, "same_tokens": all_same_tokens}
    )


def tensor_at(data: Any, path: str) -> torch.Tensor:
    value = data
    for part in path.split("."):
        value = value[part]
    if isinstance(value, list):
        return torch.stack(value)
    return value


def check_tensor(args: argparse.Namespace) -> dict[str, Any]:
    out = Mismatches()
    tensor = tensor_at(load(args.root / args.key), args.path)
    start, _, end = args.tokens.partition(":")
    want = tensor[int(start or 0) : int(end) if end else None].to(torch.float32).numpy()
    if args.npy:
        got = np.load(args.npy)
        out.equal("npy dtype", str(got.dtype), "float32")
    else:
        answer = json.loads(args.json.read_text())
        out.equal("path", answer["path"], args.path)
        out.equal("artifact_key", answer["artifact_key"], args.key)
        out.equal("dtype", answer["dtype"], {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}[tensor.dtype])
        out.equal("shape", answer["shape"], list(want.shape))
        got = np.array(answer["values"], dtype=np.float64).astype(np.float32)
    out.equal("shape", list(got.shape), list(want.shape))
    out.values += want.size
    if got.shape == want.shape and not np.array_equal(got, want):
        worst = float(np.max(np.abs(got.astype(np.float64) - want)))
        out.fail(f"{args.key} {args.path}[{args.tokens}]: values differ (max abs diff {worst:.3g})")
    return out.finish({"shape": list(want.shape)})


def write_vectors(args: argparse.Namespace) -> int:
    generator = torch.Generator().manual_seed(args.seed)
    tree = args.out / "experiments" / "e1" / "extraction" / "behavior" / "refusal" / "vectors"
    tree.mkdir(parents=True, exist_ok=True)
    written = []
    for layer in [int(x) for x in args.layers.split(",")]:
        for method in ("probe", "mean_diff"):
            path = tree / f"{method}_layer{layer}.pt"
            torch.save(torch.randn(args.width, generator=generator), path)
            written.append(str(path))
    lone = args.out / "lone"
    lone.mkdir(parents=True, exist_ok=True)
    files = {
        "refusal_f32.pt": torch.randn(args.width, generator=generator),
        "refusal_f16.pt": torch.randn(1, args.width, generator=generator).to(torch.float16),
        "refusal_bf16.pt": torch.randn(args.width, generator=generator).to(torch.bfloat16),
        "wrong_width.pt": torch.randn(args.width // 2, generator=generator),
    }
    for name, tensor in files.items():
        torch.save(tensor, lone / name)
        written.append(str(lone / name))
    print(json.dumps({"written": written}))
    return 0


def variant_model(args: argparse.Namespace) -> int:
    """A copy of a checkpoint whose layer weights carry seeded noise: the
    same tokenizer and shapes, different activations."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.copytree(args.model, args.out)
    path = args.out / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    generator = torch.Generator().manual_seed(args.seed)
    perturbed = 0
    for key in sorted(tensors):
        tensor = tensors[key]
        if ".layers." in key and tensor.dim() == 2:
            noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
            tensors[key] = (tensor + args.scale * tensor.std() * noise).to(tensor.dtype)
            perturbed += 1
    save_file(tensors, str(path), metadata=metadata)
    print(json.dumps({"out": str(args.out), "perturbed": perturbed}))
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    commands = parser.add_subparsers(dest="command", required=True)

    vectors = commands.add_parser("vectors", help="write trait vectors with torch.save")
    vectors.add_argument("out", type=Path)
    vectors.add_argument("--width", type=int, required=True, help="the model's hidden size")
    vectors.add_argument("--layers", required=True, help="layers of the tree's vectors, e.g. 1,2")
    vectors.add_argument("--seed", type=int, default=0)

    variant = commands.add_parser("variant-model", help="copy a checkpoint with seeded noise on its layer weights")
    variant.add_argument("model", type=Path, help="the checkpoint directory (model.safetensors)")
    variant.add_argument("out", type=Path, help="the new checkpoint directory (must not exist)")
    variant.add_argument("--seed", type=int, default=1)
    variant.add_argument("--scale", type=float, default=0.05, help="noise, in standard deviations of each weight")

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--answer", type=Path, required=True, help="the CLI's JSON output")
        sub.add_argument("--vector", action="append", default=[], metavar="TRAIT[@LAYER]=FILE")
        sub.add_argument("--rtol", type=float, default=1e-4)
        sub.add_argument("--atol", type=float, default=1e-6)

    project = commands.add_parser("project", help="check `coordinator query project --format json`")
    project.add_argument("--root", type=Path, required=True, help="the run root (holding inference/raw)")
    project.add_argument("--layers", default="", help="the layers asked for (default: from the vectors)")
    project.add_argument("--prompt-id", action="append", default=[], help="the prompt ids asked for")
    common(project)

    dynamics = commands.add_parser("dynamics", help="check `coordinator query dynamics --format json`")
    dynamics.add_argument("--root", type=Path, required=True)
    dynamics.add_argument("--expect-layer", action="append", default=[], metavar="TRAIT=LAYER")
    dynamics.add_argument("--sublayer", choices=SUBLAYERS, default="residual_out")
    dynamics.add_argument("--threshold", type=float, default=0.1)
    common(dynamics)

    compare = commands.add_parser("compare", help="check `coordinator query compare A B --format json`")
    compare.add_argument("--root-a", type=Path, required=True)
    compare.add_argument("--root-b", type=Path, required=True)
    compare.add_argument("--run-a", required=True)
    compare.add_argument("--run-b", required=True)
    compare.add_argument("--layers", required=True)
    common(compare)

    tensor = commands.add_parser("tensor", help="check `coordinator query tensor`")
    tensor.add_argument("--root", type=Path, required=True)
    tensor.add_argument("--key", required=True)
    tensor.add_argument("--path", required=True, help="dotted path from the phase, e.g. prompt.mlp.gelu")
    tensor.add_argument("--tokens", default=":", metavar="START:END")
    output = tensor.add_mutually_exclusive_group(required=True)
    output.add_argument("--npy", type=Path)
    output.add_argument("--json", type=Path)

    batch = commands.add_parser("batch", help="run many checks in one process; print their summaries")
    batch.add_argument("checks", type=Path, help="a JSON list of argument lists, e.g. [[\"tensor\", \"--root\", ...]]")
    return parser.parse_args(argv)


CHECKS = {"project": check_project, "dynamics": check_dynamics, "compare": check_compare, "tensor": check_tensor}


def report(summary: dict[str, Any]) -> int:
    """Prints a check's summary (mismatches on stderr); 1 on mismatches."""
    mismatches = summary.pop("first_mismatches")
    print(json.dumps(summary))
    for item in mismatches:
        print(f"mismatch: {item}", file=sys.stderr)
    if summary["mismatches"] > len(mismatches):
        print(f"... and {summary['mismatches'] - len(mismatches)} more", file=sys.stderr)
    return 1 if summary["mismatches"] else 0


def run_batch(args: argparse.Namespace) -> int:
    """Runs every check of a JSON list of argument lists in this process
    (torch loads once) and prints the list of their summaries."""
    summaries = []
    for argv in json.loads(args.checks.read_text()):
        check = parse_args(argv)
        if check.command not in CHECKS:
            raise SystemExit(f"error: batch runs checks ({', '.join(CHECKS)}), not {check.command}")
        summaries.append(CHECKS[check.command](check))
    print(json.dumps(summaries))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    if args.command in CHECKS:
        return report(CHECKS[args.command](args))
    return {"vectors": write_vectors, "variant-model": variant_model, "batch": run_batch}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
