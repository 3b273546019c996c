"""`lolachat run MODEL "prompt"` and `lolachat ask --file F "question"`."""

from __future__ import annotations

import argparse
import sys

from lolachat.commands.display import notice, print_json, token_progress
from lolachat.commands.options import (
    add_engine_options,
    add_sampling_options,
    load_engine,
    mode_notice,
    sampling_kwargs,
)
from lolachat.config import load_config
from lolachat.documents import read_document
from lolachat.errors import BadInput
from lolachat.resources import MemoryTrace, peak_rss_bytes


def register(sub) -> None:
    run = sub.add_parser("run", help="one-shot: stream a reply to a prompt (no TUI)",
                         description="Stream a reply to one prompt. Pulls the model first if it is missing.")
    run.add_argument("model", help="catalog alias, Hub repo id or local path")
    run.add_argument("prompt", nargs="?", help="the prompt; '-' or omitted reads stdin")
    run.add_argument("--system", help="system prompt")
    run.add_argument("--json", action="store_true", help="print the reply and stats as JSON")
    run.add_argument("--verbose", action="store_true", help="print speed and memory stats on stderr")
    add_sampling_options(run)
    add_engine_options(run)
    run.set_defaults(handler=run_command)

    ask = sub.add_parser("ask", help="answer a question about a text file of any length",
                         description="Stream a text file through the model's bounded memory, then answer.")
    ask.add_argument("question")
    ask.add_argument("--file", "-f", required=True, help="the text file")
    ask.add_argument("--model", "-m", help="model (default: config model.default)")
    ask.add_argument("--json", action="store_true", help="print answer, token counts, speeds and memory as JSON")
    add_sampling_options(ask, greedy_default=True)
    add_engine_options(ask)
    ask.set_defaults(handler=ask_command)


def _prompt_text(args) -> str:
    prompt = args.prompt
    if prompt in (None, "-"):
        if sys.stdin.isatty():
            raise BadInput("no prompt given (pass it as an argument or on stdin)")
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise BadInput("the prompt is empty")
    return prompt


def _stream_to_stdout(pieces, echo: bool) -> str:
    text = []
    for piece in pieces:
        text.append(piece)
        if echo:
            sys.stdout.write(piece)
            sys.stdout.flush()
    if echo:
        sys.stdout.write("\n")
    return "".join(text)


def _load(model, args, config):
    from lolachat.commands.display import byte_progress

    with byte_progress() as progress:
        engine = load_engine(model, args, config, progress=progress)
    message = mode_notice(engine)
    if message:
        notice(message)
    return engine


def run_command(args: argparse.Namespace) -> int:
    config = load_config()
    prompt = _prompt_text(args)
    gen = sampling_kwargs(args, config)
    engine = _load(args.model, args, config)
    session = engine.session(system=args.system or config["generation"]["system"] or None)
    reply = _stream_to_stdout(session.chat(prompt, **gen), echo=not args.json)
    stats = session.stats()
    if args.json:
        print_json({"reply": reply, "engine": engine.describe(), "stats": stats})
    elif args.verbose:
        turn = stats["last_turn"]
        notice(f"prompt {turn['prompt_tokens']} tok at {turn['prefill_tok_s']:.1f} tok/s, "
               f"reply {turn['new_tokens']} tok at {turn['decode_tok_s']:.1f} tok/s, "
               f"cache {stats['cache_bytes'] / 2**20:.1f} MiB")
    return 0


def ask_command(args: argparse.Namespace) -> int:
    config = load_config()
    if not args.question.strip():
        raise BadInput("the question is empty")
    document = read_document(args.file)
    if document.replaced_bytes:
        notice(f"note: {document.replaced_bytes} bytes of {document.path} were not valid UTF-8 "
               "and were replaced with U+FFFD")
    gen = sampling_kwargs(args, config, greedy_default=True)
    engine = _load(args.model, args, config)
    session = engine.session()
    trace = MemoryTrace(session)
    with token_progress("reading") as bar:
        def progress(done: int, total: int) -> None:
            bar(done, total)
            trace.sample()

        pieces = session.ask(document.text, args.question, progress=progress, **gen)
        first = next(pieces, "")  # the prefill runs before the first piece arrives
    answer = _stream_to_stdout(_chain(first, pieces), echo=not args.json)
    if args.json:
        stats = session.stats()
        turn = stats.pop("last_turn")
        print_json({
            "answer": answer,
            "question": args.question,
            "file": str(document.path),
            "engine": engine.describe(),
            "prompt_tokens": turn["prompt_tokens"],
            "new_tokens": turn["new_tokens"],
            "prefill_tok_s": turn["prefill_tok_s"],
            "decode_tok_s": turn["decode_tok_s"],
            "stopped_by": turn["stopped_by"],
            "memory": stats,
            "memory_trace": trace.samples,
            "peak_rss_bytes": peak_rss_bytes(),
        })
    return 0


def _chain(first: str, rest):
    if first:
        yield first
    yield from rest
