"""The fused decode GEMVs (kernels/triton_gemv.py) against the PyTorch reference, under TRITON_INTERPRET=1.

Same rules as tests/test_kernels.py: fresh seeded inputs per case, outputs poisoned with NaN, window
slots other than the written one poisoned and checked untouched; ‖out − ref‖/‖ref‖ within 1e-4 (fp32)
or 1e-2 (bf16). Shapes are not multiples of the tiles, and the tiles are forced small so the K loop
and the row blocks both run more than once.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import pytest
import torch

pytest.importorskip("triton")

from lolachat.kernels import ops, triton_gemv
from lolachat.kernels import reference as ref

TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
SMALL_TILES = (16, 32, 4, 0)  # BLOCK_N, BLOCK_K, warps, prefetch
PREFETCHING = (16, 32, 4, 1)
TILES = pytest.mark.parametrize("tiles", [SMALL_TILES, PREFETCHING], ids=["plain", "prefetch"])
DTYPES = [torch.float32, torch.bfloat16]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert not torch.isnan(got).any(), "output has NaN (an element was not written)"
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm()).item()


def draw(seed: int, *shape, dtype=torch.float32, scale=1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,k_dim,n_out", [(1, 72, 40), (2, 100, 33)])
def test_norm_linear(dtype, batch, k_dim, n_out):
    x = draw(1, batch, 1, k_dim, dtype=dtype, scale=3.0)
    norm_w, w = draw(2, k_dim, dtype=dtype), draw(3, n_out, k_dim, dtype=dtype, scale=0.2)
    out = torch.full((batch, 1, n_out), float("nan"), dtype=dtype, device=DEVICE)
    got = triton_gemv.norm_linear(x, norm_w, 1e-5, w, out=out, config=SMALL_TILES)
    assert rel_err(got, ref.norm_linear(x, norm_w, 1e-5, w)) < TOL[dtype]


@TILES
@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_linear_silu_over_gate_and_up(dtype, tiles):
    x = draw(4, 2, 1, 72, dtype=dtype)
    norm_w, w13 = draw(5, 72, dtype=dtype), draw(6, 2 * 45, 72, dtype=dtype, scale=0.3)
    out = torch.full((2, 1, 45), float("nan"), dtype=dtype, device=DEVICE)
    got = triton_gemv.norm_linear(x, norm_w, 1e-6, w13, silu=True, out=out, config=tiles)
    assert rel_err(got, ref.norm_linear(x, norm_w, 1e-6, w13, silu=True)) < TOL[dtype]


def test_norm_linear_writes_float32_logits_rounded_like_the_reference():
    """The LM head: bf16 activations, logits stored as fp32 (rounded to bf16 first, as `.float()` after
    a bf16 F.linear)."""
    x, norm_w = draw(7, 1, 1, 64, dtype=torch.bfloat16), draw(8, 64, dtype=torch.bfloat16)
    head = draw(9, 77, 64, dtype=torch.bfloat16, scale=0.2)
    out = torch.full((1, 1, 77), float("nan"), device=DEVICE)
    got = triton_gemv.norm_linear(x, norm_w, 1e-5, head, out=out, config=SMALL_TILES)
    want = ref.norm_linear(x, norm_w, 1e-5, head, out=torch.empty_like(out))
    assert rel_err(got, want) < TOL[torch.bfloat16]
    assert torch.equal(got, got.bfloat16().float()), "logits were not rounded to the activation dtype"


@TILES
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_add_updates_the_residual_in_place(dtype, tiles):
    y, w = draw(10, 2, 1, 90, dtype=dtype), draw(11, 50, 90, dtype=dtype, scale=0.2)
    x = draw(12, 2, 1, 50, dtype=dtype)
    want = ref.linear_add(y, w, x.clone())
    got = x.clone()
    assert triton_gemv.linear_add(y, w, got, config=tiles) is got
    assert rel_err(got, want) < TOL[dtype]


@TILES
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,n_heads,n_kv,head_dim,slot", [(1, 6, 2, 12, 5), (2, 3, 3, 8, 0), (1, 4, 1, 16, 7)])
def test_norm_qkv_writes_q_and_the_window_slot(dtype, batch, n_heads, n_kv, head_dim, slot, tiles):
    dim, window = 40, 8
    x, norm_w = draw(13, batch, 1, dim, dtype=dtype), draw(14, dim, dtype=dtype)
    wqkv = draw(15, (n_heads + 2 * n_kv) * head_dim, dim, dtype=dtype, scale=0.3)
    slot_t = torch.tensor([slot], device=DEVICE)
    got = [torch.full((batch, n_kv, window, head_dim), float("nan"), dtype=dtype, device=DEVICE) for _ in range(2)]
    want = [t.clone() for t in got]
    q_got = torch.full((batch, 1, n_heads * head_dim), float("nan"), dtype=dtype, device=DEVICE)
    q_want = torch.empty_like(q_got)
    ref.norm_qkv(x, norm_w, 1e-5, wqkv, q_want, *want, slot_t)
    triton_gemv.norm_qkv(x, norm_w, 1e-5, wqkv, q_got, *got, slot_t, config=tiles)
    assert rel_err(q_got, q_want) < TOL[dtype]
    others = [i for i in range(window) if i != slot]
    for g, w in zip(got, want):
        assert rel_err(g[:, :, slot], w[:, :, slot]) < TOL[dtype]
        assert torch.isnan(g[:, :, others]).all(), "a window slot other than the token's was written"


def test_default_tiles_cover_wide_rows():
    """The default tiles (no override) over a row longer than one K block and a norm over all of it."""
    x, norm_w = draw(16, 1, 1, 1100), draw(17, 1100)
    w = draw(18, 70, 1100, scale=0.05)
    assert rel_err(triton_gemv.norm_linear(x, norm_w, 1e-5, w), ref.norm_linear(x, norm_w, 1e-5, w)) < 1e-4


def test_ops_choose_fused_or_separate_kernels(monkeypatch):
    """LOLACHAT_FUSED_GEMV=0 keeps the Triton path but runs the GEMVs unfused: same results."""
    x, norm_w, w13 = draw(19, 1, 1, 48), draw(20, 48), draw(21, 2 * 30, 48, scale=0.3)
    want = ref.norm_linear(x, norm_w, 1e-5, w13, silu=True)
    monkeypatch.setenv("LOLACHAT_TRITON", "1")
    assert ops.fused_gemv(x, 30, 48)
    assert rel_err(ops.norm_linear(x, norm_w, 1e-5, w13, silu=True), want) < 1e-4
    monkeypatch.setenv("LOLACHAT_FUSED_GEMV", "0")
    assert not ops.fused_gemv(x, 30, 48)
    assert rel_err(ops.norm_linear(x, norm_w, 1e-5, w13, silu=True), want) < 1e-4


def test_shapes_measured_slower_fused_take_the_separate_kernels(monkeypatch):
    monkeypatch.setitem(triton_gemv.CONFIGS, (30, 48), None)
    monkeypatch.setenv("LOLACHAT_TRITON", "1")
    x = draw(22, 1, 1, 48)
    assert not ops.fused_gemv(x, 30, 48)
    assert ops.fused_gemv(x, 31, 48)
