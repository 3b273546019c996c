"""Distillation: the parallel student equals inference, training lowers the loss, adapters load and resume."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_evals import build_tiny_model

import lolachat
from lolachat.cli import main
from lolachat.commands.distill import load_base
from lolachat.distill import (
    DistillConfig,
    Trainable,
    distill,
    hybrid_attention,
    read_init_adapter,
    sparse_schedule,
    stage1_path,
    student_logits,
    student_loss,
)
from lolachat.distill_data import collect, load_corpus, prepare, save_corpus
from lolachat.errors import BadInput
from lolachat.lola import LayerAdapter, LolaAttention, LolaConfig, LolaLayerMemory, Rope

B, H, HKV, D, HALF, C = 2, 4, 2, 8, 6, 8
ROOT = Path(__file__).resolve().parent.parent


def random_qkv(t: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, t, D, generator=g) * 1.5
    k = torch.randn(B, HKV, t, D, generator=g) * 1.5
    v = torch.randn(B, HKV, t, D, generator=g)
    adapter = LayerAdapter(torch.randn(H, D, HALF, generator=g), torch.randn(H, D, HALF, generator=g),
                           torch.randn(H, generator=g))
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    return q, k, v, adapter, inv_freq


@pytest.mark.parametrize("mix", ["lola", "lolcats"])
@pytest.mark.parametrize("phi_input", ["pre_rope", "post_rope"])
@pytest.mark.parametrize("sparse,max_distance,selection,halflife", [
    (0, None, "head", 0), (5, None, "head", 0), (16, 20, "head", 0), (24, None, "head", 0), (200, 20, "head", 0),
    (5, None, "group", 0), (16, 20, "group", 0),
    # the linear state fades as at inference (state_halflife): λ = 0, a cache that fills late, group selection
    (0, None, "head", 16), (20, None, "head", 24), (16, 20, "group", 12)])
def test_parallel_student_equals_lola_attention(mix, phi_input, sparse, max_distance, selection, halflife):
    t = 83  # not a multiple of C: a partial last chunk
    q, k, v, adapter, inv_freq = random_qkv(t)
    cfg = LolaConfig(chunk=C, sparse=sparse, mix=mix, phi_input=phi_input, max_distance=max_distance,
                     selection=selection, state_halflife=halflife)
    attention = LolaAttention(cfg, adapter, Rope(inv_freq), 1 / math.sqrt(D))
    want = attention.attend(LolaLayerMemory(cfg, B, H, HKV, D, 2 * HALF, torch.float32, "cpu"), q, k, v, 0)
    schedule = sparse_schedule(k, v, adapter.phi_k, inv_freq, n_heads=H, chunk=C, capacity=sparse,
                               phi_input=phi_input, selection=selection, state_halflife=halflife)
    got = hybrid_attention(q, k, v, adapter.phi_q, adapter.phi_k, adapter.window_factor, inv_freq, chunk=C,
                           mix=mix, phi_input=phi_input, sparse=schedule, max_distance=max_distance,
                           state_halflife=halflife)
    torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4)
    assert (schedule is None) == (sparse == 0)


def test_schedule_is_the_inference_cache_chunk_by_chunk():
    t = 10 * C
    q, k, v, adapter, inv_freq = random_qkv(t, seed=3)
    cfg = LolaConfig(chunk=C, sparse=20, phi_input="pre_rope")
    attention = LolaAttention(cfg, adapter, Rope(inv_freq), 1 / math.sqrt(D))
    mem = LolaLayerMemory(cfg, B, H, HKV, D, 2 * HALF, torch.float32, "cpu")
    idx, valid, _, _ = sparse_schedule(k, v, adapter.phi_k, inv_freq, n_heads=H, chunk=C, capacity=20,
                                       phi_input="pre_rope")
    for n in range(10):
        if n >= 2:  # what the queries of chunk n see = the cache after chunks 0..n-1 went in
            members = idx[:, :, n, valid[0, 0, n]]
            assert torch.equal(mem.sparse_pos.sort(dim=-1).values, members)
        attention.attend(mem, q[:, :, n * C : (n + 1) * C], k[:, :, n * C : (n + 1) * C],
                         v[:, :, n * C : (n + 1) * C], n * C)


def test_gradients_reach_the_trainable_parameters():
    q, k, v, adapter, inv_freq = random_qkv(40)
    params = [adapter.phi_q.requires_grad_(), adapter.phi_k.requires_grad_(), adapter.window_factor.requires_grad_()]
    k.requires_grad_()
    y = hybrid_attention(q, k, v, *params, inv_freq, chunk=C, mix="lola", phi_input="pre_rope",
                         sparse=sparse_schedule(k, v, adapter.phi_k, inv_freq, n_heads=H, chunk=C, capacity=8,
                                                phi_input="pre_rope"))
    y.square().mean().backward()
    for p in [*params, k]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------- model level


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("distill") / "model", max_position=512)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """~30K characters of varied English text (pydoc topics), not in the test tokenizer's training text."""
    docs = collect(["pydoc"])
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text("\n\n".join(d.text for d in docs)[:60000])
    return path


def test_student_model_equals_engine_with_the_written_adapter(tiny_folder, tmp_path):
    model, tokenizer, base = load_base(str(tiny_folder), torch.device("cpu"), torch.float32)
    cfg = DistillConfig(chunk=C, sparse=12, max_distance=40)
    tr = Trainable(model, cfg, "cpu")
    g = torch.Generator().manual_seed(5)
    for name, value in tr.params.items():  # random maps, gates and LoRA (B ≠ 0) so every path matters
        value.copy_(torch.randn(value.shape, generator=g) * (0.05 if ".lora_" in name else 1.0))
    ids = torch.randint(0, model.args.vocab_size, (1, 90), generator=g)
    with torch.no_grad():
        want = student_logits(model, ids, tr, cfg)[0]
    path = tmp_path / "a.lola.safetensors"
    from lolachat.adapter import save_adapter

    save_adapter(tr.adapter({"phi_input": "pre_rope", "chunk": C, "lora_scale": cfg.lora_scale}, with_lora=True),
                 path)
    engine = lolachat.load(str(tiny_folder), device="cpu", dtype="float32", adapter=str(path), sparse=12,
                           max_distance=40)
    assert engine.info.window == C and engine.info.mode == "lola"
    torch.testing.assert_close(engine.logits(ids[0].tolist()), want, atol=2e-4, rtol=1e-4)


def small_config(**overrides) -> DistillConfig:
    values = dict(chunk=C, seq_lens=(32, 64), steps=16, batch=4, lr=3e-2, stage2_steps=4, stage2_batch=2,
                  stage2_seq_len=48, stage2_lr=1e-3, sparse=16, checkpoint_every=5, eval_batches=1)
    values.update(overrides)
    return DistillConfig(**values)


def corpus_tokens(folder: Path, text_file: Path) -> tuple[np.ndarray, dict]:
    from lolachat.tokenizer import load_tokenizer

    corpus, _ = prepare([str(text_file)], load_tokenizer(folder))
    return corpus.tokens, corpus.meta


def test_distillation_lowers_the_loss_and_writes_a_loadable_adapter(tiny_folder, text_file, tmp_path):
    model, _, base = load_base(str(tiny_folder), torch.device("cpu"), torch.float32)
    tokens, meta = corpus_tokens(tiny_folder, text_file)
    out = tmp_path / "tiny.lola.safetensors"
    seen = []
    result = distill(model, tokens, small_config(), out, base=base, data_meta=meta,
                     on_step=lambda stage, step, planned, loss: seen.append((stage, step)))
    ev = result["eval"]
    assert ev["stage1_valid_mse"] < 0.8 * ev["stage1_valid_mse_init"]
    assert ev["stage2_valid_xent"] < ev["stage1_valid_xent"]
    assert seen[-1] == ("stage 2", 4) and ("stage 1", 16) in seen
    assert out.exists() and stage1_path(out).exists() and not Path(str(out) + ".ckpt").exists()
    assert result["recipe"]["stage1"]["seq_lens"] == [32, 64] and result["data"]["sources"]
    assert result["base_weights_sha256"] == base["weights_sha256"] and result["lora_scale"] == 2.0
    engine = lolachat.load(str(tiny_folder), device="cpu", dtype="float32", adapter=str(out), sparse=16)
    assert engine.info.mode == "lola" and engine.info.window == C
    reply = "".join(engine.session().chat("Hello", max_new_tokens=4, temperature=0.0))
    assert isinstance(reply, str)
    stage1 = lolachat.load(str(tiny_folder), device="cpu", dtype="float32", adapter=str(stage1_path(out)))
    assert stage1.info.mode == "lola"
    pytest.importorskip("matplotlib")
    plotter = subprocess.run([sys.executable, str(ROOT / "scripts" / "plot_training.py"), str(out),
                              str(tmp_path / "curves.png")], capture_output=True, text=True, timeout=120)
    assert plotter.returncode == 0, plotter.stderr
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # curves from the file's metadata


def test_interrupted_run_resumes_to_the_same_adapter(tiny_folder, text_file, tmp_path):
    model, _, base = load_base(str(tiny_folder), torch.device("cpu"), torch.float32)
    tokens, meta = corpus_tokens(tiny_folder, text_file)
    cfg = small_config(steps=8, stage2_steps=2, seq_lens=(32,), checkpoint_every=3)
    straight = tmp_path / "a.lola.safetensors"
    distill(model, tokens, cfg, straight, base=base, data_meta=meta)

    resumed = tmp_path / "b.lola.safetensors"

    def stop_at_5(stage, step, planned, loss):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(model, tokens, cfg, resumed, base=base, data_meta=meta, on_step=stop_at_5)
    checkpoint = Path(str(resumed) + ".ckpt")
    assert checkpoint.exists() and not resumed.exists()
    # a checkpoint of another configuration is refused (--restart discards it)
    with pytest.raises(lolachat.LolachatError, match="restart"):
        distill(model, tokens, small_config(steps=8, stage2_steps=2, seq_lens=(32,), lr=1e-3), resumed,
                base=base, data_meta=meta)
    messages = []
    distill(model, tokens, cfg, resumed, base=base, data_meta=meta, notice=messages.append)
    assert messages and "stage 1 step 3" in messages[0]
    from safetensors.torch import load_file

    a, b = load_file(straight), load_file(resumed)
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-5)


def test_stage2_in_turns_resumes_to_the_same_adapter(tiny_folder, parent, tmp_path):
    """Interrupted in stage 2 with two memories and the window factors in a second optimizer group."""
    path, _, _, tokens, meta = parent
    model, _, base = load_base(str(tiny_folder), torch.device("cpu"), torch.float32)
    cfg = continued_config(path, stage2_steps=5, checkpoint_every=2, stage2_memories=("8:24:head",),
                           stage2_factor_lr=0.05)
    straight, resumed = tmp_path / "a.lola.safetensors", tmp_path / "b.lola.safetensors"
    distill(model, tokens, cfg, straight, base=base, data_meta=meta)

    def stop_at_3(stage, step, planned, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(model, tokens, cfg, resumed, base=base, data_meta=meta, on_step=stop_at_3)
    messages = []
    distill(model, tokens, cfg, resumed, base=base, data_meta=meta, notice=messages.append)
    assert any("stage 2 step 2" in m for m in messages)
    from safetensors.torch import load_file

    a, b = load_file(straight), load_file(resumed)
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-5)


def test_time_cap_shortens_the_plan(tiny_folder, text_file, tmp_path):
    model, _, base = load_base(str(tiny_folder), torch.device("cpu"), torch.float32)
    tokens, meta = corpus_tokens(tiny_folder, text_file)
    result = distill(model, tokens, small_config(steps=500, seconds=0.0, stage2_steps=0, seq_lens=(32,)),
                     tmp_path / "t.lola.safetensors", base=base, data_meta=meta)
    assert 1 <= result["recipe"]["stage1"]["steps"] <= 5


# ------------------------------------------------------------------- continuing from an adapter (stage 2 only)


@pytest.fixture(scope="module")
def parent(tiny_folder, text_file, tmp_path_factory):
    """An adapter written by a tiny distill run (maps and LoRA), its config and the corpus."""
    model, _, base = load_base(str(tiny_folder), torch.device("cpu"), torch.float32)
    tokens, meta = corpus_tokens(tiny_folder, text_file)
    cfg = small_config(steps=8, seq_lens=(32,), stage2_steps=3, checkpoint_every=0)
    path = tmp_path_factory.mktemp("parent") / "parent.lola.safetensors"
    written = distill(model, tokens, cfg, path, base=base, data_meta=meta)
    return path, cfg, written, tokens, meta


def continued_config(parent_path, **overrides) -> DistillConfig:
    """Stage 2 only, under other runtime settings than the parent's: C 16 (not 8), group λ, a half-life."""
    values = dict(steps=0, stage2_steps=8, stage2_lr=3e-3, chunk=16, sparse=16, selection="group",
                  state_halflife=48, max_distance=60, stage2_seq_len=96, init_adapter=str(parent_path))
    values.update(overrides)
    return small_config(**values)


def test_init_adapter_gives_the_same_student_before_any_step(tiny_folder, parent):
    path, cfg, written, tokens, meta = parent
    model, _, base = load_base(str(tiny_folder), torch.device("cpu"), torch.float32)
    # the parent's own settings: the loss before any step is the one the parent ended with
    again = distill(model, tokens, small_config(steps=0, seq_lens=(32,), stage2_steps=1, stage2_lr=0.0,
                                                checkpoint_every=0, init_adapter=str(path)),
                    path.with_name("again.lola.safetensors"), base=base, data_meta=meta)
    assert again["eval"]["init_valid_xent"] == written["eval"]["stage2_valid_xent"]
    # other settings (C, group λ, half-life): the loaded student is the engine running the parent's file
    cfg2 = continued_config(path)
    tr = Trainable(model, cfg2, "cpu")
    lineage = read_init_adapter(path, model, cfg2, base, tr)
    from safetensors.torch import load_file

    for name, value in load_file(path).items():
        assert torch.equal(tr.params[name], value)
    ids = torch.randint(0, model.args.vocab_size, (1, 150), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = student_logits(model, ids, tr, cfg2)[0]
    engine = lolachat.load(str(tiny_folder), device="cpu", dtype="float32", adapter=str(path), window=16, sparse=16,
                           selection="group", state_halflife=48, max_distance=60)
    torch.testing.assert_close(engine.logits(ids[0].tolist()), want, atol=2e-4, rtol=1e-4)
    assert lineage["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and lineage["lora"]
    assert lineage["recipe"]["stage2"]["steps"] == 3 and lineage["chunk"] == C


def test_stage2_only_run_lowers_the_loss_and_records_its_lineage(tiny_folder, parent, tmp_path):
    path, _, _, tokens, meta = parent
    model, _, base = load_base(str(tiny_folder), torch.device("cpu"), torch.float32)
    out = tmp_path / "long.lola.safetensors"
    seen = []
    result = distill(model, tokens, continued_config(path, stage2_recompute=True, loss_slice=40), out, base=base,
                     data_meta=meta, on_step=lambda stage, step, planned, loss: seen.append(stage))
    ev = result["eval"]
    assert set(seen) == {"stage 2"} and "stage1_valid_mse" not in ev  # stage 1 skipped
    assert ev["stage2_valid_xent"] < ev["init_valid_xent"]
    assert out.exists() and not stage1_path(out).exists()
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert result["continued_from"]["sha256"] == sha and result["continued_from"]["recipe"]["stage2"]["steps"] == 3
    two = result["recipe"]["stage2"]
    assert (two["chunk"], two["sparse"], two["selection"], two["state_halflife"], two["seq_len"]) == \
        (16, 16, "group", 48, 96)
    assert two["continued_from_sha256"] == sha and two["steps"] == 8 and two["recompute"]
    assert result["recipe"]["stage1"]["inherited_from"] == sha and result["recipe"]["stage1"]["steps"] == 8
    assert result["chunk"] == 16 and result["stage"] == 2
    engine = lolachat.load(str(tiny_folder), device="cpu", dtype="float32", adapter=str(out), sparse=16,
                           selection="group", state_halflife=48)
    assert engine.info.mode == "lola" and engine.info.window == 16
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["lolachat"])["continued_from"]["sha256"] == sha
    # a continuation of the continuation keeps the chain
    again = distill(model, tokens, continued_config(out, stage2_steps=1), tmp_path / "again.lola.safetensors",
                    base=base, data_meta=meta)
    assert again["continued_from"]["continued_from"]["sha256"] == sha


def test_stage2_memories_take_turns_and_malformed_ones_are_refused():
    cfg = small_config(stage2_memories=("16:8:group", "4:0:head"))
    turns = [cfg.loop_memory(step) for step in range(4)]
    assert [(m.chunk, m.sparse, m.selection) for m in turns] == [(C, 16, "head"), (16, 8, "group"), (4, 0, "head"),
                                                                  (C, 16, "head")]
    assert turns[0] is cfg
    assert small_config(stage2_memories=" 16:8:group, 4:0:head").stage2_memories == ("16:8:group", "4:0:head")
    for bad in ("16:8", "16:x:head", "16:8:both", "0:8:head", "16:-1:head", "16:8:head:1"):
        with pytest.raises(BadInput, match="C:λ:selection"):
            small_config(stage2_memories=(bad,))
    for repeated in (("16:8:group", "16:8:group"), (f"{C}:16:head",)):  # the second repeats the config's own
        with pytest.raises(BadInput, match="once"):
            small_config(stage2_memories=repeated)
    with pytest.raises(BadInput, match="need stage 2 steps"):
        small_config(stage2_steps=0, stage2_factor_lr=0.01)


def test_stage2_trains_the_window_factors_under_each_memory_only_when_asked(tiny_folder, parent, tmp_path,
                                                                            monkeypatch):
    from safetensors.torch import load_file

    import lolachat.distill as distill_module

    path, _, _, tokens, meta = parent
    model, _, base = load_base(str(tiny_folder), torch.device("cpu"), torch.float32)
    trained_under = []

    def recorded_loss(model, batch, tr, cfg):
        if torch.is_grad_enabled():  # a training step, not the held-out evaluation
            trained_under.append((cfg.chunk, cfg.sparse, cfg.selection))
        return student_loss(model, batch, tr, cfg)

    monkeypatch.setattr(distill_module, "student_loss", recorded_loss)

    def factors(adapter_path):
        found = {k: v for k, v in load_file(adapter_path).items() if k.endswith("window_factor")}
        assert len(found) == model.args.n_layers
        return found

    memories = dict(stage2_steps=4, stage2_memories=("8:24:head",))
    kept = distill(model, tokens, continued_config(path, **memories), tmp_path / "kept.lola.safetensors", base=base,
                   data_meta=meta)
    assert trained_under == [(16, 16, "group"), (8, 24, "head")] * 2
    assert all(torch.equal(value, factors(path)[name]) for name, value in factors(tmp_path / "kept.lola.safetensors")
               .items())
    assert kept["recipe"]["stage2"]["memories"] == [{"chunk": 16, "sparse": 16, "selection": "group"},
                                                    {"chunk": 8, "sparse": 24, "selection": "head"}]
    assert "window_factor_lr" not in kept["recipe"]["stage2"]
    trained = distill(model, tokens, continued_config(path, stage2_factor_lr=0.05, **memories),
                      tmp_path / "trained.lola.safetensors", base=base, data_meta=meta)
    moved = [float((value - factors(path)[name]).abs().max())
             for name, value in factors(tmp_path / "trained.lola.safetensors").items()]
    assert min(moved) > 1e-3  # every layer's factors moved
    assert trained["recipe"]["stage2"]["window_factor_lr"] == 0.05


def test_recompute_gives_the_same_loss_and_gradients(tiny_folder):
    model, _, _ = load_base(str(tiny_folder), torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, model.args.vocab_size, (2, 101), generator=g)
    results = []
    for recompute in (False, True):
        cfg = DistillConfig(chunk=C, sparse=12, selection="group", state_halflife=40, max_distance=50,
                            stage2_recompute=recompute, loss_slice=30)
        tr = Trainable(model, cfg, "cpu")
        for name, value in tr.params.items():
            value.copy_(torch.randn(value.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
        lora = tr.stage_params(2)
        for x in lora:
            x.requires_grad_(True)
        loss = student_loss(model, ids, tr, cfg)
        loss.backward()
        results.append((loss.detach(), [x.grad.clone() for x in lora]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_init_adapter_that_does_not_fit_is_refused(tiny_folder, parent, tmp_path):
    path = parent[0]
    model, _, base = load_base(str(tiny_folder), torch.device("cpu"), torch.float32)

    def refused(cfg, match, base=base):
        with pytest.raises(lolachat.LolachatError, match=match):
            read_init_adapter(cfg.init_adapter, model, cfg, base, Trainable(model, cfg, "cpu"))

    refused(continued_config(path, lora_rank=4), r"LoRA of rank 8 .*--lora-rank 8 --lora-alpha 16")
    refused(continued_config(path, feature_dim=4), r"feature dimension F = 16 .*--feature-dim 16")
    refused(continued_config(path, phi_input="post_rope"), "--phi-input pre_rope")
    refused(continued_config(path), "base weights", base={**base, "weights_sha256": "0" * 64})
    refused(continued_config(path, stage2_steps=0, steps=4), "would drop")
    refused(continued_config(tmp_path / "missing.lola.safetensors"), "does not exist")
    (tmp_path / "junk.lola.safetensors").write_bytes(b"not an adapter")
    refused(continued_config(tmp_path / "junk.lola.safetensors"), "cannot continue from")


def distill_script():
    """scripts/distill_gpu.py as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("distill_gpu", ROOT / "scripts" / "distill_gpu.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def heldout_and_out(text_file: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A held-out text (the tail of the corpus file) and an output folder for the script."""
    heldout = tmp_path / "held.txt"
    heldout.write_text(text_file.read_text()[-20000:])
    return heldout, tmp_path / "out"


def test_gpu_script_continues_an_adapter_on_cpu(tiny_folder, text_file, parent, tmp_path):
    """The device command of a stage-2-only continuation, on the CPU with a tiny model."""
    heldout, out = heldout_and_out(text_file, tmp_path)
    code = distill_script().main([
        "--model", str(tiny_folder), "--data", str(text_file), "--heldout", str(heldout), "--out", str(out),
        "--device", "cpu", "--budget", "6", "--init-adapter", str(parent[0]), "--stage1-share", "0",
        "--stage2-share", "0.2", "--window", "16", "--sparse", "16", "--selection", "group", "--state-halflife",
        "48", "--max-distance", "60", "--stage2-seq-len", "96", "--stage2-batch", "1", "--recompute",
        "--eval-batches", "1", "--ppl-contexts", "64,256", "--ppl-aligned", "--ppl-windows", "2", "--eval-sparse",
        "16", "--skip-exact", "--passkey-samples", "0", "--stage2-memories", "8:24:head", "--stage2-factor-lr",
        "0.01", "--eval-memories", "8:24:head",
    ])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    rows = {r["setting"]: r for r in results["settings"]}
    own, other = "λ=16 group half-life 48", "C=8 λ=24 head half-life 48"
    assert set(rows) == {f"lola {own}", f"init {own}", f"lola {other}", f"init {other}"}
    for label, row in rows.items():
        assert set(row["ppl"]) == {"64", "256"} and row["ppl_ratio"] > 0
        memory = (16, 16, "group") if own in label else (8, 24, "head")
        assert (row["engine"]["window"], row["engine"]["sparse"], row["engine"]["selection"]) == memory
        assert row["engine"]["state_halflife"] == 48
    two = results["training"]["recipe"]["stage2"]
    assert two["window_factor_lr"] == 0.01 and len(two["memories"]) == 2
    assert "ppl@256 / ppl@64" in (out / "results.md").read_text() and "passkey" not in (out / "results.md").read_text()
    assert not (out / "smollm2-135m.stage1.lola.safetensors").exists()
    assert results["training"]["continued_from"]["sha256"] == hashlib.sha256(parent[0].read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------- data and the CLI


def test_corpus_holds_out_documents_and_checks_the_tokenizer(tmp_path, tiny_folder):
    from lolachat.distill_data import Document, tokenize
    from lolachat.tokenizer import load_tokenizer

    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(80):
        (folder / f"doc{i}.txt").write_text(f"Document number {i} talks about gardens and rivers. " * 20)
    (folder / "table.txt").write_text("1 2 3 4 5 | 6 7 8 9 |\n" * 100)  # not prose: skipped
    docs = collect([str(folder)])
    assert len(docs) == 80 and all(d.source.startswith("file:") for d in docs)
    held = [d for d in docs if d.heldout]
    assert 0 < len(held) < 10
    tokenizer = load_tokenizer(tiny_folder)
    corpus, heldout_text = prepare([str(folder)], tokenizer)
    assert corpus.meta["heldout_documents"] == len(held)
    for d in held:
        assert d.text in heldout_text
    path = tmp_path / "c.npz"
    save_corpus(corpus, path)
    again = load_corpus(path, tokenizer)
    assert np.array_equal(again.tokens, corpus.tokens) and again.meta == corpus.meta
    other = tokenize([Document("x", "y", "hello")], tokenizer)
    other.meta["tokenizer"] = "something-else"
    save_corpus(other, tmp_path / "o.npz")
    with pytest.raises(lolachat.LolachatError, match="another tokenizer"):
        load_corpus(tmp_path / "o.npz", tokenizer)


def test_distill_command(tiny_folder, text_file, tmp_path, capsys):
    npz = tmp_path / "corpus.npz"
    assert main(["distill", str(tiny_folder), "--data", str(text_file), "--prepare-data", str(npz)]) == 0
    assert npz.exists() and npz.with_suffix(".heldout.txt").exists()
    capsys.readouterr()
    out = tmp_path / "cli.lola.safetensors"
    assert main(["distill", str(tiny_folder), "--data", str(npz), "--out", str(out), "--device", "cpu",
                 "--window", "8", "--seq-len", "32", "--steps", "3", "--batch", "2", "--stage2-steps", "2",
                 "--stage2-seq-len", "32", "--stage2-batch", "1", "--sparse", "8", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["adapter"] == str(out) and printed["metadata"]["recipe"]["stage2"]["steps"] == 2
    longer = tmp_path / "longer.lola.safetensors"
    assert main(["distill", str(tiny_folder), "--data", str(npz), "--out", str(longer), "--device", "cpu",
                 "--init-adapter", str(out), "--steps", "0", "--window", "16", "--stage2-steps", "2",
                 "--stage2-seq-len", "64", "--stage2-batch", "1", "--sparse", "16", "--selection", "group",
                 "--state-halflife", "64", "--recompute", "--stage2-memories", "8:8:head",
                 "--stage2-factor-lr", "0.01", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    two = printed["metadata"]["recipe"]["stage2"]
    assert printed["metadata"]["continued_from"]["file"] == out.name and two["steps"] == 2
    assert "stage1_valid_mse" not in printed["metadata"]["eval"]  # stage 1 skipped
    assert two["memories"][1] == {"chunk": 8, "sparse": 8, "selection": "head"} and two["window_factor_lr"] == 0.01
    from safetensors.torch import load_file

    before, after = load_file(out), load_file(longer)  # the factors learn through the recomputed layers
    assert all(not torch.equal(before[name], after[name]) for name in after if name.endswith("window_factor"))
    assert main(["distill", str(tiny_folder), "--data", str(npz), "--init-adapter", str(out), "--steps", "0",
                 "--stage2-steps", "1", "--stage2-memories", "8:8"]) == 1
    assert "a stage 2 memory is C:λ:selection" in capsys.readouterr().err
    assert main(["distill", str(tiny_folder), "--data", str(npz), "--seq-len", "x1"]) == 1
    assert "bad sequence length" in capsys.readouterr().err
    assert main(["distill", str(tiny_folder), "--data", "nonsense-source"]) == 1
    assert "unknown training-text source" in capsys.readouterr().err


def test_gpu_script_runs_end_to_end_on_cpu(tiny_folder, text_file, tmp_path):
    """scripts/distill_gpu.py, the H200 recipe, on the CPU with a tiny model: the same code path."""
    heldout, out = heldout_and_out(text_file, tmp_path)
    code = distill_script().main([
        "--model", str(tiny_folder), "--data", str(text_file), "--heldout", str(heldout), "--out", str(out),
        "--device", "cpu", "--budget", "10", "--stage1-share", "0.15", "--stage2-share", "0.1",
        "--window", "16", "--seq-len", "32,64", "--batch", "2", "--stage2-seq-len", "32", "--stage2-batch", "1",
        "--sparse", "8", "--max-distance", "100", "--ppl-contexts", "64", "--ppl-windows", "2",
        "--passkey-lengths", "300", "--passkey-depths", "0.5", "--passkey-samples", "1", "--eval-sparse", "0,8",
    ])
    assert code == 0
    table = (out / "results.md").read_text()
    assert table.count("\n") == 6 and "error" not in table  # header, rule, 4 settings
    results = json.loads((out / "results.json").read_text())
    assert [r["setting"] for r in results["settings"]] == ["exact", "lola λ=0", "lola λ=8",
                                                           "stage 1 only λ=8"]
    assert all(len(r["passkey"]["samples"]) == 1 and "64" in r["ppl"] for r in results["settings"])
    engine = lolachat.load(str(tiny_folder), device="cpu", adapter=str(out / "smollm2-135m.lola.safetensors"))
    from safetensors import safe_open

    with safe_open(str(out / "smollm2-135m.lola.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["lolachat"])
    assert set(meta["eval"]["quick_gpu"]) == {"exact", "lola λ=0", "lola λ=8", "stage 1 only λ=8"}
    assert engine.info.mode == "lola" and meta["recipe"]["stage2"]["steps"] >= 1
