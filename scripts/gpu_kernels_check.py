#!/usr/bin/env python3
"""Check the Triton kernels against the PyTorch reference at real shapes on a CUDA GPU, and time them.

    PYTHONUNBUFFERED=1 python3 scripts/gpu_kernels_check.py [--out DIR] [--pytest | --select]

Shapes: SmolLM2-135M (30 layers, H=9, Hkv=3, D=64) and Llama-3.1-8B (32 layers, H=32, Hkv=8, D=128),
both with F=128, C=64, λ=256, the window full, the sparse cache full, queries at position ~100K and
cached keys capped at distance 4096. Correctness: ‖out − ref‖/‖ref‖ (fp32 < 1e-4, bf16/fp16 < 1e-2),
outputs and unused buffer slots poisoned with NaN. Timing: median µs per layer (per call) of one
model's worth of layers (distinct buffers per layer), eager and replayed inside one CUDA graph,
Triton vs the reference (torch eager). Prints a table last; writes JSON and the table to --out.
`--pytest` runs tests/test_kernels.py compiled on the GPU instead (TRITON_INTERPRET=0). `--select` runs only
the select_keep checks and timings (λ = 256, 768, 1024 with C = 64 more candidates, both head counts: the
radix search per radix_bits and the torch stable sort).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
import traceback
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def import_kernels():
    """lolachat.kernels from this checkout, installed or not (pyproject maps kernels/ there)."""
    sys.path.insert(0, str(ROOT))
    try:
        import lolachat.kernels  # noqa: F401
    except ImportError:
        if "lolachat" not in sys.modules:  # the application package itself failed: a bare parent will do
            parent = types.ModuleType("lolachat")
            parent.__path__ = [str(ROOT / "lolachat")]
            sys.modules["lolachat"] = parent
        spec = importlib.util.spec_from_file_location(
            "lolachat.kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["lolachat.kernels"] = module
        spec.loader.exec_module(module)
    from lolachat.kernels import ops, reference, triton_attention, triton_eviction

    return ops, reference, triton_attention, triton_eviction


SHAPES = {
    "smollm2": {"layers": 30, "h": 9, "hkv": 3, "d": 64, "f": 128, "c": 64, "lam": 256},
    "llama8b": {"layers": 32, "h": 32, "hkv": 8, "d": 128, "f": 128, "c": 64, "lam": 256},
}
WINDOW_START = 100_000
CAP = 4096
TOL = {"float32": 1e-4, "bfloat16": 1e-2, "float16": 1e-2}
DEVICE = "cuda"
SMOKE = False  # --smoke: CPU under TRITON_INTERPRET=1, few layers, each timed fn run once (script check)


def rel_err(got, want) -> float:
    if got.isnan().any():
        return float("nan")
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm()).item()


class Layer:
    """One layer's LoLA memory and queries, random, as the engine holds them mid-conversation."""

    def __init__(self, shape: dict, t: int, dtype, seed: int, sparse_used: int | None = None):
        b, h, hkv, d, f, c, lam = 1, shape["h"], shape["hkv"], shape["d"], shape["f"], shape["c"], shape["lam"]
        dev = DEVICE
        g = torch.Generator(device=dev).manual_seed(seed)

        def normal(*s, scale=1.0, dt=dtype):
            return (torch.randn(*s, generator=g, device=dev) * scale).to(dt)

        window_len = c + (c if t == c else 37)  # previous chunk + current chunk ending at the queries
        self.window_k = torch.full((b, hkv, 2 * c, d), float("nan"), dtype=dtype, device=dev)
        self.window_v = self.window_k.clone()
        self.window_k[:, :, :window_len] = normal(b, hkv, window_len, d)
        self.window_v[:, :, :window_len] = normal(b, hkv, window_len, d)
        used = lam if sparse_used is None else min(sparse_used, lam)
        self.sparse_k = normal(b, h, lam, d)
        self.sparse_v = normal(b, h, lam, d)
        self.sparse_k[:, :, used:] = float("nan")
        self.sparse_v[:, :, used:] = float("nan")
        self.sparse_pos = torch.randint(0, WINDOW_START, (b, h, lam), generator=g, device=dev)
        phi = torch.rand(b, h, 4 * lam, f, generator=g, device=dev).softmax(-1)
        self.h_state = torch.einsum("bhnf,bhnd->bhfd", phi, normal(b, h, 4 * lam, d, dt=torch.float32))
        self.s_state = phi.sum(2)
        self.q_pre = normal(b, h, t, d)
        self.kw = {
            "q_pos": WINDOW_START + window_len - t, "window_start": WINDOW_START,
            "gamma": torch.rand(h, generator=g, device=dev),
            "phi_weight": normal(h, d, f // 2, scale=0.3, dt=torch.float32),
            "inv_freq": 1.0 / (10000 ** (torch.arange(0, d, 2, device=dev).float() / d)),
            "scale": d**-0.5, "sparse_len": used,
        }

    def attention_args(self, mix="lola", cap=CAP, phi_input="pre_rope"):
        return {"q_pre": self.q_pre, "window_k": self.window_k, "window_v": self.window_v,
                "sparse_k": self.sparse_k, "sparse_v": self.sparse_v, "sparse_pos": self.sparse_pos,
                "h_state": self.h_state, "s_state": self.s_state, "mix": mix, "max_distance": cap,
                "phi_input": phi_input, **self.kw}

    def eviction_args(self, phi_input="pre_rope"):
        c = self.window_k.shape[2] // 2
        group = self.q_pre.shape[1] // self.window_k.shape[1]
        chunk_k = self.window_k[:, :, :c].repeat_interleave(group, dim=1)
        chunk_v = self.window_v[:, :, :c].repeat_interleave(group, dim=1)
        chunk_pos = torch.arange(WINDOW_START, WINDOW_START + c, device=DEVICE).expand(*chunk_k.shape[:2], c)
        return {"cand_k": torch.cat([self.sparse_k, chunk_k], 2), "cand_v": torch.cat([self.sparse_v, chunk_v], 2),
                "cand_pos": torch.cat([self.sparse_pos, chunk_pos], 2), "h_state": self.h_state.clone(),
                "s_state": self.s_state.clone(), "phi_weight": self.kw["phi_weight"],
                "capacity": self.sparse_k.shape[2], "inv_freq": self.kw["inv_freq"], "phi_input": phi_input}


# ------------------------------------------------------------------------------------------ checks


TRIG_CASES = (0, 2, 6)


def check_attention(ref, ta, results):
    cases = [  # shape, T, dtype, mix, cap, phi_input, sparse_used, device scalars
        ("smollm2", 1, "bfloat16", "lola", CAP, "pre_rope", None, False),
        ("smollm2", 64, "bfloat16", "lola", CAP, "pre_rope", None, False),
        ("smollm2", 1, "float32", "lolcats", None, "post_rope", None, False),
        ("smollm2", 64, "float32", "lola", CAP, "post_rope", None, True),
        ("smollm2", 1, "float16", "lola", CAP, "pre_rope", 100, True),
        ("smollm2", 1, "bfloat16", "lola", CAP, "pre_rope", 0, False),  # λ = 0 path
        ("llama8b", 1, "bfloat16", "lola", CAP, "pre_rope", None, False),
        ("llama8b", 64, "bfloat16", "lolcats", CAP, "pre_rope", None, False),
        ("llama8b", 1, "float32", "lola", None, "post_rope", 130, True),
        ("llama8b", 64, "float32", "lola", CAP, "pre_rope", None, False),
    ]
    for i, (shape, t, dtype, mix, cap, phi_input, used, dev_scalars) in enumerate(cases):
        name = f"attn {shape} T={t} {dtype} {mix} cap={cap} {phi_input} used={used} devscalars={dev_scalars}"
        try:
            layer = Layer(SHAPES[shape], t, getattr(torch, dtype), 100 + i, sparse_used=used)
            args = layer.attention_args(mix, cap, phi_input)
            if used == 0:
                args.update(sparse_k=args["sparse_k"][:, :, :0], sparse_v=args["sparse_v"][:, :, :0],
                            sparse_pos=args["sparse_pos"][:, :, :0], sparse_len=None)
            want = ref.lola_attention(**args)
            if dev_scalars:
                n = args["q_pre"].shape[2]
                args["q_pos"] = torch.arange(args["q_pos"], args["q_pos"] + n, device=DEVICE)
                args["window_start"] = torch.tensor([args["window_start"]], device=DEVICE)
                args["sparse_len"] = torch.tensor([args["sparse_len"]], device=DEVICE)
            # split and single kernels in their default form (T = 1: one query per program, plain products;
            # else tiles of 16 queries), and the split kernel in the other form
            for split, vec in ((True, None), (False, None), (True, t != 1)):
                out = torch.full_like(want, float("nan"))
                ta.lola_attention(**args, out=out, split=split, vec=vec)
                form = "" if vec is None else (" vec" if vec else " tiles")
                record(results, f"{name} [{'split' if split else 'single'}{form}]", rel_err(out, want), TOL[dtype])
            if i in TRIG_CASES:  # the default sin/cos is reduced+approx; libdevice is the exact one
                other = ta.lola_attention(**args, trig="libdevice")
                record(results, name + " [trig=libdevice]", rel_err(other, want), TOL[dtype], required=False)
        except Exception:  # noqa: BLE001 - a harness: report every failure, go on with the rest
            record_failure(results, name)


def check_eviction(ref, ops, te, results):
    for i, (shape, dtype, phi_input) in enumerate([("smollm2", "bfloat16", "pre_rope"),
                                                   ("llama8b", "bfloat16", "post_rope"),
                                                   ("llama8b", "float32", "pre_rope")]):
        name = f"evict {shape} {dtype} {phi_input}"
        try:
            layer = Layer(SHAPES[shape], 1, getattr(torch, dtype), 200 + i)
            want_args, got_args = layer.eviction_args(phi_input), layer.eviction_args(phi_input)
            a = want_args
            x = a["cand_k"]
            if phi_input == "post_rope":
                x = ref.rope_rotate(x, a["cand_pos"], a["inv_freq"])
            phi = ref.hedgehog(x, a["phi_weight"])
            want_scores = ref.self_recall_error(phi, a["cand_v"], a["h_state"], a["s_state"])
            scores = torch.full_like(want_scores, float("nan"))
            te.recall_scores(a["cand_k"], a["cand_pos"], a["cand_v"], a["h_state"], a["s_state"], a["phi_weight"],
                             a["inv_freq"], phi_input == "post_rope", out=scores)
            record(results, name + " recall_scores", rel_err(scores, want_scores), 1e-4)
            phi_out = torch.full_like(phi, float("nan"))
            record(results, name + " hedgehog", rel_err(te.hedgehog(x, a["phi_weight"], out=phi_out), phi), 1e-4)
            given = torch.full_like(want_scores, float("nan"))
            te.self_recall_error(phi, a["cand_v"], a["h_state"], a["s_state"], out=given)
            record(results, name + " self_recall_error", rel_err(given, want_scores), 1e-4)
            h2, s2 = a["h_state"].clone(), a["s_state"].clone()
            h3, s3 = a["h_state"].clone(), a["s_state"].clone()
            ref.fold(phi, a["cand_v"], h2, s2)
            te.fold(phi, a["cand_v"], h3, s3)
            record(results, name + " fold", max(rel_err(h3, h2), rel_err(s3, s2)), 1e-4)
            keep_want = ref.evict_compete(**want_args)
            keep_got = ops.evict_compete(**got_args)
            same = torch.equal(keep_got, keep_want)
            err = max(rel_err(got_args["h_state"], want_args["h_state"]),
                      rel_err(got_args["s_state"], want_args["s_state"]))
            record(results, name + f" evict_compete (keep identical: {same})", err if same else float("nan"), 1e-4)
            want_args, got_args = layer.eviction_args(phi_input), layer.eviction_args(phi_input)
            same = torch.equal(ops.evict_compete(**got_args, fade=0.9), ref.evict_compete(**want_args, fade=0.9))
            err = max(rel_err(got_args["h_state"], want_args["h_state"]),
                      rel_err(got_args["s_state"], want_args["s_state"]))
            record(results, name + f" evict_compete fade 0.9 (keep identical: {same})", err if same else math.nan,
                   1e-4)
            tied = (want_scores * 8).floor()  # few distinct values: ties must go to the earlier candidate
            keep_want, drop_want = ref.select_keep(tied, a["capacity"])
            keep, drop = te.select_keep(tied, a["capacity"])
            same = torch.equal(keep, keep_want) and torch.equal(drop.sort(-1).values, drop_want.sort(-1).values)
            record(results, name + " select_keep with ties (0 = identical)", 0.0 if same else math.nan, 1e-4)
        except Exception:  # noqa: BLE001 - a harness: report every failure, go on with the rest
            record_failure(results, name)


SELECT_LAMS = (256, 768, 1024)  # λ of the selection checks and timings (C = 64 more candidates each)


def check_select(ref, ops, te, results):
    """select_keep against the stable sort at λ + C candidates: the radix search (every knob) and ops (its
    defaults), on continuous scores and on scores with heavy ties and -inf (the same keep; drop = the rest)."""
    for i, lam in enumerate(SELECT_LAMS):
        n = lam + 64
        name = f"select_keep λ={lam} N={n}"
        try:
            g = torch.Generator(device=DEVICE).manual_seed(400 + i)
            smooth = torch.rand(2, 9, n, generator=g, device=DEVICE)
            tied = (smooth * 4).floor() - 2.0
            tied[torch.rand(tied.shape, generator=g, device=DEVICE) < 0.3] = float("-inf")
            for kind, scores in (("continuous", smooth), ("ties+inf", tied)):
                for capacity in (lam,) if SMOKE else (lam, 0, n - 1, n):
                    keep_want, drop_want = ref.select_keep(scores, capacity)
                    drop_want = drop_want.sort(-1).values
                    variants = {f"radix bits={bits}": {"radix_bits": bits} for bits in ((4,) if SMOKE else (1, 2, 4))}
                    variants["radix chunks of 256"] = {"block_max": 256}
                    for label, knobs in variants.items():
                        keep, drop = te.select_keep(scores, capacity, **knobs)
                        same = torch.equal(keep, keep_want) and torch.equal(drop, drop_want)
                        record(results, f"{name} {kind} capacity={capacity} {label} (0 = identical)",
                               0.0 if same else math.nan, 1e-4)
                    keep, drop = ops.select_keep(scores, capacity)
                    same = torch.equal(keep, keep_want) and torch.equal(drop.sort(-1).values, drop_want)
                    record(results, f"{name} {kind} capacity={capacity} ops.select_keep (0 = identical)",
                           0.0 if same else math.nan, 1e-4)
        except Exception:  # noqa: BLE001 - a harness: report every failure, go on with the rest
            record_failure(results, name)


def check_split_determinism(ta, results):
    """The split kernel merges partials through an atomic counter: replay it many times on one input;
    a race shows as a changed bit or a counter left non-zero."""
    for shape, t in (("llama8b", 1), ("smollm2", 64)):
        name = f"split kernel {shape} T={t}: 200 runs bitwise identical, counters back at 0"
        try:
            args = Layer(SHAPES[shape], t, torch.bfloat16, 300).attention_args()
            first = ta.lola_attention(**args, split=True)
            outs = [ta.lola_attention(**args, split=True) for _ in range(200)]
            same = all(torch.equal(o, first) for o in outs)
            counters_zero = all(int(c[2].abs().sum()) == 0 for c in ta._SCRATCH.values())
            record(results, name, 0.0 if same and counters_zero else math.nan, 1e-4)
        except Exception:  # noqa: BLE001
            record_failure(results, name)


def record(results, name, err, bound, required=True):
    ok = not math.isnan(err) and err < bound
    results["checks"].append({"name": name, "rel_err": err, "bound": bound, "ok": ok, "required": required})
    print(f"{'PASS' if ok else ('FAIL' if required else 'info')}  {err:.2e} (< {bound:g})  {name}")


def record_failure(results, name):
    results["checks"].append({"name": name, "rel_err": None, "ok": False, "required": True,
                              "error": traceback.format_exc()})
    print(f"ERROR {name}\n{traceback.format_exc()}")


# ------------------------------------------------------------------------------------------ timing


def graph_of(fn):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def time_us(fn, n_layers: int, graph: bool) -> float:
    """Median µs per layer of fn (which runs all layers once), eager or replayed from a CUDA graph."""
    from triton.testing import do_bench

    if SMOKE:
        fn()
        return 0.0
    if graph:
        g = graph_of(fn)
        fn = g.replay
    else:
        fn()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=30, rep=200, return_mode="median") * 1e3 / n_layers


def decode_floor_bytes(shape: dict, dtype_bytes: int) -> int:
    """Fewest bytes one decode attention call must move: the layer's whole LoLA memory once."""
    h, hkv, d, f, c, lam = shape["h"], shape["hkv"], shape["d"], shape["f"], shape["c"], shape["lam"]
    state = h * f * d * 4 + h * f * 4
    sparse = 2 * h * lam * d * dtype_bytes + h * lam * 8
    window = 2 * hkv * 2 * c * d * dtype_bytes
    return state + sparse + window


def time_attention(ref, ta, results, shape_name: str, shape: dict, t: int) -> None:
    n = 2 if SMOKE else shape["layers"]
    layers = [Layer(shape, t, torch.bfloat16, 1000 + i) for i in range(n)]
    argsets = [layer.attention_args("lola", CAP, "pre_rope") for layer in layers]
    outs = [torch.empty_like(a["q_pre"]) for a in argsets]
    what = f"{shape_name} attention " + ("decode T=1" if t == 1 else "prefill chunk T=64")

    def triton_layers(split=True, **knobs):
        for a, o in zip(argsets, outs):
            ta.lola_attention(**a, out=o, split=split, **knobs)

    def reference_layers():
        for a in argsets:
            ref.lola_attention(**a)

    for graph in (False, True):
        add_timing(results, what, "triton split", graph, triton_layers, n)
        add_timing(results, what, "triton single", graph, lambda: triton_layers(split=False), n)
        add_timing(results, what, "reference", graph, reference_layers, n)
    for label, knobs in (("split trig=libdevice", {"trig": "libdevice"}), ("split block_n=32", {"block_n": 32}),
                         ("single trig=libdevice", {"trig": "libdevice", "split": False})):
        add_timing(results, what, f"triton {label}", True, lambda knobs=knobs: triton_layers(**knobs), n)


def time_eviction(ref, ops, te, results, shape_name: str, shape: dict) -> None:
    n = 2 if SMOKE else shape["layers"]
    evs = [Layer(shape, 1, torch.bfloat16, 2000 + i).eviction_args("pre_rope") for i in range(n)]
    what = f"{shape_name} eviction (λ+C={shape['lam'] + shape['c']})"
    for graph in (False, True):
        add_timing(results, what, "triton", graph, lambda: [ops.evict_compete(**e) for e in evs], n)
        add_timing(results, what, "reference", graph, lambda: [ref.evict_compete(**e) for e in evs], n)
    scores = [torch.rand(e["cand_v"].shape[:3], device=DEVICE) for e in evs]
    drops = [ref.select_keep(s, e["capacity"])[1] for s, e in zip(scores, evs)]
    what = f"{shape_name} eviction parts"
    add_timing(results, what, "recall_scores", True,
               lambda: [te.recall_scores(e["cand_k"], e["cand_pos"], e["cand_v"], e["h_state"], e["s_state"],
                                         e["phi_weight"]) for e in evs], n)
    add_timing(results, what, "select_keep torch (stable sort x2)", True,
               lambda: [ref.select_keep(s, e["capacity"]) for s, e in zip(scores, evs)], n)
    add_timing(results, what, "select_keep triton", True,
               lambda: [te.select_keep(s, e["capacity"]) for s, e in zip(scores, evs)], n)
    add_timing(results, what, "torch.topk", True,
               lambda: [torch.topk(s, e["capacity"], dim=-1, sorted=False) for s, e in zip(scores, evs)], n)
    for block_n in (32, 16):
        add_timing(results, what, f"fold_keys block_n={block_n}", True,
                   lambda block_n=block_n: [te.fold_keys(e["cand_k"], e["cand_pos"], e["cand_v"], dr, e["h_state"],
                                                         e["s_state"], e["phi_weight"], block_n=block_n)
                                            for e, dr in zip(evs, drops)], n)


def time_select(ref, ops, te, results, shape_name: str, shape: dict) -> None:
    """select_keep at λ + C candidates per head, graph-replayed over one model's layers: the torch stable sort
    (reference), the radix search with 1, 2 and 4 bits per pass and at 4 warps, and ops (the default bits)."""
    n_layers = 2 if SMOKE else shape["layers"]
    for lam in SELECT_LAMS:
        n = lam + shape["c"]
        scores = [torch.rand(1, shape["h"], n, device=DEVICE) for _ in range(n_layers)]
        what = f"{shape_name} select_keep λ={lam} (N={n}, H={shape['h']})"
        impls = {"torch stable sort (reference)": ref.select_keep}
        for bits in (1, 2, 4):
            impls[f"radix bits={bits}"] = lambda s, c, bits=bits: te.select_keep(s, c, radix_bits=bits)
        impls[f"radix bits={te.default_radix_bits(n)} num_warps=4"] = lambda s, c: te.select_keep(s, c, num_warps=4)
        impls["ops.select_keep"] = ops.select_keep
        for impl, fn in impls.items():
            add_timing(results, what, impl, True,
                       lambda fn=fn, scores=scores, lam=lam: [fn(s, lam) for s in scores], n_layers)


def time_all(ref, ops, ta, te, results) -> None:
    for shape_name, shape in SHAPES.items():
        for t in (1, 64):
            time_attention(ref, ta, results, shape_name, shape, t)
        results["floors"][f"{shape_name} decode"] = decode_floor_bytes(shape, 2) / results["bandwidth"] * 1e6
        time_eviction(ref, ops, te, results, shape_name, shape)
        time_select(ref, ops, te, results, shape_name, shape)


def add_timing(results, what, impl, graph, fn, n):
    try:
        us = time_us(fn, n, graph)
    except Exception:  # noqa: BLE001
        us = float("nan")
        print(f"timing failed: {what} {impl} graph={graph}\n{traceback.format_exc()}")
    results["timings"].append({"what": what, "impl": impl, "graph": graph, "us_per_layer": us})
    print(f"{us:9.2f} µs/layer  {'graph' if graph else 'eager'}  {impl:28s} {what}")


def measure_bandwidth() -> float:
    if SMOKE:
        return 1e12
    from triton.testing import do_bench

    src = torch.empty(2**30 // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=20, rep=100, return_mode="median")
    return 2 * 2**30 / (ms * 1e-3)  # bytes read + written per second


# ------------------------------------------------------------------------------------------ report


def table(results) -> str:
    lines = [(f"GPU {results['gpu']}  torch {results['torch']}  triton {results['triton']}  "
              f"copy bandwidth {results['bandwidth'] / 1e12:.2f} TB/s")]
    checks = [c for c in results["checks"] if c["required"]]
    failed = [c["name"] for c in checks if not c["ok"]]
    worst = {k: max((c["rel_err"] for c in checks if c["rel_err"] is not None and k in c["name"]), default=math.nan)
             for k in ("float32", "bfloat16", "float16", "recall", "fold", "hedgehog", "evict_compete", "select")}
    lines.append(f"correctness: {len(checks) - len(failed)}/{len(checks)} pass; worst rel err " +
                 ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    lines += [f"  FAILED: {name}" for name in failed]
    lines.append(f"{'what':46s} {'impl':28s} {'eager µs':>9s} {'graph µs':>9s}")
    rows: dict[tuple, dict] = {}
    for r in results["timings"]:
        rows.setdefault((r["what"], r["impl"]), {})["graph" if r["graph"] else "eager"] = r["us_per_layer"]
    for (what, impl), v in rows.items():
        eager = f"{v['eager']:9.2f}" if "eager" in v else f"{'':9s}"
        graph = f"{v['graph']:9.2f}" if "graph" in v else f"{'':9s}"
        lines.append(f"{what:46s} {impl:28s} {eager} {graph}")
    for k, v in results["floors"].items():
        lines.append(f"bytes floor {k}: {v:.2f} µs/layer (whole LoLA memory of a layer once at the copy bandwidth)")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--pytest", action="store_true", help="run tests/test_kernels.py compiled on the GPU")
    parser.add_argument("--smoke", action="store_true", help="check this script on the CPU (interpreter)")
    parser.add_argument("--select", action="store_true", help="only the select_keep checks and timings")
    parser.add_argument("--no-timings", action="store_true", help="the checks alone (scripts/gpu_tune.py times)")
    args = parser.parse_args()
    global DEVICE, SMOKE
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["LOLACHAT_TRITON"] = "1"
        DEVICE, SMOKE = "cpu", True
        for shape in SHAPES.values():  # small enough for the interpreter
            shape.update(h=min(shape["h"], 4), hkv=min(shape["hkv"], 2), d=32, f=32, lam=48)
    if args.pytest:
        os.environ["TRITON_INTERPRET"] = "0"
        import_kernels()
        import pytest

        return pytest.main(["-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_kernels.py")])
    os.environ.setdefault("TRITON_INTERPRET", "0")
    import triton

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ops, ref, ta, te = import_kernels()
    gpu = "cpu (smoke)" if SMOKE else torch.cuda.get_device_name()
    results = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__,
               "checks": [], "timings": [], "floors": {}}
    start = time.time()
    results["bandwidth"] = measure_bandwidth()
    if args.select:
        return select_only(ref, ops, te, results, start, Path(args.out))
    check_attention(ref, ta, results)
    print(f"attention checks done at {time.time() - start:.0f} s")
    check_eviction(ref, ops, te, results)
    check_select(ref, ops, te, results)
    if not SMOKE:
        check_split_determinism(ta, results)
    print(f"checks done at {time.time() - start:.0f} s")
    try:
        if not args.no_timings:
            time_all(ref, ops, ta, te, results)
    except Exception:  # noqa: BLE001
        print(traceback.format_exc())
    return report(results, start, Path(args.out))


def select_only(ref, ops, te, results, start: float, out: Path) -> int:
    """--select: the select_keep checks and timings alone (a short GPU run)."""
    check_select(ref, ops, te, results)
    print(f"checks done at {time.time() - start:.0f} s")
    for shape_name, shape in SHAPES.items():
        try:
            time_select(ref, ops, te, results, shape_name, shape)
        except Exception:  # noqa: BLE001
            print(traceback.format_exc())
    return report(results, start, out, "select")


def report(results, start: float, out: Path, tag: str = "kernels") -> int:
    print(f"all done in {time.time() - start:.0f} s\n")
    text = table(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{tag}_check.json").write_text(json.dumps(results, indent=1, default=str))
    (out / f"{tag}_table.txt").write_text(text + "\n")
    print(text)
    return 0 if all(c["ok"] for c in results["checks"] if c["required"]) else 1


if __name__ == "__main__":
    sys.exit(main())
