"""`show`: what a model is and what LoLA memory it would need against a full KV cache."""

from __future__ import annotations

from lolachat import store
from lolachat.weights import load_weights

REPORT_LENGTHS = (8192, 131072)


def describe_model(spec: str) -> dict:
    local = store.resolve(spec, pull_if_missing=False)
    args = load_weights(local.weights).args
    manifest = local.manifest or {}
    window = int(manifest.get("window", 64))
    sparse = int(manifest.get("sparse", 256))
    selection = manifest.get("selection", "head")
    feature_dim = 2 * args.head_dim
    report = {
        "name": local.name,
        "source": local.source,
        "weights": str(local.weights),
        "adapter": str(local.adapter) if local.adapter else None,
        "architecture": {
            "layers": args.n_layers, "hidden": args.dim, "heads": args.n_heads, "kv_heads": args.n_kv_heads,
            "head_dim": args.head_dim, "ffn": args.hidden_dim, "vocab": args.vocab_size,
            "trained_context": args.max_position, "rope_theta": args.rope_theta,
            "rope_scaling": (args.rope_scaling or {}).get("rope_type", "none"),
            "tied_embeddings": args.tie_embeddings,
        },
        "lola": {"mode": "lola" if local.adapter else "exact (no adapter)", "window": window, "sparse": sparse,
                 "selection": selection, "state_halflife": int(manifest.get("state_halflife", 0)),
                 "score": manifest.get("score", "error"), "recent_slots": int(manifest.get("recent_slots", 0)),
                 "score_halflife": int(manifest.get("score_halflife", 0)),
                 "max_distance": manifest.get("max_distance", args.max_position // 2)},
        "memory_bf16": {},
    }
    for length in REPORT_LENGTHS:
        full = full_kv_bytes(args, length, 2)
        lola = lola_bytes(args, window, sparse, feature_dim, 2, selection)
        report["memory_bf16"][f"{length // 1024}K"] = {
            "full_kv_bytes": full, "lola_bytes": lola, "ratio": round(full / lola, 1)}
    return report


def full_kv_bytes(args, tokens: int, element: int) -> int:
    return 2 * args.n_layers * args.n_kv_heads * args.head_dim * tokens * element


def lola_bytes(args, window: int, sparse: int, feature_dim: int, element: int, selection: str = "head") -> int:
    """Window K/V per KV head (2C), sparse K/V per selection head (λ, + int64 positions; per query head,
    or per KV head with group selection), fp32 H and s per query head."""
    sparse_heads = args.n_kv_heads if selection == "group" else args.n_heads
    per_layer = (
        2 * args.n_kv_heads * 2 * window * args.head_dim * element
        + sparse_heads * sparse * (2 * args.head_dim * element + 8)
        + args.n_heads * feature_dim * (args.head_dim + 1) * 4
    )
    return args.n_layers * per_layer
