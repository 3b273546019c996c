#!/usr/bin/env python3
"""Probe (docs/quality.md §13.4): eviction scores discounted by the candidate's age, then any `lolachat eval`.

    AGE_HALFLIFE=8192 python scripts/aged_score_probe.py eval ppl smollm2-135m --file F --context 4K,32K --aligned

Each candidate's score (the self-recall error of DESIGN §4.4) is multiplied by 0.5 ** (age / AGE_HALFLIFE),
age = tokens between it and the newest candidate, so that stale pairs give their slots up to recent ones the way
the faded state forgets them. The CPU engine's competition is patched in this process only; nothing changes on disk.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lolachat.kernels import reference as ref  # noqa: E402

import lolachat.lola as lola  # noqa: E402
from lolachat.cli import main  # noqa: E402

AGE_HALFLIFE = float(os.environ.get("AGE_HALFLIFE", "8192"))


def aged_compete(self, mem, cand_k, cand_v, cand_pos):
    """`LolaAttention._compete` with the age discount applied to the scores before the top-λ selection."""
    lola.fade_state(mem.h, mem.s, self.cfg)
    group = mem.h.shape[1] // cand_k.shape[1]
    k_heads, v_heads, pos_heads = (lola.expand_heads(x, group) for x in (cand_k, cand_v, cand_pos))
    phi_k = self.phi(k_heads, pos_heads, self.adapter.phi_k)
    scores = lola.eviction_scores(phi_k, v_heads, mem.h, mem.s, self.cfg.score)
    newest = pos_heads.amax(dim=-1, keepdim=True)
    scores = scores * torch.exp2(-(newest - pos_heads).float() / AGE_HALFLIFE)
    keep, drop = ref.select_keep(ref.group_scores(scores, group), self.cfg.sparse)
    drop = lola.expand_heads(drop, group)
    ref.fold(ref.gather_tokens(phi_k, drop), ref.gather_tokens(v_heads, drop), mem.h, mem.s)
    mem.folded += drop.shape[-1]
    return [ref.gather_tokens(x, keep) for x in (cand_k, cand_v, cand_pos)]


if __name__ == "__main__":
    lola.LolaAttention._compete = aged_compete
    sys.exit(main(sys.argv[1:]))
