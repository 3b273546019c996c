"""Decode GEMVs with the small steps around them fused in (DESIGN §5).

At batch 1 a decode layer is four GEMVs, and between them a norm, two window writes, a SiLU·mul and
two residual adds. In a CUDA graph each of those is a launch of a few microseconds over a few thousand
numbers; on SmolLM2 they cost as much as the GEMVs. Here each GEMV takes its neighbours in:
- `norm_linear`  — W · rmsnorm(x) (the norm in the prologue: every program normalises x itself);
  with `silu=True` over a fused [gate; up] weight it returns silu(gate) · up (each program computes
  matching gate and up rows);
- `norm_qkv`     — the same prologue over the fused [q; k; v] weight; q goes to its buffer, k and v
  straight into the window slot of the current token;
- `linear_add`   — x += W · y in place (the residual add in the epilogue).
A layer is then five launches: norm_qkv, attention, linear_add, norm_linear(silu), linear_add.

Rounding is the reference's (kernels/reference.py): the norm in fp32 rounded to the activation dtype,
then the norm weight; products accumulated in fp32 and rounded once; the residual sum rounded.
One program computes BLOCK_N rows for one row of x; weights are [N, K] row-major (nn.Linear's).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import act_code, round_act

STORE_PLAIN, STORE_ADD, STORE_QKV = 0, 1, 2


@triton.jit
def _weight_tiles(w_rows, up_offset, cols, row_ok, k_dim, SILU: tl.constexpr):
    """Weight tiles [BLOCK_N, BLOCK_K] at columns `cols` (the up rows' too for SiLU; else the same tile),
    streamed past the cache (each weight is read once per token)."""
    ok = row_ok[:, None] & (cols < k_dim)[None, :]
    w = tl.load(w_rows + cols[None, :], mask=ok, other=0.0, eviction_policy="evict_first")
    if SILU:
        w_up = tl.load(w_rows + up_offset + cols[None, :], mask=ok, other=0.0, eviction_policy="evict_first")
    else:
        w_up = w
    return w, w_up


@triton.jit
def _gemv_kernel(x_ptr, norm_w_ptr, w_ptr, out_ptr, wk_ptr, wv_ptr, slot_ptr,
                 n_out, k_dim, eps, up_offset, q_rows, kv_rows, head_dim, win_head_stride, win_batch_stride,
                 NORM: tl.constexpr, SILU: tl.constexpr, STORE: tl.constexpr, K_FULL: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr, ACT: tl.constexpr):
    m = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_out
    x_row = x_ptr + m * k_dim
    if NORM:
        every = tl.arange(0, K_FULL)
        whole = tl.load(x_row + every, mask=every < k_dim, other=0.0).to(tl.float32)
        inv_rms = 1.0 / tl.sqrt(tl.sum(whole * whole, axis=0) / k_dim + eps)
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * k_dim
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    offs = tl.arange(0, BLOCK_K)
    if PREFETCH:
        w, w_up = _weight_tiles(w_rows, up_offset, offs, row_ok, k_dim, SILU)
    for k0 in range(0, k_dim, BLOCK_K):
        cols = k0 + offs
        col_ok = cols < k_dim
        if PREFETCH:  # issue the next tiles' loads before this tile's products (two tiles in flight)
            w_next, w_up_next = _weight_tiles(w_rows, up_offset, cols + BLOCK_K, row_ok, k_dim, SILU)
        else:
            w, w_up = _weight_tiles(w_rows, up_offset, cols, row_ok, k_dim, SILU)
        x = tl.load(x_row + cols, mask=col_ok, other=0.0).to(tl.float32)
        if NORM:
            scale = tl.load(norm_w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            x = round_act(scale * round_act(x * inv_rms, ACT), ACT)
        acc += w.to(tl.float32) * x[None, :]
        if SILU:
            acc_up += w_up.to(tl.float32) * x[None, :]
        if PREFETCH:
            w, w_up = w_next, w_up_next
    y = round_act(tl.sum(acc, axis=1), ACT)
    if SILU:
        up = round_act(tl.sum(acc_up, axis=1), ACT)
        y = round_act(round_act(y / (1.0 + tl.exp(-y)), ACT) * up, ACT)
    if STORE == 1:  # residual add, in place
        dst = out_ptr + m * n_out + rows
        y = round_act(tl.load(dst, mask=row_ok, other=0.0).to(tl.float32) + y, ACT)
        tl.store(dst, y.to(out_ptr.dtype.element_ty), mask=row_ok)
    elif STORE == 2:  # q to its buffer, k and v into the window slot
        tl.store(out_ptr + m * q_rows + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok & (rows < q_rows))
        slot = tl.load(slot_ptr).to(tl.int64)
        kv = rows - q_rows
        is_v = kv >= kv_rows
        kv = tl.where(is_v, kv - kv_rows, kv)
        kv = tl.where(kv < 0, 0, kv).to(tl.int64)
        offset = m * win_batch_stride + (kv // head_dim) * win_head_stride + slot * head_dim + kv % head_dim
        in_kv = row_ok & (rows >= q_rows)
        tl.store(wk_ptr + offset, y.to(wk_ptr.dtype.element_ty), mask=in_kv & ~is_v)
        tl.store(wv_ptr + offset, y.to(wv_ptr.dtype.element_ty), mask=in_kv & is_v)
    else:
        tl.store(out_ptr + m * n_out + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)


# (BLOCK_N, BLOCK_K, warps, prefetch) by (output rows, K): the fastest in a CUDA graph on the H200
# (scripts/gpu_gemv.py, docs/kernels.md "Fused decode GEMVs"); other shapes by size. None: the GEMV is
# cuBLAS with the norm and the rest as separate kernels (where that measured as fast).
CONFIGS: dict[tuple[int, int], tuple[int, int, int, int] | None] = {
    (960, 576): (1, 1024, 2, 1),  # SmolLM2-135M: [q; k; v]
    (576, 576): (1, 1024, 4, 0),  # o
    (1536, 576): (2, 512, 4, 1),  # [gate; up] -> silu(gate)·up
    (576, 1536): (1, 1024, 4, 1),  # down
    (49152, 576): (32, 128, 4, 0),  # LM head
    (6144, 4096): (8, 512, 4, 0),  # Llama-3.1-8B: [q; k; v]
    (4096, 4096): (16, 512, 8, 1),  # o
    (14336, 4096): (8, 256, 4, 0),  # [gate; up]
    (4096, 14336): (8, 512, 8, 1),  # down
    (128256, 4096): (16, 256, 4, 0),  # LM head
}
SMALL_CONFIG, LARGE_CONFIG = (1, 1024, 4, 0), (8, 256, 4, 0)


def gemv_config(n_out: int, k_dim: int) -> tuple[int, int, int, int] | None:
    """Tiles, warps and prefetch for a GEMV with n_out outputs over rows of k_dim (None: not fused)."""
    if (n_out, k_dim) in CONFIGS:
        config = CONFIGS[(n_out, k_dim)]
        if config is None:
            return None
    else:
        config = SMALL_CONFIG if n_out * k_dim < 4 << 20 else LARGE_CONFIG
    block_n, block_k, warps, prefetch = config
    return block_n, min(block_k, triton.next_power_of_2(k_dim)), warps, prefetch


def _rows(x: torch.Tensor, k_dim: int) -> int:
    if not x.is_contiguous() or x.shape[-1] != k_dim:
        raise ValueError(f"the GEMV kernels need contiguous rows of {k_dim}, not {tuple(x.shape)}")
    return x.numel() // k_dim


def _launch(x, norm_weight, eps, weight, out, n_out, store, silu=False, window=None, q_rows=0, config=None):
    k_dim = weight.shape[1]
    m = _rows(x, k_dim)
    block_n, block_k, warps, prefetch = config or gemv_config(n_out, k_dim)
    wk, wv, slot = window if window is not None else (out, out, out)
    kv_rows = wk.shape[1] * wk.shape[3] if window is not None else 0
    head_dim = wk.shape[3] if window is not None else 1
    _gemv_kernel[(triton.cdiv(n_out, block_n), m)](
        x, x if norm_weight is None else norm_weight, weight, out, wk, wv, slot,
        n_out, k_dim, eps, n_out * k_dim, q_rows, kv_rows, head_dim,
        wk.stride(1) if window is not None else 0, wk.stride(0) if window is not None else 0,
        NORM=norm_weight is not None, SILU=silu, STORE=store, K_FULL=triton.next_power_of_2(k_dim),
        BLOCK_N=block_n, BLOCK_K=block_k, PREFETCH=bool(prefetch), ACT=act_code(x.dtype), num_warps=warps)
    return out


def norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor, silu: bool = False,
                out: torch.Tensor | None = None, config=None) -> torch.Tensor:
    """Triton version of `reference.norm_linear`."""
    n_out = weight.shape[0] // 2 if silu else weight.shape[0]
    if out is None:
        out = torch.empty(*x.shape[:-1], n_out, dtype=x.dtype, device=x.device)
    return _launch(x, norm_weight, eps, weight, out, n_out, STORE_PLAIN, silu=silu, config=config)


def norm_qkv(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, wqkv: torch.Tensor, q_out: torch.Tensor,
             window_k: torch.Tensor, window_v: torch.Tensor, slot: torch.Tensor, config=None) -> torch.Tensor:
    """Triton version of `reference.norm_qkv` (x holds one token per batch row)."""
    if not (window_k.is_contiguous() and window_v.is_contiguous() and q_out.is_contiguous()):
        raise ValueError("norm_qkv writes contiguous q and window buffers")
    return _launch(x, norm_weight, eps, wqkv, q_out, wqkv.shape[0], STORE_QKV, window=(window_k, window_v, slot),
                   q_rows=q_out.shape[-1], config=config)


def linear_add(y: torch.Tensor, weight: torch.Tensor, x: torch.Tensor, config=None) -> torch.Tensor:
    """Triton version of `reference.linear_add`: x += W · y in place."""
    if not x.is_contiguous():
        raise ValueError("linear_add updates a contiguous residual stream")
    return _launch(y.contiguous(), None, 0.0, weight, x, weight.shape[0], STORE_ADD, config=config)
