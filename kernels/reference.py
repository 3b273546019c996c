"""Pure-PyTorch reference of the LoLA math (DESIGN §4).

This is both the oracle the Triton kernels are tested against and the CPU path of the engine.
Shapes use B = batch, H = query heads, T = queries, N = keys, D = head dim, F = feature dim.
Linear-attention state (H_state [B,H,F,D], s [B,H,F]) is float32 always.
"""

from __future__ import annotations

import math

import torch

PHI_CLAMP = 1e-12
RECALL_EPS = 1e-6


def hedgehog(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Hedgehog feature map φ(x) = [softmax(xW), softmax(−xW)] per head.

    x: [B, H, T, D]; weight: [H, D, F/2]  ->  [B, H, T, F] in float32.
    """
    z = torch.einsum("bhtd,hdf->bhtf", x.float(), weight.float())
    return torch.cat([torch.softmax(z, dim=-1), torch.softmax(-z, dim=-1)], dim=-1).clamp_min(PHI_CLAMP)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the Hugging Face (rotate-half) layout; cos/sin broadcast against x."""
    return (x.float() * cos + rotate_half(x.float()) * sin).to(x.dtype)


def sparse_logits(
    q_rot: torch.Tensor,
    q_capped: torch.Tensor,
    keys_pre: torch.Tensor,
    keys_rot: torch.Tensor,
    query_pos: torch.Tensor,
    key_pos: torch.Tensor,
    max_distance: int | None,
) -> torch.Tensor:
    """Logits of queries against sparse-cache keys with the distance capped (DESIGN §4.4b).

    q_rot: queries rotated at their own positions [B,H,T,D]; q_capped: the same queries rotated by
    `max_distance` only (None when there is no cap); keys_pre / keys_rot: cached keys before RoPE and
    rotated at their own positions [B,H,N,D]; query_pos [T]; key_pos [B,H,N]. Unscaled dot products.
    A key farther than the cap behaves as if it sat exactly `max_distance` tokens back, so its logit
    is <R(cap)·q, k_pre> — one rotation of the query serves all far keys.
    """
    near = torch.einsum("bhtd,bhnd->bhtn", q_rot.float(), keys_rot.float())
    if max_distance is None or q_capped is None:
        return near
    far = torch.einsum("bhtd,bhnd->bhtn", q_capped.float(), keys_pre.float())
    distance = query_pos.view(1, 1, -1, 1) - key_pos.unsqueeze(2)
    return torch.where(distance > max_distance, far, near)


def lola_combine(
    logits: torch.Tensor,
    values: torch.Tensor,
    phi_q: torch.Tensor,
    h_state: torch.Tensor,
    s_state: torch.Tensor,
    gamma: torch.Tensor,
    mix: str,
) -> torch.Tensor:
    """The LoLA output of DESIGN §4.3 from precomputed, scaled logits.

    logits: [B,H,T,N] (q·k/√D, −inf where masked; every row has at least one finite entry);
    values: [B,H,N,D]; phi_q: [B,H,T,F]; h_state [B,H,F,D], s_state [B,H,F] (fp32); gamma [H].
    Returns float32 [B,H,T,D].
    """
    m = logits.max(dim=-1, keepdim=True).values
    w = torch.exp(logits - m)
    g = gamma.float().view(1, -1, 1, 1)
    soft_num = g * torch.einsum("bhtn,bhnd->bhtd", w, values.float())
    soft_den = g * w.sum(dim=-1, keepdim=True)
    lin_num = torch.einsum("bhtf,bhfd->bhtd", phi_q, h_state)
    lin_den = torch.einsum("bhtf,bhf->bht", phi_q, s_state).unsqueeze(-1)
    if mix == "lola":
        scale = (1.0 - g) * torch.exp(-m)
        return (soft_num + scale * lin_num) / (soft_den + scale * lin_den)
    if mix == "lolcats":
        return (soft_num + lin_num) / (soft_den + lin_den)
    raise ValueError(f"unknown mix {mix!r} (expected 'lola' or 'lolcats')")


def self_recall_error(phi_k: torch.Tensor, values: torch.Tensor, h_state: torch.Tensor, s_state: torch.Tensor):
    """‖v − φ(k)ᵀH / (φ(k)ᵀs + ε)‖₂ per pair (DESIGN §4.4). phi_k [B,H,N,F], values [B,H,N,D] -> [B,H,N]."""
    recalled = torch.einsum("bhnf,bhfd->bhnd", phi_k, h_state)
    norm = torch.einsum("bhnf,bhf->bhn", phi_k, s_state).unsqueeze(-1) + RECALL_EPS
    return torch.linalg.vector_norm(values.float() - recalled / norm, dim=-1)


def fold(phi_k: torch.Tensor, values: torch.Tensor, h_state: torch.Tensor, s_state: torch.Tensor):
    """Add pairs to the linear state in place: H += Σ φ(k)vᵀ, s += Σ φ(k)."""
    h_state += torch.einsum("bhnf,bhnd->bhfd", phi_k, values.float())
    s_state += phi_k.sum(dim=2)


def select_keep(scores: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices to keep (top-`capacity` scores, in candidate order) and to fold, per (batch, head).

    Ties break deterministically toward the earlier candidate (stable sort).
    scores [B,H,N] -> (keep [B,H,capacity], drop [B,H,N-capacity]).
    """
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    keep = order[..., :capacity].sort(dim=-1).values
    drop = order[..., capacity:]
    return keep, drop


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B,H,N,...] gathered along N with index [B,H,M]."""
    if x.dim() == 3:
        return torch.gather(x, 2, index)
    return torch.gather(x, 2, index.unsqueeze(-1).expand(*index.shape, x.shape[-1]))


def softmax_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
