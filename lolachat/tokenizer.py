"""Tokenizer and chat template of a model, and the tokens that end an assistant turn.

The tokenizer itself comes from `transformers` (AutoTokenizer). Finding the end-of-turn token works
from the chat template alone, so the weights loader can use it without building a tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

from lolachat.errors import BadModelFile

_SENTINEL = "lolachat-sentinel-reply"

# Conversations tried in turn: some templates insist on a system message, others refuse one.
_PROBE_CONVERSATIONS = (
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _SENTINEL}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": _SENTINEL},
    ],
)


def load_tokenizer(path: str | Path):
    """The `transformers` tokenizer of a model folder or `.gguf` file, with its chat template if it has one."""
    from lolachat.weights import resolve_model_path  # weights imports this module

    source = resolve_model_path(path)
    try:
        tokenizer = _auto_tokenizer(source)
    except Exception as err:  # transformers raises many kinds for unreadable tokenizer files
        raise BadModelFile(f"{source}: cannot load its tokenizer ({_first_line(err)})") from err
    if tokenizer.chat_template is None and source.is_dir():
        tokenizer.chat_template = read_hf_chat_template(source)
    return tokenizer


def _auto_tokenizer(source: Path):
    from transformers import AutoTokenizer

    if source.is_file():
        return AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name, local_files_only=True)
    return AutoTokenizer.from_pretrained(str(source), local_files_only=True)


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn: the tokenizer's eos and the chat template's end-of-turn token."""
    specials = dict(tokenizer.get_added_vocab())
    for token in tokenizer.all_special_tokens:
        specials[token] = tokenizer.convert_tokens_to_ids(token)
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    found = template_end_of_turn_ids(
        tokenizer.chat_template, specials, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token
    )
    return unique(ids + found)


def template_end_of_turn_ids(
    chat_template: str | None,
    special_tokens: Mapping[str, int],
    bos_token: str | None = None,
    eos_token: str | None = None,
) -> list[int]:
    """The special token the template writes right after an assistant message (e.g. `<|im_end|>`), as an id.

    Renders a short conversation whose assistant reply is a sentinel and looks at what follows it.
    Returns [] when there is no template or the reply is not closed by one of `special_tokens`.
    """
    if not chat_template:
        return []
    for conversation in _PROBE_CONVERSATIONS:
        rendered = _try_render(chat_template, conversation, bos_token or "", eos_token or "")
        if rendered is None or _SENTINEL not in rendered:
            continue
        after = rendered.split(_SENTINEL, 1)[1].lstrip()
        closing = [token for token in special_tokens if token and after.startswith(token)]
        if closing:
            return [special_tokens[max(closing, key=len)]]
        return []
    return []


def _try_render(chat_template: str, messages: list[dict], bos_token: str, eos_token: str) -> str | None:
    """The rendered conversation, or None when the template rejects it (or is broken)."""
    from jinja2 import TemplateError

    try:
        return _render(chat_template, messages, bos_token, eos_token)
    except (TemplateError, ValueError, TypeError, LookupError, AttributeError):
        return None


def _render(chat_template: str, messages: list[dict], bos_token: str, eos_token: str) -> str:
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    # The same environment settings transformers uses, so templates render as they do there.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    template = env.from_string(chat_template)
    return template.render(messages=messages, bos_token=bos_token, eos_token=eos_token, add_generation_prompt=False)


def read_hf_chat_template(folder: Path) -> str | None:
    """The chat template of a Hugging Face folder: `chat_template.jinja`, `chat_template.json` or
    the `chat_template` entry of `tokenizer_config.json` (a string, or a list of named templates)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        template = read_json(folder / name).get("chat_template")
        if isinstance(template, list):
            named = {item.get("name"): item.get("template") for item in template if isinstance(item, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if template:
            return template
    return None


def read_hf_special_tokens(folder: Path) -> dict[str, int]:
    """Added/special tokens of a Hugging Face folder, from `tokenizer.json` or `tokenizer_config.json`."""
    added = read_json(folder / "tokenizer.json").get("added_tokens") or []
    specials = {item["content"]: item["id"] for item in added if "content" in item and "id" in item}
    decoder = read_json(folder / "tokenizer_config.json").get("added_tokens_decoder") or {}
    for token_id, item in decoder.items():
        if isinstance(item, dict) and "content" in item:
            specials.setdefault(item["content"], int(token_id))
    return specials


def read_json(path: Path) -> dict:
    """A JSON object from `path`, or {} when the file is absent; BadModelFile when it is not valid JSON."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadModelFile(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise BadModelFile(f"{path}: expected a JSON object")
    return data


def unique(ids: list[int]) -> list[int]:
    """`ids` without repeats, first occurrence kept."""
    return list(dict.fromkeys(ids))


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]
