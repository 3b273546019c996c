"""The `lolachat` entry point as a user runs it: a subprocess, its exit code, stdout and stderr."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def lolachat(*args, home: Path, stdin: str | None = None, timeout: int = 300):
    env = dict(os.environ, LOLACHAT_HOME=str(home), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "lolachat.cli", *args], capture_output=True, text=True,
                          env=env, input=stdin, timeout=timeout)


def assert_clean_error(result, *fragments: str):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("lolachat: error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def home(tmp_path):
    return tmp_path / "home"


def test_help_lists_the_commands(home):
    result = lolachat("--help", home=home)
    assert result.returncode == 0
    for command in ("run", "ask", "pull", "list"):
        assert command in result.stdout


def test_ask_missing_file(home, tmp_path):
    assert_clean_error(lolachat("ask", "--file", str(tmp_path / "nope.txt"), "what?", home=home), "not found")


def test_ask_directory(home, tmp_path):
    assert_clean_error(lolachat("ask", "--file", str(tmp_path), "what?", home=home), "directory")


def test_ask_binary_file(home, tmp_path):
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(bytes(range(256)) * 64)
    assert_clean_error(lolachat("ask", "--file", str(garbage), "what?", home=home), "binary")


def test_ask_empty_file(home, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert_clean_error(lolachat("ask", "--file", str(empty), "what?", home=home), "empty")


def test_ask_empty_question(home, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("some text")
    assert_clean_error(lolachat("ask", "--file", str(doc), "   ", home=home), "question is empty")


def test_run_empty_prompt(home):
    assert_clean_error(lolachat("run", "smollm2-135m", " ", home=home), "prompt is empty")


def test_run_unknown_model(home):
    assert_clean_error(lolachat("run", "no-such-model", "hi", home=home), "no-such-model")


def test_run_missing_local_model(home, tmp_path):
    assert_clean_error(lolachat("run", str(tmp_path / "missing.gguf"), "hi", home=home), "missing.gguf")


def test_run_corrupt_gguf(home, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + os.urandom(4000))
    assert_clean_error(lolachat("run", str(bad), "hi", home=home), "bad.gguf")


def test_run_unsupported_architecture(home, tmp_path):
    folder = tmp_path / "gpt2ish"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    assert_clean_error(lolachat("run", str(folder), "hi", home=home), "gpt2")


def test_bad_sampling_option(home):
    assert_clean_error(lolachat("run", "smollm2-135m", "hi", "--top-p", "0", home=home), "top-p")


# -- with the real default model --------------------------------------------------------------------------



PASSAGE = (
    "The lighthouse keeper wrote in her log every evening. She noted the wind, the colour of the sea, "
    "and the ships that passed the point. Most days were quiet, and the entries were short. "
)


@pytest.mark.realmodel
def test_ask_json_on_a_long_file_keeps_memory_flat(home, tmp_path, real_gguf):
    doc = tmp_path / "log.txt"
    body = PASSAGE * 120
    doc.write_text(body[: len(body) // 2] + "The secret word is PINEAPPLE. " + body[len(body) // 2 :])
    result = lolachat("ask", "--file", str(doc), "What is the secret word?", "--model", str(real_gguf),
                      "--feature-map", "identity", "--sparse", "64", "--window", "32", "--json",
                      "--max-new-tokens", "8", home=home)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["engine"]["mode"] == "lola-identity" and "experimental" in result.stderr
    memory = out["memory"]
    assert memory["tokens_seen"] == out["prompt_tokens"] + out["new_tokens"] > 4000
    assert memory["window_tokens"] + memory["sparse_tokens"] + memory["linear_tokens"] == memory["tokens_seen"]
    assert memory["cache_bytes"] < memory["full_kv_bytes"] / 2  # the fp32 linear state dominates early
    settled = [s["cache_bytes"] for s in out["memory_trace"] if s["tokens"] >= 64 + 2 * 32]
    assert settled and len(set(settled)) == 1


@pytest.mark.realmodel
def test_ask_non_utf8_file_is_read_with_a_note(home, tmp_path, real_gguf):
    doc = tmp_path / "latin1.txt"
    doc.write_bytes("Caf\xe9 opening hours: nine to five.".encode("latin-1"))
    result = lolachat("ask", "--file", str(doc), "When does the cafe open?", "--model", str(real_gguf),
                      "--max-new-tokens", "16", home=home)
    assert result.returncode == 0, result.stderr
    assert "not valid UTF-8" in result.stderr
    assert result.stdout.strip()
