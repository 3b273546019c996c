"""The functions the engine calls, dispatched to Triton kernels or to the PyTorch reference.

Each function has the signature and result of its namesake in `reference.py`. The Triton kernel
runs for CUDA tensors; `LOLACHAT_TRITON=1` forces it for any tensor (with TRITON_INTERPRET=1 that
runs the kernels on the CPU, as the tests do) and `LOLACHAT_TRITON=0` forces the reference.
Without an importable Triton the reference always runs.

Fused steps (one launch for attention; score + sort + fold for eviction):
- `lola_attention`  — one LoLA attention step for a block of queries of one chunk (decode: T = 1).
- `evict_compete`   — the competing branch of eviction: score, keep top-λ, fold the rest into H, s.
- `rms_norm`, `add_rms_norm` (residual add + norm), `silu_mul` — the steps between a layer's GEMVs.
- `assemble_candidates`, `keep_and_shift` — eviction's data movement around `evict_compete`;
  `compete_and_keep` — `evict_compete` then `keep_and_shift`, the fold and the keep in one launch.
- `norm_qkv`, `norm_linear`, `linear_add` — decode GEMVs with the norm, the window write, SiLU·mul or
  the residual add fused in (one launch each).
Building blocks with the reference's signatures: `hedgehog`, `self_recall_error`, `select_keep`,
`fold`; and, PyTorch in both paths, `gather_tokens`, `sparse_logits`, `lola_combine`, `apply_rope`.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from . import reference as ref
from .reference import apply_rope, gather_tokens, lola_combine, sparse_logits  # noqa: F401

try:
    from . import triton_argmax, triton_attention, triton_eviction, triton_gemv, triton_moves, triton_norm
except ImportError:  # no Triton on this platform: the reference serves everything
    triton_argmax = triton_attention = triton_eviction = triton_gemv = triton_moves = triton_norm = None


def use_triton(x: torch.Tensor) -> bool:
    """Whether the Triton kernels serve tensors like `x` (see the module docstring)."""
    if triton_attention is None:
        return False
    forced = os.environ.get("LOLACHAT_TRITON")
    if forced in ("0", "1"):
        return forced == "1"
    return x.is_cuda


def hedgehog(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if use_triton(x):
        return triton_eviction.hedgehog(x, weight)
    return ref.hedgehog(x, weight)


def self_recall_error(phi_k: torch.Tensor, values: torch.Tensor, h_state: torch.Tensor, s_state: torch.Tensor):
    if use_triton(values):
        return triton_eviction.self_recall_error(phi_k, values, h_state, s_state)
    return ref.self_recall_error(phi_k, values, h_state, s_state)


def fold(phi_k: torch.Tensor, values: torch.Tensor, h_state: torch.Tensor, s_state: torch.Tensor) -> None:
    if use_triton(values):
        return triton_eviction.fold(phi_k, values, h_state, s_state)
    return ref.fold(phi_k, values, h_state, s_state)


# H200, µs per layer in a CUDA graph: 5.7 / 8.1 / 10.7 at N = 320 / 832 / 1088 vs ~55 for the stable sort.
def select_keep(scores: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Same keep as the reference; the Triton version lists drop in candidate order (see there)."""
    if use_triton(scores):
        return triton_eviction.select_keep(scores, capacity)
    return ref.select_keep(scores, capacity)


def lola_attention(
    q_pre: torch.Tensor,
    q_pos,
    window_k: torch.Tensor,
    window_v: torch.Tensor,
    window_start,
    sparse_k: torch.Tensor,
    sparse_v: torch.Tensor,
    sparse_pos: torch.Tensor,
    h_state: torch.Tensor,
    s_state: torch.Tensor,
    gamma: torch.Tensor,
    phi_weight: torch.Tensor,
    inv_freq: torch.Tensor,
    scale: float,
    mix: str,
    max_distance: int | None,
    phi_input: str,
    sparse_len=None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """See `reference.lola_attention`. For CUDA graphs pass q_pos, window_start and sparse_len as
    device tensors (then nothing is read on the host) and a preallocated `out`."""
    args = (q_pre, q_pos, window_k, window_v, window_start, sparse_k, sparse_v, sparse_pos, h_state, s_state,
            gamma, phi_weight, inv_freq, scale, mix, max_distance, phi_input)
    if use_triton(q_pre):
        return triton_attention.lola_attention(*args, sparse_len=sparse_len, out=out)
    return ref.lola_attention(*args, sparse_len=sparse_len, out=out)


def evict_compete(
    cand_k: torch.Tensor,
    cand_v: torch.Tensor,
    cand_pos: torch.Tensor,
    h_state: torch.Tensor,
    s_state: torch.Tensor,
    phi_weight: torch.Tensor,
    capacity: int,
    inv_freq: torch.Tensor,
    phi_input: str,
    group: int = 1,
    store_phi: bool = True,
    score: str = "error",
    fade: float = 1.0,
    recency: ref.Recency = ref.NO_RECENCY,
) -> torch.Tensor:
    """See `reference.evict_compete`. Triton: three launches (scores, top-λ split, fold), one more for the
    group maximum when `group` > 1; the fade happens inside the scores and the fold. With `store_phi` the
    scores also store φ(k) (in a scratch cached per shape) and the fold reads the dropped rows' φ from it;
    without, the fold recomputes their φ. Other scores are computed from the stored φ: "others" by
    `triton_eviction.others_scores`, "relative" by the reference's PyTorch ops (on the same device)."""
    if not use_triton(cand_v):
        return ref.evict_compete(cand_k, cand_v, cand_pos, h_state, s_state, phi_weight, capacity, inv_freq,
                                 phi_input, group, score, fade, recency)
    store_phi = store_phi or score != "error"
    phi = triton_eviction.phi_scratch(cand_v.shape[:3], h_state.shape[2], cand_v.device) if store_phi else None
    keep, drop = _split_by_score(cand_k, cand_v, cand_pos, h_state, s_state, phi_weight, capacity, inv_freq,
                                 phi_input, group, score, fade, phi, recency)
    if store_phi:
        triton_eviction.fold_picked(phi, cand_v, drop, h_state, s_state, fade=fade)
    else:
        triton_eviction.fold_keys(cand_k, cand_pos, cand_v, drop, h_state, s_state, phi_weight, inv_freq,
                                  phi_input == "post_rope", fade=fade)
    return keep


def _split_by_score(cand_k, cand_v, cand_pos, h_state, s_state, phi_weight, capacity, inv_freq, phi_input, group,
                    score, fade, phi, recency=ref.NO_RECENCY):
    """Triton: the candidates' scores against the faded state (their φ into `phi` if given), then (keep, drop).
    `recency` (ref.Recency) is PyTorch on the device, between the scores and the split."""
    scores = triton_eviction.recall_scores(cand_k, cand_pos, cand_v, h_state, s_state, phi_weight, inv_freq,
                                           phi_input == "post_rope", phi_out=phi, fade=fade)
    if score == "others":
        scores = triton_eviction.others_scores(phi, cand_v, h_state, s_state, fade)
    elif score != "error":
        faded = (h_state, s_state) if fade == 1.0 else (h_state * fade, s_state * fade)
        scores = ref.eviction_scores(phi, cand_v, *faded, score)
    scores = recency.apply(scores, cand_pos)
    return select_keep(ref.group_max(scores, group), capacity)


def compete_and_keep(cand: tuple, rows: int, h_state, s_state, phi_weight, capacity: int, inv_freq, phi_input: str,
                     sparse: tuple, window_k, window_v, next_k=None, next_v=None, group: int = 1,
                     score: str = "error", fade: float = 1.0, recency: ref.Recency = ref.NO_RECENCY) -> None:
    """Eviction once its candidates are assembled (λ ≥ 1): `evict_compete` on the first `rows` rows of the
    candidate buffers cand = (cand_k, cand_v, cand_pos), then `keep_and_shift` of the winners into the sparse
    cache sparse = (sparse_k, sparse_v, sparse_pos), the window shifted and the next chunk appended. Triton:
    the scores, the top-λ split, then the fold and the keep in one launch (`triton_eviction.fold_and_keep`)."""
    head = tuple(t[:, :, :rows] for t in cand)
    if not (use_triton(cand[1]) and cand[0].is_contiguous()):
        keep = evict_compete(*head, h_state, s_state, phi_weight, capacity, inv_freq, phi_input, group,
                             score=score, fade=fade, recency=recency)
        keep_and_shift(*cand, keep, *sparse, window_k, window_v, next_k, next_v)
        return
    phi = triton_eviction.phi_scratch(head[1].shape[:3], h_state.shape[2], head[1].device)
    keep, drop = _split_by_score(*head, h_state, s_state, phi_weight, capacity, inv_freq, phi_input, group, score,
                                 fade, phi, recency)
    triton_eviction.fold_and_keep(phi, head[1], drop, h_state, s_state, keep, *cand, *sparse, window_k, window_v,
                                  next_k, next_v, fade=fade)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    if use_triton(x):
        return triton_norm.rms_norm(x, weight, eps, out=out)
    return ref.rms_norm(x, weight, eps, out=out)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """x += delta in place; returns weight * rmsnorm(x). One launch on the Triton path."""
    if use_triton(x):
        return triton_norm.add_rms_norm(x, delta, weight, eps, out=out)
    return ref.add_rms_norm(x, delta, weight, eps, out=out)


def argmax_into(logits: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Greedy decoding's token: out [B,1] = argmax of logits [B,V]. One launch on the Triton path."""
    if use_triton(logits):
        return triton_argmax.argmax_into(logits, out)
    return ref.argmax_into(logits, out)


def silu_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    if use_triton(gate_up):
        return triton_norm.silu_mul(gate_up, out=out)
    return ref.silu_mul(gate_up, out=out)


def fused_gemv(x: torch.Tensor, n_out: int, k_dim: int) -> bool:
    """Whether a fused GEMV kernel serves `x` for this shape: on the Triton path, unless the shape measured
    faster unfused (`triton_gemv.CONFIGS`) or LOLACHAT_FUSED_GEMV=0. Unfused, the projection is cuBLAS
    and the steps around it the separate kernels."""
    return (use_triton(x) and os.environ.get("LOLACHAT_FUSED_GEMV") != "0"
            and triton_gemv.gemv_config(n_out, k_dim) is not None)


def norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor, silu: bool = False,
                out: torch.Tensor | None = None) -> torch.Tensor:
    if fused_gemv(x, weight.shape[0] // 2 if silu else weight.shape[0], weight.shape[1]):
        return triton_gemv.norm_linear(x, norm_weight, eps, weight, silu=silu, out=out)
    y = F.linear(rms_norm(x, norm_weight, eps), weight)
    if silu:
        return silu_mul(y, out=out)
    return y if out is None else out.copy_(y)


def norm_qkv(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, wqkv: torch.Tensor, q_out: torch.Tensor,
             window_k: torch.Tensor, window_v: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    if fused_gemv(x, wqkv.shape[0], wqkv.shape[1]):
        return triton_gemv.norm_qkv(x, norm_weight, eps, wqkv, q_out, window_k, window_v, slot)
    return ref.qkv_into_window(F.linear(rms_norm(x, norm_weight, eps), wqkv), q_out, window_k, window_v, slot)


def linear_add(y: torch.Tensor, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if fused_gemv(x, weight.shape[0], weight.shape[1]):
        return triton_gemv.linear_add(y, weight, x)
    return x.add_(F.linear(y, weight))


def assemble_candidates(sparse_k, sparse_v, sparse_pos, n_sparse: int, window_k, window_v, start, cand_k, cand_v,
                        cand_pos) -> None:
    if use_triton(cand_v) and cand_k.shape[2] == sparse_k.shape[2] + window_k.shape[2] // 2:
        return triton_moves.assemble_candidates(sparse_k, sparse_v, sparse_pos, n_sparse, window_k, window_v, start,
                                                cand_k, cand_v, cand_pos)
    return ref.assemble_candidates(sparse_k, sparse_v, sparse_pos, n_sparse, window_k, window_v, start, cand_k,
                                   cand_v, cand_pos)


def keep_and_shift(cand_k, cand_v, cand_pos, keep, sparse_k, sparse_v, sparse_pos, window_k, window_v,
                   next_k=None, next_v=None) -> None:
    args = (cand_k, cand_v, cand_pos, keep, sparse_k, sparse_v, sparse_pos, window_k, window_v, next_k, next_v)
    if use_triton(cand_v) and sparse_k.shape[2] > 0 and cand_k.is_contiguous():
        return triton_moves.keep_and_shift(*args)
    return ref.keep_and_shift(*args)
