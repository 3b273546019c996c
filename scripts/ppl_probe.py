"""Why are the same tokens predicted worse with more context? (issue 6, docs/quality.md §9)

Scores the same tokens (windows aligned as in `lolachat eval ppl --aligned`) at several context lengths and
under several settings, in one process, and reports per setting × context:
- perplexity of the last --tail tokens of each window;
- per layer, averaged over the scored queries and heads: the share of the attention output's normaliser that
  comes from the window, the sparse cache and the linear state (`--stats`);
- per layer, how far the hidden states of the scored tokens moved from those at the shortest context
  (‖h − h_short‖ / ‖h_short‖, `--stats`).

A setting is `name:key=value,...`. Keys of LolaConfig: sparse, selection, state_halflife, max_distance, sinks,
window (= chunk). Probe-only knobs that act where queries read the memory (the engine is patched here, never
on disk):
- lin_scale=A   the linear term times A (0 = no linear term: window + sparse cache only);
- lin_cap=M     the linear term times min(1, M / n), n the state's mass in tokens (Σ s / 2; each φ(k) sums to 2):
                the state is read as if it held at most M tokens, every folded token with the same weight;
- lin_layers=a-b  the knobs above act only on layers a..b (inclusive).
`exact` as a setting name runs the teacher (full KV cache).

    OMP_NUM_THREADS=1 nice -n 10 python scripts/ppl_probe.py --contexts 2K,8K --samples 2 --tail 256 \
        --set default --set "nolin:lin_scale=0" --stats --out /tmp/probe.json
"""

from __future__ import annotations

import argparse
import json
import math
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
from lolachat.evals.ppl import token_windows  # noqa: E402

CFG_KEYS = {"sparse": int, "selection": str, "state_halflife": int, "max_distance": int, "sinks": int, "window": int}
KNOBS = {"lin_scale": float, "lin_cap": float, "lin_layers": str}
BLOCK = 1024

PROBE: dict = {"knobs": {}, "layer": 0, "record": False, "stats": None}


def linear_factor(layer: int, s_state: torch.Tensor) -> torch.Tensor | float:
    knobs = PROBE["knobs"]
    if "lin_layers" in knobs:
        lo, _, hi = knobs["lin_layers"].partition("-")
        if not int(lo) <= layer <= int(hi or lo):
            return 1.0
    factor = knobs.get("lin_scale", 1.0)
    if "lin_cap" in knobs:
        mass = s_state.sum(-1) / 2  # [B, H]: tokens' worth of state
        cap = (knobs["lin_cap"] / mass.clamp_min(1e-9)).clamp(max=1.0)
        return factor * cap.view(*cap.shape, 1, 1)
    return factor


def attend_general(self, mem, q_pre, k_pre, v, pos0: int) -> torch.Tensor:
    """lola.LolaAttention._attend_general with the probe's knobs and statistics (the same math otherwise)."""
    n = q_pre.shape[2]
    device = q_pre.device
    q_pos = torch.arange(pos0, pos0 + n, device=device)
    end = mem.window_len + n
    mem.window_k[:, :, mem.window_len : end] = k_pre
    mem.window_v[:, :, mem.window_len : end] = v
    mem.window_k_rot[:, :, mem.window_len : end] = self.rope.rotate(k_pre, q_pos)
    mem.window_len = end
    q_rot = self.rope.rotate(q_pre, q_pos).float()
    win_pos = torch.arange(mem.window_start, mem.window_start + end, device=device)
    win_logits = lola.grouped_matmul(q_rot, mem.window_k_rot[:, :, :end].float().transpose(-1, -2)) * self.scale
    causal = win_pos.view(1, -1) <= q_pos.view(-1, 1)
    win_logits = win_logits.masked_fill(~causal, float("-inf"))
    m = win_logits.max(dim=-1, keepdim=True).values
    sparse = None
    if mem.sparse_len:
        sparse = self._sparse_logits(mem, q_pre, q_rot, q_pos) * self.scale
        m = torch.maximum(m, sparse.max(dim=-1, keepdim=True).values)
    w_win = torch.exp(win_logits - m)
    num = lola.grouped_matmul(w_win, mem.window_v[:, :, :end].float())
    den_win = w_win.sum(dim=-1, keepdim=True)
    den = den_win
    den_sparse = torch.zeros_like(den)
    if sparse is not None:
        w_sparse = torch.exp(sparse - m)
        num = num + lola.grouped_matmul(w_sparse, mem.sparse_v.float())
        den_sparse = w_sparse.sum(dim=-1, keepdim=True)
        den = den + den_sparse
    phi_q = self.phi(q_pre, q_pos, self.adapter.phi_q)
    layer = PROBE["layer"]
    factor = linear_factor(layer, mem.s)
    h_state, s_state = mem.h, mem.s
    if isinstance(factor, torch.Tensor):  # [B, H, 1, 1]
        h_state, s_state = mem.h * factor, mem.s * factor.squeeze(-1)
    elif factor != 1.0:
        h_state, s_state = mem.h * factor, mem.s * factor
    y = ref.mix_linear(num, den, m, phi_q, h_state, s_state, self.gamma, self.cfg.mix)
    if PROBE["record"]:
        g = self.gamma.view(1, -1, 1, 1)
        lin_den = torch.einsum("bhtf,bhf->bht", phi_q, s_state).unsqueeze(-1) * (1 - g) * torch.exp(-m)
        total = g * den + lin_den
        shares = torch.stack([(g * den_win / total).mean(), (g * den_sparse / total).mean(), (lin_den / total).mean()])
        stats = PROBE["stats"].setdefault(layer, torch.zeros(3, dtype=torch.float64))
        stats += shares.double() * n
        PROBE["stats_n"][layer] = PROBE["stats_n"].get(layer, 0) + n
    return y.to(q_pre.dtype)


def attend_within_chunk(self, mem, q_pre, k_pre, v, pos0: int) -> torch.Tensor:
    return attend_general(self, mem, q_pre, k_pre, v, pos0)


def install_hooks(model, hidden: dict) -> None:
    for i, block in enumerate(model.model.layers):
        def pre(_module, _args, i=i):
            PROBE["layer"] = i

        def post(_module, _args, out, i=i):
            if PROBE["record"]:
                hidden.setdefault(i, []).append(out[0].float().clone())
        block.register_forward_pre_hook(pre)
        block.register_forward_hook(post)


@torch.inference_mode()
def score_window(engine, window: list[int], tail: int, hidden: dict) -> float:
    """Summed NLL of the last `tail` tokens; the hidden states of the tail's queries land in `hidden`."""
    model = engine.model
    ids = torch.tensor(window, dtype=torch.long).view(1, -1)
    t = ids.shape[1]
    split = t - tail - 1  # positions split.. t-2 predict the scored tokens split+1 .. t-1
    memory = engine.new_memory()
    PROBE["record"] = False
    for start in range(0, split, BLOCK):
        model(ids[:, start : min(start + BLOCK, split)], memory)
    PROBE["record"] = True
    logits = model(ids[:, split : t - 1], memory, all_logits=True)[0]
    PROBE["record"] = False
    scores = torch.log_softmax(logits.float(), dim=-1)
    layers = [m for m in memory.layers if getattr(m, "sparse_len", 0)]
    if layers:  # how old the sparse cache's pairs are at the end of the window (tokens back), all layers
        ages = torch.cat([(t - m.sparse_pos).flatten().float() for m in layers])
        PROBE.setdefault("ages", []).append([round(float(x)) for x in ages.quantile(torch.tensor([0.1, 0.5, 0.9]))])
    return -float(scores.gather(1, ids[0, split + 1 :].view(-1, 1)).sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--file", default=".cache/distill/smollm2-corpus.heldout.txt")
    p.add_argument("--contexts", default="2K,8K")
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--tail", type=int, default=256)
    p.add_argument("--set", action="append", dest="settings", default=[], help="name:key=value,... (repeatable)")
    p.add_argument("--stats", action="store_true", help="per-layer shares and hidden-state drift")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quant", default="auto")
    p.add_argument("--out", help="append one JSON line per setting here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    contexts = sorted(parse_length(c) for c in args.contexts.split(","))
    settings = [parse_setting(s, CFG_KEYS, KNOBS) for s in (args.settings or ["default"])]

    lola.LolaAttention._attend_within_chunk = attend_within_chunk
    engines = {}
    text = Path(args.file).read_text(encoding="utf-8")
    ids = None
    for name, cfg_over, knobs in settings:
        exact = name == "exact"
        if exact not in engines:
            engines[exact] = load(args.model, device="cpu", sparse=None if exact else "auto", quant=args.quant)
            hidden: dict = {}
            install_hooks(engines[exact].model, hidden)
            engines[exact].probe_hidden = hidden
        engine = engines[exact]
        if ids is None:
            ids = engine.tokenizer.encode(text, add_special_tokens=False)
        cfg = engine.model.lola_config
        saved = None
        if cfg is not None:
            saved = {k: getattr(cfg, k) for k in ("sparse", "selection", "state_halflife", "max_distance", "sinks",
                                                  "chunk")}
            for key, value in cfg_over.items():
                setattr(cfg, "chunk" if key == "window" else key, value)
        PROBE["knobs"] = knobs
        row = {"setting": name, "cfg": cfg_over, "knobs": knobs, "tail": args.tail, "samples": args.samples,
               "contexts": {}}
        base_hidden = None
        for context in contexts:
            windows = token_windows(ids, context, args.samples, align_to=max(contexts))
            PROBE["stats"], PROBE["stats_n"], PROBE["ages"] = {}, {}, []
            hidden = engine.probe_hidden
            hidden.clear()
            t0 = time.time()
            nlls = [score_window(engine, w, args.tail, hidden) for w in windows]
            cell = {"ppl": round(math.exp(sum(nlls) / (args.tail * len(nlls))), 3),
                    "per_window": [round(math.exp(x / args.tail), 2) for x in nlls], "seconds": round(time.time() - t0)}
            if PROBE["ages"]:
                cell["sparse_age_q10_q50_q90"] = PROBE["ages"]
                print(f"{'':>24}sparse-cache age (tokens back) q10/q50/q90 per window: {PROBE['ages']}", flush=True)
            if args.stats:
                layers = {i: torch.cat(h, dim=0) for i, h in hidden.items()}
                if PROBE["stats"]:
                    cell["share_win_sparse_lin"] = {
                        i: [round(float(x), 3) for x in PROBE["stats"][i] / PROBE["stats_n"][i]]
                        for i in sorted(PROBE["stats"])}
                if base_hidden is None:
                    base_hidden = layers
                else:
                    cell["drift"] = {i: round(float((layers[i] - base_hidden[i]).norm() / base_hidden[i].norm()), 3)
                                     for i in sorted(layers)}
            row["contexts"][context] = cell
            print(f"{name:>16} {context:>6}: ppl {cell['ppl']:.3f} {cell['per_window']} ({cell['seconds']} s)",
                  flush=True)
            if "share_win_sparse_lin" in cell:
                shares = torch.tensor(list(cell["share_win_sparse_lin"].values()))
                print(f"{'':>24}mean share win/sparse/lin {[round(float(x), 3) for x in shares.mean(0)]}; "
                      f"lin by layer {[round(float(x), 2) for x in shares[:, 2]]}", flush=True)
            if "drift" in cell:
                print(f"{'':>24}drift by layer {list(cell['drift'].values())}", flush=True)
        if saved:
            for key, value in saved.items():
                setattr(cfg, key, value)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
