#!/usr/bin/env python3
"""Train the SmolLM2-135M-Instruct LoLA adapter on one GPU within a time budget, then evaluate it quickly.

    PYTHONUNBUFFERED=1 python3 scripts/distill_gpu.py --model PATH/SmolLM2-135M-Instruct.Q4_1.gguf \
        --data .cache/distill/smollm2-corpus.npz --heldout .cache/distill/smollm2-corpus.heldout.txt \
        --out "$OUT" [--budget 450]

The corpus comes from `lolachat distill MODEL --prepare-data .cache/distill/smollm2-corpus.npz` (run where
the documentation files are; the GPU machine need not have them). The budget (seconds, wall clock from
start to the last table) is split: stage 1 attention transfer 42%, stage 2 LoRA with LoLA in the loop 22%,
the rest evaluation. Training stops by time, so the script ends on time whatever the GPU's speed.

Writes into --out: smollm2-135m.lola.safetensors (the adapter, eval numbers in its metadata),
smollm2-135m.stage1.lola.safetensors, results.json, results.md (the table), train.log. Runs on CPU too
(`--device cpu` with a small model and budget: that is how the test suite exercises this same code path).

Continuing from an adapter (stage 2 only, e.g. on long sequences under the runtime's settings):

    python3 scripts/distill_gpu.py --model M.gguf --data CORPUS.npz --out "$OUT" --budget 300 \
        --init-adapter models/smollm2-135m.lola.safetensors --stage1-share 0 --stage2-share 0.5 \
        --window 256 --sparse 384 --selection group --state-halflife 8192 --stage2-seq-len 16384 \
        --stage2-batch 1 --stage2-lr 2e-4 --recompute --eval-batches 1 --ppl-contexts 4096,32768 --ppl-aligned \
        --ppl-windows 3 --eval-sparse 384 --skip-exact

`--stage1-share 0` skips stage 1; the evaluation then compares the new adapter with the initial one under the
same settings (window, λ, selection, half-life), the perplexity windows aligned so that every context length
scores the same tokens. Stage 2 memory is linear in the sequence length: without `--recompute` about 170 MiB
of saved activations per layer per 1K tokens (fp32 attention terms), so 30 layers need ~80 GiB at 16K and
~160 GiB at 32K; with it, one layer's graph at a time (~10–15 GiB in all at 32K).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def bootstrap() -> None:
    """Import lolachat from this checkout even when it is not installed (pyproject maps kernels/, models/)."""
    sys.path.insert(0, str(ROOT))
    for name, folder in (("lolachat.kernels", "kernels"), ("lolachat.models", "models")):
        try:
            importlib.import_module(name)
        except ImportError:
            if "lolachat" not in sys.modules:
                import lolachat  # noqa: F401
            spec = importlib.util.spec_from_file_location(name, ROOT / folder / "__init__.py",
                                                          submodule_search_locations=[str(ROOT / folder)])
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
    try:
        import gguf  # noqa: F401
    except ImportError:
        print("note: the 'gguf' package is missing; .gguf models cannot be read (carry its wheel: "
              "pip download --no-deps gguf -d .whl)", file=sys.stderr)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the base model: a .gguf file or a Hugging Face folder")
    p.add_argument("--data", required=True, help="prepared corpus .npz (or sources: pydoc,vim,info,doc)")
    p.add_argument("--heldout", help="held-out text for perplexity (default: the corpus' .heldout.txt)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--name", default="smollm2-135m", help="adapter file stem")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for everything, from start")
    p.add_argument("--hard-limit", type=float, default=560.0,
                   help="seconds after which no evaluation sample starts (the device's command limit is 600)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", help="base model dtype (default bfloat16 on CUDA, float32 on CPU)")
    # student and training (defaults: the recipe of research/lola.md §6, pre-RoPE maps)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--phi-input", default="pre_rope", choices=["pre_rope", "post_rope"])
    p.add_argument("--mix", default="lola", choices=["lola", "lolcats"], help="stage 1 mix")
    p.add_argument("--seq-len", default="1024,2048", help="stage 1 sequence lengths, in order")
    p.add_argument("--batch", type=int, default=8, help="stage 1 sequences per step at the first length")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--stage2-seq-len", type=int, default=1024)
    p.add_argument("--stage2-batch", type=int, default=4)
    p.add_argument("--stage2-lr", type=float, default=3e-4)
    p.add_argument("--sparse", type=int, default=256, help="λ in the stage 2 loop")
    p.add_argument("--selection", default="head", choices=["head", "group"], help="selection in the stage 2 loop")
    p.add_argument("--max-distance", type=int, default=4096)
    p.add_argument("--state-halflife", type=int, default=0,
                   help="the linear state fades (tokens to half) in the stage 2 loop and in the evaluation")
    p.add_argument("--recompute", action="store_true",
                   help="stage 2 keeps only each layer's input for backward and takes the loss in slices")
    p.add_argument("--init-adapter", help="start from this adapter (its maps, window factors and LoRA)")
    p.add_argument("--stage2-memories", default="",
                   help="more stage 2 memories, taking turns with --window/--sparse/--selection: C:λ:SEL,...")
    p.add_argument("--stage2-factor-lr", type=float, default=0.0, help="> 0: stage 2 trains the window factors too")
    p.add_argument("--stage1-share", type=float, default=0.42, help="0 = no stage 1")
    p.add_argument("--stage2-share", type=float, default=0.22)
    p.add_argument("--eval-batches", type=int, default=2, help="held-out batches for the losses before/after")
    # evaluation
    p.add_argument("--ppl-contexts", default="1024,4096")
    p.add_argument("--ppl-windows", type=int, default=4)
    p.add_argument("--ppl-aligned", action="store_true",
                   help="every context's windows end where the longest context's do: the same tokens scored")
    p.add_argument("--skip-exact", action="store_true", help="no exact-attention row in the evaluation")
    p.add_argument("--passkey-lengths", default="1024,2048,4096")
    p.add_argument("--passkey-depths", default="0.1,0.5,0.9")
    p.add_argument("--passkey-samples", type=int, default=3, help="per cell (cut evenly if time runs out); 0 = none")
    p.add_argument("--eval-sparse", default="0,256", help="λ values evaluated with the final adapter")
    p.add_argument("--eval-memories", default="",
                   help="other memories (C:λ:SEL,...) evaluated with the final and the initial adapter")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


class Log:
    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115
        self.start = time.monotonic()

    def __call__(self, message: str) -> None:
        line = f"[{time.monotonic() - self.start:6.1f}s] {message}"
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()


def main(argv=None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    bootstrap()
    import torch

    from lolachat.commands.evaluate import parse_depths, parse_lengths
    from lolachat.distill import DistillConfig, distill, parse_memories, stage1_path
    from lolachat.distill_data import training_corpus
    from lolachat.errors import LolachatError
    from lolachat.evals.engines import EngineFactory
    from lolachat.evals.passkey import run_passkey
    from lolachat.evals.ppl import perplexity

    try:  # bad evaluation options fail now, not after the training time is spent
        eval_sparse = [int(x) for x in args.eval_sparse.split(",") if x.strip()]
        eval_memories = parse_memories(args.eval_memories)
        if not eval_sparse:
            raise ValueError("--eval-sparse needs at least one λ")
    except (ValueError, LolachatError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = Log(out_dir / "train.log")
    deadline = started + args.budget
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        log("error: CUDA is not available (pass --device cpu to run on the CPU)")
        return 2
    if args.device.startswith("cuda"):
        log(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")

    # -- load once: weights, tokenizer, corpus ----------------------------------------------------
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    factory = EngineFactory(args.model, device=args.device, dtype=dtype)
    log(f"loaded {args.model}: {factory.loaded.args.n_layers} layers, sha256 {factory.loaded.weights_sha256[:12]}")
    corpus = training_corpus(args.data, factory.tokenizer, strict=False, warn=log)
    log(f"corpus: {len(corpus):,} tokens from {', '.join(corpus.meta['sources'])}")
    heldout = Path(args.heldout) if args.heldout else Path(args.data).with_suffix(".heldout.txt")

    # -- train ----------------------------------------------------------------------------------------
    seq_lens = tuple(parse_lengths(args.seq_len, "sequence length"))
    left = deadline - time.monotonic()
    cfg = DistillConfig(
        phi_input=args.phi_input, chunk=args.window, mix=args.mix, seq_lens=seq_lens, steps=100_000,
        batch=args.batch, lr=args.lr, seconds=args.stage1_share * args.budget, stage2_steps=100_000,
        stage2_batch=args.stage2_batch, stage2_seq_len=args.stage2_seq_len, stage2_lr=args.stage2_lr,
        stage2_seconds=args.stage2_share * args.budget, sparse=args.sparse, selection=args.selection,
        max_distance=args.max_distance, state_halflife=args.state_halflife, stage2_recompute=args.recompute,
        init_adapter=args.init_adapter, seed=args.seed, checkpoint_every=0, eval_batches=args.eval_batches,
        stage2_memories=args.stage2_memories, stage2_factor_lr=args.stage2_factor_lr,
    )
    # the plans are time-bound; give the cosine schedule a horizon the time cap will shorten
    cfg.steps = 20_000 if args.stage1_share > 0 else 0
    cfg.stage2_steps = 20_000 if args.stage2_share > 0 else 0
    log(f"training: stage 1 {cfg.seconds if cfg.steps else 0:.0f} s, stage 2 {cfg.stage2_seconds:.0f} s "
        f"of {left:.0f} s left")
    model = factory.build(None).model  # the base model on the device, no adapter
    base = {"name": "HuggingFaceTB/SmolLM2-135M-Instruct (" + Path(args.model).name + ")",
            "source": f"local:{args.model}", "weights_sha256": factory.loaded.weights_sha256}
    last_log = [0.0]

    def on_step(stage: str, step: int, planned: int, loss: float) -> None:
        now = time.monotonic()
        if now - last_log[0] > 15 or step == planned:
            last_log[0] = now
            log(f"{stage} step {step}/{planned} loss {loss:.4f}")

    adapter_path = out_dir / f"{args.name}.lola.safetensors"
    meta = distill(model, corpus.tokens, cfg, adapter_path, base=base, data_meta=corpus.meta, restart=True,
                   on_step=on_step, notice=log)
    del model
    if torch.cuda.is_available():
        log(f"peak GPU memory in training: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
        torch.cuda.empty_cache()
    log(f"wrote {adapter_path}: eval {json.dumps(meta['eval'])}")
    if "stage2" in meta["recipe"]:
        two = meta["recipe"]["stage2"]
        log(f"stage 2: {two['steps']} steps of {two['batch']} x {two['seq_len'] + 1} tokens in {two['seconds']} s "
            f"({two['seconds'] / max(1, two['steps']):.2f} s per step)")

    # -- evaluate -----------------------------------------------------------------------------------
    settings = [] if args.skip_exact else [("exact", None, None)]  # (label, adapter, (C, λ, selection))
    variant = " group" if args.selection == "group" else ""
    variant += f" half-life {args.state_halflife}" if args.state_halflife else ""
    settings += [(f"lola λ={lam}{variant}", adapter_path, (args.window, lam, args.selection)) for lam in eval_sparse]
    top = (args.window, max(eval_sparse), args.selection)
    if stage1_path(adapter_path).exists():
        settings += [(f"stage 1 only λ={top[1]}{variant}", stage1_path(adapter_path), top)]
    if args.init_adapter:
        settings += [(f"init λ={top[1]}{variant}", Path(args.init_adapter), top)]
    for c, lam, sel in eval_memories:
        label = f"C={c} λ={lam} {sel}" + (f" half-life {args.state_halflife}" if args.state_halflife else "")
        settings += [(f"lola {label}", adapter_path, (c, lam, sel))]
        if args.init_adapter:
            settings += [(f"init {label}", Path(args.init_adapter), (c, lam, sel))]
    results: dict = {"settings": [], "training": meta}
    text = heldout.read_text(encoding="utf-8") if heldout.exists() else ""
    ids = factory.tokenizer.encode(text, add_special_tokens=False) if text else []
    contexts = parse_lengths(args.ppl_contexts, "context")
    lengths = parse_lengths(args.passkey_lengths)
    depths = parse_depths(args.passkey_depths)
    for i, (label, adapter, memory) in enumerate(settings):
        engine = None
        if time.monotonic() > started + args.hard_limit - 30:
            results["settings"].append({"setting": label, "error": "skipped: out of time"})
            log(f"{label}: skipped, out of time")
            continue
        try:
            window, lam, selection = memory or (None, 0, args.selection)
            engine = factory.build(adapter, sparse=lam, max_distance=args.max_distance, selection=selection,
                                   window=window, state_halflife=args.state_halflife if adapter else 0)
            row: dict = {"setting": label, "engine": engine.describe(), "ppl": {}, "passkey": None}
            align = max(contexts) if args.ppl_aligned else None
            for context in contexts:
                if len(ids) >= (align or context):
                    row["ppl"][str(context)] = perplexity(engine, ids, context, tail=512, samples=args.ppl_windows,
                                                          align_to=align)["ppl"]
            if len(row["ppl"]) > 1:
                row["ppl_ratio"] = round(row["ppl"][str(max(contexts))] / row["ppl"][str(min(contexts))], 4)
            if not args.passkey_samples or not lengths:
                log(f"{label}: ppl {row['ppl']} (ratio {row.get('ppl_ratio')})")
                results["settings"].append(row)
                EngineFactory.release(engine)
                continue
            share = (deadline - time.monotonic()) / (len(settings) - i)
            # one round of every cell even past the budget, unless the hard limit is near
            rounds = 1 if time.monotonic() < started + args.hard_limit - 45 else 0
            row["passkey"] = run_passkey(engine, lengths=lengths, depths=depths, samples=args.passkey_samples,
                                         max_new_tokens=16, seed=args.seed,
                                         deadline=time.monotonic() + max(0.0, share - 2), min_rounds=rounds)
            for sample in row["passkey"]["samples"]:
                sample.pop("memory", None)
            log(f"{label}: ppl {row['ppl']} passkey {row['passkey']['score']} "
                f"({len(row['passkey']['samples'])} samples)")
        except Exception as err:  # one failing setting must not lose the others or the adapter
            row = {"setting": label, "error": f"{type(err).__name__}: {err}"}
            log(f"{label}: FAILED {row['error']}\n{traceback.format_exc()}")
        results["settings"].append(row)
        if engine is not None:
            EngineFactory.release(engine)

    if not args.passkey_samples:
        lengths = []  # no retrieval columns
    table = results_table(results, contexts, lengths)
    (out_dir / "results.md").write_text(table + "\n", encoding="utf-8")
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n", encoding="utf-8")
    record_eval_in_adapter(adapter_path, results, contexts, lengths)
    log(f"done in {time.monotonic() - started:.0f} s (budget {args.budget:.0f} s)")
    print(table, flush=True)
    return 0


def results_table(results: dict, contexts: list[int], lengths: list[int]) -> str:
    ratio = [f"ppl@{max(contexts)} / ppl@{min(contexts)}"] if len(contexts) > 1 else []
    retrieval = [f"passkey@{n}" for n in lengths] + ["n", "kept@max"] if lengths else []
    head = ["setting"] + [f"ppl@{c}" for c in contexts] + ratio + retrieval
    rows = []
    for row in results["settings"]:
        if "error" in row:
            rows.append([row["setting"], "error: " + row["error"][:60]] + [""] * (len(head) - 2))
            continue
        pk = row["passkey"] or {"by_length": {}}
        cells = [row["setting"]] + [_f(row["ppl"].get(str(c)), 2) for c in contexts]
        cells += [_f(row.get("ppl_ratio"), 3)] if ratio else []
        if lengths:
            cells += [_f(pk["by_length"].get(str(n), {}).get("score")) for n in lengths]
            longest = pk["by_length"].get(str(lengths[-1]), {})
            cells += [str(len(pk.get("samples", []))), _f(longest.get("needle_kept"), 2)]
        rows.append(cells)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _f(value, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def record_eval_in_adapter(path: Path, results: dict, contexts: list[int], lengths: list[int]) -> None:
    """Copy the headline numbers into the adapter's metadata (DESIGN §4.5: eval numbers)."""
    from lolachat.adapter import load_adapter, save_adapter
    from lolachat.model_args import ModelArgs

    meta = results["training"]
    args = ModelArgs(vocab_size=1, dim=meta["n_heads"] * meta["head_dim"], n_layers=meta["n_layers"],
                     n_heads=meta["n_heads"], n_kv_heads=1, hidden_dim=1, head_dim=meta["head_dim"])
    adapter = load_adapter(path, args)
    summary = {}
    for row in results["settings"]:
        if "error" in row:
            continue
        pk = row["passkey"] or {"by_length": {}}
        summary[row["setting"]] = {
            "ppl_heldout": row["ppl"], **({"ppl_ratio": row["ppl_ratio"]} if "ppl_ratio" in row else {}),
            "niah_single_1": {n: pk["by_length"].get(str(n), {}).get("score") for n in lengths},
            "passkey_samples": len(pk.get("samples", [])),
        }
    adapter.metadata.setdefault("eval", {})["quick_gpu"] = summary
    save_adapter(adapter, path)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
