#!/usr/bin/env python3
"""The GPU engine on one device session: tokens against the CPU engine, then the benches (issue 3).

    PYTHONUNBUFFERED=1 python3 scripts/gpu_engine_check.py --gguf /tmp/smol.gguf --out $OUT

Parts, each in its own subprocess with its own time cap (a crash or a hung GPU in one part does not
stop the others), results as JSON under --out:
  tokens      (a) SmolLM2 (the shipped adapter, C=64, λ=256) on a ~2K-token prompt + 64 greedy tokens:
                  CPU engine fp32 vs the GPU engine (fp32 graphs, bf16 graphs, bf16 eager), and exact
                  mode CPU vs GPU; first divergence and the CPU's top-2 logit margin there.
  bench-smol  (b) `lolachat bench` on the SmolLM2 GGUF: LoLA vs exact vs transformers, 1K..128K.
  bench-8b    (b) the same on a random-weight Llama-3.1-8B shape.
  profile     the norm kernels against the reference at the 8B width, then torch.profiler's GPU time by
              kernel for eager decode steps and one eager prefill block of the 8B shape (where time goes).
Last it prints (c) a short table, and writes summary.json, summary.md and the benches' PNGs.
`--device cpu --quick` runs every code path except CUDA graphs on the CPU with short lengths.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _ensure_kernels() -> None:
    """`lolachat.kernels` is the repo's kernels/ folder (pyproject maps it); without an install, map it here."""
    import importlib.util

    import lolachat

    try:
        import lolachat.kernels  # noqa: F401
        return
    except ImportError:
        pass
    spec = importlib.util.spec_from_file_location("lolachat.kernels", ROOT / "kernels" / "__init__.py",
                                                  submodule_search_locations=[str(ROOT / "kernels")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["lolachat.kernels"] = module
    spec.loader.exec_module(module)
    lolachat.kernels = module


_ensure_kernels()

PLAN = {"tokens": 130, "bench-smol": 100, "bench-8b": 160, "profile": 60}  # seconds per part (< 8 minutes)
QUICK_PLAN = {"tokens": 600, "bench-smol": 600, "bench-8b": 400, "profile": 300}
SHIPPED_ADAPTER = ROOT / "models" / "smollm2-135m.lola.safetensors"
TEXT = ("The history of the lighthouse keepers of the northern coast is a long one. Each keeper wrote "
        "in a log the weather, the ships that passed and the state of the lamp. ")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default="/tmp/smol.gguf", help="SmolLM2 GGUF file")
    ap.add_argument("--random-smol", action="store_true",
                    help="bench-smol on random weights of SmolLM2's shape (no GGUF; speed does not depend on them)")
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_engine_check_out"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="short prompt and lengths (CPU smoke run)")
    ap.add_argument("--part", choices=list(PLAN), help="run one part in this process (used internally)")
    ap.add_argument("--time-limit", type=float, default=400.0, help="seconds for the whole run")
    ap.add_argument("--part-seconds", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.part:
        return run_part(args, out)
    return run_all(args, out)


# ---------------------------------------------------------------------------------------------- driver


def run_all(args, out: Path) -> int:
    start = time.monotonic()
    plan = QUICK_PLAN if args.quick else PLAN
    summary: dict = {"args": vars(args), "parts": {}}
    for part, seconds in plan.items():
        left = args.time_limit - (time.monotonic() - start) - 5
        cap = min(seconds, left)
        if cap < 20:
            summary["parts"][part] = {"status": "skipped: out of time"}
            print(f"== {part}: skipped (out of time)", flush=True)
            continue
        print(f"== {part} (cap {cap:.0f} s)", flush=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--part", part, "--gguf", args.gguf, "--out", str(out),
               "--device", args.device, "--part-seconds", str(cap)] + (["--quick"] if args.quick else [])
        cmd += ["--random-smol"] if args.random_smol else []
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, timeout=cap, cwd=ROOT)
            status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
        except subprocess.TimeoutExpired:
            status = f"killed after {cap:.0f} s"
        except Exception as err:  # keep going whatever happens
            status = f"could not run: {err}"
        summary["parts"][part] = {"status": status, "seconds": round(time.monotonic() - t0, 1)}
        print(f"== {part}: {status} in {time.monotonic() - t0:.0f} s", flush=True)
    try:
        report(out, summary)
    except Exception:
        traceback.print_exc()
    return 0


def report(out: Path, summary: dict) -> None:
    """(c) the short table, last."""
    from lolachat.bench import table

    lines = ["# GPU engine check", ""]
    tokens = _read(out / "tokens.json")
    if tokens:
        summary["tokens"] = tokens
        lines.append("## (a) greedy tokens, GPU engine vs CPU engine (SmolLM2, shipped adapter)")
        lines.append(f"prompt {tokens.get('prompt_tokens')} tokens + {tokens.get('new_tokens')} new")
        lines.append("| run | vs | equal | first diff | CPU margin there | last-prefill logits max abs diff |")
        lines.append("|---|---|---|---|---|---|")
        for row in tokens.get("comparisons", []):
            lines.append(f"| {row['run']} | {row['reference']} | {row.get('equal')} | {row.get('first_diff')} | "
                         f"{_num(row.get('cpu_margin_at_diff'))} | {_num(row.get('prefill_logits_max_abs_diff'))} |")
        for err in tokens.get("errors", []):
            lines.append(f"error: {err}")
        lines.append("")
    profile = _read(out / "profile.json")
    if profile:
        summary["profile"] = profile
        lines.append("## profile (8B shape, eager, GPU time per kernel kind)")
        for name, rows in profile.get("tables", {}).items():
            lines.append(f"{name}: {profile.get('launches', {}).get(name)} launches")
            lines += [f"  {r['us']:10.1f} us  {r['calls']:6d} x  {r['name'][:70]}" for r in rows[:10]]
        for name, err in profile.get("norm_errors", {}).items():
            lines.append(f"norm kernel {name}: rel err {err:.2e}")
        lines.append("")
    for part in ("bench-smol", "bench-8b"):
        result = _read(out / f"{part}.json")
        if result and "results" in result:
            summary[part] = {"json": str(out / f"{part}.json"), "png": str(out / f"{part}.png")}
            lines += [table(result), ""]
        elif result:
            lines += [f"{part}: {result.get('error')}", ""]
    lines.append("parts: " + ", ".join(f"{k} {v['status']}" for k, v in summary["parts"].items()))
    text = "\n".join(lines)
    (out / "summary.md").write_text(text + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print("\n" + text, flush=True)


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _num(x) -> str:
    return "—" if x is None else (f"{x:.3g}" if isinstance(x, float) else str(x))


# ---------------------------------------------------------------------------------------------- parts


def run_part(args, out: Path) -> int:
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    deadline = time.monotonic() + (args.part_seconds or 300) - 10
    try:
        if args.part == "tokens":
            part_tokens(args, out, deadline)
        elif args.part == "profile":
            part_profile(args, out)
        else:
            part_bench(args, out, deadline)
    except Exception as err:
        traceback.print_exc()
        (out / f"{args.part}.error.txt").write_text(traceback.format_exc())
        if args.part != "tokens":
            (out / f"{args.part}.json").write_text(json.dumps({"error": f"{type(err).__name__}: {err}"}))
        return 1
    return 0


def part_bench(args, out: Path, deadline: float) -> None:
    from lolachat.bench import BenchConfig, run_bench, save, table

    quick = args.quick
    if args.part == "bench-smol" and args.random_smol:
        cfg = BenchConfig(shape="smollm2-135m", label="SmolLM2-135M shape")
        lengths = [128, 320] if quick else [1024, 8192, 32768, 131072]
    elif args.part == "bench-smol":
        cfg = BenchConfig(model=args.gguf, label="SmolLM2-135M")
        lengths = [128, 320] if quick else [1024, 8192, 32768, 131072]
    else:
        label = "tiny shape (quick)" if quick else "Llama-3.1-8B shape"
        cfg = BenchConfig(shape="tiny" if quick else "llama-3.1-8b", label=label)
        lengths = [128, 320] if quick else [1024, 8192, 32768, 131072]
        cfg.decode_tokens = 32
    cfg.device = args.device
    if args.device == "cpu":
        cfg.dtype = "float32"
    cfg.lengths = lengths
    cfg.engines = ["lola", "exact", "transformers"]
    cfg.quick = quick
    cfg.deadline = deadline - 5
    result = run_bench(cfg, log=lambda line: print(line, flush=True))
    save(result, out, stem=args.part)
    print(table(result), flush=True)


def part_profile(args, out: Path) -> None:
    import torch
    from lolachat.kernels import ops
    from lolachat.kernels import reference as ref
    from torch.profiler import ProfilerActivity, profile

    from lolachat.bench import attach_identity, random_model
    from lolachat.engine import Engine, EngineInfo, memory_info

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result: dict = {"norm_errors": {}, "tables": {}, "launches": {}}
    os.environ["LOLACHAT_TRITON"] = "1"
    gen = torch.Generator(device=device).manual_seed(0)

    def err(got, want):
        return float((got.double() - want.double()).norm() / want.double().norm())

    for rows in (1, 1024):
        x = torch.randn(1, rows, 4096, device=device, generator=gen).to(dtype)
        d = torch.randn(1, rows, 4096, device=device, generator=gen).to(dtype)
        w = torch.randn(4096, device=device, generator=gen).to(dtype)
        gu = torch.randn(1, rows, 2 * 14336, device=device, generator=gen).to(dtype)
        result["norm_errors"][f"rms_norm[{rows}]"] = err(ops.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5))
        x2 = x.clone()
        got = ops.add_rms_norm(x2, d, w, 1e-5)
        result["norm_errors"][f"add_rms_norm[{rows}]"] = err(got, ref.add_rms_norm(x.clone(), d, w, 1e-5))
        result["norm_errors"][f"silu_mul[{rows}]"] = err(ops.silu_mul(gu), ref.silu_mul(gu))
    os.environ.pop("LOLACHAT_TRITON")
    (out / "profile.json").write_text(json.dumps(result, indent=1))

    quick = args.quick
    model = random_model("tiny" if quick else "llama-3.1-8b", device, dtype)
    cfg = attach_identity(model, chunk=64, sparse=256)
    info = EngineInfo(model="8b-shape", source="random", weights_sha256="", mode="lola", device=str(device),
                      dtype=str(dtype), **memory_info(cfg))
    os.environ["LOLACHAT_STATIC"] = "1"  # the CPU smoke run profiles the same decoder
    engine = Engine(model, None, info, stop_ids=[])
    decoder = engine.static_decoder()
    mem = engine.new_memory()
    ids = torch.randint(0, model.args.vocab_size, (2048 + 1024,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.inference_mode():
        logits = engine.prefill(mem, ids[:2048])  # steady state: sparse cache full
        decoder.graphs = False
        decoder.block_body_eager = True
        from lolachat.sampling import SamplingOptions

        key = decoder._start(mem, logits, SamplingOptions(temperature=0.0))
        steps = {"decode x8 (eager)": lambda: [decoder._step(mem, key) for _ in range(8)],
                 "prefill block of 1024 (eager)": lambda: decoder.prefill(mem, ids[2048:])}
        for name, fn in steps.items():
            fn()  # warm
            if device.type == "cuda":
                torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU]) as prof:
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
            rows = []
            for evt in prof.key_averages():
                us = evt.device_time_total if device.type == "cuda" else evt.cpu_time_total
                if us > 0:
                    rows.append({"name": evt.key, "calls": evt.count, "us": us})
            rows.sort(key=lambda r: -r["us"])
            result["tables"][name] = rows[:25]
            result["launches"][name] = sum(r["calls"] for r in rows)
            (out / "profile.json").write_text(json.dumps(result, indent=1))
    (out / "profile.json").write_text(json.dumps(result, indent=1))


def part_tokens(args, out: Path, deadline: float) -> None:
    import torch

    from lolachat.adapter import load_adapter
    from lolachat.engine import Engine, EngineInfo, memory_info
    from lolachat.lola import LolaConfig
    from lolachat.model import Llama
    from lolachat.tokenizer import load_tokenizer
    from lolachat.weights import load_weights

    torch.set_flush_denormal(True)
    result: dict = {"comparisons": [], "errors": [], "runs": {}}

    def save_result():
        (out / "tokens.json").write_text(json.dumps(result, indent=1, default=str))

    loaded = load_weights(args.gguf)
    tokenizer = load_tokenizer(args.gguf)
    a = loaded.args
    target = 300 if args.quick else 2048
    new_tokens = 16 if args.quick else 64
    text = TEXT * (target // 20 + 10)
    ids = tokenizer.encode(text, add_special_tokens=False)[:target]
    result.update(prompt_tokens=len(ids), new_tokens=new_tokens, model=args.gguf)
    adapter = load_adapter(SHIPPED_ADAPTER, a)  # the default model as users run it: trained maps and LoRA
    tensors = dict(loaded.tensors)
    if adapter.lora:
        adapter.merge_lora_into(tensors)
    lola = LolaConfig(chunk=64, sparse=256, mix="lola", max_distance=max(1, a.max_position // 2),
                      phi_input=adapter.phi_input)

    def build(device: str, dtype, with_lola: bool) -> Engine:
        model = Llama(a)
        model.load_weights(tensors if with_lola else loaded.tensors)
        model = model.to(device=device, dtype=dtype).eval()
        if with_lola:
            model.attach_lola(lola, adapter.layers)
        info = EngineInfo(model="smollm2", source="check", weights_sha256="", mode="lola" if with_lola else "exact",
                          device=device, dtype=str(dtype), **memory_info(lola if with_lola else None))
        return Engine(model, tokenizer, info, stop_ids=[])

    def greedy_cpu(engine: Engine) -> dict:
        """Tokens, the top-2 margin at each step and the logits after the prompt (CPU reference)."""
        with torch.inference_mode():
            memory = engine.model.new_memory(batch=1)  # the CPU engine's own memory (LolaLayerMemory)
            t0 = time.perf_counter()
            logits = engine.prefill(memory, ids)
            first = logits.float().cpu().clone()
            tokens, margins = [], []
            for _ in range(new_tokens):
                top = torch.topk(logits.float(), 2).values
                margins.append(float(top[0] - top[1]))
                token = int(logits.argmax())
                tokens.append(token)
                logits = engine.model(torch.tensor([[token]], device=engine.device), memory)[0, -1]
        return {"tokens": tokens, "margins": margins, "logits": first, "seconds": time.perf_counter() - t0}

    def run_engine(engine: Engine) -> dict:
        from lolachat.sampling import SamplingOptions

        with torch.inference_mode():
            memory = engine.new_memory()
            if engine.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            logits = engine.prefill(memory, ids)
            first = logits.float().cpu().clone()
            tokens = list(engine.generate(memory, logits, new_tokens, SamplingOptions(temperature=0.0)))
            if engine.device.type == "cuda":
                torch.cuda.synchronize()
        out = {"tokens": tokens, "logits": first, "seconds": time.perf_counter() - t0,
               "static": hasattr(memory, "decoder")}
        if hasattr(memory, "graphs"):
            out["graphs"] = {str(k): str(v) if str(k).startswith("error:") else "captured"
                             for k, v in memory.graphs.items()}
        return out

    def compare(name: str, run: dict, ref_name: str, ref: dict) -> None:
        diff = next((i for i, (x, y) in enumerate(zip(run["tokens"], ref["tokens"])) if x != y), None)
        row = {"run": name, "reference": ref_name, "equal": run["tokens"] == ref["tokens"], "first_diff": diff,
               "cpu_margin_at_diff": ref["margins"][diff] if diff is not None and "margins" in ref else None,
               "prefill_logits_max_abs_diff": float((run["logits"] - ref["logits"]).abs().max()),
               "prefill_argmax_equal": int(run["logits"].argmax()) == int(ref["logits"].argmax())}
        result["comparisons"].append(row)
        print(f"  {name} vs {ref_name}: equal={row['equal']} first_diff={diff} "
              f"margin={row['cpu_margin_at_diff']} logits diff={row['prefill_logits_max_abs_diff']:.3g}", flush=True)

    device = args.device
    cpu = {}
    for mode, with_lola in (("lola", True), ("exact", False)):
        try:
            print(f"CPU fp32 {mode} ...", flush=True)
            cpu[mode] = greedy_cpu(build("cpu", torch.float32, with_lola))
            result["runs"][f"cpu-fp32-{mode}"] = {k: v for k, v in cpu[mode].items() if k != "logits"}
            save_result()
        except Exception as err:
            traceback.print_exc()
            result["errors"].append(f"cpu {mode}: {type(err).__name__}: {err}")
    variants = [("fp32-graphs", torch.float32, True, "1"), ("bf16-graphs", torch.bfloat16, True, "1"),
                ("bf16-eager", torch.bfloat16, True, "0"), ("bf16-exact", torch.bfloat16, False, "1")]
    if device == "cpu":  # the smoke run: bf16 on a small CPU is slow and checks nothing more
        variants = [("fp32-graphs", torch.float32, True, "1"), ("fp32-exact", torch.float32, False, "1")]
    for name, dtype, with_lola, graphs in variants:
        if time.monotonic() > deadline - 15:
            result["errors"].append(f"{name}: skipped, out of time")
            continue
        try:
            print(f"{device} {name} ...", flush=True)
            os.environ["LOLACHAT_GRAPHS"] = graphs
            engine = build(device, dtype, with_lola)
            if graphs == "0" and engine.static_decoder() is not None:
                engine.static_decoder().block_body_eager = True  # the graphs' schedule and shapes, uncaptured
            run = run_engine(engine)
            result["runs"][name] = {k: v for k, v in run.items() if k != "logits"}
            ref_name = "lola" if with_lola else "exact"
            if ref_name in cpu:
                compare(name, run, f"cpu-fp32-{ref_name}", cpu[ref_name])
            if name == "bf16-eager" and "bf16-graphs" in result["runs"]:
                same = run["tokens"] == result["runs"]["bf16-graphs"]["tokens"]
                result["comparisons"].append({"run": "bf16-graphs", "reference": "bf16-eager", "equal": same})
                print(f"  bf16 graphs vs bf16 eager: equal={same}", flush=True)
            del engine
            if device == "cuda":
                torch.cuda.empty_cache()
        except Exception as err:
            traceback.print_exc()
            result["errors"].append(f"{name}: {type(err).__name__}: {err}")
        finally:
            os.environ.pop("LOLACHAT_GRAPHS", None)
        save_result()
    save_result()


if __name__ == "__main__":
    sys.exit(main())
