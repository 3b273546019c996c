"""The engine: a loaded model + tokenizer + LoLA settings; prefill, decode and sampling.

`load()` is the entry point of the Python API (DESIGN §1); the CLI and the TUI are built on it.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lolachat.adapter import Adapter, identity_adapter, load_adapter
from lolachat.errors import BadInput, LolachatError
from lolachat.lola import LolaConfig
from lolachat.lola_decode import bank_nbytes
from lolachat.model import Llama, ModelMemory
from lolachat.quant import quantize_model, resolve_quant
from lolachat.sampling import Sampler, SamplingOptions

PREFILL_BLOCK = 1024  # tokens per forward pass during prefill: bounds activation memory
ProgressFn = Callable[[int, int], None]  # (tokens done, tokens total)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LolachatError("device 'cuda' was asked for but no CUDA GPU is available")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise BadInput(f"unknown device {device!r} (expected auto, cpu or cuda)")
    return torch.device(device)


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else faster_cpu_dtype()
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise BadInput(f"unknown dtype {dtype!r} (expected auto, float32, bfloat16 or float16)")
    return table[dtype]


@functools.cache
def faster_cpu_dtype() -> torch.dtype:
    """bfloat16 where this CPU multiplies it faster than float32 (native bf16 units), else float32.

    Decode is a chain of matrix-vector products bound by memory traffic, so halving the bytes pays
    only if the CPU has bf16 arithmetic; a few milliseconds of measurement settle it.
    """
    def seconds(dtype: torch.dtype) -> float:
        w = torch.randn(1536, 576).to(dtype)
        x = torch.randn(1, 576).to(dtype)  # one row: decode is batch 1
        torch.nn.functional.linear(x, w)
        start = time.perf_counter()
        for _ in range(20):
            torch.nn.functional.linear(x, w)
        return time.perf_counter() - start

    # Clearly faster or not at all: under load a noisy probe must not flip the default to bf16.
    return torch.bfloat16 if seconds(torch.bfloat16) < 0.5 * seconds(torch.float32) else torch.float32


@dataclass
class EngineInfo:
    """What the engine runs, for stats panels, `--json` output and session compatibility checks."""

    model: str
    source: str
    weights_sha256: str
    mode: str  # "lola", "lola-identity" (experimental, untrained maps) or "exact"
    device: str
    dtype: str
    window: int | None
    sparse: int | None
    mix: str | None
    max_distance: int | None
    phi_input: str | None
    selection: str | None = None  # sparse-cache selection per query "head" or per KV-head "group"
    sinks: int | None = None  # first tokens never evicted
    state_halflife: int | None = None  # linear state fading (0 = never)
    score: str | None = None  # sparse-cache eviction score (lola.LolaConfig.score)
    recent_slots: int | None = None  # λ slots always held by the newest pairs (lola.LolaConfig.recent_slots)
    score_halflife: int | None = None  # eviction scores fade with age (lola.LolaConfig.score_halflife; 0 = off)
    adapter_sha256: str | None = None  # Adapter.digest() of the feature maps in use
    quant: str = "none"  # "int8": weight-only int8 linear layers (lolachat.quant)


MEMORY_FIELDS = ("window", "sparse", "mix", "max_distance", "phi_input", "selection", "sinks", "state_halflife",
                 "score", "recent_slots", "score_halflife")


def memory_info(cfg: LolaConfig | None) -> dict:
    """EngineInfo's fields that describe the LoLA memory `cfg`: all None in exact mode (cfg None)."""
    if cfg is None:
        return dict.fromkeys(MEMORY_FIELDS)
    return {name: getattr(cfg, "chunk" if name == "window" else name) for name in MEMORY_FIELDS}


class Engine:
    def __init__(self, model: Llama, tokenizer, info: EngineInfo, stop_ids: list[int]):
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        self.stop_ids = set(stop_ids)
        self.device = next(model.parameters()).device
        self._static = None  # lolachat.gpu.StaticDecoder, built on first use (CUDA + LoLA only)

    def static_decoder(self):
        """The static-memory decoder (lolachat.gpu) when the model runs LoLA on CUDA, else None.

        LOLACHAT_STATIC=1/0 forces it on/off on any device; LOLACHAT_GRAPHS=0 keeps it eager on CUDA."""
        from lolachat.gpu import StaticDecoder, static_wanted

        cfg = self.model.lola_config
        if cfg is not None and cfg.sinks:
            return None  # the static memory has no sink slots
        if (self._static is None and self.model.lola_config is not None and self.model.quant == "none"
                and static_wanted(self.device)):
            self._static = StaticDecoder(self.model)
        return self._static

    # -- the Python API ---------------------------------------------------------------------
    def session(self, system: str | None = None):
        from lolachat.session import Session

        return Session(self, system=system)

    def resume(self, path: str | Path):
        from lolachat.session import Session

        return Session.load(self, Path(path))

    @torch.inference_mode()
    def logits(self, token_ids) -> torch.Tensor:
        """[T, vocab] logits of a fresh state over a token sequence (prefilled block by block)."""
        ids = torch.as_tensor(list(token_ids), dtype=torch.long, device=self.device).view(1, -1)
        memory = self.new_memory()
        out = [self.model(ids[:, i : i + PREFILL_BLOCK], memory, all_logits=True)[0]
               for i in range(0, ids.shape[1], PREFILL_BLOCK)]
        return torch.cat(out).cpu()

    # -- building blocks used by sessions -------------------------------------------------------
    def new_memory(self) -> ModelMemory:
        decoder = self.static_decoder()
        return decoder.new_memory() if decoder is not None else self.model.new_memory(batch=1)

    @torch.inference_mode()
    def prefill(self, memory: ModelMemory, ids: list[int], progress: ProgressFn | None = None) -> torch.Tensor:
        """Feed `ids` after what `memory` holds; returns the logits [vocab] after the last token."""
        if not ids:
            raise ValueError("prefill needs at least one token")
        if hasattr(memory, "decoder"):
            return memory.decoder.prefill(memory, ids, progress)
        torch.set_flush_denormal(True)  # per thread: workers (TUI) call this off the loading thread
        tensor = torch.tensor(ids, dtype=torch.long, device=self.device).view(1, -1)
        logits = None
        # Blocks end on chunk boundaries (PREFILL_BLOCK is a multiple of C) so the work per block is even.
        for start in range(0, len(ids), PREFILL_BLOCK):
            logits = self.model(tensor[:, start : start + PREFILL_BLOCK], memory)
            if progress:
                progress(min(start + PREFILL_BLOCK, len(ids)), len(ids))
        return logits[0, -1]

    @torch.inference_mode()
    def generate(self, memory: ModelMemory, logits: torch.Tensor, max_new_tokens: int,
                 options: SamplingOptions) -> Iterator[int]:
        """Yield sampled token ids. Each is fed to `memory` before it is yielded (stop tokens too), so
        a consumer that stops early leaves the memory holding exactly the tokens it received."""
        if hasattr(memory, "decoder"):
            yield from memory.decoder.generate(memory, logits, max_new_tokens, options, self.stop_ids)
            return
        torch.set_flush_denormal(True)
        sampler = Sampler(options, device="cpu")
        for _ in range(max_new_tokens):
            token = sampler(logits.float().cpu())
            step = torch.tensor([[token]], dtype=torch.long, device=self.device)
            logits = self.model(step, memory)[0, -1]
            yield token
            if token in self.stop_ids:
                return

    def memory_stats(self, memory: ModelMemory) -> dict:
        a = self.model.args
        element = next(self.model.parameters()).element_size()
        tokens = memory.position
        full_kv = 2 * a.n_layers * a.n_kv_heads * a.head_dim * tokens * element
        layer0 = memory.layers[0]
        if memory.exact:
            kv = sum(layer.nbytes() for layer in memory.layers)
            return {"tokens_seen": tokens, "window_tokens": tokens, "sparse_tokens": 0, "linear_tokens": 0,
                    "state_bytes": 0, "window_bytes": kv, "sparse_bytes": 0, "cache_bytes": kv, "decode_bytes": 0,
                    "full_kv_bytes": full_kv, "evictions": 0}
        parts = {"window": 0, "sparse": 0, "state": 0}
        for layer in memory.layers:
            for name, size in layer.nbytes().items():
                parts[name] += size
        return {
            "tokens_seen": tokens,
            "window_tokens": layer0.window_len,
            "sparse_tokens": layer0.sparse_len,
            "linear_tokens": layer0.folded,
            "state_bytes": parts["state"],
            "window_bytes": parts["window"],
            "sparse_bytes": parts["sparse"],
            "cache_bytes": sum(parts.values()),
            # the CPU decode path's float32 working copy of cache + window (lolachat.lola_decode): derived
            # from the memory, rebuilt when needed, not saved; bounded by λ and C like the memory itself
            "decode_bytes": sum(bank_nbytes(layer) for layer in memory.layers),
            "full_kv_bytes": full_kv,
            "evictions": layer0.evictions,
        }

    def describe(self) -> dict:
        return asdict(self.info)


def _lola_config(**settings) -> LolaConfig:
    try:
        return LolaConfig(**settings)
    except ValueError as err:  # settings out of range, e.g. more recent slots than λ
        raise BadInput(f"bad LoLA settings: {err}") from None


def load(model: str | None = None, *, device: str = "auto", dtype: str | None = None, window: int | None = None,
         sparse: int | None | str = "auto", mix: str | None = None, max_distance: int | None = None,
         feature_map: str | None = None, selection: str | None = None, sinks: int | None = None,
         state_halflife: int | None = None, score: str | None = None, recent_slots: int | None = None,
         score_halflife: int | None = None,
         pull: bool = True, progress=None,
         adapter: str | Path | None = None, quant: str | None = "none") -> Engine:
    """Load a model by catalog alias, Hub repo id or local path (DESIGN §1).

    With a trained adapter the model runs in LoLA mode; without one, or with `sparse=None`, in exact
    mode (unbounded KV cache). `sparse="auto"` takes λ from the model's manifest (256 if it has none).
    `feature_map="identity"` runs LoLA with untrained identity-initialised maps (experimental).
    `adapter` names an adapter file (DESIGN §4.5) to use instead of the model's own.
    `selection` ("head" or "group"; default: the manifest's, else "head") and `sinks` pick the sparse-cache
    variant; `state_halflife` (tokens; default: the manifest's, else 0 = never) fades the linear state;
    `score`, `recent_slots` and `score_halflife` set how eviction picks the λ pairs (lola.LolaConfig). The
    manifest's eviction policy belongs to its memory: it applies only when window, λ and selection come out as the
    manifest's, else DESIGN §4.4's plain policy (self-recall error, no recent slots, no age discount) does unless
    these arguments say otherwise.
    `quant="int8"` runs the linear layers with int8 weights (CPU); "auto" picks it where it pays (lolachat.quant).
    """
    exact = sparse is None
    from lolachat import store, weights
    from lolachat.tokenizer import end_of_turn_ids, load_tokenizer

    spec = model or "smollm2-135m"
    local = store.resolve(spec, pull_if_missing=pull, progress=progress)
    loaded = weights.load_weights(local.weights)
    args = loaded.args
    dev = resolve_device(device)
    torch.set_flush_denormal(True)  # denormal floats make CPU matmuls many times slower
    torch_dtype = resolve_dtype(dtype, dev)
    quant = resolve_quant(quant, dev)

    if adapter is not None and not exact and feature_map != "identity":
        adapter = load_adapter(adapter, args)
    else:
        adapter = _choose_adapter(local, args, feature_map, exact)
    tensors = loaded.tensors
    if adapter is not None and adapter.lora:
        adapter.merge_lora_into(tensors)
    net = Llama(args)
    net.load_weights(tensors)
    net = net.to(device=dev, dtype=torch_dtype).eval()

    lola_defaults = local.manifest or {}  # catalog manifests carry window, sparse, selection, max_distance
    cfg = None
    if adapter is None and (score or recent_slots or score_halflife):
        raise BadInput("--score, --recent-slots and --score-halflife apply to LoLA mode only")
    if adapter is not None:
        memory = {
            # the model's runtime choice first: an adapter's chunk is only the C it was trained with
            "chunk": window or lola_defaults.get("window") or adapter.metadata.get("chunk") or 64,
            "sparse": lola_defaults.get("sparse", 256) if sparse == "auto" else int(sparse),
            "selection": selection or lola_defaults.get("selection", "head"),
        }
        own = {"chunk": lola_defaults.get("window"), "sparse": lola_defaults.get("sparse"),
               "selection": lola_defaults.get("selection", "head")}
        eviction = lola_defaults if memory == own else {}  # the manifest's eviction policy is for its memory only
        cfg = _lola_config(
            **memory,
            mix=mix or "lola",
            max_distance=max_distance or lola_defaults.get("max_distance") or max(1, args.max_position // 2),
            phi_input=adapter.phi_input,
            sinks=sinks or 0,
            state_halflife=lola_defaults.get("state_halflife", 0) if state_halflife is None else state_halflife,
            score=score or eviction.get("score", "error"),
            recent_slots=eviction.get("recent_slots", 0) if recent_slots is None else recent_slots,
            score_halflife=eviction.get("score_halflife", 0) if score_halflife is None else score_halflife,
        )
        net.attach_lola(cfg, adapter.layers)
    quantize_model(net, quant)  # after LoRA is merged and the weights are on their device
    mode = "exact" if cfg is None else ("lola-identity" if adapter.experimental else "lola")
    tokenizer = load_tokenizer(local.weights)
    info = EngineInfo(
        model=local.name, source=local.source, weights_sha256=loaded.weights_sha256, mode=mode,
        device=str(dev), dtype=str(torch_dtype).removeprefix("torch."), **memory_info(cfg),
        adapter_sha256=adapter.digest() if cfg else None, quant=quant,
    )
    stop_ids = sorted(set(args.eos_ids) | set(end_of_turn_ids(tokenizer)))
    return Engine(net, tokenizer, info, stop_ids)


def _choose_adapter(local, args, feature_map: str | None, exact: bool) -> Adapter | None:
    if exact:
        return None
    if feature_map == "identity":
        return identity_adapter(args)
    if feature_map not in (None, "trained"):
        raise BadInput(f"unknown feature map {feature_map!r} (expected 'trained' or 'identity')")
    if local.adapter is None:
        return None
    return load_adapter(local.adapter, args)


class Timer:
    """Wall-clock seconds of a block, synchronising CUDA so device work is counted."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0

    def __enter__(self):
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds = time.perf_counter() - self._start
