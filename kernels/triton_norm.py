"""The small steps between the GEMVs of a layer, one launch each (DESIGN §5).

In PyTorch an RMSNorm is six or seven kernels (cast, square, mean, add, rsqrt, two multiplies) and
SiLU-and-multiply two. At batch 1 each of those is a launch over a few thousand numbers, and in a
CUDA graph the launches, not the bytes, are what the decode step pays for between its GEMVs. These
kernels do each step in one launch with the reference's rounding (kernels/reference.py):
- `rms_norm`      — w * rmsnorm(x);
- `add_rms_norm`  — x += delta (in place, rounded to x's dtype), then w * rmsnorm(x): the residual
                    add of one sub-layer fused with the norm that opens the next;
- `silu_mul`      — silu(gate) * up from the fused [gate; up] projection.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import act_code, round_act


@triton.jit
def _rms_norm_kernel(x_ptr, delta_ptr, w_ptr, out_ptr, n, eps, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr,
                     ACT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * n + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA:
        delta = tl.load(delta_ptr + row * n + cols, mask=mask, other=0.0).to(tl.float32)
        x = round_act(x + delta, ACT)
        tl.store(x_ptr + row * n + cols, x.to(x_ptr.dtype.element_ty), mask=mask)
    inv_rms = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n + eps)
    normed = round_act(x * inv_rms, ACT)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n + cols, round_act(w * normed, ACT).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, n, BLOCK: tl.constexpr, ACT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    gate = tl.load(gu_ptr + row * 2 * n + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + row * 2 * n + n + cols, mask=mask, other=0.0).to(tl.float32)
    act = round_act(gate / (1.0 + tl.exp(-gate)), ACT)
    tl.store(out_ptr + row * n + cols, round_act(act * up, ACT).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> int:
    if not x.is_contiguous():
        raise ValueError("the norm kernels need contiguous rows")
    return x.numel() // x.shape[-1]


def _norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
          out: torch.Tensor | None) -> torch.Tensor:
    out = torch.empty_like(x) if out is None else out
    n = x.shape[-1]
    _rms_norm_kernel[(_rows(x),)](x, x if delta is None else delta, weight, out, n, eps, HAS_DELTA=delta is not None,
                                  BLOCK=triton.next_power_of_2(n), ACT=act_code(x.dtype))
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of `reference.rms_norm`."""
    return _norm(x.contiguous(), None, weight, eps, out)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of `reference.add_rms_norm`: x += delta in place; returns w * rmsnorm(x)."""
    return _norm(x, delta.contiguous(), weight, eps, out)


def silu_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None, block_n: int = 1024) -> torch.Tensor:
    """Triton version of `reference.silu_mul`: [..., 2I] -> [..., I]."""
    gate_up = gate_up.contiguous()
    n = gate_up.shape[-1] // 2
    if out is None:
        out = torch.empty(*gate_up.shape[:-1], n, dtype=gate_up.dtype, device=gate_up.device)
    _silu_mul_kernel[(_rows(gate_up), triton.cdiv(n, block_n))](gate_up, out, n, BLOCK=block_n,
                                                                 ACT=act_code(gate_up.dtype))
    return out
