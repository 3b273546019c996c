"""Which attention heads of the teacher copy the needle? (issue 6; docs/quality.md §15)

Runs `niah_single_1` prompts (the same generator and seeds as `lolachat eval passkey`) through the exact model
(softmax attention, no LoLA), then feeds the true answer (" " + value) teacher-forced and records, for every layer
and query head, the share of its attention that the answer's queries put on the needle's value tokens. Heads that
read the value from the context score near 1, the rest near 0: the "retrieval heads" of Wu et al. 2024
(arXiv 2404.15574), a few percent of all heads. Prints the heads ranked, and the heads whose mean share passes
`--threshold` as the option `lolachat eval … --retrieval-heads` takes them.

    nice -n 10 python scripts/retrieval_heads.py --lengths 1K,2K --depths 0.1,0.3,0.5,0.7,0.9 --samples 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from needle_probe import value_positions  # noqa: E402
from probe_settings import parse_length  # noqa: E402

from lolachat import model as model_module  # noqa: E402
from lolachat.engine import load  # noqa: E402
from lolachat.evals.niah import build_prompt  # noqa: E402
from lolachat.evals.passkey import sample_seed  # noqa: E402
from lolachat.lola import head_names  # noqa: E402

TASK = "niah_single_1"
RECORD: dict = {"on": False, "layer_of": {}, "value_pos": [], "shares": {}}
ORIGINAL_EXACT_ATTEND = model_module.exact_attend


def exact_attend(mem, q_rot, k_rot, v, scale):
    """lola.exact_attend, recording each query head's attention share on the value positions."""
    y = ORIGINAL_EXACT_ATTEND(mem, q_rot, k_rot, v, scale)
    if RECORD["on"]:
        keys = mem.k[:, :, : mem.length].float()
        group = q_rot.shape[1] // keys.shape[1]
        logits = torch.einsum("bhtd,bhnd->bhtn", q_rot.float(), keys.repeat_interleave(group, dim=1)) * scale
        t = q_rot.shape[2]
        k_pos = torch.arange(mem.length)
        q_pos = torch.arange(mem.length - t, mem.length)
        logits = logits.masked_fill(k_pos.view(1, -1) > q_pos.view(-1, 1), float("-inf"))
        weights = torch.softmax(logits, dim=-1)[0]  # [H, T, N]
        share = weights[:, :, RECORD["value_pos"]].sum(-1)  # [H, T]
        # the queries that predict a value token: every forced token but the last
        RECORD["shares"][RECORD["layer_of"][id(mem)]] = share[:, :-1].mean(-1)
    return y


def head_shares(engine, length: int, depth: float, index: int, seed: int = 0) -> torch.Tensor:
    """[layers, heads] share of attention on the value, one sample."""
    prompt = build_prompt(engine.tokenizer, TASK, length, depth, sample_seed(seed, TASK, length, depth, index))
    memory = engine.new_memory()
    engine.prefill(memory, prompt.ids)
    RECORD["layer_of"] = {id(m): i for i, m in enumerate(memory.layers)}
    RECORD["value_pos"] = value_positions(engine.tokenizer, prompt)
    target = engine.tokenizer.encode(" " + prompt.value, add_special_tokens=False)
    RECORD["on"], RECORD["shares"] = True, {}
    with torch.inference_mode():  # as the engine's prefill, which made the cache
        engine.model(torch.tensor([target]), memory)
    RECORD["on"] = False
    return torch.stack([RECORD["shares"][i] for i in range(len(memory.layers))])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--lengths", default="1K,2K")
    p.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    p.add_argument("--samples", type=int, default=2, help="per length and depth")
    p.add_argument("--threshold", type=float, default=0.3, help="mean share that makes a retrieval head")
    p.add_argument("--top", type=int, default=20, help="heads to print")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="write the mean shares and the chosen heads as JSON")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model_module.exact_attend = exact_attend
    engine = load(args.model, device="cpu", dtype="float32", sparse=None)
    runs = [(parse_length(n), float(d), i) for n in args.lengths.split(",") for d in args.depths.split(",")
            for i in range(args.samples)]
    shares = torch.stack([head_shares(engine, *run) for run in runs]).mean(0)  # [layers, heads]
    n_heads = shares.shape[1]
    order = shares.flatten().argsort(descending=True)
    for rank, flat in enumerate(order[: args.top].tolist()):
        layer, head = divmod(flat, n_heads)
        print(f"{rank + 1:3d}. L{layer}H{head}: {shares[layer, head]:.3f}")
    chosen = [divmod(f, n_heads) for f in order.tolist() if shares.flatten()[f] >= args.threshold]
    names = head_names(sorted(chosen))
    print(f"{len(runs)} samples; {len(names)} of {shares.numel()} heads at share >= {args.threshold}:")
    print("--retrieval-heads " + ",".join(names))
    if args.out:
        Path(args.out).write_text(json.dumps({"lengths": args.lengths, "depths": args.depths,
                                              "samples": len(runs), "threshold": args.threshold,
                                              "retrieval_heads": names,
                                              "shares": [[round(float(x), 4) for x in row] for row in shares]},
                                             indent=1) + "\n")


if __name__ == "__main__":
    main()
