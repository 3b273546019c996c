"""A saved conversation: its SQLite transcript, its live `Session`, and a state snapshot per turn.

Opening resumes from the latest snapshot that matches the transcript, the model weights and the
LoLA settings — no re-prefill. A snapshot that does not match is refused with a reason, and the
transcript is read again instead (`ResumeReport` says which happened and how long it took).
Rewind, regenerate and edit-and-resend restore an earlier snapshot the same way.

Used by the TUI (from its worker threads, one operation at a time) and by the tests.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from lolachat.engine import Engine, ProgressFn
from lolachat.errors import BadInput, LolachatError
from lolachat.session import STATE_KEYS, Session
from lolachat.sessions_db import NewSnapshot, SessionRecord, SessionsDB, SnapshotRecord, transcript_sha256

LOLA_KEYS = tuple(k for k in STATE_KEYS if k != "weights_sha256")


def lola_key(engine: Engine) -> dict:
    """The settings (besides the weights) a saved state depends on."""
    info = engine.describe()
    return {k: info[k] for k in LOLA_KEYS}


@dataclass
class ResumeReport:
    """How a conversation's state was rebuilt."""

    seconds: float = 0.0
    source: str = "new"  # "new" (empty), "snapshot" (no re-prefill) or "transcript" (re-read)
    snapshot_messages: int = 0  # messages the snapshot used encodes
    messages: int = 0  # messages in the transcript
    prefilled_tokens: int = 0  # tokens read again from the transcript
    refused: list[str] = field(default_factory=list)  # why snapshots were not used

    def summary(self) -> str:
        ms = f"{self.seconds * 1000:.0f} ms"
        if self.source == "new":
            text = "new conversation"
        elif self.source == "snapshot" and not self.prefilled_tokens:
            text = f"resumed from the snapshot of message {self.snapshot_messages} in {ms} (no re-prefill)"
        elif self.source == "snapshot":
            text = (f"resumed from the snapshot of message {self.snapshot_messages}, then read "
                    f"{self.prefilled_tokens} tokens of transcript, in {ms}")
        else:
            text = f"re-read the transcript ({self.prefilled_tokens} tokens) in {ms}"
        if self.refused:
            text = self.refused[0] + "; " + text
        return text


@dataclass
class Turn:
    number: int  # 1-based
    start: int  # messages before the turn (rewinding to it keeps these)
    end: int  # messages after the turn
    user: str
    reply: str
    restorable: bool  # the state before this turn comes back without re-reading (snapshot kept, or empty)


class Conversation:
    def __init__(self, db: SessionsDB, engine: Engine, record: SessionRecord, session: Session,
                 keep_snapshots: int, report: ResumeReport):
        self.db = db
        self.engine = engine
        self.record = record
        self.session = session
        self.keep_snapshots = keep_snapshots
        self.report = report
        self.warnings: list[str] = []

    # -- opening ----------------------------------------------------------------------------------------
    @classmethod
    def open(cls, db: SessionsDB, engine: Engine, name: str | None = None, *, create: bool = True,
             system: str | None = None, keep_snapshots: int = 8, progress: ProgressFn | None = None,
             settings: dict | None = None) -> Conversation:
        """Open the session `name` (resuming its state), or create it (a fresh name if None)."""
        record = db.find(name) if name else None
        if record is None:
            if not create and name:
                raise BadInput(f"no session named {name!r} (see `lolachat sessions list`)")
            record = db.create(name, model=engine.info.model, settings=settings, system=system or None)
        session, report = restore(db, engine, record.id, db.messages(record.id), progress)
        db.touch(record.id)
        return cls(db, engine, db.by_id(record.id), session, keep_snapshots, report)

    @property
    def id(self) -> int:
        return self.record.id

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def messages(self) -> list[dict]:
        return self.session.messages

    def refresh(self) -> None:
        self.record = self.db.by_id(self.id)

    def rename(self, new_name: str) -> None:
        self.db.rename(self.id, new_name)
        self.refresh()

    def turns(self) -> list[Turn]:
        kept = {s.messages for s in self.db.snapshots(self.id)}
        out: list[Turn] = []
        msgs = self.messages
        for i, m in enumerate(msgs):
            if m["role"] != "user":
                continue
            end = i + 1
            while end < len(msgs) and msgs[end]["role"] != "user":
                end += 1
            reply = "".join(x["content"] for x in msgs[i + 1:end] if x["role"] == "assistant")
            empty = all(x["role"] == "system" for x in msgs[:i])
            out.append(Turn(len(out) + 1, i, end, m["content"], reply, i in kept or empty))
        return out

    # -- talking ----------------------------------------------------------------------------------------
    def send(self, text: str, **sampling) -> Iterator[str]:
        """Stream the reply to `text`. When the stream ends or is closed (stop), the turn — with the
        partial reply if stopped — is saved: messages, then a state snapshot. Nothing happens until
        the first piece is asked for."""
        start = len(self.session.messages)
        try:
            pieces = self.session.chat(text, **sampling)
        except BaseException:
            del self.session.messages[start:]
            raise
        ok = True
        try:
            yield from pieces
        except GeneratorExit:
            raise
        except BaseException:
            ok = False
            raise
        finally:
            pieces.close()
            if not ok:
                self._reload()
            elif len(self.session.messages) > start and self.session.messages[-1]["role"] == "assistant":
                self._commit(start)

    def _commit(self, start: int) -> None:
        session, engine = self.session, self.engine
        new = session.messages[start:]
        meta = [{"turn": session.last_turn.as_dict()} if m["role"] == "assistant" else {} for m in new]
        snapshot = None
        if self.keep_snapshots > 0:
            path = self.db.snapshot_path(self.id, session.messages)
            try:
                session.save(path)
                snapshot = NewSnapshot(path=path, model=engine.info.model, weights_sha256=engine.info.weights_sha256,
                                       lola=lola_key(engine), tokens=session.memory.position)
            except LolachatError as err:
                self.warnings.append(f"state snapshot not saved ({err}); the transcript is")
        self.db.add_turn(self.id, start, new, snapshot, meta)
        if self.record.model != engine.info.model:
            self.db.update(self.id, model=engine.info.model)
        self.db.prune(self.id, self.snapshots_to_keep())
        self.refresh()

    def snapshots_to_keep(self) -> int:
        """Exact attention has no bounded state: its snapshots grow with the conversation, so only the
        latest is kept; LoLA snapshots are small and the last K are kept."""
        return min(self.keep_snapshots, 1) if self.engine.info.mode == "exact" else self.keep_snapshots

    def _reload(self) -> None:
        """After a failed turn: the state may be half-updated; rebuild it from what is saved."""
        self.session, self.report = restore(self.db, self.engine, self.id, self.db.messages(self.id))

    # -- going back -------------------------------------------------------------------------------------
    def rewind(self, keep: int, progress: ProgressFn | None = None) -> ResumeReport:
        """Go back to the state after the first `keep` messages (a turn boundary), from its snapshot."""
        transcript = self.db.messages(self.id)
        if not 0 <= keep <= len(transcript):
            raise BadInput(f"cannot rewind to message {keep}: the conversation has {len(transcript)}")
        if keep < len(transcript) and transcript[keep]["role"] != "user":
            raise BadInput(f"message {keep} is not the start of a turn")
        session, report = restore(self.db, self.engine, self.id, transcript[:keep], progress)
        self.db.truncate(self.id, keep)
        self.session, self.report = session, report
        self.refresh()
        return report

    def last_user_message(self) -> tuple[int, str]:
        for i in range(len(self.messages) - 1, -1, -1):
            if self.messages[i]["role"] == "user":
                return i, self.messages[i]["content"]
        raise BadInput("there is no message to regenerate yet")

    def regenerate(self, **sampling) -> Iterator[str]:
        """Drop the last reply and answer the last message again."""
        index, text = self.last_user_message()
        self.rewind(index)
        return self.send(text, **sampling)

    def edit_last(self, text: str, **sampling) -> Iterator[str]:
        """Replace the last message (and its reply) with `text` and answer it."""
        if not text.strip():
            raise BadInput("the message is empty")
        index, _ = self.last_user_message()
        self.rewind(index)
        return self.send(text, **sampling)

    def set_system(self, system: str | None) -> None:
        """Change the system prompt. The whole history is read again on the next turn."""
        system = (system or "").strip() or None
        current = self.messages[0]["content"] if self.messages and self.messages[0]["role"] == "system" else None
        if system == current:
            return
        self.db.set_system(self.id, system)
        msgs = self.session.messages[1:] if current is not None else list(self.session.messages)
        if system:
            msgs.insert(0, {"role": "system", "content": system})
        self.session.messages = msgs
        self.session.system = system

    def export_markdown(self) -> str:
        return self.db.export_markdown(self.id)

    def stats(self) -> dict:
        return self.session.stats()


def _mismatch(snap: SnapshotRecord, engine: Engine, transcript: list[dict]) -> str | None:
    """Why a snapshot cannot be used for this engine and transcript, or None if it can."""
    where = f"the snapshot of message {snap.messages}"
    if snap.weights_sha256 != engine.info.weights_sha256:
        return (f"{where} was made with other model weights ({snap.model}), not {engine.info.model}: "
                "refused")
    current = lola_key(engine)
    diff = [k for k in LOLA_KEYS if snap.lola.get(k) != current.get(k)]
    if diff:
        saved = ", ".join(f"{k}={snap.lola.get(k)}" for k in diff)
        now = ", ".join(f"{k}={current.get(k)}" for k in diff)
        return f"{where} was made with {saved} but the engine runs {now}: refused"
    if snap.transcript_sha256 != transcript_sha256(transcript[: snap.messages]):
        return f"{where} does not match the transcript: refused"
    return None


def restore(db: SessionsDB, engine: Engine, sid: int, transcript: list[dict],
            progress: ProgressFn | None = None) -> tuple[Session, ResumeReport]:
    """A session holding `transcript`: from the latest usable snapshot, then the rest of the
    transcript read (prefilled) on top; from the transcript alone if no snapshot matches."""
    started = time.perf_counter()
    report = ResumeReport(messages=len(transcript))
    session = None
    for snap in db.snapshots(sid):
        if snap.messages > len(transcript):
            continue
        reason = _mismatch(snap, engine, transcript)
        if reason is None:
            try:
                candidate = Session.load(engine, snap.path)
            except LolachatError as err:
                reason = f"the snapshot of message {snap.messages} is unreadable ({err}): refused"
            else:
                if transcript_sha256(candidate.messages) == snap.transcript_sha256:
                    session = candidate
                    report.source, report.snapshot_messages = "snapshot", snap.messages
                    break
                reason = f"the snapshot of message {snap.messages} does not match its record: refused"
        report.refused.append(reason)
    if session is None:
        session = Session(engine)
        report.source = "transcript" if any(m["role"] != "system" for m in transcript) else "new"
    session.messages = [dict(m) for m in transcript]
    session.system = transcript[0]["content"] if transcript and transcript[0]["role"] == "system" else None
    if report.snapshot_messages < len(transcript):
        # The snapshot (if any) stops short of the transcript: read the rest. A snapshot of the whole
        # transcript is used as is; the template's text after the last reply is fed with the next message.
        report.prefilled_tokens = session.catch_up(progress)
    report.seconds = time.perf_counter() - started
    return session, report
