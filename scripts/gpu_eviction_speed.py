#!/usr/bin/env python3
"""Does the eviction policy cost decode or prefill speed? (CUDA GPU; docs/quality.md §15)

    PYTHONUNBUFFERED=1 python3 scripts/gpu_eviction_speed.py --model /tmp/smol.gguf [--out DIR]

The real model and shipped adapter in bf16 with CUDA graphs, the default memory (C = 256, λ = 384, group
selection, state half-life 8K), under several eviction policies built side by side in one process:
- decode: steps back to back after a 4K-token prompt, 1,024 steps per measurement (4 evictions), the policies
  interleaved over 3 rounds;
- prefill: a 16K-token prompt, twice per policy.
With the self-recall error every layer evicts in one launch; the other scores evict layer by layer. Prints
tok/s and the ratio to the first policy; writes eviction_speed.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from distill_gpu import bootstrap  # noqa: E402  (imports lolachat from this checkout)

MEMORY = {"window": 256, "sparse": 384, "selection": "group", "state_halflife": 8192}
POLICIES = {  # "pytorch_score": the others score by reference.eviction_scores' PyTorch ops, as before §15
    "error": {},
    "others, recent 128, score in PyTorch ops": {"score": "others", "recent_slots": 128, "pytorch_score": True},
    "others, recent 128 (the default)": {"score": "others", "recent_slots": 128},
    "others, recent 192, retrieval heads": {"score": "others", "recent_slots": 192, "retrieval_share": 0.3},
}


@contextlib.contextmanager
def score_in_pytorch(active: bool):
    """While active, triton_eviction.others_scores computes with the reference's PyTorch ops."""
    from lolachat.kernels import reference as ref
    from lolachat.kernels import triton_eviction

    triton_score = triton_eviction.others_scores

    def pytorch_score(phi_k, values, h_state, s_state, fade=1.0, out=None):
        return ref.eviction_scores(phi_k, values, h_state * fade, s_state * fade, "others")

    triton_eviction.others_scores = pytorch_score if active else triton_score
    try:
        yield
    finally:
        triton_eviction.others_scores = triton_score


def timed(fn, *args) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    fn(*args)
    sync()
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="the default model's GGUF")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--steps", type=int, default=1024)
    ap.add_argument("--prompt-tokens", type=int, default=4096, help="before the decode steps")
    ap.add_argument("--prefill-tokens", type=int, default=16384)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the script (no CUDA graphs)")
    args = ap.parse_args()
    bootstrap()
    os.environ["LOLACHAT_STATIC"] = "1"
    from quality_study import ADAPTER, resolve_retrieval_heads

    from lolachat import bench
    from lolachat.evals.engines import EngineFactory

    factory = EngineFactory(args.model, device=args.device, dtype="bfloat16" if args.device == "cuda" else "float32")
    vocab = factory.loaded.args.vocab_size
    prompt, long_prompt = bench.random_ids(args.prompt_tokens, vocab), bench.random_ids(args.prefill_tokens, vocab)
    runs = {}
    for name, policy in POLICIES.items():
        policy = resolve_retrieval_heads(policy)
        pytorch = policy.pop("pytorch_score", False)
        with score_in_pytorch(pytorch):
            engine = factory.build(str(ADAPTER), **MEMORY, **policy)
            decoder = engine.static_decoder()
            mem = engine.new_memory()
            logits = engine.prefill(mem, prompt)
            decoder.run_steps(mem, logits, 8)  # captures the decode and eviction graphs
        runs[name] = (pytorch, engine, decoder, mem, logits)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    result: dict = {"device": device_name, "memory": MEMORY, "policies": POLICIES,
                    "decode_tok_s": {n: [] for n in runs}, "prefill_tok_s": {n: [] for n in runs}}
    for _ in range(3):
        for name, (pytorch, _, decoder, mem, logits) in runs.items():
            with score_in_pytorch(pytorch):
                seconds = timed(decoder.run_steps, mem, logits, args.steps)
            result["decode_tok_s"][name].append(round(args.steps / seconds, 1))
    for _ in range(2):
        for name, (pytorch, engine, *_rest) in runs.items():
            with score_in_pytorch(pytorch):
                seconds = timed(engine.prefill, engine.new_memory(), long_prompt)
            result["prefill_tok_s"][name].append(round(len(long_prompt) / seconds, 1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eviction_speed.json").write_text(json.dumps(result, indent=1))
    base = next(iter(runs))
    print(f"\n{result['device']}: SmolLM2-135M, C=256 λ=384 group, {factory.dtype}")
    print(f"| policy | decode tok/s (3 rounds) | ratio | prefill {args.prefill_tokens} tok/s (2) | ratio |")
    print("|---|---|---|---|---|")
    for name in runs:
        dec, pre = result["decode_tok_s"][name], result["prefill_tok_s"][name]
        print(f"| {name} | {', '.join(map(str, dec))} | {max(dec) / max(result['decode_tok_s'][base]):.3f} | "
              f"{', '.join(map(str, pre))} | {max(pre) / max(result['prefill_tok_s'][base]):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
