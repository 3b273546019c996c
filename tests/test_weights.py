"""Hugging Face folders → LoadedWeights, end-of-turn detection, and the real SmolLM2 GGUF against transformers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import transformers

from lolachat.errors import BadModelFile, ModelNotFound, UnsupportedArchitecture
from lolachat.model_args import ModelArgs
from lolachat.tokenizer import end_of_turn_ids, load_tokenizer, template_end_of_turn_ids
from lolachat.weights import load_weights

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_llama(tie: bool, n_kv_heads: int = 2, llama3: bool = False, seed: int = 0) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=80, hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=n_kv_heads, max_position_embeddings=256, tie_word_embeddings=tie,
        rope_parameters={"rope_theta": 50000.0, **(LLAMA3_SCALING if llama3 else {"rope_type": "default"})},
        bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def save(model, folder: Path, **kwargs) -> Path:
    model.save_pretrained(folder, **kwargs)
    return folder


def assert_same_tensors(loaded: dict[str, torch.Tensor], model, tied: bool) -> None:
    state = {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    assert set(loaded) == set(state)
    for name, want in state.items():
        assert loaded[name].dtype == torch.float32 and loaded[name].device.type == "cpu"
        assert torch.equal(loaded[name], want.float()), name


@pytest.mark.parametrize("tie,n_kv_heads,llama3", [(True, 2, False), (False, 1, True), (False, 4, False)])
def test_hf_folder_round_trip(tmp_path, tie, n_kv_heads, llama3):
    model = tiny_llama(tie, n_kv_heads, llama3)
    loaded = load_weights(save(model, tmp_path))

    assert_same_tensors(loaded.tensors, model, tie)
    args = loaded.args
    assert (args.vocab_size, args.dim, args.n_layers, args.n_heads, args.n_kv_heads) == (80, 32, 2, 4, n_kv_heads)
    assert (args.hidden_dim, args.head_dim, args.max_position, args.norm_eps) == (72, 8, 256, 1e-5)
    assert args.tie_embeddings is tie
    assert args.rope_theta == 50000.0
    assert args.rope_scaling == (LLAMA3_SCALING if llama3 else None)
    assert (args.bos_id, args.eos_ids) == (1, [2])
    assert loaded.source == tmp_path and loaded.chat_template is None
    file_hash = hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()
    assert loaded.weights_sha256 == hashlib.sha256(file_hash.encode()).hexdigest()


def test_sharded_folder(tmp_path):
    model = tiny_llama(tie=False)
    save(model, tmp_path, max_shard_size="20KB")
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()

    loaded = load_weights(tmp_path)
    assert_same_tensors(loaded.tensors, model, tied=False)
    digests = sorted(hashlib.sha256(f.read_bytes()).hexdigest() for f in shards)
    assert loaded.weights_sha256 == hashlib.sha256("\n".join(digests).encode()).hexdigest()


def test_bf16_checkpoint_loads_as_float32(tmp_path):
    model = tiny_llama(tie=True).to(torch.bfloat16)
    loaded = load_weights(save(model, tmp_path))
    assert_same_tensors(loaded.tensors, model, tied=True)


def test_old_style_rope_config_keys():
    """transformers 4.x configs: rope_theta + rope_scaling with `type`; 5.x: rope_parameters."""
    base = {"vocab_size": 8, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 32}
    old = ModelArgs.from_hf_config(base | {"rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **{
        k: v for k, v in LLAMA3_SCALING.items() if k != "rope_type"}}})
    new = ModelArgs.from_hf_config(base | {"rope_parameters": {"rope_theta": 500000.0, **LLAMA3_SCALING}})
    assert old.rope_theta == new.rope_theta == 500000.0
    assert old.rope_scaling == new.rope_scaling == LLAMA3_SCALING
    plain = ModelArgs.from_hf_config(base | {"rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}})
    assert plain.rope_scaling is None


def test_eos_ids_include_generation_config_and_template_end_of_turn(tmp_path):
    save(tiny_llama(tie=True), tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": CHATML,
        "eos_token": "<|endoftext|>",
        "added_tokens_decoder": {
            "0": {"content": "<|endoftext|>", "special": True},
            "7": {"content": "<|im_start|>", "special": True},
            "9": {"content": "<|im_end|>", "special": True},
        },
    }))
    loaded = load_weights(tmp_path)
    assert loaded.chat_template == CHATML
    assert loaded.args.eos_ids == [2, 5, 9]


@pytest.mark.parametrize("template,specials,want", [
    (CHATML, {"<|im_start|>": 1, "<|im_end|>": 2}, [2]),
    (("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
     "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"), {"<|eot_id|>": 9, "<|start_header_id|>": 7}, [9]),
    # Llama 2 style: the reply is closed by eos; a template that rejects a system message.
    (("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}"
     "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + m['content'] + ' [/INST]' }}"
     "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"), {"</s>": 2, "<s>": 1}, [2]),
    # A template that insists on a system message: the second probe conversation has one.
    (("{% if messages[0]['role'] != 'system' %}{{ raise_exception('need system') }}{% endif %}"
     "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"), {"<|end|>": 4}, [4]),
    ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}", {"</s>": 2}, []),
    (None, {"</s>": 2}, []),
    ("{{ broken", {"</s>": 2}, []),
])
def test_template_end_of_turn_ids(template, specials, want):
    assert template_end_of_turn_ids(template, specials, bos_token="<s>", eos_token="</s>") == want


def test_longest_special_token_wins():
    template = "{% for m in messages %}{{ m['content'] }}<|end|><|endoftext|>{% endfor %}"
    assert template_end_of_turn_ids(template, {"<|end": 4, "<|end|>": 5}) == [5]


def save_chatml_tokenizer(folder: Path) -> None:
    """A word-level tokenizer saved by transformers itself (5.x writes chat_template.jinja)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<|endoftext|>", "hello", "world", "<|im_start|>", "<|im_end|>", "user", "assistant"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(folder)


def test_folder_with_saved_tokenizer(tmp_path):
    save(tiny_llama(tie=True), tmp_path)
    save_chatml_tokenizer(tmp_path)

    loaded = load_weights(tmp_path)
    assert loaded.chat_template == CHATML
    assert loaded.args.eos_ids == [2, 5]  # config eos, then <|im_end|>

    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.chat_template == CHATML
    assert tokenizer.encode("hello world", add_special_tokens=False) == [2, 3]
    assert end_of_turn_ids(tokenizer) == [1, 5]  # <|endoftext|>, <|im_end|>


def test_folder_without_tokenizer(tmp_path):
    save(tiny_llama(tie=True), tmp_path)
    with pytest.raises(BadModelFile, match="tokenizer"):
        load_tokenizer(tmp_path)


def test_other_model_type_is_unsupported(tmp_path):
    save(tiny_llama(tie=True), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"model_type": "mistral"}))
    with pytest.raises(UnsupportedArchitecture, match="mistral"):
        load_weights(tmp_path)


def test_attention_bias_is_unsupported(tmp_path):
    save(tiny_llama(tie=True), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"attention_bias": True}))
    with pytest.raises(UnsupportedArchitecture, match="attention_bias"):
        load_weights(tmp_path)


def test_missing_tensor_is_bad_model_file(tmp_path):
    from safetensors.torch import load_file, save_file

    save(tiny_llama(tie=True), tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(BadModelFile, match="model.layers.1.mlp.down_proj.weight"):
        load_weights(tmp_path)


def test_truncated_safetensors_is_bad_model_file(tmp_path):
    save(tiny_llama(tie=True), tmp_path)
    file = tmp_path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(BadModelFile, match="model.safetensors") as err:
        load_weights(tmp_path)
    assert "\n" not in str(err.value)


def test_pickle_only_folder_is_refused(tmp_path):
    save(tiny_llama(tie=True), tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(BadModelFile, match="pickle"):
        load_weights(tmp_path)


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(ModelNotFound):
        load_weights(tmp_path / "nothing-here")
    with pytest.raises(BadModelFile, match="config.json"):
        load_weights(tmp_path)


def test_broken_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(BadModelFile, match="config.json"):
        load_weights(tmp_path)


# ---------------------------------------------------------------------------------------------------
# The real default model (CI sets LOLACHAT_TEST_GGUF to SmolLM2-135M-Instruct.Q4_1.gguf)



@pytest.fixture(scope="module")
def real_weights(real_gguf):
    return load_weights(real_gguf)


@pytest.mark.realmodel
def test_real_gguf_config(real_weights):
    args = real_weights.args
    assert (args.n_layers, args.dim, args.n_heads, args.n_kv_heads, args.head_dim) == (30, 576, 9, 3, 64)
    assert (args.vocab_size, args.hidden_dim, args.max_position) == (49152, 1536, 8192)
    assert args.tie_embeddings and args.rope_scaling is None and args.rope_theta == 100000.0
    assert 2 in args.eos_ids  # <|im_end|>
    assert "<|im_start|>" in real_weights.chat_template


@pytest.mark.realmodel
def test_real_gguf_matches_transformers(real_gguf, real_weights):
    # transformers' GGUF loader itself; AutoModelForCausalLM.from_pretrained(gguf_file=...) would call it too
    # but additionally requires `accelerate`.
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = transformers.AutoConfig.from_pretrained(real_gguf.parent, gguf_file=real_gguf.name)
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(config)
    theirs = load_gguf_checkpoint(str(real_gguf), return_tensors=True, model_to_load=skeleton)["tensors"]
    theirs = {name: torch.as_tensor(t).float() for name, t in theirs.items()}

    assert set(real_weights.tensors) == set(theirs)
    for name, ours in real_weights.tensors.items():
        torch.testing.assert_close(ours, theirs[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.realmodel
def test_real_gguf_tokenizer(real_gguf):
    tokenizer = load_tokenizer(real_gguf)
    ids = tokenizer.encode("Hello", add_special_tokens=True)
    assert ids and tokenizer.decode(ids, skip_special_tokens=True) == "Hello"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert "<|im_start|>user\nHi<|im_end|>" in prompt and prompt.endswith("<|im_start|>assistant\n")
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in end_of_turn_ids(tokenizer)
