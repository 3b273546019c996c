"""`lolachat bench`: prefill and decode speed and peak memory by context length (issue 3, DESIGN §5).

Engines, all on the same weights in one process:
- `lola`: this runtime in LoLA mode (static memory; CUDA graphs on a GPU);
- `exact`: this runtime with a full KV cache (on a GPU the prompt goes through one forward, so SDPA's
  causal flash kernel runs; on the CPU through the engine's own 1K-token blocks);
- `transformers`: `LlamaForCausalLM` (SDPA, DynamicCache) sharing the weight tensors, prefill in one
  forward with `logits_to_keep=1`, then a plain greedy loop;
- `llama.cpp`: `llama-cpp-python` on the same GGUF file with the same thread count, when importable
  (CPU; context capped at the model's trained length).
Also measured in the same run: the weights-only GEMV chain (every linear layer and the LM head once,
batch 1; in a CUDA graph on a GPU) — the decode ceiling.

`shape` builds a random-weight model of a known shape: speed does not depend on the weight values.
A LoLA engine without a trained adapter runs identity feature maps (speed does not depend on them
either). Prompts are random token ids.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from lolachat.adapter import identity_adapter
from lolachat.engine import Timer
from lolachat.lola import ExactLayerMemory, LolaConfig, Rope
from lolachat.model import Llama, ModelMemory, rope_inv_freq
from lolachat.model_args import ModelArgs
from lolachat.quant import quantize_model, quantized_layers, resolve_quant
from lolachat.sampling import SamplingOptions

GREEDY = SamplingOptions(temperature=0.0, top_k=0, top_p=1.0)
ENGINES = ("lola", "exact", "transformers", "llama.cpp")
CPU_LENGTHS = (1024, 4096, 8192, 32768)
GPU_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
QUICK_LENGTHS = (128, 320)
WEIGHTS_NOTE = "random weights: speed does not depend on the weight values"

SHAPES: dict[str, dict] = {
    "llama-3.1-8b": dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336,
                         rope_theta=500000.0, max_position=131072, norm_eps=1e-5,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "smollm2-135m": dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536,
                         rope_theta=100000.0, max_position=8192, tie_embeddings=True),
    "tiny": dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_position=4096),
}


def parse_lengths(text: str) -> list[int]:
    """'1K,4K,8192' -> [1024, 4096, 8192]."""
    out = []
    for part in text.split(","):
        part = part.strip().upper()
        if not part:
            continue
        scale = 1024 if part.endswith("K") else 1
        out.append(int(float(part.rstrip("K")) * scale))
    if not out or min(out) < 1:
        raise ValueError(f"bad lengths {text!r}")
    return out


@dataclass
class BenchConfig:
    model: str | None = None  # alias, Hub id or local path (GGUF or HF folder); or use `shape`
    shape: str | None = None
    device: str = "auto"
    dtype: str | None = None
    lengths: list[int] | None = None
    engines: list[str] = field(default_factory=lambda: list(ENGINES))
    decode_tokens: int = 64
    threads: int | None = None
    chunk: int = 64
    sparse: int = 256
    quick: bool = False
    deadline: float | None = None  # time.monotonic() after which no new measurement starts
    label: str | None = None
    quant: str | None = "none"  # weights of our engines' linear layers (lolachat.quant); peers keep float


# ---------------------------------------------------------------------------------------------- memory


class PeakRss:
    """Peak resident set size of this process while the block runs (sampled every few ms)."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        from lolachat.resources import rss_bytes

        self._read = rss_bytes
        self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._read())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._read())


class Measure(Timer):
    """Seconds (as `Timer`) and peak memory of a block: CUDA max_memory_allocated on a GPU, RSS on the CPU."""

    def __init__(self, device: torch.device):
        super().__init__(device)
        self.peak_bytes = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._rss = PeakRss().__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._rss.__exit__(*exc)
            self.peak_bytes = self._rss.peak


# ---------------------------------------------------------------------------------------------- models


def random_model(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Llama:
    """A Llama of a known shape with random weights, built on the device without a CPU copy."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r} (known: {', '.join(SHAPES)})")
    args = ModelArgs(**SHAPES[shape])
    with torch.device("meta"):
        model = Llama(args)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for module_name, module in model.named_modules():
            for name, p in list(module._parameters.items()):
                if p is None:
                    continue
                data = torch.empty(p.shape, dtype=dtype, device=device)
                if module_name.endswith("norm"):
                    data.fill_(1.0)
                else:
                    data.normal_(0.0, 0.02, generator=gen)
                module._parameters[name] = torch.nn.Parameter(data, requires_grad=False)
    model.rope = Rope(rope_inv_freq(args).to(device))
    return model.eval()


def loaded_model(spec: str, device: torch.device, dtype: torch.dtype) -> tuple[Llama, Path]:
    """The model named by `spec` (alias, Hub id or path) and the weights path it came from."""
    from lolachat import store, weights

    path = Path(spec).expanduser()
    if path.exists():  # a file or folder: no store involved
        path = weights.resolve_model_path(path)
    else:
        path = Path(store.resolve(spec, pull_if_missing=True).weights)
    loaded = weights.load_weights(path)
    model = Llama(loaded.args)
    model.load_weights(loaded.tensors)
    del loaded
    return model.to(device=device, dtype=dtype).eval(), path


def attach_identity(model: Llama, chunk: int, sparse: int) -> LolaConfig:
    """LoLA with identity-initialised maps (F = 2·min(64, D)): the speed of LoLA, not its quality."""
    args = model.args
    adapter = identity_adapter(args, feature_half=min(64, args.head_dim))
    cfg = LolaConfig(chunk=chunk, sparse=sparse, mix="lola", max_distance=max(1, args.max_position // 2),
                     phi_input="pre_rope")
    model.attach_lola(cfg, adapter.layers)
    return cfg


def exact_memory(model: Llama) -> ModelMemory:
    p = next(model.parameters())
    a = model.args
    return ModelMemory([ExactLayerMemory(1, a.n_kv_heads, a.head_dim, p.dtype, p.device) for _ in range(a.n_layers)],
                       None)


def hf_model_sharing(model: Llama):
    """transformers' LlamaForCausalLM (SDPA) whose parameters are this model's tensors (no copy)."""
    import transformers
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    a = model.args
    p = next(model.parameters())
    cfg = transformers.LlamaConfig(
        vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.hidden_dim, num_hidden_layers=a.n_layers,
        num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads, head_dim=a.head_dim,
        max_position_embeddings=a.max_position, rope_theta=a.rope_theta, rope_scaling=a.rope_scaling,
        tie_word_embeddings=a.tie_embeddings, rms_norm_eps=a.norm_eps, attn_implementation="sdpa",
    )
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(cfg)
    state = {k: v for k, v in model.state_dict().items()}
    hf.load_state_dict(state, assign=True, strict=False)
    if a.tie_embeddings:
        hf.lm_head.weight = hf.model.embed_tokens.weight
    with torch.device(p.device):
        hf.model.rotary_emb = LlamaRotaryEmbedding(cfg)
    leftover = [n for n, t in list(hf.named_parameters()) + list(hf.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"transformers model has unloaded tensors: {leftover[:3]}")
    return hf.eval()


def weight_matrices(model: Llama) -> list[torch.Tensor]:
    """Every matrix a decode step reads once, in order (fused q/k/v and gate/up as the GPU engine runs them)."""
    from lolachat.gpu import fuse_projections

    wqkv, w13 = fuse_projections(model)
    out = []
    for i, block in enumerate(model.model.layers):
        out += [wqkv[i], block.self_attn.o_proj.weight, w13[i], block.mlp.down_proj.weight]
    head = model.model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    return out + [head]


def gemv_chain(model: Llama, reps: int = 20) -> dict:
    """Seconds for one batch-1 pass over every weight matrix (in a CUDA graph on a GPU): the ceiling.

    With quantized weights (lolachat.quant) the pass runs the quantized layers themselves, as decode does."""
    if model.quant == "none":
        mats = weight_matrices(model)
        steps = [(functools.partial(F.linear, weight=w), w.shape[1]) for w in mats]
        nbytes = sum(w.numel() * w.element_size() for w in mats)
    else:
        layers = quantized_layers(model)
        steps = [(layer, layer.in_features) for layer in layers]
        nbytes = sum(layer.weight_bytes for layer in layers)
    p = next(model.parameters())
    with torch.inference_mode():
        return _gemv_chain(steps, nbytes, p.device, p.dtype, reps)


def _gemv_chain(steps: list[tuple[Callable, int]], nbytes: int, device: torch.device, dtype: torch.dtype,
                reps: int) -> dict:
    inputs = {k: torch.randn(1, k, device=device, dtype=dtype) for _, k in steps}

    def chain():
        for layer, k in steps:
            layer(inputs[k])

    run = chain
    if device.type == "cuda":
        chain()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            chain()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            chain()
        run = graph.replay
    run()
    times = []
    for _ in range(3):
        with Measure(device) as m:
            for _ in range(reps):
                run()
        times.append(m.seconds / reps)
    seconds = min(times)
    return {"seconds": seconds, "tok_s": 1.0 / seconds, "weight_bytes": nbytes, "gb_s": nbytes / seconds / 1e9,
            "matrices": len(steps), "graph": device.type == "cuda"}


# ---------------------------------------------------------------------------------------------- engines


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class OurEngine:
    """Prefill + greedy decode through `Engine` with a LoLA (static on CUDA) or exact memory."""

    def __init__(self, engine, exact: bool):
        self.engine = engine
        self.exact = exact
        self.memory = None

    def new_memory(self):
        if self.exact:
            return exact_memory(self.engine.model)
        if hasattr(self.memory, "reset"):  # one static memory for the whole run: its graphs stay captured
            self.memory.reset()
            return self.memory
        self.memory = self.engine.new_memory()
        return self.memory

    def run(self, ids: list[int], decode_tokens: int, device: torch.device) -> dict:
        memory = self.new_memory()
        with Measure(device) as pre:
            if self.exact and device.type == "cuda":
                # One forward over the whole prompt: SDPA's causal (flash) kernel, exact attention's best
                # case on a GPU (the engine's 1K blocks would need masks against the growing cache).
                with torch.inference_mode():
                    logits = self.engine.model(torch.tensor([ids], device=device), memory)[0, -1]
            else:
                logits = self.engine.prefill(memory, ids)
        with Measure(device) as dec:
            n = sum(1 for _ in self.engine.generate(memory, logits, decode_tokens, GREEDY))
        stats = self.engine.memory_stats(memory)
        out = {"prefill_s": pre.seconds, "decode_s": dec.seconds, "decode_tokens": n,
               "peak_bytes": max(pre.peak_bytes, dec.peak_bytes), "state_bytes": stats["cache_bytes"],
               "decode_copy_bytes": stats.get("decode_bytes", 0)}
        if hasattr(memory, "graphs"):
            out["graphs"] = sorted(str(k) for k in memory.graphs if not str(k).startswith("error:"))
            errors = {str(k): v for k, v in memory.graphs.items() if str(k).startswith("error:")}
            if errors:
                out["graph_errors"] = errors
            decoder = memory.decoder
            if decoder.graphs and decode_tokens > 1:  # device rate: steps back to back, no host reads
                with Measure(device) as steps:
                    decoder.run_steps(memory, logits, decode_tokens)
                out["decode_steps_tok_s"] = decode_tokens / steps.seconds
        del memory
        return out


class TransformersEngine:
    def __init__(self, model: Llama):
        self.hf = hf_model_sharing(model)
        self.args = model.args

    @torch.inference_mode()
    def run(self, ids: list[int], decode_tokens: int, device: torch.device) -> dict:
        x = torch.tensor([ids], dtype=torch.long, device=device)
        with Measure(device) as pre:
            out = self.hf(input_ids=x, use_cache=True, logits_to_keep=1)
            _sync(device)
        cache = out.past_key_values
        token = out.logits[:, -1:].argmax(dim=-1)
        with Measure(device) as dec:
            for _ in range(decode_tokens):
                out = self.hf(input_ids=token, past_key_values=cache, use_cache=True)
                token = out.logits[:, -1:].argmax(dim=-1)
                int(token)  # the host needs each token, as a chat loop does
        a = self.args
        element = next(self.hf.parameters()).element_size()
        kv = 2 * a.n_layers * a.n_kv_heads * a.head_dim * (len(ids) + decode_tokens) * element
        del out, cache
        return {"prefill_s": pre.seconds, "decode_s": dec.seconds, "decode_tokens": decode_tokens,
                "peak_bytes": max(pre.peak_bytes, dec.peak_bytes), "state_bytes": kv}


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except Exception:
        return False
    return True


class LlamaCppEngine:
    """llama-cpp-python on the GGUF file, CPU, greedy."""

    def __init__(self, gguf: Path, threads: int):
        import llama_cpp

        self.llama_cpp = llama_cpp
        self.gguf = str(gguf)
        self.threads = threads
        probe = llama_cpp.Llama(model_path=self.gguf, n_ctx=64, n_threads=threads, verbose=False, n_gpu_layers=0)
        try:
            self.n_ctx_train = int(probe._model.n_ctx_train())
        except AttributeError:
            self.n_ctx_train = int(next(v for k, v in probe.metadata.items() if k.endswith(".context_length")))
        self.vocab = int(probe.n_vocab())
        del probe

    def _last_logits(self, llm):
        import numpy as np

        pointer = self.llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(self.vocab,))

    def run(self, ids: list[int], decode_tokens: int, device: torch.device) -> dict:
        if len(ids) > self.n_ctx_train:
            raise SkipLength(f"beyond llama.cpp's context ({self.n_ctx_train}, the model's trained length)")
        note = None
        if len(ids) + decode_tokens > self.n_ctx_train:  # at the full context: drop the prompt's first tokens
            ids = ids[len(ids) + decode_tokens - self.n_ctx_train :]
            note = (f"prompt cut to {len(ids)} tokens: with {decode_tokens} decoded it fills the "
                    f"{self.n_ctx_train}-token context")
        with PeakRss() as rss:
            llm = self.llama_cpp.Llama(model_path=self.gguf, n_ctx=len(ids) + decode_tokens + 8, n_batch=512,
                                       n_ubatch=512, n_threads=self.threads, n_threads_batch=self.threads,
                                       n_gpu_layers=0, verbose=False)
            start = time.perf_counter()
            llm.eval(ids)
            prefill = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(decode_tokens):
                token = int(self._last_logits(llm).argmax())
                llm.eval([token])
            decode = time.perf_counter() - start
            del llm
        out = {"prefill_s": prefill, "decode_s": decode, "decode_tokens": decode_tokens, "peak_bytes": rss.peak,
               "state_bytes": None, "prompt_tokens": len(ids)}
        return out | ({"note": note} if note else {})


class SkipLength(Exception):
    pass


# ---------------------------------------------------------------------------------------------- the run


def machine_info(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "device": str(device)}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_bytes"] = props.total_memory
        info["cuda"] = torch.version.cuda
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            pass
    else:
        try:
            with open("/proc/cpuinfo") as f:
                names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
            info["cpu"] = names[0] if names else platform.processor()
        except OSError:
            info["cpu"] = platform.processor()
    return info


def random_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    low = min(16, vocab - 1)
    return torch.randint(low, vocab, (n,), generator=g).tolist()


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict:
    """Measure every engine at every length; returns the JSON-ready result."""
    from lolachat.engine import Engine, EngineInfo, memory_info, resolve_device, resolve_dtype

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    quant = resolve_quant(cfg.quant, device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.set_flush_denormal(True)
    lengths = cfg.lengths or list(QUICK_LENGTHS if cfg.quick else (GPU_LENGTHS if device.type == "cuda"
                                                                      else CPU_LENGTHS))
    decode_tokens = min(cfg.decode_tokens, 8) if cfg.quick else cfg.decode_tokens
    gguf = None
    if cfg.shape:
        model = random_model(cfg.shape, device, dtype)
        label = cfg.label or cfg.shape
        note = WEIGHTS_NOTE
    else:
        model, source = loaded_model(cfg.model or "smollm2-135m", device, dtype)
        gguf = source if source.suffix == ".gguf" else None
        label = cfg.label or (source.stem if source.is_file() else source.name)
        note = "the model's own weights (dequantized) in " + str(dtype).removeprefix("torch.")
    lola_cfg = attach_identity(model, cfg.chunk, cfg.sparse)
    info = EngineInfo(model=label, source="bench", weights_sha256="", mode="lola-identity", device=str(device),
                      dtype=str(dtype).removeprefix("torch."), **memory_info(lola_cfg), quant=quant)
    engine = Engine(model, None, info, stop_ids=[])
    threads = torch.get_num_threads()
    result = {
        "label": label, "note": note, "machine": machine_info(device), "dtype": info.dtype, "quant": quant,
        "lola": {"chunk": lola_cfg.chunk, "sparse": lola_cfg.sparse, "feature_maps": "identity (speed only)",
                 "graphs": device.type == "cuda" and os.environ.get("LOLACHAT_GRAPHS", "1") != "0"},
        "lengths": lengths, "decode_tokens": decode_tokens, "prompt": "random token ids, greedy decode",
        "results": [], "notices": [],
    }
    log(f"bench {label} on {device} ({info.dtype}, quant {quant}, {threads} threads): {note}")

    if quant == "none":  # fuse q/k/v and gate/up before the transformers peer shares the weights: one copy
        from lolachat.gpu import fuse_projections

        fuse_projections(model)
    runners: dict[str, object] = {}
    for name in cfg.engines:
        try:
            if name == "lola":
                runners[name] = OurEngine(engine, exact=False)
            elif name == "exact":
                runners[name] = OurEngine(engine, exact=True)
            elif name == "transformers":
                runners[name] = TransformersEngine(model)
            elif name == "llama.cpp":
                if device.type != "cpu":
                    result["notices"].append("llama.cpp: CPU only here, skipped on " + str(device))
                elif gguf is None:
                    result["notices"].append("llama.cpp: needs a GGUF model, skipped")
                elif not llama_cpp_available():
                    result["notices"].append("llama.cpp: llama-cpp-python is not importable, skipped")
                else:
                    runners[name] = LlamaCppEngine(gguf, threads)
            else:
                result["notices"].append(f"unknown engine {name!r}, skipped")
        except Exception as err:
            result["notices"].append(f"{name}: could not start ({type(err).__name__}: {err})")
    for message in result["notices"]:
        log("  " + message)
    quantize_model(model, quant)  # after the transformers peer took its share of the float weights

    try:
        result["gemv_chain"] = gemv_chain(model)
        g = result["gemv_chain"]
        log(f"  weights-only GEMV chain: {g['seconds'] * 1e3:.3f} ms = {g['tok_s']:.1f} tok/s "
            f"({g['gb_s']:.2f} GB/s over {g['weight_bytes'] / 2**20:.1f} MiB)")
    except Exception as err:  # keep measuring the engines
        result["gemv_chain"] = {"error": f"{type(err).__name__}: {err}"}
        log(f"  GEMV chain failed: {err}")

    _warm_up(runners, model.args.vocab_size, device, cfg, log)
    spent: dict[str, tuple[int, float]] = {}
    failed: set[str] = set()
    for length in lengths:
        ids = random_ids(length, model.args.vocab_size, seed=length)
        for name, runner in runners.items():
            row = {"engine": name, "length": length}
            if name in failed:
                row["skipped"] = "failed at a shorter length"
            elif cfg.deadline is not None and not _fits(spent.get(name), length, name, cfg.deadline):
                row["skipped"] = "time cap"
            else:
                try:
                    row.update(runner.run(ids, decode_tokens, device))
                    spent[name] = (length, row["prefill_s"] + row["decode_s"])
                except SkipLength as why:
                    row["skipped"] = str(why)
                except Exception as err:
                    row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
                    failed.add(name)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            _derive(row, result.get("gemv_chain", {}))
            result["results"].append(row)
            log("  " + format_row(row))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def _warm_up(runners: dict, vocab: int, device: torch.device, cfg: BenchConfig, log) -> None:
    """Compile kernels and capture graphs outside the timings: a prompt long enough to reach the steady
    state (sparse cache full) plus a block and the smaller blocks of a prompt's tail, and enough decode steps
    to evict once."""
    from lolachat.gpu import PREFILL_BLOCK, SMALLER_BLOCKS

    c, lam = cfg.chunk, cfg.sparse
    if device.type == "cuda":
        n = (lam // c + 3) * c + PREFILL_BLOCK + sum(SMALLER_BLOCKS) * c + 7
        steps = c + 2
    else:
        n, steps = 2 * c + 3, 2
    ids = random_ids(n, vocab, seed=1)
    for name, runner in runners.items():
        if name in ("lola", "exact", "transformers"):
            try:
                runner.run(ids, steps, device)
            except Exception as err:
                log(f"  warm-up of {name} failed: {type(err).__name__}: {err}")


def _fits(previous: tuple[int, float] | None, length: int, name: str, deadline: float) -> bool:
    if previous is None:
        return time.monotonic() < deadline
    last_length, seconds = previous
    growth = length / last_length
    estimate = seconds * (growth if name == "lola" else growth**1.5)
    return time.monotonic() + estimate < deadline


def _derive(row: dict, gemv: dict) -> None:
    if "prefill_s" not in row:
        return
    prompt = row.get("prompt_tokens", row["length"])
    row["prefill_tok_s"] = prompt / row["prefill_s"] if row["prefill_s"] else None
    row["decode_tok_s"] = row["decode_tokens"] / row["decode_s"] if row["decode_s"] else None
    if gemv.get("tok_s") and row["decode_tok_s"]:
        row["decode_vs_gemv"] = row["decode_tok_s"] / gemv["tok_s"]


def _fmt(x, spec: str, missing: str = "—") -> str:
    return missing if x is None else format(x, spec)


def format_row(row: dict) -> str:
    head = f"{row['engine']:<13} {row['length']:>7}"
    if "skipped" in row:
        return f"{head}  skipped: {row['skipped']}"
    if "error" in row:
        return f"{head}  error: {row['error']}"
    mib = 2**20
    state = row.get("state_bytes")
    extra = f"  steps {row['decode_steps_tok_s']:.0f} tok/s" if row.get("decode_steps_tok_s") else ""
    return (f"{head}  prefill {row['prefill_tok_s']:>9.1f} tok/s  decode {_fmt(row['decode_tok_s'], '>8.1f')} tok/s"
            f"  peak {row['peak_bytes'] / mib:>8.0f} MiB  state {_fmt(state and state / mib, '>7.1f')} MiB{extra}")


def table(result: dict) -> str:
    """A plain-text table of one run (markdown-compatible)."""
    gemv = result.get("gemv_chain", {})
    lines = [f"### {result['label']} — {result['machine'].get('gpu') or result['machine'].get('cpu', '')}, "
             f"{result['dtype']}, quant {result.get('quant', 'none')}, {result['machine']['threads']} threads "
             f"({result['note']})"]
    if gemv.get("tok_s"):
        lines.append(f"GEMV-chain ceiling: {gemv['tok_s']:.1f} tok/s ({gemv['gb_s']:.1f} GB/s)")
    lines.append("| engine | context | prefill tok/s | decode tok/s | decode / GEMV | peak MiB | state MiB |")
    lines.append("|---|---|---|---|---|---|---|")
    for row in result["results"]:
        if "prefill_s" not in row:
            why = row.get("skipped") or row.get("error", "")
            lines.append(f"| {row['engine']} | {row['length']} | — | — | — | — | {why} |")
            continue
        state = row.get("state_bytes")
        lines.append(
            f"| {row['engine']} | {row['length']} | {row['prefill_tok_s']:.1f} | {_fmt(row['decode_tok_s'], '.1f')} | "
            f"{_fmt(row.get('decode_vs_gemv'), '.2f')} | {row['peak_bytes'] / 2**20:.0f} | "
            f"{_fmt(state and state / 2**20, '.1f')} |")
    lines += [f"- {row['engine']} at {row['length']}: {row['note']}" for row in result["results"] if row.get("note")]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> str | None:
    """Tok/s and peak memory against context length; returns a notice instead when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    rows = [r for r in result["results"] if "prefill_s" in r]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    panels = (("prefill_tok_s", "prefill tok/s"), ("decode_tok_s", "decode tok/s"), ("peak_bytes", "peak MiB"))
    for ax, (key, title) in zip(axes, panels):
        for engine in dict.fromkeys(r["engine"] for r in rows):
            pts = [(r["length"], r[key]) for r in rows if r["engine"] == engine and r.get(key)]
            if key == "peak_bytes":
                pts = [(x, y / 2**20) for x, y in pts]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=engine)
        if key == "decode_tok_s" and result.get("gemv_chain", {}).get("tok_s"):
            ax.axhline(result["gemv_chain"]["tok_s"], color="grey", linestyle="--", label="GEMV-chain ceiling")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['label']} on {result['machine'].get('gpu') or result['machine'].get('cpu', '')} "
                 f"({result['note']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def save(result: dict, out_dir: Path, stem: str | None = None) -> tuple[Path, Path | None, str | None]:
    """Write <stem>.json and <stem>.png into out_dir; returns the paths and a plot notice (or None)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or "bench_" + "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in result["label"])
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(result, indent=1, default=_json_default))
    png_path = out_dir / f"{stem}.png"
    notice = plot(result, png_path)
    return json_path, (None if notice else png_path), notice


def _json_default(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if hasattr(x, "__dataclass_fields__"):
        return asdict(x)
    return str(x)
