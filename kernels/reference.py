"""Pure-PyTorch reference of the LoLA math (DESIGN §4).

This is both the oracle the Triton kernels are tested against and the CPU path of the engine.
Shapes use B = batch, H = query heads, T = queries, N = keys, D = head dim, F = feature dim.
Linear-attention state (H_state [B,H,F,D], s [B,H,F]) is float32 always.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
    soft_num = torch.einsum("bhtn,bhnd->bhtd", w, values.float())
    return mix_linear(soft_num, w.sum(dim=-1, keepdim=True), m, phi_q, h_state, s_state, gamma, mix)


def mix_linear(soft_num, soft_den, m, phi_q, h_state, s_state, gamma, mix: str) -> torch.Tensor:
    """Combine the softmax sums (already scaled by e^{−m}) with the linear term (DESIGN §4.3).

    soft_num [B,H,T,D] = Σ e^{a_i−m} v_i, soft_den [B,H,T,1] = Σ e^{a_i−m}, m [B,H,T,1] the row max.
    """
    g = gamma.float().view(1, -1, 1, 1)
    soft_num, soft_den = g * soft_num, g * soft_den
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


# --- Fused references: what one kernel launch computes (the Triton kernels in ops.py match these) ---


def rope_rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., N, D] at `positions` (broadcastable to x without its last axis), as lola.Rope does."""
    freqs = positions.to(inv_freq.device).float().unsqueeze(-1) * inv_freq.float()
    emb = torch.cat([freqs, freqs], dim=-1)
    return apply_rope(x, emb.cos(), emb.sin())


def _expand_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    group = n_heads // x.shape[1]
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def _as_int(x) -> int:
    return int(x.reshape(-1)[0]) if isinstance(x, torch.Tensor) else int(x)


def query_positions(q_pos, n: int, device) -> torch.Tensor:
    """Positions [n] of a block of queries: given as a tensor, or as the int position of the first."""
    if isinstance(q_pos, torch.Tensor):
        return q_pos.to(device)
    return torch.arange(q_pos, q_pos + n, device=device)


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
    """One LoLA attention step for a block of queries of one chunk (DESIGN §4.3), from pre-RoPE inputs.

    q_pre [B,H,T,D] at positions q_pos ([T] tensor, or the int position of the first query);
    window_k/v [B,Hkv,W,D] pre-RoPE, slot j at position window_start + j (slots past the last query
    are ignored, whatever they hold); sparse_k/v [B,H,N,D] pre-RoPE at sparse_pos [B,H,N], of which
    the first `sparse_len` slots (default N) are in use; h_state [B,H,F,D], s_state [B,H,F] fp32;
    gamma [H] = sigmoid(window_factor); phi_weight [H,D,F/2] (the query feature map); inv_freq [D/2].
    window_start and sparse_len may be ints or one-element tensors. Returns [B,H,T,D] in q_pre's
    dtype (written into `out` when given).
    """
    n = q_pre.shape[2]
    n_heads = q_pre.shape[1]
    device = q_pre.device
    last = q_pos + n - 1 if isinstance(q_pos, int) else int(q_pos.max())  # ints: no host sync
    q_pos = query_positions(q_pos, n, device)
    start = _as_int(window_start)
    used = sparse_k.shape[2] if sparse_len is None else _as_int(sparse_len)
    q_rot = rope_rotate(q_pre, q_pos, inv_freq)

    window_len = min(window_k.shape[2], last - start + 1)
    win_pos = torch.arange(start, start + window_len, device=device)
    win_k = _expand_heads(rope_rotate(window_k[:, :, :window_len], win_pos, inv_freq), n_heads)
    win_v = _expand_heads(window_v[:, :, :window_len], n_heads)
    win_logits = torch.einsum("bhtd,bhnd->bhtn", q_rot.float(), win_k.float())
    causal = win_pos.view(1, -1) <= q_pos.view(-1, 1)
    logits, values = win_logits.masked_fill(~causal, float("-inf")), win_v

    if used:
        keys, pos = sparse_k[:, :, :used], sparse_pos[:, :, :used]
        q_capped = None
        if max_distance is not None:
            q_capped = rope_rotate(q_pre, torch.full((n,), max_distance, device=device), inv_freq)
        keys_rot = rope_rotate(keys, pos, inv_freq)
        sparse = sparse_logits(q_rot, q_capped, keys, keys_rot, q_pos, pos, max_distance)
        logits = torch.cat([sparse, logits], dim=-1)
        values = torch.cat([sparse_v[:, :, :used], values], dim=2)

    phi_in = q_rot if phi_input == "post_rope" else q_pre
    phi_q = hedgehog(phi_in, phi_weight)
    y = lola_combine(logits * scale, values, phi_q, h_state, s_state, gamma, mix).to(q_pre.dtype)
    if out is None:
        return y
    out.copy_(y)
    return out


EVICTION_SCORES = ("error", "relative", "others")
VALUE_NORM_FLOOR = 1e-6  # `relative` scoring: a value norm below this counts as this


def eviction_scores(phi_k: torch.Tensor, values: torch.Tensor, h_state: torch.Tensor, s_state: torch.Tensor,
                    score: str = "error") -> torch.Tensor:
    """Per-candidate eviction scores [B,H,N] (higher = kept) of phi_k [B,H,N,F], values [B,H,N,D].

    - "error" (DESIGN §4.4): ‖v − φ(k)ᵀH / (φ(k)ᵀs + ε)‖ against the state as it is (`self_recall_error`).
    - "relative": that error divided by ‖v‖, the share of the value the state cannot give back.
    - "others": the error against the state with every *other* candidate folded in as well
      (H + Σ_{j≠i} φ(k_j)v_jᵀ, and s likewise): a pair that the rest of the memory could recall (a
      near-copy of other cached or leaving pairs) scores low, so the λ slots are not spent on duplicates
      (docs/runs/l256-2k-diagnosis.md)."""
    if score == "others":
        v = values.float()
        h_all = h_state + torch.einsum("bhnf,bhnd->bhfd", phi_k, v)
        s_all = s_state + phi_k.sum(dim=2)
        self_dot = (phi_k * phi_k).sum(dim=-1, keepdim=True)  # φ_iᵀφ_i: candidate i's own share, taken out
        num = torch.einsum("bhnf,bhfd->bhnd", phi_k, h_all) - self_dot * v
        den = torch.einsum("bhnf,bhf->bhn", phi_k, s_all).unsqueeze(-1) - self_dot
        return torch.linalg.vector_norm(v - num / (den.clamp_min(0) + RECALL_EPS), dim=-1)
    err = self_recall_error(phi_k, values, h_state, s_state)
    if score == "relative":
        err = err / torch.linalg.vector_norm(values.float(), dim=-1).clamp_min(VALUE_NORM_FLOOR)
    elif score != "error":
        raise ValueError(f"score must be one of {', '.join(EVICTION_SCORES)}, not {score!r}")
    return err


def age_discount(scores: torch.Tensor, positions: torch.Tensor, halflife: float) -> torch.Tensor:
    """scores [B,H,N] × 0.5^(age / halflife), age = tokens back from the newest candidate (positions [B,H,N]):
    an old pair keeps its slot only while its score beats recent ones by the factor its age costs it, as the
    faded state forgets it (docs/quality.md §13.4). halflife 0 = scores unchanged."""
    if not halflife:
        return scores
    age = positions.amax(dim=-1, keepdim=True) - positions
    return scores * torch.exp2(-age.float() / halflife)


def keep_newest(scores: torch.Tensor, positions: torch.Tensor, slots: int) -> torch.Tensor:
    """scores [B,H,N] with the `slots` newest candidates (by positions [B,H,N]) raised to +inf, so they always
    keep a slot and only the rest of the λ slots go by score: a recency share beside the score's slots
    (docs/quality.md §14). slots 0 = scores unchanged."""
    if not slots:
        return scores
    newest = positions.topk(min(slots, positions.shape[-1]), dim=-1).indices
    return scores.scatter(-1, newest, float("inf"))


@dataclass(frozen=True)
class Recency:
    """How eviction favours recent pairs over the score alone: `halflife` discounts scores by age
    (`age_discount`), `slots` of the λ always go to the newest candidates (`keep_newest`). Both 0 = DESIGN §4.4.
    The heads in `exempt_heads` (indices into the scores' head dimension) take no recent slots: all their λ go
    by score, for the heads that read facts back from far in the context (docs/quality.md §15)."""

    halflife: float = 0
    slots: int = 0
    exempt_heads: tuple[int, ...] = ()

    def apply(self, scores: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        aged = age_discount(scores, positions, self.halflife)
        if not self.slots:
            return aged
        raised = keep_newest(aged, positions, self.slots)
        for start, stop in consecutive_runs(self.exempt_heads):  # slices: no host-to-device copy in a CUDA graph
            raised[:, start:stop] = aged[:, start:stop]
        return raised


def consecutive_runs(indices: tuple[int, ...]) -> list[tuple[int, int]]:
    """Sorted distinct indices as [start, stop) runs: (0, 1, 2, 6, 7) -> [(0, 3), (6, 8)]."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


NO_RECENCY = Recency()


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
    score: str = "error",
    fade: float = 1.0,
    recency: Recency = NO_RECENCY,
) -> torch.Tensor:
    """The competing branch of eviction (DESIGN §4.4): fade the state by `fade` (`LolaConfig.state_fade`),
    score, keep the top `capacity`, fold the rest.

    cand_k/v [B,H,N,D] (cand_k pre-RoPE) at cand_pos [B,H,N]: the sparse cache followed by the chunk
    leaving the window; phi_weight [H,D,F/2] is the key feature map. h_state/s_state are updated in
    place with the dropped pairs. Returns keep [B,H,capacity] (candidate order). With `group` > 1 the
    query heads of each group (whose candidates are the same) rank by the group's largest error, so
    they keep the same pairs: the group selection of `lola.LolaConfig` on per-head buffers. `score` is the
    eviction score (`eviction_scores`), shaped toward recent pairs by `recency` (`Recency`).
    """
    if fade != 1.0:
        h_state.mul_(fade)
        s_state.mul_(fade)
    x = rope_rotate(cand_k, cand_pos, inv_freq) if phi_input == "post_rope" else cand_k
    phi_k = hedgehog(x, phi_weight)
    scores = recency.apply(eviction_scores(phi_k, cand_v, h_state, s_state, score), cand_pos)
    keep, drop = select_keep(group_max(scores, group), capacity)
    fold(gather_tokens(phi_k, drop), gather_tokens(cand_v, drop), h_state, s_state)
    return keep


def group_scores(scores: torch.Tensor, group: int) -> torch.Tensor:
    """Per-query-head eviction scores [B,H,N] -> one per group of `group` consecutive heads [B,H/group,N].

    Max, not sum: a pair stays when any head of the group cannot recall it, which is what a head
    that retrieves through that pair needs; a sum would let two heads that recall it well outvote
    the one that depends on it (research/lola.md §6.2 measured max)."""
    return scores if group == 1 else scores.unflatten(1, (-1, group)).amax(dim=2)


def group_max(scores: torch.Tensor, group: int) -> torch.Tensor:
    """scores [B,H,N] -> each head's entry replaced by its group's score (`group_scores`), for per-head buffers."""
    if group == 1:
        return scores
    return group_scores(scores, group).repeat_interleave(group, dim=1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """weight * rmsnorm(x), normalised in float32 and rounded to x's dtype first (as `model.RMSNorm`)."""
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return torch.mul(weight, normed, out=out)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """x += delta in place (the residual add), then `rms_norm` of the sum."""
    x.add_(delta)
    return rms_norm(x, weight, eps, out=out)


def argmax_into(logits: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [B,1] (int64) = the first index of each row's maximum of logits [B,V] (greedy decoding)."""
    return out.copy_(logits.argmax(dim=-1, keepdim=True))


def silu_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up for the fused projection gate_up = [..., gate | up]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.mul(torch.nn.functional.silu(gate), up, out=out)


def norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor, silu: bool = False,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """W · rms_norm(x); with `silu`, W = [gate; up] and the result is silu(gate) · up. Into `out` if given
    (any float dtype: the result is rounded to x's dtype first)."""
    y = torch.nn.functional.linear(rms_norm(x, norm_weight, eps), weight)
    y = silu_mul(y) if silu else y
    return y if out is None else out.copy_(y)


def norm_qkv(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, wqkv: torch.Tensor, q_out: torch.Tensor,
             window_k: torch.Tensor, window_v: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """One decode token per batch row (x [B,1,dim]): [q; k; v] = wqkv · rms_norm(x); q into q_out [B,1,H·D],
    k and v into window slot `slot` (a one-element tensor) of window_k/window_v [B,Hkv,W,D]. Returns q_out."""
    return qkv_into_window(torch.nn.functional.linear(rms_norm(x, norm_weight, eps), wqkv), q_out, window_k,
                           window_v, slot)


def qkv_into_window(qkv: torch.Tensor, q_out: torch.Tensor, window_k: torch.Tensor, window_v: torch.Tensor,
                    slot: torch.Tensor) -> torch.Tensor:
    """Split [q; k; v] [B,1,·]: q into q_out, k and v into window slot `slot`. Returns q_out."""
    b, n_kv, _, d = window_k.shape
    q, k, v = qkv.split([q_out.shape[-1], n_kv * d, n_kv * d], dim=-1)
    window_k.index_copy_(2, slot, k.reshape(b, n_kv, 1, d))
    window_v.index_copy_(2, slot, v.reshape(b, n_kv, 1, d))
    return q_out.copy_(q)


def linear_add(y: torch.Tensor, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x += W · y in place (a projection and the residual add after it); returns x."""
    return x.add_(torch.nn.functional.linear(y, weight))


def assemble_candidates(sparse_k, sparse_v, sparse_pos, n_sparse: int, window_k, window_v, start, cand_k, cand_v,
                        cand_pos) -> None:
    """Eviction's candidate list, in place: cand[:n] = the sparse cache's first n rows; cand[n:n+C] = the
    window's oldest chunk (window [B,Hkv,2C,D], each KV head repeated for its query heads) at positions
    start..start+C−1. `start` is an int or a one-element tensor."""
    n, c = n_sparse, window_k.shape[2] // 2
    b, n_heads = sparse_k.shape[:2]
    group = n_heads // window_k.shape[1]
    cand_k[:, :, :n] = sparse_k[:, :, :n]
    cand_v[:, :, :n] = sparse_v[:, :, :n]
    cand_pos[:, :, :n] = sparse_pos[:, :, :n]
    cand_k[:, :, n : n + c] = window_k[:, :, :c].repeat_interleave(group, dim=1)
    cand_v[:, :, n : n + c] = window_v[:, :, :c].repeat_interleave(group, dim=1)
    cand_pos[:, :, n : n + c] = (torch.arange(c, device=cand_pos.device) + start).expand(b, n_heads, c)


def keep_and_shift(cand_k, cand_v, cand_pos, keep, sparse_k, sparse_v, sparse_pos, window_k, window_v,
                   next_k=None, next_v=None) -> None:
    """After eviction, in place: sparse = the candidates `keep` [B,H,λ] picks; window[:C] = window[C:]; and,
    when given, window[C:] = the next chunk's keys and values next_k, next_v [B,Hkv,C,D]."""
    sparse_k.copy_(gather_tokens(cand_k, keep))
    sparse_v.copy_(gather_tokens(cand_v, keep))
    sparse_pos.copy_(gather_tokens(cand_pos, keep))
    c = window_k.shape[2] // 2
    window_k[:, :, :c] = window_k[:, :, c:].clone()
    window_v[:, :, :c] = window_v[:, :, c:].clone()
    if next_k is not None:
        window_k[:, :, c:] = next_k
        window_v[:, :, c:] = next_v
