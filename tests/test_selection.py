"""Sparse-cache selection variants: one selection per KV-head group, and attention sinks never evicted."""

import copy
import json

import pytest
import torch
from lolachat.kernels import reference as ref
from test_lola_memory import fed_in_odd_steps, tokens
from tiny import hf_config, hf_model, our_model, random_adapters
from tiny_chat_model import build

import lolachat
from lolachat.cli import main
from lolachat.errors import LolachatError
from lolachat.lola import LayerAdapter, LolaAttention, LolaConfig, LolaLayerMemory, Rope, expand_heads

C = 8
HEADS, KV_HEADS = 6, 2  # a GQA group of 3
VARIANTS = [("group", 0), ("head", 4), ("group", 4)]


def variant_model(hf, sparse, selection, sinks, mix="lola", chunk=C, max_distance=None):
    model = our_model(hf)
    cfg = LolaConfig(chunk=chunk, sparse=sparse, mix=mix, selection=selection, sinks=sinks,
                     max_distance=max_distance)
    model.attach_lola(cfg, random_adapters(model.args))
    return model


def gqa_model():
    return hf_model(hf_config(n_heads=HEADS, n_kv_heads=KV_HEADS))


def distinct_tokens(vocab: int, n: int, seed: int = 5) -> torch.Tensor:
    """No token twice: in layer 0 a repeated token repeats its (k, v) exactly, and such exact ties in
    eviction scores break by rounding, which differs between a prefill block and single steps."""
    return torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))[:n].view(1, n)


def check_stores(layer, fed: int, sparse: int, sinks: int, selection: str) -> None:
    """Every token fed sits in exactly one store: window, sinks, competed sparse slots or linear state."""
    assert layer.tokens() == fed
    assert layer.window_start + layer.window_len == fed and layer.window_len <= 2 * C
    assert layer.sink_len == min(sinks, layer.window_start)
    assert layer.sparse_len <= sparse + layer.sink_len
    assert layer.sparse_k.shape[1] == (KV_HEADS if selection == "group" else HEADS)
    window = set(range(layer.window_start, fed))
    for head in range(layer.sparse_pos.shape[1]):
        cached = layer.sparse_pos[0, head].tolist()
        assert len(set(cached)) == len(cached) == layer.sparse_len
        assert cached[: layer.sink_len] == list(range(layer.sink_len))
        assert not set(cached) & window and max(cached, default=-1) < layer.window_start
    assert layer.folded == layer.window_start - layer.sparse_len


@pytest.mark.parametrize("selection,sinks", VARIANTS)
@pytest.mark.parametrize("sparse", [0, 5, 16])
@pytest.mark.parametrize("mix", ["lola", "lolcats"])
def test_every_token_in_exactly_one_store_and_size_bounded(selection, sinks, sparse, mix):
    hf = gqa_model()
    model = variant_model(hf, sparse, selection, sinks, mix)
    mem = model.new_memory()
    ids = tokens(hf.config.vocab_size, 200)
    sizes = {}
    for fed in fed_in_odd_steps(model, mem, ids):
        for layer in mem.layers:
            check_stores(layer, fed, sparse, sinks, selection)
        sizes[fed] = sum(sum(layer.nbytes().values()) for layer in mem.layers)
    settled = [size for n, size in sizes.items() if n >= sinks + sparse + 2 * C]
    assert settled and len(set(settled)) == 1


@pytest.mark.parametrize("selection,sinks", VARIANTS)
@pytest.mark.parametrize("sparse", [0, 5, 16])
@pytest.mark.parametrize("mix", ["lola", "lolcats"])
@pytest.mark.parametrize("split", [75, 19])
def test_prefill_then_decode_equals_token_by_token(selection, sinks, sparse, mix, split):
    hf = gqa_model()
    model = variant_model(hf, sparse, selection, sinks, mix, max_distance=30)
    n = 75
    ids = distinct_tokens(hf.config.vocab_size, n)
    with torch.no_grad():
        mem = model.new_memory()
        stepwise = torch.cat([model(ids[:, i : i + 1], mem)[0] for i in range(n)])
        mem2 = model.new_memory()
        blocked = [model(ids[:, :split], mem2, all_logits=True)[0]]
        blocked += [model(ids[:, i : i + 1], mem2)[0] for i in range(split, n)]
    torch.testing.assert_close(torch.cat(blocked), stepwise, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("selection,sinks", VARIANTS)
def test_large_cache_is_exact_attention(selection, sinks):
    hf = gqa_model()
    n = 45
    ids = tokens(hf.config.vocab_size, n)
    model = variant_model(hf, n, selection, sinks, chunk=4)
    with torch.no_grad():
        exact = hf(ids).logits[0]
        got = model(ids, model.new_memory(), all_logits=True)[0]
        mem = model.new_memory()
        decoded = torch.cat([model(ids[:, i : i + 1], mem)[0] for i in range(n)])
    torch.testing.assert_close(got, exact, atol=1e-4, rtol=0)
    torch.testing.assert_close(decoded, exact, atol=1e-4, rtol=0)


def test_group_selection_differs_from_per_head_and_stores_a_third():
    """Guards against a variant that silently runs the default."""
    hf = gqa_model()
    ids = tokens(hf.config.vocab_size, 120)
    with torch.no_grad():
        mems = {}
        for selection in ("head", "group"):
            model = variant_model(hf, 5, selection, 0)
            mems[selection] = model.new_memory()
            model(ids, mems[selection])
    head, group = mems["head"].layers[0], mems["group"].layers[0]
    per_head = [set(head.sparse_pos[0, h].tolist()) for h in range(HEADS)]
    assert any(per_head[h] != per_head[h + 1] for h in range(HEADS) if h % 3 != 2)  # heads of a group disagree
    assert head.nbytes()["sparse"] == 3 * group.nbytes()["sparse"]
    assert head.nbytes()["window"] == group.nbytes()["window"] and head.nbytes()["state"] == group.nbytes()["state"]


# --- one layer driven directly: which pairs are kept, and what the linear state holds ---


def one_layer(selection: str, sinks: int, sparse: int = 5, chunk: int = 4, seed: int = 0, **config):
    g = torch.Generator().manual_seed(seed)
    d, half = 8, 6
    phi_q, phi_k = (torch.randn(HEADS, d, half, generator=g) for _ in range(2))
    adapter = LayerAdapter(phi_q=phi_q, phi_k=phi_k, window_factor=torch.zeros(HEADS))
    cfg = LolaConfig(chunk=chunk, sparse=sparse, selection=selection, sinks=sinks, **config)
    attn = LolaAttention(cfg, adapter, Rope(1.0 / 10000 ** (torch.arange(0, d, 2) / d)), scale=d**-0.5)
    mem = LolaLayerMemory(cfg, 1, HEADS, KV_HEADS, d, 2 * half, torch.float32, "cpu")
    n = 80
    q = torch.randn(1, HEADS, n, d, generator=g)
    k = torch.randn(1, KV_HEADS, n, d, generator=g)
    v = torch.randn(1, KV_HEADS, n, d, generator=g)
    return attn, mem, q, k, v


def feed(attn, mem, q, k, v, start, end):
    attn.attend(mem, q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], start)


def evictions(attn, mem, q, k, v):
    """Feed the layer chunk by chunk; at each chunk close yield the memory as it was just before that eviction
    (mem then holds the state after it). The sparse cache is full from the 4th close on."""
    c = attn.cfg.chunk
    fed = 0
    for close in range(6 * c, 20 * c, c):
        feed(attn, mem, q, k, v, fed, close - 1)
        before = copy.deepcopy(mem)
        feed(attn, mem, q, k, v, close - 1, close)
        fed = close
        yield before


@pytest.mark.parametrize("selection,sinks", [("head", 0), *VARIANTS, ("group", 6)])
def test_linear_state_holds_exactly_the_folded_pairs_of_every_head(selection, sinks):
    """Each query head's H, s = Σ over folded tokens of its own φ_k: a pair leaving a group's cache is
    folded into every head of the group, and sinks are never folded."""
    attn, mem, q, k, v = one_layer(selection, sinks)
    feed(attn, mem, q, k, v, 0, q.shape[2])
    group = HEADS // KV_HEADS
    positions = torch.arange(q.shape[2])
    phi = attn.phi(expand_heads(k, group), positions, attn.adapter.phi_k)  # [1, H, N, F]
    values = expand_heads(v, group)
    held = expand_heads(mem.sparse_pos, HEADS // mem.sparse_pos.shape[1])
    assert mem.folded > 0
    for head in range(HEADS):
        folded = sorted(set(range(mem.window_start)) - set(held[0, head].tolist()))
        assert len(folded) == mem.folded and not set(folded) & set(range(sinks))
        want_s = phi[0, head, folded].sum(0)
        want_h = phi[0, head, folded].T @ values[0, head, folded]
        torch.testing.assert_close(mem.s[0, head], want_s, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mem.h[0, head], want_h, atol=1e-5, rtol=1e-5)


def expected_group_keep(attn, before) -> list[set[int]]:
    """Positions each KV head should keep when `before`'s previous chunk leaves: the top λ of its
    non-sink candidates by the max over the group's heads of the self-recall error."""
    c, group = attn.cfg.chunk, HEADS // KV_HEADS
    held = before.sink_len
    chunk_pos = torch.arange(before.window_start, before.window_start + c).expand(1, KV_HEADS, c)
    cand_k = torch.cat([before.sparse_k[:, :, held:], before.window_k[:, :, :c]], dim=2)
    cand_v = torch.cat([before.sparse_v[:, :, held:], before.window_v[:, :, :c]], dim=2)
    cand_pos = torch.cat([before.sparse_pos[:, :, held:], chunk_pos], dim=2)
    phi = attn.phi(expand_heads(cand_k, group), expand_heads(cand_pos, group), attn.adapter.phi_k)
    errors = ref.self_recall_error(phi, expand_heads(cand_v, group), before.h, before.s)
    worst = errors.view(1, KV_HEADS, group, -1).amax(dim=2)
    top = torch.sort(worst, descending=True, stable=True).indices[..., : attn.cfg.sparse]
    return [set(cand_pos[0, kv, top[0, kv]].tolist()) for kv in range(KV_HEADS)]


@pytest.mark.parametrize("sinks", [0, 3])
def test_group_keeps_top_lambda_by_the_max_error_of_its_heads(sinks):
    attn, mem, q, k, v = one_layer("group", sinks)
    for before in evictions(attn, mem, q, k, v):
        kept = [set(mem.sparse_pos[0, kv, mem.sink_len :].tolist()) for kv in range(KV_HEADS)]
        assert kept == expected_group_keep(attn, before)


@pytest.mark.parametrize("selection", ["head", "group"])
@pytest.mark.parametrize("sinks", [4, 12])
@pytest.mark.parametrize("sparse", [0, 5])
def test_sinks_stay_after_many_evictions(selection, sinks, sparse):
    hf = gqa_model()
    model = variant_model(hf, sparse, selection, sinks)
    mem = model.new_memory()
    with torch.no_grad():
        model(tokens(hf.config.vocab_size, 300), mem)
    for layer in mem.layers:
        assert layer.evictions > 30 and layer.sink_len == sinks
        want = torch.arange(sinks).expand(1, layer.sparse_pos.shape[1], sinks)
        assert torch.equal(layer.sparse_pos[:, :, :sinks], want)


@pytest.mark.parametrize("selection,sinks", VARIANTS)
def test_memory_tensors_round_trip(selection, sinks):
    hf = gqa_model()
    model = variant_model(hf, 5, selection, sinks, max_distance=30)
    ids = tokens(hf.config.vocab_size, 101)
    with torch.no_grad():
        mem = model.new_memory()
        model(ids[:, :100], mem)
        restored = model.new_memory()
        restored.position = mem.position
        for src, dst in zip(mem.layers, restored.layers):
            dst.load({name: t.clone() for name, t in src.tensors().items()}, model.rope)
        a, b = model(ids[:, 100:], mem), model(ids[:, 100:], restored)
    assert torch.equal(a, b)


# --- through the engine: sessions, the static-path fallback, the CLI ---


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    return build(tmp_path_factory.mktemp("tiny-chat"))


def engine(folder, selection="head", sinks=0):
    return lolachat.load(str(folder), device="cpu", window=8, sparse=5, feature_map="identity",
                         selection=selection, sinks=sinks)


@pytest.mark.parametrize("selection,sinks", VARIANTS)
def test_session_save_and_resume_give_identical_next_logits(chat_folder, tmp_path, selection, sinks):
    eng = engine(chat_folder, selection, sinks)
    assert (eng.info.selection, eng.info.sinks) == (selection, sinks)
    sess = eng.session()
    list(sess.chat("Once upon a time there was a cat who sat on a mat.", max_new_tokens=30, temperature=0.0))
    path = tmp_path / "s.safetensors"
    sess.save(path)
    resumed = eng.resume(path)
    follow = sess._encode("<|im_start|>user\nAnd then?<|im_end|>\n")
    assert torch.equal(eng.prefill(sess.memory, follow), eng.prefill(resumed.memory, follow))
    stats = resumed.stats()
    assert stats["window_tokens"] + stats["sparse_tokens"] + stats["linear_tokens"] == stats["tokens_seen"]


def test_resume_refuses_other_variant(chat_folder, tmp_path):
    sess = engine(chat_folder, "group", 4).session()
    list(sess.chat("Hello there, how are you doing today?", max_new_tokens=20, temperature=0.0))
    path = tmp_path / "s.safetensors"
    sess.save(path)
    for selection, sinks in [("head", 4), ("group", 0)]:
        with pytest.raises(LolachatError, match="sinks|selection"):
            engine(chat_folder, selection, sinks).resume(path)


def test_static_path_falls_back_to_eager_for_sinks_only(chat_folder, monkeypatch):
    monkeypatch.setenv("LOLACHAT_STATIC", "1")
    for selection, sinks in VARIANTS:
        eng = engine(chat_folder, selection, sinks)
        static = eng.static_decoder() is not None
        assert static == (sinks == 0) and hasattr(eng.new_memory(), "decoder") == static


def test_eval_cli_passes_variant_into_engine_and_json(tmp_path, capsys):
    from test_evals import build_tiny_model

    folder = build_tiny_model(tmp_path / "model")
    out = tmp_path / "pk.json"
    code = main(["eval", "passkey", str(folder), "--feature-map", "identity", "--lengths", "300", "--depths", "50%",
                 "--samples", "1", "--max-new-tokens", "3", "--device", "cpu", "--window", "16", "--sparse", "16",
                 "--selection", "group", "--sinks", "4", "--out", str(out)])
    assert code == 0
    assert "group selection, 4 sinks" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["engine"]["selection"] == "group" and saved["engine"]["sinks"] == 4
    assert main(["eval", "passkey", str(folder), "--feature-map", "identity", "--device", "cpu",
                 "--sinks", "-1"]) == 1


def test_state_halflife_fades_each_fold_by_its_age():
    """λ = 0: every chunk that leaves the window folds whole. With a half-life of h tokens the state at
    the end is Σ_e fade^(E−e) · F_e, F_e the fold of eviction e (fade = 0.5^(C/h)). The F_e come from
    the engine without fading, fed chunk by chunk; layer 0, whose keys and values do not depend on
    the state."""
    hf = gqa_model()
    ids = distinct_tokens(hf.config.vocab_size, 7 * C + 3)
    plain, fading = our_model(hf), our_model(hf)
    plain.attach_lola(LolaConfig(chunk=C, sparse=0), random_adapters(plain.args))
    fading.attach_lola(LolaConfig(chunk=C, sparse=0, state_halflife=2 * C), random_adapters(fading.args))
    folds, mem = [], plain.new_memory()
    with torch.no_grad():
        for start in range(0, ids.shape[1], C):
            before = mem.layers[0].h.clone()
            plain(ids[:, start : start + C], mem)
            if not torch.equal(mem.layers[0].h, before):
                folds.append(mem.layers[0].h - before)
        faded = fading.new_memory()
        fading(ids, faded)
    assert len(folds) == faded.layers[0].evictions == 6  # 59 tokens: 7 chunks closed, the first into the window
    fade = 0.5 ** (C / (2 * C))
    want = sum(fold * fade ** (len(folds) - 1 - e) for e, fold in enumerate(folds))
    torch.testing.assert_close(faded.layers[0].h, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(faded.layers[0].h, mem.layers[0].h, rtol=1e-3)
    with pytest.raises(ValueError, match="half-life"):
        LolaConfig(state_halflife=-1)
