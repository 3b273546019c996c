#!/usr/bin/env python3
"""Where a graph-replayed prefill block of the GPU engine spends its time (CUDA GPU).

    PYTHONUNBUFFERED=1 python3 scripts/gpu_prefill_profile.py [--shape llama-3.1-8b] [--tokens 16384] [--out DIR]

Random weights of a model shape (speed does not depend on their values), LoLA C=64, λ=256 as `lolachat bench`,
a 2K-token prompt to reach the steady state. Then prefill tok/s of `--tokens` more tokens (whole blocks: block
graphs only), and torch.profiler over 4 blocks: kernels per block, the sum of their durations (busy), the GPU
span, and the kernels by total time. Writes prefill_profile.json and prints a short table last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_engine_check import _ensure_kernels  # noqa: E402

_ensure_kernels()
from gpu_decode_profile import kernel_times, random_engine  # noqa: E402


def profile_blocks(fn, blocks: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    count, busy, span, by_name = kernel_times(prof)
    top = by_name[:16]
    return {"blocks": blocks, "kernels_per_block": count / blocks, "busy_us_per_block": busy / blocks,
            "span_us_per_block": span / blocks,
            "top": [{"name": name[:80], "calls_per_block": len(d) / blocks, "us_per_block": sum(d) / blocks,
                     "us_per_call": sum(d) / len(d)} for name, d in top]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-3.1-8b")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    os.environ["LOLACHAT_STATIC"] = "1"
    from lolachat import bench

    device = torch.device("cuda")
    engine, decoder = random_engine(args.shape, device)
    vocab = engine.model.args.vocab_size
    mem = engine.new_memory()
    engine.prefill(mem, bench.random_ids(2048, vocab))
    ids = bench.random_ids(args.tokens, vocab)
    result: dict = {"shape": args.shape, "device": torch.cuda.get_device_name(), "tokens": args.tokens,
                    "block_len": decoder.block_len, "prefill_tok_s": []}
    for _ in range(args.rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.prefill(mem, ids)
        torch.cuda.synchronize()
        result["prefill_tok_s"].append(args.tokens / (time.perf_counter() - start))
    p = result["profile"] = profile_blocks(lambda: engine.prefill(mem, ids[: 4 * decoder.block_len]), 4)
    assert not [k for k in mem.graphs if str(k).startswith("error:")], mem.graphs
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prefill_profile.json").write_text(json.dumps(result, indent=1))
    print(f"\n{result['device']} {args.shape}, C=64, λ=256, blocks of {decoder.block_len} tokens")
    print(f"prefill {', '.join(f'{r:.0f}' for r in result['prefill_tok_s'])} tok/s; per block "
          f"{p['kernels_per_block']:.0f} kernels, busy {p['busy_us_per_block']:.0f} µs, "
          f"span {p['span_us_per_block']:.0f} µs")
    print("| kernel | calls/block | µs/block | µs/call |\n|---|---|---|---|")
    for row in p["top"]:
        print(f"| {row['name']} | {row['calls_per_block']:.1f} | {row['us_per_block']:.0f} | "
              f"{row['us_per_call']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
