"""LoLCATs checkpoints (``model.pt``) → our adapter format (DESIGN §4.5), converted once at pull time.

The released files are PyTorch pickles (research/lola.md §3.4): a distill checkpoint with the Hedgehog
feature maps and window factors, and a LoRA checkpoint (peft names) for q/k/v/o. They are read with
``torch.load(weights_only=True)`` only — anything but tensors in plain dicts is refused — and written as
one safetensors file: ``layers.{i}.attn.phi_q|phi_k`` [H, D, F/2], ``layers.{i}.attn.window_factor`` [H],
``layers.{i}.attn.{q,k,v,o}.lora_a|lora_b`` (merged into the base weights at load, scaled by ``lora_scale``
= α/r from the metadata).
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors

from lolachat.blobs import ProgressCallback, store_content_addressed
from lolachat.errors import BadModelFile

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.(.+)$")
_LORA = re.compile(r"^([qkvo])_proj\.lora_([AB])(?:\.default)?\.weight$")


def load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A LoLCATs ``model.pt`` as a flat {name: tensor} dict; refuses anything that is not tensors."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, ValueError, EOFError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise BadModelFile(f"{path.name}: refusing to load it, it is not a plain tensor checkpoint "
                           f"(only tensors are accepted, never arbitrary pickled objects): {first}") from None
    except OSError as e:
        raise BadModelFile(f"{path.name}: cannot read it ({e})") from None
    if isinstance(obj, dict) and isinstance(obj.get("model_state_dict"), dict):
        extra = [k for k in obj if k != "model_state_dict"]
        if extra:
            raise BadModelFile(f"{path.name}: unexpected entries beside model_state_dict: {', '.join(map(str, extra))}")
        obj = obj["model_state_dict"]
    if not isinstance(obj, dict):
        raise BadModelFile(f"{path.name}: expected a dict of tensors, found {type(obj).__name__}")
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise BadModelFile(f"{path.name}: entry {k!r} is a {type(v).__name__}, not a tensor; refusing it")
    return obj


def convert(state_dicts: list[dict[str, torch.Tensor]], *, lora_scale: float,
            metadata: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Map LoLCATs key spellings to ours. Returns (tensors, metadata)."""
    out: dict[str, torch.Tensor] = {}
    ignored = []
    for sd in state_dicts:
        for key, t in sd.items():
            m = _LAYER.search(key)
            if m is None:
                ignored.append(key)
                continue
            i, rest = int(m.group(1)), m.group(2)
            t = t.detach().float().contiguous()
            if rest == "feature_map_q.mlp.layer":
                out[f"layers.{i}.attn.phi_q"] = t
            elif rest == "feature_map_k.mlp.layer":
                out[f"layers.{i}.attn.phi_k"] = t
            elif rest == "window_factors":
                out[f"layers.{i}.attn.window_factor"] = t.reshape(-1)
            elif lm := _LORA.match(rest):
                out[f"layers.{i}.attn.{lm.group(1)}.lora_{lm.group(2).lower()}"] = t
            else:
                ignored.append(key)
    layers = sorted({int(k.split(".")[1]) for k in out})
    if not layers:
        raise BadModelFile("no LoLCATs feature maps or LoRA weights found in the checkpoints")
    for i in range(layers[-1] + 1):
        for part in ("phi_q", "phi_k", "window_factor"):
            if f"layers.{i}.attn.{part}" not in out:
                raise BadModelFile(f"LoLCATs checkpoint lacks layer {i} {part} (is the distill checkpoint missing?)")
        q, k = out[f"layers.{i}.attn.phi_q"], out[f"layers.{i}.attn.phi_k"]
        if q.ndim != 3 or q.shape != k.shape or out[f"layers.{i}.attn.window_factor"].shape[0] != q.shape[0]:
            raise BadModelFile(f"LoLCATs layer {i}: unexpected shapes phi_q {tuple(q.shape)}, phi_k {tuple(k.shape)}")
        for proj in "qkvo":
            has = [f"layers.{i}.attn.{proj}.lora_{ab}" in out for ab in "ab"]
            if any(has) and not all(has):
                raise BadModelFile(f"LoLCATs LoRA for layer {i} {proj}_proj has only one of A/B")
    first = out["layers.0.attn.phi_q"]
    meta = {"format": "lolachat-adapter", "feature_dim": 2 * first.shape[-1], "phi_input": "post_rope",
            "chunk": 64, "mix": "lolcats", "lora_scale": lora_scale, "converted_from": "LoLCATs model.pt",
            **metadata}
    if ignored:
        meta["ignored_keys"] = len(ignored)
    return out, meta


def write_adapter(tensors: dict[str, torch.Tensor], metadata: dict, blobs_dir: Path,
                  progress: ProgressCallback | None = None) -> Path:
    from lolachat.adapter import METADATA_KEY

    data = save_safetensors(tensors, metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    return store_content_addressed([data], blobs_dir, label="LoLA adapter (converted)", total=len(data),
                                   progress=progress)


def pull_adapter(entry, *, base_source: str, store_root: Path,
                 progress: ProgressCallback | None = None) -> tuple[Path, list[Path]]:
    """Fetch a catalog entry's LoLCATs checkpoints from the Hub and convert them.

    Returns (adapter blob, the downloaded checkpoint blobs)."""
    from lolachat import catalog, hub

    a = entry.adapter
    filename = a.get("file", "model.pt")
    fetched: list[Path] = []
    state_dicts = []
    sources = []
    for key in ("lolcats_distill", "lolcats_lora"):
        if key not in a:
            continue
        kind, repo = catalog.parse_uri(a[key])
        if kind != "hf":
            raise BadModelFile(f"catalog {entry.name}: {key} must be an hf: source")
        blob, commit = hub.fetch_file(repo, filename, cache_dir=store_root / "hub", progress=progress)
        fetched.append(blob)
        state_dicts.append(load_checkpoint(blob))
        sources.append(f"hf:{repo}@{commit}/{filename}")
    scale = float(a.get("lora_alpha", 16)) / float(a.get("lora_rank", 8))
    tensors, meta = convert(state_dicts, lora_scale=scale,
                            metadata={"base_model": base_source, "sources": sources,
                                      "trained_mix": a.get("trained_mix", "lolcats"),
                                      "recipe": "LoLCATs (Hazy Research): attention transfer + LoRA on Alpaca"})
    if "phi_input" in a:
        meta["phi_input"] = a["phi_input"]
    return write_adapter(tensors, meta, store_root / "blobs", progress), fetched
