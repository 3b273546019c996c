#!/usr/bin/env python3
"""Time the Triton kernels' tuning knobs at real shapes on a CUDA GPU (µs per layer in a CUDA graph).

    PYTHONUNBUFFERED=1 python3 scripts/gpu_tune.py [--out DIR] [--only decode,chunk,...] [--smoke]

For SmolLM2-135M and Llama-3.1-8B shapes (scripts/gpu_kernels_check.py: C=64, λ=256, memory full;
and SmolLM2 at its default C=256, λ=384 for decode): decode attention (split kernel, one query per
program with plain products or tiles of 16), prefill-chunk attention (single kernel), the eviction
parts (recall scores with and without storing φ, top-λ selection, fold from the keys or from stored φ)
and eviction's data movement (the two move kernels against the PyTorch copies they replaced). Each
knob setting is one row; the default is marked; the best per kernel is printed last. Outputs are not
checked here (gpu_kernels_check.py and the tests do that): block sizes change only the tiling, every
kernel masks its edges.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_kernels_check as check  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--smoke", action="store_true", help="run every path once on the CPU (interpreter)")
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    args = p.parse_args()
    parts = set(args.only.split(","))
    if parts - set(PARTS):
        p.error(f"unknown parts {sorted(parts - set(PARTS))}")
    shapes = {**check.SHAPES, **EXTRA_SHAPES}
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        check.DEVICE, check.SMOKE = "cpu", True
        for shape in shapes.values():
            shape.update(h=min(shape["h"], 4), hkv=min(shape["hkv"], 2), d=32, f=32, lam=48, c=min(shape["c"], 64))
    os.environ.setdefault("TRITON_INTERPRET", "0")
    _, ref, ta, te = check.import_kernels()
    from lolachat.kernels import triton_moves

    rows: list[dict] = []
    for shape_name, shape in shapes.items():
        try:
            tune_shape(shape_name, shape, ref, ta, te, triton_moves, rows,
                       parts & set(shape.get("parts", PARTS)))
        except Exception:  # keep the other shape's rows
            print(traceback.format_exc())
    text = table(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tune.json").write_text(json.dumps(rows, indent=1))
    (out / "tune.txt").write_text(text + "\n")
    print(text)
    return 0


def timed(rows, shape_name, kernel, knobs: dict, default: bool, fn, n_layers: int) -> None:
    try:
        us = check.time_us(fn, n_layers, graph=not check.SMOKE)
    except Exception as err:  # a setting the compiler refuses (e.g. too many registers) is a row too
        us = float("nan")
        print(f"{kernel} {knobs}: {type(err).__name__}: {str(err)[:200]}")
    rows.append({"shape": shape_name, "kernel": kernel, "knobs": knobs, "default": default, "us_per_layer": us})
    print(f"{shape_name:8s} {kernel:22s} {us:8.2f} µs {'(default) ' if default else ''}{knobs}", flush=True)


PARTS = ("decode", "chunk", "recall", "fold", "select", "moves")
EXTRA_SHAPES = {  # SmolLM2's default memory (models/smollm2-135m.toml): decode only
    "smollm2-c256": {"layers": 30, "h": 9, "hkv": 3, "d": 64, "f": 128, "c": 256, "lam": 384, "parts": ("decode",)},
}


def tune_shape(shape_name, shape, ref, ta, te, moves, rows, parts) -> None:
    n = 2 if check.SMOKE else shape["layers"]
    grid = (lambda *axes: list(itertools.product(*axes))[:2]) if check.SMOKE else (
        lambda *axes: list(itertools.product(*axes)))

    for t, kernel, split, axes, default in (
        # (vec, block_n, block_t, warps): vec = one query per program, plain products (block_t is then 1)
        (1, "decode", True, ((True, False), (64, 128, 256), (16,), (2, 4, 8)),
         (True, 64, 16, 8) if shape["d"] <= 64 else (False, 128, 16, 8)),
        (64, "chunk", False, ((False, True), (32, 64), (16, 32), (4, 8)), (False, 64, 16, 8)),
    ):
        if kernel not in parts:
            continue
        layers = [check.Layer(shape, t, torch.bfloat16, 1000 + i) for i in range(n)]
        argsets = [layer.attention_args("lola", check.CAP, "pre_rope") for layer in layers]
        outs = [torch.empty_like(a["q_pre"]) for a in argsets]
        for vec, block_n, block_t, warps in grid(*axes):
            if vec and block_t != axes[2][0]:  # block_t does not apply
                continue
            def run(vec=vec, block_n=block_n, block_t=block_t, warps=warps, argsets=argsets, outs=outs, split=split):
                for a, o in zip(argsets, outs):
                    ta.lola_attention(**a, out=o, split=split, block_n=block_n, block_t=block_t, num_warps=warps,
                                      vec=vec)
            timed(rows, shape_name, f"attention {kernel}",
                  {"vec": vec, "block_n": block_n, "block_t": 1 if vec else block_t, "num_warps": warps},
                  (vec, block_n, block_t, warps) == default, run, n)
    if not parts & {"recall", "fold", "select", "moves"}:
        return

    evs = [check.Layer(shape, 1, torch.bfloat16, 2000 + i).eviction_args("pre_rope") for i in range(n)]
    scores = [torch.rand(e["cand_v"].shape[:3], device=check.DEVICE) for e in evs]
    drops = [ref.select_keep(s, e["capacity"])[1] for s, e in zip(scores, evs)]
    phis = [torch.rand(*e["cand_v"].shape[:3], shape["f"], device=check.DEVICE) for e in evs]
    for store_phi, block_n, warps in grid((True, False), (16, 32, 64), (4, 8)) if "recall" in parts else ():
        timed(rows, shape_name, "recall_scores", {"store_phi": store_phi, "block_n": block_n, "num_warps": warps},
              (store_phi, block_n, warps) == (True, 32, 4),
              lambda store_phi=store_phi, block_n=block_n, warps=warps: [
                  te._recall(None, e["cand_k"], e["cand_pos"], e["cand_v"], e["h_state"], e["s_state"],
                             e["phi_weight"], None, False, block_n=block_n, num_warps=warps,
                             phi_out=phi if store_phi else None) for e, phi in zip(evs, phis)], n)
    for from_keys, block_n, block_dv, warps in grid((False, True), (32, 64), (32, 64), (4, 8)) \
            if "fold" in parts else ():
        timed(rows, shape_name, "fold", {"phi_from": "keys" if from_keys else "stored", "block_n": block_n,
                                         "block_dv": block_dv, "num_warps": warps},
              (from_keys, block_n, block_dv, warps) == (False, 64, 32, 4),
              lambda from_keys=from_keys, block_n=block_n, block_dv=block_dv, warps=warps: [
                  te._fold(None if from_keys else phi, e["cand_k"], e["cand_pos"], e["cand_v"], dr, e["h_state"],
                           e["s_state"], e["phi_weight"], None, False, block_n=block_n, block_dv=block_dv,
                           num_warps=warps)
                  for e, dr, phi in zip(evs, drops, phis)], n)
    n_cand = scores[0].shape[-1]
    select_default = (te.default_radix_bits(n_cand), 4 if te.block(n_cand) <= 512 else 8)
    for bits, warps in grid((1, 2, 4), (4, 8)) if "select" in parts else ():
        timed(rows, shape_name, "select_keep", {"radix_bits": bits, "num_warps": warps},
              (bits, warps) == select_default,
              lambda bits=bits, warps=warps: [te.select_keep(s, e["capacity"], radix_bits=bits, num_warps=warps)
                                              for s, e in zip(scores, evs)], n)
    if "moves" in parts:
        tune_moves(shape_name, shape, n, ref, moves, rows)


def tune_moves(shape_name, shape, n, ref, moves, rows) -> None:
    """The two move kernels against the PyTorch copies they replaced in the GPU decoder."""
    b, h, hkv, d, c, lam = 1, shape["h"], shape["hkv"], shape["d"], shape["c"], shape["lam"]
    dev, dt = check.DEVICE, torch.bfloat16
    bufs = []
    for _ in range(n):
        bufs.append({
            "sparse": (torch.randn(b, h, lam, d, device=dev).to(dt), torch.randn(b, h, lam, d, device=dev).to(dt),
                       torch.randint(0, 9999, (b, h, lam), device=dev)),
            "window": (torch.randn(b, hkv, 2 * c, d, device=dev).to(dt),
                       torch.randn(b, hkv, 2 * c, d, device=dev).to(dt)),
            "cand": (torch.empty(b, h, lam + c, d, device=dev, dtype=dt),
                     torch.empty(b, h, lam + c, d, device=dev, dtype=dt),
                     torch.empty(b, h, lam + c, dtype=torch.long, device=dev)),
            "keep": torch.stack([torch.randperm(lam + c, device=dev)[:lam].sort().values
                                 for _ in range(b * h)]).view(b, h, lam),
        })
    start = torch.tensor([4096], device=dev)

    def kernels():
        for x in bufs:
            moves.assemble_candidates(*x["sparse"], lam, *x["window"], start, *x["cand"])
            moves.keep_and_shift(*x["cand"], x["keep"], *x["sparse"], *x["window"])

    def torch_copies():
        for x in bufs:
            ref.assemble_candidates(*x["sparse"], lam, *x["window"], start, *x["cand"])
            ref.keep_and_shift(*x["cand"], x["keep"], *x["sparse"], *x["window"])

    timed(rows, shape_name, "eviction moves", {"impl": "triton (2 launches)"}, True, kernels, n)
    timed(rows, shape_name, "eviction moves", {"impl": "torch copies"}, False, torch_copies, n)


def table(rows: list[dict]) -> str:
    lines = ["| shape | kernel | default µs/layer | best µs/layer | best knobs |", "|---|---|---|---|---|"]
    seen = []
    for r in rows:
        key = (r["shape"], r["kernel"])
        if key in seen:
            continue
        seen.append(key)
        group = [x for x in rows if (x["shape"], x["kernel"]) == key and x["us_per_layer"] == x["us_per_layer"]]
        if not group:
            continue
        best = min(group, key=lambda x: x["us_per_layer"])
        default = next((x["us_per_layer"] for x in group if x["default"]), float("nan"))
        lines.append(f"| {key[0]} | {key[1]} | {default:.2f} | {best['us_per_layer']:.2f} | {best['knobs']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
