"""The chat TUI: conversation with streamed Markdown, the live memory panel, saved sessions.

Everything slow (loading a model, resuming a session, generating, writing a snapshot) runs in
thread workers, one at a time; they report back with messages, so the screen stays live and Esc
stops a reply between two tokens. The stop closes the session's generator: the partial reply is
recorded, and the turn is saved like any other.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Header, Static

from lolachat.conversation import Conversation, ResumeReport
from lolachat.errors import LolachatError
from lolachat.persist import atomic_write
from lolachat.sessions_db import SessionsDB
from lolachat.tui.screens import RewindScreen, SessionsScreen, SettingsScreen, TextPrompt
from lolachat.tui.stats_panel import StatsPanel
from lolachat.tui.widgets import MessageView, PromptInput

# (model spec or None for the default, progress(label, done, total), notice(line)) -> Engine
EngineLoader = Callable[[str | None, Callable, Callable], object]
UI_INTERVAL = 0.05  # seconds between screen updates while a reply streams


def short_model_name(name: str) -> str:
    """A model as the header shows it: paths by their last component."""
    return Path(name).name if ("/" in name and Path(name).expanduser().exists()) else name


def _worker_thread_setup() -> None:
    """Per-thread CPU settings the engine's loader makes only on the thread that loads: the FTZ/DAZ
    flags (denormal floats make matmuls many times slower) live in each thread's FPU state."""
    import torch

    torch.set_flush_denormal(True)

DEFAULT_SAMPLING = {"temperature": 0.7, "top_k": 40, "top_p": 0.95, "max_new_tokens": 512, "seed": None}


# -- messages from the workers ----------------------------------------------------------------------------
class EngineLoaded(Message):
    def __init__(self, engine, error: str | None = None):
        super().__init__()
        self.engine, self.error = engine, error


class Status(Message):
    def __init__(self, text: str):
        super().__init__()
        self.text = text


class SessionOpened(Message):
    def __init__(self, conv: Conversation | None, error: str | None = None):
        super().__init__()
        self.conv, self.error = conv, error


class TurnStarted(Message):
    def __init__(self, text: str, history: list[dict] | None):
        super().__init__()
        self.text = text
        self.history = history  # the conversation before this turn, when it changed (regenerate, edit)


class ReplyDelta(Message):
    def __init__(self, text: str, stats: dict):
        super().__init__()
        self.text, self.stats = text, stats


class TurnDone(Message):
    def __init__(self, stats: dict | None, error: str | None = None, warnings: Iterable[str] = (),
                 unsent: str | None = None):
        super().__init__()
        self.stats, self.error, self.warnings = stats, error, list(warnings)
        self.unsent = unsent  # stopped before the reply began: the message, given back to the prompt


class StopRequested(Exception):
    """Raised from the prefill progress callback when Esc is pressed while a long message is read."""


class ChatScreen(Screen):
    """The main screen: conversation, status line, prompt, and the memory panel."""

    DEFAULT_CSS = """
    ChatScreen #main { height: 1fr; }
    ChatScreen #chat { width: 1fr; }
    ChatScreen #conversation { height: 1fr; padding: 0 0 0 1; }
    ChatScreen #status { height: auto; max-height: 3; padding: 0 1; color: $text-muted; }
    ChatScreen PromptInput { height: auto; min-height: 3; max-height: 10; border: round $accent 50%; }
    ChatScreen PromptInput:focus { border: round $accent; }
    ChatScreen .hint { color: $text-muted; padding: 1 2; }
    """
    BINDINGS = [
        Binding("escape", "app.stop", "Stop", priority=True),
        Binding("ctrl+r", "app.regenerate", "Regenerate"),
        Binding("ctrl+l", "app.edit_last", "Edit last"),
        Binding("ctrl+t", "app.rewind", "Rewind"),
        Binding("ctrl+n", "app.new_session", "New"),
        Binding("ctrl+o", "app.sessions", "Sessions"),
        Binding("ctrl+s", "app.export", "Export"),
        Binding("f2", "app.settings", "Settings"),
        Binding("f3", "app.models", "Models"),
        Binding("ctrl+b", "app.toggle_panel", "Panel"),
        Binding("ctrl+q", "app.quit", "Quit"),
    ]

    def __init__(self, mask: bool):
        super().__init__()
        self.mask = mask

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False)
        with Horizontal(id="main"):
            with Vertical(id="chat"):
                yield VerticalScroll(id="conversation")
                yield Static("", id="status", markup=False)
                yield PromptInput(id="prompt")
            yield StatsPanel(id="stats", mask=self.mask)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#conversation", VerticalScroll).anchor()
        prompt = self.query_one("#prompt", PromptInput)
        if self.mask:
            prompt.cursor_blink = False  # a blinking cursor would make screenshots differ
        prompt.focus()
        self.app.chat_ready()


class LolachatApp(App):
    TITLE = "lolachat"

    def __init__(self, *, engine=None, model: str | None = None, loader: EngineLoader | None = None,
                 db: SessionsDB | None = None, session: str | None = None, new_session: bool = False,
                 system: str | None = None, sampling: dict | None = None, keep_snapshots: int = 8,
                 mask_volatile: bool = False, export_dir: Path | None = None):
        super().__init__()
        self.engine = engine
        self.model_spec = model
        self.loader = loader
        self.db = db or SessionsDB()
        self.session_name = session
        self.new_session = new_session
        self.system = system
        self.default_sampling = {**DEFAULT_SAMPLING, **(sampling or {})}
        self.sampling = dict(self.default_sampling)
        self.keep_snapshots = keep_snapshots
        self.mask = mask_volatile
        self.export_dir = Path(export_dir) if export_dir else Path.cwd()
        self.conv: Conversation | None = None
        self.busy: str | None = None  # "load", "open", "reply", "rewind" while a worker runs
        self.editing = False
        self.stop_event = threading.Event()
        self.ui_interval = UI_INTERVAL
        self.deltas = 0  # screen updates of the reply being streamed (tests look at it)
        self.turns_done = 0  # turns finished (or failed) since start
        self.reply_view: MessageView | None = None
        self.pending_prompt: str | None = None
        self.status_text = ""

    def notify(self, message: str, *, title: str = "", severity="information", timeout: float | None = None,
               markup: bool = False) -> None:
        """Notifications carry user text and error messages: never interpret them as markup."""
        super().notify(message, title=title, severity=severity, timeout=timeout, markup=False)

    # -- layout ----------------------------------------------------------------------------------------------
    def get_default_screen(self) -> Screen:
        return ChatScreen(self.mask)

    @property
    def chat(self) -> ChatScreen:
        return self.screen_stack[0]

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "stop":
            return self.busy == "reply" or self.editing
        return True

    def query_chat(self, selector: str, kind=None):
        return self.chat.query_one(selector, kind) if kind else self.chat.query_one(selector)

    @property
    def panel(self) -> StatsPanel:
        return self.query_chat("#stats", StatsPanel)

    @property
    def prompt(self) -> PromptInput:
        return self.query_chat("#prompt", PromptInput)

    @property
    def conversation_view(self) -> VerticalScroll:
        return self.query_chat("#conversation", VerticalScroll)

    def set_status(self, text: str) -> None:
        self.status_text = text
        self.query_chat("#status", Static).update(text)

    def chat_ready(self) -> None:
        """The chat screen is mounted: restore the theme, then load the model and open a session."""
        theme = self.db.pref("theme")
        if theme and theme in self.available_themes:
            self.theme = theme
        self.theme_changed_signal.subscribe(self, lambda t: self.db.set_pref("theme", t.name))
        self.panel.show(None, None)
        if self.engine is None:
            self.start_load(self.model_spec, then_open=True)
        else:
            self.start_open(self.initial_session(), create=True)

    def initial_session(self) -> str | None:
        if self.session_name or self.new_session:
            return self.session_name
        recent = self.db.list()
        return recent[0].name if recent else None

    def set_busy(self, what: str | None) -> None:
        self.busy = what
        self.refresh_bindings()

    def refuse_if_busy(self) -> bool:
        if self.busy:
            what = {"reply": "still answering (Esc stops it)", "load": "loading a model",
                    "open": "opening a session", "rewind": "rewinding"}.get(self.busy, self.busy)
            self.notify(f"wait: {what}", severity="warning")
            return True
        if self.conv is None:
            self.notify("no session open yet", severity="warning")
            return True
        return False

    # -- model loading ---------------------------------------------------------------------------------------
    def start_load(self, spec: str | None, then_open: bool) -> None:
        if self.loader is None:
            self.set_status("no model loader configured")
            return
        self.set_busy("load")
        self.set_status(f"loading {spec or 'the default model'} …")
        self.load_worker(spec, then_open)

    @work(thread=True, group="llm", exit_on_error=False)
    def load_worker(self, spec: str | None, then_open: bool) -> None:
        last = [0.0]

        def progress(label: str, done: int, total: int | None) -> None:
            now = time.monotonic()
            if now - last[0] >= 0.2 or (total and done >= total):
                last[0] = now
                share = f" {100 * done / total:.0f}%" if total else ""
                self.post_message(Status(f"downloading {label}{share} ({done / 1e6:.1f} MB)"))

        try:
            engine = self.loader(spec, progress, lambda line: self.post_message(Status(line)))
        except LolachatError as err:
            self.post_message(EngineLoaded(None, str(err)))
            return
        except Exception as err:  # noqa: BLE001 - shown in the TUI rather than crashing it
            self.post_message(EngineLoaded(None, f"{type(err).__name__}: {err}"))
            return
        self.post_message(EngineLoaded(engine))
        if then_open:
            self._open(self.initial_session() if self.conv is None else self.conv.name, engine)

    def on_status(self, event: Status) -> None:
        self.set_status(event.text)

    def on_engine_loaded(self, event: EngineLoaded) -> None:
        if event.error:
            self.set_busy(None)
            self.set_status(f"could not load the model: {event.error}")
            self.notify(event.error, severity="error", timeout=10)
            return
        self.engine = event.engine
        self.set_status(f"loaded {self.engine.info.model}")

    def use_model(self, name: str) -> None:
        """Switch the chat to another model (the session's state is rebuilt for it)."""
        if self.busy:
            self.refuse_if_busy()
            return
        self.start_load(name, then_open=True)

    # -- sessions ----------------------------------------------------------------------------------------------
    def start_open(self, name: str | None, create: bool = True) -> None:
        if self.engine is None:
            self.notify("no model loaded", severity="error")
            return
        self.set_busy("open")
        self.set_status("opening session …")
        self.open_worker(name)

    @work(thread=True, group="llm", exit_on_error=False)
    def open_worker(self, name: str | None) -> None:
        self._open(name)

    def _open(self, name: str | None, engine=None) -> None:
        """In a worker: open (resume) or create a session, then report it."""
        _worker_thread_setup()
        try:
            conv = Conversation.open(self.db, engine or self.engine, name, system=self.system,
                                     keep_snapshots=self.keep_snapshots, settings=None)
        except LolachatError as err:
            self.post_message(SessionOpened(None, str(err)))
            return
        self.post_message(SessionOpened(conv))

    async def on_session_opened(self, event: SessionOpened) -> None:
        self.set_busy(None)
        if event.error:
            self.set_status(event.error)
            self.notify(event.error, severity="error")
            return
        conv = event.conv
        self.conv = conv
        self.sampling = {**self.default_sampling, **(conv.record.settings or {})}
        self.sub_title = f"{conv.name} · {short_model_name(self.engine.info.model)}"
        await self.rebuild_view()
        self.panel.history.clear()
        self.panel.show(conv.stats(), self.engine.describe())
        self.set_status(self.describe_resume(conv.report))
        if self.pending_prompt:
            self.prompt.load_text(self.pending_prompt)
            self.pending_prompt = None

    def describe_resume(self, report: ResumeReport) -> str:
        text = report.summary()
        if self.mask:
            text = re.sub(r"\d+ ms", "·· ms", text)
        return text

    async def rebuild_view(self, messages: list[dict] | None = None) -> None:
        """Show `messages` (default: the conversation's; a worker may be adding to those)."""
        view = self.conversation_view
        await view.remove_children()
        messages = self.conv.messages if messages is None else messages
        widgets = [MessageView(m["role"], m["content"]) for m in messages]
        if not widgets:
            widgets = [Static("Type a message and press Enter. Ctrl+J adds a line; Esc stops a reply; "
                              "Ctrl+P lists every command.", classes="hint", markup=False)]
        await view.mount_all(widgets)
        view.scroll_end(animate=False)

    # -- a turn --------------------------------------------------------------------------------------------------
    @on(PromptInput.Submitted)
    def submitted(self, event: PromptInput.Submitted) -> None:
        text = event.text
        if not text.strip():
            return
        if self.refuse_if_busy():
            return
        kind = "edit" if self.editing else "send"
        self.set_editing(False)
        self.prompt.clear()
        self.start_turn(kind, text)

    def start_turn(self, kind: str, text: str | None = None) -> None:
        self.stop_event.clear()
        self.set_busy("reply")
        self.set_status("thinking …")
        self.turn_worker(kind, text)

    @work(thread=True, group="llm", exit_on_error=False)
    def turn_worker(self, kind: str, text: str | None) -> None:
        _worker_thread_setup()
        conv = self.conv
        try:
            if kind == "regenerate":
                index, text = conv.last_user_message()
                conv.rewind(index)
            elif kind == "edit":
                index, _ = conv.last_user_message()
                conv.rewind(index)
            pieces = conv.send(text, progress=self._prefill_progress, **self.sampling)
        except LolachatError as err:
            self.post_message(TurnDone(None, str(err)))
            return
        self.post_message(TurnStarted(text, None if kind == "send" else [dict(m) for m in conv.messages]))
        self._stream(pieces, text)

    def _prefill_progress(self, done: int, total: int) -> None:
        """In the worker, between prefill blocks: report long reads, and honour Esc."""
        if self.stop_event.is_set():
            raise StopRequested()
        if done < total:
            self.post_message(Status(f"reading your message: {done:,} of {total:,} tokens …"))

    def _stream(self, pieces: Iterator[str], text: str) -> None:
        conv = self.conv
        buffer, last = "", 0.0
        try:
            for piece in pieces:
                buffer += piece
                if self.stop_event.is_set():
                    break
                now = time.monotonic()
                if now - last >= self.ui_interval:
                    self.post_message(ReplyDelta(buffer, conv.stats()))
                    buffer, last = "", now
            pieces.close()  # saves the turn (with the partial reply when stopped)
        except StopRequested:  # the conversation went back to its saved state
            self.post_message(TurnDone(conv.stats(), unsent=text))
            return
        except LolachatError as err:
            self.post_message(TurnDone(conv.stats(), str(err)))
            return
        except Exception as err:  # noqa: BLE001
            self.post_message(TurnDone(conv.stats(), f"{type(err).__name__}: {err}"))
            return
        if buffer:
            self.post_message(ReplyDelta(buffer, conv.stats()))
        warnings = list(conv.warnings)
        conv.warnings.clear()
        self.post_message(TurnDone(conv.stats(), None, warnings))

    async def on_turn_started(self, event: TurnStarted) -> None:
        if event.history is not None:
            await self.rebuild_view(event.history)
        view = self.conversation_view
        await view.query(".hint").remove()
        self.deltas = 0
        self.reply_view = MessageView("assistant")
        await view.mount_all([MessageView("user", event.text), self.reply_view])
        self.reply_view.start_stream()
        view.scroll_end(animate=False)

    async def on_reply_delta(self, event: ReplyDelta) -> None:
        self.deltas += 1
        if self.reply_view is not None:
            await self.reply_view.write(event.text)
        self.panel.show(event.stats, self.engine.describe())

    async def on_turn_done(self, event: TurnDone) -> None:
        self.set_busy(None)
        self.turns_done += 1
        turn = (event.stats or {}).get("last_turn", {})
        if self.reply_view is not None:
            stopped = turn.get("stopped_by")
            await self.reply_view.finish("stopped" if stopped == "interrupted" else None)
            self.reply_view = None
        if event.unsent is not None:
            await self.rebuild_view()
            self.panel.show(event.stats, self.engine.describe())
            self.prompt.load_text(event.unsent)
            self.set_status("stopped before the reply began: nothing was sent or saved")
            return
        if event.error:
            self.notify(event.error, severity="error", timeout=8)
            self.set_status(f"error: {event.error}")
            if self.conv is not None:
                await self.rebuild_view()
                self.panel.show(self.conv.stats(), self.engine.describe())
            return
        for warning in event.warnings:
            self.notify(warning, severity="warning", timeout=8)
        self.panel.history.add(event.stats)
        self.panel.show(event.stats, self.engine.describe())
        how = {"interrupted": "stopped", "end_of_turn": "done", "max_new_tokens": "max new tokens"}
        speed = "·· tok/s" if self.mask else f"{turn.get('decode_tok_s', 0):.1f} tok/s"
        self.set_status(f"{how.get(turn.get('stopped_by'), 'done')} · {turn.get('new_tokens', 0)} tokens · "
                        f"{speed} · saved")
        self.conversation_view.scroll_end(animate=False)

    # -- actions -------------------------------------------------------------------------------------------------
    def action_stop(self) -> None:
        if self.busy == "reply":
            self.stop_event.set()
            self.set_status("stopping …")
        elif self.editing:
            self.set_editing(False)
            self.prompt.clear()

    def action_regenerate(self) -> None:
        if self.refuse_if_busy():
            return
        if not any(m["role"] == "user" for m in self.conv.messages):
            self.notify("nothing to regenerate yet", severity="warning")
            return
        self.start_turn("regenerate")

    def set_editing(self, on: bool) -> None:
        self.editing = on
        self.prompt.border_title = "editing your last message — Enter resends it, Esc cancels" if on else None
        self.refresh_bindings()

    def action_edit_last(self) -> None:
        if self.refuse_if_busy():
            return
        try:
            _, text = self.conv.last_user_message()
        except LolachatError as err:
            self.notify(str(err), severity="warning")
            return
        self.prompt.load_text(text)
        self.prompt.focus()
        self.set_editing(True)

    def action_rewind(self) -> None:
        if self.refuse_if_busy():
            return
        turns = self.conv.turns()
        if not turns:
            self.notify("nothing to rewind yet", severity="warning")
            return

        def chosen(keep: int | None) -> None:
            if keep is not None:
                # the message of the turn taken back goes into the prompt, to edit and resend
                self.pending_prompt = self.conv.messages[keep]["content"]
                self.start_rewind(keep)

        self.push_screen(RewindScreen(turns), chosen)

    def start_rewind(self, keep: int) -> None:
        self.set_busy("rewind")
        self.set_status("rewinding …")
        self.rewind_worker(keep)

    @work(thread=True, group="llm", exit_on_error=False)
    def rewind_worker(self, keep: int) -> None:
        _worker_thread_setup()
        try:
            self.conv.rewind(keep)
        except LolachatError as err:
            self.post_message(SessionOpened(None, str(err)))
            return
        self.post_message(SessionOpened(self.conv))

    def action_new_session(self) -> None:
        if self.busy:
            self.refuse_if_busy()
            return
        self.start_open(None)

    def action_sessions(self) -> None:
        if self.busy:
            self.refuse_if_busy()
            return

        def chosen(result: tuple[str, str | None] | None) -> None:
            current_gone = self.conv is not None and self.db.find(self.conv.name) is None \
                and not any(r.id == self.conv.id for r in self.db.list())
            if result is None:
                if current_gone:
                    self.start_open(self.initial_session())
                elif self.conv is not None:
                    self.conv.refresh()
                    self.sub_title = f"{self.conv.name} · {short_model_name(self.engine.info.model)}"
                return
            action, name = result
            self.start_open(name if action == "open" else None)

        self.push_screen(SessionsScreen(self.db, self.conv.name if self.conv else None), chosen)

    def action_export(self) -> None:
        if self.conv is None:
            return
        slug = re.sub(r"[^\w.-]+", "-", self.conv.name).strip("-") or "chat"
        default = str(self.export_dir / f"{slug}.md")

        def chosen(path: str | None) -> None:
            if path:
                self.export_to(Path(path).expanduser())

        self.push_screen(TextPrompt("Export this conversation as Markdown to:", default), chosen)

    def export_to(self, path: Path) -> None:
        try:
            with atomic_write(path) as tmp:
                tmp.write_text(self.conv.export_markdown(), encoding="utf-8")
        except LolachatError as err:
            self.notify(str(err), severity="error")
            return
        self.notify(f"exported to {path}")
        self.set_status(f"exported to {path}")

    def action_settings(self) -> None:
        if self.refuse_if_busy():
            return
        msgs = self.conv.messages
        system = msgs[0]["content"] if msgs and msgs[0]["role"] == "system" else ""

        def chosen(values: dict | None) -> None:
            if values is None:
                return
            new_system = values.pop("system")
            try:
                self.conv.set_system(new_system)
            except LolachatError as err:
                self.notify(str(err), severity="error")
                return
            self.sampling.update(values)
            self.db.update(self.conv.id, settings=values)
            self.conv.refresh()
            self.call_after_refresh(self.rebuild_view)
            self.set_status("settings saved")

        self.push_screen(SettingsScreen(system, self.sampling), chosen)

    def action_models(self) -> None:
        from lolachat.tui.models_screen import ModelsScreen

        self.push_screen(ModelsScreen(self.engine.info.model if self.engine else None))

    def action_toggle_panel(self) -> None:
        self.panel.display = not self.panel.display

    async def action_quit(self) -> None:
        self.stop_event.set()  # a reply in flight stops at its next token and is saved
        deadline = time.monotonic() + 5
        while self.busy == "reply" and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self.exit()

    # -- command palette -----------------------------------------------------------------------------------------
    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("New chat", "Start a new session", self.action_new_session)
        yield SystemCommand("Sessions", "Open, rename or delete saved sessions", self.action_sessions)
        yield SystemCommand("Regenerate", "Answer the last message again", self.action_regenerate)
        yield SystemCommand("Edit last message", "Change your last message and resend it", self.action_edit_last)
        yield SystemCommand("Rewind", "Go back to an earlier turn (from its snapshot)", self.action_rewind)
        yield SystemCommand("Export as Markdown", "Write this conversation to a .md file", self.action_export)
        yield SystemCommand("Settings", "System prompt and sampling", self.action_settings)
        yield SystemCommand("Models", "Local models: pull, delete, set default, use", self.action_models)
        yield SystemCommand("Toggle memory panel", "Show or hide the side panel", self.action_toggle_panel)
        yield SystemCommand("Stop", "Stop the reply being generated", self.action_stop)
