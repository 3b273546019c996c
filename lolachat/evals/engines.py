"""Engines for many evaluation settings from one load of the weights and the tokenizer.

`lolachat.load` reads and dequantizes the weights and builds the tokenizer each time (seconds each); an
evaluation sweep over modes, λ and adapters needs the same base many times, so this keeps them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lolachat.adapter import Adapter, load_adapter
from lolachat.engine import Engine, EngineInfo, memory_info, resolve_device, resolve_dtype
from lolachat.lola import LolaConfig
from lolachat.model import Llama


class EngineFactory:
    def __init__(self, model_path: str | Path, device: str = "auto", dtype: str | None = None, loaded=None,
                 tokenizer=None):
        from lolachat.tokenizer import end_of_turn_ids, load_tokenizer
        from lolachat.weights import load_weights

        self.path = str(model_path)
        self.loaded = loaded or load_weights(model_path)
        self.tokenizer = tokenizer or load_tokenizer(model_path)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        args = self.loaded.args
        self.stop_ids = sorted(set(args.eos_ids) | set(end_of_turn_ids(self.tokenizer)))

    def build(self, adapter: str | Path | Adapter | None = None, *, sparse: int = 256, window: int | None = None,
              mix: str = "lola", max_distance: int | None = None, selection: str = "head",
              sinks: int = 0, state_halflife: int = 0, score: str = "error", score_halflife: int = 0,
              recent_slots: int = 0, retrieval_heads: tuple[tuple[int, int], ...] = ()) -> Engine:
        """Exact attention when `adapter` is None, else LoLA with that adapter (a file or an Adapter).

        `selection`, `sinks`, `state_halflife` and the eviction score's `score`, `score_halflife`,
        `recent_slots` and `retrieval_heads` pick the LoLA memory variant (lola.LolaConfig)."""
        args = self.loaded.args
        if isinstance(adapter, (str, Path)):
            adapter = load_adapter(adapter, args)
        tensors = dict(self.loaded.tensors)
        if adapter is not None and adapter.lora:
            adapter.merge_lora_into(tensors)  # replaces entries: the cached tensors stay untouched
        net = Llama(args)
        net.load_weights(tensors)
        net = net.to(device=self.device, dtype=self.dtype).eval()
        cfg = None
        if adapter is not None:
            cfg = LolaConfig(chunk=window or adapter.metadata.get("chunk") or 64, sparse=sparse, mix=mix,
                             max_distance=max_distance or max(1, args.max_position // 2),
                             phi_input=adapter.phi_input, selection=selection, sinks=sinks,
                             state_halflife=state_halflife, score=score, score_halflife=score_halflife,
                             recent_slots=recent_slots, retrieval_heads=tuple(retrieval_heads))
            net.attach_lola(cfg, adapter.layers)
        mode = "exact" if cfg is None else ("lola-identity" if adapter.experimental else "lola")
        info = EngineInfo(
            model=self.path, source=f"local:{self.path}", weights_sha256=self.loaded.weights_sha256, mode=mode,
            device=str(self.device), dtype=str(self.dtype).removeprefix("torch."), **memory_info(cfg),
            adapter_sha256=adapter.digest() if cfg else None,
        )
        return Engine(net, self.tokenizer, info, self.stop_ids)

    @staticmethod
    def release(engine: Engine) -> None:
        """Free an engine's device memory before building the next one."""
        engine.model.to("meta")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
