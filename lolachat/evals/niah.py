"""Needle-in-a-haystack prompts of an exact token length: RULER `niah_single_1` and the classic pass key.

`niah_single_1` follows RULER's format (research/perf.md §6): a noise haystack (five fixed sentences
repeated, five to a line), a needle "One of the special magic numbers for {adjective-noun} is: {7 digits}."
on its own line, the singular RULER question, and the answer prefix placed after the chat template's
assistant header so the model continues from it. `passkey` is the Landmark-Attention pass-key prompt
over the same noise.

The haystack is grown sentence by sentence until the whole prompt (template, instruction, question and
answer prefix included) has the requested number of tokens under the model's own tokenizer; the
needle sits before the sentence at the requested depth of the haystack.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from lolachat.errors import BadInput

NOISE_SENTENCES = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                   "There and back again.")

# Adjectives and nouns for RULER-style "adjective-noun" keys (our own short lists).
ADJECTIVES = (
    "abundant", "agreeable", "ancient", "bitter", "bold", "brave", "bright", "broad", "calm", "careful",
    "cheerful", "clever", "cold", "curious", "damp", "daring", "deep", "eager", "early", "elegant",
    "faint", "fancy", "fierce", "fragile", "gentle", "gigantic", "glossy", "graceful", "hollow", "humble",
    "icy", "jolly", "keen", "lazy", "little", "lively", "loud", "lucky", "mellow", "misty", "modern",
    "narrow", "nervous", "noisy", "odd", "polite", "proud", "quick", "quiet", "rapid", "rough", "rustic",
    "salty", "shiny", "silent", "silly", "smooth", "sour", "spicy", "steady", "sticky", "sturdy", "tame",
    "tender", "tidy", "tiny", "velvet", "vivid", "warm", "wicked", "wild", "wise", "witty", "young",
)
NOUNS = (
    "anchor", "apple", "badge", "basket", "beacon", "blanket", "bottle", "bridge", "brush", "bucket",
    "cabin", "candle", "canyon", "carpet", "castle", "cherry", "circle", "cloud", "comet", "compass",
    "copper", "cottage", "crayon", "desert", "diamond", "dolphin", "drum", "eagle", "engine", "feather",
    "fiddle", "forest", "fountain", "garden", "glacier", "harbor", "helmet", "island", "jacket", "kettle",
    "ladder", "lantern", "lemon", "magnet", "marble", "meadow", "mirror", "mountain", "needle", "orchard",
    "pebble", "pencil", "pillow", "planet", "pocket", "puzzle", "rabbit", "river", "saddle", "shovel",
    "spoon", "statue", "teapot", "thunder", "ticket", "tiger", "tower", "trumpet", "tunnel", "violin",
    "wagon", "whistle", "window", "zebra",
)


@dataclass(frozen=True)
class Task:
    name: str
    instruction: str
    needle: str  # format fields: key, value
    question: str  # format field: key
    answer_prefix: str  # format field: key
    make_value: Callable[[random.Random], str]
    uses_key: bool


def _seven_digits(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _pass_key(rng: random.Random) -> str:
    return str(rng.randint(1, 50_000))


TASKS: dict[str, Task] = {
    "niah_single_1": Task(
        name="niah_single_1",
        instruction=("A special magic number is hidden within the following text. Make sure to memorize it. "
                     "I will quiz you about the number afterwards."),
        needle="One of the special magic numbers for {key} is: {value}.",
        question="What is the special magic number for {key} mentioned in the provided text?",
        answer_prefix="The special magic number for {key} mentioned in the provided text is",
        make_value=_seven_digits,
        uses_key=True,
    ),
    "passkey": Task(
        name="passkey",
        instruction=("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
                     "them. I will quiz you about the important information there."),
        needle="The pass key is {value}. Remember it. {value} is the pass key.",
        question="What is the pass key?",
        answer_prefix="The pass key is",
        make_value=_pass_key,
        uses_key=False,
    ),
}


@dataclass
class NeedlePrompt:
    task: str
    text: str  # the whole prompt, answer prefix included
    ids: list[int]
    key: str
    value: str
    length: int  # requested tokens
    depth: float  # requested depth in [0, 1]
    needle_token: int  # index of the first token of the needle line
    needle_end: int  # index just past the needle line's tokens
    context_start: int  # token index where the haystack starts
    context_end: int  # token index where the haystack ends
    sentences: int  # noise sentences in the haystack
    references: list[str] = field(default_factory=list)

    @property
    def measured_depth(self) -> float:
        """Share of the haystack's noise tokens that come before the needle."""
        noise = self.context_end - self.context_start - (self.needle_end - self.needle_token)
        return (self.needle_token - self.context_start) / max(1, noise)


def random_key(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def _render_noise(start: int, end: int) -> str:
    """Sentences start..end-1 of the endless noise, five to a line."""
    parts = []
    for i in range(start, end):
        if i > start:
            parts.append("\n" if i % len(NOISE_SENTENCES) == 0 else " ")
        parts.append(NOISE_SENTENCES[i % len(NOISE_SENTENCES)])
    return "".join(parts)


class _Builder:
    """Renders one sample's prompt for any haystack size; counts tokens with the model's tokenizer."""

    def __init__(self, tokenizer, task: Task, key: str, value: str, depth: float, chat: bool):
        self.tokenizer = tokenizer
        self.task = task
        self.depth = depth
        self.needle = task.needle.format(key=key, value=value)
        self.question = task.question.format(key=key)
        self.answer_prefix = task.answer_prefix.format(key=key)
        self.chat = chat and getattr(tokenizer, "chat_template", None) is not None

    def needle_index(self, n: int) -> int:
        return int(round(self.depth * n))

    def pieces(self, n: int) -> tuple[str, str, str, str]:
        """(before the haystack, haystack up to the needle, needle line and rest of haystack, after)."""
        k = self.needle_index(n)
        head = _render_noise(0, k)
        tail = _render_noise(k, n)
        needle_and_rest = self.needle + ("\n" + tail if tail else "")
        haystack_head = head + "\n" if head else ""
        task_text = f"{self.task.instruction}\n\x00\n{self.question}"
        if self.chat:
            rendered = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": task_text}], tokenize=False, add_generation_prompt=True)
            rendered += self.answer_prefix
        else:
            rendered = f"{task_text} {self.answer_prefix}"
        before, after = rendered.split("\x00")
        return before, haystack_head, needle_and_rest, after

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=not self.chat))

    def count(self, n: int) -> int:
        return len(self.encode("".join(self.pieces(n))))


def _closest_size(count: Callable[[int], int], target: int) -> int:
    """The haystack size n >= 0 whose prompt length is closest to `target` (count is ~linear in n)."""
    cache: dict[int, int] = {}

    def f(n: int) -> int:
        if n not in cache:
            cache[n] = count(n)
        return cache[n]

    base = f(0)
    if base >= target:
        return 0
    probe = max(1, (target - base) // 8)
    slope = max((f(probe) - base) / probe, 1e-3)
    n = max(0, int(round((target - base) / slope)))
    for _ in range(8):  # secant steps toward the target
        got = f(n)
        if got == target:
            return n
        if n and got != base:
            slope = max((got - base) / n, 1e-3)
        step = int(round((target - got) / slope))
        if step == 0:
            break
        n = max(0, n + step)
    # walk to the bracket [lo, lo + 1] around the target, then pick the closer side
    while n > 0 and f(n) > target:
        n -= 1
    while f(n + 1) <= target:
        n += 1
    return n if target - f(n) <= f(n + 1) - target else n + 1


def build_prompt(tokenizer, task: str, length: int, depth: float, rng: random.Random,
                 chat: bool = True) -> NeedlePrompt:
    """One sample of `task` whose prompt has `length` tokens (±1 noise sentence) with the needle at `depth`."""
    if task not in TASKS:
        raise BadInput(f"unknown task {task!r} (expected one of: {', '.join(TASKS)})")
    if not 0.0 <= depth <= 1.0:
        raise BadInput(f"depth must be between 0 and 1 (got {depth})")
    spec = TASKS[task]
    key = random_key(rng) if spec.uses_key else ""
    value = spec.make_value(rng)
    builder = _Builder(tokenizer, spec, key, value, depth, chat)
    n = _closest_size(builder.count, length)
    before, head, needle_rest, after = builder.pieces(n)
    if builder.count(0) > length:
        raise BadInput(f"{length} tokens is too short for a {task} prompt (it needs {builder.count(0)} "
                       "without any haystack)")
    text = before + head + needle_rest + after
    ids = builder.encode(text)
    context_start = len(builder.encode(before))
    needle_token = len(builder.encode(before + head))
    needle_end = len(builder.encode(before + head + builder.needle))
    context_end = len(builder.encode(before + head + needle_rest))
    return NeedlePrompt(task=task, text=text, ids=ids, key=key, value=value, length=length, depth=depth,
                        needle_token=needle_token, needle_end=needle_end, context_start=context_start,
                        context_end=context_end,
                        sentences=n, references=[value])
