"""GGUF loading: dequantization, q/k row order, metadata mapping and bad files, on tiny files written here."""

from __future__ import annotations

import math

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from lolachat.errors import BadModelFile, ModelNotFound, UnsupportedArchitecture
from lolachat.weights import load_weights

DIM, N_HEADS, N_KV_HEADS, HEAD_DIM, HIDDEN, N_LAYERS = 64, 4, 2, 16, 96, 2
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB = SPECIAL_TOKENS + [f"tok{i}" for i in range(64 - len(SPECIAL_TOKENS))]

GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_GGUF_TO_HF = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def hf_name(gguf_name: str) -> str:
    if gguf_name in GGUF_TO_HF:
        return GGUF_TO_HF[gguf_name]
    _, layer, rest = gguf_name.split(".", 2)
    return f"model.layers.{layer}.{LAYER_GGUF_TO_HF[rest.removesuffix('.weight')]}.weight"


def gguf_shapes(tied: bool) -> dict[str, tuple[int, ...]]:
    shapes = {"token_embd.weight": (len(VOCAB), DIM), "output_norm.weight": (DIM,)}
    if not tied:
        shapes["output.weight"] = (len(VOCAB), DIM)
    for i in range(N_LAYERS):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (DIM,), f"blk.{i}.ffn_norm.weight": (DIM,),
            f"blk.{i}.attn_q.weight": (N_HEADS * HEAD_DIM, DIM),
            f"blk.{i}.attn_k.weight": (N_KV_HEADS * HEAD_DIM, DIM),
            f"blk.{i}.attn_v.weight": (N_KV_HEADS * HEAD_DIM, DIM),
            f"blk.{i}.attn_output.weight": (DIM, N_HEADS * HEAD_DIM),
            f"blk.{i}.ffn_gate.weight": (HIDDEN, DIM), f"blk.{i}.ffn_up.weight": (HIDDEN, DIM),
            f"blk.{i}.ffn_down.weight": (DIM, HIDDEN),
        }
    return shapes


def llamacpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's HF converter does to q/k rows: per head, row h*(d/2)+j moves to 2j+h."""
    rows = w.shape[0]
    half = rows // n_heads // 2
    out = np.empty_like(w)
    for head in range(n_heads):
        base = head * 2 * half
        for h in range(2):
            for j in range(half):
                out[base + 2 * j + h] = w[base + h * half + j]
    return out


def dequant_q8_0(raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    blocks = raw.reshape(-1, 34)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    return (d * q).reshape(shape)


def dequant_q4_1(raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    blocks = raw.reshape(-1, 20)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    nibbles = blocks[:, 4:]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.float32)
    return (d * q + m).reshape(shape)


def dequant_q4_0(raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    blocks = raw.reshape(-1, 18)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    nibbles = blocks[:, 2:]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.float32) - 8
    return (d * q).reshape(shape)


def dequant_bf16(raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    upper = raw.reshape(-1).copy().view(np.uint16).astype(np.uint32)
    return (upper << 16).view(np.float32).reshape(shape)


INDEPENDENT_DEQUANT = {
    Q.BF16: dequant_bf16,
    Q.Q4_0: dequant_q4_0,
    Q.F32: lambda raw, shape: raw.reshape(shape).astype(np.float32),
    Q.F16: lambda raw, shape: raw.reshape(shape).astype(np.float32),
    Q.Q8_0: dequant_q8_0,
    Q.Q4_1: dequant_q4_1,
}


def pick_qtype(name: str) -> Q:
    if name.endswith("norm.weight"):
        return Q.F32
    if name == "token_embd.weight" or "attn_k" in name or "ffn_down" in name:
        return Q.Q8_0
    if "attn_v" in name:
        return Q.F16
    if "ffn_gate" in name:
        return Q.Q4_0
    if "attn_output" in name:
        return Q.BF16
    return Q.Q4_1


def write_gguf(path, hf_weights: dict[str, np.ndarray], *, arch="llama", qtype=pick_qtype, extra_tensors=None,
               skip=(), rope_freqs=None, rope_theta=10000.0) -> dict[str, np.ndarray]:
    """Write a tiny Llama GGUF the way llama.cpp's converter would; return its tensors as dequantized
    by this test's own block decoders (still in GGUF row order)."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(N_LAYERS)
    writer.add_context_length(4096)
    writer.add_embedding_length(DIM)
    writer.add_feed_forward_length(HIDDEN)
    writer.add_head_count(N_HEADS)
    writer.add_head_count_kv(N_KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(rope_theta)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(VOCAB)
    writer.add_token_types([3 if t in SPECIAL_TOKENS else 1 for t in VOCAB])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(0)
    writer.add_chat_template(CHATML)

    expected = {}
    tensors = {name: hf_weights[hf_name(name)] for name in gguf_shapes("lm_head.weight" not in hf_weights)}
    tensors |= extra_tensors or {}
    for name, w in tensors.items():
        if name in skip:
            continue
        if ".attn_q." in name:
            w = llamacpp_permute(w, N_HEADS)
        elif ".attn_k." in name:
            w = llamacpp_permute(w, N_KV_HEADS)
        kind = qtype(name)
        data = gguf.quants.quantize(w.astype(np.float32), kind)
        writer.add_tensor(name, data, raw_dtype=kind if data.dtype == np.uint8 else None)
        expected[name] = INDEPENDENT_DEQUANT[kind](data, w.shape)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def random_hf_weights(tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {hf_name(name): rng.normal(0, 0.5, shape).astype(np.float32) for name, shape in gguf_shapes(tied).items()}


@pytest.mark.parametrize("tied", [True, False])
def test_quantized_tensors_match_independent_dequantization(tmp_path, tied):
    path = tmp_path / "tiny.gguf"
    expected = write_gguf(path, random_hf_weights(tied))
    loaded = load_weights(path)

    assert set(loaded.tensors) == {hf_name(n) for n in expected}
    for name, want in expected.items():
        got = loaded.tensors[hf_name(name)]
        assert got.dtype == torch.float32 and got.device.type == "cpu"
        got = got.numpy()
        # Loaded q/k rows are in HF order; redo the converter's permutation to compare with the file's order.
        if ".attn_q." in name:
            got = llamacpp_permute(got, N_HEADS)
        elif ".attn_k." in name:
            got = llamacpp_permute(got, N_KV_HEADS)
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_quantization_actually_happened(tmp_path):
    """Guard against a test that passes because nothing was quantized: Q4_1 loses precision."""
    hf = random_hf_weights(tied=True)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, hf)
    loaded = load_weights(path).tensors["model.layers.0.mlp.up_proj.weight"].numpy()
    error = np.abs(loaded - hf["model.layers.0.mlp.up_proj.weight"])
    assert 0 < error.max() < 0.25


def test_qk_permutation_round_trip_f32(tmp_path):
    hf = random_hf_weights(tied=False)
    path = tmp_path / "f32.gguf"
    write_gguf(path, hf, qtype=lambda name: Q.F32)
    loaded = load_weights(path).tensors
    assert set(loaded) == set(hf)
    for name, want in hf.items():
        np.testing.assert_array_equal(loaded[name].numpy(), want, err_msg=name)


def test_metadata_maps_to_model_args(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, random_hf_weights(tied=True), rope_theta=100000.0)
    loaded = load_weights(path)
    args = loaded.args
    assert (args.vocab_size, args.dim, args.n_layers, args.n_heads, args.n_kv_heads) == (64, DIM, N_LAYERS, 4, 2)
    assert (args.hidden_dim, args.head_dim, args.max_position) == (HIDDEN, HEAD_DIM, 4096)
    assert args.norm_eps == 1e-5 and args.rope_theta == 100000.0 and args.rope_scaling is None
    assert args.tie_embeddings and "lm_head.weight" not in loaded.tensors
    assert args.bos_id == 1
    assert args.eos_ids == [0, 2]  # eos, then the template's end of turn <|im_end|>
    assert loaded.chat_template == CHATML
    assert loaded.source == path
    import hashlib

    assert loaded.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_llama3_rope_freqs_tensor_becomes_rope_scaling(tmp_path):
    """llama.cpp stores Llama 3 RoPE scaling only as a rope_freqs tensor; we recover the HF dict."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    config = LlamaConfig(hidden_size=DIM, num_attention_heads=N_HEADS, head_dim=HEAD_DIM,
                         rope_parameters={"rope_theta": 10000.0, **scaling})
    plain = 1.0 / (10000.0 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    path = tmp_path / "llama3.gguf"
    write_gguf(path, random_hf_weights(tied=True), rope_freqs=(plain / scaled.double()).numpy())

    args = load_weights(path).args
    assert args.rope_scaling == scaling


def test_truncated_file_is_bad_model_file(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, random_hf_weights(tied=True))
    data = path.read_bytes()
    for cut in (len(data) // 2, 200, 10):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(BadModelFile) as err:
            load_weights(bad)
        message = str(err.value)
        assert str(bad) in message and "\n" not in message


def test_corrupt_header_is_bad_model_file(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, random_hf_weights(tied=True))
    data = bytearray(path.read_bytes())
    data[16:24] = b"\xff" * 8  # metadata count: absurdly large
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(BadModelFile, match="corrupt.gguf"):
        load_weights(bad)


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_text("hello, not a model\n")
    with pytest.raises(BadModelFile, match="notes.gguf"):
        load_weights(bad)


def test_missing_path_is_model_not_found(tmp_path):
    with pytest.raises(ModelNotFound):
        load_weights(tmp_path / "nope.gguf")


def test_other_architecture_is_unsupported(tmp_path):
    path = tmp_path / "gpt2.gguf"
    write_gguf(path, random_hf_weights(tied=True), arch="gpt2")
    with pytest.raises(UnsupportedArchitecture, match="gpt2"):
        load_weights(path)


def test_unknown_tensor_is_unsupported(tmp_path):
    path = tmp_path / "bias.gguf"
    bias = {"blk.0.attn_q.bias": np.zeros(N_HEADS * HEAD_DIM, dtype=np.float32)}
    write_gguf(path, random_hf_weights(tied=True), extra_tensors=bias, qtype=lambda n: Q.F32)
    with pytest.raises(UnsupportedArchitecture, match="attn_q.bias"):
        load_weights(path)


def test_missing_tensor_is_bad_model_file(tmp_path):
    path = tmp_path / "holey.gguf"
    write_gguf(path, random_hf_weights(tied=True), skip={"blk.1.ffn_up.weight"})
    with pytest.raises(BadModelFile, match="model.layers.1.mlp.up_proj.weight"):
        load_weights(path)


def test_folder_holding_one_gguf_resolves_to_it(tmp_path):
    write_gguf(tmp_path / "only.gguf", random_hf_weights(tied=True))
    assert load_weights(tmp_path).source == tmp_path / "only.gguf"


def test_nan_weights_are_bad_model_file(tmp_path):
    hf = random_hf_weights(tied=True)
    hf["model.norm.weight"][3] = math.nan
    path = tmp_path / "nan.gguf"
    write_gguf(path, hf)
    with pytest.raises(BadModelFile, match="model.norm.weight"):
        load_weights(path)
