"""Triton kernels of eviction (DESIGN §4.4) and the standalone Hedgehog feature map.

- `hedgehog`: φ(x) for a block of rows (reference: `reference.hedgehog`).
- `self_recall_error`: ‖v − φ(k)ᵀH / (φ(k)ᵀs + ε)‖ per pair from given φ(k), or `recall_scores`
  computing φ(k) in the same pass from pre-RoPE keys (reference: `reference.self_recall_error`).
- `select_keep`: the top-λ split of the scores per (batch, head): a radix search on the scores'
  order-preserving integer keys finds the λ-th largest score, then one pass splits the row (any N).
- `fold`: H += Σ φ(k)vᵀ, s += Σ φ(k) in place, from given φ(k) or from the rows an index list picks
  (the dropped ones): in `fold_keys` φ of those keys computed on the fly, in `fold_picked` read from
  the φ rows `recall_scores` stored (`phi_out`), which spares eviction a second φ (reference: `reference.fold`).
Each fold program owns one (batch, head) and a slice of D columns of H, so the sums need no atomics
and are deterministic. The fold also fades the state when asked (H <- fade·H + Σ φvᵀ), and the scores read it
faded, so a half-life costs no launch.
- `fold_and_keep`: `fold_picked` and `triton_moves.keep_and_shift` as one launch (disjoint outputs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import (
    RECALL_EPS,
    act_code,
    block,
    cos_sin,
    dot_f32,
    hedgehog_features,
    linear_readout,
    load_halves,
    load_rows,
    rotate,
    trig_mode,
)
from .triton_moves import check_keep_and_shift, keep_shift_block


@triton.jit
def _key_features(k_ptr, pos_ptr, w_ptr, invf_ptr, rows, row_valid, d, f_half, ACT: tl.constexpr,
                  POST_ROPE: tl.constexpr, TRIG: tl.constexpr, BLOCK_DH: tl.constexpr,
                  BLOCK_FH: tl.constexpr):
    """φ of one head's pre-RoPE key rows [n, D] (rotated at their positions first if POST_ROPE)."""
    d_half = d // 2
    k1, k2 = load_halves(k_ptr, rows, d, row_valid, d_half, d_half, BLOCK_DH)
    if POST_ROPE:
        dh = tl.arange(0, BLOCK_DH)
        inv_freq = tl.load(invf_ptr + dh, mask=dh < d_half, other=0.0)
        pos = tl.load(pos_ptr + rows, mask=row_valid, other=0)
        c, s = cos_sin(pos, inv_freq, TRIG)
        k1, k2 = rotate(k1, k2, c, s, ACT)
        k1, k2 = k1.to(tl.float32), k2.to(tl.float32)
    return hedgehog_features(k1, k2, w_ptr, d_half, f_half, BLOCK_DH, BLOCK_FH)


@triton.jit
def _given_features(phi_ptr, rows, row_valid, f_half, BLOCK_FH: tl.constexpr):
    """Stored φ rows [n, F] (float32) of one head, as their two halves."""
    phi_a = load_rows(phi_ptr, rows, 2 * f_half, row_valid, f_half, BLOCK_FH)
    phi_b = load_rows(phi_ptr + f_half, rows, 2 * f_half, row_valid, f_half, BLOCK_FH)
    return phi_a, phi_b


@triton.jit
def _hedgehog_kernel(x_ptr, w_ptr, out_ptr, sx_b, sx_h, sx_t, n_rows, n_heads, d: tl.constexpr,
                     f_half: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_DH: tl.constexpr, BLOCK_FH: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_valid = t < n_rows
    x1, x2 = load_halves(x_ptr + b * sx_b + h * sx_h, t, sx_t, t_valid, d // 2, d // 2, BLOCK_DH)
    phi_a, phi_b = hedgehog_features(x1, x2, w_ptr + h * d * f_half, d // 2, f_half, BLOCK_DH, BLOCK_FH)
    f = tl.arange(0, BLOCK_FH)
    mask = t_valid[:, None] & (f < f_half)[None, :]
    out = out_ptr + (pid_bh.to(tl.int64) * n_rows + t[:, None]) * (2 * f_half) + f[None, :]
    tl.store(out, phi_a, mask=mask)
    tl.store(out + f_half, phi_b, mask=mask)


@triton.jit
def _recall_kernel(phi_ptr, k_ptr, pos_ptr, v_ptr, h_ptr, s_ptr, w_ptr, invf_ptr, out_ptr, phi_out_ptr,
                   n_rows, n_heads, fade, d: tl.constexpr, f_half: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_DH: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_FH: tl.constexpr, FROM_KEYS: tl.constexpr, ACT: tl.constexpr,
                   POST_ROPE: tl.constexpr, TRIG: tl.constexpr, STORE_PHI: tl.constexpr,
                   LEAVE_ONE_OUT: tl.constexpr = False):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    h = pid_bh % n_heads
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = n < n_rows
    head_rows = pid_bh * n_rows
    if FROM_KEYS:
        phi_a, phi_b = _key_features(k_ptr + head_rows * d, pos_ptr + head_rows, w_ptr + h * d * f_half,
                                     invf_ptr, n, n_valid, d, f_half, ACT, POST_ROPE, TRIG,
                                     BLOCK_DH, BLOCK_FH)
        if STORE_PHI:
            f = tl.arange(0, BLOCK_FH)
            mask = n_valid[:, None] & (f < f_half)[None, :]
            phi_row = phi_out_ptr + (head_rows + n[:, None]) * (2 * f_half) + f[None, :]
            tl.store(phi_row, phi_a, mask=mask)
            tl.store(phi_row + f_half, phi_b, mask=mask)
    else:
        phi_a, phi_b = _given_features(phi_ptr + head_rows * 2 * f_half, n, n_valid, f_half, BLOCK_FH)
    state = pid_bh * 2 * f_half
    num, den = linear_readout(phi_a, phi_b, h_ptr + state * d, s_ptr + state, f_half, d, BLOCK_FH, BLOCK_D)
    v = load_rows(v_ptr + head_rows * d, n, d, n_valid, d, BLOCK_D)
    num, den = num * fade, den * fade
    if LEAVE_ONE_OUT:  # the state holds every candidate: take the row's own φφᵀ share back out
        self_dot = tl.sum(phi_a * phi_a, axis=1) + tl.sum(phi_b * phi_b, axis=1)
        num -= self_dot[:, None] * v
        den = tl.maximum(den - self_dot, 0.0)
    err = v - num / (den + RECALL_EPS)[:, None]
    tl.store(out_ptr + head_rows + n, tl.sqrt(tl.sum(err * err, axis=1)), mask=n_valid)


@triton.jit
def _fold_tile(phi_ptr, k_ptr, pos_ptr, v_ptr, idx_ptr, h_ptr, s_ptr, w_ptr, invf_ptr,
               n_rows, n_picked, n_heads, fade, pid_bh, pid_d, d: tl.constexpr, f_half: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_DH: tl.constexpr, BLOCK_DV: tl.constexpr,
               BLOCK_FH: tl.constexpr, FROM_KEYS: tl.constexpr, PICKED: tl.constexpr, ACT: tl.constexpr,
               POST_ROPE: tl.constexpr, TRIG: tl.constexpr):
    """Fold rows into H[:, D-slice] and (D-slice 0 only) s, after fading them: H <- fade·H + Σ φvᵀ. The rows
    are idx[...] if PICKED, else all n_picked rows; their φ from the keys (FROM_KEYS) or read from phi."""
    h = pid_bh % n_heads
    head_rows = pid_bh * n_rows
    cols = pid_d * BLOCK_DV + tl.arange(0, BLOCK_DV)
    col_valid = cols < d
    acc_a = tl.zeros([BLOCK_FH, BLOCK_DV], tl.float32)
    acc_b = tl.zeros([BLOCK_FH, BLOCK_DV], tl.float32)
    sum_a = tl.zeros([BLOCK_FH], tl.float32)
    sum_b = tl.zeros([BLOCK_FH], tl.float32)
    for i0 in range(0, n_picked, BLOCK_N):
        i = i0 + tl.arange(0, BLOCK_N)
        i_valid = i < n_picked
        if PICKED:
            rows = tl.load(idx_ptr + pid_bh * n_picked + i, mask=i_valid, other=0)
        else:
            rows = i
        if FROM_KEYS:
            phi_a, phi_b = _key_features(k_ptr + head_rows * d, pos_ptr + head_rows,
                                         w_ptr + h * d * f_half, invf_ptr, rows, i_valid, d, f_half,
                                         ACT, POST_ROPE, TRIG, BLOCK_DH, BLOCK_FH)
        else:
            phi_a, phi_b = _given_features(phi_ptr + head_rows * 2 * f_half, rows, i_valid, f_half,
                                           BLOCK_FH)
        phi_a = tl.where(i_valid[:, None], phi_a, 0.0)
        phi_b = tl.where(i_valid[:, None], phi_b, 0.0)
        v_mask = i_valid[:, None] & col_valid[None, :]
        v = tl.load(v_ptr + (head_rows + rows[:, None]) * d + cols[None, :], mask=v_mask, other=0.0)
        v = v.to(tl.float32)
        acc_a += dot_f32(tl.trans(phi_a), v)
        acc_b += dot_f32(tl.trans(phi_b), v)
        sum_a += tl.sum(phi_a, axis=0)
        sum_b += tl.sum(phi_b, axis=0)
    f = tl.arange(0, BLOCK_FH)
    f_valid = f < f_half
    state = pid_bh * 2 * f_half
    h_tile = h_ptr + (state + f[:, None]) * d + cols[None, :]
    mask = f_valid[:, None] & col_valid[None, :]
    tl.store(h_tile, fade * tl.load(h_tile, mask=mask) + acc_a, mask=mask)
    h_tile += f_half * d
    tl.store(h_tile, fade * tl.load(h_tile, mask=mask) + acc_b, mask=mask)
    if pid_d == 0:
        s_row = s_ptr + state + f
        tl.store(s_row, fade * tl.load(s_row, mask=f_valid) + sum_a, mask=f_valid)
        s_row += f_half
        tl.store(s_row, fade * tl.load(s_row, mask=f_valid) + sum_b, mask=f_valid)


@triton.jit
def _fold_kernel(phi_ptr, k_ptr, pos_ptr, v_ptr, idx_ptr, h_ptr, s_ptr, w_ptr, invf_ptr,
                 n_rows, n_picked, n_heads, fade, d: tl.constexpr, f_half: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_DH: tl.constexpr, BLOCK_DV: tl.constexpr,
                 BLOCK_FH: tl.constexpr, FROM_KEYS: tl.constexpr, PICKED: tl.constexpr, ACT: tl.constexpr,
                 POST_ROPE: tl.constexpr, TRIG: tl.constexpr):
    _fold_tile(phi_ptr, k_ptr, pos_ptr, v_ptr, idx_ptr, h_ptr, s_ptr, w_ptr, invf_ptr, n_rows, n_picked, n_heads,
               fade, tl.program_id(0).to(tl.int64), tl.program_id(1), d, f_half, BLOCK_N, BLOCK_DH, BLOCK_DV,
               BLOCK_FH, FROM_KEYS, PICKED, ACT, POST_ROPE, TRIG)


@triton.jit
def _fold_keep_kernel(phi_ptr, v_ptr, drop_ptr, h_ptr, s_ptr, n_rows, n_dropped, n_heads, fade,
                      ck_ptr, cv_ptr, cp_ptr, keep_ptr, sk_ptr, sv_ptr, sp_ptr, wk_ptr, wv_ptr, nk_ptr, nv_ptr,
                      lam, n_cand, chunk, w_len, group, sn_b, sn_h, sn_t, d: tl.constexpr, f_half: tl.constexpr,
                      FOLD_TILES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr,
                      BLOCK_FH: tl.constexpr, KEEP_BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      HAS_NEXT: tl.constexpr):
    """`fold_picked` and `keep_and_shift` in one launch: programs [0, FOLD_TILES) of each head fold its
    dropped rows into H, s; the others copy its kept rows into the sparse cache and shift the window. The
    two read the candidates and write disjoint buffers."""
    pid_bh = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    if pid < FOLD_TILES:
        _fold_tile(phi_ptr, v_ptr, v_ptr, v_ptr, drop_ptr, h_ptr, s_ptr, v_ptr, v_ptr, n_rows, n_dropped, n_heads,
                   fade, pid_bh, pid, d, f_half, BLOCK_N, 16, BLOCK_DV, BLOCK_FH, False, True, 0, False, 0)
    else:
        keep_shift_block(ck_ptr, cv_ptr, cp_ptr, keep_ptr, sk_ptr, sv_ptr, sp_ptr, wk_ptr, wv_ptr, nk_ptr, nv_ptr,
                         lam, n_cand, chunk, w_len, n_heads, group, d, sn_b, sn_h, sn_t, pid_bh, pid - FOLD_TILES,
                         KEEP_BLOCK_N, BLOCK_D, HAS_NEXT)


@triton.jit
def _order_key(s):
    """fp32 -> int32 whose signed order is the float order (NaN-free; -0.0 and +0.0 both map to 0)."""
    bits = s.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return tl.where(s == 0.0, 0, key)


@triton.jit
def _count_at_least(key, valid, thr):
    """counts[r] = #{valid i : key_i >= thr[r]} for a block of keys and R thresholds (one reduction)."""
    return tl.sum(((key[:, None] >= thr[None, :]) & valid[:, None]).to(tl.int32), axis=0)


@triton.jit
def _write_split(key, valid, i, t, tie_quota, tie_base, kept_base, keep_row, drop_row):
    """Keep key > t and the first `tie_quota` ties (key == t) in candidate order, counting the ties and keeps
    of earlier blocks (tie_base, kept_base); store the block's kept and dropped indices at their ranks."""
    eq = valid & (key == t)
    tie_rank = tie_base + tl.cumsum(eq.to(tl.int32), axis=0) - 1
    keep = valid & ((key > t) | (eq & (tie_rank < tie_quota)))
    kept = kept_base + tl.cumsum(keep.to(tl.int32), axis=0)  # keeps up to and including i
    tl.store(keep_row + kept - 1, i.to(tl.int64), mask=keep)
    tl.store(drop_row + (i - kept), i.to(tl.int64), mask=valid & ~keep)  # drops before i = i - keeps before i
    return tie_base + tl.sum(eq.to(tl.int32), axis=0), kept_base + tl.sum(keep.to(tl.int32), axis=0)


@triton.jit
def _select_kernel(scores_ptr, keep_ptr, drop_ptr, n, capacity, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr,
                   BITS: tl.constexpr):
    """Top-`capacity` of one (batch, head)'s n scores without ranking pairs.

    The scores' order keys (`_order_key`) are searched digit by digit, BITS bits per pass from the top,
    for t = the capacity-th largest key: u (the key with its sign bit flipped, so unsigned order) grows
    by the largest digit d with #{key >= (u | d << shift) ^ MIN} >= capacity, all 2^BITS candidate digits
    counted in one reduction. Then keep = key > t plus the first capacity - #{key > t} ties (key == t) in
    candidate order, which is the stable sort's top. Both lists are written in candidate order.
    ONE_BLOCK: the row sits in registers (n <= BLOCK); else every pass streams it in BLOCK chunks."""
    pid = tl.program_id(0).to(tl.int64)
    row = scores_ptr + pid * n
    lane = tl.arange(0, BLOCK)
    digit = tl.arange(0, 1 << BITS)
    sign = tl.full([], -2147483648, tl.int32)
    if ONE_BLOCK:
        valid = lane < n
        key = _order_key(tl.load(row + lane, mask=valid, other=0.0))
    u = tl.full([], 0, tl.int32)
    for p in range(32 // BITS):
        shift = 32 - BITS * (p + 1)
        thr = (u | (digit << shift)) ^ sign
        if ONE_BLOCK:
            count = _count_at_least(key, valid, thr)
        else:
            count = tl.zeros([1 << BITS], tl.int32)
            for c0 in range(0, n, BLOCK):
                i = c0 + lane
                ok = i < n
                count += _count_at_least(_order_key(tl.load(row + i, mask=ok, other=0.0)), ok, thr)
        best = tl.sum((count >= capacity).to(tl.int32), axis=0) - 1  # counts fall with the digit; digit 0 passes
        u = u | (best << shift)
    t = u ^ sign
    keep_row = keep_ptr + pid * capacity
    drop_row = drop_ptr + pid * (n - capacity)
    if ONE_BLOCK:
        n_above = tl.sum(((key > t) & valid).to(tl.int32), axis=0)
        _write_split(key, valid, lane, t, capacity - n_above, 0, 0, keep_row, drop_row)
    else:
        n_above = tl.full([], 0, tl.int32)
        for c0 in range(0, n, BLOCK):
            i = c0 + lane
            ok = i < n
            n_above += tl.sum(((_order_key(tl.load(row + i, mask=ok, other=0.0)) > t) & ok).to(tl.int32), axis=0)
        tie_base = tl.full([], 0, tl.int32)
        kept_base = tl.full([], 0, tl.int32)
        for c0 in range(0, n, BLOCK):
            i = c0 + lane
            ok = i < n
            key_c = _order_key(tl.load(row + i, mask=ok, other=0.0))
            tie_base, kept_base = _write_split(key_c, ok, i, t, capacity - n_above, tie_base, kept_base, keep_row,
                                               drop_row)


def _check_state(h_state: torch.Tensor, s_state: torch.Tensor) -> None:
    if h_state.dtype != torch.float32 or s_state.dtype != torch.float32:
        raise TypeError("the linear state (H, s) must be float32")
    if not (h_state.is_contiguous() and s_state.is_contiguous()):
        raise ValueError("h_state and s_state must be contiguous")


def _inv_freq_arg(inv_freq, like: torch.Tensor) -> torch.Tensor:
    return like.new_zeros(1, dtype=torch.float32) if inv_freq is None else inv_freq.float().contiguous()


def hedgehog(x: torch.Tensor, weight: torch.Tensor, block_t: int = 32, out=None) -> torch.Tensor:
    """Triton version of `reference.hedgehog`: x [B,H,T,D], weight [H,D,F/2] -> [B,H,T,F] float32.

    `out`, when given, is a contiguous float32 [B,H,T,F] tensor to write into."""
    b, n_heads, t, d = x.shape
    f_half = weight.shape[-1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    if out is None:
        out = torch.empty(b, n_heads, t, 2 * f_half, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(t, block_t), b * n_heads)
    _hedgehog_kernel[grid](x, weight.contiguous(), out, x.stride(0), x.stride(1), x.stride(2), t, n_heads,
                           d, f_half, BLOCK_T=block_t, BLOCK_DH=block(d // 2), BLOCK_FH=block(f_half))
    return out


def _recall(phi_k, keys, positions, values, h_state, s_state, weight, inv_freq, post_rope, out=None, block_n=32,
            num_warps=4, phi_out=None, fade=1.0, leave_one_out=False):
    _check_state(h_state, s_state)
    b, n_heads, n, d = values.shape
    f_half = h_state.shape[2] // 2
    values = values.contiguous()
    from_keys = phi_k is None
    dummy = values
    if out is None:
        out = torch.empty(b, n_heads, n, dtype=torch.float32, device=values.device)
    grid = (triton.cdiv(n, block_n), b * n_heads)
    _recall_kernel[grid](
        dummy if from_keys else phi_k.float().contiguous(),
        keys.contiguous() if from_keys else dummy,
        positions.contiguous() if from_keys and post_rope else dummy,
        values, h_state, s_state,
        weight.contiguous() if from_keys else dummy,
        _inv_freq_arg(inv_freq, values), out, dummy if phi_out is None else phi_out, n, n_heads, float(fade), d,
        f_half,
        BLOCK_N=block_n, BLOCK_DH=block(d // 2), BLOCK_D=block(d), BLOCK_FH=block(f_half),
        FROM_KEYS=from_keys, ACT=act_code(keys.dtype) if from_keys else 0, POST_ROPE=post_rope,
        TRIG=trig_mode(None), STORE_PHI=phi_out is not None, LEAVE_ONE_OUT=leave_one_out, num_warps=num_warps,
    )
    return out


def self_recall_error(phi_k, values, h_state, s_state, out=None) -> torch.Tensor:
    """Triton version of `reference.self_recall_error` (same arguments and result; `out` [B,H,N] fp32)."""
    return _recall(phi_k, None, None, values, h_state, s_state, None, None, False, out)


def recall_scores(keys, positions, values, h_state, s_state, weight, inv_freq=None, post_rope=False, out=None,
                  phi_out=None, fade=1.0):
    """Self-recall error of pre-RoPE keys [B,H,N,D] at positions [B,H,N], φ(k) computed in-kernel.

    Equals reference.self_recall_error(reference.hedgehog(k', weight), values, H, s) with k' the keys
    rotated at their positions when post_rope, else the keys themselves. `phi_out`, a contiguous float32
    [B,H,N,F] tensor, also receives those φ(k') rows (for `fold_picked`). With `fade` the errors are those
    against the state faded by it (fade·H, fade·s), which is left as it is.
    """
    if phi_out is not None and (phi_out.dtype != torch.float32 or not phi_out.is_contiguous()
                                or phi_out.shape != (*values.shape[:3], h_state.shape[2])):
        raise ValueError("phi_out must be a contiguous float32 [B,H,N,F] tensor")
    return _recall(None, keys, positions, values, h_state, s_state, weight, inv_freq, post_rope, out,
                   phi_out=phi_out, fade=fade)


def others_scores(phi_k, values, h_state, s_state, fade: float = 1.0, out=None) -> torch.Tensor:
    """Triton version of `reference.eviction_scores(..., "others")` against the state faded by `fade`: every
    candidate folded into a copy of the state (a scratch cached per shape, like `phi_scratch`), then each
    candidate's error against it with its own share taken back out. Four launches where the PyTorch ops take
    about fifteen, which on the GPU engine's prefill (one eviction per layer and chunk) were launch-bound."""
    h_all, s_all = _state_scratch(h_state, s_state)
    h_all.copy_(h_state)
    s_all.copy_(s_state)
    _fold(phi_k, None, None, values, None, h_all, s_all, None, None, False, fade=fade)
    return _recall(phi_k, None, None, values, h_all, s_all, None, None, False, out, leave_one_out=True)


def _fold(phi_k, keys, positions, values, index, h_state, s_state, weight, inv_freq, post_rope,
          block_n=64, block_dv=32, num_warps=4, fade=1.0):
    _check_state(h_state, s_state)
    b, n_heads, n, d = values.shape
    f_half = h_state.shape[2] // 2
    values = values.contiguous()
    from_keys = phi_k is None
    picked = n if index is None else index.shape[-1]
    if picked == 0 and fade == 1.0:
        return
    dummy = values
    block_dv = min(block_dv, block(d))
    grid = (b * n_heads, triton.cdiv(d, block_dv))
    _fold_kernel[grid](
        dummy if from_keys else phi_k.float().contiguous(),
        keys.contiguous() if from_keys else dummy,
        positions.contiguous() if from_keys and post_rope else dummy,
        values,
        dummy if index is None else index.contiguous(),
        h_state, s_state,
        weight.contiguous() if from_keys else dummy,
        _inv_freq_arg(inv_freq, values), n, picked, n_heads, float(fade), d, f_half,
        BLOCK_N=block_n, BLOCK_DH=block(d // 2), BLOCK_DV=block_dv, BLOCK_FH=block(f_half),
        FROM_KEYS=from_keys, PICKED=index is not None, ACT=act_code(keys.dtype) if from_keys else 0,
        POST_ROPE=post_rope, TRIG=trig_mode(None), num_warps=num_warps,
    )


def default_radix_bits(n: int) -> int:
    """`select_keep`'s bits per pass for rows of n candidates: 4 up to 512 (rounded up to a power of two), 2 above.
    On the H200 (docs/runs/h200-select-2026-11-29.txt), µs per layer for bits 1/2/4: N = 320: 9.3/6.4/5.7,
    N = 832: 11.5/8.1/8.5, N = 1088: 14.1/10.7/14.0."""
    return 4 if block(n) <= 512 else 2


def select_keep(scores: torch.Tensor, capacity: int, radix_bits: int | None = None, block_max: int = 4096,
                num_warps: int | None = None, out=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `reference.select_keep`: the same keep [B,H,capacity] (top scores, ties to the earlier
    candidate, in candidate order); drop [B,H,N-capacity] lists the rest in candidate order (the reference lists
    them by descending score; folding does not care). A radix search for the capacity-th largest score, any
    number of candidates, in 32 / radix_bits counting passes over the row plus one to split it; radix_bits
    defaults to `default_radix_bits(N)`. Rows of up to `block_max` candidates (rounded up to a power of two) are
    held in registers, longer ones are streamed in chunks of block_max on every pass. Scores must be NaN-free
    (±inf is fine). `out`, when given, is a contiguous int64 (keep, drop) pair to write into."""
    b, n_heads, n = scores.shape
    if not 0 <= capacity <= n:
        raise ValueError(f"capacity {capacity} outside 0..{n}")
    if radix_bits is None:
        radix_bits = default_radix_bits(n)
    if radix_bits not in (1, 2, 4, 8):
        raise ValueError(f"radix_bits {radix_bits} must divide 32")
    scores = scores.float().contiguous()
    if out is None:
        keep = torch.empty(b, n_heads, capacity, dtype=torch.long, device=scores.device)
        drop = torch.empty(b, n_heads, n - capacity, dtype=torch.long, device=scores.device)
    else:
        keep, drop = out
    if n:
        one_block = block(n) <= block_max
        block_n = block(n) if one_block else block_max
        if num_warps is None:
            num_warps = 4 if block_n <= 512 else 8
        _select_kernel[(b * n_heads,)](scores, keep, drop, n, capacity, BLOCK=block_n, ONE_BLOCK=one_block,
                                       BITS=radix_bits, num_warps=num_warps)
    return keep, drop


def fold(phi_k, values, h_state, s_state) -> None:
    """Triton version of `reference.fold`: H += Σ φ(k)vᵀ, s += Σ φ(k), in place."""
    _fold(phi_k, None, None, values, None, h_state, s_state, None, None, False)


def fold_keys(keys, positions, values, index, h_state, s_state, weight, inv_freq=None, post_rope=False,
              block_n: int = 64, fade: float = 1.0):
    """Fold the pairs index [B,H,M] picks out of keys/values [B,H,N,D] into H, s (faded by `fade` first); φ
    computed in-kernel."""
    _fold(None, keys, positions, values, index, h_state, s_state, weight, inv_freq, post_rope, block_n=block_n,
          fade=fade)


_PHI_SCRATCH: dict[tuple, torch.Tensor] = {}
_STATE_SCRATCH: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _state_scratch(h_state: torch.Tensor, s_state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 (H, s) pair shaped as the given state, cached per shape (allocated before any graph capture)."""
    key = (str(h_state.device), *h_state.shape)
    if key not in _STATE_SCRATCH:
        _STATE_SCRATCH[key] = (torch.empty_like(h_state, dtype=torch.float32),
                               torch.empty_like(s_state, dtype=torch.float32))
    return _STATE_SCRATCH[key]


def phi_scratch(rows: tuple[int, int, int], features: int, device) -> torch.Tensor:
    """A float32 [B,H,N,F] buffer for `recall_scores`' φ rows, cached per shape: eviction runs layer after layer
    on one stream, so the layers share it. Allocate it before capturing a CUDA graph (run the step once first)."""
    key = (str(device), *rows, features)
    if key not in _PHI_SCRATCH:
        _PHI_SCRATCH[key] = torch.empty(*rows, features, dtype=torch.float32, device=device)
    return _PHI_SCRATCH[key]


def fold_picked(phi_k, values, index, h_state, s_state, block_n: int = 64, fade: float = 1.0) -> None:
    """Fold the pairs index [B,H,M] picks out of φ(k) [B,H,N,F] (as `recall_scores` stores them) and values
    [B,H,N,D] into H, s (faded by `fade` first)."""
    _fold(phi_k, None, None, values, index, h_state, s_state, None, None, False, block_n=block_n, fade=fade)


def fold_and_keep(phi_k, values, drop, h_state, s_state, keep, cand_k, cand_v, cand_pos, sparse_k, sparse_v,
                  sparse_pos, window_k, window_v, next_k=None, next_v=None, fade: float = 1.0,
                  block_n: int = 64, block_dv: int = 32, keep_block_n: int = 64) -> None:
    """`fold_picked(phi_k, values, drop, h_state, s_state, fade=fade)` and `triton_moves.keep_and_shift(cand_k,
    cand_v, cand_pos, keep, sparse_k, ..., next_v)` in one launch (eviction's last step: λ ≥ 1)."""
    _check_state(h_state, s_state)
    strides = check_keep_and_shift(cand_k, cand_v, cand_pos, keep, sparse_k, sparse_v, sparse_pos, window_k,
                                   window_v, next_k, next_v)
    b, n_heads, n, d = values.shape
    lam = sparse_k.shape[2]
    f_half = h_state.shape[2] // 2
    block_dv = min(block_dv, block(d))
    fold_tiles = triton.cdiv(d, block_dv)
    has_next = next_k is not None
    grid = (b * n_heads, fold_tiles + triton.cdiv(lam, keep_block_n))
    _fold_keep_kernel[grid](
        phi_k.float().contiguous(), values.contiguous(), drop.contiguous(), h_state, s_state, n, drop.shape[-1],
        n_heads, float(fade), cand_k, cand_v, cand_pos, keep.contiguous(), sparse_k, sparse_v, sparse_pos,
        window_k, window_v, next_k if has_next else window_k, next_v if has_next else window_v, lam,
        cand_k.shape[2], window_k.shape[2] // 2, window_k.shape[2], n_heads // window_k.shape[1], *strides, d, f_half,
        FOLD_TILES=fold_tiles, BLOCK_N=block_n, BLOCK_DV=block_dv, BLOCK_FH=block(f_half), KEEP_BLOCK_N=keep_block_n,
        BLOCK_D=triton.next_power_of_2(d), HAS_NEXT=has_next, num_warps=4,
    )
