"""The `lolachat` command: parses arguments, dispatches to a command module, turns errors into one line."""

from __future__ import annotations

import argparse
import errno
import os
import sys

from lolachat.errors import LolachatError

EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    from lolachat.commands import generate, models

    parser = argparse.ArgumentParser(
        prog="lolachat",
        description="Local chat with bounded-memory LoLA attention. With no command: the chat TUI.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    generate.register(sub)
    models.register(sub)
    _register_optional(sub)
    return parser


def _register_optional(sub) -> None:
    """Command modules that land separately (TUI, sessions, bench, eval, distill) register if present."""
    import importlib

    for name in ("chat", "sessions", "bench", "evaluate", "distill"):
        try:
            module = importlib.import_module(f"lolachat.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"lolachat.commands.{name}":
                raise
            continue
        module.register(sub)


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = parser._subparsers._group_actions[0].choices
    if "chat" in commands and (not argv or (argv[0] not in commands and argv[0] not in ("-h", "--help"))):
        argv = ["chat", *argv]  # the TUI is the default command: `lolachat [MODEL] [--session NAME]`
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.handler(args) or 0
    except LolachatError as err:
        _error(str(err))
        return err.exit_code
    except KeyboardInterrupt:
        print("\nlolachat: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return 0
    except OSError as err:
        if err.errno == errno.ENOSPC:
            _error(f"disk full while writing {err.filename or 'a file'}; nothing already saved was changed")
            return 1
        raise


def _error(message: str) -> None:
    print(f"lolachat: error: {message}", file=sys.stderr)


def _silence_stdout() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


if __name__ == "__main__":
    sys.exit(main())
