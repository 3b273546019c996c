"""`lolachat pull | list | show | rm`: the local model store."""

from __future__ import annotations

import argparse
import sys
import time

from lolachat import store
from lolachat.commands.display import byte_progress, print_json
from lolachat.errors import BadInput


def register(sub) -> None:
    pull = sub.add_parser("pull", help="download a model (catalog alias, Hub repo id, or local path to import)")
    pull.add_argument("model")
    pull.add_argument("--json", action="store_true")
    pull.set_defaults(handler=pull_command)

    ls = sub.add_parser("list", aliases=["ls"], help="models in the local store")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(handler=list_command)

    show = sub.add_parser("show", help="architecture, LoLA settings and memory estimates of a model")
    show.add_argument("model")
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=show_command)

    rm = sub.add_parser("rm", help="delete a model from the store")
    rm.add_argument("model")
    rm.add_argument("--yes", "-y", action="store_true", help="do not ask")
    rm.add_argument("--json", action="store_true")
    rm.set_defaults(handler=rm_command)


def pull_command(args: argparse.Namespace) -> int:
    with byte_progress() as progress:
        model = store.pull(args.model, progress=progress)
    if args.json:
        print_json(model.to_json())
    else:
        adapter = "LoLA adapter" if model.adapter else "no adapter (exact attention)"
        print(f"{model.name}: {model.weights} ({human_bytes(model.size)}, {model.source}, {adapter})")
    return 0


def list_command(args: argparse.Namespace) -> int:
    models = store.list_models()
    if args.json:
        print_json([m.to_json() for m in models])
        return 0
    if not models:
        print("no models yet: try `lolachat pull smollm2-135m`")
        return 0
    rows = [("NAME", "SIZE", "ADAPTER", "SOURCE", "REVISION", "PULLED")]
    for m in models:
        pulled = time.strftime("%Y-%m-%d %H:%M", time.localtime(m.pulled_at)) if m.pulled_at else "-"
        rows.append((m.name, human_bytes(m.size), "yes" if m.adapter else "no", m.source,
                     (m.revision or "-")[:12], pulled))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    return 0


def show_command(args: argparse.Namespace) -> int:
    from lolachat.model_report import describe_model

    report = describe_model(args.model)
    if args.json:
        print_json(report)
        return 0
    for key, value in report.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k}: {v}")
        else:
            print(f"{key}: {value}")
    return 0


def rm_command(args: argparse.Namespace) -> int:
    model = store.find(args.model)
    if model is None:
        raise BadInput(f"{args.model} is not in the local store (see `lolachat list`)")
    if not args.yes:
        if not sys.stdin.isatty():
            raise BadInput(f"refusing to delete {model.name} without confirmation: pass --yes")
        answer = input(f"delete {model.name} ({human_bytes(model.size)})? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("kept")
            return 1
    removed = store.remove(args.model)
    if args.json:
        print_json({"name": removed.name, "source": removed.source, "freed_bytes": removed.freed_bytes})
    else:
        print(f"removed {removed.name}, freed {human_bytes(removed.freed_bytes)}")
    return 0


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"
