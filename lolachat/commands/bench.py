"""`lolachat bench`: prefill/decode tok/s and peak memory by context length, against peers (lolachat.bench)."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from lolachat.errors import BadInput


def register(sub) -> None:
    p = sub.add_parser(
        "bench", help="speed and memory by context length: LoLA vs exact vs transformers vs llama.cpp",
        description="Prefill and decode tokens/s and peak memory by context length for lolachat-LoLA, "
                    "lolachat-exact, transformers' LlamaForCausalLM (SDPA) and llama.cpp (llama-cpp-python, "
                    "when importable; same GGUF, same threads), plus the weights-only GEMV-chain rate "
                    "(the decode ceiling) measured in the same run. Writes JSON and a PNG plot.")
    p.add_argument("model", nargs="?", help="catalog alias, Hub repo id or local path (default: smollm2-135m)")
    p.add_argument("--shape", choices=["llama-3.1-8b", "smollm2-135m", "tiny"],
                   help="a random-weight model of this shape instead of a real one (speed does not depend "
                        "on the weights)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--dtype", help="auto, float32, bfloat16 or float16")
    p.add_argument("--quant", choices=["auto", "none", "int8", "int4"], default="auto",
                   help="our engines' linear-layer weights: int4, int8 or none; auto = int4 on the CPU "
                        "(transformers and llama.cpp keep their own)")
    p.add_argument("--lengths", help="context lengths, e.g. 1K,4K,8K,32K (default: CPU 1K,4K,8K,32K; "
                                     "GPU 1K..128K)")
    p.add_argument("--engines", default="lola,exact,transformers,llama.cpp",
                   help="comma-separated subset of lola,exact,transformers,llama.cpp")
    p.add_argument("--decode-tokens", type=int, default=64, help="tokens decoded per measurement")
    p.add_argument("--threads", type=int, help="CPU threads (torch and llama.cpp alike)")
    p.add_argument("--window", type=int, default=64, help="LoLA chunk size C")
    p.add_argument("--sparse", type=int, default=256, help="LoLA sparse-cache capacity λ")
    p.add_argument("--time-limit", type=float, help="seconds: lengths that would not finish in time are skipped")
    p.add_argument("--out", default=".", help="folder for bench_<model>.json and .png (default: here)")
    p.add_argument("--quick", action="store_true", help="tiny lengths and few tokens (a smoke test)")
    p.set_defaults(handler=bench_command)


def bench_command(args: argparse.Namespace) -> int:
    from lolachat.bench import ENGINES, BenchConfig, parse_lengths, run_bench, save, table

    warnings.filterwarnings("ignore", category=FutureWarning)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        raise BadInput(f"unknown engine(s) {', '.join(unknown)} (known: {', '.join(ENGINES)})")
    if args.model and args.shape:
        raise BadInput("give a model or --shape, not both")
    if args.decode_tokens < 1:
        raise BadInput("--decode-tokens must be at least 1")
    try:
        lengths = parse_lengths(args.lengths) if args.lengths else None
    except ValueError as err:
        raise BadInput(str(err)) from None
    deadline = time.monotonic() + args.time_limit if args.time_limit else None
    cfg = BenchConfig(model=args.model, shape=args.shape, device=args.device, dtype=args.dtype, lengths=lengths,
                      engines=engines, decode_tokens=args.decode_tokens, threads=args.threads, chunk=args.window,
                      sparse=args.sparse, quick=args.quick, deadline=deadline, quant=args.quant)
    result = run_bench(cfg, log=lambda line: print(line, file=sys.stderr, flush=True))
    json_path, png_path, notice = save(result, Path(args.out))
    print(table(result))
    print(f"\nJSON: {json_path}")
    print(f"plot: {png_path}" if png_path else f"plot: skipped ({notice})")
    return 0
