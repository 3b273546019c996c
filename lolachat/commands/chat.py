"""`lolachat chat [MODEL] [--session NAME]` (and plain `lolachat`): the chat TUI."""

from __future__ import annotations

import argparse
import sys

from lolachat.commands.options import add_engine_options, add_sampling_options, load_engine, sampling_kwargs
from lolachat.config import load_config
from lolachat.errors import BadInput


def register(sub) -> None:
    chat = sub.add_parser(
        "chat", help="the chat TUI (the default command)",
        description="Chat in the terminal, with a live memory panel and saved sessions. Without --session "
                    "it resumes the most recent session; --new starts a fresh one.")
    chat.add_argument("model", nargs="?", help="catalog alias, Hub repo id or local path "
                                               "(default: the session's model, else config model.default)")
    chat.add_argument("--session", "-s", help="open (or create) the session with this name")
    chat.add_argument("--new", action="store_true", help="start a new session")
    chat.add_argument("--system", help="system prompt for a new session")
    add_sampling_options(chat)
    add_engine_options(chat)
    chat.set_defaults(handler=chat_command)


def chat_command(args: argparse.Namespace) -> int:
    from lolachat import store
    from lolachat.sessions_db import SessionsDB

    config = load_config()
    sampling = sampling_kwargs(args, config)
    db = SessionsDB()
    session = None if args.new else args.session
    model = args.model
    if model is None and session:
        record = db.find(session)
        model = record.model if record and record.model else None
    model = model or config["model"]["default"]
    spec = store.parse_spec(model)
    if spec.kind == "unknown":
        raise BadInput(f"unknown model '{model}': not in the catalog, not a Hub repo id (org/name) "
                       "and not an existing path")
    if spec.kind == "path" and not spec.path.exists():
        raise BadInput(f"no such file or folder: {spec.path}")
    if not sys.stdin.isatty() or not sys.stdout.isatty():
        raise BadInput("the chat TUI needs a terminal; use `lolachat run MODEL \"prompt\"` in scripts and pipes")
    db.sweep(min_age=600)  # leftovers of crashed runs (not the files another running lolachat is writing)

    def loader(name: str | None, progress, notice):
        name = name or model
        store.resolve(name, progress=progress, notice=notice)  # pull first, reporting to the TUI
        return load_engine(name, args, config)

    from lolachat.tui import LolachatApp

    system = args.system or config["generation"]["system"] or None
    app = LolachatApp(model=model, loader=loader, db=db, session=args.session, new_session=args.new,
                      system=system, sampling=sampling, keep_snapshots=int(config["sessions"]["keep_snapshots"]))
    app.run()
    return 0
