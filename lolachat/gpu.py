"""Static-shape LoLA memory and a CUDA-graph decoder (DESIGN §5).

LoLA's memory is bounded, so every buffer of a conversation can be allocated once: per layer the
window [B,Hkv,2C,D] (pre-RoPE keys), the sparse cache [B,H,λ,D] with positions, the eviction scratch
[B,H,λ+C,D] and the fp32 linear state H, s. The positions the kernels need (the query's position, the
window's first position, the sparse fill) live in one-element device tensors, so the decode step —
embedding, every layer through `ops.lola_attention`, logits and the choice of the next token — has
static shapes and is captured in one CUDA graph whose replay feeds the token it produced last time.
Eviction (once per C tokens) is its own graph once the sparse cache is full; the first evictions,
which append, run eagerly. Prefill runs chunk by chunk: eagerly until the memory reaches that steady
state, then whole blocks of chunks (projections, attention, eviction of every layer) as one graph: 1,024
tokens' worth, and for a prompt's last whole chunks blocks of 4 and 1 chunks (`SMALLER_BLOCKS`).

The same code runs on the CPU with the PyTorch reference ops and no capture (`graphs=False`): the
tests check it against the CPU engine (`LolaAttention`). Exact attention on a GPU stays on the eager
model path.

Host and device counters: every layer keeps host mirrors (window_start, window_len, has_prev, sparse
fill, folded, evictions) because eager prefill walks layer by layer; the shared device counters
(`StaticMemory.q_pos`, `.window_start`, `.sparse_len`) are written from layer 0's mirrors before any
graph runs (`sync_counters`) and then advance inside the graphs, while the host advances the mirrors
by the same rule.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from lolachat.kernels import ops
from lolachat.kernels.reference import Recency
from lolachat.lola import LolaConfig
from lolachat.model import Llama, ModelMemory
from lolachat.sampling import SamplingOptions

PREFILL_BLOCK = 1024  # tokens per prefill forward (eager) and per block graph (rounded to chunks)
SMALLER_BLOCKS = (4, 1)  # chunks per block graph for a prompt's last whole chunks (below a full block)
ProgressFn = Callable[[int, int], None]


def graphs_wanted(device: torch.device) -> bool:
    """CUDA graphs on CUDA unless LOLACHAT_GRAPHS=0."""
    return device.type == "cuda" and os.environ.get("LOLACHAT_GRAPHS", "1") != "0"


def static_wanted(device: torch.device) -> bool:
    """Whether an engine uses the static memory: on CUDA by default; LOLACHAT_STATIC=1/0 forces it on/off."""
    forced = os.environ.get("LOLACHAT_STATIC")
    if forced in ("0", "1"):
        return forced == "1"
    return device.type == "cuda"


class StaticLayer:
    """One layer's LoLA memory in fixed-size buffers; reads like `LolaLayerMemory` for stats and sessions."""

    exact = False

    def __init__(self, cfg: LolaConfig, n_heads: int, n_kv_heads: int, buffers: dict[str, torch.Tensor]):
        """`buffers`: this layer's tensors, by the names of `buffer_shapes` (views of `StaticMemory.stacks`)."""
        self.cfg = cfg
        # group selection keeps one set per KV-head group; here every query head holds its copy of it
        self.group = n_heads // n_kv_heads if cfg.selection == "group" else 1
        for name, tensor in buffers.items():
            setattr(self, name, tensor)
        self.window_start = 0
        self.window_len = 0
        self.has_prev = False
        self.n_sparse = 0
        self.folded = 0
        self.evictions = 0

    @staticmethod
    def buffer_shapes(cfg: LolaConfig, batch: int, n_heads: int, n_kv_heads: int, head_dim: int, feature_dim: int,
                      dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of a layer's buffers: the window (previous + current chunk), the sparse cache,
        eviction's candidate scratch (sparse cache + the chunk leaving the window) and the fp32 state."""
        c, lam, b, h, d = cfg.chunk, cfg.sparse, batch, n_heads, head_dim
        return {
            "window_k": ((b, n_kv_heads, 2 * c, d), dtype), "window_v": ((b, n_kv_heads, 2 * c, d), dtype),
            "sparse_k_buf": ((b, h, lam, d), dtype), "sparse_v_buf": ((b, h, lam, d), dtype),
            "sparse_pos_buf": ((b, h, lam), torch.long),
            "cand_k": ((b, h, lam + c, d), dtype), "cand_v": ((b, h, lam + c, d), dtype),
            "cand_pos": ((b, h, lam + c), torch.long),
            "h": ((b, h, feature_dim, d), torch.float32), "s": ((b, h, feature_dim), torch.float32),
        }

    # -- what LolaLayerMemory offers ------------------------------------------------------------
    @property
    def sparse_len(self) -> int:
        return self.n_sparse

    @property
    def sparse_k(self) -> torch.Tensor:
        return self.sparse_k_buf[:, :, : self.n_sparse]

    @property
    def sparse_v(self) -> torch.Tensor:
        return self.sparse_v_buf[:, :, : self.n_sparse]

    @property
    def sparse_pos(self) -> torch.Tensor:
        return self.sparse_pos_buf[:, :, : self.n_sparse]

    @property
    def current_len(self) -> int:
        return self.window_len - (self.cfg.chunk if self.has_prev else 0)

    def tokens(self) -> int:
        return self.window_len + self.n_sparse + self.folded

    def nbytes(self) -> dict[str, int]:
        """Bytes held (fixed from the start): window, sparse cache with its eviction scratch, state."""
        window = self.window_k.nbytes + self.window_v.nbytes
        sparse = sum(t.nbytes for t in (self.sparse_k_buf, self.sparse_v_buf, self.sparse_pos_buf,
                                        self.cand_k, self.cand_v, self.cand_pos))
        return {"window": window, "sparse": sparse, "state": self.h.nbytes + self.s.nbytes}

    _COUNTERS = ("window_start", "window_len", "has_prev", "folded", "evictions")

    def tensors(self) -> dict[str, torch.Tensor]:
        """The same tensors as `LolaLayerMemory.tensors()`, so sessions move between engines."""
        heads = slice(None, None, self.group)  # with group selection: one copy per KV head
        out = {"window_k": self.window_k, "window_v": self.window_v, "sparse_k": self.sparse_k[:, heads],
               "sparse_v": self.sparse_v[:, heads], "sparse_pos": self.sparse_pos[:, heads], "h": self.h,
               "s": self.s}
        out["counters"] = torch.tensor([int(getattr(self, n)) for n in self._COUNTERS], dtype=torch.long)
        return out

    def load(self, tensors: dict[str, torch.Tensor], rope=None) -> None:
        """Copy a saved state into the buffers in place (captured graphs keep pointing at them)."""
        n = tensors["sparse_k"].shape[2]
        if n > self.sparse_k_buf.shape[2]:
            room = self.sparse_k_buf.shape[2]
            raise ValueError(f"saved sparse cache holds {n} pairs, this memory has room for {room}")
        self.window_k.copy_(tensors["window_k"])
        self.window_v.copy_(tensors["window_v"])
        for buf, name in ((self.sparse_k_buf, "sparse_k"), (self.sparse_v_buf, "sparse_v"),
                          (self.sparse_pos_buf, "sparse_pos")):
            saved = tensors[name]
            if saved.shape[1] * self.group != buf.shape[1]:
                raise ValueError(f"saved sparse cache has {saved.shape[1]} heads; this memory's selection "
                                 f"({self.cfg.selection}) needs {buf.shape[1] // self.group}")
            buf[:, :, :n].copy_(saved.repeat_interleave(self.group, dim=1))
        self.h.copy_(tensors["h"])
        self.s.copy_(tensors["s"])
        self.n_sparse = n
        for name, value in zip(self._COUNTERS, tensors["counters"].tolist()):
            setattr(self, name, bool(value) if name == "has_prev" else int(value))

    def buffers(self) -> list[torch.Tensor]:
        return [self.window_k, self.window_v, self.sparse_k_buf, self.sparse_v_buf, self.sparse_pos_buf,
                self.cand_k, self.cand_v, self.cand_pos, self.h, self.s]


class StaticMemory(ModelMemory):
    """All layers' static memory plus the device-side counters and the step's static inputs/outputs."""

    def __init__(self, decoder: StaticDecoder, stacks: dict[str, torch.Tensor], batch: int):
        """`stacks`: each kind of layer buffer for all layers in one tensor [L, B, ...] (layer i's is stack[i])."""
        layers = [StaticLayer(decoder.cfg, decoder.n_heads, decoder.n_kv_heads,
                              {name: stack[i] for name, stack in stacks.items()}) for i in range(len(decoder.blocks))]
        super().__init__(layers, decoder.cfg)
        device = decoder.device
        self.decoder = decoder
        self.stacks = stacks
        self.batch = batch
        self.q_pos = torch.zeros(1, dtype=torch.long, device=device)
        self.window_start = torch.zeros(1, dtype=torch.long, device=device)
        self.sparse_len = torch.zeros(1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        on_gpu = device.type == "cuda"  # generate's asynchronous read of the token: pinned once, here
        self.token_host = torch.zeros(batch, dtype=torch.long, pin_memory=on_gpu)
        self.token_copied = torch.cuda.Event() if on_gpu else None
        self.logits = torch.zeros(batch, decoder.vocab, dtype=torch.float32, device=device)
        self.attn_out = torch.zeros(batch, decoder.n_heads, 1, decoder.head_dim, dtype=decoder.dtype, device=device)
        self.q_out = torch.zeros(batch, 1, decoder.n_heads * decoder.head_dim, dtype=decoder.dtype, device=device)
        self.mlp_act = torch.zeros(batch, 1, decoder.args.hidden_dim, dtype=decoder.dtype, device=device)
        self.temperature = torch.ones(1, dtype=torch.float32, device=device)
        self.top_p = torch.ones(1, dtype=torch.float32, device=device)
        self.generator = None if device.type == "cuda" else torch.Generator(device=device)
        self.block_tokens: dict[int, torch.Tensor] = {}  # chunks per block -> that block graph's token input
        self.graphs: dict = {}
        self.graph_errors: list = []

    def forward(self, tokens: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """What `Llama.forward(tokens, memory)` does, for this memory (eagerly)."""
        return self.decoder.forward_eager(self, tokens, all_logits)

    def steady(self) -> bool:
        """At a chunk boundary with a previous chunk and a full sparse cache: what the block graph assumes."""
        c, lam = self.decoder.cfg.chunk, self.decoder.cfg.sparse
        return all(layer.has_prev and layer.window_len == c and layer.n_sparse == lam for layer in self.layers)

    def sync_counters(self) -> None:
        layer = self.layers[0]
        self.q_pos.fill_(self.position)
        self.window_start.fill_(layer.window_start)
        self.sparse_len.fill_(layer.n_sparse)

    @torch.no_grad()
    def reset(self) -> None:
        """Forget everything (in place: captured graphs stay valid)."""
        for layer in self.layers:
            layer.h.zero_()
            layer.s.zero_()
            layer.window_start = layer.window_len = layer.n_sparse = layer.folded = layer.evictions = 0
            layer.has_prev = False
        self.position = 0
        self.sync_counters()

    def buffers(self) -> list[torch.Tensor]:
        out = [self.q_pos, self.window_start, self.sparse_len, self.slot, self.token, self.logits]
        for layer in self.layers:
            out += layer.buffers()
        return out


class StaticDecoder:
    """Runs a LoLA `Llama` over `StaticMemory`: eager general steps, and graphs for the static ones."""

    def __init__(self, model: Llama, graphs: bool | None = None):
        if model.lola_config is None:
            raise ValueError("the static decoder needs a model with LoLA attention attached")
        self.model = model
        self.cfg: LolaConfig = model.lola_config
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.graphs = graphs_wanted(self.device) if graphs is None else graphs
        if self.graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA model")
        a = model.args
        self.args = a
        self.n_heads, self.n_kv_heads, self.head_dim = a.n_heads, a.n_kv_heads, a.head_dim
        self.group = a.n_heads // a.n_kv_heads
        self.vocab = a.vocab_size
        self.scale = 1.0 / math.sqrt(a.head_dim)
        self.inv_freq = model.rope.inv_freq.to(self.device).float()
        self.blocks = list(model.model.layers)
        self.attn = [b.self_attn.lola for b in self.blocks]
        self.gamma = [lola.gamma.to(self.device).float().contiguous() for lola in self.attn]
        self.phi_q = [lola.adapter.phi_q.to(self.device).contiguous() for lola in self.attn]
        self.phi_k = [lola.adapter.phi_k.to(self.device).contiguous() for lola in self.attn]
        self.phi_k_stacked = torch.cat(self.phi_k)  # [L·H, D, F/2]: the maps of all layers' heads, in order
        self.wqkv, self.w13 = fuse_projections(model)
        self.arange_c = torch.arange(self.cfg.chunk, device=self.device)
        c = self.cfg.chunk
        self.block_chunks = max(1, PREFILL_BLOCK // c)
        self.block_len = self.block_chunks * c
        # Block graphs of these many chunks, largest first: a prompt's tail of whole chunks runs in graphs too.
        self.block_sizes = sorted({self.block_chunks, *(k for k in SMALLER_BLOCKS if k < self.block_chunks)},
                                  reverse=True)
        self.arange_block = torch.arange(self.block_chunks, device=self.device) * c
        self.block_body_eager = False  # run the block body without a graph (CPU tests of the graph path)

    # -- memory ---------------------------------------------------------------------------------
    @torch.no_grad()
    def new_memory(self, batch: int = 1) -> StaticMemory:
        feature_dim = 2 * self.phi_q[0].shape[-1]
        shapes = StaticLayer.buffer_shapes(self.cfg, batch, self.n_heads, self.n_kv_heads, self.head_dim,
                                           feature_dim, self.dtype)
        stacks = {name: torch.zeros(len(self.blocks), *shape, dtype=dtype, device=self.device)
                  for name, (shape, dtype) in shapes.items()}
        return StaticMemory(self, stacks, batch)

    # -- pieces of the forward pass ----------------------------------------------------------------
    def _qkv(self, i: int, x: torch.Tensor):
        b, t, _ = x.shape
        h, hkv, d = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = F.linear(x, self.wqkv[i])
        q, k, v = qkv.split([h * d, hkv * d, hkv * d], dim=-1)
        return (q.view(b, t, h, d).transpose(1, 2), k.view(b, t, hkv, d).transpose(1, 2),
                v.view(b, t, hkv, d).transpose(1, 2))

    def _attention(self, mem: StaticMemory, i: int, q, q_pos, window_start, sparse_len, out=None):
        layer = mem.layers[i]
        cfg = self.cfg
        return ops.lola_attention(q, q_pos, layer.window_k, layer.window_v, window_start, layer.sparse_k_buf,
                                  layer.sparse_v_buf, layer.sparse_pos_buf, layer.h, layer.s, self.gamma[i],
                                  self.phi_q[i], self.inv_freq, self.scale, cfg.mix, cfg.max_distance,
                                  cfg.phi_input, sparse_len=sparse_len, out=out)

    def _layers(self, x: torch.Tensor, attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor],
                                                        torch.Tensor]) -> torch.Tensor:
        """Every layer over the residual stream x [B,T,dim] (updated in place); `attend(i, q, k, v)` gives
        layer i's attention output [B,H,T,D]. Returns the final norm of x. Each residual add runs fused
        with the norm after it: between the GEMVs a layer launches two norm kernels and one SiLU kernel."""
        norms = [b.input_layernorm for b in self.blocks] + [self.model.model.norm]
        h = ops.rms_norm(x, norms[0].weight, norms[0].eps)
        for i, block in enumerate(self.blocks):
            y = attend(i, *self._qkv(i, h))
            b, _, t, _ = y.shape
            post = block.post_attention_layernorm
            h = ops.add_rms_norm(x, block.self_attn.o_proj(y.transpose(1, 2).reshape(b, t, -1)), post.weight,
                                 post.eps)
            down = block.mlp.down_proj(ops.silu_mul(F.linear(h, self.w13[i])))
            h = ops.add_rms_norm(x, down, norms[i + 1].weight, norms[i + 1].eps)
        return h

    def _head_weight(self) -> torch.Tensor:
        m = self.model
        return m.model.embed_tokens.weight if m.lm_head is None else m.lm_head.weight

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits (fp32) from the final-normed hidden states."""
        return F.linear(h, self._head_weight()).float()

    def _put_expanded(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """dst [B,H,N,D] (or [B,H,N]) view <- src [B,Hkv,N,D] with each KV head repeated for its group."""
        b, hkv = src.shape[:2]
        dst.unflatten(1, (hkv, self.group)).copy_(src.unsqueeze(2).expand(b, hkv, self.group, *src.shape[2:]))

    def _evict(self, mem: StaticMemory, i: int, n: int, start, next_kv=None) -> int:
        """Window slots [0, C) (positions start..start+C−1) leave the window: append them to the sparse
        cache, or let them compete with it (DESIGN §4.4); then shift the window, and put `next_kv` (the next
        chunk's keys and values, if given) into its second half. `n` is the sparse fill before (host int);
        `start` an int or a one-element device tensor. Returns the tokens folded."""
        layer = mem.layers[i]
        c, lam = self.cfg.chunk, self.cfg.sparse
        folded = 0
        if n + c <= lam:  # room left: append (the first evictions, eager)
            b, h = layer.h.shape[:2]
            self._put_expanded(layer.sparse_k_buf[:, :, n : n + c], layer.window_k[:, :, :c])
            self._put_expanded(layer.sparse_v_buf[:, :, n : n + c], layer.window_v[:, :, :c])
            layer.sparse_pos_buf[:, :, n : n + c].copy_((self.arange_c + start).expand(b, h, c))
        else:
            m = n + c
            ops.assemble_candidates(layer.sparse_k_buf, layer.sparse_v_buf, layer.sparse_pos_buf, n, layer.window_k,
                                    layer.window_v, start, layer.cand_k, layer.cand_v, layer.cand_pos)
            cand = layer.cand_k, layer.cand_v, layer.cand_pos
            if lam:  # compete; keep the winners, shift the window and append the next chunk
                ops.compete_and_keep(cand, m, layer.h, layer.s, self.phi_k[i], lam, self.inv_freq, self.cfg.phi_input,
                                     (layer.sparse_k_buf, layer.sparse_v_buf, layer.sparse_pos_buf), layer.window_k,
                                     layer.window_v, *(next_kv or (None, None)), group=layer.group,
                                     score=self.cfg.score, fade=self.cfg.state_fade(),
                                     recency=self.cfg.recency(i, layer.group))
                return m - lam
            ops.evict_compete(*(t[:, :, :m] for t in cand), layer.h, layer.s, self.phi_k[i], lam, self.inv_freq,
                              self.cfg.phi_input, fade=self.cfg.state_fade())  # λ = 0: every pair folds
            folded = m
        layer.window_k[:, :, :c].copy_(layer.window_k[:, :, c:])
        layer.window_v[:, :, :c].copy_(layer.window_v[:, :, c:])
        if next_kv is not None:
            layer.window_k[:, :, c:].copy_(next_kv[0])
            layer.window_v[:, :, c:].copy_(next_kv[1])
        return folded

    def _close_chunk_host(self, layer: StaticLayer, folded: int) -> None:
        """Host mirrors after an eviction of the previous chunk."""
        c, lam = self.cfg.chunk, self.cfg.sparse
        layer.n_sparse = min(layer.n_sparse + c, lam)
        layer.folded += folded
        layer.evictions += 1
        layer.window_start += c
        layer.window_len -= c

    # -- eager, any state -----------------------------------------------------------------------------
    @torch.inference_mode()
    def forward_eager(self, mem: StaticMemory, tokens: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Feed tokens [B,T] after what `mem` has seen; logits [B, T or 1, vocab] fp32 (as Llama.forward)."""
        x = self.model.model.embed_tokens(tokens.to(self.device))
        pos0 = mem.position
        h = self._layers(x, lambda i, q, k, v: self._attend_eager(mem, i, q, k, v, pos0))
        mem.position += tokens.shape[1]
        return self._head(h if all_logits else h[:, -1:])

    def _attend_eager(self, mem: StaticMemory, i: int, q, k, v, pos0: int) -> torch.Tensor:
        """As `LolaAttention.attend`: the tokens split at chunk boundaries, host ints everywhere."""
        layer = mem.layers[i]
        c = self.cfg.chunk
        total = q.shape[2]
        outputs = []
        t = 0
        while t < total:
            n = min(c - layer.current_len, total - t)
            end = layer.window_len + n
            layer.window_k[:, :, layer.window_len : end] = k[:, :, t : t + n]
            layer.window_v[:, :, layer.window_len : end] = v[:, :, t : t + n]
            layer.window_len = end
            outputs.append(self._attention(mem, i, q[:, :, t : t + n], pos0 + t, layer.window_start,
                                           layer.n_sparse))
            if layer.current_len == c:
                if layer.has_prev:
                    folded = self._evict(mem, i, layer.n_sparse, layer.window_start)
                    self._close_chunk_host(layer, folded)
                layer.has_prev = True
            t += n
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)

    # -- the static steps (graph bodies) -------------------------------------------------------------
    def _decode_body(self, mem: StaticMemory, sample_key: tuple) -> None:
        """One token: mem.token -> every layer -> mem.logits -> next token into mem.token; q_pos += 1.
        Five launches per layer: each GEMV takes in the norm before it (and the window write of k and v),
        the SiLU·mul after it, or the residual add after it (`ops.norm_qkv`, `norm_linear`, `linear_add`)."""
        torch.sub(mem.q_pos, mem.window_start, out=mem.slot)
        b, h, d = mem.batch, self.n_heads, self.head_dim
        x = self.model.model.embed_tokens(mem.token)  # the residual stream [B,1,dim], updated in place
        q = mem.q_out.view(b, 1, h, d).transpose(1, 2)
        for i, block in enumerate(self.blocks):
            layer, norm, post = mem.layers[i], block.input_layernorm, block.post_attention_layernorm
            ops.norm_qkv(x, norm.weight, norm.eps, self.wqkv[i], mem.q_out, layer.window_k, layer.window_v, mem.slot)
            y = self._attention(mem, i, q, mem.q_pos, mem.window_start, mem.sparse_len, out=mem.attn_out)
            ops.linear_add(y.transpose(1, 2).reshape(b, 1, h * d), block.self_attn.o_proj.weight, x)
            ops.norm_linear(x, post.weight, post.eps, self.w13[i], silu=True, out=mem.mlp_act)
            ops.linear_add(mem.mlp_act, block.mlp.down_proj.weight, x)
        final = self.model.model.norm
        ops.norm_linear(x, final.weight, final.eps, self._head_weight(), out=mem.logits.view(b, 1, -1))
        self._sample_body(mem, sample_key)
        mem.q_pos.add_(1)

    def _evict_body(self, mem: StaticMemory) -> None:
        """Every layer evicts its previous chunk against a full sparse cache (the steady state). The layers'
        evictions are independent, so at batch 1 they run together: all layers' buffers read as one memory
        of L·H heads, one launch per eviction kernel instead of one per layer (with the default score; the
        others need every candidate's φ, which for all layers at once would be a large scratch)."""
        if mem.batch == 1 and self.cfg.sparse and self.cfg.score == "error":
            self._evict_all_layers(mem)
        else:
            for i in range(len(self.blocks)):
                self._evict(mem, i, self.cfg.sparse, mem.window_start)
        mem.window_start.add_(self.cfg.chunk)

    def _evict_all_layers(self, mem: StaticMemory) -> None:
        """`_evict` of every layer at once (batch 1, full sparse cache, λ ≥ 1): [L, 1, H, ...] stacks viewed as
        [1, L·H, ...]; each head's φ_k is its layer's (self.phi_k_stacked). φ is recomputed in the fold rather
        than stored for all L·H·(λ+C) candidates (a 44 MB scratch on SmolLM2, for a step paid once a chunk)."""
        st, lam = mem.stacks, self.cfg.sparse

        def heads(name: str) -> torch.Tensor:
            t = st[name]
            return t.view(1, t.shape[0] * t.shape[2], *t.shape[3:])

        window_k, window_v = heads("window_k"), heads("window_v")
        sparse = heads("sparse_k_buf"), heads("sparse_v_buf"), heads("sparse_pos_buf")
        cand = heads("cand_k"), heads("cand_v"), heads("cand_pos")
        h_state, s_state = heads("h"), heads("s")
        ops.assemble_candidates(*sparse, lam, window_k, window_v, mem.window_start, *cand)
        keep = ops.evict_compete(*cand, h_state, s_state, self.phi_k_stacked, lam, self.inv_freq, self.cfg.phi_input,
                                 group=mem.layers[0].group, store_phi=False, fade=self.cfg.state_fade(),
                                 recency=self._all_layers_recency(mem.layers[0].group))
        ops.keep_and_shift(*cand, keep, *sparse, window_k, window_v)

    def _all_layers_recency(self, group: int) -> Recency:
        """cfg.recency for the [1, L·H] view of every layer's heads: layer i's head h is head i·H + h."""
        exempt = tuple(i * self.n_heads + h for i in range(len(self.blocks)) for h in self.cfg.exempt_heads(i, group))
        return self.cfg.recency(exempt=exempt)

    def _block_body(self, mem: StaticMemory, kc: int) -> None:
        """A block of kc whole chunks from the steady state: every layer, every chunk, every eviction."""
        c = self.cfg.chunk
        starts = mem.window_start + self.arange_block[:kc]  # window start while chunk j is current [K]
        q_positions = starts.unsqueeze(1) + c + self.arange_c  # [K, C]

        def attend(i, q, k, v):
            layer = mem.layers[i]
            y = torch.empty_like(q)
            layer.window_k[:, :, c:].copy_(k[:, :, :c])  # the first chunk; each eviction appends the next
            layer.window_v[:, :, c:].copy_(v[:, :, :c])
            for j in range(kc):
                part, after = slice(j * c, (j + 1) * c), slice((j + 1) * c, (j + 2) * c)
                start = starts[j : j + 1]
                self._attention(mem, i, q[:, :, part], q_positions[j], start, mem.sparse_len, out=y[:, :, part])
                self._evict(mem, i, self.cfg.sparse, start, (k[:, :, after], v[:, :, after]) if j + 1 < kc else None)
            return y

        h = self._layers(self.model.model.embed_tokens(mem.block_tokens[kc]), attend)
        mem.logits.copy_(self._head(h[:, -1:])[:, -1])
        mem.window_start.add_(kc * c)
        mem.q_pos.add_(kc * c)

    def _sample_body(self, mem: StaticMemory, key: tuple) -> None:
        """mem.logits -> mem.token: argmax, or temperature/top-k/top-p by the race argmax(p / Exp(1))."""
        logits = mem.logits
        if key[0] == "greedy":
            ops.argmax_into(logits, mem.token)
            return
        _, top_k, use_top_p = key
        scores = logits / mem.temperature
        if top_k:
            kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if use_top_p:
            sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
            p_sorted = torch.softmax(sorted_scores, dim=-1)
            outside = (p_sorted.cumsum(dim=-1) - p_sorted) >= mem.top_p
            drop = torch.zeros_like(outside).scatter_(-1, order, outside)
            scores = scores.masked_fill(drop, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        race = torch.empty_like(probs).exponential_(generator=mem.generator).clamp_min_(1e-30)
        mem.token.copy_((probs / race).argmax(dim=-1, keepdim=True))

    # -- graphs ------------------------------------------------------------------------------------------
    def _run(self, mem: StaticMemory, name, body: Callable[[], None]) -> None:
        """Replay the graph `name` of `mem` (capturing it on first use), or run `body` eagerly."""
        if not self.graphs or name in mem.graph_errors:
            body()
            return
        graph = mem.graphs.get(name)
        if graph is None:
            graph = self._capture(mem, name, body)
            if graph is None:
                body()
                return
        graph.replay()

    def _capture(self, mem: StaticMemory, name, body: Callable[[], None]):
        """Warm up `body` on a side stream (compiles kernels, allocates their scratch), restore the memory
        it changed, then capture it. A failed capture leaves this step eager (noted in graph_errors)."""
        saved = [t.clone() for t in mem.buffers()]
        rng = torch.cuda.get_rng_state(self.device)
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                body()
            torch.cuda.current_stream(self.device).wait_stream(side)
            for t, s in zip(mem.buffers(), saved):
                t.copy_(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # its own memory pool: graphs replay in any order
                body()
        except Exception as err:  # keep going eagerly, but say so
            torch.cuda.synchronize(self.device)
            for t, s in zip(mem.buffers(), saved):
                t.copy_(s)
            mem.graph_errors.append(name)
            mem.graphs[f"error:{name}"] = f"{type(err).__name__}: {err}"
            return None
        finally:
            with contextlib.suppress(RuntimeError):  # the warm-up drew random numbers: seeded sampling
                torch.cuda.set_rng_state(rng, self.device)  # gets its sequence back
        for t, s in zip(mem.buffers(), saved):  # capture does not run kernels, but be sure
            t.copy_(s)
        mem.graphs[name] = graph
        return graph

    # -- public steps ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, mem: StaticMemory, ids: list[int], progress: ProgressFn | None = None) -> torch.Tensor:
        """Feed `ids`; logits [vocab] (fp32) after the last one. Block graphs once the memory is steady."""
        if not ids:
            raise ValueError("prefill needs at least one token")
        tokens = torch.tensor(ids, dtype=torch.long, device=self.device).view(1, -1).expand(mem.batch, -1)
        total, done = len(ids), 0
        logits = None
        use_blocks = self.graphs or self.block_body_eager
        while done < total:
            left = total - done
            kc = next((k for k in self.block_sizes if k * self.cfg.chunk <= left), None)
            if use_blocks and kc and mem.steady():
                n = kc * self.cfg.chunk
                if kc not in mem.block_tokens:
                    mem.block_tokens[kc] = torch.zeros(mem.batch, n, dtype=torch.long, device=self.device)
                mem.block_tokens[kc].copy_(tokens[:, done : done + n])
                mem.sync_counters()
                self._run(mem, ("block", kc), functools.partial(self._block_body, mem, kc))
                self._block_host(mem, kc)
                logits = mem.logits[0]
            else:
                n = min(left, PREFILL_BLOCK)
                if use_blocks and not mem.steady():  # stop at the next chunk boundary: steady may start there
                    n = min(n, self.cfg.chunk - mem.layers[0].current_len)
                logits = self.forward_eager(mem, tokens[:, done : done + n])[0, -1]
            done += n
            if progress:
                progress(done, total)
        return logits.clone()

    def _block_host(self, mem: StaticMemory, kc: int) -> None:
        c = self.cfg.chunk
        for layer in mem.layers:
            layer.window_start += kc * c
            layer.folded += kc * c
            layer.evictions += kc
        mem.position += kc * c

    def _step(self, mem: StaticMemory, key: tuple) -> None:
        """Feed mem.token (and sample the next into it); then close the chunk if it filled."""
        self._run(mem, ("decode", key), lambda: self._decode_body(mem, key))
        mem.position += 1
        c, lam = self.cfg.chunk, self.cfg.sparse
        for layer in mem.layers:
            layer.window_len += 1
        layer0 = mem.layers[0]
        if layer0.current_len < c:
            return
        if not layer0.has_prev:
            for layer in mem.layers:
                layer.has_prev = True
            return
        if layer0.n_sparse == lam:
            self._run(mem, "evict", lambda: self._evict_body(mem))
            for layer in mem.layers:
                self._close_chunk_host(layer, c)
            return
        for i, layer in enumerate(mem.layers):
            folded = self._evict(mem, i, layer.n_sparse, layer.window_start)
            self._close_chunk_host(layer, folded)
        mem.sync_counters()

    @staticmethod
    def sample_key(options: SamplingOptions) -> tuple:
        if options.temperature == 0:
            return ("greedy",)
        return ("sample", int(options.top_k), options.top_p < 1.0)

    def _start(self, mem: StaticMemory, logits: torch.Tensor, options: SamplingOptions) -> tuple:
        key = self.sample_key(options)
        mem.temperature.fill_(max(options.temperature, 1e-6))
        mem.top_p.fill_(options.top_p)
        if options.seed is not None:
            if mem.generator is None:
                torch.cuda.manual_seed(options.seed)
            else:
                mem.generator.manual_seed(options.seed)
        mem.sync_counters()
        mem.logits.copy_(logits.to(self.device).float().view(1, -1).expand(mem.batch, -1))
        self._sample_body(mem, key)
        return key

    @torch.inference_mode()
    def generate(self, mem: StaticMemory, logits: torch.Tensor, max_new_tokens: int, options: SamplingOptions,
                 stop_ids=()) -> Iterator[int]:
        """As `Engine.generate`: each token is fed to the memory before it is yielded.

        The token is copied to the host asynchronously and the step that feeds it is launched before the
        host waits for that copy, so the GPU is not idle while the host reads and yields."""
        key = self._start(mem, logits, options)
        stop = set(stop_ids)
        host, copied = mem.token_host, mem.token_copied
        for _ in range(max_new_tokens):
            host.copy_(mem.token[:, 0], non_blocking=copied is not None)  # queued before the step overwrites it
            if copied is not None:
                copied.record()
            self._step(mem, key)
            if copied is not None:
                copied.synchronize()
            token = int(host[0])
            yield token
            if token in stop:
                return

    @torch.inference_mode()
    def run_steps(self, mem: StaticMemory, logits: torch.Tensor, steps: int,
                  options: SamplingOptions | None = None) -> None:
        """`steps` decode steps back to back with no host read of the tokens (for throughput)."""
        key = self._start(mem, logits, options or SamplingOptions(temperature=0.0))
        for _ in range(steps):
            self._step(mem, key)


def fuse_projections(model: Llama) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One [q;k;v] and one [gate;up] weight per layer; the modules' weights become views of them (no copy
    is kept). Idempotent: the fused tensors are remembered on the model."""
    fused = getattr(model, "_fused_projections", None)
    if fused is not None:
        return fused
    wqkv, w13 = [], []
    for block in model.model.layers:
        a, mlp = block.self_attn, block.mlp
        wqkv.append(_fuse([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
        w13.append(_fuse([mlp.gate_proj.weight, mlp.up_proj.weight]))
    model._fused_projections = (wqkv, w13)
    return wqkv, w13


def _fuse(params: list[torch.nn.Parameter]) -> torch.Tensor:
    with torch.inference_mode(False), torch.no_grad():  # ordinary tensors even when called in inference mode
        fused = torch.cat([p.data for p in params])
        row = 0
        for p in params:
            p.data = fused[row : row + p.shape[0]]
            row += p.shape[0]
    return fused
