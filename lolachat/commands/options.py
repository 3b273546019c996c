"""Options shared by the commands that load a model, and the engine they build."""

from __future__ import annotations

import argparse

from lolachat.config import load_config
from lolachat.errors import BadInput


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model and memory")
    g.add_argument("--device", help="auto, cpu or cuda (default: config runtime.device)")
    g.add_argument("--dtype", help="auto, float32, bfloat16 or float16")
    g.add_argument("--quant", choices=["auto", "none", "int8", "int4"],
                   help="weights of the linear layers (CPU): int4 (a GGUF's 4-bit blocks kept as they are, "
                        "int8 for the other matrices), int8, or none; auto = int4 on the CPU "
                        "(default: config runtime.quant)")
    g.add_argument("--window", type=int, help="LoLA chunk size C (window of C+1..2C tokens)")
    g.add_argument("--sparse", type=int, help="LoLA sparse-cache capacity λ per head (0 = window + linear only)")
    g.add_argument("--mix", choices=["lola", "lolcats"], help="how softmax and linear parts combine")
    g.add_argument("--max-distance", type=int, help="cap on a cached key's distance to the query, in tokens")
    g.add_argument("--selection", choices=["head", "group"],
                   help="sparse-cache selection per query head (default) or one per KV-head group "
                        "(K/V stored once per KV head)")
    g.add_argument("--sinks", type=int, help="first N tokens never evicted, held exactly on top of λ (default 0)")
    g.add_argument("--state-halflife", type=int, metavar="TOKENS",
                   help="the linear state's old contents fade to half over this many tokens (0 = never; "
                        "default: the model's manifest)")
    g.add_argument("--score", choices=["error", "relative", "others"],
                   help="how eviction ranks sparse-cache pairs: 'error' (self-recall error, DESIGN §4.4), 'others' "
                        "(the error against the state with every other candidate folded in: no slots spent on "
                        "near-copies) or 'relative' (error / value norm); default: the model's manifest, else error "
                        "(docs/quality.md §11, §14)")
    g.add_argument("--recent-slots", type=int, metavar="N",
                   help="of the λ sparse-cache slots, N always hold the newest pairs and the rest go by score "
                        "(default: the model's manifest, else 0; docs/quality.md §14)")
    g.add_argument("--score-halflife", type=int, metavar="TOKENS",
                   help="eviction scores fade with age to half over this many tokens, so stale pairs give their "
                        "slots to recent ones (0 = off; default: the model's manifest, else 0; docs/quality.md "
                        "§13.4, §15)")
    g.add_argument("--feature-map", choices=["trained", "identity"],
                   help="'identity': LoLA with untrained identity-initialised maps (experimental)")
    g.add_argument("--exact", action="store_true", help="exact attention with a full KV cache (memory grows)")
    g.add_argument("--adapter", help="a LoLA adapter file (DESIGN §4.5) to use instead of the model's own")


def add_sampling_options(parser: argparse.ArgumentParser, greedy_default: bool = False) -> None:
    g = parser.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, help="stop after this many new tokens")
    g.add_argument("--temperature", type=float, help="0 = greedy" + (" (default here)" if greedy_default else ""))
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int, help="seed for sampling (reproducible output)")


def sampling_kwargs(args, config: dict, greedy_default: bool = False) -> dict:
    gen = config["generation"]
    temperature = args.temperature if args.temperature is not None else (0.0 if greedy_default else gen["temperature"])
    out = {
        "max_new_tokens": args.max_new_tokens if args.max_new_tokens is not None else gen["max_new_tokens"],
        "temperature": temperature,
        "top_k": args.top_k if args.top_k is not None else gen["top_k"],
        "top_p": args.top_p if args.top_p is not None else gen["top_p"],
        "seed": args.seed,
    }
    if out["max_new_tokens"] < 1:
        raise BadInput("--max-new-tokens must be at least 1")
    if out["temperature"] < 0 or out["top_k"] < 0 or not 0 < out["top_p"] <= 1:
        raise BadInput("need temperature >= 0, top-k >= 0 and 0 < top-p <= 1")
    return out


def load_engine(model: str | None, args, config: dict | None = None, progress=None):
    """Build the engine from command-line options over the configuration file."""
    import torch

    from lolachat.engine import load

    config = config or load_config()
    lola, runtime = config["lola"], config["runtime"]
    if runtime.get("threads"):
        torch.set_num_threads(int(runtime["threads"]))
    sparse = args.sparse if args.sparse is not None else (lola["sparse"] if lola["sparse"] >= 0 else "auto")
    if args.exact:
        sparse = None
    for name in ("window", "sparse", "max_distance", "sinks", "state_halflife", "recent_slots", "score_halflife"):
        value = getattr(args, name, None)
        if value is not None and value < 0:
            raise BadInput(f"--{name.replace('_', '-')} must be >= 0")
    if args.window == 0:
        raise BadInput("--window must be at least 1")
    return load(
        model or config["model"]["default"],
        device=args.device or runtime["device"],
        dtype=args.dtype or runtime["dtype"],
        window=args.window or lola["window"] or None,
        sparse=sparse,
        mix=args.mix or lola["mix"],
        max_distance=args.max_distance or lola["max_distance"] or None,
        feature_map=args.feature_map,
        selection=getattr(args, "selection", None),
        sinks=getattr(args, "sinks", None),
        state_halflife=getattr(args, "state_halflife", None),
        score=getattr(args, "score", None),
        recent_slots=getattr(args, "recent_slots", None),
        score_halflife=getattr(args, "score_halflife", None),
        progress=progress,
        adapter=getattr(args, "adapter", None),
        quant=getattr(args, "quant", None) or runtime["quant"],
    )


def mode_notice(engine) -> str | None:
    info = engine.info
    if info.mode == "exact":
        return (f"note: {info.model} runs with exact attention (no LoLA adapter, or --exact): "
                "the KV cache grows with the conversation")
    if info.mode == "lola-identity":
        return "experimental: LoLA with untrained identity feature maps (--feature-map identity); expect poor answers"
    return None
