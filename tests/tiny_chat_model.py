"""A tiny random chat model in Hugging Face layout, for tests that go through `lolachat.load(folder)`.

`build(folder)` writes `config.json` + `model.safetensors` (a random `LlamaForCausalLM`) and a real
byte-level BPE tokenizer (trained here on a small fixed English corpus, no network) with the ChatML
special tokens `<|im_start|>` / `<|im_end|>` and a ChatML chat template. Decoding round-trips exactly,
so sessions continue without re-prefilling. Deterministic: the same arguments give the same files.

    python tests/tiny_chat_model.py DIR     # build it from the command line (used by the tmux test)
"""

from __future__ import annotations

import sys
from pathlib import Path

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = """The quick brown fox jumps over the lazy dog. A small model answers questions about memory,
attention and the window of recent tokens. Hello! How are you today? I am fine, thank you. What is
the capital of France? Paris is the capital of France. Tell me a story about a cat that sat on a mat.
Once upon a time there was a cat. Linear attention keeps a state of fixed size; the sparse cache keeps
the keys that are hard to remember. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Code: def f(x): return x * 2
Lists - one - two - three. Questions, answers; commas, colons: and (parentheses) [brackets] {braces}.
"""


def build_tokenizer(vocab_size: int = 320):
    """A `transformers` fast tokenizer: byte-level BPE trained on `_CORPUS` (ASCII only, so every
    token decodes to valid UTF-8), ChatML specials and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    printable = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
    alphabet = sorted({ch for ch in pre_tokenizers.ByteLevel.alphabet()
                       if _byte_of(ch) is not None and chr(_byte_of(ch)) in printable})
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token=None)
    fast.chat_template = CHATML
    return fast


def _byte_of(ch: str) -> int | None:
    """The byte a ByteLevel alphabet character stands for (GPT-2's bytes_to_unicode, inverted)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    inverse = {v: k for k, v in table.items()}
    return inverse.get(ch)


def build(folder: str | Path, *, seed: int = 0, layers: int = 2, dim: int = 32, heads: int = 4, kv_heads: int = 2,
          max_position: int = 1024) -> Path:
    """Write the tiny chat model into `folder` (created) and return it."""
    import torch
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    vocab = len(tokenizer)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_position,
        rope_theta=10000.0, tie_word_embeddings=True, rms_norm_eps=1e-5, eos_token_id=end, bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.2)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder



def load_engine(folder: str | Path, mode: str = "lola", window: int = 8, sparse: int = 16):
    """An engine over the tiny chat model: "lola" (identity feature maps, C=`window`, λ=`sparse`) or "exact"."""
    import lolachat

    if mode == "exact":
        return lolachat.load(str(folder), device="cpu", dtype="float32", sparse=None)
    return lolachat.load(str(folder), device="cpu", dtype="float32", window=window, sparse=sparse,
                         feature_map="identity")


_WORD_TEXT = ("the quick brown fox jumps over lazy dog a small model answers questions about memory attention "
              "and window of recent tokens cat sat on mat once upon time there was")
WORDS = _WORD_TEXT.split(" ")


def filler(n_words: int, offset: int = 0) -> str:
    """Deterministic text of `n_words` words from the tokenizer's corpus (about one token per word)."""
    return " ".join(WORDS[(offset + i * 7) % len(WORDS)] for i in range(n_words))


if __name__ == "__main__":  # pragma: no cover
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/tiny_chat_model.py DIR")
    print(build(sys.argv[1]))
