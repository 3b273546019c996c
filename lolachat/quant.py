"""Weight-only int8 quantization of the Llama's linear layers, for the CPU engine (issue 3).

Decode at batch 1 is a chain of matrix-vector products bound by the bytes of the weights; int8 reads a
quarter of float32's. Each output channel (row) gets one scale: w ≈ q · scale with q in [-127, 127].
Only the matrices are quantized: the embedding lookup, the norms and the LoLA feature maps stay float.
"""

from __future__ import annotations

import functools
import time

import torch
import torch.nn.functional as F
from torch import nn

from lolachat.errors import BadInput, LolachatError

QUANT_CHOICES = ("auto", "none", "int8")
# Rows up to which the int8 kernel runs (decode); a longer block (prefill) is compute-bound, where
# float GEMM on the dequantized matrix is faster than torch's int8 kernel.
KERNEL_ROWS = 4
# torch 2.13's AVX-512 bf16 path of _weight_int8pack_mm reads past the end of a row unless K is a multiple
# of 16 (wrong results or a segfault), so rows are zero-padded to that.
K_MULTIPLE = 16


def resolve_quant(quant: str | None, device: torch.device) -> str:
    """'auto' is int8 where the eager CPU engine runs and the int8 kernel is vectorized, else none
    (the static GPU engine reads float matrices)."""
    from lolachat.gpu import static_wanted

    quant = quant or "auto"
    if quant not in QUANT_CHOICES:
        raise BadInput(f"unknown quant {quant!r} (expected {', '.join(QUANT_CHOICES)})")
    eager_cpu = device.type == "cpu" and not static_wanted(device)
    if quant == "auto":
        return "int8" if eager_cpu and int8_kernel_is_fast() else "none"
    if quant == "int8" and not eager_cpu:
        raise BadInput("--quant int8 is for the CPU engine (not CUDA, not LOLACHAT_STATIC=1); use --quant none")
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


def require_kernel() -> None:
    if not kernel_available():
        raise LolachatError(f"this torch ({torch.__version__}) lacks aten._weight_int8pack_mm: "
                            "use --quant none or a newer torch")


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


def quantize_model(model, quant: str) -> None:
    """Replace every Linear of the blocks (q, k, v, o, gate, up, down) and the LM head by an Int8Linear.

    A tied LM head gets its own int8 copy: the embedding lookup stays exact. Call after the weights
    are loaded (and any LoRA merged) and moved to their device and dtype.
    """
    if quant == "none":
        return
    if quant != "int8":
        raise BadInput(f"unknown quant {quant!r}")
    require_kernel()
    for block in model.model.layers:
        for parent in (block.self_attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    if child.bias is not None:
                        raise ValueError(f"{name} has a bias; Int8Linear has none")
                    setattr(parent, name, Int8Linear(child.weight))
    head = model.model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    model.lm_head = Int8Linear(head)
    model.quant = quant


def int8_layers(model) -> list[Int8Linear]:
    """The int8 layers in the order a forward pass runs them, LM head last."""
    layers = [layer for block in model.model.layers for parent in (block.self_attn, block.mlp)
              for layer in parent.children() if isinstance(layer, Int8Linear)]
    return layers + [model.lm_head]
