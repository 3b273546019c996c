"""LoLA adapters in our safetensors format (DESIGN §4.5), and the identity-initialised fallback."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lolachat.errors import BadModelFile
from lolachat.lola import LayerAdapter
from lolachat.model_args import ModelArgs
from lolachat.persist import atomic_write

METADATA_KEY = "lolachat"
# LoLCATs starts from logit(0.1): the window gets weight 0.1 against the linear state at init.
INIT_WINDOW_FACTOR = -2.1972245773362196


class Adapter:
    """Per-layer feature maps and window factors, optional LoRA deltas, and training metadata."""

    def __init__(self, layers: list[LayerAdapter], metadata: dict, lora: dict[str, torch.Tensor] | None = None):
        self.layers = layers
        self.metadata = metadata
        self.lora = lora or {}

    @property
    def phi_input(self) -> str:
        return self.metadata.get("phi_input", "pre_rope")

    def digest(self) -> str:
        """Short sha256 of the trained tensors: a saved LoLA state only makes sense with the maps that made it."""
        h = hashlib.sha256()
        tensors = [t for layer in self.layers for t in (layer.phi_q, layer.phi_k, layer.window_factor)]
        tensors += [self.lora[name] for name in sorted(self.lora)]
        for t in tensors:
            h.update(t.detach().float().contiguous().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    @property
    def experimental(self) -> bool:
        return bool(self.metadata.get("experimental"))

    def merge_lora_into(self, tensors: dict[str, torch.Tensor]) -> None:
        """Add each LoRA delta B·A·scale to the matching projection weight (HF names), in place."""
        scale = float(self.metadata.get("lora_scale", 2.0))
        for i in range(len(self.layers)):
            for proj in "qkvo":
                a = self.lora.get(f"layers.{i}.attn.{proj}.lora_a")
                b = self.lora.get(f"layers.{i}.attn.{proj}.lora_b")
                if a is None or b is None:
                    continue
                name = f"model.layers.{i}.self_attn.{proj}_proj.weight"
                tensors[name] = tensors[name] + scale * (b.float() @ a.float()).to(tensors[name].dtype)


def identity_adapter(args: ModelArgs, feature_half: int | None = None) -> Adapter:
    """Hedgehog maps at LoLCATs' identity init (W = I on the first columns), γ = 0.1. Untrained: experimental."""
    half = feature_half or args.head_dim
    eye = torch.zeros(args.head_dim, half)
    n = min(args.head_dim, half)
    eye[torch.arange(n), torch.arange(n)] = 1.0
    layers = [
        LayerAdapter(
            phi_q=eye.expand(args.n_heads, -1, -1).clone(),
            phi_k=eye.expand(args.n_heads, -1, -1).clone(),
            window_factor=torch.full((args.n_heads,), INIT_WINDOW_FACTOR),
        )
        for _ in range(args.n_layers)
    ]
    meta = {"phi_input": "pre_rope", "feature_dim": 2 * half, "experimental": True, "recipe": "identity init"}
    return Adapter(layers, meta)


def load_adapter(path: str | Path, args: ModelArgs) -> Adapter:
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw_meta = (f.metadata() or {}).get(METADATA_KEY, "{}")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except FileNotFoundError:
        raise BadModelFile(f"adapter file not found: {path}") from None
    except (SafetensorError, OSError, ValueError) as err:
        raise BadModelFile(f"adapter {path} is not a readable safetensors file ({err})") from None
    try:
        metadata = json.loads(raw_meta)
    except json.JSONDecodeError:
        raise BadModelFile(f"adapter {path} has malformed metadata") from None
    layers = []
    for i in range(args.n_layers):
        try:
            layer = LayerAdapter(
                phi_q=tensors[f"layers.{i}.attn.phi_q"].float(),
                phi_k=tensors[f"layers.{i}.attn.phi_k"].float(),
                window_factor=tensors[f"layers.{i}.attn.window_factor"].float(),
            )
        except KeyError as err:
            raise BadModelFile(f"adapter {path} lacks {err.args[0]} (is it for this model?)") from None
        if layer.phi_q.shape[:2] != (args.n_heads, args.head_dim):
            raise BadModelFile(
                f"adapter {path} has feature maps of shape {tuple(layer.phi_q.shape)}, "
                f"the model needs [{args.n_heads}, {args.head_dim}, F/2]"
            )
        layers.append(layer)
    lora = {k: v for k, v in tensors.items() if ".lora_" in k}
    return Adapter(layers, metadata, lora)


def save_adapter(adapter: Adapter, path: str | Path) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(adapter.layers):
        tensors[f"layers.{i}.attn.phi_q"] = layer.phi_q.detach().float().contiguous().cpu()
        tensors[f"layers.{i}.attn.phi_k"] = layer.phi_k.detach().float().contiguous().cpu()
        tensors[f"layers.{i}.attn.window_factor"] = layer.window_factor.detach().float().contiguous().cpu()
    for name, value in adapter.lora.items():
        tensors[name] = value.detach().float().contiguous().cpu()
    metadata = {METADATA_KEY: json.dumps(adapter.metadata, sort_keys=True)}
    with atomic_write(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
