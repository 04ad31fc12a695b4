#!/usr/bin/env python3
"""Checks `.pt` files against real torch, and writes the `.pt` test fixtures.

Usage:
  check_pt.py describe FILE.pt...        print a JSON description of each file
  check_pt.py verify [--no-offset-calculation] [--sha256] FILE.pt EXPECTED.json [...]
                                         load each file every way torch can and
                                         compare with the expected description
  check_pt.py fixtures OUT_DIR           write the fixtures (FILE.pt + FILE.json)

A description is JSON: tensors are {"tensor": {"dtype", "shape", "values"}}
(values flattened row-major, floats exact; with `--sha256`, "sha256", the
digest of their row-major little-endian bytes, instead), dicts
{"dict": [[key, value], ...]} in insertion order, {"list": [...]},
{"tuple": [...]}, {"str": s}, {"int": i}, {"float": x}, {"bool": b}, and null
for None. The Rust tests in format/src/pt/tests/ produce the same
descriptions.

`verify` loads with weights_only=True, with mmap=True, with
map_location="meta" and with torch's offset calculation
(`calculate_storage_offsets`) checked by TORCH_SERIALIZATION_DEBUG, and checks
that every entry's data is 64-byte aligned. `--no-offset-calculation` leaves
out the offset-calculating load: for files laid out as if they were past
4 GiB (zip64 fields on small entries), whose offsets torch's calculation,
which assumes miniz's 4 GiB bound, cannot predict.
"""

import collections
import hashlib
import json
import os
import struct
import sys
import zipfile

import torch  # noqa: E402
from torch.utils.serialization import config as serialization_config  # noqa: E402

DTYPES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.int64: "int64",
}


def describe(value, values="list"):
    """JSON-able description of a loaded value. A tensor's values are a
    list ("list"), the SHA-256 of its row-major little-endian bytes
    ("sha256": for tensors too large for a list) or left out (None)."""
    if isinstance(value, torch.Tensor):
        if value.dtype not in DTYPES:
            raise TypeError(f"unexpected dtype {value.dtype}")
        out = {"dtype": DTYPES[value.dtype], "shape": list(value.shape)}
        if values == "list":
            flat = value.reshape(-1)
            out["values"] = (flat if value.dtype == torch.int64 else flat.double()).tolist()
        elif values == "sha256":
            raw = value.contiguous().reshape(-1).view(torch.uint8).numpy()
            out["sha256"] = hashlib.sha256(raw).hexdigest()
        return {"tensor": out}
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise TypeError(f"dict key of type {type(key).__name__}")
        return {"dict": [[k, describe(v, values)] for k, v in value.items()]}
    if isinstance(value, list):
        return {"list": [describe(v, values) for v in value]}
    if isinstance(value, tuple):
        return {"tuple": [describe(v, values) for v in value]}
    if value is None:
        return None
    for kind, cls in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if isinstance(value, cls):
            return {kind: value}
    raise TypeError(f"unexpected value of type {type(value).__name__}")


def data_offsets(path):
    """(entry name, data offset) of every zip entry, from the local headers."""
    out = []
    with open(path, "rb") as f:
        for info in zipfile.ZipFile(path).infolist():
            f.seek(info.header_offset + 26)
            name_len, extra_len = struct.unpack("<HH", f.read(4))
            out.append((info.filename, info.header_offset + 30 + name_len + extra_len))
    return out


def load_all_ways(path, offset_calculation=True, values="list"):
    """Descriptions of `path` loaded each way; raises on any mismatch."""
    # TORCH_SERIALIZATION_DEBUG makes plain loads check the calculation too.
    os.environ["TORCH_SERIALIZATION_DEBUG"] = "1" if offset_calculation else "0"
    plain = describe(torch.load(path, weights_only=True), values)
    mmapped = describe(torch.load(path, weights_only=True, mmap=True), values)
    offsets = mmapped
    if offset_calculation:
        serialization_config.load.calculate_storage_offsets = True
        try:
            offsets = describe(torch.load(path, weights_only=True, mmap=True), values)
        finally:
            serialization_config.load.calculate_storage_offsets = False
    meta = describe(torch.load(path, weights_only=True, map_location="meta"), values=None)
    if not plain == mmapped == offsets:
        raise AssertionError(f"{path}: mmap or offset-calculating loads differ from a plain load")
    if meta != describe(torch.load(path, weights_only=True, mmap=True), values=None):
        raise AssertionError(f"{path}: meta load differs")
    for name, offset in data_offsets(path):
        if offset % 64:
            raise AssertionError(f"{path}: entry {name} data at {offset} is not 64-byte aligned")
    return plain


def cmd_describe(paths):
    for path in paths:
        print(json.dumps({"path": path, "value": describe(torch.load(path, weights_only=True))}))


def cmd_verify(args):
    offset_calculation = "--no-offset-calculation" not in args
    values = "sha256" if "--sha256" in args else "list"
    args = [a for a in args if a not in ("--no-offset-calculation", "--sha256")]
    if not args or len(args) % 2:
        sys.exit("verify takes pairs of FILE.pt EXPECTED.json")
    failed = False
    for path, expected_path in zip(args[::2], args[1::2]):
        with open(expected_path) as f:
            expected = json.load(f)
        try:
            actual = load_all_ways(path, offset_calculation, values)
        except Exception as e:  # report every file, then fail
            print(f"FAIL {path}: {type(e).__name__}: {e}")
            failed = True
            continue
        if actual == expected:
            print(f"ok   {path} ({os.path.getsize(path)} bytes)")
        else:
            print(f"FAIL {path}: loaded value differs from {expected_path}")
            print("  actual:  ", json.dumps(actual)[:2000])
            print("  expected:", json.dumps(expected)[:2000])
            failed = True
    sys.exit(1 if failed else 0)


def fixtures():
    """name -> value saved with torch.save."""
    base = (torch.arange(12, dtype=torch.float32) / 4 - 1.25).reshape(3, 4)
    odd = torch.tensor([0.1, -2.7, 1e-3, 3.14159, -0.0, 65504.0])
    return {
        "bare_f32": base.clone(),
        "bare_bf16": odd.to(torch.bfloat16).reshape(2, 3),
        "bare_f16": odd.to(torch.float16),
        "nested": {
            "prompt": {
                "text": "héllo wörld ✓",
                "tokens": ["<bos>", "h", "é"],
                "token_ids": [2, 651, 2**40, -7],
                "activations": {"0": {"residual_in": base[:2].clone(), "mlp_out": odd.reshape(3, 2)}},
                "attention": {"layer_0": torch.eye(3)},
            },
            "response": {
                "attention": {"layer_0": [torch.ones(2, 2), torch.full((3, 3), 0.5)]},
                "meta": {"n": 3, "f": 0.5, "ok": True, "none": None, "pair": (1, "x")},
            },
        },
        "views": {
            "base": base,
            "slice": base[1:, 2:],
            "transposed": base.t(),
            "row": base[2],
            "element": base[1, 1],
            "expanded": torch.tensor([7.0, 8.0])[1:].expand(4),
        },
        "int64": (torch.arange(-3, 3, dtype=torch.int64) * 2**40).reshape(2, 3),
        "ordered_empty": collections.OrderedDict(
            [("empty", torch.zeros(0, 3)), ("scalar", torch.tensor(2.5, dtype=torch.bfloat16)), ("empty_list", [])]
        ),
    }


def cmd_fixtures(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    for name, value in fixtures().items():
        path = os.path.join(out_dir, f"{name}.pt")
        torch.save(value, path)
        with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
            json.dump(load_all_ways(path), f, ensure_ascii=False)
            f.write("\n")
        print(f"wrote {path} ({os.path.getsize(path)} bytes)")


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    command, args = sys.argv[1], sys.argv[2:]
    if command == "describe":
        cmd_describe(args)
    elif command == "verify":
        cmd_verify(args)
    elif command == "fixtures" and len(args) == 1:
        cmd_fixtures(args[0])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
