"""Weight-only int8 / int4 quantization of the Llama's linear layers, for the CPU engine (issue 3).

Decode at batch 1 is a chain of matrix-vector products bound by the bytes of the weights; int8 reads a
quarter of float32's. Each output channel (row) gets one scale: w ≈ q · scale with q in [-127, 127].
A matrix whose weights already sit on a 4-bit grid per group of 32 along a row (w = q · scale + min, q in
[0, 15]: what a Q4_0/Q4_1 GGUF dequantizes to) keeps those codes instead (`Int4Linear`): half the bytes
of int8 and no new rounding. Only the matrices are quantized: the embedding lookup, the norms and the
LoLA feature maps stay float.
"""

from __future__ import annotations

import functools
import time

import torch
import torch.nn.functional as F
from torch import nn

from lolachat.errors import BadInput, LolachatError

QUANT_CHOICES = ("auto", "none", "int8", "int4")
# Rows up to which the int8 kernel runs (decode); a longer block (prefill) is compute-bound, where
# float GEMM on the dequantized matrix is faster than torch's int8 kernel.
KERNEL_ROWS = 4
# torch 2.13's AVX-512 bf16 path of _weight_int8pack_mm reads past the end of a row unless K is a multiple
# of 16 (wrong results or a segfault), so rows are zero-padded to that.
K_MULTIPLE = 16
INT4_GROUP = 32
INT4_ROW_MULTIPLE = 16  # torch's int4 packing wants the row count a multiple of 16
# A group is on a 4-bit grid when refitting one reproduces every weight to this fraction of its step.
GRID_TOLERANCE = 1e-3
GRID_CHECK_ROWS = 1024


def resolve_quant(quant: str | None, device: torch.device) -> str:
    """'auto' is int4 (4-bit codes kept where the weights are 4-bit already, int8 elsewhere) where the eager
    CPU engine runs and the kernels are vectorized, else none (the static GPU engine reads float matrices)."""
    from lolachat.gpu import static_wanted

    quant = quant or "auto"
    if quant not in QUANT_CHOICES:
        raise BadInput(f"unknown quant {quant!r} (expected {', '.join(QUANT_CHOICES)})")
    eager_cpu = device.type == "cpu" and not static_wanted(device)
    if quant == "auto":
        if not (eager_cpu and int8_kernel_is_fast()):
            return "none"
        return "int4" if int4_kernel_available() else "int8"
    if quant != "none" and not eager_cpu:
        raise BadInput(f"--quant {quant} is for the CPU engine (not CUDA, not LOLACHAT_STATIC=1); use --quant none")
    return quant


@functools.cache
def int8_kernel_is_fast() -> bool:
    """Whether torch has the int8 kernel and it keeps up with a float32 GEMV on a matrix that fits in cache.

    Out of cache, where decode runs, int8 reads a quarter of the bytes, so a kernel about as fast in cache
    wins (4x on this AVX-512 machine); one that falls back to scalar code is several times slower and loses.
    """
    if not kernel_available():
        return False
    w = torch.randn(1536, 576)
    layer = Int8Linear(w)
    x = torch.randn(1, 576)

    def seconds(fn) -> float:
        fn()
        start = time.perf_counter()
        for _ in range(20):
            fn()
        return time.perf_counter() - start

    with torch.inference_mode():
        return seconds(lambda: layer(x)) < 1.5 * seconds(lambda: F.linear(x, w))


def kernel_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def int4_kernel_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def require_kernel(quant: str) -> None:
    if not kernel_available():
        raise LolachatError(f"this torch ({torch.__version__}) lacks aten._weight_int8pack_mm: "
                            "use --quant none or a newer torch")
    if quant == "int4" and not int4_kernel_available():
        raise LolachatError(f"this torch ({torch.__version__}) lacks aten._weight_int4pack_mm_for_cpu: "
                            "use --quant int8")


class Int8Linear(nn.Module):
    """A bias-free linear layer with per-output-channel symmetric int8 weights."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        w = weight.detach().float()
        scales = w.abs().amax(dim=1).clamp_min(1e-30) / 127
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        self.pad = -self.in_features % K_MULTIPLE
        self.register_buffer("qweight", F.pad(q, (0, self.pad)).contiguous())
        self.register_buffer("scales", scales.to(weight.dtype))
        self.register_buffer("kernel_scales", scales.to(torch.bfloat16))  # the kernel wants the input's dtype

    @property
    def weight_bytes(self) -> int:
        """Bytes the decode kernel reads per call."""
        return self.qweight.nbytes + self.kernel_scales.nbytes

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return self.qweight[:, : self.in_features].to(dtype) * self.scales[:, None].to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] > KERNEL_ROWS:
            return F.linear(rows, self.dequantized(x.dtype)).view(*x.shape[:-1], self.out_features)
        # A bf16 input takes the kernel's vectorized path; its float32 path is slower than a float GEMV.
        rows = rows.to(torch.bfloat16).contiguous()
        if self.pad:
            rows = F.pad(rows, (0, self.pad))
        y = torch.ops.aten._weight_int8pack_mm(rows, self.qweight, self.kernel_scales)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def _grid_codes(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """4-bit codes [N, K] (uint8), scales and minimums [N, K / group] of a weight on a 4-bit grid, else None."""
    n, k = weight.shape
    w = weight.float().view(n, k // INT4_GROUP, INT4_GROUP)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    scales = (high - low) / 15
    step = scales.clamp_min(1e-30).unsqueeze(-1)
    codes = torch.round((w - low.unsqueeze(-1)) / step).clamp(0, 15)
    if ((codes * step + low.unsqueeze(-1) - w).abs() > GRID_TOLERANCE * step).any():
        return None
    return codes.view(n, k).to(torch.uint8), scales, low


class Int4Linear(nn.Module):
    """A bias-free linear layer holding 4-bit codes per group of INT4_GROUP weights along a row:
    w = q · scale + minimum, q in [0, 15]. Build it with `Int4Linear.from_grid` (None when the weight is
    not on such a grid)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, minimums: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.dtype = dtype
        self.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int(), 1))
        self.register_buffer("codes", (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8))  # for prefill
        self.register_buffer("scales", scales)  # [N, K / group], float32
        self.register_buffer("minimums", minimums)
        # The kernel dequantizes (q − 8) · scale + zero, with [scale, zero] per (group, row) in the input's dtype.
        zeros = minimums + 8 * scales
        self.register_buffer("kernel_scales", torch.stack([scales, zeros], dim=-1).transpose(0, 1)
                             .contiguous().to(torch.bfloat16))

    @classmethod
    def from_grid(cls, weight: torch.Tensor) -> Int4Linear | None:
        n, k = weight.shape
        if k % INT4_GROUP or n % INT4_ROW_MULTIPLE:
            return None
        # Row blocks bound the float temporaries (an LM head has 28M weights), and an off-grid matrix
        # is usually refused at its first block.
        blocks = [_grid_codes(rows) for rows in weight.detach().split(GRID_CHECK_ROWS)]
        if any(block is None for block in blocks):
            return None
        codes, scales, minimums = (torch.cat(parts) for parts in zip(*blocks))
        return cls(codes, scales, minimums, weight.dtype)

    @property
    def weight_bytes(self) -> int:
        """Bytes the decode kernel reads per call."""
        return self.qweight.nbytes + self.kernel_scales.nbytes

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        codes = torch.stack([self.codes & 15, self.codes >> 4], dim=-1).view(self.out_features, -1, INT4_GROUP)
        w = codes.float() * self.scales.unsqueeze(-1) + self.minimums.unsqueeze(-1)
        return w.view(self.out_features, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] > KERNEL_ROWS:
            return F.linear(rows, self.dequantized(x.dtype)).view(*x.shape[:-1], self.out_features)
        # bf16 activations: the kernel's vectorized path (its float32 path is scalar, 30x slower).
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows.to(torch.bfloat16).contiguous(), self.qweight,
                                                       INT4_GROUP, self.kernel_scales)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group={INT4_GROUP}"


def quantized_linear(weight: torch.Tensor, quant: str) -> nn.Module:
    """int4 keeps a weight's 4-bit grid where it has one; everything else becomes int8."""
    if quant == "int4":
        layer = Int4Linear.from_grid(weight)
        if layer is not None:
            return layer
    return Int8Linear(weight)


def linear_weight(layer: nn.Module) -> torch.Tensor:
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"expected a float nn.Linear, got {type(layer).__name__} (quantized twice?)")
    if layer.bias is not None:
        raise ValueError("a linear layer has a bias; the quantized layers have none")
    return layer.weight


def fused_linear(parent: nn.Module, names: tuple[str, ...], quant: str) -> nn.Module:
    """One quantized layer for the row-wise concatenation of `parent`'s linear layers `names`, which it replaces."""
    weight = torch.cat([linear_weight(getattr(parent, name)) for name in names])
    for name in names:
        delattr(parent, name)
        setattr(parent, name, None)
    return quantized_linear(weight, quant)


def quantize_model(model, quant: str) -> None:
    """Replace the blocks' linear layers (q, k, v fused; o; gate, up fused; down) and the LM head by
    Int8Linear or (quant "int4", weights on a 4-bit grid) Int4Linear layers.

    A tied LM head gets its own int8 copy: the embedding lookup stays exact. Call after the weights
    are loaded (and any LoRA merged) and moved to their device and dtype.
    """
    if quant == "none":
        return
    if quant not in ("int8", "int4"):
        raise BadInput(f"unknown quant {quant!r}")
    require_kernel(quant)
    for block in model.model.layers:
        attn, mlp = block.self_attn, block.mlp
        # One matrix (and one kernel call) for q, k, v and one for gate, up: each row keeps its own
        # scales, so fusing changes no weight.
        attn.qkv_proj = fused_linear(attn, ("q_proj", "k_proj", "v_proj"), quant)
        attn.o_proj = quantized_linear(linear_weight(attn.o_proj), quant)
        mlp.gate_up_proj = fused_linear(mlp, ("gate_proj", "up_proj"), quant)
        mlp.down_proj = quantized_linear(linear_weight(mlp.down_proj), quant)
    head = model.model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    model.lm_head = quantized_linear(head, quant)
    model.quant = quant


def quantized_layers(model) -> list[nn.Module]:
    """The quantized (int8 or int4) layers in the order a forward pass runs them, LM head last."""
    layers = [layer for block in model.model.layers
              for layer in (block.self_attn.qkv_proj, block.self_attn.o_proj, block.mlp.gate_up_proj,
                            block.mlp.down_proj)]
    return layers + [model.lm_head]
