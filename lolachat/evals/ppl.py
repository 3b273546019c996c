"""Perplexity at a given context length, in whatever mode the engine runs (exact or LoLA).

The token stream is cut into consecutive, non-overlapping windows of `context` tokens; each window is fed
from a fresh memory and scored on its last `tail` tokens, each predicted from everything before it in the
window. So the number says how well the model predicts text `context − tail` .. `context` tokens into a
stream, which is where a bounded memory shows (or hides) its losses. Windows of different lengths score
different text unless aligned (`align_to`): then they all end where the longest ones end.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from lolachat.errors import BadInput

BLOCK = 1024  # tokens per forward pass: bounds the [block, vocab] logits held at once


def token_windows(ids: Sequence[int], context: int, samples: int | None,
                  align_to: int | None = None) -> list[list[int]]:
    """Windows of `context` tokens (at most `samples` of them).

    By default consecutive: window i is tokens [i·context, (i+1)·context). With `align_to` = L ≥ context,
    window i ends where the i-th window of L tokens ends, at (i+1)·L: every context length then scores
    the same tokens, so a difference between lengths is the context's doing and not the text's."""
    span = align_to or context
    if span < context:
        raise BadInput(f"cannot align windows of {context} tokens to shorter ones of {span}")
    count = len(ids) // span
    if samples is not None:
        count = min(count, samples)
    if count == 0:
        raise BadInput(f"the text has {len(ids)} tokens, fewer than one context of {span}")
    return [list(ids[(i + 1) * span - context : (i + 1) * span]) for i in range(count)]


@torch.inference_mode()
def window_nll(engine, window: Sequence[int], tail: int) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of the last `tail` tokens of `window`, and their count."""
    model = engine.model
    ids = torch.tensor(list(window), dtype=torch.long, device=engine.device).view(1, -1)
    t = ids.shape[1]
    first_target = t - tail  # targets are tokens first_target .. t-1, predicted from positions one earlier
    memory = engine.new_memory()
    total = 0.0
    for start in range(0, t - 1, BLOCK):
        end = min(start + BLOCK, t - 1)  # feed tokens start..end-1; they predict start+1..end
        logits = model(ids[:, start:end], memory, all_logits=True)[0]
        lo = max(start, first_target - 1)
        if lo >= end:
            continue
        scores = torch.log_softmax(logits[lo - start :].float(), dim=-1)
        targets = ids[0, lo + 1 : end + 1]
        total -= float(scores.gather(1, targets.view(-1, 1)).sum())
    return total, tail


def perplexity(engine, ids: Sequence[int], context: int, tail: int = 512, samples: int | None = None,
               progress: Callable[[int, int], None] | None = None, align_to: int | None = None) -> dict:
    """Perplexity of the last `tail` tokens of `samples` windows of `context` tokens of `ids`
    (windows ending where those of `align_to` tokens end, if given: see `token_windows`)."""
    if context < 2:
        raise BadInput("the context must be at least 2 tokens")
    tail = min(tail, context - 1)
    if tail < 1:
        raise BadInput("--tail must be at least 1")
    windows = token_windows(ids, context, samples, align_to)
    per_window = []
    nll = 0.0
    count = 0
    for i, window in enumerate(windows):
        total, n = window_nll(engine, window, tail)
        per_window.append(round(math.exp(total / n), 4))
        nll += total
        count += n
        if progress:
            progress(i + 1, len(windows))
    mean = nll / count
    return {"context": context, "tail": tail, "windows": len(windows), "aligned_to": align_to, "tokens_scored": count,
            "nll": round(mean, 6), "ppl": round(math.exp(mean), 4), "per_window_ppl": per_window}
