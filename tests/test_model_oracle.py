"""Our Llama against transformers' LlamaForCausalLM on the same weights (the oracle)."""

import pytest
import torch
from tiny import hf_config, hf_model, lola_model, our_model

CONFIGS = [
    dict(n_heads=4, n_kv_heads=4),  # GQA group 1
    dict(n_heads=6, n_kv_heads=2, tie=True),  # group 3, tied embeddings
    dict(n_heads=8, n_kv_heads=2, llama3=True),  # group 4, llama3 rope scaling
    dict(n_heads=4, n_kv_heads=1, tie=True, llama3=True),
]
SEQ = 37


def tokens(vocab, n, seed=3):
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(ids).logits[0]


@pytest.mark.parametrize("kw", CONFIGS)
@pytest.mark.parametrize("mode", ["exact", "lola_large_cache"])
def test_prefill_matches_transformers(kw, mode):
    hf = hf_model(hf_config(**kw))
    ids = tokens(hf.config.vocab_size, SEQ)
    ours = our_model(hf) if mode == "exact" else lola_model(hf, chunk=4, sparse=SEQ + 8)
    with torch.no_grad():
        got = ours(ids, ours.new_memory(), all_logits=True)[0]
    torch.testing.assert_close(got, hf_logits(hf, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kw", CONFIGS)
@pytest.mark.parametrize("mode", ["exact", "lola_large_cache"])
def test_decode_matches_transformers(kw, mode):
    hf = hf_model(hf_config(**kw))
    ids = tokens(hf.config.vocab_size, SEQ)
    ours = our_model(hf) if mode == "exact" else lola_model(hf, chunk=4, sparse=SEQ + 8)
    mem = ours.new_memory()
    with torch.no_grad():
        got = torch.cat([ours(ids[:, i : i + 1], mem)[0] for i in range(SEQ)])
    torch.testing.assert_close(got, hf_logits(hf, ids), atol=1e-4, rtol=0)
