"""The retrieval grid: needle prompts at each length × depth, greedy answers, RULER scores.

Samples run round-robin (sample 0 of every cell, then sample 1, ...), so a run cut short by a deadline
still covers every cell evenly.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence

import torch

from lolachat.evals.niah import TASKS, build_prompt
from lolachat.evals.scoring import sample_score
from lolachat.sampling import SamplingOptions

GREEDY = SamplingOptions(temperature=0.0, top_k=0, top_p=1.0)


def sample_seed(seed: int, task: str, length: int, depth: float, index: int) -> random.Random:
    return random.Random(f"{seed}:{task}:{length}:{depth:.6f}:{index}")


def needle_kept(memory, start: int, end: int) -> float | None:
    """Share of the needle's tokens [start, end) held exactly in the sparse cache, over layers × heads.

    None for exact attention (everything is kept) or when the needle is still inside the window.
    """
    if memory.exact:
        return None
    layer0 = memory.layers[0]
    if start >= layer0.window_start:
        return None
    shares = []
    for layer in memory.layers:
        pos = layer.sparse_pos  # [B, query heads, or KV heads with group selection, S]
        hit = ((pos >= start) & (pos < end)).sum(dim=-1).float() / max(1, end - start)
        shares.append(hit.mean())
    return float(torch.stack(shares).mean()) if shares else None


def run_one(engine, task: str, length: int, depth: float, rng: random.Random, max_new_tokens: int,
            chat: bool = True) -> dict:
    prompt = build_prompt(engine.tokenizer, task, length, depth, rng, chat=chat)
    memory = engine.new_memory()
    started = time.perf_counter()
    logits = engine.prefill(memory, prompt.ids)
    stats = engine.memory_stats(memory)
    kept = needle_kept(memory, prompt.needle_token, prompt.needle_end)
    generated = []
    for token in engine.generate(memory, logits, max_new_tokens, GREEDY):
        if token in engine.stop_ids:
            break
        generated.append(token)
    prediction = engine.tokenizer.decode(generated, skip_special_tokens=True)
    return {
        "length": length, "depth": depth, "prompt_tokens": len(prompt.ids), "needle_token": prompt.needle_token,
        "measured_depth": round(prompt.measured_depth, 4), "key": prompt.key, "value": prompt.value,
        "prediction": prediction, "score": sample_score(prediction, prompt.references), "needle_kept": kept,
        "seconds": round(time.perf_counter() - started, 3), "memory": stats,
    }


def run_passkey(engine, *, lengths: Sequence[int], depths: Sequence[float], samples: int,
                task: str = "niah_single_1", max_new_tokens: int = 32, seed: int = 0, chat: bool = True,
                progress: Callable[[int, int], None] | None = None, deadline: float | None = None,
                min_rounds: int = 0, shard: tuple[int, int] = (0, 1)) -> dict:
    """Run the grid; returns cells (mean score × 100 per length × depth), per-length scores and samples.

    `deadline` (time.monotonic() seconds) stops the run early, with `truncated` set in the result, but
    not before `min_rounds` samples of every cell are done. `shard=(i, n)` runs only sample indices
    i, i+n, ... so n processes share one grid; `summarize` merges their samples.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}")
    first, step = shard
    indices = range(first, samples, step)
    total = len(indices) * len(lengths) * len(depths)
    results: list[dict] = []
    truncated = False
    for index in indices:
        for length in lengths:
            for depth in depths:
                if deadline is not None and index >= min_rounds and time.monotonic() > deadline:
                    truncated = True
                    break
                rng = sample_seed(seed, task, length, depth, index)
                sample = run_one(engine, task, length, depth, rng, max_new_tokens, chat)
                sample["index"] = index
                results.append(sample)
                if progress:
                    progress(len(results), total)
    return summarize(results, task, lengths, depths, truncated) | {
        "samples_per_cell": samples, "max_new_tokens": max_new_tokens, "seed": seed, "chat_template": chat}


def _mean(values: list[float]) -> float | None:
    return round(100 * sum(values) / len(values), 2) if values else None


def summarize(results: list[dict], task: str, lengths: Sequence[int], depths: Sequence[float],
              truncated: bool = False) -> dict:
    cells = []
    for length in lengths:
        for depth in depths:
            scores = [r["score"] for r in results if r["length"] == length and r["depth"] == depth]
            cells.append({"length": length, "depth": depth, "n": len(scores), "score": _mean(scores)})
    by_length = {}
    memory = {}
    for length in lengths:
        rows = [r for r in results if r["length"] == length]
        kept = [r["needle_kept"] for r in rows if r["needle_kept"] is not None]
        by_length[str(length)] = {
            "n": len(rows), "score": _mean([r["score"] for r in rows]),
            "needle_kept": round(sum(kept) / len(kept), 4) if kept else None,
            "seconds_per_sample": round(sum(r["seconds"] for r in rows) / len(rows), 3) if rows else None,
        }
        if rows and "memory" in rows[0]:
            memory[str(length)] = rows[0]["memory"]
    overall = _mean([r["score"] for r in results])
    return {"task": task, "lengths": list(lengths), "depths": list(depths), "score": overall,
            "by_length": by_length, "cells": cells, "memory_after_prefill": memory, "truncated": truncated,
            "samples": results}
