"""The data movement around eviction, one launch each (DESIGN §4.4, §5).

Eviction scores a candidate list — the sparse cache followed by the chunk leaving the window, each KV
head's rows repeated for its query heads — then keeps the top λ and shifts the window. In PyTorch that
movement is about fifteen small copies and gathers per layer and chunk, and in a prefill they cost as
much GPU time as the scoring itself (docs/kernels.md). Here it is two kernels:
- `assemble_candidates` — cand[:n] = sparse[:n]; cand[n:n+C] = the window's oldest chunk (expanded to
  query heads) at positions start..start+C−1 (reference: `reference.assemble_candidates`);
- `keep_and_shift`      — sparse = cand[keep]; window[:C] = window[C:]; and in a prefill block, window[C:] = the
  next chunk's keys and values, which spares the two copies that would put them there (reference:
  `reference.keep_and_shift`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _assemble_kernel(sk_ptr, sv_ptr, sp_ptr, wk_ptr, wv_ptr, start_ptr, ck_ptr, cv_ptr, cp_ptr,
                     n_sparse, start_int, chunk, lam, w_len, n_heads, group, d,
                     START_TENSOR: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // n_heads, bh % n_heads
    kv = b * (n_heads // group) + h // group
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < d
    from_sparse = rows < n_sparse
    from_window = (rows >= n_sparse) & (rows < n_sparse + chunk)
    w_rows = rows - n_sparse
    s_off = (bh * lam + rows)[:, None] * d + cols[None, :]
    w_off = (kv * w_len + w_rows)[:, None] * d + cols[None, :]
    c_off = (bh * (lam + chunk) + rows)[:, None] * d + cols[None, :]
    m_sparse = from_sparse[:, None] & col_ok[None, :]
    m_window = from_window[:, None] & col_ok[None, :]
    m_out = (from_sparse | from_window)[:, None] & col_ok[None, :]
    k = tl.where(m_sparse, tl.load(sk_ptr + s_off, mask=m_sparse, other=0.0),
                 tl.load(wk_ptr + w_off, mask=m_window, other=0.0))
    v = tl.where(m_sparse, tl.load(sv_ptr + s_off, mask=m_sparse, other=0.0),
                 tl.load(wv_ptr + w_off, mask=m_window, other=0.0))
    tl.store(ck_ptr + c_off, k, mask=m_out)
    tl.store(cv_ptr + c_off, v, mask=m_out)
    if START_TENSOR:
        start = tl.load(start_ptr)
    else:
        start = start_int
    pos = tl.where(from_sparse, tl.load(sp_ptr + bh * lam + rows, mask=from_sparse, other=0), start + w_rows)
    tl.store(cp_ptr + bh * (lam + chunk) + rows, pos, mask=from_sparse | from_window)


@triton.jit
def _keep_shift_kernel(ck_ptr, cv_ptr, cp_ptr, keep_ptr, sk_ptr, sv_ptr, sp_ptr, wk_ptr, wv_ptr, nk_ptr, nv_ptr,
                       lam, n_cand, chunk, w_len, n_heads, group, d, sn_b, sn_h, sn_t,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HAS_NEXT: tl.constexpr):
    keep_shift_block(ck_ptr, cv_ptr, cp_ptr, keep_ptr, sk_ptr, sv_ptr, sp_ptr, wk_ptr, wv_ptr, nk_ptr, nv_ptr,
                     lam, n_cand, chunk, w_len, n_heads, group, d, sn_b, sn_h, sn_t, tl.program_id(0).to(tl.int64),
                     tl.program_id(1), BLOCK_N, BLOCK_D, HAS_NEXT)


@triton.jit
def keep_shift_block(ck_ptr, cv_ptr, cp_ptr, keep_ptr, sk_ptr, sv_ptr, sp_ptr, wk_ptr, wv_ptr, nk_ptr, nv_ptr,
                     lam, n_cand, chunk, w_len, n_heads, group, d, sn_b, sn_h, sn_t, bh, block_id,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HAS_NEXT: tl.constexpr):
    """Rows [block_id·BLOCK_N, +BLOCK_N) of head bh's sparse cache <- its kept candidates; block 0 of the first
    query head of each KV group also shifts that KV head's window (and appends the next chunk)."""
    rows = block_id * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < d
    ok = rows < lam
    mask = ok[:, None] & col_ok[None, :]
    src = tl.load(keep_ptr + bh * lam + rows, mask=ok, other=0)
    c_off = (bh * n_cand + src)[:, None] * d + cols[None, :]
    s_off = (bh * lam + rows)[:, None] * d + cols[None, :]
    tl.store(sk_ptr + s_off, tl.load(ck_ptr + c_off, mask=mask, other=0.0), mask=mask)
    tl.store(sv_ptr + s_off, tl.load(cv_ptr + c_off, mask=mask, other=0.0), mask=mask)
    tl.store(sp_ptr + bh * lam + rows, tl.load(cp_ptr + bh * n_cand + src, mask=ok, other=0), mask=ok)
    h = bh % n_heads
    if (h % group == 0) & (block_id == 0):  # the first query head of a KV group shifts that KV head's window
        b, hk = bh // n_heads, h // group
        kv = b * (n_heads // group) + hk
        for r0 in range(0, chunk, BLOCK_N):
            r = r0 + tl.arange(0, BLOCK_N)
            m = (r < chunk)[:, None] & col_ok[None, :]
            dst = (kv * w_len + r)[:, None] * d + cols[None, :]
            tl.store(wk_ptr + dst, tl.load(wk_ptr + dst + chunk * d, mask=m, other=0.0), mask=m)
            tl.store(wv_ptr + dst, tl.load(wv_ptr + dst + chunk * d, mask=m, other=0.0), mask=m)
            if HAS_NEXT:  # rows C + r were read just above; each row is read and written by this program only
                nxt = b * sn_b + hk * sn_h + r[:, None] * sn_t + cols[None, :]
                tl.store(wk_ptr + dst + chunk * d, tl.load(nk_ptr + nxt, mask=m, other=0.0), mask=m)
                tl.store(wv_ptr + dst + chunk * d, tl.load(nv_ptr + nxt, mask=m, other=0.0), mask=m)


def _contiguous(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if not t.is_contiguous():
            raise ValueError("eviction buffers must be contiguous")


def assemble_candidates(sparse_k, sparse_v, sparse_pos, n_sparse: int, window_k, window_v, start, cand_k, cand_v,
                        cand_pos, block_n: int = 64) -> None:
    """Triton version of `reference.assemble_candidates`; `start` an int or a one-element device tensor."""
    _contiguous(sparse_k, sparse_v, sparse_pos, window_k, window_v, cand_k, cand_v, cand_pos)
    b, n_heads, lam, d = sparse_k.shape
    chunk = window_k.shape[2] // 2
    if cand_k.shape[2] != lam + chunk:
        raise ValueError("the candidate buffers hold λ + C rows")
    start_is_tensor = isinstance(start, torch.Tensor)
    grid = (b * n_heads, triton.cdiv(n_sparse + chunk, block_n))
    _assemble_kernel[grid](sparse_k, sparse_v, sparse_pos, window_k, window_v,
                           start if start_is_tensor else sparse_pos, cand_k, cand_v, cand_pos,
                           n_sparse, 0 if start_is_tensor else int(start), chunk, lam, window_k.shape[2], n_heads,
                           n_heads // window_k.shape[1], d, START_TENSOR=start_is_tensor, BLOCK_N=block_n,
                           BLOCK_D=triton.next_power_of_2(d))


def check_keep_and_shift(cand_k, cand_v, cand_pos, keep, sparse_k, sparse_v, sparse_pos, window_k, window_v,
                         next_k, next_v) -> tuple[int, int, int]:
    """Refuse buffers the keep-and-shift step cannot take; the next chunk's (batch, head, row) strides."""
    _contiguous(cand_k, cand_v, cand_pos, sparse_k, sparse_v, sparse_pos, window_k, window_v)
    b, _, lam, d = sparse_k.shape
    if lam == 0:
        raise ValueError("keep_and_shift needs a sparse cache (λ ≥ 1)")
    if next_k is None:
        return 0, 0, 0
    if (next_k.shape != (b, window_k.shape[1], window_k.shape[2] // 2, d) or next_k.stride() != next_v.stride()
            or next_k.stride(-1) != 1):
        raise ValueError("next_k, next_v must be [B,Hkv,C,D] with the same strides and contiguous rows")
    return next_k.stride()[:3]


def keep_and_shift(cand_k, cand_v, cand_pos, keep, sparse_k, sparse_v, sparse_pos, window_k, window_v,
                   next_k=None, next_v=None, block_n: int = 64) -> None:
    """Triton version of `reference.keep_and_shift` (needs λ ≥ 1). next_k, next_v [B,Hkv,C,D] may be strided
    views (of a block's projections) if their last dimension is contiguous and both share strides."""
    strides = check_keep_and_shift(cand_k, cand_v, cand_pos, keep, sparse_k, sparse_v, sparse_pos, window_k,
                                   window_v, next_k, next_v)
    keep = keep.contiguous()
    b, n_heads, lam, d = sparse_k.shape
    chunk = window_k.shape[2] // 2
    has_next = next_k is not None
    grid = (b * n_heads, triton.cdiv(lam, block_n))
    _keep_shift_kernel[grid](cand_k, cand_v, cand_pos, keep, sparse_k, sparse_v, sparse_pos, window_k, window_v,
                             next_k if has_next else window_k, next_v if has_next else window_v,
                             lam, cand_k.shape[2], chunk, window_k.shape[2], n_heads,
                             n_heads // window_k.shape[1], d, *strides, BLOCK_N=block_n,
                             BLOCK_D=triton.next_power_of_2(d), HAS_NEXT=has_next)
