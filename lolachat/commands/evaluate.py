"""`lolachat eval passkey` (needle retrieval by length × depth) and `lolachat eval ppl` (perplexity)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from lolachat.commands.display import notice, print_json
from lolachat.commands.options import add_engine_options, load_engine, mode_notice
from lolachat.config import load_config
from lolachat.errors import BadInput


def register(sub) -> None:
    ev = sub.add_parser("eval", help="measure retrieval (passkey) or perplexity (ppl)",
                        description="Quality evaluations of a model in exact or LoLA mode.")
    tasks = ev.add_subparsers(dest="eval_task", metavar="TASK", required=True)

    pk = tasks.add_parser("passkey", help="needle retrieval accuracy by context length and depth",
                          description="RULER niah_single_1 (or the classic pass key): greedy answers, "
                                      "RULER substring scoring, a depth × length grid.")
    pk.add_argument("model", nargs="?", help="catalog alias, Hub repo id or local path (default: config)")
    pk.add_argument("--task", choices=["niah_single_1", "passkey"], default="niah_single_1")
    pk.add_argument("--lengths", default="1K,2K,4K", help="prompt lengths in tokens, e.g. 1K,2K,4096")
    pk.add_argument("--depths", default="0,0.25,0.5,0.75,1",
                    help="needle depths as fractions (0..1) or percents (50%%)")
    pk.add_argument("--samples", type=int, default=4, help="samples per length × depth cell")
    pk.add_argument("--max-new-tokens", type=int, default=32, help="greedy tokens generated per answer")
    pk.add_argument("--seed", type=int, default=0, help="seed of keys and values (same seed, same prompts)")
    pk.add_argument("--no-chat-template", action="store_true", help="raw prompt, no chat template")
    pk.add_argument("--plot", metavar="PNG", help="write a depth × length heat map (needs matplotlib)")
    _common(pk)
    pk.set_defaults(handler=passkey_command)

    pp = tasks.add_parser("ppl", help="perplexity at a given context length",
                          description="Perplexity of the last --tail tokens of windows of --context tokens.")
    pp.add_argument("model", nargs="?", help="catalog alias, Hub repo id or local path (default: config)")
    pp.add_argument("--file", "-f", required=True, help="a UTF-8 text file (keep it out of training data)")
    pp.add_argument("--context", default="1K", help="context length(s) in tokens, e.g. 1K,4K,16K")
    pp.add_argument("--tail", type=int, default=512, help="tokens scored at the end of each window")
    pp.add_argument("--samples", type=int, default=8, help="windows per context length (at most)")
    pp.add_argument("--aligned", action="store_true",
                    help="every context length scores the same tokens: its windows end where the longest "
                         "context's windows end (so lengths differ only in how much they see)")
    _common(pp)
    pp.set_defaults(handler=ppl_command)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=["lola", "exact"], default="lola",
                        help="lola (the adapter's bounded memory) or exact (softmax teacher, full KV cache)")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")
    parser.add_argument("--out", metavar="JSON", help="also write the full result to this file")
    parser.add_argument("--retrieval-heads", metavar="HEADS",
                        help="heads that take no recent slots, all their λ going by score, e.g. L17H3,L18H7 "
                             "(scripts/retrieval_heads.py finds them; experimental, docs/quality.md §15)")
    add_engine_options(parser)


# -------------------------------------------------------------------------------------------- parsing


def parse_tokens(text: str, what: str = "length") -> int:
    t = text.strip().lower()
    scale = 1
    if t.endswith("k"):
        t, scale = t[:-1], 1024
    try:
        value = int(float(t) * scale)
    except ValueError:
        raise BadInput(f"bad {what} {text!r} (expected a number of tokens like 2048 or 2K)") from None
    if value < 1:
        raise BadInput(f"{what} must be positive (got {text!r})")
    return value


def parse_lengths(text: str, what: str = "length") -> list[int]:
    values = [parse_tokens(part, what) for part in text.split(",") if part.strip()]
    if not values:
        raise BadInput(f"no {what} given")
    return values


def parse_depths(text: str) -> list[float]:
    depths = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            value = float(part[:-1]) / 100 if part.endswith("%") else float(part)
        except ValueError:
            raise BadInput(f"bad depth {part!r} (expected a fraction like 0.5 or a percent like 50%)") from None
        if not 0.0 <= value <= 1.0:
            raise BadInput(f"depth {part!r} is outside 0..1 (0%..100%)")
        depths.append(value)
    if not depths:
        raise BadInput("no depth given")
    return depths


# ------------------------------------------------------------------------------------------- running


@contextmanager
def count_progress(label: str, enabled: bool | None = None):
    """Yield a callback (done, total) driving a bar of items with ETA on a TTY; silent when piped."""
    enabled = sys.stderr.isatty() if enabled is None else enabled
    if not enabled:
        yield lambda done, total: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from lolachat.commands.display import stderr

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=stderr, transient=True) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def _engine(args):
    from lolachat.commands.display import byte_progress

    if args.mode == "exact":
        args.exact = True
    config = load_config()
    with byte_progress() as progress:
        engine = load_engine(args.model, args, config, progress=progress)
    if args.mode == "lola" and engine.info.mode == "exact":
        raise BadInput(f"{engine.info.model} has no LoLA adapter: pass --adapter FILE, --feature-map identity, "
                       "or --mode exact")
    _set_retrieval_heads(engine, args)
    message = mode_notice(engine)
    if message and engine.info.mode != "exact":
        notice(message)
    return engine


def _set_retrieval_heads(engine, args) -> None:
    """--retrieval-heads onto the engine's LoLA config (lola.LolaConfig.retrieval_heads), checked against the model."""
    from lolachat.lola import heads_outside, parse_head_names

    text = getattr(args, "retrieval_heads", None)
    if not text:
        return
    if engine.model.lola_config is None:
        raise BadInput("--retrieval-heads applies to LoLA mode only")
    if not engine.model.lola_config.recent_slots:
        raise BadInput("--retrieval-heads spares heads from recent slots: give some with --recent-slots N")
    try:
        heads = parse_head_names(text.split(","))
    except ValueError as exc:
        raise BadInput(f"bad --retrieval-heads: {exc}") from None
    model = engine.model.args
    outside = heads_outside(heads, model.n_layers, model.n_heads)
    if outside:
        raise BadInput(f"--retrieval-heads {', '.join(outside)}: {engine.info.model} has {model.n_layers} layers of "
                       f"{model.n_heads} heads, numbered from 0")
    engine.model.lola_config.retrieval_heads = heads


def _setting(engine) -> str:
    info = engine.info
    if info.mode == "exact":
        return "exact attention"
    variant = "" if info.selection in (None, "head") else f", {info.selection} selection"
    variant += f", {info.sinks} sinks" if info.sinks else ""
    variant += f", state half-life {info.state_halflife}" if info.state_halflife else ""
    variant += f", score {info.score}" if info.score not in (None, "error") else ""
    variant += f", score half-life {info.score_halflife}" if info.score_halflife else ""
    variant += f", {info.recent_slots} recent slots" if info.recent_slots else ""
    spared = engine.model.lola_config.retrieval_heads
    variant += f" (none in {len(spared)} retrieval heads)" if info.recent_slots and spared else ""
    return f"{info.mode} (C={info.window}, λ={info.sparse}{variant}, mix {info.mix}, φ {info.phi_input})"


def _describe(engine) -> dict:
    """engine.describe(), plus the eval-only retrieval heads when set."""
    from lolachat.lola import head_names

    out = engine.describe()
    cfg = engine.model.lola_config
    if getattr(cfg, "retrieval_heads", ()):
        out["retrieval_heads"] = head_names(cfg.retrieval_heads)
    return out


def _write_json(path: str, data: dict) -> None:
    from lolachat.persist import atomic_write

    with atomic_write(Path(path)) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")


def passkey_command(args: argparse.Namespace) -> int:
    from lolachat.evals.passkey import run_passkey
    from lolachat.evals.plot import heat_map, matplotlib_available

    lengths = parse_lengths(args.lengths)
    depths = parse_depths(args.depths)
    if args.samples < 1 or args.max_new_tokens < 1:
        raise BadInput("--samples and --max-new-tokens must be at least 1")
    if args.plot and not matplotlib_available():
        notice("note: matplotlib is not installed (pip install 'lolachat[plot]'); skipping the heat map")
        args.plot = None
    engine = _engine(args)
    started = time.perf_counter()
    with count_progress(f"{args.task}") as progress:
        result = run_passkey(engine, lengths=lengths, depths=depths, samples=args.samples, task=args.task,
                             max_new_tokens=args.max_new_tokens, seed=args.seed,
                             chat=not args.no_chat_template, progress=progress)
    result = {"engine": _describe(engine), **result, "seconds": round(time.perf_counter() - started, 2)}
    if args.out:
        _write_json(args.out, result)
    if args.plot:
        heat_map(result, args.plot, title=f"{engine.info.model} · {_setting(engine)} · {args.task}")
    if args.json:
        print_json(result)
    else:
        print(passkey_table(result, engine))
    return 0


def passkey_table(result: dict, engine) -> str:
    depths = result["depths"]
    header = ["length"] + [f"{100 * d:g}%" for d in depths] + ["mean", "kept", "cache MiB"]
    rows = []
    for length in result["lengths"]:
        cells = {c["depth"]: c["score"] for c in result["cells"] if c["length"] == length}
        summary = result["by_length"][str(length)]
        mem = result["memory_after_prefill"].get(str(length), {})
        kept = summary["needle_kept"]
        rows.append([str(length)] + [_fmt(cells.get(d)) for d in depths] + [
            _fmt(summary["score"]), "—" if kept is None else f"{kept:.2f}",
            f"{mem.get('cache_bytes', 0) / 2**20:.1f}"])
    lines = [f"{result['task']} · {engine.info.model} · {_setting(engine)} · "
             f"{result['samples_per_cell']} samples per cell"]
    lines += _table(header, rows)
    lines.append(f"overall {_fmt(result['score'])}%")
    return "\n".join(lines)


def ppl_command(args: argparse.Namespace) -> int:
    from lolachat.documents import read_document
    from lolachat.evals.ppl import perplexity

    contexts = parse_lengths(args.context, "context")
    if args.samples < 1:
        raise BadInput("--samples must be at least 1")
    document = read_document(args.file)
    engine = _engine(args)
    ids = engine.tokenizer.encode(document.text, add_special_tokens=False)
    results = []
    align_to = max(contexts) if args.aligned else None
    for context in contexts:
        with count_progress(f"ppl @ {context}") as progress:
            results.append(perplexity(engine, ids, context, tail=args.tail, samples=args.samples,
                                      progress=progress, align_to=align_to))
    out = {"engine": _describe(engine), "file": str(args.file), "file_tokens": len(ids), "results": results}
    if args.out:
        _write_json(args.out, out)
    if args.json:
        print_json(out)
    else:
        aligned = f" · windows aligned to {align_to} tokens" if align_to else ""
        print(f"perplexity · {engine.info.model} · {_setting(engine)} · {args.file}{aligned}")
        rows = [[str(r["context"]), str(r["tail"]), str(r["windows"]), f"{r['ppl']:.3f}"] for r in results]
        print("\n".join(_table(["context", "tail", "windows", "ppl"], rows)))
    return 0


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header, *rows]]
