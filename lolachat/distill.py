"""Linearize a softmax Llama into LoLA: train its adapter (research/lola.md §3.3, DESIGN §4).

Stage 1 — attention transfer. Every layer's exact softmax attention output (per head, before o_proj) is
the target; the student is the chunked hybrid of DESIGN §4.2–4.3 (terraced window of C+1..2C tokens plus
the linear state of everything older) with trainable Hedgehog maps φ_q, φ_k (identity init) and window
factors. Loss: MSE × 1000, averaged over layers; all layers train jointly, each fed the teacher's own
activations, so each layer's backward runs on its own and memory stays at one layer's graph.

Stage 2 — LoRA (q, k, v, o; r = 8, α = 16) with next-token loss through the whole student model, with
LoLA in the loop: the sparse cache is active (λ, the inference mix), its membership decided exactly as at
inference by the self-recall-error eviction (run without gradients), and gradients flow through every
softmax and linear term the model will see at inference.

For speed the student runs in a parallel form over whole sequences (`hybrid_attention`): per chunk, a
softmax over its window and its sparse-cache members, and the linear state as a prefix sum of per-chunk
φ(k)ᵀv minus the sparse-cache members. Given the same cache membership this is exactly the recurrent
computation of `lolachat.lola.LolaAttention` (tests/test_distill.py checks it).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lolachat.adapter import INIT_WINDOW_FACTOR, Adapter, save_adapter
from lolachat.errors import BadInput
from lolachat.kernels import reference as ref
from lolachat.lola import LayerAdapter, expand_heads

CHECKPOINT_VERSION = 1
StepCallback = Callable[[str, int, int, float], None]  # (stage, step, planned steps, loss)


# ------------------------------------------------------------------------------------ configuration


@dataclass
class DistillConfig:
    # the student (DESIGN §4)
    feature_dim: int = 0  # F; 0 = 2 × head dim (Hedgehog with W square at identity init)
    phi_input: str = "pre_rope"
    chunk: int = 64  # C
    mix: str = "lola"  # stage 1 mix
    # stage 1: attention transfer
    seq_lens: tuple[int, ...] = (1024,)  # trained in this order, equal shares of the steps
    steps: int = 600
    batch: int = 8  # sequences per step at the first length (tokens per step stay constant)
    lr: float = 1e-2
    mse_factor: float = 1000.0
    seconds: float | None = None  # wall-clock cap of stage 1
    # stage 2: LoRA with LoLA in the loop
    stage2_steps: int = 0
    stage2_batch: int = 4
    stage2_seq_len: int = 1024
    stage2_lr: float = 1e-4
    stage2_seconds: float | None = None
    lora_rank: int = 8
    lora_alpha: float = 16.0
    sparse: int = 256  # λ in the loop
    selection: str = "head"  # sparse-cache selection in the loop (lola.LolaConfig.selection)
    stage2_mix: str = "lola"
    max_distance: int | None = None
    # both
    lr_final_ratio: float = 0.1  # cosine decay to this share of the peak rate
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 100
    eval_batches: int = 2

    def __post_init__(self) -> None:
        self.seq_lens = tuple(int(n) for n in self.seq_lens)
        if self.selection not in ("head", "group"):
            raise BadInput(f"selection must be 'head' or 'group', not {self.selection!r}")
        if self.phi_input not in ("pre_rope", "post_rope"):
            raise BadInput(f"phi_input must be pre_rope or post_rope, not {self.phi_input!r}")
        for mix in (self.mix, self.stage2_mix):
            if mix not in ("lola", "lolcats"):
                raise BadInput(f"mix must be lola or lolcats, not {mix!r}")
        if self.chunk < 1 or self.sparse < 0 or self.lora_rank < 1:
            raise BadInput("need chunk >= 1, sparse >= 0 and LoRA rank >= 1")
        if self.steps < 0 or self.stage2_steps < 0 or self.batch < 1 or self.stage2_batch < 1:
            raise BadInput("steps must be >= 0 and batches >= 1")
        if not self.seq_lens or min(self.seq_lens) < 2 or self.stage2_seq_len < 2:
            raise BadInput("sequence lengths must be at least 2 tokens")

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank


# ------------------------------------------------------------------------------- the student's math


def _expand(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    group = n_heads // x.shape[1]
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def _shift_chunks(x: torch.Tensor, by: int) -> torch.Tensor:
    """x [B,H,N,...] moved `by` chunks later along N, zeros in front."""
    pad = [0, 0] * (x.dim() - 3) + [by, 0]
    return F.pad(x, pad)[:, :, : x.shape[2]]


def hybrid_attention(q_pre: torch.Tensor, k_pre: torch.Tensor, v: torch.Tensor, phi_q: torch.Tensor,
                     phi_k: torch.Tensor, window_factor: torch.Tensor, inv_freq: torch.Tensor, *, chunk: int,
                     mix: str, phi_input: str, sparse: tuple[torch.Tensor, torch.Tensor] | None = None,
                     max_distance: int | None = None) -> torch.Tensor:
    """LoLA attention over a whole sequence at positions 0..T−1, in parallel form; float32 [B,H,T,D].

    q_pre [B,H,T,D], k_pre / v [B,Hkv,T,D] (before RoPE); phi_q / phi_k [H,D,F/2]; window_factor [H].
    `sparse` = (idx [B,H,N,S], valid [B or 1, H or 1, N, S]): the sparse-cache members seen by the queries
    of each chunk (token positions), from `sparse_schedule`; None = window + linear state only (λ = 0).
    """
    b, h, t, d = q_pre.shape
    c = chunk
    n = -(-t // c)
    pad = n * c - t
    q = q_pre.float()
    k = _expand(k_pre.float(), h)
    vv = _expand(v.float(), h)
    if pad:
        q, k, vv = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, vv))
    pos = torch.arange(n * c, device=q.device)
    q_rot = ref.rope_rotate(q, pos, inv_freq)
    k_rot = ref.rope_rotate(k, pos, inv_freq)
    scale = 1.0 / math.sqrt(d)

    # window: each chunk against the previous chunk and itself (causal)
    qc = q_rot.view(b, h, n, c, d)
    kc, vc = k_rot.view(b, h, n, c, d), vv.view(b, h, n, c, d)
    kw = torch.cat([_shift_chunks(kc, 1), kc], dim=3)
    vw = torch.cat([_shift_chunks(vc, 1), vc], dim=3)
    logits = torch.einsum("bhncd,bhnkd->bhnck", qc, kw) * scale
    i = torch.arange(c, device=q.device)
    own = i.view(1, c, 1) >= i.view(1, 1, c)  # [1, C, C]
    has_prev = (torch.arange(n, device=q.device) > 0).view(n, 1, 1).expand(n, c, c)
    mask = torch.cat([has_prev, own.expand(n, c, c)], dim=2)  # [N, C, 2C]
    logits = logits.masked_fill(~mask, float("-inf"))
    m = logits.amax(dim=-1, keepdim=True)

    phi_in_q = q_rot if phi_input == "post_rope" else q
    phi_in_k = k_rot if phi_input == "post_rope" else k
    fq = ref.hedgehog(phi_in_q, phi_q).view(b, h, n, c, -1)
    fk_flat = ref.hedgehog(phi_in_k, phi_k)
    fk = fk_flat.view(b, h, n, c, -1)

    sparse_logits = None
    if sparse is not None:
        idx, valid = sparse
        s = idx.shape[-1]
        flat = idx.reshape(b, h, n * s)
        ks = ref.gather_tokens(k, flat).view(b, h, n, s, d)
        vs = ref.gather_tokens(vv, flat).view(b, h, n, s, d)
        fks = ref.gather_tokens(fk_flat, flat).view(b, h, n, s, -1)
        ks_rot = ref.rope_rotate(ks, idx, inv_freq)
        sparse_logits = torch.einsum("bhncd,bhnsd->bhncs", qc, ks_rot)
        if max_distance is not None and n * c - 1 > max_distance:
            q_cap = ref.rope_rotate(q, torch.full((n * c,), max_distance, device=q.device), inv_freq)
            far = torch.einsum("bhncd,bhnsd->bhncs", q_cap.view(b, h, n, c, d), ks)
            distance = pos.view(1, 1, n, c, 1) - idx.unsqueeze(3)
            sparse_logits = torch.where(distance > max_distance, far, sparse_logits)
        sparse_logits = (sparse_logits * scale).masked_fill(~valid.unsqueeze(3), float("-inf"))
        m = torch.maximum(m, sparse_logits.amax(dim=-1, keepdim=True))

    w = torch.exp(logits - m)
    soft_num = torch.einsum("bhnck,bhnkd->bhncd", w, vw)
    soft_den = w.sum(dim=-1, keepdim=True)

    # linear state for chunk n: every token of chunks 0..n−2
    u = torch.einsum("bhncf,bhncd->bhnfd", fk, vc)
    z = fk.sum(dim=3)
    h_state = _shift_chunks(torch.cumsum(u, dim=2), 2)
    s_state = _shift_chunks(torch.cumsum(z, dim=2), 2)
    lin_num = torch.einsum("bhncf,bhnfd->bhncd", fq, h_state)
    lin_den = torch.einsum("bhncf,bhnf->bhnc", fq, s_state).unsqueeze(-1)

    if sparse is not None:
        ws = torch.exp(sparse_logits - m)
        soft_num = soft_num + torch.einsum("bhncs,bhnsd->bhncd", ws, vs)
        soft_den = soft_den + ws.sum(dim=-1, keepdim=True)
        # cached pairs are not in the linear state: take them out of the prefix sums
        a = torch.einsum("bhncf,bhnsf->bhncs", fq, fks) * valid.unsqueeze(3)
        lin_num = lin_num - torch.einsum("bhncs,bhnsd->bhncd", a, vs)
        lin_den = lin_den - a.sum(dim=-1, keepdim=True)

    g = torch.sigmoid(window_factor.float()).view(1, h, 1, 1, 1)
    if mix == "lola":
        lin_scale = (1.0 - g) * torch.exp(-m)
        y = (g * soft_num + lin_scale * lin_num) / (g * soft_den + lin_scale * lin_den)
    elif mix == "lolcats":
        y = (g * soft_num + lin_num) / (g * soft_den + lin_den)
    else:
        raise ValueError(f"unknown mix {mix!r}")
    return y.reshape(b, h, n * c, d)[:, :, :t]


@torch.no_grad()
def sparse_schedule(k_pre: torch.Tensor, v: torch.Tensor, phi_k: torch.Tensor, inv_freq: torch.Tensor, *,
                    n_heads: int, chunk: int, capacity: int, phi_input: str,
                    selection: str = "head") -> tuple[torch.Tensor, torch.Tensor] | None:
    """Which tokens the sparse cache holds for the queries of each chunk, as inference would decide.

    Replays DESIGN §4.4 over the chunks: chunk j leaves the window when chunk j+1 is complete, is appended
    while there is room, and otherwise competes with the cache by self-recall error against the linear
    state, the losers folded in; with `selection="group"` every head of a KV-head group keeps the group's
    set (reference.group_scores). Returns (idx [B,H,N,S], valid [1,1,N,S]) or None when no query ever sees
    a cached pair.
    """
    b, _, t, _ = k_pre.shape
    c = chunk
    n = -(-t // c)
    if capacity == 0 or n < 3:
        return None
    group = n_heads // k_pre.shape[1] if selection == "group" else 1
    k = _expand(k_pre.float(), n_heads)
    vv = _expand(v.float(), n_heads)
    if phi_input == "post_rope":
        k = ref.rope_rotate(k, torch.arange(t, device=k.device), inv_freq)
    fk = ref.hedgehog(k, phi_k)
    h_state = torch.zeros(b, n_heads, fk.shape[-1], vv.shape[-1], device=k.device)
    s_state = torch.zeros(b, n_heads, fk.shape[-1], device=k.device)
    cache = torch.empty(b, n_heads, 0, dtype=torch.long, device=k.device)
    idx = torch.zeros(b, n_heads, n, capacity, dtype=torch.long, device=k.device)
    sizes = [0] * n
    for j in range(n - 2):  # chunk j leaves the window before the queries of chunk j + 2
        new = torch.arange(j * c, (j + 1) * c, device=k.device).expand(b, n_heads, c)
        if cache.shape[-1] + c <= capacity:
            cache = torch.cat([cache, new], dim=-1)
        else:
            cand = torch.cat([cache, new], dim=-1)
            cand_fk, cand_v = ref.gather_tokens(fk, cand), ref.gather_tokens(vv, cand)
            scores = ref.self_recall_error(cand_fk, cand_v, h_state, s_state)
            keep, drop = (expand_heads(x, group) for x in ref.select_keep(ref.group_scores(scores, group), capacity))
            ref.fold(ref.gather_tokens(cand_fk, drop), ref.gather_tokens(cand_v, drop), h_state, s_state)
            cache = ref.gather_tokens(cand, keep)
        sizes[j + 2] = cache.shape[-1]
        idx[:, :, j + 2, : sizes[j + 2]] = cache
    width = max(sizes)
    valid = torch.arange(width, device=k.device).view(1, -1) < torch.tensor(sizes, device=k.device).view(-1, 1)
    return idx[..., :width], valid.view(1, 1, n, width)


def teacher_attention(q_pre, k_pre, v, inv_freq) -> torch.Tensor:
    """Exact causal softmax attention (float32) [B,H,T,D]: the stage 1 target."""
    t = q_pre.shape[2]
    pos = torch.arange(t, device=q_pre.device)
    q = ref.rope_rotate(q_pre.float(), pos, inv_freq)
    k = ref.rope_rotate(k_pre.float(), pos, inv_freq)
    return F.scaled_dot_product_attention(q, k, v.float(), is_causal=True, enable_gqa=True)


# ------------------------------------------------------------------------------ trainable parameters


class Trainable:
    """The adapter being trained, under its file names (DESIGN §4.5): φ maps, window factors, LoRA."""

    def __init__(self, model, cfg: DistillConfig, device):
        a = model.args
        self.n_layers = a.n_layers
        half = (cfg.feature_dim or 2 * a.head_dim) // 2
        eye = torch.zeros(a.head_dim, half)
        diag = torch.arange(min(a.head_dim, half))
        eye[diag, diag] = 1.0
        self.params: dict[str, torch.Tensor] = {}
        for i in range(a.n_layers):
            p = f"layers.{i}.attn."
            self.params[p + "phi_q"] = eye.expand(a.n_heads, -1, -1).clone()
            self.params[p + "phi_k"] = eye.expand(a.n_heads, -1, -1).clone()
            self.params[p + "window_factor"] = torch.full((a.n_heads,), INIT_WINDOW_FACTOR)
        g = torch.Generator().manual_seed(cfg.seed + 1)
        for i, block in enumerate(model.model.layers):
            for proj in "qkvo":
                linear = getattr(block.self_attn, f"{proj}_proj")
                fan_in = linear.in_features
                bound = 1.0 / math.sqrt(fan_in)  # kaiming-uniform(a=√5), as peft initialises A
                self.params[f"layers.{i}.attn.{proj}.lora_a"] = (
                    torch.rand(cfg.lora_rank, fan_in, generator=g) * 2 - 1) * bound
                self.params[f"layers.{i}.attn.{proj}.lora_b"] = torch.zeros(linear.out_features, cfg.lora_rank)
        self.params = {k: v.to(device).requires_grad_(False) for k, v in self.params.items()}
        self.lora_scale = cfg.lora_scale

    def stage_params(self, stage: int) -> list[torch.Tensor]:
        lora = [v for k, v in self.params.items() if ".lora_" in k]
        maps = [v for k, v in self.params.items() if ".lora_" not in k]
        return maps if stage == 1 else lora

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p = f"layers.{i}.attn."
        return self.params[p + "phi_q"], self.params[p + "phi_k"], self.params[p + "window_factor"]

    def lora(self, i: int, proj: str) -> tuple[torch.Tensor, torch.Tensor]:
        p = f"layers.{i}.attn.{proj}."
        return self.params[p + "lora_a"], self.params[p + "lora_b"]

    def adapter(self, metadata: dict, with_lora: bool) -> Adapter:
        layers = [LayerAdapter(*(x.detach().float().cpu().clone() for x in self.layer(i)))
                  for i in range(self.n_layers)]
        lora = {k: v.detach().float().cpu().clone() for k, v in self.params.items() if ".lora_" in k} \
            if with_lora else {}
        return Adapter(layers, metadata, lora)

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, value in tensors.items():
            self.params[name].data.copy_(value.to(self.params[name].device))


# ------------------------------------------------------------------------------------- model passes


def _project(linear, x: torch.Tensor, lora, scale: float) -> torch.Tensor:
    y = linear(x)
    if lora is None:
        return y
    a, b = lora
    return y + ((x.float() @ a.t()) @ b.t() * scale).to(y.dtype)


def layer_qkv(attn, h: torch.Tensor, tr: Trainable | None = None, i: int = 0):
    """Pre-RoPE q [B,H,T,D], k, v [B,Hkv,T,D] of one attention layer (with LoRA deltas when given)."""
    b, t, _ = h.shape
    lora = (lambda p: tr.lora(i, p)) if tr is not None else (lambda p: None)
    scale = tr.lora_scale if tr is not None else 1.0
    q = _project(attn.q_proj, h, lora("q"), scale).view(b, t, attn.n_heads, attn.head_dim).transpose(1, 2)
    k = _project(attn.k_proj, h, lora("k"), scale).view(b, t, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    v = _project(attn.v_proj, h, lora("v"), scale).view(b, t, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    return q, k, v


def stage1_loss(model, tokens: torch.Tensor, tr: Trainable, cfg: DistillConfig, train: bool = True) -> float:
    """Attention-transfer loss of one batch; with `train`, gradients accumulate layer by layer."""
    inv_freq = model.rope.inv_freq.to(tokens.device)
    layers = model.model.layers
    total = torch.zeros((), device=tokens.device)
    with torch.no_grad():
        x = model.model.embed_tokens(tokens)
    for i, block in enumerate(layers):
        attn = block.self_attn
        with torch.no_grad():
            q, k, v = layer_qkv(attn, block.input_layernorm(x))
            target = teacher_attention(q, k, v, inv_freq)
        phi_q, phi_k, wf = tr.layer(i)
        with torch.set_grad_enabled(train):
            y = hybrid_attention(q, k, v, phi_q, phi_k, wf, inv_freq, chunk=cfg.chunk, mix=cfg.mix,
                                 phi_input=cfg.phi_input)
            loss = F.mse_loss(y, target) * (cfg.mse_factor / len(layers))
        if train:
            loss.backward()
        total += loss.detach()
        with torch.no_grad():
            b, t = tokens.shape
            x = x + attn.o_proj(target.to(x.dtype).transpose(1, 2).reshape(b, t, -1))
            x = x + block.mlp(block.post_attention_layernorm(x))
    return float(total)


def student_logits(model, tokens: torch.Tensor, tr: Trainable, cfg: DistillConfig) -> torch.Tensor:
    """Logits [B,T,V] of the LoLA student (LoRA applied, sparse cache λ in the loop, stage 2 mix)."""
    inv_freq = model.rope.inv_freq.to(tokens.device)
    b, t = tokens.shape
    x = model.model.embed_tokens(tokens)
    for i, block in enumerate(model.model.layers):
        attn = block.self_attn
        q, k, v = layer_qkv(attn, block.input_layernorm(x), tr, i)
        phi_q, phi_k, wf = tr.layer(i)
        sparse = sparse_schedule(k, v, phi_k, inv_freq, n_heads=attn.n_heads, chunk=cfg.chunk,
                                 capacity=cfg.sparse, phi_input=cfg.phi_input, selection=cfg.selection)
        y = hybrid_attention(q, k, v, phi_q, phi_k, wf, inv_freq, chunk=cfg.chunk, mix=cfg.stage2_mix,
                             phi_input=cfg.phi_input, sparse=sparse, max_distance=cfg.max_distance)
        y = y.to(x.dtype).transpose(1, 2).reshape(b, t, -1)
        x = x + _project(attn.o_proj, y, tr.lora(i, "o"), tr.lora_scale)
        x = x + block.mlp(block.post_attention_layernorm(x))
    x = model.model.norm(x)
    head = model.model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    return F.linear(x, head)


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


@torch.no_grad()
def teacher_loss(model, tokens: torch.Tensor) -> float:
    """Next-token loss of the exact softmax model (the reference for stage 2)."""
    memory = model.new_memory(batch=tokens.shape[0]) if model.lola_config is None else None
    if memory is None:
        raise ValueError("teacher_loss needs the model without LoLA attached")
    logits = model(tokens, memory, all_logits=True)
    return float(next_token_loss(logits, tokens))


# ----------------------------------------------------------------------------------------- batches


class Batches:
    """Random windows of the token stream, which is cut into blocks: every 50th block is for validation.

    Windows never cross a block boundary. The windows of step s depend only on (seed, stage, s), so a
    resumed run sees the same data.
    """

    VALID_EVERY = 50

    def __init__(self, tokens: np.ndarray, device, seed: int, longest: int):
        self.tokens = torch.from_numpy(tokens.astype(np.int64))
        self.device = device
        self.seed = seed
        need = longest + 1
        self.block = max(1 << 16, 2 * need)
        count = len(self.tokens) // self.block
        if count < 2:  # a short text: two halves, one for training and one for validation
            self.block = len(self.tokens) // 2
            count = 2
        if self.block < need:
            raise BadInput(f"training text too short: {len(self.tokens)} tokens for sequences of {longest} "
                           "(give more text or shorter --seq-len)")
        blocks = list(range(count))
        self.valid_blocks = [b for b in blocks if b % self.VALID_EVERY == self.VALID_EVERY - 1] or [count - 1]
        self.train_blocks = [b for b in blocks if b not in self.valid_blocks]

    def _windows(self, blocks: list[int], batch: int, length: int, g: torch.Generator) -> torch.Tensor:
        which = torch.randint(0, len(blocks), (batch,), generator=g).tolist()
        offsets = torch.randint(0, self.block - length + 1, (batch,), generator=g).tolist()
        starts = [blocks[w] * self.block + o for w, o in zip(which, offsets)]
        return torch.stack([self.tokens[s : s + length] for s in starts]).to(self.device)

    def train(self, stage: int, step: int, batch: int, length: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + stage * 7919 + step)
        return self._windows(self.train_blocks, batch, length, g)

    def valid(self, index: int, batch: int, length: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 31 + 17 + index)
        return self._windows(self.valid_blocks, batch, length, g)


# ----------------------------------------------------------------------------------------- training


def _cosine(step: int, planned: int, peak: float, final_ratio: float) -> float:
    if planned <= 1:
        return peak
    progress = min(1.0, step / (planned - 1))
    return peak * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class StageState:
    stage: int
    step: int = 0
    planned: int = 0
    seconds: float = 0.0
    curve: list = field(default_factory=list)  # [step, mean loss over the log interval]
    done: bool = False


class Checkpoint:
    """Resumable training state beside the output file: parameters, optimiser, stage progress."""

    def __init__(self, path: Path, fingerprint: str):
        self.path = path
        self.fingerprint = fingerprint

    def load(self) -> dict | None:
        if not self.path.exists():
            return None
        try:
            data = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # a torn or foreign file: start over rather than crash
            raise BadInput(f"checkpoint {self.path} is unreadable ({err}); delete it or pass --restart") from None
        if data.get("version") != CHECKPOINT_VERSION or data.get("fingerprint") != self.fingerprint:
            raise BadInput(f"checkpoint {self.path} belongs to a different model, data or configuration; "
                           "pass --restart to discard it")
        return data

    def save(self, tr: Trainable, optim: torch.optim.Optimizer | None, states: dict[int, StageState]) -> None:
        from lolachat.persist import atomic_write

        data = {
            "version": CHECKPOINT_VERSION, "fingerprint": self.fingerprint,
            "params": {k: v.detach().cpu() for k, v in tr.params.items()},
            "optim": optim.state_dict() if optim is not None else None,
            "states": {str(k): asdict(s) for k, s in states.items()},
        }
        with atomic_write(self.path) as tmp:
            torch.save(data, tmp)


def run_stage(stage: int, steps: int, seconds: float | None, step_fn: Callable[[int], float],
              params: list[torch.Tensor], lr: float, cfg: DistillConfig, state: StageState,
              checkpoint: Checkpoint | None, tr: Trainable, states: dict[int, StageState],
              optim_state: dict | None, on_step: StepCallback | None) -> None:
    """Adam with cosine decay over the planned steps; a time cap shortens the plan once speed is known."""
    for p in params:
        p.requires_grad_(True)
    optim = torch.optim.Adam(params, lr=lr)
    if optim_state is not None:
        optim.load_state_dict(optim_state)
    if not state.planned:
        state.planned = steps
    started = time.monotonic() - state.seconds
    window: list[float] = []
    log_every = max(1, min(25, steps // 40 or 1))
    timed_from, timed_steps = None, 0
    while state.step < state.planned:
        for group in optim.param_groups:
            group["lr"] = _cosine(state.step, state.planned, lr, cfg.lr_final_ratio)
        optim.zero_grad(set_to_none=True)
        loss = step_fn(state.step)
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optim.step()
        state.step += 1
        window.append(loss)
        if len(window) == log_every or state.step == state.planned:
            state.curve.append([state.step, round(sum(window) / len(window), 5)])
            window = []
        now = time.monotonic()
        state.seconds = now - started
        if timed_from is None:
            timed_from = now  # the first step carries start-up costs: time the rest
        else:
            timed_steps += 1
        if seconds is not None and timed_steps >= 3:
            per_step = (now - timed_from) / timed_steps
            left = max(0, int((seconds - state.seconds) / per_step))
            state.planned = max(state.step, min(state.planned, state.step + left))
        if on_step:
            on_step(f"stage {stage}", state.step, state.planned, loss)
        if checkpoint and cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
            checkpoint.save(tr, optim, states)
    state.done = True
    for p in params:
        p.requires_grad_(False)
    if checkpoint:
        checkpoint.save(tr, None, states)


def stage1_batch(cfg: DistillConfig, step: int, planned: int) -> tuple[int, int]:
    """(sequence length, batch) of a stage 1 step: lengths in order, equal shares, constant tokens per step."""
    phase = min(len(cfg.seq_lens) - 1, step * len(cfg.seq_lens) // max(1, planned))
    length = cfg.seq_lens[phase]
    return length, max(1, cfg.batch * cfg.seq_lens[0] // length)


def fingerprint(cfg: DistillConfig, weights_sha256: str, corpus_meta: dict) -> str:
    blob = json.dumps({"cfg": asdict(cfg), "weights": weights_sha256, "data": corpus_meta}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def distill(model, tokens: np.ndarray, cfg: DistillConfig, out: str | Path, *, base: dict, data_meta: dict,
            restart: bool = False, on_step: StepCallback | None = None,
            notice: Callable[[str], None] | None = None) -> dict:
    """Train an adapter for `model` (a `lolachat.model.Llama` with weights, no LoLA attached) and write it.

    `base` describes the base model (name, source, weights_sha256) for the metadata; `data_meta` the
    training text. Writes `out` (stage 2 adapter, or stage 1 when stage 2 has no steps) and, when both
    stages run, `<out stem>.stage1.lola.safetensors`. Returns the metadata written.
    """
    out = Path(out)
    device = next(model.parameters()).device
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    tr = Trainable(model, cfg, device)
    say = notice or (lambda message: None)
    ckpt = Checkpoint(Path(str(out) + ".ckpt"), fingerprint(cfg, base.get("weights_sha256", ""), data_meta))
    if restart and ckpt.path.exists():
        ckpt.path.unlink()
    saved = ckpt.load()
    states = {1: StageState(1), 2: StageState(2)}
    optim_state: dict | None = None
    if saved:
        tr.load(saved["params"])
        states = {int(k): StageState(**v) for k, v in saved["states"].items()}
        optim_state = saved["optim"]
        say(f"resuming from {ckpt.path} (stage 1 step {states[1].step}, stage 2 step {states[2].step})")
    longest = max(*cfg.seq_lens, cfg.stage2_seq_len)
    batches = Batches(tokens, device, cfg.seed, longest)
    evals: dict = {}

    def valid_stage1() -> float:
        length = cfg.seq_lens[0]
        losses = [stage1_loss(model, batches.valid(i, cfg.batch, length), tr, cfg, train=False)
                  for i in range(cfg.eval_batches)]
        return round(sum(losses) / len(losses), 5)

    def valid_stage2() -> tuple[float, float]:
        student, teacher = [], []
        for i in range(cfg.eval_batches):
            batch = batches.valid(i, cfg.stage2_batch, cfg.stage2_seq_len + 1)
            with torch.no_grad():
                student.append(float(next_token_loss(student_logits(model, batch, tr, cfg), batch)))
            teacher.append(teacher_loss(model, batch))
        return round(sum(student) / len(student), 5), round(sum(teacher) / len(teacher), 5)

    # stage 1: attention transfer
    s1 = states[1]
    if not s1.done and cfg.steps:
        if s1.step == 0:
            evals["stage1_valid_mse_init"] = valid_stage1()

        def step1(step: int) -> float:
            length, batch = stage1_batch(cfg, step, s1.planned)
            return stage1_loss(model, batches.train(1, step, batch, length), tr, cfg)

        run_stage(1, cfg.steps, cfg.seconds, step1, tr.stage_params(1), cfg.lr, cfg, s1, ckpt, tr, states,
                  optim_state if not s1.done else None, on_step)
        optim_state = None
    if cfg.steps:
        evals["stage1_valid_mse"] = valid_stage1()
    if cfg.stage2_steps:
        evals["stage1_valid_xent"], evals["teacher_valid_xent"] = valid_stage2()

    def metadata(stage: int) -> dict:
        return build_metadata(model, cfg, base, data_meta, states, evals, stage)

    s2 = states[2]
    if not cfg.stage2_steps:
        meta = metadata(1)
        save_adapter(tr.adapter(meta, with_lora=False), out)
    else:
        save_adapter(tr.adapter(metadata(1), with_lora=False), stage1_path(out))
        if not s2.done:
            def step2(step: int) -> float:
                batch = batches.train(2, step, cfg.stage2_batch, cfg.stage2_seq_len + 1)
                loss = next_token_loss(student_logits(model, batch, tr, cfg), batch)
                loss.backward()
                return float(loss.detach())

            run_stage(2, cfg.stage2_steps, cfg.stage2_seconds, step2, tr.stage_params(2), cfg.stage2_lr, cfg, s2,
                      ckpt, tr, states, optim_state, on_step)
        evals["stage2_valid_xent"], _ = valid_stage2()
        meta = metadata(2)
        save_adapter(tr.adapter(meta, with_lora=True), out)
    ckpt.path.unlink(missing_ok=True)
    return meta


def stage1_path(out: Path) -> Path:
    name = out.name
    stem = name[: -len(".lola.safetensors")] if name.endswith(".lola.safetensors") else out.stem
    return out.with_name(f"{stem}.stage1.lola.safetensors")


def build_metadata(model, cfg: DistillConfig, base: dict, data_meta: dict, states: dict[int, StageState],
                   evals: dict, stage: int) -> dict:
    from lolachat import __version__

    a = model.args
    s1, s2 = states[1], states[2]
    recipe = {
        "stage1": {
            "method": f"attention transfer (LoLCATs): MSE x {cfg.mse_factor:g} between exact softmax attention "
                      "outputs and the hybrid (terraced window + linear state, lambda = 0), per head before o_proj, "
                      "all layers jointly on teacher activations",
            "trainable": "phi_q, phi_k (Hedgehog, identity init), window_factor (init logit 0.1)",
            "optimizer": "Adam", "lr": cfg.lr, "schedule": f"cosine to {cfg.lr_final_ratio} x lr",
            "seq_lens": list(cfg.seq_lens), "batch": cfg.batch, "steps": s1.step, "steps_requested": cfg.steps,
            "tokens": sum(stage1_batch(cfg, i, max(1, s1.planned))[0] * stage1_batch(cfg, i, max(1, s1.planned))[1]
                          for i in range(s1.step)),
            "seconds": round(s1.seconds, 1), "mix": cfg.mix, "grad_clip": cfg.grad_clip,
        },
    }
    if stage == 2:
        recipe["stage2"] = {
            "method": "LoRA on q, k, v, o with next-token cross-entropy through the LoLA student "
                      "(sparse cache in the loop, eviction by self-recall error)",
            "lora_rank": cfg.lora_rank, "lora_alpha": cfg.lora_alpha, "sparse": cfg.sparse,
            "selection": cfg.selection, "mix": cfg.stage2_mix,
            "max_distance": cfg.max_distance, "optimizer": "Adam", "lr": cfg.stage2_lr,
            "seq_len": cfg.stage2_seq_len, "batch": cfg.stage2_batch, "steps": s2.step,
            "steps_requested": cfg.stage2_steps, "tokens": s2.step * cfg.stage2_batch * (cfg.stage2_seq_len + 1),
            "seconds": round(s2.seconds, 1),
        }
    curves = {"stage1_mse": s1.curve}
    if stage == 2:
        curves["stage2_xent"] = s2.curve
    meta = {
        "format": 1,
        "base_model": base.get("name"), "base_source": base.get("source"),
        "base_weights_sha256": base.get("weights_sha256"),
        "n_layers": a.n_layers, "n_heads": a.n_heads, "head_dim": a.head_dim,
        "feature_dim": 2 * ((cfg.feature_dim or 2 * a.head_dim) // 2), "phi_input": cfg.phi_input,
        "chunk": cfg.chunk, "mix": cfg.mix, "trained_mix": cfg.stage2_mix if stage == 2 else cfg.mix,
        "lora_rank": cfg.lora_rank if stage == 2 else None, "lora_alpha": cfg.lora_alpha if stage == 2 else None,
        "lora_scale": cfg.lora_scale if stage == 2 else None,
        "stage": stage, "recipe": recipe, "data": data_meta, "eval": dict(evals), "curves": curves,
        "created": datetime.now(UTC).isoformat(timespec="seconds"), "lolachat_version": __version__,
        "seed": cfg.seed,
    }
    return {k: v for k, v in meta.items() if v is not None}
