"""`lolachat distill MODEL`: train a LoLA adapter for a softmax Llama (stage 1 attention transfer, stage 2 LoRA)."""

from __future__ import annotations

import argparse
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from lolachat.commands.display import notice, print_json
from lolachat.errors import BadInput


def register(sub) -> None:
    p = sub.add_parser(
        "distill", help="linearize a softmax model: train its LoLA adapter",
        description="Train Hedgehog feature maps and window factors by attention transfer (stage 1), then LoRA "
                    "on q/k/v/o with LoLA in the loop (stage 2, --stage2-steps). Resumes from <out>.ckpt.")
    p.add_argument("model", help="catalog alias, Hub repo id or local path (HF folder or .gguf)")
    p.add_argument("--out", "-o", help="adapter file to write (default: ./<model>.lola.safetensors)")
    p.add_argument("--data", help="prepared corpus (.npz), or comma-separated sources: pydoc, vim, info, doc, "
                                   "man, or paths to text files/folders (default: pydoc,vim,info,doc)")
    p.add_argument("--prepare-data", metavar="NPZ", help="only tokenize the training text into NPZ (and the "
                                                         "held-out documents into NPZ's .heldout.txt), then exit")
    p.add_argument("--max-tokens", type=int, help="cap on training tokens taken from the sources")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--dtype", help="base model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    s = p.add_argument_group("student (DESIGN §4)")
    s.add_argument("--feature-dim", type=int, default=0, help="F (default 2 × head dim)")
    s.add_argument("--phi-input", choices=["pre_rope", "post_rope"], default="pre_rope")
    s.add_argument("--window", type=int, default=64, help="chunk size C")
    s.add_argument("--mix", choices=["lola", "lolcats"], default="lola", help="mix used in stage 1")
    one = p.add_argument_group("stage 1: attention transfer")
    one.add_argument("--seq-len", default="1024", help="sequence length(s), trained in order, e.g. 1024,4096")
    one.add_argument("--steps", type=int, default=600)
    one.add_argument("--batch", type=int, default=8, help="sequences per step at the first length")
    one.add_argument("--lr", type=float, default=1e-2)
    one.add_argument("--seconds", type=float, help="time cap of stage 1 (the plan shrinks to fit)")
    two = p.add_argument_group("stage 2: LoRA with LoLA in the loop")
    two.add_argument("--stage2-steps", type=int, default=0, help="0 = stage 1 only")
    two.add_argument("--stage2-batch", type=int, default=4)
    two.add_argument("--stage2-seq-len", type=int, default=1024)
    two.add_argument("--stage2-lr", type=float, default=1e-4)
    two.add_argument("--stage2-seconds", type=float, help="time cap of stage 2")
    two.add_argument("--lora-rank", type=int, default=8)
    two.add_argument("--lora-alpha", type=float, default=16.0)
    two.add_argument("--sparse", type=int, default=256, help="sparse-cache capacity λ in the loop")
    two.add_argument("--selection", choices=["head", "group"], default="head",
                     help="sparse-cache selection in the loop: per query head, or one set per KV-head group")
    two.add_argument("--stage2-mix", choices=["lola", "lolcats"], default="lola")
    two.add_argument("--max-distance", type=int, help="cached-key distance cap (default: half the trained context)")
    two.add_argument("--state-halflife", type=int, default=0, metavar="TOKENS",
                     help="the linear state fades in the loop as at inference (0 = never), as the runtime's option")
    two.add_argument("--recompute", action="store_true",
                     help="recompute each layer in the backward pass and take the loss in slices (long sequences)")
    two.add_argument("--stage2-memories", default="", metavar="C:λ:SEL,...",
                     help="more memories to train under, taking turns with --window/--sparse/--selection step by "
                          "step, e.g. 64:256:head,64:1024:head")
    two.add_argument("--stage2-factor-lr", type=float, default=0.0,
                     help="also train the window factors in stage 2, at this rate (0 = keep them)")
    p.add_argument("--init-adapter", metavar="PATH",
                   help="start from this adapter (maps, window factors, LoRA); with --steps 0, stage 2 only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (0 = never)")
    p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--log-every", type=int, default=0, help="print a loss line every N steps (for logs)")
    p.add_argument("--json", action="store_true", help="print the adapter metadata as JSON")
    p.set_defaults(handler=distill_command)


def default_out(spec: str) -> Path:
    name = Path(spec).name if ("/" in spec or spec.endswith(".gguf")) else spec
    name = re.sub(r"\.gguf$", "", name, flags=re.IGNORECASE)
    return Path(re.sub(r"[^\w.\-]", "_", name) + ".lola.safetensors")


def parse_seq_lens(text: str) -> tuple[int, ...]:
    from lolachat.commands.evaluate import parse_lengths

    return tuple(parse_lengths(text, "sequence length"))


@contextmanager
def step_progress(log_every: int = 0):
    """Yield an on_step(stage, step, planned, loss) callback: a bar on a TTY, else optional log lines."""
    if sys.stderr.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        from lolachat.commands.display import stderr

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn())
        with Progress(*columns, console=stderr, transient=False) as bar:
            tasks: dict[str, int] = {}

            def update(stage: str, step: int, planned: int, loss: float) -> None:
                if stage not in tasks:
                    tasks[stage] = bar.add_task(stage, total=planned, loss="—")
                bar.update(tasks[stage], completed=step, total=planned, loss=f"{loss:.4g}")

            yield update
        return
    started = time.monotonic()

    def log(stage: str, step: int, planned: int, loss: float) -> None:
        if log_every and (step % log_every == 0 or step == planned):
            print(f"{stage} step {step}/{planned} loss {loss:.4f} ({time.monotonic() - started:.0f} s)",
                  file=sys.stderr, flush=True)

    yield log


def resolve_device_dtype(device: str, dtype: str | None):
    from lolachat.engine import resolve_device, resolve_dtype

    dev = resolve_device(device)
    return dev, resolve_dtype(dtype or ("bfloat16" if dev.type == "cuda" else "float32"), dev)


def load_base(spec: str, device, dtype):
    """The base model (no adapter) on `device`, its tokenizer and a description for the metadata."""
    from lolachat import store, weights
    from lolachat.model import Llama
    from lolachat.tokenizer import load_tokenizer

    local = store.resolve(spec)
    loaded = weights.load_weights(local.weights)
    model = Llama(loaded.args)
    model.load_weights(loaded.tensors)
    model = model.to(device=device, dtype=dtype).eval()
    tokenizer = load_tokenizer(local.weights)
    base = {"name": local.name, "source": local.source, "weights_sha256": loaded.weights_sha256}
    return model, tokenizer, base


def config_from_args(args, model_args):
    from lolachat.distill import DistillConfig

    return DistillConfig(
        feature_dim=args.feature_dim, phi_input=args.phi_input, chunk=args.window, mix=args.mix,
        seq_lens=parse_seq_lens(args.seq_len), steps=args.steps, batch=args.batch, lr=args.lr,
        seconds=args.seconds, stage2_steps=args.stage2_steps, stage2_batch=args.stage2_batch,
        stage2_seq_len=args.stage2_seq_len, stage2_lr=args.stage2_lr, stage2_seconds=args.stage2_seconds,
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, sparse=args.sparse, selection=args.selection,
        stage2_mix=args.stage2_mix,
        max_distance=args.max_distance or max(1, model_args.max_position // 2), seed=args.seed,
        checkpoint_every=args.checkpoint_every, state_halflife=args.state_halflife,
        stage2_recompute=args.recompute, init_adapter=args.init_adapter,
        stage2_memories=args.stage2_memories, stage2_factor_lr=args.stage2_factor_lr,
    )


def prepare_data_command(args, tokenizer) -> int:
    from lolachat.commands.evaluate import count_progress
    from lolachat.distill_data import DEFAULT_SOURCES, prepare, save_corpus
    from lolachat.persist import atomic_write

    sources = [s.strip() for s in args.data.split(",")] if args.data else list(DEFAULT_SOURCES)
    with count_progress("tokenizing") as progress:
        corpus, heldout = prepare(sources, tokenizer, args.max_tokens, progress)
    out = Path(args.prepare_data)
    save_corpus(corpus, out)
    heldout_path = out.with_suffix(".heldout.txt")
    with atomic_write(heldout_path) as tmp:
        tmp.write_text(heldout, encoding="utf-8")
    summary = {"corpus": str(out), "heldout_text": str(heldout_path), **corpus.meta}
    if args.json:
        print_json(summary)
    else:
        parts = ", ".join(f"{k} {v['tokens']:,}" for k, v in corpus.meta["sources"].items())
        print(f"{out}: {corpus.meta['tokens']:,} tokens ({parts}); held-out text: {heldout_path} "
              f"({corpus.meta['heldout_documents']} documents)")
    return 0


def distill_command(args: argparse.Namespace) -> int:
    from lolachat.commands.evaluate import count_progress
    from lolachat.distill import distill, parse_memories
    from lolachat.distill_data import training_corpus

    for name in ("steps", "stage2_steps", "max_tokens"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise BadInput(f"--{name.replace('_', '-')} must be >= 0")
    if args.prepare_data:
        from lolachat import store
        from lolachat.tokenizer import load_tokenizer

        return prepare_data_command(args, load_tokenizer(store.resolve(args.model).weights))
    parse_seq_lens(args.seq_len)  # bad options fail before the model loads
    parse_memories(args.stage2_memories)
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    model, tokenizer, base = load_base(args.model, device, dtype)
    cfg = config_from_args(args, model.args)
    with count_progress("tokenizing") as progress:
        corpus = training_corpus(args.data, tokenizer, args.max_tokens, progress)
    out = Path(args.out) if args.out else default_out(args.model)
    with step_progress(args.log_every) as on_step:
        meta = distill(model, corpus.tokens, cfg, out, base=base, data_meta=corpus.meta, restart=args.restart,
                       on_step=on_step, notice=notice)
    if args.json:
        print_json({"adapter": str(out), "metadata": meta})
    else:
        ev = meta["eval"]
        parts = []
        if "continued_from" in meta:
            parts.append(f"continued from {args.init_adapter} (sha256 {meta['continued_from']['sha256'][:12]})")
        if "continued_from" not in meta or args.steps:
            parts.append(f"stage 1: {meta['recipe']['stage1']['steps']} steps, valid MSE "
                     f"{ev.get('stage1_valid_mse_init', '—')} → {ev.get('stage1_valid_mse', '—')}")
        if "stage2" in meta["recipe"]:
            parts.append(f"stage 2: {meta['recipe']['stage2']['steps']} steps, valid xent "
                         f"{ev.get('stage1_valid_xent', ev.get('init_valid_xent', '—'))} → "
                         f"{ev.get('stage2_valid_xent')} (teacher {ev.get('teacher_valid_xent', '—')})")
        print(f"wrote {out}\n" + "\n".join(parts))
    return 0
