"""The models screen: the local store seen through the TUI — list, pull with a live progress bar
(bytes, rate, ETA; cancel; an interrupted pull resumes on the next one), delete, set the default,
and use a model for the current chat."""

from __future__ import annotations

import threading
import time

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Button, DataTable, Footer, Header, Input, Label, ProgressBar, Static

from lolachat import store
from lolachat.errors import LolachatError
from lolachat.tui.screens import Confirm
from lolachat.tui.stats_panel import human_bytes


class PullCancelled(Exception):
    """Raised from the progress callback to stop a download; the partial file is kept for resuming."""


class PullProgress(Message):
    def __init__(self, label: str, done: int, total: int | None, rate: float):
        super().__init__()
        self.label, self.done, self.total, self.rate = label, done, total, rate


class PullFinished(Message):
    def __init__(self, spec: str, name: str | None, error: str | None, cancelled: bool = False):
        super().__init__()
        self.spec, self.name, self.error, self.cancelled = spec, name, error, cancelled


def describe_progress(label: str, done: int, total: int | None, rate: float) -> str:
    parts = [label, human_bytes(done) + (f" / {human_bytes(total)}" if total else "")]
    if rate > 0:
        parts.append(f"{human_bytes(rate)}/s")
        if total and done < total:
            parts.append(f"ETA {max(0, (total - done) / rate):.0f} s")
    return "  ·  ".join(parts)


class ModelsScreen(Screen):
    DEFAULT_CSS = """
    ModelsScreen > Vertical { padding: 1 2; }
    ModelsScreen DataTable { height: 1fr; min-height: 5; }
    ModelsScreen #pull-row { height: auto; margin-top: 1; }
    ModelsScreen #spec { width: 1fr; }
    ModelsScreen Button { margin-left: 1; }
    ModelsScreen ProgressBar { margin-top: 1; }
    ModelsScreen .title { text-style: bold; }
    ModelsScreen #pull-status { color: $text-muted; height: 2; }
    """
    BINDINGS = [
        Binding("escape", "back", "Back"),
        Binding("ctrl+u", "use", "Use for chat"),
        Binding("ctrl+d", "set_default", "Set default"),
        Binding("delete", "delete", "Delete"),
        Binding("ctrl+c", "cancel_pull", "Cancel pull", show=False),
    ]

    def __init__(self, current_model: str | None = None):
        super().__init__()
        self.current_model = current_model
        self.cancel = threading.Event()
        self.events: list[tuple[str, int, int | None]] = []  # pull progress seen (tests watch it)
        self.pulling: str | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical():
            yield Label("Local models", classes="title")
            yield DataTable(id="models", cursor_type="row", zebra_stripes=True)
            with Horizontal(id="pull-row"):
                yield Input(placeholder="catalog alias (smollm2-135m), Hub repo id (org/name) or local path",
                            id="spec")
                yield Button("Pull", id="pull", variant="primary")
                yield Button("Cancel", id="cancel", disabled=True)
            yield ProgressBar(id="bar", show_eta=False)
            yield Static("", id="pull-status", markup=False)
        yield Footer()

    def on_mount(self) -> None:
        self.title = "lolachat — models"
        table = self.query_one("#models", DataTable)
        table.add_columns("NAME", "SIZE", "ADAPTER", "SOURCE", "")
        self.reload()
        if not table.row_count:
            self.query_one("#pull-status", Static).update("no models yet: type a name below and press Pull")
        table.focus()

    def reload(self) -> None:
        from lolachat.config import load_config

        table = self.query_one("#models", DataTable)
        table.clear()
        try:
            default = load_config()["model"]["default"]
        except LolachatError:
            default = None
        for m in store.list_models():
            marks = []
            if m.name == default:
                marks.append("default")
            if m.name == self.current_model:
                marks.append("in use")
            adapter = "LoLA" if m.adapter else "none (exact)"
            cells = (m.name, human_bytes(m.size), adapter, m.source, ", ".join(marks))
            table.add_row(*(Text(c) for c in cells), key=m.name)

    def selected(self) -> str | None:
        table = self.query_one("#models", DataTable)
        if not table.row_count:
            return None
        return str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)

    # -- pulling ------------------------------------------------------------------------------------------
    @on(Input.Submitted, "#spec")
    @on(Button.Pressed, "#pull")
    def start_pull(self) -> None:
        spec = self.query_one("#spec", Input).value.strip()
        if not spec:
            self.notify("type a model name to pull", severity="warning")
            return
        if self.pulling:
            self.notify(f"already pulling {self.pulling}", severity="warning")
            return
        self.pulling = spec
        self.cancel.clear()
        self.events.clear()
        self.query_one("#cancel", Button).disabled = False
        self.query_one("#bar", ProgressBar).update(total=None, progress=0)
        self.query_one("#pull-status", Static).update(f"pulling {spec} …")
        self.pull(spec)

    @work(thread=True, exclusive=True, group="pull", exit_on_error=False)
    def pull(self, spec: str) -> None:
        started: dict[str, tuple[float, int]] = {}
        last = [0.0]

        def progress(label: str, done: int, total: int | None) -> None:
            if self.cancel.is_set():
                raise PullCancelled()
            now = time.monotonic()
            t0, d0 = started.setdefault(label, (now, done))
            rate = (done - d0) / (now - t0) if now > t0 else 0.0
            if now - last[0] >= 0.1 or (total is not None and done >= total):
                last[0] = now
                self.post_message(PullProgress(label, done, total, rate))

        try:
            model = store.pull(spec, progress=progress, notice=lambda msg: self.app.call_from_thread(
                self.notify, msg))
        except PullCancelled:
            self.post_message(PullFinished(spec, None, None, cancelled=True))
        except LolachatError as err:
            self.post_message(PullFinished(spec, None, str(err)))
        except Exception as err:  # noqa: BLE001 - shown in the TUI instead of crashing it
            self.post_message(PullFinished(spec, None, f"{type(err).__name__}: {err}"))
        else:
            self.post_message(PullFinished(spec, model.name, None))

    def on_pull_progress(self, event: PullProgress) -> None:
        self.events.append((event.label, event.done, event.total))
        self.query_one("#bar", ProgressBar).update(total=event.total, progress=event.done)
        self.query_one("#pull-status", Static).update(
            describe_progress(event.label, event.done, event.total, event.rate))

    def on_pull_finished(self, event: PullFinished) -> None:
        self.pulling = None
        self.query_one("#cancel", Button).disabled = True
        status = self.query_one("#pull-status", Static)
        if event.cancelled:
            status.update(f"pull of {event.spec} cancelled; pull it again to resume where it stopped")
        elif event.error:
            status.update(f"pull of {event.spec} failed: {event.error}")
            self.notify(event.error, severity="error", timeout=8)
        else:
            status.update(f"pulled {event.name}")
            self.notify(f"pulled {event.name}")
        self.reload()

    @on(Button.Pressed, "#cancel")
    def action_cancel_pull(self) -> None:
        if self.pulling:
            self.cancel.set()

    # -- other actions --------------------------------------------------------------------------------------
    def action_back(self) -> None:
        self.app.pop_screen()

    @on(DataTable.RowSelected)
    def action_use(self) -> None:
        name = self.selected()
        if name is None:
            return
        self.app.pop_screen()
        self.app.use_model(name)

    def action_set_default(self) -> None:
        from lolachat.tui.config_file import set_default_model

        name = self.selected()
        if name is None:
            return
        try:
            path = set_default_model(name)
        except LolachatError as err:
            self.notify(str(err), severity="error")
            return
        self.notify(f"default model: {name} (in {path})")
        self.reload()

    def action_delete(self) -> None:
        name = self.selected()
        if name is None:
            return

        def done(yes: bool | None) -> None:
            if not yes:
                return
            try:
                removed = store.remove(name)
            except LolachatError as err:
                self.notify(str(err), severity="error")
                return
            self.notify(f"removed {removed.name}, freed {human_bytes(removed.freed_bytes)}")
            self.reload()

        self.app.push_screen(Confirm(f"Delete {name} from the local store?"), done)
