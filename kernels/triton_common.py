"""Building blocks shared by the Triton kernels: RoPE on half-split tiles, the Hedgehog map, dots.

Conventions. A head vector x of size D is handled as its two halves x1 = x[:D/2], x2 = x[D/2:]
(the rotate-half RoPE layout pairs element i with i + D/2), each padded to a power-of-two block
of at least 16 columns (tl.dot's minimum). Padded columns are loaded as 0 and stay 0.
`ACT` codes the activation dtype: 0 float32, 1 bfloat16, 2 float16; under TRITON_INTERPRET=1
(whose dots and casts mishandle 16-bit floats) 3 and 4 stand for bfloat16 and float16 emulated in
float32 with round-to-nearest-even, so the CPU tests check the same arithmetic.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

try:  # accurate sin/cos on the GPU; the interpreter has no libdevice (it uses numpy's instead)
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - older layouts
    from triton.language.extra.cuda import libdevice

PHI_CLAMP = tl.constexpr(1e-12)
RECALL_EPS = tl.constexpr(1e-6)

ACT_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def act_code(dtype: torch.dtype) -> int:
    if dtype not in ACT_CODES:
        raise TypeError(f"unsupported activation dtype {dtype}")
    code = ACT_CODES[dtype]
    return code + 2 if code and interpreting() else code


def block(n: int, minimum: int = 16) -> int:
    """Power-of-two tile size covering n (at least `minimum`)."""
    return max(minimum, triton.next_power_of_2(max(int(n), 1)))


@triton.jit
def _round_bits(x, DROP: tl.constexpr):
    """Round float32 to nearest-even keeping all but the low DROP mantissa bits (normal range)."""
    bits = x.to(tl.uint32, bitcast=True)
    half = (1 << (DROP - 1)) - 1
    bits = bits + half + ((bits >> DROP) & 1)
    bits = (bits >> DROP) << DROP
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def to_act(x, ACT: tl.constexpr):
    """Cast float32 to the activation dtype; the emulated codes round but stay float32."""
    if ACT == 1:
        return x.to(tl.bfloat16)
    elif ACT == 2:
        return x.to(tl.float16)
    elif ACT == 3:
        return _round_bits(x, 16)
    elif ACT == 4:
        return _round_bits(x, 13)
    else:
        return x


@triton.jit
def round_act(x, ACT: tl.constexpr):
    """Round float32 values to the activation dtype and back (what `.to(x.dtype)` does in PyTorch)."""
    return to_act(x, ACT).to(tl.float32)


@triton.jit
def dot_act(a, b, ACT: tl.constexpr):
    """a @ b with float32 accumulation: activation-dtype operands, or exact float32 (no tf32)."""
    if ACT == 0:
        return tl.dot(a, b, input_precision="ieee")
    elif ACT >= 3:
        return tl.dot(to_act(a, ACT), to_act(b, ACT), input_precision="ieee")
    else:
        return tl.dot(to_act(a, ACT), to_act(b, ACT))


@triton.jit
def dot_f32(a, b):
    """float32 a @ b for the fp32 state: three tf32 tensor-core products (~fp32 accuracy, rel. ~1e-6).

    The exact FMA version ("ieee") of the φ(q)ᵀH readout alone spilled hundreds of bytes of
    registers per thread (ptxas, sm_90); tf32x3 stages its operands through shared memory instead."""
    return tl.dot(a, b, input_precision="tf32x3")


@triton.jit
def dot_rows(a, b):
    """a @ b as float32 products summed in float32, without tensor cores: for a of one row (decode), where
    tl.dot would pad it to 16 rows and stage both operands through shared memory. Exact products of
    activation-dtype operands, so the same arithmetic as dot_act up to the order of the sum."""
    return tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)


@triton.jit
def dot_rows_t(a, b):
    """a @ bᵀ, as dot_rows."""
    return tl.sum(a.to(tl.float32)[:, None, :] * b.to(tl.float32)[None, :, :], axis=2)


# How RoPE's sin/cos are computed (the TRIG code). On the GPU: 0 = libdevice cosf/sinf (full-range
# reduction, slow path included: heavy on registers), 1 = Cody–Waite reduction to [−π, π] then the
# hardware's cos.approx/sin.approx (abs. error ~1e-6). The interpreter has neither, so it runs their
# stand-ins: 3 for 0 (tl.cos/tl.sin = numpy) and 2 for 1 (the same reduction, then numpy).
TRIG_GPU = {"libdevice": 0, "reduced": 1}
TRIG_INTERPRETED = {"libdevice": 3, "reduced": 2}
DEFAULT_TRIG = "reduced"

# 2π split for Cody–Waite: C1 and C2 have 8 significant bits, so k·C1 and k·C2 are exact in float32
# for |k| < 2^15 (angles below ~2·10^5 rad: positions up to ~200K at RoPE's highest frequency, 1).
TWO_PI_C1 = tl.constexpr(6.28125)
TWO_PI_C2 = tl.constexpr(253.0 / 131072.0)
TWO_PI_C3 = tl.constexpr(5.070363179981996e-06)
INV_TWO_PI = tl.constexpr(0.15915494309189535)


def trig_mode(name: str | None) -> int:
    table = TRIG_INTERPRETED if interpreting() else TRIG_GPU
    name = DEFAULT_TRIG if name is None else name
    if name not in table:
        raise ValueError(f"trig must be one of {sorted(table)}, not {name!r}")
    return table[name]


@triton.jit
def _cos_approx(x):
    return tl.inline_asm_elementwise("cos.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                     pack=1)


@triton.jit
def _sin_approx(x):
    return tl.inline_asm_elementwise("sin.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                     pack=1)


@triton.jit
def _reduce_two_pi(angle):
    k = tl.floor(angle * INV_TWO_PI + 0.5)
    return ((angle - k * TWO_PI_C1) - k * TWO_PI_C2) - k * TWO_PI_C3


@triton.jit
def cos_sin(pos, inv_freq, TRIG: tl.constexpr):
    """cos, sin of the float32 angles pos[:, None] * inv_freq[None, :] (RoPE's own product)."""
    angle = pos.to(tl.float32)[:, None] * inv_freq[None, :]
    if TRIG == 0:
        return libdevice.cos(angle), libdevice.sin(angle)
    elif TRIG == 1:
        r = _reduce_two_pi(angle)
        return _cos_approx(r), _sin_approx(r)
    elif TRIG == 2:
        r = _reduce_two_pi(angle)
        return tl.cos(r), tl.sin(r)
    else:
        return tl.cos(angle), tl.sin(angle)


@triton.jit
def rotate(x1, x2, cos, sin, ACT: tl.constexpr):
    """RoPE of half-split float32 rows, in the activation dtype (as the reference's apply_rope returns)."""
    return to_act(x1 * cos - x2 * sin, ACT), to_act(x2 * cos + x1 * sin, ACT)


@triton.jit
def load_act_rows(ptr, rows, row_stride, row_mask, n_cols, BLOCK_C: tl.constexpr, ACT: tl.constexpr):
    """Load a [rows, BLOCK_C] tile in the activation dtype (float32 for the emulated codes), masked -> 0."""
    cols = tl.arange(0, BLOCK_C)
    mask = row_mask[:, None] & (cols < n_cols)[None, :]
    x = tl.load(ptr + rows[:, None] * row_stride + cols[None, :], mask=mask, other=0.0)
    if ACT >= 3:
        return x.to(tl.float32)
    else:
        return x


@triton.jit
def load_halves(ptr, rows, row_stride, row_mask, half, d_half, BLOCK_DH: tl.constexpr):
    """Load rows of head vectors as their two halves, float32, masked rows/columns -> 0."""
    cols = tl.arange(0, BLOCK_DH)
    mask = row_mask[:, None] & (cols < d_half)[None, :]
    base = ptr + rows[:, None] * row_stride + cols[None, :]
    x1 = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + half, mask=mask, other=0.0).to(tl.float32)
    return x1, x2


@triton.jit
def load_rows(ptr, rows, row_stride, row_mask, n_cols, BLOCK_C: tl.constexpr):
    """Load a [rows, BLOCK_C] float32 tile, masked entries -> 0."""
    cols = tl.arange(0, BLOCK_C)
    mask = row_mask[:, None] & (cols < n_cols)[None, :]
    return tl.load(ptr + rows[:, None] * row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _masked_softmax(z, valid):
    z = tl.where(valid[None, :], z, float("-inf"))
    e = tl.exp(z - tl.max(z, axis=1)[:, None])
    p = e / tl.sum(e, axis=1)[:, None]
    return tl.where(valid[None, :], tl.maximum(p, PHI_CLAMP), 0.0)


@triton.jit
def hedgehog_features(x1, x2, w_ptr, d_half, f_half, BLOCK_DH: tl.constexpr, BLOCK_FH: tl.constexpr,
                      VEC: tl.constexpr = False):
    """φ(x) = [softmax(xW), softmax(−xW)] clamped at 1e-12, for half-split rows x1, x2 (float32).

    w_ptr: one head's weight [D, F/2], row-major. Returns the two feature halves, each
    [rows, BLOCK_FH] float32 (padded feature columns are 0). VEC: one row, exact fp32 products (dot_rows).
    """
    k = tl.arange(0, BLOCK_DH)
    f = tl.arange(0, BLOCK_FH)
    f_valid = f < f_half
    w_mask = (k < d_half)[:, None] & f_valid[None, :]
    w_top = w_ptr + k[:, None] * f_half + f[None, :]
    w1 = tl.load(w_top, mask=w_mask, other=0.0).to(tl.float32)
    w2 = tl.load(w_top + d_half * f_half, mask=w_mask, other=0.0).to(tl.float32)
    if VEC:
        z = dot_rows(x1, w1) + dot_rows(x2, w2)
    else:
        z = dot_f32(x1, w1) + dot_f32(x2, w2)
    return _masked_softmax(z, f_valid), _masked_softmax(-z, f_valid)


@triton.jit
def linear_readout(phi_a, phi_b, h_ptr, s_ptr, f_half, d, BLOCK_FH: tl.constexpr, BLOCK_D: tl.constexpr,
                   VEC: tl.constexpr = False):
    """φᵀH [rows, BLOCK_D] and φᵀs [rows] for one head's fp32 state H [F, D] (row-major) and s [F]."""
    f = tl.arange(0, BLOCK_FH)
    cols = tl.arange(0, BLOCK_D)
    f_valid = f < f_half
    mask = f_valid[:, None] & (cols < d)[None, :]
    h_top = h_ptr + f[:, None] * d + cols[None, :]
    h_a = tl.load(h_top, mask=mask, other=0.0)
    h_b = tl.load(h_top + f_half * d, mask=mask, other=0.0)
    s_a = tl.load(s_ptr + f, mask=f_valid, other=0.0)
    s_b = tl.load(s_ptr + f_half + f, mask=f_valid, other=0.0)
    if VEC:
        num = dot_rows(phi_a, h_a) + dot_rows(phi_b, h_b)
    else:
        num = dot_f32(phi_a, h_a) + dot_f32(phi_b, h_b)
    den = tl.sum(phi_a * s_a[None, :], axis=1) + tl.sum(phi_b * s_b[None, :], axis=1)
    return num, den
