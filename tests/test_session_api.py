"""The Python API of DESIGN §1 on a tiny chat model: chat, stats, save/resume, logits."""

import json

import pytest
import torch
from tiny_chat_model import build

import lolachat
from lolachat.errors import LolachatError


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build(tmp_path_factory.mktemp("tiny-chat"))


@pytest.fixture(scope="module")
def engine(folder):
    return lolachat.load(str(folder), device="cpu", window=8, sparse=16, feature_map="identity")


def greedy(n=12):
    return dict(max_new_tokens=n, temperature=0.0)


def test_chat_streams_and_stats_account_for_every_token(engine):
    sess = engine.session()
    pieces = list(sess.chat("Hello! How are you today?", **greedy(20)))
    stats = sess.stats()
    assert stats["mode"] == "lola-identity"
    assert stats["tokens_seen"] == stats["last_turn"]["prompt_tokens"] + stats["last_turn"]["new_tokens"]
    assert stats["window_tokens"] + stats["sparse_tokens"] + stats["linear_tokens"] == stats["tokens_seen"]
    assert stats["full_kv_bytes"] > 0 and stats["state_bytes"] > 0
    assert sess.messages[-1]["role"] == "assistant"
    assert "".join(pieces) in sess.messages[-1]["content"] or not pieces


def test_second_turn_feeds_only_the_new_text(engine):
    sess = engine.session()
    list(sess.chat("Tell me a story about a cat.", **greedy(6)))
    first_seen = sess.stats()["tokens_seen"]
    list(sess.chat("What is the capital of France?", **greedy(6)))
    prompt = sess.stats()["last_turn"]["prompt_tokens"]
    assert prompt < 30 and sess.stats()["tokens_seen"] > first_seen


def test_incremental_turns_equal_one_prefill_of_the_same_tokens(engine, monkeypatch):
    """Turn by turn, a session feeds only what is new; its state equals one prefill of every token it fed.

    (Not of the re-tokenized transcript: generated tokens need not be the tokenizer's canonical split.)"""
    fed: list[int] = []
    prefill, generate = engine.prefill, engine.generate

    def recording_prefill(memory, ids, progress=None):
        fed.extend(ids)
        return prefill(memory, ids, progress)

    def recording_generate(memory, logits, n, options):
        for token in generate(memory, logits, n, options):
            fed.append(token)
            yield token

    monkeypatch.setattr(engine, "prefill", recording_prefill)
    monkeypatch.setattr(engine, "generate", recording_generate)
    sess = engine.session()
    list(sess.chat("Tell me a story about a cat.", **greedy(15)))
    list(sess.chat("Numbers: 1 2 3", **greedy(15)))
    assert len(fed) == sess.memory.position
    monkeypatch.undo()
    follow = sess._encode("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")
    fresh = engine.new_memory()
    engine.prefill(fresh, fed)
    torch.testing.assert_close(engine.prefill(fresh, follow), engine.prefill(sess.memory, follow),
                               atol=1e-4, rtol=1e-4)


def test_save_and_resume_continue_like_an_unbroken_run(engine, tmp_path):
    sess = engine.session()
    list(sess.chat("Once upon a time there was a cat.", **greedy(30)))
    list(sess.chat("And then?", **greedy(30)))
    path = tmp_path / "s.safetensors"
    sess.save(path)
    resumed = engine.resume(path)
    assert resumed.messages == sess.messages and resumed.stats()["tokens_seen"] == sess.stats()["tokens_seen"]
    a = list(sess.chat("Hello!", **greedy(10)))
    b = list(resumed.chat("Hello!", **greedy(10)))
    assert a == b


def test_resume_refuses_a_state_from_other_settings(folder, engine, tmp_path):
    sess = engine.session()
    list(sess.chat("Hello!", **greedy(4)))
    path = tmp_path / "s.safetensors"
    sess.save(path)
    other = lolachat.load(str(folder), device="cpu", window=8, sparse=32, feature_map="identity")
    with pytest.raises(LolachatError, match="sparse"):
        other.resume(path)


def test_resume_refuses_a_state_made_with_other_feature_maps(folder, engine, tmp_path):
    """Same settings, another adapter: the saved H, s and cache were made with other maps."""
    from lolachat.adapter import identity_adapter, save_adapter

    sess = engine.session()
    list(sess.chat("Hello!", **greedy(4)))
    path = tmp_path / "s.safetensors"
    sess.save(path)
    nudged = identity_adapter(engine.model.args)
    nudged.layers[0].window_factor += 0.5
    save_adapter(nudged, tmp_path / "nudged.lola.safetensors")
    other = lolachat.load(str(folder), device="cpu", window=8, sparse=16, adapter=tmp_path / "nudged.lola.safetensors")
    assert other.info.adapter_sha256 != engine.info.adapter_sha256
    with pytest.raises(LolachatError, match="adapter_sha256"):
        other.resume(path)
    same = lolachat.load(str(folder), device="cpu", window=8, sparse=16, feature_map="identity")
    assert same.resume(path).messages == sess.messages


def test_sessions_saved_before_the_selection_keys_resume_as_per_head(folder, engine, tmp_path):
    """Older session files have no 'selection'/'sinks' in their engine info: they ran per-head, no sinks."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from lolachat.session import METADATA_KEY, check_compatible

    sess = engine.session()
    list(sess.chat("Hello!", **greedy(4)))
    path = tmp_path / "old.safetensors"
    sess.save(path)
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()[METADATA_KEY])
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    for key in ("selection", "sinks", "state_halflife"):
        del meta["engine"][key]
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(meta)})
    assert engine.resume(path).messages == sess.messages
    group = lolachat.load(str(folder), device="cpu", window=8, sparse=16, feature_map="identity", selection="group")
    with pytest.raises(LolachatError, match="selection='head'"):
        group.resume(path)
    check_compatible({"mode": "exact"}, {"mode": "exact", "selection": None, "sinks": None}, path)
    del meta["engine"]["adapter_sha256"]  # before the adapter was recorded: its maps are unknown
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(meta)})
    with pytest.raises(LolachatError, match="no adapter_sha256 \\(an older lolachat\\)"):
        engine.resume(path)


def test_resume_rejects_a_file_that_is_not_a_session(engine, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(LolachatError, match="not a lolachat session"):
        engine.resume(junk)


def test_logits_of_a_fresh_state_match_a_single_forward(engine):
    ids = list(range(3, 60))
    logits = engine.logits(ids)
    memory = engine.new_memory()
    with torch.no_grad():
        direct = engine.model(torch.tensor([ids]), memory, all_logits=True)[0]
    assert logits.shape == (len(ids), direct.shape[-1])
    torch.testing.assert_close(logits, direct, atol=1e-5, rtol=1e-5)


def test_stopping_a_stream_early_keeps_memory_and_transcript_in_step(engine):
    sess = engine.session()
    stream = sess.chat("Tell me a story about a cat.", max_new_tokens=50, temperature=0.8, seed=1)
    next(stream)
    stream.close()
    assert sess.stats()["last_turn"]["stopped_by"] == "interrupted"
    fresh = engine.session()
    fresh.messages = [dict(m) for m in sess.messages]
    fresh.catch_up()
    # The interrupted reply was recorded exactly as far as the memory saw it.
    assert sess.consumed_text.startswith(fresh.consumed_text.rstrip("\n").removesuffix("<|im_end|>"))


def test_sampling_with_a_seed_is_reproducible(engine):
    runs = []
    for _ in range(2):
        sess = engine.session()
        runs.append("".join(sess.chat("Hello!", max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9, seed=7)))
    assert runs[0] == runs[1]
