"""`lolachat bench` on tiny models on the CPU: every engine path, JSON, plot, time cap, CLI."""

import json
import time

import pytest
import torch

from lolachat import bench
from lolachat.bench import BenchConfig, parse_lengths, run_bench, save, table


def test_parse_lengths():
    assert parse_lengths("1K, 4k,8192") == [1024, 4096, 8192]
    assert parse_lengths("0.5K") == [512]
    with pytest.raises(ValueError):
        parse_lengths(",")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    from tiny_chat_model import build

    return build(tmp_path_factory.mktemp("bench") / "m")


@pytest.mark.parametrize("static", ["0", "1"])
def test_quick_bench_on_a_model_folder(chat_model, tmp_path, monkeypatch, static):
    monkeypatch.setenv("LOLACHAT_STATIC", static)  # "1": the static-memory engine the GPU runs
    lines = []
    result = run_bench(BenchConfig(model=str(chat_model), device="cpu", dtype="float32", quick=True,
                                   chunk=8, sparse=16), log=lines.append)
    rows = {(r["engine"], r["length"]): r for r in result["results"]}
    assert set(rows) == {(e, n) for e in ("lola", "exact", "transformers") for n in bench.QUICK_LENGTHS}
    for row in rows.values():
        assert row["prefill_tok_s"] > 0 and row["decode_tok_s"] > 0 and row["decode_tokens"] == 8
        assert row["peak_bytes"] > 0
    # LoLA's memory is bounded: the same at both lengths; the KV caches grow
    assert rows[("lola", 128)]["state_bytes"] == rows[("lola", 320)]["state_bytes"]
    assert rows[("exact", 320)]["state_bytes"] > rows[("exact", 128)]["state_bytes"]
    assert result["gemv_chain"]["tok_s"] > 0
    assert any("llama.cpp" in n for n in result["notices"])  # a folder is not a GGUF file
    text = table(result)
    assert "| lola | 320 |" in text and "GEMV-chain ceiling" in text
    json_path, png_path, notice = save(result, tmp_path)
    assert json.loads(json_path.read_text())["label"] == result["label"]
    assert (png_path is not None and png_path.stat().st_size > 0) or "matplotlib" in notice


def test_random_shape_and_time_cap():
    model = bench.random_model("tiny", torch.device("cpu"), torch.float32)
    assert model.args.n_layers == bench.SHAPES["tiny"]["n_layers"]
    assert all(not p.is_meta for p in model.parameters())
    result = run_bench(BenchConfig(shape="tiny", device="cpu", dtype="float32", quick=True, chunk=8, sparse=16,
                                   engines=["lola", "exact"], deadline=time.monotonic() - 1), log=lambda _: None)
    assert result["note"] == bench.WEIGHTS_NOTE
    assert all(r.get("skipped") == "time cap" for r in result["results"])


def test_transformers_shares_our_weights():
    model = bench.random_model("tiny", torch.device("cpu"), torch.float32)
    hf = bench.hf_model_sharing(model)
    assert hf.model.layers[0].mlp.down_proj.weight.data_ptr() == model.model.layers[0].mlp.down_proj.weight.data_ptr()
    ids = torch.randint(0, 500, (1, 20))
    with torch.no_grad():
        ours = model(ids, bench.exact_memory(model), all_logits=True)
        theirs = hf(input_ids=ids).logits.float()
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_cli(tmp_path, capsys):
    from lolachat.cli import main

    code = main(["bench", "--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--quick", "--engines",
                 "lola,exact", "--window", "8", "--sparse", "16", "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "| exact | 128 |" in out and "JSON:" in out
    assert (tmp_path / "bench_tiny.json").exists()
    assert main(["bench", "--engines", "nope", "--shape", "tiny"]) != 0


def test_llama_cpp_at_its_full_context_cuts_the_prompt_to_fit(monkeypatch):
    """At the model's trained length the prompt's first tokens give way to the decoded ones (and the row says so)."""
    import numpy as np

    from lolachat.bench import LlamaCppEngine, SkipLength, _derive

    fed = []

    class FakeLlama:
        def __init__(self, n_ctx, **_):
            self.n_ctx, self.ctx = n_ctx, None

        def eval(self, ids):
            fed.extend(ids)
            assert len(fed) <= self.n_ctx

    logits = np.zeros(10, dtype=np.float32)
    engine = object.__new__(LlamaCppEngine)
    engine.llama_cpp = type("FakeModule", (), {"Llama": FakeLlama, "llama_get_logits_ith": None})
    engine.gguf, engine.threads, engine.n_ctx_train, engine.vocab = "x.gguf", 1, 64, 10
    monkeypatch.setattr(engine, "_last_logits", lambda llm: logits)
    row = {"engine": "llama.cpp", "length": 64} | engine.run(list(range(64)), 8, torch.device("cpu"))
    assert row["prompt_tokens"] == 56 and fed[:56] == list(range(8, 64)) and len(fed) == 64
    assert "prompt cut to 56" in row["note"]
    _derive(row, {})
    assert row["prefill_tok_s"] == 56 / row["prefill_s"]
    with pytest.raises(SkipLength):
        engine.run(list(range(65)), 8, torch.device("cpu"))
