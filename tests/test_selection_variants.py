"""Eviction-score variants (`LolaConfig.score`, `lolachat eval --score`; docs/runs/l256-2k-diagnosis.md).

- "error" (the default) is DESIGN §4.4's self-recall error, unchanged;
- "relative" divides it by the value's norm;
- "others" scores each candidate against the state with every other candidate folded in (leave one out).

The variants change only which pairs are kept: the accounting (every token in exactly one store, the state
holding exactly the folded pairs) is the default's.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from lolachat.kernels import reference as ref
from test_lola_memory import fed_in_odd_steps, tokens
from test_selection import HEADS, KV_HEADS, C, check_stores, evictions, feed, gqa_model
from test_selection import one_layer as selection_layer
from tiny import our_model, random_adapters

from lolachat.cli import main
from lolachat.lola import LolaAttention, LolaConfig, eviction_scores, expand_heads, head_names, parse_head_names

SCORES = ["relative", "others"]


def score_model(hf, sparse, selection, sinks, score, **policy):
    model = our_model(hf)
    model.attach_lola(LolaConfig(chunk=C, sparse=sparse, selection=selection, sinks=sinks, score=score, **policy),
                      random_adapters(model.args))
    return model


def random_state(seed=0, heads=3, n=10, f=12, d=8):
    g = torch.Generator().manual_seed(seed)
    phi = torch.softmax(torch.randn(1, heads, n, f, generator=g), dim=-1)
    v = torch.randn(1, heads, n, d, generator=g)
    h = torch.einsum("bhnf,bhnd->bhfd", phi, v) * 3  # some earlier folds
    s = phi.sum(2) * 3
    return phi, v, h, s


def test_default_is_the_design_error_and_bad_names_are_refused():
    assert LolaConfig().score == "error"
    phi, v, h, s = random_state()
    assert torch.equal(eviction_scores(phi, v, h, s), ref.self_recall_error(phi, v, h, s))
    with pytest.raises(ValueError, match="score"):
        LolaConfig(score="max")


def test_relative_is_the_error_over_the_value_norm():
    phi, v, h, s = random_state(1)
    want = ref.self_recall_error(phi, v, h, s) / v.norm(dim=-1)
    torch.testing.assert_close(eviction_scores(phi, v, h, s, "relative"), want)


def test_others_is_the_error_against_the_state_with_every_other_candidate_folded():
    phi, v, h, s = random_state(2)
    n = phi.shape[2]
    want = torch.empty(phi.shape[:3])
    for i in range(n):
        others = [j for j in range(n) if j != i]
        h_i, s_i = h.clone(), s.clone()
        ref.fold(phi[:, :, others], v[:, :, others], h_i, s_i)
        want[:, :, i] = ref.self_recall_error(phi[:, :, i : i + 1], v[:, :, i : i + 1], h_i, s_i)[:, :, 0]
    torch.testing.assert_close(eviction_scores(phi, v, h, s, "others"), want, atol=1e-5, rtol=1e-5)


def test_others_spends_no_slot_on_duplicates():
    """Three copies of a pair with a large value and one unique pair with a small one, an empty state,
    λ = 2: the error keeps two copies (scores = value norms); "others" keeps the unique pair, since each
    copy is recalled exactly by the other two."""
    f, d = 6, 4
    dup_k = torch.tensor([1.0, 0, 0, 0, 0, 0])
    uniq_k = torch.tensor([0, 0, 0, 0, 0, 1.0])
    phi = torch.stack([dup_k, dup_k, dup_k, uniq_k]).view(1, 1, 4, f) + 1e-3
    v = torch.stack([torch.full((d,), 5.0)] * 3 + [torch.full((d,), 1.0)]).view(1, 1, 4, d)
    h, s = torch.zeros(1, 1, f, d), torch.zeros(1, 1, f)
    keep_error, _ = ref.select_keep(eviction_scores(phi, v, h, s, "error"), 2)
    keep_others, _ = ref.select_keep(eviction_scores(phi, v, h, s, "others"), 2)
    assert keep_error.tolist() == [[[0, 1]]]
    assert 3 in keep_others[0, 0].tolist()


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("selection,sinks", [("head", 0), ("group", 0), ("head", 4)])
@pytest.mark.parametrize("sparse", [0, 5, 16])
def test_every_token_in_exactly_one_store(score, selection, sinks, sparse):
    hf = gqa_model()
    model = score_model(hf, sparse, selection, sinks, score)
    mem = model.new_memory()
    ids = tokens(hf.config.vocab_size, 200)
    for fed in fed_in_odd_steps(model, mem, ids):
        for layer in mem.layers:
            check_stores(layer, fed, sparse, sinks, selection)


@pytest.mark.parametrize("policy", [{"recent_slots": 3}, {"score_halflife": 24},
                                    {"recent_slots": 5, "retrieval_heads": ((0, 1), (1, 4))}],
                         ids=["recent-slots", "score-halflife", "retrieval-heads"])
@pytest.mark.parametrize("selection,sinks", [("head", 0), ("group", 0), ("head", 4)])
def test_every_token_in_exactly_one_store_under_each_eviction_policy(policy, selection, sinks):
    """The accounting of the core issue under the ways of favouring recent pairs: recent slots, an age discount on
    the score, and heads spared from recent slots."""
    hf = gqa_model()
    model = score_model(hf, 5, selection, sinks, "others", **policy)
    mem = model.new_memory()
    ids = tokens(hf.config.vocab_size, 200)
    for fed in fed_in_odd_steps(model, mem, ids):
        for layer in mem.layers:
            check_stores(layer, fed, 5, sinks, selection)


def one_layer(selection: str, sinks: int, score: str, sparse: int = 5, chunk: int = 4, seed: int = 0):
    """test_selection's layer with this score, its values repeated in a few positions so that "others" has
    duplicates to find."""
    attn, mem, q, k, v = selection_layer(selection, sinks, sparse, chunk, seed, score=score)
    v[:, :, 1::7] = v[:, :, :1]
    return attn, mem, q, k, v


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("selection,sinks", [("head", 0), ("group", 0), ("head", 3), ("group", 3)])
def test_state_holds_exactly_the_folded_pairs_once(score, selection, sinks):
    """Every token that left the window is either in the sparse cache of a head or folded into that head's
    state, exactly once: H, s equal the sum over the folded tokens (none twice, none missing)."""
    attn, mem, q, k, v = one_layer(selection, sinks, score)
    feed(attn, mem, q, k, v, 0, q.shape[2])
    group = HEADS // KV_HEADS
    positions = torch.arange(q.shape[2])
    phi = attn.phi(expand_heads(k, group), positions, attn.adapter.phi_k)
    values = expand_heads(v, group)
    held = expand_heads(mem.sparse_pos, HEADS // mem.sparse_pos.shape[1])
    assert mem.folded > 0 and mem.folded + mem.sparse_len == mem.window_start
    for head in range(HEADS):
        cached = held[0, head].tolist()
        assert len(set(cached)) == len(cached)
        folded = sorted(set(range(mem.window_start)) - set(cached))
        assert len(folded) == mem.folded and not set(folded) & set(range(sinks))
        torch.testing.assert_close(mem.s[0, head], phi[0, head, folded].sum(0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mem.h[0, head], phi[0, head, folded].T @ values[0, head, folded],
                                   atol=1e-5, rtol=1e-5)


def expected_keep(attn, before) -> list[set[int]]:
    """Positions each selection head should keep when `before`'s previous chunk leaves: the top λ of its
    non-sink candidates by the configured score (max over a group's heads with group selection)."""
    c = attn.cfg.chunk
    sel_heads = before.sparse_k.shape[1]
    group = HEADS // sel_heads
    held = before.sink_len
    chunk_k, chunk_v = (expand_heads(x[:, :, :c], sel_heads // KV_HEADS) for x in (before.window_k, before.window_v))
    chunk_pos = torch.arange(before.window_start, before.window_start + c).expand(1, sel_heads, c)
    cand_k = torch.cat([before.sparse_k[:, :, held:], chunk_k], dim=2)
    cand_v = torch.cat([before.sparse_v[:, :, held:], chunk_v], dim=2)
    cand_pos = torch.cat([before.sparse_pos[:, :, held:], chunk_pos], dim=2)
    phi = attn.phi(expand_heads(cand_k, group), expand_heads(cand_pos, group), attn.adapter.phi_k)
    h, s = before.h.clone(), before.s.clone()
    scores = eviction_scores(phi, expand_heads(cand_v, group), h, s, attn.cfg.score)
    worst = scores.view(1, sel_heads, group, -1).amax(dim=2)
    top = torch.sort(worst, descending=True, stable=True).indices[..., : attn.cfg.sparse]
    return [set(cand_pos[0, i, top[0, i]].tolist()) for i in range(sel_heads)]


@pytest.mark.parametrize("score", ["error", *SCORES])
@pytest.mark.parametrize("selection,sinks", [("head", 0), ("group", 3)])
def test_keeps_top_lambda_by_the_chosen_score(score, selection, sinks):
    attn, mem, q, k, v = one_layer(selection, sinks, score)
    for before in evictions(attn, mem, q, k, v):
        kept = [set(mem.sparse_pos[0, i, mem.sink_len :].tolist()) for i in range(mem.sparse_pos.shape[1])]
        assert kept == expected_keep(attn, before)


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("selection", ["head", "group"])
def test_variant_changes_the_selection(score, selection):
    """Guards against a variant that silently runs the default."""
    held = {}
    for name in ("error", score):
        attn, mem, q, k, v = one_layer(selection, 0, name)
        feed(attn, mem, q, k, v, 0, q.shape[2])
        held[name] = mem.sparse_pos.clone()
    assert not torch.equal(held["error"].sort(-1).values, held[score].sort(-1).values)


def load_needle_probe():
    path = Path(__file__).parent.parent / "scripts" / "needle_probe.py"
    spec = importlib.util.spec_from_file_location("needle_probe", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    return probe


@pytest.mark.parametrize("score", ["error", *SCORES])
def test_needle_probe_compete_is_the_engines(score, monkeypatch):
    """scripts/needle_probe.py replaces `_compete` with a recording copy: with no oracle it must keep the
    engine's pairs and give the engine's logits."""
    probe = load_needle_probe()
    hf = gqa_model()
    model = score_model(hf, 16, "head", 0, score)
    ids = tokens(hf.config.vocab_size, 150)
    with torch.no_grad():
        want_mem = model.new_memory()
        want = model(ids, want_mem, all_logits=True)
        monkeypatch.setattr(LolaAttention, "_compete", probe.compete)
        got_mem = model.new_memory()
        got = model(ids, got_mem, all_logits=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(a.sparse_pos, b.sparse_pos) for a, b in zip(want_mem.layers, got_mem.layers))
    assert probe.PROBE["records"]


def test_eval_cli_passes_score_into_engine_and_json(tmp_path, capsys):
    from test_evals import build_tiny_model

    folder = build_tiny_model(tmp_path / "model")
    out = tmp_path / "pk.json"
    run = ["eval", "passkey", str(folder), "--feature-map", "identity", "--lengths", "300", "--depths", "50%",
           "--samples", "1", "--max-new-tokens", "3", "--device", "cpu", "--window", "16", "--sparse", "16",
           "--out", str(out)]
    code = main(run + ["--score", "others", "--score-halflife", "256", "--recent-slots", "4"])
    assert code == 0
    assert "score others, score half-life 256, 4 recent slots" in capsys.readouterr().out
    engine = json.loads(out.read_text())["engine"]
    assert (engine["score"], engine["score_halflife"], engine["recent_slots"]) == ("others", 256, 4)
    assert main(run) == 0
    engine = json.loads(out.read_text())["engine"]
    assert (engine["score"], engine["score_halflife"], engine["recent_slots"]) == ("error", 0, 0)
    assert main(run + ["--recent-slots", "17"]) != 0
    assert "recent slots must be between 0 and the sparse cache size 16" in capsys.readouterr().err


@pytest.mark.parametrize("selection", ["head", "group"])
def test_recent_slots_hold_the_newest_evicted_pairs_in_the_cpu_engine(selection):
    """LolaConfig.recent_slots reaches the CPU engine's eviction: after a prompt, every layer's sparse cache (per
    selection head) holds the 6 newest pairs that left the window; without recent slots the score alone drops some."""
    hf = gqa_model()
    ids = tokens(hf.config.vocab_size, 150)

    def newest_missing(recent_slots: int) -> int:
        model = our_model(hf)
        model.attach_lola(LolaConfig(chunk=C, sparse=16, selection=selection, recent_slots=recent_slots),
                          random_adapters(model.args, seed=3))
        with torch.no_grad():
            mem = model.new_memory()
            model(ids, mem)
        missing = 0
        for layer in mem.layers:
            newest = set(range(layer.window_start - 6, layer.window_start))
            missing += sum(len(newest - set(row)) for row in layer.sparse_pos[0].tolist())
        return missing

    assert newest_missing(6) == 0
    assert newest_missing(0) > 0


def test_exempt_heads_cover_the_whole_selection_group():
    """A retrieval head spares its own layer only, and with group selection every query head of its KV group
    (they share one selection, which keeps whatever any of them raises)."""
    cfg = LolaConfig(sparse=16, recent_slots=4, retrieval_heads=((2, 4), (2, 0), (5, 8)))
    assert cfg.exempt_heads(2) == (0, 4)
    assert cfg.exempt_heads(2, group=3) == (0, 1, 2, 3, 4, 5)
    assert cfg.exempt_heads(3, group=3) == ()
    assert cfg.recency(5, 3) == ref.Recency(0, 4, (6, 7, 8))
    assert cfg.recency() == ref.Recency(0, 4, ())
    assert parse_head_names(["L5H8", " L2H0", "L2H0"]) == ((2, 0), (5, 8))
    assert head_names(((2, 0), (5, 8))) == ["L2H0", "L5H8"]
    for bad in ("L2", "2:0", "L-1H2", "H2L1"):
        with pytest.raises(ValueError, match="L<layer>H<head>"):
            parse_head_names([bad])


@pytest.mark.parametrize("selection", ["head", "group"])
def test_retrieval_heads_keep_every_slot_by_score_in_the_cpu_engine(selection):
    """LolaConfig.retrieval_heads reaches the CPU engine's eviction: with every λ slot held for recent pairs, a
    retrieval head's selection (and with group selection its whole KV group's) is still the plain score's, and
    every other head holds exactly the newest pairs."""
    hf = gqa_model()
    ids = tokens(hf.config.vocab_size, 150)
    group = HEADS // KV_HEADS if selection == "group" else 1

    def run(**policy) -> list:
        model = our_model(hf)
        model.attach_lola(LolaConfig(chunk=C, sparse=16, selection=selection, **policy),
                          random_adapters(model.args, seed=3))
        with torch.no_grad():
            mem = model.new_memory()
            model(ids, mem)
        return mem.layers

    plain = run()
    spared = run(recent_slots=16, retrieval_heads=((0, 2),))  # layer 0: its inputs do not depend on the policy
    selection_head = 2 // group  # the row of the sparse cache that head 2's selection fills
    for i, (want, got) in enumerate(zip(plain, spared)):
        for row in range(got.sparse_pos.shape[1]):
            kept = got.sparse_pos[0, row].sort().values
            if i == 0 and row == selection_head:
                assert torch.equal(kept, want.sparse_pos[0, row].sort().values)
            else:
                newest = torch.arange(got.window_start - 16, got.window_start)
                assert torch.equal(kept, newest)
    assert not torch.equal(plain[0].sparse_pos[0, selection_head].sort().values,
                           torch.arange(plain[0].window_start - 16, plain[0].window_start))


def test_eval_cli_sets_retrieval_heads(tmp_path, capsys):
    from test_evals import build_tiny_model

    folder = build_tiny_model(tmp_path / "model")
    out = tmp_path / "pk.json"
    run = ["eval", "passkey", str(folder), "--feature-map", "identity", "--lengths", "300", "--depths", "50%",
           "--samples", "1", "--max-new-tokens", "3", "--device", "cpu", "--window", "16", "--sparse", "16",
           "--recent-slots", "8", "--out", str(out)]
    assert main(run + ["--retrieval-heads", "L1H0,L0H1"]) == 0
    assert "8 recent slots (none in 2 retrieval heads)" in capsys.readouterr().out
    assert json.loads(out.read_text())["engine"]["retrieval_heads"] == ["L0H1", "L1H0"]
    assert main(run + ["--retrieval-heads", "L1H0,17"]) != 0
    assert "bad --retrieval-heads: a head is named L<layer>H<head>" in capsys.readouterr().err
    assert main(run + ["--retrieval-heads", "L0H99"]) != 0
    assert "--retrieval-heads L0H99:" in capsys.readouterr().err
    no_recent = [arg for arg in run if arg not in ("--recent-slots", "8")]
    assert main(no_recent + ["--retrieval-heads", "L0H1"]) != 0
    assert "give some with --recent-slots N" in capsys.readouterr().err
    exact = no_recent + ["--mode", "exact"]
    assert main(exact + ["--retrieval-heads", "L0H1"]) != 0
    assert "--retrieval-heads applies to LoLA mode only" in capsys.readouterr().err
