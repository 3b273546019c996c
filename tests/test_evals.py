"""Needle prompts (length, depth), RULER scoring, the passkey grid, perplexity and the `eval` command."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import transformers

import lolachat
from lolachat.cli import main
from lolachat.evals.niah import NOISE_SENTENCES, TASKS, build_prompt
from lolachat.evals.passkey import run_passkey, summarize
from lolachat.evals.ppl import perplexity, token_windows
from lolachat.evals.scoring import postprocess_pred, sample_score, string_match_all

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_TEXT = " ".join(NOISE_SENTENCES) + """
A special magic number is hidden within the following text. Make sure to memorize it. I will quiz you.
One of the special magic numbers for quick-river is: 1234567. What is the special magic number for it?
There is an important info hidden inside a lot of irrelevant text. The pass key is 42. Remember it.
0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000 mentioned in the provided text is afterwards about number.
The quick brown fox jumps over the lazy dog; memory, attention, window, state, cache and tokens.
"""


def small_tokenizer(vocab_size: int = 300):
    """A byte-level BPE trained here (no network) with ChatML specials and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                        "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_TEXT] * 4, trainer=trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                                pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def build_tiny_model(folder: Path, layers: int = 2, dim: int = 32, heads: int = 4, kv_heads: int = 2,
                     seed: int = 0, max_position: int = 4096) -> Path:
    """A random Llama in Hugging Face layout with the tokenizer above: `lolachat.load(folder)` runs it."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = small_tokenizer()
    cfg = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_position,
        rope_theta=10000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer():
    return small_tokenizer()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


# ------------------------------------------------------------------------------------------- prompts


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("length", [600, 1000, 2500])
@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_prompt_length_within_one_percent_and_needle_at_depth(tokenizer, task, length, depth):
    p = build_prompt(tokenizer, task, length, depth, random.Random(7))
    assert abs(len(p.ids) - length) <= 0.01 * length
    assert p.ids == tokenizer.encode(p.text, add_special_tokens=False)
    # the needle starts at a sentence boundary of the noise: within half a sentence of the depth
    assert abs(p.measured_depth - depth) <= 0.5 / p.sentences + 0.01
    needle = tokenizer.decode(p.ids[p.needle_token : p.needle_end])
    assert p.value in needle and p.text.count(p.value) == (2 if task == "passkey" else 1)
    assert p.text.endswith(TASKS[task].answer_prefix.format(key=p.key))
    assert p.text.startswith("<|im_start|>user\n")


def test_niah_single_1_format(tokenizer):
    p = build_prompt(tokenizer, "niah_single_1", 400, 0.5, random.Random(3))
    assert len(p.value) == 7 and p.value.isdigit() and 1_000_000 <= int(p.value) <= 9_999_999
    adjective, noun = p.key.split("-")
    assert adjective and noun
    assert f"\nOne of the special magic numbers for {p.key} is: {p.value}.\n" in p.text
    assert f"What is the special magic number for {p.key} mentioned in the provided text?<|im_end|>" in p.text
    assert "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n" in p.text
    assert p.references == [p.value]


def test_prompts_are_reproducible_and_vary_with_the_seed(tokenizer):
    a = build_prompt(tokenizer, "niah_single_1", 500, 0.5, random.Random("s1"))
    b = build_prompt(tokenizer, "niah_single_1", 500, 0.5, random.Random("s1"))
    c = build_prompt(tokenizer, "niah_single_1", 500, 0.5, random.Random("s2"))
    assert a.text == b.text and (a.key, a.value) != (c.key, c.value)


def test_raw_prompt_without_chat_template(tokenizer):
    p = build_prompt(tokenizer, "passkey", 500, 0.2, random.Random(1), chat=False)
    assert "<|im_start|>" not in p.text and p.text.endswith("What is the pass key? The pass key is")
    assert abs(len(p.ids) - 500) <= 5


def test_too_short_length_is_a_clear_error(tokenizer):
    with pytest.raises(lolachat.LolachatError, match="too short"):
        build_prompt(tokenizer, "niah_single_1", 20, 0.5, random.Random(1))


# ------------------------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("prediction,refs,want", [
    (" 8412385.", ["8412385"], 1.0),
    ("The special magic number is 8412385", ["8412385"], 1.0),
    ("841238", ["8412385"], 0.0),  # a prefix of the value is not the value
    ("84123855", ["8412385"], 1.0),  # substring rule: extra digits do not hurt
    ("8412\n385", ["8412385"], 0.0),
    ("8412\x07385", ["8412385"], 0.0),  # control characters become newlines
    ("\x00 8412385 \x1f", ["8412385"], 1.0),
    ("The Quick-River", ["quick-river"], 1.0),  # case-insensitive
    ("one: 111 and two: 222", ["111", "222", "333"], 2 / 3),
    ("", ["1"], 0.0),
])
def test_sample_score_matches_ruler_rule(prediction, refs, want):
    assert sample_score(prediction, refs) == pytest.approx(want)


def test_string_match_all_is_mean_times_100_rounded():
    assert string_match_all(["a 1", "b", "c"], [["1"], ["1"], ["1"]]) == 33.33
    assert string_match_all(["1 2", "2"], [["1", "2"], ["1", "2"]]) == 75.0
    assert string_match_all([], []) == 0.0
    assert postprocess_pred("  x\ty\n ") == "x\ny"


# ------------------------------------------------------------------------------------ engine-level runs


def test_passkey_grid_on_tiny_model(tiny_folder):
    engine = lolachat.load(str(tiny_folder), device="cpu", dtype="float32", feature_map="identity", sparse=16,
                           window=16)
    result = run_passkey(engine, lengths=[300, 400], depths=[0.0, 1.0], samples=1, max_new_tokens=3, seed=1)
    assert len(result["samples"]) == 4 and len(result["cells"]) == 4
    for sample in result["samples"]:
        assert abs(sample["prompt_tokens"] - sample["length"]) <= 0.01 * sample["length"] + 1
        assert 0.0 <= sample["score"] <= 1.0
        assert sample["needle_kept"] is None or 0.0 <= sample["needle_kept"] <= 1.0
    assert result["memory_after_prefill"]["400"]["sparse_tokens"] == 16
    again = run_passkey(engine, lengths=[300], depths=[1.0], samples=1, max_new_tokens=3, seed=1)
    assert again["samples"][0]["prediction"] == result["samples"][1]["prediction"]


def test_passkey_shards_split_the_grid_and_merge_to_the_whole(tiny_folder):
    engine = lolachat.load(str(tiny_folder), device="cpu", dtype="float32", sparse=None)
    grid = dict(lengths=[300], depths=[0.5], samples=3, max_new_tokens=2, seed=2)
    whole = run_passkey(engine, **grid)
    parts = [run_passkey(engine, **grid, shard=(i, 2)) for i in range(2)]
    assert [s["index"] for s in parts[0]["samples"]] == [0, 2] and [s["index"] for s in parts[1]["samples"]] == [1]
    merged = summarize(parts[0]["samples"] + parts[1]["samples"], "niah_single_1", [300], [0.5])
    def answers(samples):
        return sorted((s["index"], s["prediction"], s["score"]) for s in samples)

    assert answers(merged["samples"]) == answers(whole["samples"]) and merged["cells"] == whole["cells"]


def test_passkey_deadline_truncates_evenly(tiny_folder):
    engine = lolachat.load(str(tiny_folder), device="cpu", dtype="float32", sparse=None)
    result = run_passkey(engine, lengths=[200], depths=[0.5], samples=3, max_new_tokens=2, deadline=0.0)
    assert result["truncated"] and result["samples"] == [] and result["score"] is None


def test_perplexity_matches_full_logits_and_exact_equals_large_cache(tiny_folder, tokenizer):
    exact = lolachat.load(str(tiny_folder), device="cpu", dtype="float32", sparse=None)
    ids = tokenizer.encode(_TEXT * 6, add_special_tokens=False)
    got = perplexity(exact, ids, context=150, tail=40, samples=2)
    logp = torch.log_softmax(exact.logits(ids[150:300]), dim=-1)
    nll = -sum(float(logp[t - 1, ids[150 + t]]) for t in range(110, 150)) / 40
    assert got["windows"] == 2 and got["per_window_ppl"][1] == pytest.approx(math.exp(nll), rel=1e-4)
    # LoLA with a sparse cache larger than the context is exact attention (DESIGN §4.4)
    big = lolachat.load(str(tiny_folder), device="cpu", dtype="float32", feature_map="identity", sparse=512,
                        window=16)
    assert perplexity(big, ids, 150, 40, 2)["ppl"] == pytest.approx(got["ppl"], rel=1e-4)
    with pytest.raises(lolachat.LolachatError, match="fewer than one context"):
        perplexity(exact, ids[:100], context=150)


def test_aligned_windows_score_the_same_tokens_at_every_context(tiny_folder, tokenizer):
    ids = list(range(1000))
    assert token_windows(ids, 100, 3) == [ids[0:100], ids[100:200], ids[200:300]]
    aligned = token_windows(ids, 100, 3, align_to=400)
    assert aligned == [ids[300:400], ids[700:800]]  # only two windows of 400 fit
    assert [w[-1] for w in token_windows(ids, 400, 3, align_to=400)] == [w[-1] for w in aligned]
    with pytest.raises(lolachat.LolachatError, match="cannot align"):
        token_windows(ids, 400, 3, align_to=100)
    # a context as long as the alignment span scores exactly what the unaligned run scores
    exact = lolachat.load(str(tiny_folder), device="cpu", dtype="float32", sparse=None)
    text = tokenizer.encode(_TEXT * 6, add_special_tokens=False)
    one = perplexity(exact, text, context=150, tail=40, samples=2)
    assert perplexity(exact, text, context=150, tail=40, samples=2, align_to=150)["ppl"] == one["ppl"]
    # a shorter aligned window scores the same tokens with less before them
    short = perplexity(exact, text, context=60, tail=40, samples=2, align_to=150)
    assert short["aligned_to"] == 150 and short["windows"] == 2 and short["ppl"] != one["ppl"]


# --------------------------------------------------------------------------------------------- the CLI


def test_eval_commands(tiny_folder, tmp_path, capsys):
    out = tmp_path / "pk.json"
    code = main(["eval", "passkey", str(tiny_folder), "--feature-map", "identity", "--lengths", "300",
                 "--depths", "0,50%", "--samples", "1", "--max-new-tokens", "3", "--device", "cpu",
                 "--window", "16", "--sparse", "16", "--out", str(out), "--plot", str(tmp_path / "map.png")])
    assert code == 0
    printed = capsys.readouterr()
    assert "niah_single_1" in printed.out and "overall" in printed.out
    saved = json.loads(out.read_text())
    assert saved["engine"]["sparse"] == 16 and saved["lengths"] == [300] and saved["depths"] == [0.0, 0.5]
    from lolachat.evals.plot import matplotlib_available

    assert (tmp_path / "map.png").exists() == matplotlib_available()

    text = tmp_path / "held.txt"
    text.write_text(_TEXT * 8)
    assert main(["eval", "ppl", str(tiny_folder), "--file", str(text), "--context", "100,200", "--tail", "30",
                 "--mode", "exact", "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["context"] for r in result["results"]] == [100, 200] and result["engine"]["mode"] == "exact"
    assert main(["eval", "ppl", str(tiny_folder), "--file", str(text), "--context", "100,200", "--tail", "30",
                 "--mode", "exact", "--device", "cpu", "--aligned"]) == 0
    assert "windows aligned to 200 tokens" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["eval", "passkey", "--lengths", "abc"], "bad length"),
    (["eval", "passkey", "--depths", "1.5"], "outside 0..1"),
    (["eval", "passkey", "--lengths", "30"], "too short"),
    (["eval", "ppl", "--file", "/nonexistent/x.txt"], "x.txt"),
])
def test_eval_bad_input_is_one_line(tiny_folder, capsys, argv, message):
    argv = argv[:2] + [str(tiny_folder), "--device", "cpu", "--feature-map", "identity"] + argv[2:]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith("lolachat: error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err


def test_lola_mode_needs_an_adapter(tiny_folder, capsys):
    assert main(["eval", "passkey", str(tiny_folder), "--device", "cpu", "--lengths", "300"]) == 1
    assert "no LoLA adapter" in capsys.readouterr().err
