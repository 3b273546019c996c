#!/usr/bin/env python3
"""The fused decode GEMVs (kernels/triton_gemv.py) on a CUDA GPU: check, tune, and the decode step.

    PYTHONUNBUFFERED=1 python3 scripts/gpu_gemv.py --out $OUT [--seconds 500] [--smoke]

1. check   every fused kernel against the reference at the real shapes of SmolLM2-135M and
           Llama-3.1-8B (bf16, random weights): relative error.
2. tune    µs per launch in a CUDA graph over one model's worth of distinct weights (each layer its
           own matrix, as decode reads them) for each (BLOCK_N, BLOCK_K, warps), against what the
           fused kernel replaces: cuBLAS GEMV plus the separate norm / SiLU / add / window-copy kernels.
3. decode  the GPU engine's decode step (CUDA graph, C = 64, λ = 256, identity maps, random weights:
           speed does not depend on weight values) with the fused GEMVs and without
           (LOLACHAT_FUSED_GEMV=0), interleaved, beside the weights-only GEMV chain of the same run.
The tables are printed last and written to gemv.json / gemv.txt under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

# Pass 1: every tile and warp count without prefetch; pass 2: the three best with prefetch.
SMALL_TILES = [(1, 512), (1, 1024), (2, 512), (4, 256), (16, 128), (32, 64)]  # weights under 4M elements
LARGE_TILES = [(4, 256), (4, 512), (8, 256), (4, 1024), (8, 512), (16, 256), (16, 512), (32, 64), (32, 128),
               (64, 64)]
SMALL_WARPS, LARGE_WARPS = [2, 4, 8], [4, 8]
SMOKE = dict(tiles=[(4, 32), (8, 64)], warps=[4])


def roles(shape: dict) -> dict[str, dict]:
    """The decode GEMVs of one layer (and the head): weight [N, K] and which fused kernel serves it."""
    d, h, hkv = shape["dim"], shape["n_heads"], shape["n_kv_heads"]
    hid, vocab = shape["hidden_dim"], shape["vocab_size"]
    hd = d // h
    return {
        "qkv": dict(n=(h + 2 * hkv) * hd, k=d, kind="qkv", q_rows=h * hd, hkv=hkv, hd=hd),
        "o": dict(n=d, k=h * hd, kind="add"),
        "gate_up": dict(n=2 * hid, k=d, kind="silu"),
        "down": dict(n=d, k=hid, kind="add"),
        "head": dict(n=vocab, k=d, kind="norm", layers=1),
    }


class Case:
    """One role's inputs: a list of distinct weights (one per layer) and the buffers a call needs."""

    def __init__(self, role: dict, layers: int, dtype, device):
        self.role, self.kind = role, role["kind"]
        n, k = role["n"], role["k"]
        g = torch.Generator(device=device).manual_seed(n * 7 + k)
        self.weights = [torch.empty(n, k, dtype=dtype, device=device).normal_(0, 0.02, generator=g)
                        for _ in range(role.get("layers", layers))]
        self.x = torch.randn(1, 1, k, dtype=dtype, device=device, generator=g)
        self.norm_w = torch.ones(k, dtype=dtype, device=device)
        n_out = n // 2 if self.kind == "silu" else n
        self.residual0 = torch.randn(1, 1, n_out, dtype=dtype, device=device, generator=g)
        self.residual = self.residual0.clone()  # linear_add accumulates into it while timing
        self.out = torch.empty(1, 1, n_out, dtype=torch.float32 if self.kind == "norm" else dtype, device=device)
        if self.kind == "qkv":
            self.q_out = torch.empty(1, 1, role["q_rows"], dtype=dtype, device=device)
            self.windows = [torch.zeros(1, role["hkv"], 128, role["hd"], dtype=dtype, device=device) for _ in range(2)]
            self.slot = torch.tensor([70], device=device)

    def fused(self, gemv, w, config):
        if self.kind == "qkv":
            return gemv.norm_qkv(self.x, self.norm_w, 1e-5, w, self.q_out, *self.windows, self.slot, config=config)
        if self.kind == "add":
            return gemv.linear_add(self.x, w, self.residual, config=config)
        return gemv.norm_linear(self.x, self.norm_w, 1e-5, w, silu=self.kind == "silu", out=self.out, config=config)

    def separate(self, ops, w):
        """What the decode step ran before: cuBLAS plus the Triton norm / SiLU kernels and torch copies."""
        os.environ["LOLACHAT_FUSED_GEMV"] = "0"  # read when ops dispatches, i.e. at capture
        try:
            return self._separate(ops, w)
        finally:
            os.environ.pop("LOLACHAT_FUSED_GEMV")

    def _separate(self, ops, w):
        if self.kind == "qkv":
            return ops.norm_qkv(self.x, self.norm_w, 1e-5, w, self.q_out, *self.windows, self.slot)
        if self.kind == "add":
            return self.residual.add_(F.linear(self.x, w))
        return ops.norm_linear(self.x, self.norm_w, 1e-5, w, silu=self.kind == "silu", out=self.out)

    def reference(self, ref, w):
        if self.kind == "qkv":
            q = torch.empty_like(self.q_out)
            windows = [t.clone() for t in self.windows]
            ref.norm_qkv(self.x, self.norm_w, 1e-5, w, q, *windows, self.slot)
            return torch.cat([q.flatten(), windows[0][:, :, 70].flatten(), windows[1][:, :, 70].flatten()])
        if self.kind == "add":
            return ref.linear_add(self.x, w, self.residual0.clone())
        return ref.norm_linear(self.x, self.norm_w, 1e-5, w, silu=self.kind == "silu", out=torch.empty_like(self.out))

    def fused_result(self, gemv, w, config):
        if self.kind == "qkv":
            self.fused(gemv, w, config)
            return torch.cat([self.q_out.flatten(), self.windows[0][:, :, 70].flatten(),
                              self.windows[1][:, :, 70].flatten()])
        if self.kind == "add":
            self.residual.copy_(self.residual0)
            return self.fused(gemv, w, config).clone()
        return self.fused(gemv, w, config).clone()


def graph_us(fn, calls: int, device, reps: int = 20) -> float:
    """µs per call of `fn` (which makes `calls` launches' worth of work) replayed from a CUDA graph."""
    if device == "cpu":
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e6 / calls
    fn()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / reps / calls)
    return best


def tune(result: dict, shape_name: str, shape: dict, layers: int, device, deadline: float, smoke: bool) -> None:
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    for role_name, role in roles(shape).items():
        if time.monotonic() > deadline:
            result["skipped"].append(f"{shape_name}/{role_name}")
            continue
        row = {"shape": shape_name, "role": role_name, "n": role["n"], "k": role["k"]}
        tune_role(result, row, Case(role, layers, dtype, device), device, deadline, smoke)
        result["tune"].append(row)
        if device != "cpu":
            torch.cuda.empty_cache()


def tune_role(result: dict, row: dict, case: Case, device, deadline: float, smoke: bool) -> None:
    import triton
    from lolachat.kernels import ops, triton_gemv
    from lolachat.kernels import reference as ref

    role, name = case.role, f"{row['shape']}/{row['role']}"
    n_calls = row["calls"] = len(case.weights)
    default = triton_gemv.gemv_config(role["n"] // 2 if case.kind == "silu" else role["n"], role["k"])
    default = default or (1, 1024, 4, 0)  # a shape the engine runs unfused: check the kernel anyway
    want = case.reference(ref, case.weights[0]).float()

    def error(config) -> float:
        return ((case.fused_result(triton_gemv, case.weights[0], config).float() - want).norm() / want.norm()).item()

    row["default_rel_err"] = error(default)
    result["check"].append({"gemv": name, "rel_err": row["default_rel_err"]})
    print(f"{name:22s} check rel err {row['default_rel_err']:.2e}", flush=True)
    row["cublas_us"] = graph_us(lambda: [F.linear(case.x, w) for w in case.weights], n_calls, device)
    row["separate_us"] = graph_us(lambda: [case.separate(ops, w) for w in case.weights], n_calls, device)
    timings: list[dict] = []

    def measure(config) -> None:
        if config[1] > 2 * triton.next_power_of_2(role["k"]) or time.monotonic() > deadline:
            return
        try:
            us = graph_us(lambda: [case.fused(triton_gemv, w, config) for w in case.weights], n_calls, device)
        except Exception as err:  # a tile the compiler refuses: note it, go on
            result["errors"].append(f"{name}/{config}: {type(err).__name__}: {err}")
            return
        timings.append({"config": list(config), "us": us})

    large = role["n"] * role["k"] >= 4 << 20
    tiles, warps_list = (LARGE_TILES, LARGE_WARPS) if large else (SMALL_TILES, SMALL_WARPS)
    if smoke:
        tiles, warps_list = SMOKE["tiles"], SMOKE["warps"]
    for block_n, block_k in tiles:
        for warps in warps_list:
            measure((block_n, block_k, warps, 0))
    for t in sorted(timings, key=lambda t: t["us"])[:3]:
        measure((*t["config"][:3], 1))
    timings.sort(key=lambda t: t["us"])
    row["fused"] = timings[:5]
    row["fused_default_us"] = next((t["us"] for t in timings if tuple(t["config"]) == default), None)
    if timings:
        best = timings[0]
        row["best_rel_err"] = error(tuple(best["config"]))
        print(f"{name:22s} cublas {row['cublas_us']:.2f} separate {row['separate_us']:.2f} "
              f"fused best {best['us']:.2f} {best['config']} (default {row['fused_default_us']})", flush=True)


def decode(result: dict, shape_name: str, device, deadline: float, smoke: bool, steps: int) -> None:
    """Decode tok/s of the GPU engine, fused GEMVs on and off, interleaved; the GEMV chain beside them."""
    from lolachat import bench
    from lolachat.engine import Engine, EngineInfo, memory_info

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = bench.random_model("tiny" if smoke else shape_name, torch.device(device), dtype)
    cfg = bench.attach_identity(model, chunk=64, sparse=256)
    gemv = bench.gemv_chain(model)
    row = {"shape": shape_name, "gemv_chain_tok_s": gemv.get("tok_s"), "gemv": gemv, "fused": [], "separate": []}
    info = EngineInfo(model=shape_name, source="random", weights_sha256="", mode="lola", device=device,
                      dtype=str(dtype), **memory_info(cfg))
    os.environ["LOLACHAT_STATIC"] = "1"
    prompt = bench.random_ids(256 if smoke else 2048, model.args.vocab_size)
    runs = {}
    for mode in ("fused", "separate"):
        os.environ["LOLACHAT_FUSED_GEMV"] = "1" if mode == "fused" else "0"
        engine = Engine(model, None, info, stop_ids=[])
        decoder = engine.static_decoder()
        decoder.graphs = device != "cpu"
        mem = engine.new_memory()
        logits = engine.prefill(mem, prompt)
        decoder.run_steps(mem, logits, 8)  # captures this mode's decode graph (the env is read at capture)
        runs[mode] = (decoder, mem, logits)
    for _ in range(1 if smoke else 3):
        for mode, (decoder, mem, logits) in runs.items():
            if time.monotonic() > deadline:
                break
            with bench.Measure(torch.device(device)) as m:
                decoder.run_steps(mem, logits, steps)
            row[mode].append(steps / m.seconds)
    os.environ.pop("LOLACHAT_FUSED_GEMV", None)
    for mode in ("fused", "separate"):
        if row[mode]:
            best = max(row[mode])
            row[f"{mode}_tok_s"] = best
            if row["gemv_chain_tok_s"]:
                row[f"{mode}_over_gemv"] = best / row["gemv_chain_tok_s"]
    graphs = {mode: sorted(str(k) for k in mem.graphs) for mode, (_, mem, _) in runs.items()}
    row["graphs"] = graphs
    print(f"{shape_name}: decode fused {row.get('fused_tok_s')} separate {row.get('separate_tok_s')} "
          f"gemv chain {row['gemv_chain_tok_s']}", flush=True)
    result["decode"].append(row)


def table(result: dict) -> str:
    lines = ["| shape | GEMV | N × K | cuBLAS µs | before (separate) µs "
             "| fused, best µs [BLOCK_N, BLOCK_K, warps, prefetch] | err |",
             "|---|---|---|---|---|---|---|"]
    for r in result["tune"]:
        best = r["fused"][0] if r["fused"] else None
        fused = f"{best['us']:.2f} {best['config']}" if best else "—"
        lines.append(f"| {r['shape']} | {r['role']} | {r['n']} × {r['k']} | {r['cublas_us']:.2f} | "
                     f"{r['separate_us']:.2f} | {fused} | {r.get('best_rel_err', float('nan')):.1e} |")
    lines += ["", "| shape | GEMV chain tok/s | decode, fused tok/s (/ chain) | decode, separate tok/s (/ chain) |",
              "|---|---|---|---|"]
    for r in result["decode"]:
        cells = []
        for mode in ("fused", "separate"):
            v, ratio = r.get(f"{mode}_tok_s"), r.get(f"{mode}_over_gemv")
            cells.append("—" if v is None else f"{v:.1f}" + (f" ({ratio:.2f})" if ratio else ""))
        chain = r["gemv_chain_tok_s"]
        lines.append(f"| {r['shape']} | {chain:.1f} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--seconds", type=float, default=500.0)
    ap.add_argument("--steps", type=int, default=512, help="decode steps per timing")
    ap.add_argument("--parts", default="tune,decode", help="tune (with the check) and/or decode")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under the Triton interpreter")
    args = ap.parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["LOLACHAT_TRITON"] = "1"
    from gpu_engine_check import _ensure_kernels

    _ensure_kernels()
    from lolachat import bench

    device = "cpu" if args.smoke else "cuda"
    start = time.monotonic()
    deadline = start + args.seconds
    result = {"check": [], "tune": [], "decode": [], "errors": [], "skipped": [],
              "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shapes = {"smollm2-135m": bench.SHAPES["smollm2-135m"], "llama-3.1-8b": bench.SHAPES["llama-3.1-8b"]}
    if args.smoke:
        shapes = {"tiny": bench.SHAPES["tiny"]}
    parts = args.parts.split(",")
    for name, shape in shapes.items():
        if "tune" in parts:
            try:  # the tuning gets up to 55% of the time left, each shape its share
                share = (deadline - time.monotonic()) * (0.55 if name == "smollm2-135m" else 0.7)
                tune(result, name, shape, shape["n_layers"], device, time.monotonic() + share, args.smoke)
            except Exception:
                result["errors"].append(traceback.format_exc())
                print(traceback.format_exc(), flush=True)
        (out / "gemv.json").write_text(json.dumps(result, indent=1))
    if "decode" in parts:
        for name in (["tiny"] if args.smoke else list(shapes)):
            try:
                decode(result, name, device, deadline, args.smoke, 16 if args.smoke else args.steps)
            except Exception:
                result["errors"].append(traceback.format_exc())
                print(traceback.format_exc(), flush=True)
            (out / "gemv.json").write_text(json.dumps(result, indent=1))
    text = table(result)
    (out / "gemv.txt").write_text(text + "\n")
    (out / "gemv.json").write_text(json.dumps(result, indent=1))
    print(f"\n{result['device']}, {time.monotonic() - start:.0f} s; errors: {len(result['errors'])}\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
