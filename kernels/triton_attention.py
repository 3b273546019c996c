"""Triton kernels of one LoLA attention step (DESIGN §4.3) for a block of queries of one chunk.

One launch per layer serves decode (T = 1) and per-chunk prefill (T ≤ C). The reference is
`reference.lola_attention`. For BLOCK_T queries of one (batch, head) the work is: RoPE of the
queries (and of the query at the capped distance), RoPE of the cached keys at their positions,
logits against the sparse cache (capped-distance rule of `reference.sparse_logits`) and against the
window (causal), a max-stabilised softmax, the Hedgehog map φ(q), the linear readout φ(q)ᵀH, φ(q)ᵀs
and the final mix. Two kernels do it:

- `_single_kernel`: one program walks all key blocks with an online softmax, then adds the
  linear term. Few programs (B·H at decode), each a chain of dependent memory round trips.
- `_split_kernel`: the key blocks and the linear term are spread over programs
  (one block each) that write partial (max, sum, weighted-V) triples; the last program of each
  (batch, head, query block) to finish — an atomic counter tells — merges them. Still one launch;
  the counters reset themselves, so the launch can be replayed from a CUDA graph.

`lola_attention` picks the split kernel when the single one would leave most SMs idle (decode,
small models) and the single one otherwise (`prefer_split`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import (
    act_code,
    block,
    cos_sin,
    dot_act,
    dot_rows,
    dot_rows_t,
    hedgehog_features,
    linear_readout,
    load_act_rows,
    load_halves,
    rotate,
    round_act,
    trig_mode,
)

# ----------------------------------------------------------------------------------- building blocks


@triton.jit
def _queries(q_head, qpos_ptr, q_pos0, pid_t, n_queries, sq_t, invf_ptr, d_half, max_distance,
             BLOCK_T: tl.constexpr, BLOCK_DH: tl.constexpr, ACT: tl.constexpr, QPOS_TENSOR: tl.constexpr,
             HAS_CAP: tl.constexpr, TRIG: tl.constexpr):
    """Rows, positions and rotations (own position; capped distance) of one block of queries."""
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_valid = t < n_queries
    q1, q2 = load_halves(q_head, t, sq_t, t_valid, d_half, d_half, BLOCK_DH)
    if QPOS_TENSOR:
        q_pos = tl.load(qpos_ptr + t, mask=t_valid, other=0).to(tl.int64)
    else:
        q_pos = q_pos0 + t.to(tl.int64)
    dh = tl.arange(0, BLOCK_DH)
    inv_freq = tl.load(invf_ptr + dh, mask=dh < d_half, other=0.0)
    qc, qs = cos_sin(q_pos, inv_freq, TRIG)
    qr1, qr2 = rotate(q1, q2, qc, qs, ACT)  # kept in the activation dtype: fewer registers
    if HAS_CAP:
        cc, cs = cos_sin(tl.full([BLOCK_T], max_distance, tl.int64), inv_freq, TRIG)
        qcap1, qcap2 = rotate(q1, q2, cc, cs, ACT)
    else:
        qcap1, qcap2 = qr1, qr2
    return t, t_valid, q_pos, inv_freq, qr1, qr2, qcap1, qcap2


@triton.jit
def _extent(t_valid, q_pos, wstart_ptr, window_start, slen_ptr, sparse_len, window_size,
            START_TENSOR: tl.constexpr, SLEN_TENSOR: tl.constexpr):
    """(sparse slots in use, window start position, window slots up to the last query)."""
    if SLEN_TENSOR:
        n_sparse = tl.load(slen_ptr).to(tl.int32)
    else:
        n_sparse = sparse_len
    if START_TENSOR:
        w_start = tl.load(wstart_ptr).to(tl.int64)
    else:
        w_start = window_start
    last_pos = tl.max(tl.where(t_valid, q_pos, -1), axis=0)
    n_window = tl.minimum(last_pos - w_start + 1, window_size).to(tl.int32)
    return n_sparse, w_start, n_window


@triton.jit
def _softmax_step(m, den, acc, logits, v, ACT: tl.constexpr, VEC: tl.constexpr):
    """Fold one block of scaled logits [BT, BN] (−inf = masked) and values [BN, BD] into (m, den, acc).
    VEC (one query): p stays float32 and meets v in plain products; else p is rounded for the tensor cores."""
    m_new = tl.maximum(m, tl.max(logits, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_safe)
    p = tl.exp(logits - m_safe[:, None])
    den = den * alpha + tl.sum(p, axis=1)
    if VEC:
        acc = acc * alpha[:, None] + dot_rows(p, v)
    else:
        acc = acc * alpha[:, None] + dot_act(p, v, ACT)
    return m_new, den, acc


@triton.jit
def _logits(q1, q2, k1, k2, ACT: tl.constexpr, VEC: tl.constexpr):
    """q · k over half-split rows: queries [BT, DH], keys [BN, DH]; unscaled, [BT, BN]."""
    if VEC:
        return dot_rows_t(q1, k1) + dot_rows_t(q2, k2)
    else:
        return dot_act(q1, tl.trans(k1), ACT) + dot_act(q2, tl.trans(k2), ACT)


@triton.jit
def _rotated_logits(qr1, qr2, k1, k2, k_pos, inv_freq, ACT: tl.constexpr, TRIG: tl.constexpr, VEC: tl.constexpr):
    """q_rot · k_rot for keys k (pre-RoPE halves) rotated at their positions; unscaled, [BT, BN]."""
    kc, ks = cos_sin(k_pos, inv_freq, TRIG)
    kr1, kr2 = rotate(k1.to(tl.float32), k2.to(tl.float32), kc, ks, ACT)
    return _logits(qr1, qr2, kr1, kr2, ACT, VEC)


@triton.jit
def _sparse_block(m, den, acc, n0, sk_head, sv_head, spos_head, ss_n, n_sparse, q_pos, qr1, qr2, qcap1, qcap2,
                  inv_freq, scale, max_distance, d, d_half, BLOCK_N: tl.constexpr, BLOCK_DH: tl.constexpr,
                  BLOCK_D: tl.constexpr, ACT: tl.constexpr, HAS_CAP: tl.constexpr, TRIG: tl.constexpr,
                  VEC: tl.constexpr):
    """Sparse-cache keys n0..n0+BLOCK_N at their own positions, distance capped at max_distance."""
    n = n0 + tl.arange(0, BLOCK_N)
    n_valid = n < n_sparse
    k1 = load_act_rows(sk_head, n, ss_n, n_valid, d_half, BLOCK_DH, ACT)
    k2 = load_act_rows(sk_head + d_half, n, ss_n, n_valid, d_half, BLOCK_DH, ACT)
    k_pos = tl.load(spos_head + n, mask=n_valid, other=0)
    v = load_act_rows(sv_head, n, ss_n, n_valid, d, BLOCK_D, ACT)
    if HAS_CAP:
        far = _logits(qcap1, qcap2, k1, k2, ACT, VEC)
    logits = _rotated_logits(qr1, qr2, k1, k2, k_pos, inv_freq, ACT, TRIG, VEC)
    if HAS_CAP:
        logits = tl.where((q_pos[:, None] - k_pos[None, :]) > max_distance, far, logits)
    logits = tl.where(n_valid[None, :], logits * scale, float("-inf"))
    return _softmax_step(m, den, acc, logits, v, ACT, VEC)


@triton.jit
def _window_block(m, den, acc, j0, wk_head, wv_head, sw_n, n_window, w_start, q_pos, qr1, qr2, inv_freq, scale,
                  d, d_half, BLOCK_N: tl.constexpr, BLOCK_DH: tl.constexpr, BLOCK_D: tl.constexpr,
                  ACT: tl.constexpr, TRIG: tl.constexpr, VEC: tl.constexpr):
    """Window slots j0..j0+BLOCK_N (slot j holds position w_start + j), causal against each query."""
    j = j0 + tl.arange(0, BLOCK_N)
    j_valid = j < n_window
    k1 = load_act_rows(wk_head, j, sw_n, j_valid, d_half, BLOCK_DH, ACT)
    k2 = load_act_rows(wk_head + d_half, j, sw_n, j_valid, d_half, BLOCK_DH, ACT)
    v = load_act_rows(wv_head, j, sw_n, j_valid, d, BLOCK_D, ACT)
    k_pos = w_start + j.to(tl.int64)
    logits = _rotated_logits(qr1, qr2, k1, k2, k_pos, inv_freq, ACT, TRIG, VEC)
    seen = j_valid[None, :] & (k_pos[None, :] <= q_pos[:, None])
    logits = tl.where(seen, logits * scale, float("-inf"))
    return _softmax_step(m, den, acc, logits, v, ACT, VEC)


@triton.jit
def _linear_term(q_head, t, t_valid, sq_t, qr1, qr2, phiw_head, h_head, s_head, d, f_half,
                 BLOCK_DH: tl.constexpr, BLOCK_FH: tl.constexpr, BLOCK_D: tl.constexpr,
                 PHI_POST_ROPE: tl.constexpr, VEC: tl.constexpr):
    """φ(q)ᵀH [BT, BD] and φ(q)ᵀs [BT]; φ of the rotated or (reloaded) pre-RoPE queries."""
    if PHI_POST_ROPE:
        x1, x2 = qr1.to(tl.float32), qr2.to(tl.float32)
    else:
        x1, x2 = load_halves(q_head, t, sq_t, t_valid, d // 2, d // 2, BLOCK_DH)
    phi_a, phi_b = hedgehog_features(x1, x2, phiw_head, d // 2, f_half, BLOCK_DH, BLOCK_FH, VEC)
    return linear_readout(phi_a, phi_b, h_head, s_head, f_half, d, BLOCK_FH, BLOCK_D, VEC)


@triton.jit
def _mix_and_store(out_head, t, t_valid, so_t, acc, den, m, lin_num, lin_den, g, d, BLOCK_D: tl.constexpr,
                   ACT: tl.constexpr, MIX_LOLA: tl.constexpr):
    """y = (γ·acc + w·φᵀH) / (γ·den + w·φᵀs), w = (1−γ)e^{−m} (lola) or 1 (lolcats); store rows t."""
    if MIX_LOLA:
        lin_w = (1.0 - g) * tl.exp(-m)
    else:
        lin_w = tl.full(m.shape, 1.0, tl.float32)
    y = (g * acc + lin_w[:, None] * lin_num) / (g * den + lin_w * lin_den)[:, None]
    cols = tl.arange(0, BLOCK_D)
    out = out_head + t[:, None] * so_t + cols[None, :]
    tl.store(out, round_act(y, ACT).to(out_head.dtype.element_ty), mask=t_valid[:, None] & (cols < d)[None, :])


# ----------------------------------------------------------------------------------------- kernels


@triton.jit
def _single_kernel(
    q_ptr, qpos_ptr, wk_ptr, wv_ptr, wstart_ptr, sk_ptr, sv_ptr, spos_ptr, slen_ptr,
    h_ptr, s_ptr, gamma_ptr, phiw_ptr, invf_ptr, out_ptr,
    sq_b, sq_h, sq_t, sw_b, sw_h, sw_n, ss_b, ss_h, ss_n, sp_b, sp_h, so_b, so_h, so_t,
    q_pos0, window_start, sparse_len,
    n_queries, window_size, n_heads, group, d: tl.constexpr, f_half: tl.constexpr, scale, max_distance,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DH: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_FH: tl.constexpr, ACT: tl.constexpr, QPOS_TENSOR: tl.constexpr, START_TENSOR: tl.constexpr,
    SLEN_TENSOR: tl.constexpr, HAS_CAP: tl.constexpr, MIX_LOLA: tl.constexpr,
    PHI_POST_ROPE: tl.constexpr, TRIG: tl.constexpr, VEC: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    hk = h // group
    d_half = d // 2
    q_head = q_ptr + b * sq_b + h * sq_h
    t, t_valid, q_pos, inv_freq, qr1, qr2, qcap1, qcap2 = _queries(
        q_head, qpos_ptr, q_pos0, pid_t, n_queries, sq_t, invf_ptr, d_half, max_distance,
        BLOCK_T, BLOCK_DH, ACT, QPOS_TENSOR, HAS_CAP, TRIG)
    n_sparse, w_start, n_window = _extent(t_valid, q_pos, wstart_ptr, window_start, slen_ptr, sparse_len,
                                          window_size, START_TENSOR, SLEN_TENSOR)
    m = tl.full([BLOCK_T], float("-inf"), tl.float32)
    den = tl.zeros([BLOCK_T], tl.float32)
    acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    sk_head = sk_ptr + b * ss_b + h * ss_h
    sv_head = sv_ptr + b * ss_b + h * ss_h
    spos_head = spos_ptr + b * sp_b + h * sp_h
    for n0 in range(0, n_sparse, BLOCK_N):
        m, den, acc = _sparse_block(m, den, acc, n0, sk_head, sv_head, spos_head, ss_n, n_sparse, q_pos, qr1, qr2,
                                  qcap1, qcap2, inv_freq, scale, max_distance, d, d_half, BLOCK_N, BLOCK_DH,
                                  BLOCK_D, ACT, HAS_CAP, TRIG, VEC)
    wk_head = wk_ptr + b * sw_b + hk * sw_h
    wv_head = wv_ptr + b * sw_b + hk * sw_h
    for j0 in range(0, n_window, BLOCK_N):
        m, den, acc = _window_block(m, den, acc, j0, wk_head, wv_head, sw_n, n_window, w_start, q_pos, qr1, qr2,
                                  inv_freq, scale, d, d_half, BLOCK_N, BLOCK_DH, BLOCK_D, ACT, TRIG, VEC)
    state = pid_bh.to(tl.int64) * 2 * f_half
    lin_num, lin_den = _linear_term(q_head, t, t_valid, sq_t, qr1, qr2, phiw_ptr + h * d * f_half,
                                    h_ptr + state * d, s_ptr + state, d, f_half, BLOCK_DH, BLOCK_FH, BLOCK_D,
                                    PHI_POST_ROPE, VEC)
    g = tl.load(gamma_ptr + h).to(tl.float32)
    _mix_and_store(out_ptr + b * so_b + h * so_h, t, t_valid, so_t, acc, den, m, lin_num, lin_den, g, d, BLOCK_D,
                   ACT, MIX_LOLA)


@triton.jit
def _split_kernel(
    q_ptr, qpos_ptr, wk_ptr, wv_ptr, wstart_ptr, sk_ptr, sv_ptr, spos_ptr, slen_ptr,
    h_ptr, s_ptr, gamma_ptr, phiw_ptr, invf_ptr, out_ptr,
    sq_b, sq_h, sq_t, sw_b, sw_h, sw_n, ss_b, ss_h, ss_n, sp_b, sp_h, so_b, so_h, so_t,
    q_pos0, window_start, sparse_len,
    n_queries, window_size, n_heads, group, d: tl.constexpr, f_half: tl.constexpr, scale, max_distance,
    part_ml_ptr, part_acc_ptr, count_ptr, n_tblocks,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DH: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_FH: tl.constexpr, ACT: tl.constexpr, QPOS_TENSOR: tl.constexpr, START_TENSOR: tl.constexpr,
    SLEN_TENSOR: tl.constexpr, HAS_CAP: tl.constexpr, MIX_LOLA: tl.constexpr,
    PHI_POST_ROPE: tl.constexpr, TRIG: tl.constexpr, VEC: tl.constexpr, SPARSE_BLOCKS: tl.constexpr,
    SPLITS: tl.constexpr,
):
    """Program (x, bh): query block x // SPLITS; part x % SPLITS = a sparse block (< SPARSE_BLOCKS), a
    window block, or (the last part) the linear term. Partials live in part_ml [G, SPLITS, 2, BT]
    and part_acc [G, SPLITS, BT, BD] (G = B·H·query blocks); count [G] int32 starts and ends at 0."""
    pid_t = tl.program_id(0) // SPLITS
    part = tl.program_id(0) % SPLITS
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    hk = h // group
    d_half = d // 2
    q_head = q_ptr + b * sq_b + h * sq_h
    t, t_valid, q_pos, inv_freq, qr1, qr2, qcap1, qcap2 = _queries(
        q_head, qpos_ptr, q_pos0, pid_t, n_queries, sq_t, invf_ptr, d_half, max_distance,
        BLOCK_T, BLOCK_DH, ACT, QPOS_TENSOR, HAS_CAP, TRIG)
    rows = tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_D)
    grp = pid_bh.to(tl.int64) * n_tblocks + pid_t
    ml_slot = part_ml_ptr + (grp * SPLITS + part) * 2 * BLOCK_T
    acc_slot = part_acc_ptr + (grp * SPLITS + part) * BLOCK_T * BLOCK_D
    acc_tile = rows[:, None] * BLOCK_D + cols[None, :]
    if part < SPLITS - 1:
        n_sparse, w_start, n_window = _extent(t_valid, q_pos, wstart_ptr, window_start, slen_ptr, sparse_len,
                                              window_size, START_TENSOR, SLEN_TENSOR)
        m = tl.full([BLOCK_T], float("-inf"), tl.float32)
        den = tl.zeros([BLOCK_T], tl.float32)
        acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
        if part < SPARSE_BLOCKS:
            m, den, acc = _sparse_block(m, den, acc, part * BLOCK_N, sk_ptr + b * ss_b + h * ss_h,
                                      sv_ptr + b * ss_b + h * ss_h, spos_ptr + b * sp_b + h * sp_h, ss_n,
                                      n_sparse, q_pos, qr1, qr2, qcap1, qcap2, inv_freq, scale, max_distance,
                                      d, d_half, BLOCK_N, BLOCK_DH, BLOCK_D, ACT, HAS_CAP, TRIG, VEC)
        else:
            m, den, acc = _window_block(m, den, acc, (part - SPARSE_BLOCKS) * BLOCK_N, wk_ptr + b * sw_b + hk * sw_h,
                                      wv_ptr + b * sw_b + hk * sw_h, sw_n, n_window, w_start, q_pos, qr1, qr2,
                                      inv_freq, scale, d, d_half, BLOCK_N, BLOCK_DH, BLOCK_D, ACT, TRIG, VEC)
        tl.store(ml_slot + rows, m)
        tl.store(ml_slot + BLOCK_T + rows, den)
        tl.store(acc_slot + acc_tile, acc)
    else:
        state = pid_bh.to(tl.int64) * 2 * f_half
        lin_num, lin_den = _linear_term(q_head, t, t_valid, sq_t, qr1, qr2, phiw_ptr + h * d * f_half,
                                        h_ptr + state * d, s_ptr + state, d, f_half, BLOCK_DH, BLOCK_FH,
                                        BLOCK_D, PHI_POST_ROPE, VEC)
        tl.store(ml_slot + BLOCK_T + rows, lin_den)
        tl.store(acc_slot + acc_tile, lin_num)
    tl.debug_barrier()  # every thread's partial is written before the counter moves (release below)
    arrived = tl.atomic_add(count_ptr + grp, 1, sem="acq_rel")
    if arrived == SPLITS - 1:  # the last part of this group to finish merges all of them
        tl.debug_barrier()
        tl.store(count_ptr + grp, 0)
        group_ml = part_ml_ptr + grp * SPLITS * 2 * BLOCK_T
        group_acc = part_acc_ptr + grp * SPLITS * BLOCK_T * BLOCK_D
        m = tl.full([BLOCK_T], float("-inf"), tl.float32)
        for s in tl.static_range(SPLITS - 1):
            m = tl.maximum(m, tl.load(group_ml + s * 2 * BLOCK_T + rows, cache_modifier=".cg"))
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        den = tl.zeros([BLOCK_T], tl.float32)
        acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
        for s in tl.static_range(SPLITS - 1):
            w = tl.exp(tl.load(group_ml + s * 2 * BLOCK_T + rows, cache_modifier=".cg") - m_safe)
            den += w * tl.load(group_ml + s * 2 * BLOCK_T + BLOCK_T + rows, cache_modifier=".cg")
            acc += w[:, None] * tl.load(group_acc + s * BLOCK_T * BLOCK_D + acc_tile, cache_modifier=".cg")
        last = SPLITS - 1
        lin_den = tl.load(group_ml + last * 2 * BLOCK_T + BLOCK_T + rows, cache_modifier=".cg")
        lin_num = tl.load(group_acc + last * BLOCK_T * BLOCK_D + acc_tile, cache_modifier=".cg")
        g = tl.load(gamma_ptr + h).to(tl.float32)
        _mix_and_store(out_ptr + b * so_b + h * so_h, t, t_valid, so_t, acc, den, m, lin_num, lin_den, g, d,
                       BLOCK_D, ACT, MIX_LOLA)


# ------------------------------------------------------------------------------------------ wrapper

_SCRATCH: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _scratch(device, groups: int, splits: int, block_t: int, block_d: int):
    """Partials and zeroed counters for the split kernel, cached per shape (the kernel leaves the
    counters at 0 again). Create them before capturing a CUDA graph, i.e. run once eagerly first;
    concurrent launches of one shape on several streams would share them."""
    key = (str(device), groups, splits, block_t, block_d)
    if key not in _SCRATCH:
        _SCRATCH[key] = (
            torch.empty(groups * splits * 2 * block_t, dtype=torch.float32, device=device),
            torch.empty(groups * splits * block_t * block_d, dtype=torch.float32, device=device),
            torch.zeros(groups, dtype=torch.int32, device=device),
        )
    return _SCRATCH[key]


def prefer_split(programs: int, device) -> bool:
    """Split when the single kernel's programs (query blocks × B × H) would fill under half the SMs.

    Measured on the H200 (132 SMs; docs/kernels.md), µs per layer in a CUDA graph, split vs single:
    decode SmolLM2 (9 programs) 9.2 vs 17.8, Llama-8B (32) 16.8 vs 22.3; a 64-token chunk SmolLM2
    (36) 10.8 vs 17.8, Llama-8B (128) 43.3 vs 22.7 — there the split parts redo the query work.
    """
    if not torch.cuda.is_available() or torch.device(device).type != "cuda":
        return True
    return 2 * programs <= _sm_count(torch.device(device))


_SMS: dict[torch.device, int] = {}


def _sm_count(device: torch.device) -> int:
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device]


def _scalar_arg(x, dummy: torch.Tensor):
    """(tensor, int value, is_tensor) for an argument given as an int or a device tensor."""
    if isinstance(x, torch.Tensor):
        return x.to(dummy.device), 0, True
    return dummy, int(x), False


def _last_unit(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def lola_attention(q_pre, q_pos, window_k, window_v, window_start, sparse_k, sparse_v, sparse_pos,
                   h_state, s_state, gamma, phi_weight, inv_freq, scale, mix, max_distance, phi_input,
                   sparse_len=None, out=None, split: bool | None = None, block_t: int = 16, block_n: int | None = None,
                   num_warps: int = 8, trig: str | None = None, vec: bool | None = None):
    """Triton version of `reference.lola_attention` (same arguments and result).

    Trailing tuning knobs: `split` (the split kernel or the single-program one; None picks by
    `prefer_split`), query/key tile sizes (block_n None: 64 keys per split part with vec, else 128 per
    split part and 64 per step of the single kernel), warps, `trig`, how RoPE's sin/cos are computed
    (see triton_common.cos_sin), and `vec`: one query per program and plain float32 products instead of
    tensor-core tiles padded to 16 queries (None: decode, T = 1, of heads of up to 64 dims). The
    defaults are the H200's best in scripts/gpu_tune.py (docs/kernels.md): decode µs per layer, SmolLM2
    7.9 with vec against 9.0 without; Llama-8B (D = 128) 18.7 against 15.1, so not there."""
    if mix not in ("lola", "lolcats"):
        raise ValueError(f"unknown mix {mix!r} (expected 'lola' or 'lolcats')")
    b, n_heads, t, d = q_pre.shape
    device = q_pre.device
    q_pre = _last_unit(q_pre)
    window_k, window_v = window_k.contiguous(), window_v.contiguous()
    sparse_k, sparse_v = sparse_k.contiguous(), sparse_v.contiguous()
    sparse_pos = sparse_pos.contiguous()
    if not (h_state.is_contiguous() and s_state.is_contiguous()):
        raise ValueError("h_state and s_state must be contiguous")
    f_half = phi_weight.shape[-1]
    if out is None:
        out = torch.empty(b, n_heads, t, d, dtype=q_pre.dtype, device=device)
    qpos_t, q_pos0, qpos_is_t = _scalar_arg(q_pos, gamma)
    start_t, start_i, start_is_t = _scalar_arg(window_start, gamma)
    slen = sparse_k.shape[2] if sparse_len is None else sparse_len
    if not isinstance(slen, torch.Tensor) and not 0 <= slen <= sparse_k.shape[2]:
        raise ValueError(f"sparse_len {slen} outside 0..{sparse_k.shape[2]}")
    slen_t, slen_i, slen_is_t = _scalar_arg(slen, gamma)
    if sparse_k.shape[2] == 0:  # nothing cached: hand the kernel valid (never read) buffers
        sparse_k = window_k[:, :1, :1].expand(b, n_heads, 1, d)
        sparse_v = window_v[:, :1, :1].expand(b, n_heads, 1, d)
        sparse_pos = torch.zeros(1, 1, 1, dtype=torch.long, device=device).expand(b, n_heads, 1)
        slen_t, slen_i, slen_is_t = gamma, 0, False
    args = (
        q_pre, qpos_t, window_k, window_v, start_t, sparse_k, sparse_v, sparse_pos, slen_t,
        h_state, s_state, gamma, phi_weight.contiguous(), inv_freq.float().contiguous(), out,
        q_pre.stride(0), q_pre.stride(1), q_pre.stride(2),
        window_k.stride(0), window_k.stride(1), window_k.stride(2),
        sparse_k.stride(0), sparse_k.stride(1), sparse_k.stride(2),
        sparse_pos.stride(0), sparse_pos.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        q_pos0, start_i, slen_i,
        t, window_k.shape[2], n_heads, n_heads // window_k.shape[1], d, f_half, float(scale),
        0 if max_distance is None else int(max_distance),
    )
    if vec is None:
        vec = t == 1 and d <= 64
    if vec:
        block_t = 1
    t_blocks = triton.cdiv(t, block_t)
    if split is None:
        split = prefer_split(t_blocks * b * n_heads, device)
    if block_n is None:
        block_n = 128 if split and not vec else 64
    block_d = block(d)
    meta = dict(
        BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_DH=block(d // 2), BLOCK_D=block_d, BLOCK_FH=block(f_half),
        ACT=act_code(q_pre.dtype), QPOS_TENSOR=qpos_is_t, START_TENSOR=start_is_t, SLEN_TENSOR=slen_is_t,
        HAS_CAP=max_distance is not None, MIX_LOLA=mix == "lola", PHI_POST_ROPE=phi_input == "post_rope",
        TRIG=trig_mode(trig), VEC=vec, num_warps=num_warps,
    )
    if not split:
        _single_kernel[(t_blocks, b * n_heads)](*args, **meta)
        return out
    sparse_blocks = triton.cdiv(sparse_k.shape[2], block_n)
    splits = sparse_blocks + triton.cdiv(window_k.shape[2], block_n) + 1
    part_ml, part_acc, count = _scratch(device, b * n_heads * t_blocks, splits, block_t, block_d)
    _split_kernel[(t_blocks * splits, b * n_heads)](*args, part_ml, part_acc, count, t_blocks, **meta,
                                                    SPARSE_BLOCKS=sparse_blocks, SPLITS=splits)
    return out
