#!/usr/bin/env python3
"""The retrieval and perplexity study of docs/quality.md §6 on one GPU, every setting in parallel.

    PYTHONUNBUFFERED=1 python3 scripts/quality_study.py --model /tmp/smol.gguf \
        --heldout /tmp/m/smollm2-corpus.heldout.txt --out "$OUT" --seconds 480

Each setting (exact, LoLA at several λ, selection and state variants) runs in `--workers` processes:
the first computes perplexity by context length on the held-out text, then all of them run their share
of the `niah_single_1` samples (lengths × depths, round-robin until the deadline, so a cut-short run
still covers every cell evenly). SmolLM2 is launch-bound on an H200 (one process keeps a few SMs busy),
so the processes share the GPU well when the CUDA MPS daemon runs; the driver starts one when it can and
says so. Writes study.json (per setting: ppl by context, passkey by length and cell, needle_kept, state
bytes) and study.md (the tables). `--alt-adapter` names a second adapter for the settings marked "alt".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from distill_gpu import bootstrap  # noqa: E402  (imports lolachat from this checkout)

# name -> EngineFactory.build keyword arguments; "adapter": None is the exact teacher. Every LoLA setting names its
# window: without one the adapter's own chunk applies, which for the shipped adapter became 256 in docs/quality.md §12.
SETTINGS = {
    "exact": {"adapter": None},
    "lola λ=0": {"window": 64, "sparse": 0},
    "lola λ=64": {"window": 64, "sparse": 64},
    "lola λ=256": {"window": 64, "sparse": 256},
    "lola λ=1024": {"window": 64, "sparse": 1024},
    # selection variants: group λ=3x has the memory of per-head λ=x; sinks run on the eager path (to 8K)
    "λ=64 group": {"window": 64, "sparse": 64, "selection": "group"},
    "λ=64 sinks=4": {"window": 64, "sparse": 64, "sinks": 4, "max_length": 8192},
    "λ=192 group": {"window": 64, "sparse": 192, "selection": "group"},
    "λ=768 group": {"window": 64, "sparse": 768, "selection": "group"},
    # the linear state fading (--state-halflife)
    "λ=768 group half-life 2K": {"window": 64, "sparse": 768, "selection": "group", "state_halflife": 2048},
    "λ=768 group half-life 8K": {"window": 64, "sparse": 768, "selection": "group", "state_halflife": 8192},
    "λ=256 half-life 2K": {"window": 64, "sparse": 256, "state_halflife": 2048},
    "λ=256 half-life 8K": {"window": 64, "sparse": 256, "state_halflife": 8192},
    # the default's memory rows per KV head (2C + λ = 896), more of them in the exact window (docs/quality.md §9)
    "C=128 λ=640 group half-life 8K": {"window": 128, "sparse": 640, "selection": "group", "state_halflife": 8192},
    "C=256 λ=384 group half-life 8K": {"window": 256, "sparse": 384, "selection": "group", "state_halflife": 8192},
    "C=256 λ=384 group": {"window": 256, "sparse": 384, "selection": "group"},
    "C=384 λ=128 group half-life 8K": {"window": 384, "sparse": 128, "selection": "group", "state_halflife": 8192},
    "λ=0 half-life 2K": {"window": 64, "sparse": 0, "state_halflife": 2048},
    # the C = 64 rows under the runtime's half-life (the manifest's C = 256 would apply otherwise)
    "C=64 λ=0 half-life 8K": {"window": 64, "sparse": 0, "state_halflife": 8192},
    "C=64 λ=64 half-life 8K": {"window": 64, "sparse": 64, "state_halflife": 8192},
    "C=64 λ=256 half-life 8K": {"window": 64, "sparse": 256, "state_halflife": 8192},
    "C=64 λ=1024 half-life 8K": {"window": 64, "sparse": 1024, "state_halflife": 8192},
    # per-head λ under the default's window (docs/quality.md §13)
    "C=256 λ=256 half-life 8K": {"window": 256, "sparse": 256, "state_halflife": 8192},
    "C=256 λ=1024": {"window": 256, "sparse": 1024},
    # eviction toward recent pairs (docs/quality.md §13.4, §14): a score half-life, or recent slots beside the score's
    "C=64 λ=1024 score half-life 32K": {"window": 64, "sparse": 1024, "state_halflife": 8192, "score_halflife": 32768},
    "C=64 λ=1024 recent 512": {"window": 64, "sparse": 1024, "state_halflife": 8192, "recent_slots": 512},
    "C=64 λ=1024 recent 768": {"window": 64, "sparse": 1024, "state_halflife": 8192, "recent_slots": 768},
    "C=64 λ=256 recent 64": {"window": 64, "sparse": 256, "state_halflife": 8192, "recent_slots": 64},
    "C=64 λ=256 recent 128": {"window": 64, "sparse": 256, "state_halflife": 8192, "recent_slots": 128},
    "C=256 λ=384 group recent 128": {"window": 256, "sparse": 384, "selection": "group", "state_halflife": 8192,
                                     "recent_slots": 128},
    "C=256 λ=384 group recent 64": {"window": 256, "sparse": 384, "selection": "group", "state_halflife": 8192,
                                    "recent_slots": 64},
    "C=64 λ=256 others recent 128": {"window": 64, "sparse": 256, "state_halflife": 8192, "score": "others",
                                     "recent_slots": 128},
    "C=256 λ=384 group recent 96": {"window": 256, "sparse": 384, "selection": "group", "state_halflife": 8192,
                                    "recent_slots": 96},
    "C=256 λ=384 group others recent 96": {"window": 256, "sparse": 384, "selection": "group",
                                           "state_halflife": 8192, "score": "others", "recent_slots": 96},
    "C=64 λ=256 others recent 160": {"window": 64, "sparse": 256, "state_halflife": 8192, "score": "others",
                                     "recent_slots": 160},
    "C=64 λ=256 others recent 128 half-life 4K": {"window": 64, "sparse": 256, "state_halflife": 4096,
                                                  "score": "others", "recent_slots": 128},
    "C=256 λ=384 group others recent 128": {"window": 256, "sparse": 384, "selection": "group", "state_halflife": 8192,
                                            "score": "others", "recent_slots": 128},
    "C=256 λ=384 group others recent 160": {"window": 256, "sparse": 384, "selection": "group", "state_halflife": 8192,
                                            "score": "others", "recent_slots": 160},
    "C=64 λ=256 others recent 144": {"window": 64, "sparse": 256, "state_halflife": 8192, "score": "others",
                                     "recent_slots": 144},
    # the others score discounted by age (--score-halflife, docs/quality.md §13.4) at λ = 256
    "C=64 λ=256 others score half-life 8K": {"window": 64, "sparse": 256, "state_halflife": 8192, "score": "others",
                                             "score_halflife": 8192},
    "C=64 λ=256 others score half-life 16K": {"window": 64, "sparse": 256, "state_halflife": 8192, "score": "others",
                                              "score_halflife": 16384},
    "C=64 λ=256 others score half-life 32K": {"window": 64, "sparse": 256, "state_halflife": 8192, "score": "others",
                                              "score_halflife": 32768},
    "C=64 λ=256 others recent 64 score half-life 16K": {"window": 64, "sparse": 256, "state_halflife": 8192,
                                                        "score": "others", "recent_slots": 64,
                                                        "score_halflife": 16384},
    # recent slots everywhere but in the teacher's retrieval heads (share of the needle's value >= 0.3 or 0.1;
    # scripts/retrieval_heads.py), whose λ slots all go by score (docs/quality.md §15)
    "C=64 λ=256 others recent 192 heads≥0.3": {"window": 64, "sparse": 256, "state_halflife": 8192,
                                               "score": "others", "recent_slots": 192, "retrieval_share": 0.3},
    "C=64 λ=256 others recent 224 heads≥0.3": {"window": 64, "sparse": 256, "state_halflife": 8192,
                                               "score": "others", "recent_slots": 224, "retrieval_share": 0.3},
    "C=64 λ=256 others recent 192 heads≥0.1": {"window": 64, "sparse": 256, "state_halflife": 8192,
                                               "score": "others", "recent_slots": 192, "retrieval_share": 0.1},
    "C=64 λ=256 others recent 256 heads≥0.1": {"window": 64, "sparse": 256, "state_halflife": 8192,
                                               "score": "others", "recent_slots": 256, "retrieval_share": 0.1},
    "C=256 λ=384 group others recent 192 heads≥0.3": {"window": 256, "sparse": 384, "selection": "group",
                                                      "state_halflife": 8192, "score": "others",
                                                      "recent_slots": 192, "retrieval_share": 0.3},
    # the "others" score of docs/quality.md §11 (per-head λ = 256 at 2K)
    "C=64 λ=256 others": {"window": 64, "sparse": 256, "state_halflife": 8192, "score": "others"},
    # the same with --alt-adapter
    "alt λ=768 group": {"window": 64, "adapter": "alt", "sparse": 768, "selection": "group"},
    "alt λ=768 group half-life 2K": {"window": 64, "adapter": "alt", "sparse": 768, "selection": "group",
                                      "state_halflife": 2048},
    "alt λ=768 group half-life 8K": {"window": 64, "adapter": "alt", "sparse": 768, "selection": "group",
                                      "state_halflife": 8192},
    "alt λ=256": {"window": 64, "adapter": "alt", "sparse": 256},
    "alt λ=0": {"window": 64, "adapter": "alt", "sparse": 0},
}
LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768]
DEPTHS = [0.1, 0.3, 0.5, 0.7, 0.9]
ADAPTER = ROOT / "models" / "smollm2-135m.lola.safetensors"
RETRIEVAL_HEADS = ROOT / "docs" / "runs" / "retrieval-heads-smollm2-135m.json"  # scripts/retrieval_heads.py


def resolve_retrieval_heads(setting: dict) -> dict:
    """The setting with its "retrieval_share" replaced by the heads it names: the teacher's heads whose attention
    share on the needle's value is at least that share (EngineFactory.build's `retrieval_heads`)."""
    setting = dict(setting)
    if "retrieval_share" in setting:
        min_share = setting.pop("retrieval_share")
        shares = json.loads(RETRIEVAL_HEADS.read_text())["shares"]
        setting["retrieval_heads"] = tuple((layer, head) for layer, row in enumerate(shares)
                                           for head, share in enumerate(row) if share >= min_share)
    return setting


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--heldout", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seconds", type=float, default=480.0, help="wall clock for the whole study")
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names from SETTINGS")
    p.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    p.add_argument("--samples", type=int, default=10,
                   help="per length × depth cell (5 depths: ×5 per length); 0 = perplexity only")
    p.add_argument("--ppl-windows", type=int, default=3)
    p.add_argument("--ppl-contexts", help="context lengths of the perplexity (default: --lengths)")
    p.add_argument("--ppl-aligned", action="store_true",
                   help="every context scores the same tokens (windows end where the longest context's end)")
    p.add_argument("--doc", help="a second text (one long document) whose perplexity is measured too")
    p.add_argument("--workers", type=int, default=1, help="processes per setting (they split the samples)")
    p.add_argument("--alt-adapter", help="the adapter of the settings marked 'alt'")
    p.add_argument("--device", default="cuda")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    p.add_argument("--shard", default="0/1", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    return drive(args)


def drive(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path("/tmp/quality_study") if args.device == "cuda" else out / "workers"
    work.mkdir(parents=True, exist_ok=True)
    for stale in work.glob("w*-*.json"):  # an earlier run's file must not stand in for a worker that failed
        stale.unlink()
    mps = start_mps() if args.device == "cuda" else None
    started = time.time()
    deadline = started + args.seconds - 25  # leave time to merge
    names = [n for n in args.settings.split(",") if n]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        sys.exit(f"unknown settings {unknown}; known: {list(SETTINGS)}")
    procs = []
    for i, name in enumerate(names):
        for shard in range(args.workers):
            tag = f"w{i}-{shard}"
            options = (("model", args.model), ("heldout", args.heldout), ("out", work / f"{tag}.json"),
                       ("lengths", args.lengths), ("samples", args.samples), ("ppl-windows", args.ppl_windows),
                       ("ppl-contexts", args.ppl_contexts), ("doc", args.doc),
                       ("device", args.device), ("alt-adapter", args.alt_adapter), ("shard", f"{shard}/{args.workers}"))
            cmd = [sys.executable, __file__, "--worker", name, "--deadline", str(deadline)]
            cmd += [f"--{k}={v}" for k, v in options if v is not None] + ["--ppl-aligned"] * args.ppl_aligned
            with open(work / f"{tag}.log", "w") as log:
                procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, deadline + 20 - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
    if mps:
        stop_mps(mps)
    study = {"mps": bool(mps), "seconds": round(time.time() - started, 1), "workers_per_setting": args.workers,
             "settings": {}}
    for i, name in enumerate(names):
        study["settings"][name] = merge_shards(work, f"w{i}", args.workers)
    (out / "study.json").write_text(json.dumps(study, indent=1))
    text = tables(study)
    (out / "study.md").write_text(text + "\n")
    print(text)
    return 0


def merge_shards(work: Path, prefix: str, workers: int) -> dict:
    """One setting's result from its workers' files: ppl from the first, passkey samples from all."""
    bootstrap()
    from lolachat.evals.passkey import summarize

    parts, errors = [], []
    for shard in range(workers):
        try:
            parts.append(json.loads((work / f"{prefix}-{shard}.json").read_text()))
        except (OSError, ValueError):
            errors.append(f"shard {shard}: no result; log: " + (work / f"{prefix}-{shard}.log").read_text()[-800:])
    if not parts:
        return {"error": "no result", "errors": errors}
    merged = {k: v for k, v in parts[0].items() if k not in ("passkey", "samples")}
    merged["errors"] = [e for p in parts for e in p.get("errors", [])] + errors
    samples = [s for p in parts for s in p.get("samples", [])]
    if samples:
        grid = parts[0]["grid"]
        pk = summarize(samples, "niah_single_1", grid["lengths"], grid["depths"],
                       truncated=any(p.get("passkey", {}).get("truncated") for p in parts))
        merged["passkey"] = {k: pk[k] for k in ("score", "by_length", "cells", "truncated")}
        merged["passkey"]["memory_after_prefill"] = parts[0].get("passkey", {}).get("memory_after_prefill")
        merged["passkey"]["answers"] = [{k: s.get(k) for k in ("length", "depth", "index", "score", "prediction")}
                                        for s in samples[:: max(1, len(samples) // 40)]]
    merged["peak_gpu_mib"] = max((p.get("peak_gpu_mib") or 0) for p in parts)
    return merged


def start_mps():
    """The CUDA MPS daemon (lets the workers' kernels share the SMs); None when it cannot start."""
    pipe = "/tmp/mps-pipe"
    env = dict(os.environ, CUDA_MPS_PIPE_DIRECTORY=pipe, CUDA_MPS_LOG_DIRECTORY="/tmp/mps-log")
    os.makedirs(pipe, exist_ok=True)
    os.makedirs("/tmp/mps-log", exist_ok=True)
    try:
        subprocess.run(["nvidia-cuda-mps-control", "-d"], env=env, check=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as err:
        print(f"MPS not started ({err}); the workers time-share the GPU", flush=True)
        return None
    os.environ.update(CUDA_MPS_PIPE_DIRECTORY=pipe, CUDA_MPS_LOG_DIRECTORY="/tmp/mps-log")
    print("MPS daemon started", flush=True)
    return env


def stop_mps(env) -> None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(["nvidia-cuda-mps-control"], input=b"quit\n", env=env, timeout=20)


def worker(args) -> int:
    bootstrap()
    import torch

    from lolachat.evals.engines import EngineFactory
    from lolachat.evals.passkey import run_passkey
    from lolachat.evals.ppl import perplexity
    from lolachat.lola import head_names

    name = args.worker
    shard = tuple(int(x) for x in args.shard.split("/"))
    result: dict = {"setting": name, "ppl": {}, "ppl_doc": {}, "errors": []}
    out = Path(args.out)

    def save():
        out.write_text(json.dumps(result, indent=1, default=str))

    try:
        kwargs = resolve_retrieval_heads(SETTINGS[name])
        adapter = kwargs.pop("adapter", str(ADAPTER))
        if adapter == "alt":
            if not args.alt_adapter:
                raise ValueError(f"setting {name!r} needs --alt-adapter")
            adapter = args.alt_adapter
        max_length = kwargs.pop("max_length", None)
        factory = EngineFactory(args.model, device=args.device)
        engine = factory.build(adapter, **kwargs)
        result["engine"] = engine.describe() | {"retrieval_heads": head_names(kwargs.get("retrieval_heads", ()))}
        result["adapter"] = None if adapter is None else str(adapter)
        lengths = [n for n in map(int, args.lengths.split(",")) if max_length is None or n <= max_length]
        every_context = [int(n) for n in (args.ppl_contexts or args.lengths).split(",")]
        contexts = [n for n in every_context if max_length is None or n <= max_length]
        result["grid"] = {"lengths": lengths, "depths": DEPTHS, "ppl_aligned": args.ppl_aligned}
        save()
        texts = [("ppl", args.heldout)] + ([("ppl_doc", args.doc)] if args.doc else [])
        for key, path in texts if shard[0] == 0 else []:
            ids = factory.tokenizer.encode(Path(path).read_text(), add_special_tokens=False)
            for context in contexts:
                if time.time() > args.deadline:
                    break
                try:
                    r = perplexity(engine, ids, context, tail=512, samples=args.ppl_windows,
                                   align_to=max(every_context) if args.ppl_aligned else None)
                    result[key][str(context)] = {"ppl": r["ppl"], "windows": r["windows"],
                                                 "per_window_ppl": r["per_window_ppl"]}
                except Exception as err:  # e.g. out of memory for the teacher at long contexts
                    result["errors"].append(f"{key} {context}: {type(err).__name__}: {err}")
                save()
        if args.samples:
            left = args.deadline - time.time()
            pk = run_passkey(engine, lengths=lengths, depths=DEPTHS, samples=args.samples, max_new_tokens=16,
                             deadline=time.monotonic() + left, min_rounds=1, shard=shard)
            result["passkey"] = {k: pk[k] for k in ("truncated", "memory_after_prefill")}
            result["samples"] = [{k: v for k, v in s.items() if k != "memory"} for s in pk["samples"]]
    except Exception as err:
        result["errors"].append(f"{type(err).__name__}: {err}")
        result["traceback"] = traceback.format_exc()
    if torch.cuda.is_available():
        result["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    save()
    return 0


def tables(study: dict) -> str:
    settings = study["settings"]
    lengths = sorted({int(k) for s in settings.values() for k in s.get("passkey", {}).get("by_length", {})}
                     | {int(k) for s in settings.values() for k in s.get("ppl", {})})
    head = "| setting | " + " | ".join(_short(n) for n in lengths) + " |"
    rule = "|---|" + "---|" * len(lengths)
    lines = [f"study: {study['seconds']} s, MPS {'on' if study['mps'] else 'off'}", "",
             "passkey (niah_single_1) score %, samples per length in brackets", head, rule]
    for name, s in settings.items():
        by = s.get("passkey", {}).get("by_length", {})
        cells = [f"{by[str(n)]['score']} ({by[str(n)]['n']})" if str(n) in by and by[str(n)]["n"] else "—"
                 for n in lengths]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "needle_kept (share of the needle's tokens in the sparse cache after prefill)", head, rule]
    for name, s in settings.items():
        by = s.get("passkey", {}).get("by_length", {})
        cells = [_num(by.get(str(n), {}).get("needle_kept")) for n in lengths]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for key, text in (("ppl", "the held-out text"), ("ppl_doc", "the long document (--doc)")):
        if not any(s.get(key) for s in settings.values()):
            continue
        lines += ["", f"perplexity of the last 512 tokens of each window of {text}, by context length", head, rule]
        for name, s in settings.items():
            ppl = s.get(key, {})
            lines.append(f"| {name} | " + " | ".join(_num(ppl.get(str(n), {}).get("ppl")) for n in lengths) + " |")
    for name, s in settings.items():
        for err in s.get("errors", []) + ([s["error"]] if "error" in s else []):
            lines.append(f"error in {name}: {err}")
    return "\n".join(lines)


def _short(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _num(x) -> str:
    return "—" if x is None else (f"{x:.3g}" if isinstance(x, float) else str(x))


if __name__ == "__main__":
    sys.exit(main())
