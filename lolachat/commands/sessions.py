"""`lolachat sessions [list|show|rm|export]`: saved conversations (transcripts and state snapshots)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from lolachat.commands.display import print_json
from lolachat.errors import BadInput


def register(sub) -> None:
    sessions = sub.add_parser("sessions", help="saved conversations: list, show, rm, export",
                              description="Saved chat sessions (transcripts in SQLite, a LoLA state snapshot "
                                          "per turn). With no subcommand: list.")
    sessions.add_argument("--json", action="store_true", help="print as JSON")
    actions = sessions.add_subparsers(dest="action", metavar="ACTION")

    ls = actions.add_parser("list", aliases=["ls"], help="sessions, most recent first")
    ls.add_argument("--json", action="store_true", default=argparse.SUPPRESS)

    show = actions.add_parser("show", help="a session's transcript and snapshots")
    show.add_argument("name")
    show.add_argument("--json", action="store_true", default=argparse.SUPPRESS)

    rm = actions.add_parser("rm", help="delete a session, its transcript and its snapshots")
    rm.add_argument("name")
    rm.add_argument("--yes", "-y", action="store_true", help="do not ask")
    rm.add_argument("--json", action="store_true", default=argparse.SUPPRESS)

    export = actions.add_parser("export", help="a session as Markdown (stdout, or --output FILE)")
    export.add_argument("name")
    export.add_argument("--output", "-o", help="write to this file (atomically) instead of stdout")
    export.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="the transcript as JSON instead of Markdown")
    sessions.set_defaults(handler=sessions_command)


def sessions_command(args: argparse.Namespace) -> int:
    from lolachat.sessions_db import SessionsDB

    db = SessionsDB()
    action = args.action or "list"
    handler = {"list": _list, "ls": _list, "show": _show, "rm": _rm, "export": _export}[action]
    return handler(db, args)


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def _list(db, args) -> int:
    records = db.list()
    if args.json:
        print_json([r.to_json() for r in records])
        return 0
    if not records:
        print("no saved sessions yet: `lolachat` starts one")
        return 0
    from lolachat.commands.models import human_bytes

    rows = [("NAME", "MESSAGES", "MODEL", "SNAPSHOTS", "UPDATED")]
    for r in records:
        rows.append((r.name, str(r.message_count), r.model or "-",
                     f"{r.snapshot_count} ({human_bytes(r.snapshot_bytes)})", _when(r.updated)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def _show(db, args) -> int:
    record = db.get(args.name)
    messages = db.messages(record.id)
    snapshots = db.snapshots(record.id)
    if args.json:
        print_json({**record.to_json(), "transcript": messages, "snapshot_files": [s.to_json() for s in snapshots]})
        return 0
    from lolachat.commands.models import human_bytes

    print(f"session: {record.name}")
    print(f"model: {record.model or '-'}")
    print(f"created: {_when(record.created)}   updated: {_when(record.updated)}")
    print(f"messages: {len(messages)}")
    for s in snapshots:
        print(f"snapshot after message {s.messages}: {s.tokens} tokens, {human_bytes(s.bytes)}, "
              f"{s.lola.get('mode')}, {s.path}")
    print()
    for m in messages:
        print(f"[{m['role']}]")
        print(m["content"].rstrip())
        print()
    return 0


def _rm(db, args) -> int:
    record = db.get(args.name)
    if not args.yes:
        if not sys.stdin.isatty():
            raise BadInput(f"refusing to delete session {record.name!r} without confirmation: pass --yes")
        answer = input(f"delete session {record.name!r} ({record.message_count} messages)? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("kept")
            return 1
    db.delete(record.id)
    if args.json:
        print_json({"removed": record.name, "messages": record.message_count,
                    "snapshot_bytes": record.snapshot_bytes})
    else:
        print(f"removed session {record.name}")
    return 0


def _export(db, args) -> int:
    record = db.get(args.name)
    if args.json:
        import json

        text = json.dumps({"name": record.name, "model": record.model, "messages": db.messages(record.id)},
                          indent=2, ensure_ascii=False) + "\n"
    else:
        text = db.export_markdown(record.id)
    if args.output:
        from lolachat.persist import atomic_write

        path = Path(args.output).expanduser()
        with atomic_write(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
        print(f"exported {record.name} to {path}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
