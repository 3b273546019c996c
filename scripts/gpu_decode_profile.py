#!/usr/bin/env python3
"""Where a graph-replayed decode step of the GPU engine spends its time (CUDA GPU).

    PYTHONUNBUFFERED=1 python3 scripts/gpu_decode_profile.py [--shape smollm2-135m] [--out DIR]

Random weights of a model shape (speed does not depend on their values), LoLA C=64, λ=256 as
`lolachat bench`, a 2K-token prompt, then:
- decode tok/s with steps back to back (no host reads), the attention kernel in its default form and
  with `vec=False` (tensor-core tiles), interleaved in one process, and `generate` (one host read per token);
- torch.profiler over 128 steps: kernels per step, the sum of their durations, the GPU span (first
  start to last end) per step, i.e. the gaps between kernels, and the kernels by total time.
Writes decode_profile.json and prints a short table last.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_engine_check import _ensure_kernels  # noqa: E402

_ensure_kernels()


def random_engine(shape: str, device: torch.device):
    """A bf16 engine on random weights of `shape`, LoLA C=64, λ=256 as `lolachat bench`; its static decoder
    with CUDA graphs on."""
    from lolachat import bench
    from lolachat.engine import Engine, EngineInfo, memory_info

    model = bench.random_model(shape, device, torch.bfloat16)
    cfg = bench.attach_identity(model, chunk=64, sparse=256)
    info = EngineInfo(model=shape, source="random", weights_sha256="", mode="lola", device=str(device),
                      dtype="bfloat16", **memory_info(cfg))
    engine = Engine(model, None, info, stop_ids=[])
    decoder = engine.static_decoder()
    decoder.graphs = True
    return engine, decoder


def build(shape: str, device: torch.device, patch_vec: bool | None):
    """An engine + memory after a 2K prompt, its decode graph captured with the attention in the given form."""
    from lolachat.kernels import triton_attention

    from lolachat import bench

    original = triton_attention.lola_attention
    if patch_vec is not None:
        triton_attention.lola_attention = functools.partial(original, vec=patch_vec)
    try:
        engine, decoder = random_engine(shape, device)
        mem = engine.new_memory()
        logits = engine.prefill(mem, bench.random_ids(2048, engine.model.args.vocab_size))
        decoder.run_steps(mem, logits, 8)  # captures the decode (and eviction) graphs under the patch
        return engine, decoder, mem, logits
    finally:
        triton_attention.lola_attention = original


def rate(fn, steps: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn(steps)
    torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


def kernel_times(prof) -> tuple[int, float, float, list[tuple[str, list[float]]]]:
    """The CUDA kernels of a torch.profiler run: how many, their summed durations (busy, µs), the GPU span from
    the first start to the last end (µs), and each name's durations, largest total first."""
    from torch.autograd import DeviceType

    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    by_name: dict[str, list[float]] = defaultdict(list)
    for e in kernels:
        by_name[e.name].append(e.time_range.elapsed_us())
    busy = sum(e.time_range.elapsed_us() for e in kernels)
    span = (max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)) if kernels else 0
    return len(kernels), busy, span, sorted(by_name.items(), key=lambda kv: -sum(kv[1]))


def profile_steps(decoder, mem, logits, steps: int) -> dict:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    decoder.run_steps(mem, logits, 8)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        decoder.run_steps(mem, logits, steps)
        torch.cuda.synchronize()
    host = [e for e in prof.events() if e.device_type == DeviceType.CPU and e.name == "cudaGraphLaunch"]
    count, busy, span, by_name = kernel_times(prof)
    top = by_name[:20]
    return {
        "steps": steps, "kernels_per_step": count / steps, "busy_us_per_step": busy / steps,
        "span_us_per_step": span / steps, "gap_us_per_step": (span - busy) / steps,
        "graph_launch_host_us": (sum(e.time_range.elapsed_us() for e in host) / len(host)) if host else None,
        "top": [{"name": name[:90], "calls_per_step": len(d) / steps, "us_per_step": sum(d) / steps,
                 "us_per_call": sum(d) / len(d)} for name, d in top],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="smollm2-135m")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--steps", type=int, default=512)
    args = ap.parse_args()
    os.environ["LOLACHAT_STATIC"] = "1"
    device = torch.device("cuda")
    runs = {"default": build(args.shape, device, None), "tiles": build(args.shape, device, False)}
    result: dict = {"shape": args.shape, "device": torch.cuda.get_device_name(), "steps_tok_s": defaultdict(list)}
    for _ in range(3):
        for name, (_, decoder, mem, logits) in runs.items():
            result["steps_tok_s"][name].append(rate(functools.partial(decoder.run_steps, mem, logits), args.steps))
    engine, decoder, mem, logits = runs["default"]
    from lolachat.sampling import SamplingOptions

    def generate(n):
        for _ in decoder.generate(mem, logits, n, SamplingOptions(temperature=0.0)):
            pass

    result["generate_tok_s"] = [rate(generate, args.steps) for _ in range(2)]
    result["profile"] = profile_steps(decoder, mem, logits, 128)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_profile.json").write_text(json.dumps(result, indent=1))
    p = result["profile"]
    print(f"\n{result['device']} {args.shape}")
    for name, rates in result["steps_tok_s"].items():
        print(f"steps back to back, attention {name}: {', '.join(f'{r:.0f}' for r in rates)} tok/s")
    print(f"generate (host read per token): {', '.join(f'{r:.0f}' for r in result['generate_tok_s'])} tok/s")
    print(f"per step: {p['kernels_per_step']:.1f} kernels, busy {p['busy_us_per_step']:.1f} µs, span "
          f"{p['span_us_per_step']:.1f} µs, gaps {p['gap_us_per_step']:.1f} µs; cudaGraphLaunch host "
          f"{p['graph_launch_host_us']} µs")
    print("| kernel | calls/step | µs/step | µs/call |\n|---|---|---|---|")
    for row in p["top"]:
        print(f"| {row['name']} | {row['calls_per_step']:.2f} | {row['us_per_step']:.1f} | {row['us_per_call']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
