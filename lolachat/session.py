"""A conversation: its transcript and its LoLA state, streamed replies, stats, save and resume."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lolachat.engine import Engine, ProgressFn, Timer
from lolachat.errors import BadInput, LolachatError
from lolachat.persist import atomic_write
from lolachat.sampling import SamplingOptions

SESSION_FORMAT = 1
METADATA_KEY = "lolachat_session"
# Settings a saved state depends on: resuming under different ones would silently compute garbage.
STATE_KEYS = ("weights_sha256", "mode", "window", "sparse", "mix", "max_distance", "phi_input", "selection", "sinks",
              "state_halflife", "adapter_sha256")
# What a LoLA session saved before a key existed ran with (older files lack these keys).
STATE_DEFAULTS = {"selection": "head", "sinks": 0, "state_halflife": 0}
DOCUMENT_MARK = "\x00lolachat-document\x00"


@dataclass
class TurnStats:
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    new_tokens: int = 0
    decode_seconds: float = 0.0
    evictions: int = 0
    stopped_by: str = ""  # "end_of_turn", "max_new_tokens" or "interrupted"

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.new_tokens / self.decode_seconds if self.decode_seconds else 0.0

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "prefill_seconds": round(self.prefill_seconds, 4),
                "prefill_tok_s": round(self.prefill_tok_s, 2), "new_tokens": self.new_tokens,
                "decode_seconds": round(self.decode_seconds, 4), "decode_tok_s": round(self.decode_tok_s, 2),
                "evictions": self.evictions, "stopped_by": self.stopped_by}


@dataclass
class Session:
    engine: Engine
    system: str | None = None
    messages: list[dict] = field(default_factory=list)
    last_turn: TurnStats = field(default_factory=TurnStats)

    def __post_init__(self) -> None:
        self.memory = self.engine.new_memory()
        self.consumed_text = ""  # exactly the text whose tokens `memory` has seen
        if self.system:
            self.messages.append({"role": "system", "content": self.system})

    # -- conversation ----------------------------------------------------------------------------
    def chat(self, message: str, *, max_new_tokens: int = 512, temperature: float = 0.7, top_k: int = 40,
             top_p: float = 0.95, seed: int | None = None, progress: ProgressFn | None = None) -> Iterator[str]:
        """Add a user message and stream the reply as text pieces (`progress` sees the prefill)."""
        if not message.strip():
            raise BadInput("the message is empty")
        self.messages.append({"role": "user", "content": message})
        prompt = self._render(generation_prompt=True)
        return self._respond(prompt, progress, SamplingOptions(temperature, top_k, top_p, seed), max_new_tokens)

    def ask(self, document: str, question: str, *, progress: ProgressFn | None = None, max_new_tokens: int = 512,
            temperature: float = 0.0, top_k: int = 40, top_p: float = 0.95, seed: int | None = None) -> Iterator[str]:
        """Stream a (possibly very long) document through the memory, then answer a question about it."""
        if not question.strip():
            raise BadInput("the question is empty")
        self.messages.append({"role": "user", "content": f"{DOCUMENT_MARK}\n\n{question}"})
        prompt = self._render(generation_prompt=True)
        self.messages[-1]["content"] = f"{document}\n\n{question}"
        before, after = prompt.split(DOCUMENT_MARK)
        pieces = (before, document, after)
        return self._respond(pieces, progress, SamplingOptions(temperature, top_k, top_p, seed), max_new_tokens)

    def catch_up(self, progress: ProgressFn | None = None) -> int:
        """Feed the memory whatever of the transcript (`messages`) it has not seen yet, e.g. after the
        transcript was restored without a matching state snapshot. Returns the number of tokens fed."""
        text = self._render(generation_prompt=False) if self.messages else ""
        if not text.startswith(self.consumed_text):
            self.memory = self.engine.new_memory()
            self.consumed_text = ""
        ids = self._encode(text[len(self.consumed_text):])
        if ids:
            self.engine.prefill(self.memory, ids, progress)
        self.consumed_text = text
        return len(ids)

    def rewind_last_reply(self) -> None:
        """Forget the last exchange in the transcript (the state is restored by callers from a snapshot)."""
        while self.messages and self.messages[-1]["role"] != "user":
            self.messages.pop()
        if self.messages:
            self.messages.pop()

    # -- stats and persistence -------------------------------------------------------------------
    def stats(self) -> dict:
        out = self.engine.memory_stats(self.memory)
        out["mode"] = self.engine.info.mode
        out["last_turn"] = self.last_turn.as_dict()
        return out

    def save(self, path: str | Path) -> None:
        tensors = {}
        for i, layer in enumerate(self.memory.layers):
            for name, value in layer.tensors().items():
                tensors[f"layers.{i}.{name}"] = value.detach().contiguous().cpu()
        meta = {
            "format": SESSION_FORMAT,
            "engine": self.engine.describe(),
            "position": self.memory.position,
            "messages": self.messages,
            "consumed_text": self.consumed_text,
            "system": self.system,
        }
        with atomic_write(Path(path)) as tmp:
            save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(meta)})

    @classmethod
    def load(cls, engine: Engine, path: Path) -> Session:
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})[METADATA_KEY])
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except FileNotFoundError:
            raise LolachatError(f"session file not found: {path}") from None
        except (SafetensorError, OSError, KeyError, ValueError) as err:
            raise LolachatError(f"{path} is not a lolachat session file ({err})") from None
        check_compatible(meta.get("engine", {}), engine.describe(), path)
        session = cls(engine, system=None)
        session.system = meta.get("system")
        session.messages = meta["messages"]
        session.consumed_text = meta["consumed_text"]
        session.memory.position = meta["position"]
        dtype = next(engine.model.parameters()).dtype
        for i, layer in enumerate(session.memory.layers):
            prefix = f"layers.{i}."
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            state = {k: (v.to(dtype) if v.is_floating_point() and k not in ("h", "s") else v) for k, v in state.items()}
            layer.load({k: v.to(engine.device) for k, v in state.items()}, engine.model.rope)
        return session

    # -- internals -----------------------------------------------------------------------------------
    def _render(self, generation_prompt: bool) -> str:
        return self.engine.tokenizer.apply_chat_template(
            self.messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _encode(self, text: str) -> list[int]:
        return self.engine.tokenizer.encode(text, add_special_tokens=False) if text else []

    def _respond(self, prompt, progress, options: SamplingOptions, max_new_tokens: int) -> Iterator[str]:
        """Prefill what the memory has not seen yet, then stream the reply. `prompt` is the full
        rendered conversation, or (before, document, after) pieces of it for a long document."""
        text = prompt if isinstance(prompt, str) else "".join(prompt)
        pieces = [prompt] if isinstance(prompt, str) else list(prompt)
        if not text.startswith(self.consumed_text):
            # The template rendered history differently from what we fed: start over from the transcript.
            self.memory = self.engine.new_memory()
            self.consumed_text = ""
        if text == self.consumed_text:
            raise BadInput("nothing new to answer")
        skip = len(self.consumed_text)
        ids: list[int] = []
        for piece in pieces:
            cut = min(skip, len(piece))
            ids += self._encode(piece[cut:])
            skip -= cut
        return self._stream(ids, text, progress, options, max_new_tokens)

    def _stream(self, ids, text, progress, options, max_new_tokens) -> Iterator[str]:
        engine = self.engine
        turn = TurnStats(prompt_tokens=len(ids))
        self.last_turn = turn
        evictions_before = engine.memory_stats(self.memory)["evictions"]
        with Timer(engine.device) as t:
            logits = engine.prefill(self.memory, ids, progress)
        turn.prefill_seconds = t.seconds
        self.consumed_text = text
        generated: list[int] = []
        shown = ""
        started = time.perf_counter()
        turn.stopped_by = "max_new_tokens"
        try:
            for token in engine.generate(self.memory, logits, max_new_tokens, options):
                generated.append(token)
                turn.new_tokens = len(generated)
                turn.decode_seconds = time.perf_counter() - started
                turn.evictions = engine.memory_stats(self.memory)["evictions"] - evictions_before
                if token in engine.stop_ids:
                    turn.stopped_by = "end_of_turn"
                    break
                visible = engine.tokenizer.decode(generated, skip_special_tokens=True)
                if visible.endswith("\ufffd"):  # a multi-byte character is still incomplete
                    continue
                if len(visible) > len(shown):
                    yield visible[len(shown):]
                    shown = visible
        except GeneratorExit:
            turn.stopped_by = "interrupted"
            raise
        finally:
            self._finish_turn(generated)

    def _finish_turn(self, generated: list[int]) -> None:
        """Record the reply; the memory has seen every generated token, so the consumed text grows too."""
        tokenizer = self.engine.tokenizer
        stop = self.engine.stop_ids
        reply_ids = generated[:-1] if generated and generated[-1] in stop else generated
        reply = tokenizer.decode(reply_ids, skip_special_tokens=False)
        self.consumed_text += tokenizer.decode(generated, skip_special_tokens=False)
        self.messages.append({"role": "assistant", "content": reply})


def check_compatible(saved: dict, current: dict, path: Path) -> None:
    lola = saved.get("mode", "").startswith("lola")
    for key in STATE_KEYS:
        was = saved.get(key, STATE_DEFAULTS.get(key) if lola else None)
        if was != current.get(key):
            saved_as = f"{key}={was!r}" if key in saved or key in STATE_DEFAULTS else f"no {key} (an older lolachat)"
            raise LolachatError(
                f"session {path} was saved with {saved_as} but the engine runs "
                f"{key}={current.get(key)!r}; load it with the same model, adapter and LoLA settings"
            )
