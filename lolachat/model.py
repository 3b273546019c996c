"""A lean Llama (GQA, RMSNorm, SwiGLU, RoPE incl. llama3 scaling) whose attention is LoLA or exact.

Parameter names follow Hugging Face's `LlamaForCausalLM`, so its state dicts load unchanged.
The per-conversation memory lives outside the module, in a `ModelMemory`, so one loaded model can
serve many sessions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lolachat.lola import (
    ExactLayerMemory,
    LayerAdapter,
    LolaAttention,
    LolaConfig,
    LolaLayerMemory,
    Rope,
    exact_attend,
    heads_outside,
)
from lolachat.model_args import ModelArgs


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies of the rotary embedding, with Llama 3's frequency-dependent scaling if set."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = args.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv_freq
    if kind != "llama3":
        raise ValueError(f"unsupported rope scaling {kind!r}")
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed down by `factor`, short ones kept, the band between interpolated.
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(in_band, blended, scaled)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.qkv_proj: nn.Module | None = None  # q, k, v in one matrix, set by lolachat.quant (one kernel call)
        self.lola: LolaAttention | None = None

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.qkv_proj is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        kv = self.n_kv_heads * self.head_dim
        return self.qkv_proj(x).split([self.n_heads * self.head_dim, kv, kv], dim=-1)

    def forward(self, x: torch.Tensor, mem, pos0: int, rope: Rope) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.project_qkv(x)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        scale = 1.0 / math.sqrt(self.head_dim)
        if mem.exact:
            positions = torch.arange(pos0, pos0 + t, device=x.device)
            y = exact_attend(mem, rope.rotate(q, positions), rope.rotate(k, positions), v, scale)
        else:
            y = self.lola.attend(mem, q, k, v, pos0)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.up_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.down_proj = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.gate_up_proj: nn.Module | None = None  # gate and up in one matrix, set by lolachat.quant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, mem, pos0: int, rope: Rope) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), mem, pos0, rope)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)


class ModelMemory:
    """One conversation's attention memory across all layers, and how many tokens it has seen."""

    def __init__(self, layers: list, lola: LolaConfig | None):
        self.layers = layers
        self.lola = lola
        self.position = 0

    @property
    def exact(self) -> bool:
        return self.lola is None


class Llama(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Backbone(args)
        self.lm_head = None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        self.rope = Rope(rope_inv_freq(args))
        self.lola_config: LolaConfig | None = None
        self.adapter_feature_dim = 0
        self.quant = "none"  # "int8" once lolachat.quant.quantize_model has run (it sets lm_head even if tied)

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        expected = set(self.state_dict())
        missing = expected - set(tensors)
        if missing:
            raise KeyError(f"weights lack {len(missing)} tensors, e.g. {sorted(missing)[0]}")
        self.load_state_dict({k: v for k, v in tensors.items() if k in expected})

    def attach_lola(self, cfg: LolaConfig, adapters: list[LayerAdapter]) -> None:
        """Switch every layer to LoLA attention with its trained feature maps and window factors."""
        if len(adapters) != self.args.n_layers:
            raise ValueError(f"adapter has {len(adapters)} layers, model has {self.args.n_layers}")
        scale = 1.0 / math.sqrt(self.args.head_dim)
        outside = heads_outside(cfg.retrieval_heads, self.args.n_layers, self.args.n_heads)
        if outside:
            raise ValueError(f"retrieval heads {', '.join(outside)} are not in a model of {self.args.n_layers} "
                             f"layers of {self.args.n_heads} heads")
        for i, (block, adapter) in enumerate(zip(self.model.layers, adapters)):
            device = block.input_layernorm.weight.device
            moved = LayerAdapter(adapter.phi_q.to(device), adapter.phi_k.to(device),
                                 adapter.window_factor.to(device))
            block.self_attn.lola = LolaAttention(cfg, moved, self.rope, scale, layer=i)
        self.lola_config = cfg
        self.adapter_feature_dim = adapters[0].feature_dim

    def new_memory(self, batch: int = 1) -> ModelMemory:
        p = next(self.parameters())
        a = self.args
        if self.lola_config is None:
            layers = [ExactLayerMemory(batch, a.n_kv_heads, a.head_dim, p.dtype, p.device) for _ in range(a.n_layers)]
        else:
            layers = [
                LolaLayerMemory(self.lola_config, batch, a.n_heads, a.n_kv_heads, a.head_dim,
                                self.adapter_feature_dim, p.dtype, p.device)
                for _ in range(a.n_layers)
            ]
        return ModelMemory(layers, self.lola_config)

    def forward(self, tokens: torch.Tensor, memory: ModelMemory, all_logits: bool = False) -> torch.Tensor:
        """Feed tokens [B, T] after what `memory` has seen; returns logits [B, T or 1, vocab] (fp32)."""
        own_forward = getattr(memory, "forward", None)  # a static GPU memory (lolachat.gpu) runs itself
        if own_forward is not None:
            return own_forward(tokens, all_logits)
        self.rope.inv_freq = self.rope.inv_freq.to(tokens.device)
        x = self.model.embed_tokens(tokens)
        pos0 = memory.position
        for block, mem in zip(self.model.layers, memory.layers):
            x = block(x, mem, pos0, self.rope)
        memory.position += tokens.shape[1]
        if not all_logits:
            x = x[:, -1:]
        x = self.model.norm(x)
        if self.lm_head is None:
            return F.linear(x, self.model.embed_tokens.weight).float()
        return self.lm_head(x).float()
