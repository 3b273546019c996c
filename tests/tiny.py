"""Tiny random Llama models shared by the tests: a transformers oracle and our model on the same weights."""

from __future__ import annotations

import torch
import transformers

from lolachat.lola import LayerAdapter, LolaConfig
from lolachat.model import Llama
from lolachat.model_args import ModelArgs


def hf_config(n_heads=4, n_kv_heads=2, tie=False, llama3=False, layers=2, dim=48, vocab=97, max_pos=512):
    rope_scaling = None
    if llama3:
        rope_scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 64}
    return transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=dim, intermediate_size=2 * dim + 8, num_hidden_layers=layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, max_position_embeddings=max_pos,
        rope_theta=10000.0, rope_scaling=rope_scaling, tie_word_embeddings=tie, rms_norm_eps=1e-5,
        attn_implementation="eager",
    )


def hf_model(cfg, seed=0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger than default init so attention patterns are far from uniform
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.15)
    return model


def our_model(hf: transformers.LlamaForCausalLM) -> Llama:
    cfg = hf.config.to_dict()
    if cfg.get("rope_scaling") is None and cfg.get("rope_parameters"):
        params = dict(cfg["rope_parameters"])
        cfg["rope_theta"] = params.get("rope_theta", 10000.0)
        cfg["rope_scaling"] = params if params.get("rope_type") not in (None, "default") else None
    model = Llama(ModelArgs.from_hf_config(cfg)).eval()
    model.load_weights(hf.state_dict())
    return model


def random_adapters(args: ModelArgs, feature_half: int = 8, seed: int = 1, gamma_logit: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    return [
        LayerAdapter(
            phi_q=torch.randn(args.n_heads, args.head_dim, feature_half, generator=g),
            phi_k=torch.randn(args.n_heads, args.head_dim, feature_half, generator=g),
            window_factor=torch.full((args.n_heads,), gamma_logit),
        )
        for _ in range(args.n_layers)
    ]


def lola_model(hf, chunk=4, sparse=16, mix="lola", max_distance=None, phi_input="pre_rope",
               selection="head", state_halflife=0, **config) -> Llama:
    model = our_model(hf)
    model.attach_lola(LolaConfig(chunk=chunk, sparse=sparse, mix=mix, max_distance=max_distance,
                                 phi_input=phi_input, selection=selection, state_halflife=state_halflife, **config),
                      random_adapters(model.args))
    return model
