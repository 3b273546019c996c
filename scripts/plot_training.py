#!/usr/bin/env python3
"""Plot an adapter's training curves from its own metadata (DESIGN §4.5 keeps them in the file).

    python3 scripts/plot_training.py models/smollm2-135m.lola.safetensors docs/runs/train-curve.png

Left: stage 1 attention-transfer loss (MSE × 1000, mean of the last steps logged) with the sequence
length phases marked; right: stage 2 next-token cross-entropy. Dashed lines: the held-out values the
training recorded (stage 1 MSE before and after; stage 2 and the teacher's cross-entropy).
"""

from __future__ import annotations

import argparse
import json
import sys

from safetensors import safe_open


def read_metadata(path: str) -> dict:
    with safe_open(path, framework="pt") as f:
        return json.loads((f.metadata() or {}).get("lolachat", "{}"))


def plot(meta: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves, evals, recipe = meta.get("curves", {}), meta.get("eval", {}), meta.get("recipe", {})
    fig, (one, two) = plt.subplots(1, 2, figsize=(11, 4))
    stage1 = curves.get("stage1_mse", [])
    if stage1:
        one.plot(*zip(*stage1), label="train (logged)")
        steps = recipe.get("stage1", {}).get("steps", stage1[-1][0])
        lengths = recipe.get("stage1", {}).get("seq_lens", [])
        for i, length in enumerate(lengths):
            one.axvline(i * steps / len(lengths), color="grey", lw=0.5)
            one.text(i * steps / len(lengths), one.get_ylim()[1] * 0.95, f" {length}", fontsize=8, va="top")
    for key, label, color in (("stage1_valid_mse_init", "held-out, untrained", "C1"),
                              ("stage1_valid_mse", "held-out, trained", "C2")):
        if key in evals:
            one.axhline(evals[key], ls="--", lw=1, color=color, label=f"{label} {evals[key]:.2f}")
    one.set(title="stage 1: attention transfer", xlabel="step", ylabel="MSE × 1000", yscale="log")
    one.legend(fontsize=8)
    stage2 = curves.get("stage2_xent", [])
    if stage2:
        two.plot(*zip(*stage2), label="train (logged)")
    for key, label, color in (("stage2_valid_xent", "held-out, student", "C2"),
                              ("teacher_valid_xent", "held-out, teacher", "C3")):
        if key in evals:
            two.axhline(evals[key], ls="--", lw=1, color=color, label=f"{label} {evals[key]:.3f}")
    two.set(title="stage 2: LoRA with LoLA in the loop", xlabel="step", ylabel="cross-entropy (nats)")
    two.legend(fontsize=8)
    fig.suptitle(meta.get("base_model", "adapter"), fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("adapter")
    p.add_argument("out")
    args = p.parse_args(argv)
    meta = read_metadata(args.adapter)
    if not meta.get("curves"):
        print(f"{args.adapter} records no training curves", file=sys.stderr)
        return 1
    plot(meta, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
