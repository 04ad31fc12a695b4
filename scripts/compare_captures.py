#!/usr/bin/env python3
"""Compare two capture run roots artifact by artifact.

Walks every ``.pt`` file under ``EXPECTED_DIR/inference/raw``, requires the same
set of relative paths under ``ACTUAL_DIR/inference/raw`` (missing and extra
files are mismatches), loads both with ``torch.load(weights_only=True)`` and
compares them recursively:

- the same types (dict, list, tensor, str, int, float, bool, None);
- dicts: the same keys in the same order;
- lists: the same length;
- str, int, bool: exactly equal; floats: within the tolerance;
- tensors: the same shape, the actual's dtype equal to ``--expect-dtype``, and
  ``|actual - expected| <= atol + rtol * |expected|`` after casting both to f32.

Prints the worst absolute difference per key path (list indices folded into
``*``), then a summary. Exits 1 on any mismatch, listing the first mismatching
key paths, e.g. ``dynamic/3.pt: response.activations.2.residual_out: max abs
diff 3.1e-3``.

Example::

    python scripts/compare_captures.py /tmp/reference-run /tmp/rust-run --atol 1e-4
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import torch

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
MAX_LISTED = 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("expected", type=Path, metavar="EXPECTED_DIR", help="run root of the reference capture")
    parser.add_argument("actual", type=Path, metavar="ACTUAL_DIR", help="run root of the capture under test")
    parser.add_argument("--atol", type=float, default=1e-4, help="absolute tolerance (default 1e-4)")
    parser.add_argument("--rtol", type=float, default=0.0, help="relative tolerance (default 0)")
    parser.add_argument(
        "--expect-dtype",
        choices=sorted(DTYPES),
        default="f32",
        help="storage dtype every actual tensor must have (default f32)",
    )
    parser.add_argument("--max-listed", type=int, default=MAX_LISTED, help=f"mismatches listed (default {MAX_LISTED})")
    parser.add_argument("-q", "--quiet", action="store_true", help="do not print the per-key worst differences")
    return parser.parse_args(argv)


class Comparison:
    """Accumulates mismatches and the worst absolute difference per key path."""

    def __init__(self, atol: float, rtol: float, expect_dtype: torch.dtype):
        self.atol = atol
        self.rtol = rtol
        self.expect_dtype = expect_dtype
        self.mismatches: list[str] = []
        self.worst: dict[str, float] = {}  # folded key path -> worst abs diff
        self.tensors = 0

    def fail(self, where: str, message: str) -> None:
        self.mismatches.append(f"{where}: {message}")

    def note_worst(self, key: str, diff: float) -> None:
        folded = re.sub(r"\[\d+\]", "[*]", key)
        if diff > self.worst.get(folded, -1.0) or diff != diff:  # keep NaN
            self.worst[folded] = diff

    def compare(self, file: str, key: str, expected: Any, actual: Any) -> None:
        where = f"{file}: {key or '<root>'}"
        if isinstance(expected, torch.Tensor):
            if not isinstance(actual, torch.Tensor):
                return self.fail(where, f"expected a tensor, got {type(actual).__name__}")
            return self.compare_tensors(where, key, expected, actual)
        if type(expected) is not type(actual):
            return self.fail(where, f"expected {type(expected).__name__}, got {type(actual).__name__}")
        if isinstance(expected, dict):
            ek, ak = list(expected.keys()), list(actual.keys())
            if ek != ak:
                missing = [k for k in ek if k not in actual]
                extra = [k for k in ak if k not in expected]
                if missing or extra:
                    return self.fail(where, f"keys differ: missing {missing}, extra {extra}")
                return self.fail(where, f"keys in a different order: expected {ek}, got {ak}")
            for k in ek:
                self.compare(file, f"{key}.{k}" if key else str(k), expected[k], actual[k])
            return None
        if isinstance(expected, (list, tuple)):
            if len(expected) != len(actual):
                return self.fail(where, f"list length {len(actual)}, expected {len(expected)}")
            for i, (e, a) in enumerate(zip(expected, actual)):
                self.compare(file, f"{key}[{i}]", e, a)
            return None
        if isinstance(expected, float):
            if not abs(expected - actual) <= self.atol + self.rtol * abs(expected):
                return self.fail(where, f"{actual!r} != {expected!r}")
            return None
        if expected != actual:
            return self.fail(where, f"{_short(actual)} != expected {_short(expected)}")
        return None

    def compare_tensors(self, where: str, key: str, expected: torch.Tensor, actual: torch.Tensor) -> None:
        self.tensors += 1
        if actual.dtype != self.expect_dtype:
            self.fail(where, f"dtype {actual.dtype}, expected {self.expect_dtype}")
        if tuple(expected.shape) != tuple(actual.shape):
            return self.fail(where, f"shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
        if expected.numel() == 0:
            self.note_worst(key, 0.0)
            return None
        e = expected.to(torch.float32)
        a = actual.to(torch.float32)
        diff = (a - e).abs()
        # NaN anywhere, or in only one of the two, is a mismatch.
        nan_mismatch = bool((e.isnan() != a.isnan()).any())
        both_inf_equal = (e == a)  # equal infinities give a NaN difference
        diff = torch.where(both_inf_equal, torch.zeros_like(diff), diff)
        worst = float(diff.nan_to_num(nan=float("inf")).max())
        self.note_worst(key, worst)
        allowed = self.atol + self.rtol * e.abs()
        bad = (diff.nan_to_num(nan=float("inf")) > allowed) | (e.isnan() != a.isnan())
        if nan_mismatch or bool(bad.any()):
            n_bad = int(bad.sum())
            finite = diff[~diff.isnan()]
            message = f"max abs diff {worst:.3g} ({n_bad} of {e.numel()} elements beyond tolerance)"
            if nan_mismatch:
                n_nan = int((e.isnan() != a.isnan()).sum())
                worst_finite = float(finite.max()) if finite.numel() else 0.0
                message = f"{n_nan} NaN in one side only; finite max abs diff {worst_finite:.3g}"
            self.fail(where, message)
        return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def artifact_paths(root: Path) -> set[str]:
    raw = root / "inference" / "raw"
    return {p.relative_to(raw).as_posix() for p in raw.rglob("*.pt") if p.is_file()} if raw.is_dir() else set()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    expected_root, actual_root = args.expected, args.actual
    for root in (expected_root, actual_root):
        if not (root / "inference" / "raw").is_dir():
            print(f"error: no inference/raw under {root}", file=sys.stderr)
            return 2

    expected_files = artifact_paths(expected_root)
    actual_files = artifact_paths(actual_root)
    if not expected_files:
        print(f"error: no .pt files under {expected_root / 'inference' / 'raw'}", file=sys.stderr)
        return 2
    cmp = Comparison(args.atol, args.rtol, DTYPES[args.expect_dtype])
    for rel in sorted(expected_files - actual_files):
        cmp.fail(rel, "missing from the actual run")
    for rel in sorted(actual_files - expected_files):
        cmp.fail(rel, "extra file in the actual run")

    common = sorted(expected_files & actual_files)
    for rel in common:
        try:
            expected = torch.load(expected_root / "inference" / "raw" / rel, weights_only=True, map_location="cpu")
        except Exception as err:  # noqa: BLE001 - report and go on
            cmp.fail(rel, f"expected file does not load: {err}")
            continue
        try:
            actual = torch.load(actual_root / "inference" / "raw" / rel, weights_only=True, map_location="cpu")
        except Exception as err:  # noqa: BLE001
            cmp.fail(rel, f"does not load with torch.load(weights_only=True): {err}")
            continue
        cmp.compare(rel, "", expected, actual)

    if not args.quiet:
        print("worst abs diff per key path:")
        width = max((len(k) for k in cmp.worst), default=0)
        for key in sorted(cmp.worst, key=_natural_key):
            print(f"  {key:<{width}}  {cmp.worst[key]:.3g}")
    overall = max(cmp.worst.values(), default=0.0)
    print(
        f"compared {len(common)} files ({cmp.tensors} tensors) of {len(expected_files)} expected, "
        f"{len(actual_files)} actual; worst abs diff {overall:.3g}; atol {args.atol:g}, rtol {args.rtol:g}, "
        f"dtype {args.expect_dtype}"
    )
    if cmp.mismatches:
        print(f"FAIL: {len(cmp.mismatches)} mismatches; the first {min(len(cmp.mismatches), args.max_listed)}:")
        for m in cmp.mismatches[: args.max_listed]:
            print(f"  {m}")
        return 1
    print("OK")
    return 0


def _natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


if __name__ == "__main__":
    sys.exit(main())
