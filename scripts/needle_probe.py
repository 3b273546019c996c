"""Where does the needle go? (issue 6: λ = 256 per head misses at 2K, depths 25–50%; docs/runs/l256-2k-diagnosis.md)

Runs `niah_single_1` samples (the same prompts as `lolachat eval passkey`, same seed) on the CPU engine with an
instrumented copy of `LolaAttention._compete` (the same math; `tests/test_selection_variants.py` checks the copy
against the engine) and reports per sample:
- the greedy answer and its score, and the teacher-forced log-probability of the true value's tokens;
- for each token of the needle's value (the digits), in how many of the 30 × 9 layer × head sparse caches it
  is still held at question time, and at which eviction it was dropped in the others;
- for every drop of a value token: what the kept set held then (the template, the haystack before the needle,
  the needle line, the haystack after it), the needle token's score and rank against the λ-th score, and how
  many tokens the linear state held;
- the mean over the answer's value tokens (teacher forced) of each layer's share of the output's normaliser held
  by the needle's value tokens in the sparse cache, the rest of the softmax part, and the linear term (`--attn`).

Settings (`--set name:key=value,...`): LolaConfig keys (sparse, selection, state_halflife, sinks, window, score)
and probe-only oracles: `protect=value|needle` scores the value's (or the whole needle line's) tokens +inf at
every competition (kept within λ, taking slots from others).

    nice -n 10 env OMP_NUM_THREADS=1 python scripts/needle_probe.py --length 2K --depths 0.25,0.5 --samples 3
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lolachat.kernels import reference as ref  # noqa: E402
from probe_settings import parse_length, parse_setting  # noqa: E402

from lolachat import lola  # noqa: E402
from lolachat.engine import load  # noqa: E402
from lolachat.evals.niah import build_prompt  # noqa: E402
from lolachat.evals.passkey import GREEDY, sample_seed  # noqa: E402
from lolachat.evals.scoring import sample_score  # noqa: E402

CFG_KEYS = {"sparse": int, "selection": str, "state_halflife": int, "sinks": int, "window": int, "score": str}
KNOBS = {"protect": str}
TASK = "niah_single_1"
COPY_HEADS = ((18, 7), (21, 8), (20, 3), (23, 2))  # (layer, head): the heads that read the value (oracle run)

PROBE: dict = {"layer_of": {}, "records": [], "protect": None, "attn": None, "value_pos": (), "needle": (0, 0)}


def compete(self, mem, cand_k, cand_v, cand_pos):
    """lola.LolaAttention._compete with a record of every competition (and the probe's oracles)."""
    lola.fade_state(mem.h, mem.s, self.cfg)
    group = mem.h.shape[1] // cand_k.shape[1]
    k_heads, v_heads, pos_heads = (lola.expand_heads(x, group) for x in (cand_k, cand_v, cand_pos))
    phi_k = self.phi(k_heads, pos_heads, self.adapter.phi_k)
    scores = lola.eviction_scores(phi_k, v_heads, mem.h, mem.s, self.cfg.score)
    grouped = ref.group_scores(scores, group)
    if PROBE["protect"] is not None:
        lo, hi = PROBE["protect"]
        pos_sel = cand_pos
        grouped = grouped.masked_fill((pos_sel >= lo) & (pos_sel < hi), float("inf"))
    keep, drop = ref.select_keep(grouped, self.cfg.sparse)
    PROBE["records"].append({
        "layer": PROBE["layer_of"].get(id(self), -1), "step": mem.evictions, "pos": cand_pos[0].clone(),
        "scores": grouped[0].clone(), "keep": keep[0].clone(), "mass": float(mem.s[0].sum(-1).mean() / 2),
        "vnorm": ref.group_scores(torch.linalg.vector_norm(v_heads.float(), dim=-1), group)[0].clone(),
    })
    drop = lola.expand_heads(drop, group)
    ref.fold(ref.gather_tokens(phi_k, drop), ref.gather_tokens(v_heads, drop), mem.h, mem.s)
    mem.folded += drop.shape[-1]
    return [ref.gather_tokens(x, keep) for x in (cand_k, cand_v, cand_pos)]


def attend_general(self, mem, q_pre, k_pre, v, pos0: int) -> torch.Tensor:
    """lola.LolaAttention._attend_general, recording the normaliser shares of the value tokens (same math)."""
    y = ORIGINAL_GENERAL(self, mem, q_pre, k_pre, v, pos0)
    if PROBE["attn"] is None or not mem.sparse_len:
        return y
    n = q_pre.shape[2]
    q_pos = torch.arange(pos0, pos0 + n)
    q_rot = self.rope.rotate(q_pre, q_pos).float()
    end = mem.window_len
    win_logits = lola.grouped_matmul(q_rot, mem.window_k_rot[:, :, :end].float().transpose(-1, -2)) * self.scale
    win_pos = torch.arange(mem.window_start, mem.window_start + end)
    win_logits = win_logits.masked_fill(~(win_pos.view(1, -1) <= q_pos.view(-1, 1)), float("-inf"))
    sparse = self._sparse_logits(mem, q_pre, q_rot, q_pos) * self.scale
    m = torch.maximum(win_logits.max(-1, keepdim=True).values, sparse.max(-1, keepdim=True).values)
    w_win, w_sparse = torch.exp(win_logits - m), torch.exp(sparse - m)
    group = q_pre.shape[1] // mem.sparse_pos.shape[1]
    spos = lola.expand_heads(mem.sparse_pos, group).unsqueeze(2)  # [B, H, 1, S]
    vpos = torch.tensor(PROBE["value_pos"])
    is_value = (spos.unsqueeze(-1) == vpos).any(-1)
    g = self.gamma.view(1, -1, 1, 1)
    phi_q = self.phi(q_pre, q_pos, self.adapter.phi_q)
    lin_den = torch.einsum("bhtf,bhf->bht", phi_q, mem.s).unsqueeze(-1) * (1 - g) * torch.exp(-m)
    value = g * (w_sparse * is_value).sum(-1, keepdim=True)
    soft = g * (w_win.sum(-1, keepdim=True) + w_sparse.sum(-1, keepdim=True))
    total = soft + lin_den
    # queries that predict the value tokens: the last prompt token and the value tokens but the last
    rows = slice(0, PROBE["attn"] - 1)
    share = torch.stack([(value / total)[0, :, rows, 0], ((soft - value) / total)[0, :, rows, 0],
                         (lin_den / total)[0, :, rows, 0]], dim=-1)  # [H, rows, 3]
    PROBE["shares"][PROBE["layer_of"].get(id(self), -1)] = share.mean(1)
    return y


ORIGINAL_GENERAL = lola.LolaAttention._attend_general


def value_positions(tokenizer, prompt) -> list[int]:
    """Positions of the needle line's tokens that carry the value's digits."""
    ids = prompt.ids[prompt.needle_token : prompt.needle_end]
    out = []
    for i, tok in enumerate(ids):
        piece = tokenizer.decode([tok])
        if any(ch.isdigit() for ch in piece):
            out.append(prompt.needle_token + i)
    return out


def region(pos: torch.Tensor, prompt) -> torch.Tensor:
    """0 template/instruction, 1 haystack before the needle, 2 needle line, 3 haystack after it."""
    r = torch.full_like(pos, 3)
    r[pos < prompt.needle_end] = 2
    r[pos < prompt.needle_token] = 1
    r[pos < prompt.context_start] = 0
    return r


@torch.inference_mode()
def q3(x: torch.Tensor) -> list[float]:
    return [round(float(v), 2) for v in x.quantile(torch.tensor([0.1, 0.5, 0.9]))] if x.numel() else []


def detail(memory, prompt, vpos: list[int]) -> list[str]:
    """Report lines: for each copy head, every competition the value tokens took part in (their scores,
    value norms and error / ‖v‖ against the kept other pairs' and the λ-th score), then what its slots hold
    at question time (by region, and how many distinct token ids its haystack slots hold)."""
    lines = []
    ids = torch.tensor(prompt.ids)
    values = torch.tensor(vpos)
    for layer, head in COPY_HEADS:
        for rec in PROBE["records"]:
            if rec["layer"] != layer:
                continue
            pos, sc, vn, keep = rec["pos"][head], rec["scores"][head], rec["vnorm"][head], rec["keep"][head]
            is_value = torch.isin(pos, values)
            if not is_value.any():
                continue
            kept = torch.zeros_like(pos, dtype=torch.bool)
            kept[keep] = True
            others = kept & ~is_value
            rel = sc / vn
            lam = keep.shape[0]
            lines.append(
                f"L{layer}H{head} eviction {rec['step']:2d} (state {rec['mass']:.0f} tokens): value scores "
                f"{[round(float(x), 2) for x in sc[is_value]]} kept {kept[is_value].int().tolist()} ‖v‖ "
                f"{[round(float(x), 1) for x in vn[is_value]]} err/‖v‖ {[round(float(x), 2) for x in rel[is_value]]}"
                f" | λ-th score {float(sc.sort(descending=True).values[lam - 1]):.2f}; kept others: score q10/50/90 "
                f"{q3(sc[others])} ‖v‖ {q3(vn[others])} err/‖v‖ {q3(rel[others])}")
        pos = memory.layers[layer].sparse_pos[0, head]
        reg = region(pos, prompt)
        hay = pos[(reg == 1) | (reg == 3)]
        lines.append(f"L{layer}H{head} at question time: slots template/before/needle/after "
                     f"{torch.bincount(reg, minlength=4).tolist()}; its {len(hay)} haystack slots hold "
                     f"{len(set(ids[hay].tolist()))} distinct token ids")
    return lines


def run_sample(engine, length, depth, index, knobs, seed=0, want_detail=False) -> dict:
    rng = sample_seed(seed, TASK, length, depth, index)
    prompt = build_prompt(engine.tokenizer, TASK, length, depth, rng)
    vpos = value_positions(engine.tokenizer, prompt)
    PROBE["value_pos"] = vpos
    protect = knobs.get("protect")
    PROBE["protect"] = None if protect is None else (
        (vpos[0], vpos[-1] + 1) if protect == "value" else (prompt.needle_token, prompt.needle_end))
    PROBE["records"] = []
    PROBE["attn"] = None
    t0 = time.time()
    memory = engine.new_memory()
    logits = engine.prefill(memory, prompt.ids)
    forced = copy.deepcopy(memory)
    extra = {"detail": detail(memory, prompt, vpos)} if want_detail else {}  # the cache at question time
    generated = []
    for token in engine.generate(memory, logits, 16, GREEDY):
        if token in engine.stop_ids:
            break
        generated.append(token)
    prediction = engine.tokenizer.decode(generated, skip_special_tokens=True)
    # teacher-forced log p of the value tokens (" " + value): the digits and what precedes them
    target = engine.tokenizer.encode(" " + prompt.value, add_special_tokens=False)
    PROBE["attn"] = len(target)
    PROBE["shares"] = {}
    ids = torch.tensor([target], dtype=torch.long)
    out = engine.model(ids, forced, all_logits=True)[0].float()
    lp_all = torch.cat([torch.log_softmax(logits.float().view(1, -1), -1),
                        torch.log_softmax(out[:-1], -1)])
    logp = float(lp_all.gather(1, ids.view(-1, 1)).sum().detach())
    PROBE["attn"] = None
    shares = {i: s for i, s in PROBE["shares"].items()}
    # which value tokens survive where
    layers = engine.model.model.layers
    kept = torch.zeros(len(layers), len(vpos), 9, dtype=torch.bool)
    for li, mem in enumerate(memory.layers):
        pos = mem.sparse_pos[0]  # [Hs, S]
        for j, p in enumerate(vpos):
            hit = (pos == p).any(-1)
            kept[li, j, : hit.shape[0]] = hit
    # drops of value tokens
    drops = []
    for rec in PROBE["records"]:
        pos, scores, keep = rec["pos"], rec["scores"], rec["keep"]
        hs, n = pos.shape
        kept_mask = torch.zeros(hs, n, dtype=torch.bool)
        kept_mask.scatter_(1, keep, True)
        lam = keep.shape[1]
        thresh = scores.sort(-1, descending=True).values[:, lam - 1]
        for h in range(hs):
            for p in vpos:
                where = (pos[h] == p).nonzero()
                if where.numel() and not kept_mask[h, where[0, 0]]:
                    i = int(where[0, 0])
                    comp = torch.bincount(region(pos[h][kept_mask[h]], prompt), minlength=4).tolist()
                    rank = int((scores[h] > scores[h, i]).sum()) + 1
                    new = pos[h] >= pos[h].max() - 63  # the chunk that just left the window
                    drops.append({"layer": rec["layer"], "head": h, "step": rec["step"], "pos": p,
                                  "token_step": p // 64, "score": round(float(scores[h, i]), 3),
                                  "threshold": round(float(thresh[h]), 3), "rank": rank, "kept_by_region": comp,
                                  "new_kept": int((new & kept_mask[h]).sum()), "state_mass": round(rec["mass"]),
                                  "chunk_start": int(pos[h].max()) - 63})
    return extra | {"length": length, "depth": depth, "index": index, "value": prompt.value, "prediction": prediction,
            "score": sample_score(prediction, prompt.references), "logp_value": round(logp, 3),
            "needle": [prompt.needle_token, prompt.needle_end], "context_start": prompt.context_start,
            "value_pos": vpos, "prompt_tokens": len(prompt.ids),
            "value_kept_share": round(float(kept.float().mean()), 4),
            "value_kept_by_token": [round(float(x), 3) for x in kept.float().mean((0, 2))],
            "value_kept_layer_head": kept.any(1).int().tolist(),  # [L, H]: any value token held
            "value_kept_all_layer_head": kept.all(1).int().tolist(),
            "drops": drops,
            "shares_value_soft_lin": {i: [[round(float(x), 4) for x in h] for h in s] for i, s in shares.items()},
            "seconds": round(time.time() - t0, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--length", default="2K")
    p.add_argument("--depths", default="0.25,0.5")
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--first", type=int, default=0)
    p.add_argument("--set", action="append", dest="settings", default=[])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="append one JSON line per sample")
    p.add_argument("--detail", action="store_true", help="print the copy heads' competitions and cache contents")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    lola.LolaAttention._compete = compete
    lola.LolaAttention._attend_general = attend_general
    engine = load(args.model, device="cpu", dtype="auto", window=64, sparse=256, selection="head", state_halflife=8192,
                  quant="auto")
    for i, block in enumerate(engine.model.model.layers):
        PROBE["layer_of"][id(block.self_attn.lola)] = i
    cfg = engine.model.lola_config
    length = parse_length(args.length)
    for name, cfg_over, knobs in [parse_setting(s, CFG_KEYS, KNOBS) for s in (args.settings or ["base"])]:
        saved = {k: getattr(cfg, k) for k in ("sparse", "selection", "state_halflife", "sinks", "chunk")}
        saved["score"] = getattr(cfg, "score", None)
        for key, value in cfg_over.items():
            setattr(cfg, "chunk" if key == "window" else key, value)
        for depth in (float(d) for d in args.depths.split(",")):
            for index in range(args.first, args.first + args.samples):
                row = run_sample(engine, length, depth, index, knobs, want_detail=args.detail) | {"setting": name}
                for line in row.pop("detail", []):
                    print(f"    {line}")
                drops = row["drops"]
                print(f"{name:>10} {length} d={depth:.2f} #{index}: {row['score']:.0f} {row['prediction'][:12]!r} "
                      f"(value {row['value']}) logp {row['logp_value']:7.2f} value kept "
                      f"{row['value_kept_share']:.2f} by digit {row['value_kept_by_token']} drops {len(drops)} "
                      f"({row['seconds']} s)", flush=True)
                if args.out:
                    with open(args.out, "a", encoding="utf-8") as f:
                        f.write(json.dumps(row) + "\n")
        for key, value in saved.items():
            if value is not None:
                setattr(cfg, key, value)


if __name__ == "__main__":
    main()
