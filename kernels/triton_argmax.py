"""Greedy decoding's argmax over the vocabulary in one launch (DESIGN §5).

torch's argmax of one 49K-entry row of logits is a generic reduction that took 12.8 µs of a 690 µs
SmolLM2 decode step on the H200 (scripts/gpu_decode_profile.py), plus a copy into the token buffer.
`argmax_into` is one program per row: the row is read in unrolled chunks (all loads in flight at once),
each lane keeps its first maximum, and the lanes' results are merged with ties to the lowest index,
as `torch.argmax` (reference: `reference.argmax_into`). Logits are assumed NaN-free.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _argmax_kernel(x_ptr, out_ptr, n, stride, BLOCK: tl.constexpr, CHUNKS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    lane = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_at = lane
    for c in tl.static_range(CHUNKS):
        i = c * BLOCK + lane
        x = tl.load(x_ptr + row * stride + i, mask=i < n, other=float("-inf")).to(tl.float32)
        higher = x > best  # strictly: a lane keeps its first maximum
        best = tl.where(higher, x, best)
        best_at = tl.where(higher, i, best_at)
    top = tl.max(best, axis=0)
    first = tl.min(tl.where(best == top, best_at, n), axis=0)
    tl.store(out_ptr + row, tl.minimum(first, n - 1).to(tl.int64))


def argmax_into(logits: torch.Tensor, out: torch.Tensor, block: int = 4096, num_warps: int = 16) -> torch.Tensor:
    """out[b, 0] = argmax(logits[b]) for logits [B, V] (rows contiguous) and out [B, 1] int64."""
    b, n = logits.shape
    if logits.stride(-1) != 1:
        raise ValueError("logits rows must be contiguous")
    if out.dtype != torch.int64 or out.numel() != b:
        raise ValueError("out must hold one int64 per row")
    block = min(block, triton.next_power_of_2(n))
    _argmax_kernel[(b,)](logits, out, n, logits.stride(0), BLOCK=block, CHUNKS=triton.cdiv(n, block),
                         num_warps=num_warps)
    return out
