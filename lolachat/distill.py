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
softmax over its window and its sparse-cache members, and the linear state as a (faded) prefix sum over the
evictions of the φ(k)ᵀv that each eviction folded. Given the same cache membership and folds this is exactly
the recurrent computation of `lolachat.lola.LolaAttention`, the fading of `state_halflife` included
(tests/test_distill.py checks it).

Stage 2 can also continue from an existing adapter (`DistillConfig.init_adapter`, stage 1 skipped with
`steps = 0`), e.g. on longer sequences with the runtime's own window, λ and half-life in the loop; the written
adapter records what it continued from (`continued_from`: the parent file's sha256, its recipe and evals).
For long sequences `stage2_recompute` keeps only each layer's input for the backward pass (the layer is
recomputed, its sparse-cache schedule is not) and takes the loss in slices of the sequence.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lolachat.adapter import INIT_WINDOW_FACTOR, Adapter, load_adapter, save_adapter
from lolachat.errors import BadInput, LolachatError
from lolachat.kernels import reference as ref
from lolachat.lola import LayerAdapter, LolaConfig, expand_heads

CHECKPOINT_VERSION = 1
StepCallback = Callable[[str, int, int, float], None]  # (stage, step, planned steps, loss)


# ------------------------------------------------------------------------------------ configuration


def parse_memories(texts: str | tuple[str, ...] | list[str]) -> list[tuple[int, int, str]]:
    """(C, λ, selection) of each "C:λ:selection" text, e.g. "64:256:head" (a string: comma-separated); one
    clear message for a bad one."""
    if isinstance(texts, str):
        texts = [part for part in texts.split(",") if part.strip()]
    memories = []
    for text in texts:
        text = text.strip()
        parts = text.split(":")
        try:
            chunk, sparse, selection = int(parts[0]), int(parts[1]), parts[2]
        except (IndexError, ValueError):
            raise BadInput(f"a stage 2 memory is C:λ:selection, e.g. 64:256:head, not {text!r}") from None
        if len(parts) != 3 or chunk < 1 or sparse < 0 or selection not in ("head", "group"):
            raise BadInput(f"a stage 2 memory is C:λ:selection with C >= 1, λ >= 0 and selection head or group, "
                           f"not {text!r}")
        memories.append((chunk, sparse, selection))
    return memories


def memory_names(texts: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The "C:λ:selection" texts of `parse_memories`, checked and normalised."""
    return tuple(f"{c}:{lam}:{sel}" for c, lam, sel in parse_memories(texts))


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
    state_halflife: int = 0  # the linear state fades in the loop as at inference (lola.LolaConfig.state_halflife)
    stage2_recompute: bool = False  # keep only each layer's input for backward; loss in slices (long sequences)
    loss_slice: int = 4096  # tokens per slice of the loss with stage2_recompute
    init_adapter: str | None = None  # start from this adapter's maps, window factors and LoRA (a file)
    # other memories stage 2 takes turns with, step by step, after (chunk, sparse, selection): "C:λ:selection"
    stage2_memories: tuple[str, ...] = ()
    stage2_factor_lr: float = 0.0  # > 0: stage 2 also trains the window factors, at this rate
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
        if self.state_halflife < 0 or self.loss_slice < 1:
            raise BadInput("the state half-life must be >= 0 and the loss slice >= 1")
        if self.stage2_factor_lr < 0:
            raise BadInput("the window factors' stage 2 rate must be >= 0")
        self.stage2_memories = memory_names(self.stage2_memories)  # a malformed one is refused here
        memories = self.loop_memories()
        if len(set(memories)) != len(memories):
            raise BadInput("each stage 2 memory once: --stage2-memories repeats one (or --window/--sparse/--selection)")
        if (self.stage2_memories or self.stage2_factor_lr) and not self.stage2_steps:
            raise BadInput("stage 2 memories and the window factors' rate need stage 2 steps")

    def loop_memories(self) -> list[tuple[int, int, str]]:
        """(C, λ, selection) of the memories stage 2 trains under, in turn: this config's own first."""
        return [(self.chunk, self.sparse, self.selection), *parse_memories(self.stage2_memories)]

    def loop_memory(self, step: int) -> DistillConfig:
        """This config under the memory stage 2 trains with at `step` (the memories take turns)."""
        memories = self.loop_memories()
        chunk, sparse, selection = memories[step % len(memories)]
        if (chunk, sparse, selection) == (self.chunk, self.sparse, self.selection):
            return self
        return replace(self, chunk=chunk, sparse=sparse, selection=selection, stage2_memories=())

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


class Schedule(NamedTuple):
    """What inference's memory does over a sequence, chunk by chunk (from `sparse_schedule`).

    idx [B,H,N,S] / valid [1,1,N,S]: the sparse-cache members the queries of chunk n see (token positions);
    fold_idx [B,H,N,W] / fold_valid [1,1,N,W]: the pairs folded into the linear state when chunk n left the
    window (n = 0..N−3; the queries of chunk n + 2 are the first to see them)."""

    idx: torch.Tensor
    valid: torch.Tensor
    fold_idx: torch.Tensor
    fold_valid: torch.Tensor


def state_fade(chunk: int, state_halflife: int) -> float:
    """The factor on H and s before each eviction that folds: inference's own (lola.LolaConfig.state_fade)."""
    return LolaConfig(chunk=chunk, state_halflife=state_halflife).state_fade()


def _faded_prefix(x: torch.Tensor, fade: float) -> torch.Tensor:
    """x [B,H,N,...] per eviction -> [B,H,N,...]: out[n] = Σ_{j ≤ n−2} fade^(n−2−j) · x[j]."""
    if fade == 1.0:
        return _shift_chunks(torch.cumsum(x, dim=2), 2)
    n = x.shape[2]
    age = torch.arange(n, device=x.device).view(-1, 1) - 2 - torch.arange(n, device=x.device).view(1, -1)
    weights = torch.where(age >= 0, fade ** age.clamp_min(0).to(x.dtype), torch.zeros((), dtype=x.dtype,
                                                                                          device=x.device))
    return torch.einsum("nj,bhj...->bhn...", weights, x)


def hybrid_attention(q_pre: torch.Tensor, k_pre: torch.Tensor, v: torch.Tensor, phi_q: torch.Tensor,
                     phi_k: torch.Tensor, window_factor: torch.Tensor, inv_freq: torch.Tensor, *, chunk: int,
                     mix: str, phi_input: str, sparse: Schedule | None = None,
                     max_distance: int | None = None, state_halflife: int = 0) -> torch.Tensor:
    """LoLA attention over a whole sequence at positions 0..T−1, in parallel form; float32 [B,H,T,D].

    q_pre [B,H,T,D], k_pre / v [B,Hkv,T,D] (before RoPE); phi_q / phi_k [H,D,F/2]; window_factor [H].
    `sparse`: the sparse-cache members seen by the queries of each chunk and the pairs each eviction folded
    (token positions), from `sparse_schedule`; None = window + linear state only (λ = 0: every chunk folds
    whole as it leaves the window). `state_halflife` fades the linear state as inference does
    (lola.LolaConfig.state_halflife: × 0.5^(C / half-life) before each eviction that folds).
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
        idx, valid = sparse.idx, sparse.valid
        s = idx.shape[-1]
        flat = idx.reshape(b, h, n * s)
        ks = ref.gather_tokens(k, flat).view(b, h, n, s, d)
        vs = ref.gather_tokens(vv, flat).view(b, h, n, s, d)
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

    # linear state for chunk n: the pairs folded by the evictions of chunks 0..n−2, each faded once per later
    # eviction (every eviction folds once the cache is full, and before that nothing is in the state)
    if sparse is None:
        fold_fk, fold_v = fk, vc
    else:
        width = sparse.fold_idx.shape[-1]
        flat = sparse.fold_idx.reshape(b, h, n * width)
        fold_fk = ref.gather_tokens(fk_flat, flat).view(b, h, n, width, fk_flat.shape[-1])
        fold_fk = fold_fk * sparse.fold_valid.unsqueeze(-1)
        fold_v = ref.gather_tokens(vv, flat).view(b, h, n, width, d)
    fade = state_fade(c, state_halflife)
    h_state = _faded_prefix(torch.einsum("bhnwf,bhnwd->bhnfd", fold_fk, fold_v), fade)
    s_state = _faded_prefix(fold_fk.sum(dim=3), fade)
    lin_num = torch.einsum("bhncf,bhnfd->bhncd", fq, h_state)
    lin_den = torch.einsum("bhncf,bhnf->bhnc", fq, s_state).unsqueeze(-1)

    if sparse is not None:
        ws = torch.exp(sparse_logits - m)
        soft_num = soft_num + torch.einsum("bhncs,bhnsd->bhncd", ws, vs)
        soft_den = soft_den + ws.sum(dim=-1, keepdim=True)

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
                    n_heads: int, chunk: int, capacity: int, phi_input: str, selection: str = "head",
                    state_halflife: int = 0) -> Schedule | None:
    """Which tokens the sparse cache holds for the queries of each chunk, and which each eviction folds, as
    inference would decide.

    Replays DESIGN §4.4 over the chunks: chunk j leaves the window when chunk j+1 is complete, is appended
    while there is room, and otherwise competes with the cache by self-recall error against the linear
    state (faded first, as `lola.fade_state` does with `state_halflife`), the losers folded in; with
    `selection="group"` every head of a KV-head group keeps the group's set (reference.group_scores).
    Returns a `Schedule`, or None when no query ever sees a cached pair (λ = 0 or under 3 chunks).
    """
    b, _, t, _ = k_pre.shape
    c = chunk
    n = -(-t // c)
    if capacity == 0 or n < 3:
        return None
    group = n_heads // k_pre.shape[1] if selection == "group" else 1
    fade = state_fade(c, state_halflife)
    k = _expand(k_pre.float(), n_heads)
    vv = _expand(v.float(), n_heads)
    if phi_input == "post_rope":
        k = ref.rope_rotate(k, torch.arange(t, device=k.device), inv_freq)
    fk = ref.hedgehog(k, phi_k)
    h_state = torch.zeros(b, n_heads, fk.shape[-1], vv.shape[-1], device=k.device)
    s_state = torch.zeros(b, n_heads, fk.shape[-1], device=k.device)
    cache = torch.empty(b, n_heads, 0, dtype=torch.long, device=k.device)
    idx = torch.zeros(b, n_heads, n, capacity, dtype=torch.long, device=k.device)
    folds = torch.zeros(b, n_heads, n, c, dtype=torch.long, device=k.device)  # at most C fold per eviction
    sizes, fold_sizes = [0] * n, [0] * n
    for j in range(n - 2):  # chunk j leaves the window before the queries of chunk j + 2
        new = torch.arange(j * c, (j + 1) * c, device=k.device).expand(b, n_heads, c)
        if cache.shape[-1] + c <= capacity:
            cache = torch.cat([cache, new], dim=-1)
        else:
            if fade != 1.0:
                h_state.mul_(fade)
                s_state.mul_(fade)
            cand = torch.cat([cache, new], dim=-1)
            cand_fk, cand_v = ref.gather_tokens(fk, cand), ref.gather_tokens(vv, cand)
            scores = ref.self_recall_error(cand_fk, cand_v, h_state, s_state)
            keep, drop = (expand_heads(x, group) for x in ref.select_keep(ref.group_scores(scores, group), capacity))
            ref.fold(ref.gather_tokens(cand_fk, drop), ref.gather_tokens(cand_v, drop), h_state, s_state)
            fold_sizes[j] = drop.shape[-1]
            folds[:, :, j, : fold_sizes[j]] = ref.gather_tokens(cand, drop)
            cache = ref.gather_tokens(cand, keep)
        sizes[j + 2] = cache.shape[-1]
        idx[:, :, j + 2, : sizes[j + 2]] = cache

    def used(x: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(counts)
        valid = torch.arange(width, device=k.device).view(1, -1) < torch.tensor(counts, device=k.device).view(-1, 1)
        return x[..., :width], valid.view(1, 1, n, width)

    return Schedule(*used(idx, sizes), *used(folds, fold_sizes))


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

    def window_factors(self) -> list[torch.Tensor]:
        return [v for k, v in self.params.items() if k.endswith(".window_factor")]

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


def _student_layer(model, i: int, x: torch.Tensor, tr: Trainable, cfg: DistillConfig, inv_freq: torch.Tensor,
                   schedule=None, scheduled: bool = False) -> torch.Tensor:
    """One decoder layer of the student: x [B,T,dim] -> x. `scheduled`: `schedule` is this layer's already."""
    block = model.model.layers[i]
    attn = block.self_attn
    b, t, _ = x.shape
    q, k, v = layer_qkv(attn, block.input_layernorm(x), tr, i)
    phi_q, phi_k, wf = tr.layer(i)
    if not scheduled:
        schedule = layer_schedule(attn, k, v, phi_k, inv_freq, cfg)
    y = hybrid_attention(q, k, v, phi_q, phi_k, wf, inv_freq, chunk=cfg.chunk, mix=cfg.stage2_mix,
                         phi_input=cfg.phi_input, sparse=schedule, max_distance=cfg.max_distance,
                         state_halflife=cfg.state_halflife)
    y = y.to(x.dtype).transpose(1, 2).reshape(b, t, -1)
    x = x + _project(attn.o_proj, y, tr.lora(i, "o"), tr.lora_scale)
    return x + block.mlp(block.post_attention_layernorm(x))


def layer_schedule(attn, k: torch.Tensor, v: torch.Tensor, phi_k: torch.Tensor, inv_freq: torch.Tensor,
                   cfg: DistillConfig) -> Schedule | None:
    return sparse_schedule(k, v, phi_k, inv_freq, n_heads=attn.n_heads, chunk=cfg.chunk, capacity=cfg.sparse,
                           phi_input=cfg.phi_input, selection=cfg.selection, state_halflife=cfg.state_halflife)


def student_hidden(model, tokens: torch.Tensor, tr: Trainable, cfg: DistillConfig) -> torch.Tensor:
    """Last hidden states [B,T,dim] of the LoLA student, before the final norm (LoRA applied, sparse cache λ in
    the loop, stage 2 mix, the state fading as at inference).

    With `cfg.stage2_recompute` and gradients on, each layer keeps only its input for the backward pass and is
    run again there (torch.utils.checkpoint); its sparse-cache schedule, which needs no gradient, is computed
    once beforehand from the same k and v, so the backward pass does not replay the evictions."""
    inv_freq = model.rope.inv_freq.to(tokens.device)
    x = model.model.embed_tokens(tokens)
    recompute = cfg.stage2_recompute and torch.is_grad_enabled()
    for i, block in enumerate(model.model.layers):
        if not recompute:
            x = _student_layer(model, i, x, tr, cfg, inv_freq)
            continue
        with torch.no_grad():
            _, k, v = layer_qkv(block.self_attn, block.input_layernorm(x), tr, i)
            schedule = layer_schedule(block.self_attn, k, v, tr.layer(i)[1], inv_freq, cfg)
            del k, v
        x = checkpoint(_student_layer, model, i, x, tr, cfg, inv_freq, schedule, True, use_reentrant=False)
    return x


def _head_weight(model) -> torch.Tensor:
    return model.model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight


def student_logits(model, tokens: torch.Tensor, tr: Trainable, cfg: DistillConfig) -> torch.Tensor:
    """Logits [B,T,V] of the LoLA student (LoRA applied, sparse cache λ in the loop, stage 2 mix)."""
    return F.linear(model.model.norm(student_hidden(model, tokens, tr, cfg)), _head_weight(model))


def _slice_loss(model, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(model.model.norm(x), _head_weight(model))
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")


def student_loss(model, tokens: torch.Tensor, tr: Trainable, cfg: DistillConfig) -> torch.Tensor:
    """Mean next-token cross-entropy of the student over tokens [B,T]. With `cfg.stage2_recompute` the logits
    are made `cfg.loss_slice` positions at a time (and again in the backward pass), never [B,T,V] at once."""
    x = student_hidden(model, tokens, tr, cfg)
    if not cfg.stage2_recompute:
        return next_token_loss(F.linear(model.model.norm(x), _head_weight(model)), tokens)
    b, t = tokens.shape
    total = torch.zeros((), device=tokens.device)
    for start in range(0, t - 1, cfg.loss_slice):
        end = min(start + cfg.loss_slice, t - 1)
        piece, targets = x[:, start:end], tokens[:, start + 1 : end + 1]
        if torch.is_grad_enabled():
            total = total + checkpoint(_slice_loss, model, piece, targets, use_reentrant=False)
        else:
            total = total + _slice_loss(model, piece, targets)
    return total / (b * (t - 1))


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
              groups: list[tuple[list[torch.Tensor], float]], cfg: DistillConfig, state: StageState,
              checkpoint: Checkpoint | None, tr: Trainable, states: dict[int, StageState],
              optim_state: dict | None, on_step: StepCallback | None) -> None:
    """Adam with cosine decay over the planned steps; a time cap shortens the plan once speed is known.
    `groups`: (parameters, peak learning rate) pairs."""
    params = [p for group, _ in groups for p in group]
    for p in params:
        p.requires_grad_(True)
    optim = torch.optim.Adam([{"params": group, "lr": lr} for group, lr in groups])
    peaks = [lr for _, lr in groups]
    if optim_state is not None:
        optim.load_state_dict(optim_state)
    if not state.planned:
        state.planned = steps
    started = time.monotonic() - state.seconds
    window: list[float] = []
    log_every = max(1, min(25, steps // 40 or 1))
    timed_from, timed_steps = None, 0
    while state.step < state.planned:
        for group, peak in zip(optim.param_groups, peaks):
            group["lr"] = _cosine(state.step, state.planned, peak, cfg.lr_final_ratio)
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


def fingerprint(cfg: DistillConfig, weights_sha256: str, corpus_meta: dict, init_sha256: str = "") -> str:
    blob = json.dumps({"cfg": asdict(cfg), "weights": weights_sha256, "data": corpus_meta, "init": init_sha256},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def read_init_adapter(path: str | Path, model, cfg: DistillConfig, base: dict, tr: Trainable) -> dict:
    """Load the adapter at `path` into the trainable parameters and return its lineage record.

    It must fit this model and run: the same base weights (when it records them), φ input, feature dimension,
    and LoRA rank and scale (its LoRA, if any, is continued; without one LoRA starts from zero). Its chunk C,
    λ and selection may differ: continuing under other settings is the point. Refused with one message."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"initial adapter {path} does not exist")
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    try:
        adapter = load_adapter(path, model.args)
    except LolachatError as err:
        raise BadInput(f"cannot continue from {path}: {err}") from None
    meta, a = adapter.metadata, model.args
    problems = []
    for key, ours in (("n_layers", a.n_layers), ("n_heads", a.n_heads), ("head_dim", a.head_dim)):
        if meta.get(key, ours) != ours:
            problems.append(f"{key} = {meta[key]} where this model has {ours}")
    theirs, ours = meta.get("base_weights_sha256"), base.get("weights_sha256")
    if theirs and ours and theirs != ours:
        problems.append(f"base weights sha256 {theirs[:12]}… where this model's are {ours[:12]}…")
    if adapter.phi_input != cfg.phi_input:
        problems.append(f"feature maps on {adapter.phi_input} inputs (pass --phi-input {adapter.phi_input})")
    half, want_half = adapter.layers[0].phi_q.shape[-1], tr.layer(0)[0].shape[-1]
    if half != want_half:
        problems.append(f"feature dimension F = {2 * half} where this run has {2 * want_half} "
                        f"(pass --feature-dim {2 * half})")
    tensors = {}
    for i, layer in enumerate(adapter.layers):
        p = f"layers.{i}.attn."
        tensors.update({p + "phi_q": layer.phi_q, p + "phi_k": layer.phi_k, p + "window_factor": layer.window_factor})
    if adapter.lora:
        lora_names = {name for name in tr.params if ".lora_" in name}
        rank = adapter.lora[min(adapter.lora)].shape[0]
        scale = float(meta.get("lora_scale", cfg.lora_scale))
        if set(adapter.lora) != lora_names:
            problems.append("LoRA tensors other than lora_a / lora_b on q, k, v, o of every layer")
        elif rank != cfg.lora_rank or not math.isclose(scale, cfg.lora_scale):
            problems.append(f"LoRA of rank {rank} and scale {scale:g} where this run has rank {cfg.lora_rank} and "
                            f"scale {cfg.lora_scale:g} (pass --lora-rank {rank} --lora-alpha {scale * rank:g})")
        tensors.update(adapter.lora)
        if not cfg.stage2_steps:  # stage 1 alone writes maps only
            problems.append("LoRA, which a run without stage 2 steps would drop (give stage 2 steps)")
    if not problems:
        bad = [f"{name} {tuple(value.shape)} (this run: {tuple(tr.params[name].shape)})"
               for name, value in tensors.items() if value.shape != tr.params[name].shape]
        problems += [f"tensors of other shapes: {', '.join(bad[:3])}"] if bad else []
    if problems:
        raise BadInput(f"cannot continue from {path}: it has " + "; ".join(problems))
    tr.load(tensors)
    lineage = {
        "file": path.name, "sha256": sha256, "adapter_digest": adapter.digest(), "created": meta.get("created"),
        "stage": meta.get("stage"), "chunk": meta.get("chunk"), "lora": bool(adapter.lora),
        "recipe": meta.get("recipe"), "eval": meta.get("eval"), "continued_from": meta.get("continued_from"),
    }
    return {k: v for k, v in lineage.items() if v is not None}


def distill(model, tokens: np.ndarray, cfg: DistillConfig, out: str | Path, *, base: dict, data_meta: dict,
            restart: bool = False, on_step: StepCallback | None = None,
            notice: Callable[[str], None] | None = None) -> dict:
    """Train an adapter for `model` (a `lolachat.model.Llama` with weights, no LoLA attached) and write it.

    `base` describes the base model (name, source, weights_sha256) for the metadata; `data_meta` the
    training text. Writes `out` (stage 2 adapter, or stage 1 when stage 2 has no steps) and, when both
    stages run, `<out stem>.stage1.lola.safetensors`. With `cfg.init_adapter` training starts from that
    adapter (`read_init_adapter`); with `cfg.steps = 0` as well, stage 1 is skipped and no stage 1 file is
    written. Returns the metadata written.
    """
    out = Path(out)
    device = next(model.parameters()).device
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    tr = Trainable(model, cfg, device)
    say = notice or (lambda message: None)
    lineage = read_init_adapter(cfg.init_adapter, model, cfg, base, tr) if cfg.init_adapter else None
    if lineage:
        say(f"starting from {cfg.init_adapter} (sha256 {lineage['sha256'][:12]}, "
            f"{'maps and LoRA' if lineage['lora'] else 'maps only'})")
    ckpt = Checkpoint(Path(str(out) + ".ckpt"), fingerprint(cfg, base.get("weights_sha256", ""), data_meta,
                                                             lineage["sha256"] if lineage else ""))
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
    longest = max(*cfg.seq_lens, cfg.stage2_seq_len) if cfg.steps else cfg.stage2_seq_len
    batches = Batches(tokens, device, cfg.seed, longest)
    evals: dict = {}
    # the teacher beyond its own context is no reference (and its exact attention costs T²): skipped there
    teacher_fits = cfg.stage2_seq_len + 1 <= model.args.max_position

    def valid_stage1() -> float:
        length = cfg.seq_lens[0]
        losses = [stage1_loss(model, batches.valid(i, cfg.batch, length), tr, cfg, train=False)
                  for i in range(cfg.eval_batches)]
        return round(sum(losses) / len(losses), 5)

    def valid_stage2() -> tuple[float, float | None]:
        student, teacher = [], []
        for i in range(cfg.eval_batches):
            batch = batches.valid(i, cfg.stage2_batch, cfg.stage2_seq_len + 1)
            with torch.no_grad():
                student.append(float(student_loss(model, batch, tr, cfg)))
            if teacher_fits:
                teacher.append(teacher_loss(model, batch))
        return round(sum(student) / len(student), 5), round(sum(teacher) / len(teacher), 5) if teacher else None

    # stage 1: attention transfer
    s1 = states[1]
    if not s1.done and cfg.steps:
        if s1.step == 0:
            evals["stage1_valid_mse_init"] = valid_stage1()

        def step1(step: int) -> float:
            length, batch = stage1_batch(cfg, step, s1.planned)
            return stage1_loss(model, batches.train(1, step, batch, length), tr, cfg)

        run_stage(1, cfg.steps, cfg.seconds, step1, [(tr.stage_params(1), cfg.lr)], cfg, s1, ckpt, tr, states,
                  optim_state if not s1.done else None, on_step)
        optim_state = None
    if cfg.steps:
        evals["stage1_valid_mse"] = valid_stage1()
    s2 = states[2]
    if cfg.stage2_steps and s2.step == 0:  # the student before stage 2 (after a resume, that moment is gone)
        before, teacher = valid_stage2()
        evals["init_valid_xent" if lineage and not cfg.steps else "stage1_valid_xent"] = before
        if teacher is not None:
            evals["teacher_valid_xent"] = teacher
        else:
            say(f"no teacher reference: {cfg.stage2_seq_len + 1} tokens exceed the model's context "
                f"({model.args.max_position})")

    def metadata(stage: int) -> dict:
        return build_metadata(model, cfg, base, data_meta, states, evals, stage, lineage)

    if not cfg.stage2_steps:
        meta = metadata(1)
        save_adapter(tr.adapter(meta, with_lora=False), out)
    else:
        if cfg.steps or not lineage:
            save_adapter(tr.adapter(metadata(1), with_lora=False), stage1_path(out))
        if not s2.done:
            def step2(step: int) -> float:
                batch = batches.train(2, step, cfg.stage2_batch, cfg.stage2_seq_len + 1)
                loss = student_loss(model, batch, tr, cfg.loop_memory(step))
                loss.backward()
                return float(loss.detach())

            groups = [(tr.stage_params(2), cfg.stage2_lr)]
            if cfg.stage2_factor_lr:
                groups.append((tr.window_factors(), cfg.stage2_factor_lr))
            run_stage(2, cfg.stage2_steps, cfg.stage2_seconds, step2, groups, cfg, s2, ckpt, tr, states, optim_state,
                      on_step)
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
                   evals: dict, stage: int, lineage: dict | None = None) -> dict:
    """The adapter's metadata (DESIGN §4.5). `lineage`: the adapter this run continued from
    (`read_init_adapter`), recorded as `continued_from`; its stage 1 recipe stands when this run has none."""
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
            "seconds": round(s1.seconds, 1), "mix": cfg.mix, "grad_clip": cfg.grad_clip, "chunk": cfg.chunk,
        },
    }
    if lineage and not cfg.steps:  # stage 1 was not run here: the parent's stands
        recipe["stage1"] = {**(lineage.get("recipe") or {}).get("stage1", {}), "inherited_from": lineage["sha256"]}
        recipe["stage1"].setdefault("chunk", lineage.get("chunk"))
    elif lineage:
        recipe["stage1"]["init_adapter_sha256"] = lineage["sha256"]
    if stage == 2:
        recipe["stage2"] = {
            "method": "LoRA on q, k, v, o with next-token cross-entropy through the LoLA student "
                      "(sparse cache in the loop, eviction by self-recall error)",
            "lora_rank": cfg.lora_rank, "lora_alpha": cfg.lora_alpha, "sparse": cfg.sparse,
            "selection": cfg.selection, "mix": cfg.stage2_mix,
            "max_distance": cfg.max_distance, "optimizer": "Adam", "lr": cfg.stage2_lr,
            "seq_len": cfg.stage2_seq_len, "batch": cfg.stage2_batch, "steps": s2.step,
            "steps_requested": cfg.stage2_steps, "tokens": s2.step * cfg.stage2_batch * (cfg.stage2_seq_len + 1),
            "seconds": round(s2.seconds, 1), "chunk": cfg.chunk, "state_halflife": cfg.state_halflife,
            "recompute": cfg.stage2_recompute,
        }
        if len(cfg.loop_memories()) > 1:
            recipe["stage2"]["memories"] = [{"chunk": c, "sparse": lam, "selection": sel}
                                            for c, lam, sel in cfg.loop_memories()]
            recipe["stage2"]["method"] += ("; the memories take turns, one per step (the logged curve mixes them; "
                                           "the held-out losses use the first)")
        if cfg.stage2_factor_lr:
            recipe["stage2"]["window_factor_lr"] = cfg.stage2_factor_lr
            recipe["stage2"]["method"] += "; the window factors train too"
        if lineage:
            recipe["stage2"]["continued_from_sha256"] = lineage["sha256"]
            recipe["stage2"]["method"] += (f"; continued from {lineage['file']} (sha256 {lineage['sha256'][:12]}…, "
                                           f"its {'LoRA' if lineage['lora'] else 'maps, LoRA from zero'})")
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
        "seed": cfg.seed, "continued_from": lineage,
    }
    return {k: v for k, v in meta.items() if v is not None}
