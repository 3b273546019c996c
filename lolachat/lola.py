"""LoLA memory: where every past key/value pair of one attention layer lives (DESIGN §4).

A `LolaLayerMemory` holds the terraced window (previous chunk + current chunk), the sparse cache of
hard-to-memorize pairs and the fp32 linear-attention state; `lola_attend` runs queries against it
and moves chunks out of the window as they fill. `ExactLayerMemory` is the unbounded KV cache used
for models without an adapter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lolachat.errors import LolachatError
from lolachat.kernels import reference as ref
from lolachat.lola_decode import SingleTokenAttention

SCORES = ref.EVICTION_SCORES
eviction_scores = ref.eviction_scores  # "error" (DESIGN §4.4), "relative", "others": docs/quality.md §11


def parse_head_names(names) -> tuple[tuple[int, int], ...]:
    """["L17H3", ...] -> ((17, 3), ...): query heads by layer and head number, as scripts/retrieval_heads.py
    prints them. ValueError on any other form."""
    heads = []
    for name in names:
        match = re.fullmatch(r"L(\d+)H(\d+)", str(name).strip())
        if not match:
            raise ValueError(f"a head is named L<layer>H<head>, e.g. L17H3, not {name!r}")
        heads.append((int(match[1]), int(match[2])))
    return tuple(sorted(set(heads)))


def head_names(heads) -> list[str]:
    return [f"L{layer}H{head}" for layer, head in heads]


def heads_outside(heads, n_layers: int, n_heads: int) -> list[str]:
    """The names of the (layer, head)s that a model of n_layers × n_heads query heads does not have."""
    return head_names((layer, head) for layer, head in heads if layer >= n_layers or head >= n_heads)


@dataclass
class LolaConfig:
    chunk: int = 64  # C: window chunk size
    sparse: int = 256  # λ: sparse-cache capacity per (batch, head)
    mix: str = "lola"  # "lola" (inference default) or "lolcats"
    max_distance: int | None = None  # cap on a cached key's distance to its query (DESIGN §4.4b)
    phi_input: str = "pre_rope"  # where the feature maps apply: "pre_rope" or "post_rope"
    selection: str = "head"  # who chooses sparse-cache pairs: each query "head", or each KV-head "group"
    sinks: int = 0  # the first `sinks` tokens are never evicted (held exactly, on top of the λ slots)
    state_halflife: int = 0  # tokens after which the linear state's old contents weigh half; 0 = never fade
    score: str = "error"  # eviction score: self-recall "error" (DESIGN §4.4), "relative" or "others" (eviction_scores)
    score_halflife: int = 0  # eviction scores × 0.5^(age / this), in tokens (reference.age_discount); 0 = off
    recent_slots: int = 0  # of the λ slots, this many always hold the newest pairs (reference.keep_newest); 0 = off
    retrieval_heads: tuple[tuple[int, int], ...] = ()  # (layer, query head)s that take no recent slots (§15)

    def __post_init__(self) -> None:
        if self.chunk < 1:
            raise ValueError("window chunk size must be >= 1")
        if self.sparse < 0:
            raise ValueError("sparse cache size must be >= 0")
        if self.mix not in ("lola", "lolcats"):
            raise ValueError(f"mix must be 'lola' or 'lolcats', not {self.mix!r}")
        if self.phi_input not in ("pre_rope", "post_rope"):
            raise ValueError(f"phi_input must be 'pre_rope' or 'post_rope', not {self.phi_input!r}")
        if self.selection not in ("head", "group"):
            raise ValueError(f"selection must be 'head' or 'group', not {self.selection!r}")
        if self.sinks < 0:
            raise ValueError("sinks must be >= 0")
        if self.state_halflife < 0:
            raise ValueError("state half-life must be >= 0")
        if self.score_halflife < 0:
            raise ValueError("score half-life must be >= 0")
        if not 0 <= self.recent_slots <= self.sparse:
            raise ValueError(f"recent slots must be between 0 and the sparse cache size {self.sparse}")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)}, not {self.score!r}")
        if any(layer < 0 or head < 0 for layer, head in self.retrieval_heads):
            raise ValueError("retrieval heads must have layer and head numbers >= 0")

    def recency(self, layer: int | None = None, group: int = 1, exempt: tuple[int, ...] | None = None) -> ref.Recency:
        """How eviction favours recent pairs beside the score (score_halflife, recent_slots), in `layer` (None:
        every head alike) whose selection heads each serve `group` query heads; `exempt` gives the spared heads'
        indices instead (for a view of several layers' heads)."""
        if exempt is None:
            exempt = () if layer is None else self.exempt_heads(layer, group)
        return ref.Recency(self.score_halflife, self.recent_slots, exempt)

    def exempt_heads(self, layer: int, group: int = 1) -> tuple[int, ...]:
        """The query heads of `layer` whose λ slots all go by score: its retrieval heads and, when `group` query
        heads share one selection, every head of their group (a shared selection keeps what any head raises)."""
        return tuple(sorted({head // group * group + j for at, head in self.retrieval_heads if at == layer
                             for j in range(group)}))

    def state_fade(self) -> float:
        """Factor on H and s at each eviction that folds (once per C tokens): 1 when the state never fades.

        Without fading, the linear term's weight against the bounded softmax part grows with the
        number of folded tokens, past anything the maps were trained on (docs/quality.md §8)."""
        return 0.5 ** (self.chunk / self.state_halflife) if self.state_halflife else 1.0


@dataclass
class LayerAdapter:
    """The trained LoLA parameters of one layer."""

    phi_q: torch.Tensor  # [H, D, F/2]
    phi_k: torch.Tensor  # [H, D, F/2]
    window_factor: torch.Tensor  # [H]; γ = sigmoid(window_factor)

    @property
    def feature_dim(self) -> int:
        return 2 * self.phi_q.shape[-1]


class Rope:
    """Rotary position embedding tables computed on demand for arbitrary positions."""

    def __init__(self, inv_freq: torch.Tensor):
        self.inv_freq = inv_freq.float()
        self._at: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def at(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos [D] and sign-folded sin [D] (−sin on the first half: rotate_half's sign) of one position.

        Remembered for the last few positions: every layer of a decode step asks for the same one."""
        hit = self._at.get(position)
        if hit is not None and hit[0] is self.inv_freq:
            return hit[1], hit[2]
        cos, sin = self.cos_sin(torch.tensor([position]))
        cos, sin = cos[0], sin[0]
        half = sin.shape[-1] // 2
        sin_signed = torch.cat([-sin[:half], sin[half:]])
        if len(self._at) >= 4:
            self._at.clear()
        self._at[position] = (self.inv_freq, cos, sin_signed)
        return cos, sin_signed

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.to(self.inv_freq.device).float().unsqueeze(-1) * self.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate x [..., N, D] at `positions` ([N] or broadcastable to x[..., :1] batch dims + [N])."""
        cos, sin = self.cos_sin(positions)
        return ref.apply_rope(x, cos, sin)


def expand_heads(x: torch.Tensor, group: int) -> torch.Tensor:
    """[B, Hkv, N, ...] -> [B, Hkv*group, N, ...]: each KV head serves `group` query heads."""
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def grouped_matmul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x [B,H,T,K] @ y [B,Hy,K,M] -> [B,H,T,M], each head of y serving H/Hy consecutive heads of x.

    The group is folded into the row axis, so shared K/V are never materialised per query head."""
    b, h, t, k = x.shape
    hy = y.shape[1]
    out = torch.matmul(x.reshape(b, hy, (h // hy) * t, k), y)
    return out.view(b, h, t, out.shape[-1])


def fade_state(h_state: torch.Tensor, s_state: torch.Tensor, cfg: LolaConfig) -> None:
    """Before a chunk competes and folds: the old contents of the linear state fade (cfg.state_halflife)."""
    fade = cfg.state_fade()
    if fade != 1.0:
        h_state.mul_(fade)
        s_state.mul_(fade)


class ExactLayerMemory:
    """Unbounded KV cache (exact softmax attention), keys stored after RoPE."""

    exact = True

    def __init__(self, batch: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype, device):
        self.k = torch.empty(batch, n_kv_heads, 0, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.length = 0

    def append(self, k_rot: torch.Tensor, v: torch.Tensor) -> None:
        need = self.length + k_rot.shape[2]
        if need > self.k.shape[2]:
            capacity = max(need, 2 * self.k.shape[2], 256)
            self.k = _grow(self.k, capacity, self.length)
            self.v = _grow(self.v, capacity, self.length)
        self.k[:, :, self.length : need] = k_rot
        self.v[:, :, self.length : need] = v
        self.length = need

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"k": self.k[:, :, : self.length], "v": self.v[:, :, : self.length]}

    def load(self, tensors: dict[str, torch.Tensor], rope: Rope | None = None) -> None:
        self.k, self.v = tensors["k"].clone(), tensors["v"].clone()
        self.length = self.k.shape[2]

    def nbytes(self) -> int:
        return 2 * self.length * self.k[:, :, :1].numel() * self.k.element_size()


def _grow(x: torch.Tensor, capacity: int, used: int) -> torch.Tensor:
    out = x.new_empty(*x.shape[:2], capacity, *x.shape[3:])
    out[:, :, :used] = x[:, :, :used]
    return out


def exact_attend(mem: ExactLayerMemory, q_rot, k_rot, v, scale: float) -> torch.Tensor:
    """Append the new keys, then causal softmax attention of q [B,H,T,D] over the whole cache."""
    past = mem.length
    mem.append(k_rot, v)
    keys, values = mem.k[:, :, : mem.length], mem.v[:, :, : mem.length]
    t = q_rot.shape[2]
    if t == 1:
        return grouped_decode_attention(q_rot, keys, values, scale)
    if past == 0:
        return F.scaled_dot_product_attention(q_rot, keys, values, is_causal=True, scale=scale, enable_gqa=True)
    q_pos = torch.arange(past, past + t, device=q_rot.device)
    k_pos = torch.arange(mem.length, device=q_rot.device)
    mask = k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)
    return F.scaled_dot_product_attention(q_rot, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)


def grouped_decode_attention(q, keys, values, scale: float) -> torch.Tensor:
    """One query per head [B,H,1,D] against [B,Hkv,N,D] without materialising repeated K/V."""
    b, h, _, d = q.shape
    hkv = keys.shape[1]
    qg = q.reshape(b, hkv, h // hkv, d)
    weights = torch.softmax(torch.matmul(qg, keys.transpose(-1, -2)) * scale, dim=-1, dtype=torch.float32)
    return torch.matmul(weights.to(values.dtype), values).reshape(b, h, 1, d)


class LolaLayerMemory:
    """Window + sparse cache + linear state of one layer (DESIGN §4.2).

    The window holds pre-RoPE keys per KV head for contiguous positions [window_start, window_start +
    window_len): the previous chunk (`has_prev`, C tokens) then the current, partial chunk. The sparse
    cache holds pre-RoPE keys with their original positions, per query head (selection "head") or per
    KV head ("group"). Its first `sink_len` slots are the attention sinks that have left the window
    (never evicted, not counted in λ); the other ≤ λ slots compete at each eviction.
    """

    exact = False

    def __init__(self, cfg: LolaConfig, batch: int, n_heads: int, n_kv_heads: int, head_dim: int,
                 feature_dim: int, dtype: torch.dtype, device):
        c = cfg.chunk
        self.cfg = cfg
        self.window_k = torch.zeros(batch, n_kv_heads, 2 * c, head_dim, dtype=dtype, device=device)
        self.window_v = torch.zeros_like(self.window_k)
        # Keys rotated at their own positions: derived from the pre-RoPE keys, kept so that each
        # decode step rotates only the new token (window) or nothing (sparse cache).
        self.window_k_rot = torch.zeros_like(self.window_k)
        self.window_start = 0
        self.window_len = 0
        self.has_prev = False
        sparse_heads = n_kv_heads if cfg.selection == "group" else n_heads
        self.sparse_k = torch.empty(batch, sparse_heads, 0, head_dim, dtype=dtype, device=device)
        self.sparse_v = torch.empty_like(self.sparse_k)
        self.sparse_pos = torch.empty(batch, sparse_heads, 0, dtype=torch.long, device=device)
        self.sparse_k_rot = torch.empty_like(self.sparse_k)
        self.h = torch.zeros(batch, n_heads, feature_dim, head_dim, dtype=torch.float32, device=device)
        self.s = torch.zeros(batch, n_heads, feature_dim, dtype=torch.float32, device=device)
        self.oldest_sparse_pos = 0
        self.folded = 0  # tokens that live only in the linear state
        self.evictions = 0  # chunks that left the window

    @property
    def sparse_len(self) -> int:
        return self.sparse_k.shape[2]

    @property
    def sink_len(self) -> int:
        """Sinks out of the window: every position below window_start has left it."""
        return min(self.cfg.sinks, self.window_start)

    @property
    def current_len(self) -> int:
        return self.window_len - (self.cfg.chunk if self.has_prev else 0)

    def tokens(self) -> int:
        return self.window_len + self.sparse_len + self.folded

    def nbytes(self) -> dict[str, int]:
        window = self.window_k.nbytes + self.window_v.nbytes + self.window_k_rot.nbytes
        sparse = self.sparse_k.nbytes + self.sparse_v.nbytes + self.sparse_pos.nbytes + self.sparse_k_rot.nbytes
        state = self.h.nbytes + self.s.nbytes
        return {"window": window, "sparse": sparse, "state": state}

    _FIELDS = ("window_k", "window_v", "sparse_k", "sparse_v", "sparse_pos", "h", "s")
    _COUNTERS = ("window_start", "window_len", "has_prev", "folded", "evictions")

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {name: getattr(self, name) for name in self._FIELDS}
        out["counters"] = torch.tensor([int(getattr(self, n)) for n in self._COUNTERS], dtype=torch.long)
        if self.cfg.sinks:  # absent by default, so default session files stay as they were
            out["sinks"] = torch.tensor(self.cfg.sinks, dtype=torch.long)
        return out

    def load(self, tensors: dict[str, torch.Tensor], rope: Rope) -> None:
        sinks = int(tensors["sinks"]) if "sinks" in tensors else 0
        if sinks != self.cfg.sinks or tensors["sparse_k"].shape[1] != self.sparse_k.shape[1]:
            raise LolachatError(
                f"the saved LoLA memory has {sinks} sinks and sparse K/V for {tensors['sparse_k'].shape[1]} heads; "
                f"this engine runs {self.cfg.sinks} sinks with selection {self.cfg.selection!r}: "
                "load it with the same --sinks and --selection")
        for name in self._FIELDS:
            setattr(self, name, tensors[name].to(getattr(self, name).device).clone())
        for name, value in zip(self._COUNTERS, tensors["counters"].tolist()):
            setattr(self, name, bool(value) if name == "has_prev" else int(value))
        self.oldest_sparse_pos = int(self.sparse_pos.min()) if self.sparse_pos.numel() else 0
        positions = torch.arange(self.window_start, self.window_start + self.window_k.shape[2],
                                 device=self.window_k.device)
        self.window_k_rot = rope.rotate(self.window_k, positions)
        self.sparse_k_rot = rope.rotate(self.sparse_k, self.sparse_pos)


class LolaAttention:
    """Runs queries of one layer against its LoLA memory; stateless apart from the memory it is given."""

    def __init__(self, cfg: LolaConfig, adapter: LayerAdapter, rope: Rope, scale: float, layer: int | None = None):
        if layer is None and cfg.retrieval_heads:
            raise ValueError("retrieval heads need the layer's index in the model")
        self.cfg = cfg
        self.layer = layer  # index in the model: which of cfg.retrieval_heads are this layer's
        self.adapter = adapter
        self.rope = rope
        self.scale = scale
        self.gamma = torch.sigmoid(adapter.window_factor.float())
        self.single_token = SingleTokenAttention(self)

    def phi(self, x_pre: torch.Tensor, positions: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Feature map of pre-RoPE q or k [B,H,N,D] at `positions`, applied where the adapter says."""
        if self.cfg.phi_input == "post_rope":
            x_pre = self.rope.rotate(x_pre, positions)
        return ref.hedgehog(x_pre, weight)

    def attend(self, mem: LolaLayerMemory, q_pre, k_pre, v, pos0: int) -> torch.Tensor:
        """Queries q_pre [B,H,T,D] at positions pos0.. with new keys/values [B,Hkv,T,D]; returns [B,H,T,D].

        The tokens are split at chunk boundaries: all queries of one chunk see the same sparse cache,
        previous chunk and linear state, so one pass over T tokens equals T single-token passes.
        """
        outputs = []
        t = 0
        total = q_pre.shape[2]
        while t < total:
            room = self.cfg.chunk - mem.current_len
            n = min(room, total - t)
            outputs.append(self._attend_within_chunk(mem, q_pre[:, :, t : t + n], k_pre[:, :, t : t + n],
                                                     v[:, :, t : t + n], pos0 + t))
            if mem.current_len == self.cfg.chunk:
                self._close_chunk(mem)
            t += n
        return torch.cat(outputs, dim=2)

    def _attend_within_chunk(self, mem: LolaLayerMemory, q_pre, k_pre, v, pos0: int) -> torch.Tensor:
        if q_pre.shape[2] == 1:
            return self.single_token(mem, q_pre, k_pre, v, pos0)
        return self._attend_general(mem, q_pre, k_pre, v, pos0)

    def _attend_general(self, mem: LolaLayerMemory, q_pre, k_pre, v, pos0: int) -> torch.Tensor:
        """Any number of queries of one chunk (causal among themselves): the reference math."""
        n = q_pre.shape[2]
        device = q_pre.device
        q_pos = torch.arange(pos0, pos0 + n, device=device)
        end = mem.window_len + n
        mem.window_k[:, :, mem.window_len : end] = k_pre
        mem.window_v[:, :, mem.window_len : end] = v
        mem.window_k_rot[:, :, mem.window_len : end] = self.rope.rotate(k_pre, q_pos)
        mem.window_len = end
        q_rot = self.rope.rotate(q_pre, q_pos).float()

        win_pos = torch.arange(mem.window_start, mem.window_start + end, device=device)
        win_logits = grouped_matmul(q_rot, mem.window_k_rot[:, :, :end].float().transpose(-1, -2)) * self.scale
        causal = win_pos.view(1, -1) <= q_pos.view(-1, 1)
        win_logits = win_logits.masked_fill(~causal, float("-inf"))
        m = win_logits.max(dim=-1, keepdim=True).values

        sparse = None
        if mem.sparse_len:
            sparse = self._sparse_logits(mem, q_pre, q_rot, q_pos) * self.scale
            m = torch.maximum(m, sparse.max(dim=-1, keepdim=True).values)
        w_win = torch.exp(win_logits - m)
        num = grouped_matmul(w_win, mem.window_v[:, :, :end].float())
        den = w_win.sum(dim=-1, keepdim=True)
        if sparse is not None:
            w_sparse = torch.exp(sparse - m)
            num = num + grouped_matmul(w_sparse, mem.sparse_v.float())
            den = den + w_sparse.sum(dim=-1, keepdim=True)
        phi_q = self.phi(q_pre, q_pos, self.adapter.phi_q)
        y = ref.mix_linear(num, den, m, phi_q, mem.h, mem.s, self.gamma, self.cfg.mix)
        return y.to(q_pre.dtype)

    def _sparse_logits(self, mem: LolaLayerMemory, q_pre, q_rot, q_pos) -> torch.Tensor:
        """Unscaled logits against the sparse cache, distances capped at max_distance (DESIGN §4.4b)."""
        near = grouped_matmul(q_rot, mem.sparse_k_rot.float().transpose(-1, -2))
        cap = self.cfg.max_distance
        if cap is None or int(q_pos[-1]) - mem.oldest_sparse_pos <= cap:
            return near
        q_capped = self.rope.rotate(q_pre, torch.full((q_pre.shape[2],), cap, device=q_pre.device)).float()
        far = grouped_matmul(q_capped, mem.sparse_k.float().transpose(-1, -2))
        key_pos = expand_heads(mem.sparse_pos, q_pre.shape[1] // mem.sparse_pos.shape[1])
        distance = q_pos.view(1, 1, -1, 1) - key_pos.unsqueeze(2)
        return torch.where(distance > cap, far, near)

    def _close_chunk(self, mem: LolaLayerMemory) -> None:
        """The current chunk is full: it becomes the previous chunk, and the old one leaves the window."""
        c = self.cfg.chunk
        if mem.has_prev:
            self._evict(mem, mem.window_k[:, :, :c], mem.window_v[:, :, :c], mem.window_start)
            for buffer in (mem.window_k, mem.window_v, mem.window_k_rot):
                buffer[:, :, :c] = buffer[:, :, c:].clone()
            mem.window_start += c
            mem.window_len -= c
        mem.has_prev = True

    def _evict(self, mem: LolaLayerMemory, k_pre, v, start: int) -> None:
        """A chunk leaves the window (DESIGN §4.4): its sinks join the sink slots; the rest is appended
        to the sparse cache while it fits, else competes with it and the losers fold into H, s."""
        sparse_heads = mem.sparse_k.shape[1]
        group = sparse_heads // k_pre.shape[1]
        k_pre, v = expand_heads(k_pre, group), expand_heads(v, group)
        batch, c = k_pre.shape[0], k_pre.shape[2]
        pos = torch.arange(start, start + c, device=k_pre.device).expand(batch, sparse_heads, c)
        mem.evictions += 1
        held = mem.sink_len
        new_sinks = min(max(self.cfg.sinks - start, 0), c)
        cache, chunk = (mem.sparse_k, mem.sparse_v, mem.sparse_pos), (k_pre, v, pos)
        sinks = [torch.cat([old[:, :, :held], new[:, :, :new_sinks]], dim=2) for old, new in zip(cache, chunk)]
        cand = [torch.cat([old[:, :, held:], new[:, :, new_sinks:]], dim=2) for old, new in zip(cache, chunk)]
        if cand[0].shape[2] > self.cfg.sparse:
            cand = self._compete(mem, *cand)
        mem.sparse_k, mem.sparse_v, mem.sparse_pos = (torch.cat(parts, dim=2) for parts in zip(sinks, cand))
        mem.sparse_k_rot = self.rope.rotate(mem.sparse_k, mem.sparse_pos)
        mem.oldest_sparse_pos = int(mem.sparse_pos.min()) if mem.sparse_len else 0

    def _compete(self, mem: LolaLayerMemory, cand_k, cand_v, cand_pos) -> list[torch.Tensor]:
        """Keep the top λ candidates by self-recall error per selection head; fold the rest into every
        query head they served (each head scores and folds with its own φ_k and state)."""
        fade_state(mem.h, mem.s, self.cfg)
        group = mem.h.shape[1] // cand_k.shape[1]
        k_heads, v_heads, pos_heads = (expand_heads(x, group) for x in (cand_k, cand_v, cand_pos))
        phi_k = self.phi(k_heads, pos_heads, self.adapter.phi_k)
        recency = self.cfg.recency(self.layer, group)
        scores = recency.apply(eviction_scores(phi_k, v_heads, mem.h, mem.s, self.cfg.score), pos_heads)
        keep, drop = ref.select_keep(ref.group_scores(scores, group), self.cfg.sparse)
        drop = expand_heads(drop, group)
        ref.fold(ref.gather_tokens(phi_k, drop), ref.gather_tokens(v_heads, drop), mem.h, mem.s)
        mem.folded += drop.shape[-1]
        return [ref.gather_tokens(x, keep) for x in (cand_k, cand_v, cand_pos)]
