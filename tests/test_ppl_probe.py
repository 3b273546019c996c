"""scripts/ppl_probe.py replaces `LolaAttention._attend_within_chunk` with an instrumented copy of the
engine's attention math. With no knobs set it must give the engine's own logits, so the copy cannot drift
from lolachat/lola.py unnoticed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from tiny import hf_config, hf_model, lola_model

from lolachat import lola


def load_probe():
    spec = importlib.util.spec_from_file_location("ppl_probe", Path(__file__).parent.parent / "scripts" /
                                                  "ppl_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    return probe


@pytest.mark.parametrize("mix,selection,halflife", [("lola", "head", 0), ("lolcats", "group", 12)])
def test_probe_attention_without_knobs_is_the_engines(mix, selection, halflife, monkeypatch):
    probe = load_probe()
    model = lola_model(hf_model(hf_config(n_heads=6, n_kv_heads=2)), chunk=4, sparse=8, mix=mix,
                       selection=selection, state_halflife=halflife)
    # 70 tokens with C = 4 and λ = 8: many evictions into the sparse cache and the linear state
    ids = torch.randint(0, 97, (1, 70), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids, model.new_memory(), all_logits=True)
        monkeypatch.setattr(lola.LolaAttention, "_attend_within_chunk", probe.attend_within_chunk)
        got = model(ids, model.new_memory(), all_logits=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
