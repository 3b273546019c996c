"""Saved sessions (DESIGN §6): SQLite transcripts, a state snapshot per turn, resume without re-prefill,
refusal of mismatched snapshots, rewind, bounded snapshot disk use, crash safety and the CLI."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_chat_model import build, filler, load_engine

from lolachat import cli
from lolachat.conversation import Conversation
from lolachat.errors import BadInput
from lolachat.session import Session
from lolachat.sessions_db import SessionsDB, transcript_sha256


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models gain nothing from a second thread, and a busy CPU makes OpenMP spin.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build(tmp_path_factory.mktemp("tiny") / "tiny-chat")


@pytest.fixture(scope="module")
def engine(folder):
    return load_engine(folder)


@pytest.fixture
def db(tmp_path):
    return SessionsDB(tmp_path / "sessions")


def say(conv: Conversation, text: str, n: int = 6) -> str:
    return "".join(conv.send(text, max_new_tokens=n, temperature=0.0))


def next_logits(session: Session, text: str) -> torch.Tensor:
    """Logits after feeding the next user message (as the next chat() would), on this session's memory."""
    msgs = session.messages + [{"role": "user", "content": text}]
    rendered = session.engine.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith(session.consumed_text)
    ids = session.engine.tokenizer.encode(rendered[len(session.consumed_text):], add_special_tokens=False)
    return session.engine.prefill(session.memory, ids)


def test_each_turn_is_saved_with_a_snapshot(db, engine):
    conv = Conversation.open(db, engine, "a", system="Be brief.")
    assert conv.report.source == "new"
    say(conv, "Hello there")
    say(conv, "What is the capital of France?")
    assert db.messages(conv.id) == conv.messages
    assert [m["role"] for m in conv.messages] == ["system", "user", "assistant", "user", "assistant"]
    snaps = db.snapshots(conv.id)
    assert [s.messages for s in snaps] == [5, 3]
    assert snaps[0].tokens == conv.session.memory.position
    assert snaps[0].transcript_sha256 == transcript_sha256(conv.messages)
    assert snaps[0].weights_sha256 == engine.info.weights_sha256 and snaps[0].lola["window"] == 8
    assert all(s.path.is_file() and s.bytes == s.path.stat().st_size for s in snaps)
    meta = db.message_meta(conv.id)
    assert meta[-1]["turn"]["new_tokens"] == 6 and meta[-1]["turn"]["stopped_by"] == "max_new_tokens"


def test_resume_uses_the_snapshot_and_continues_like_an_unbroken_run(db, engine):
    conv = Conversation.open(db, engine, "a")
    say(conv, "Hello there")
    pieces = conv.send("Tell me a story about a cat", max_new_tokens=200, temperature=0.0)
    for _ in range(3):
        next(pieces)
    pieces.close()  # stopped mid-reply: the partial reply is saved with its state
    assert conv.session.last_turn.stopped_by == "interrupted"
    assert db.messages(conv.id) == conv.messages and conv.messages[-1]["role"] == "assistant"

    again = Conversation.open(db, engine, "a")
    assert again.report.source == "snapshot" and again.report.prefilled_tokens == 0
    assert again.report.refused == [] and "no re-prefill" in again.report.summary()
    assert again.messages == conv.messages
    assert again.session.memory.position == conv.session.memory.position
    a = next_logits(conv.session, "And then?")
    b = next_logits(again.session, "And then?")
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_snapshot_of_other_lola_settings_is_refused_and_the_transcript_reread(db, engine, folder):
    conv = Conversation.open(db, engine, "a")
    say(conv, "Hello there")
    say(conv, "How are you today?")
    other = load_engine(folder, window=4, sparse=8)
    reopened = Conversation.open(db, other, "a")
    report = reopened.report
    assert report.source == "transcript" and report.prefilled_tokens > 0
    assert "window=8" in report.refused[0] and "window=4" in report.refused[0] and "refused" in report.refused[0]
    assert report.summary().startswith("the snapshot of message 4 was made with")
    # the re-read state is the state a fresh session reaches over the same transcript
    fresh = other.session()
    fresh.messages = list(conv.messages)
    fresh.catch_up()
    torch.testing.assert_close(next_logits(reopened.session, "Why?"), next_logits(fresh, "Why?"))
    # a turn under the new settings is saved with a snapshot for them
    say(reopened, "Why?")
    assert db.snapshots(reopened.id)[0].lola["window"] == 4


def test_snapshot_of_other_weights_is_refused(db, engine, tmp_path):
    conv = Conversation.open(db, engine, "a")
    say(conv, "Hello there")
    other = load_engine(build(tmp_path / "other", seed=1))
    reopened = Conversation.open(db, other, "a")
    assert reopened.report.source == "transcript"
    assert "other model weights" in reopened.report.refused[0]


def test_snapshot_that_does_not_match_the_transcript_is_refused(db, engine):
    conv = Conversation.open(db, engine, "a")
    say(conv, "Hello there")
    with sqlite3.connect(db.path) as c:
        c.execute("UPDATE messages SET content='Goodbye' WHERE seq=0")
    reopened = Conversation.open(db, engine, "a")
    assert reopened.report.source == "transcript"
    assert "does not match the transcript" in reopened.report.refused[0]
    assert reopened.messages[0]["content"] == "Goodbye"


def test_keep_last_k_snapshots_and_rewind(db, engine):
    conv = Conversation.open(db, engine, "a", keep_snapshots=2)
    for i in range(4):
        say(conv, f"message number {i}")
    snaps = db.snapshots(conv.id)
    assert [s.messages for s in snaps] == [8, 6]
    assert sorted(p.name for p in db.snapshot_dir(conv.id).iterdir()) == sorted(s.path.name for s in snaps)
    turns = conv.turns()
    assert [(t.number, t.start, t.end, t.restorable) for t in turns] == [
        (1, 0, 2, True), (2, 2, 4, False), (3, 4, 6, False), (4, 6, 8, True)]

    report = conv.rewind(6)  # to the state after turn 3: its snapshot is kept
    assert report.source == "snapshot" and report.prefilled_tokens == 0
    assert len(db.messages(conv.id)) == 6 and [s.messages for s in db.snapshots(conv.id)] == [6]
    assert not snaps[0].path.exists()
    report = conv.rewind(2)  # the snapshot after turn 1 was pruned: the transcript is read again
    assert report.source == "transcript" and report.prefilled_tokens > 0
    assert conv.messages == db.messages(conv.id) and len(conv.messages) == 2
    with pytest.raises(BadInput):
        conv.rewind(1)  # not a turn boundary
    say(conv, "a new second turn")
    assert [m["role"] for m in db.messages(conv.id)] == ["user", "assistant"] * 2


def test_regenerate_and_edit_last(db, engine):
    conv = Conversation.open(db, engine, "a")
    say(conv, "Hello there")
    say(conv, "What is the capital of France?")
    before = list(conv.messages)
    again = "".join(conv.regenerate(max_new_tokens=6, temperature=0.0))
    assert conv.messages == before and again == before[-1]["content"]  # greedy: the same reply
    "".join(conv.edit_last("Paris or Rome?", max_new_tokens=6, temperature=0.0))
    assert conv.messages[:2] == before[:2]
    assert conv.messages[2]["content"] == "Paris or Rome?" and len(conv.messages) == 4
    assert db.messages(conv.id) == conv.messages
    assert [s.messages for s in db.snapshots(conv.id)] == [4, 2]


def test_system_prompt_change_rereads_the_history(db, engine):
    conv = Conversation.open(db, engine, "a")
    say(conv, "Hello there")
    conv.set_system("You are terse.")
    assert db.messages(conv.id)[0] == {"role": "system", "content": "You are terse."}
    assert db.snapshots(conv.id) == []
    say(conv, "Again")
    assert conv.session.last_turn.prompt_tokens > 10  # the whole history went through the model again
    reopened = Conversation.open(db, engine, "a")
    assert reopened.report.source == "snapshot" and reopened.messages == conv.messages
    conv.set_system(None)
    assert db.messages(conv.id)[0]["role"] == "user"


def test_exact_mode_keeps_only_the_latest_snapshot(db, folder):
    exact = load_engine(folder, mode="exact")
    conv = Conversation.open(db, exact, "a", keep_snapshots=8)
    say(conv, "Hello there")
    say(conv, "Again")
    assert [s.messages for s in db.snapshots(conv.id)] == [4]
    assert Conversation.open(db, exact, "a").report.source == "snapshot"


def test_sweep_removes_stray_and_temporary_files(db, engine):
    conv = Conversation.open(db, engine, "a")
    say(conv, "Hello there")
    d = db.snapshot_dir(conv.id)
    (d / ".00004-deadbeef.safetensors.x1.tmp").write_bytes(b"half")
    (d / "00009-orphan.safetensors").write_bytes(b"orphan")
    (db.snapshots_root / "999").mkdir()
    assert db.sweep(min_age=600) == 1  # fresh files may be another process's writes in flight
    assert db.sweep() == 2
    assert [p.name for p in d.iterdir()] == [db.snapshots(conv.id)[0].path.name]


def test_resume_time_does_not_grow_with_the_transcript(db, engine):
    """2K vs 20K tokens: reopening reads a snapshot of bounded size, never the transcript."""
    built = {}
    for name, words in (("short", 2_000), ("long", 20_000)):
        conv = Conversation.open(db, engine, name)
        say(conv, filler(words), n=2)
        built[name] = conv
    assert built["long"].session.memory.position >= 20_000
    sizes = {name: db.snapshots(c.id)[0].bytes for name, c in built.items()}

    def reopen(name: str) -> tuple[float, Conversation]:
        start = time.perf_counter()
        conv = Conversation.open(db, engine, name)
        return time.perf_counter() - start, conv

    times = {}
    for name in ("short", "long"):
        runs = [reopen(name) for _ in range(5)]
        times[name] = statistics.median(t for t, _ in runs)
        conv = runs[-1][1]
        assert conv.report.source == "snapshot" and conv.report.prefilled_tokens == 0
    # The snapshot's tensors are bounded; only the transcript text inside it grows.
    assert sizes["long"] < sizes["short"] + 400_000
    assert times["long"] <= 3 * times["short"] + 0.05, times
    # and it continues exactly like the unbroken run
    resumed = reopen("long")[1]
    torch.testing.assert_close(next_logits(resumed.session, "Summary?"),
                               next_logits(built["long"].session, "Summary?"), rtol=0, atol=1e-6)


CHILD = r"""
import sys, time, torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[4])
import lolachat.session as S
from tiny_chat_model import load_engine
from lolachat.sessions_db import SessionsDB
from lolachat.conversation import Conversation

folder, root, slow_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
engine = load_engine(folder)
db = SessionsDB(root)
conv = Conversation.open(db, engine, "crash", keep_snapshots=3)
real = S.save_file
def save_file(tensors, filename, metadata=None):
    real(tensors, filename, metadata=metadata)
    if len(conv.session.messages) == slow_at:
        print("WRITING", filename, flush=True)
        time.sleep(120)
S.save_file = save_file
print("READY", len(conv.messages), flush=True)
for i in range(10_000):
    "".join(conv.send(f"message {i} " + "about the cat " * (i % 5), max_new_tokens=5, temperature=0.0))
    print("TURN", len(conv.messages), flush=True)
"""


def _run_child(folder, root: Path, slow_at: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(folder), str(root), str(slow_at),
                             str(Path(__file__).parent)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})


def _wait_for(proc: subprocess.Popen, prefix: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"child ended before {prefix!r} (rc={proc.wait()})")
        if line.startswith(prefix):
            return line
    raise AssertionError(f"no {prefix!r} within {timeout} s")


def _check_consistent(root: Path, engine) -> list[dict]:
    db = SessionsDB(root)
    assert db._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    record = db.get("crash")
    messages = db.messages(record.id)
    assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
    for snap in db.snapshots(record.id):
        assert snap.path.is_file()
        assert snap.transcript_sha256 == transcript_sha256(messages[: snap.messages])
        assert transcript_sha256(Session.load(engine, snap.path).messages) == snap.transcript_sha256
    db.sweep()
    names = {s.path.name for s in db.snapshots(record.id)}
    assert {p.name for p in db.snapshot_dir(record.id).iterdir()} == names
    conv = Conversation.open(db, engine, "crash")
    assert conv.report.source == "snapshot" and not conv.report.refused and conv.report.prefilled_tokens == 0
    db.close()
    return messages


def test_sigkill_while_writing_a_snapshot_leaves_db_and_snapshots_consistent(tmp_path, folder, engine):
    root = tmp_path / "sessions"
    # 1) killed while the snapshot of turn 3 is being written (the file is complete, not yet renamed)
    proc = _run_child(folder, root, slow_at=6)
    try:
        written = _wait_for(proc, "WRITING").split()[1]
        assert Path(written).name.startswith(".") and Path(written).exists()  # the temporary file
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    messages = _check_consistent(root, engine)
    assert len(messages) == 4  # the turn in flight is lost, nothing else
    assert not Path(written).exists()  # swept

    # 2) killed at an arbitrary moment of a later turn (prefill, decode, write or commit)
    proc = _run_child(folder, root, slow_at=-1)
    try:
        _wait_for(proc, "READY")
        _wait_for(proc, "TURN")
        time.sleep(0.03)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert len(_check_consistent(root, engine)) >= 6


def test_sessions_command_line(tmp_path, monkeypatch, capsys, engine):
    monkeypatch.setenv("LOLACHAT_HOME", str(tmp_path / "home"))
    db = SessionsDB()
    conv = Conversation.open(db, engine, "trip plans", system="Be brief.")
    say(conv, "Hello there")
    Conversation.open(db, engine, "other")

    assert cli.main(["sessions", "list"]) == 0
    out = capsys.readouterr().out
    assert "trip plans" in out and "other" in out and "NAME" in out
    assert cli.main(["sessions", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {r["name"]: r["messages"] for r in listed} == {"trip plans": 3, "other": 0}
    assert listed[[r["name"] for r in listed].index("trip plans")]["snapshots"] == 1

    assert cli.main(["sessions", "show", "trip plans"]) == 0
    out = capsys.readouterr().out
    assert "[user]\nHello there" in out and "snapshot after message 3" in out
    assert cli.main(["sessions", "show", "trip plans", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["transcript"] == conv.messages

    assert cli.main(["sessions", "export", "trip plans"]) == 0
    md = capsys.readouterr().out
    assert md.startswith("# trip plans\n") and "## You\n\nHello there\n" in md and "## System" in md
    target = tmp_path / "out" / "trip.md"
    assert cli.main(["sessions", "export", "trip plans", "-o", str(target)]) == 0
    assert target.read_text() == md

    assert cli.main(["sessions", "show", "nope"]) == 1
    assert "no session named 'nope'" in capsys.readouterr().err
    assert cli.main(["sessions", "rm", "trip plans"]) == 1  # not a TTY: needs --yes
    assert "--yes" in capsys.readouterr().err
    assert cli.main(["sessions", "rm", "trip plans", "--yes"]) == 0
    assert db.find("trip plans") is None and not db.snapshot_dir(conv.id).exists()
