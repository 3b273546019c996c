"""Modal screens of the chat TUI: sessions, rewind, settings, a text prompt and a confirmation."""

from __future__ import annotations

import time

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, OptionList, Static, TextArea
from textual.widgets.option_list import Option

from lolachat.conversation import Turn
from lolachat.errors import LolachatError
from lolachat.sessions_db import SessionsDB

MODAL_CSS = """
{name} {{
    align: center middle;
    background: $background 60%;
}}
{name} > Vertical {{
    width: 80%;
    max-width: 100;
    height: auto;
    max-height: 90%;
    border: thick $primary 60%;
    background: $surface;
    padding: 1 2;
}}
{name} .title {{ text-style: bold; margin-bottom: 1; }}
{name} .hint {{ color: $text-muted; margin-top: 1; }}
{name} OptionList {{ height: auto; max-height: 20; }}
{name} Horizontal {{ height: auto; margin-top: 1; }}
{name} Button {{ margin-right: 1; }}
"""


class TextPrompt(ModalScreen[str | None]):
    """Ask for one line of text (a name, a file path)."""

    DEFAULT_CSS = MODAL_CSS.format(name="TextPrompt")
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, value: str = "", placeholder: str = ""):
        super().__init__()
        self.title_text = title
        self.value = value
        self.placeholder = placeholder

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.title_text, classes="title", markup=False)
            yield Input(self.value, placeholder=self.placeholder, id="text")
            yield Label("Enter to accept, Esc to cancel", classes="hint")

    @on(Input.Submitted)
    def accept(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)

    def action_cancel(self) -> None:
        self.dismiss(None)


class Confirm(ModalScreen[bool]):
    DEFAULT_CSS = MODAL_CSS.format(name="Confirm")
    BINDINGS = [Binding("escape", "no", "No"), Binding("y", "yes", "Yes"), Binding("n", "no", "No")]

    def __init__(self, question: str):
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.question, classes="title", markup=False)
            with Horizontal():
                yield Button("Yes", id="yes", variant="error")
                yield Button("No", id="no", variant="primary")

    @on(Button.Pressed)
    def pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_yes(self) -> None:
        self.dismiss(True)

    def action_no(self) -> None:
        self.dismiss(False)


class SessionsScreen(ModalScreen[tuple[str, str | None] | None]):
    """The saved sessions: open (Enter), new, rename, delete. Dismisses with ("open", name),
    ("new", None) or None; renames and deletions happen here, in the database."""

    DEFAULT_CSS = MODAL_CSS.format(name="SessionsScreen")
    BINDINGS = [
        Binding("escape", "close", "Close"),
        Binding("n", "new", "New"),
        Binding("r", "rename", "Rename"),
        Binding("d", "delete", "Delete"),
    ]

    def __init__(self, db: SessionsDB, current: str | None):
        super().__init__()
        self.db = db
        self.current = current

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("Sessions", classes="title")
            yield OptionList(id="sessions")
            yield Label("Enter open · n new · r rename · d delete · Esc close", classes="hint")

    def on_mount(self) -> None:
        self.reload()

    def reload(self, highlight: str | None = None) -> None:
        options = self.query_one("#sessions", OptionList)
        options.clear_options()
        records = self.db.list()
        for r in records:
            turns = sum(1 for m in self.db.messages(r.id) if m["role"] == "user")
            mark = "● " if r.name == self.current else "  "
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.updated))
            label = Text(f"{mark}{r.name}  ·  {turns} turns  ·  {r.model or '-'}  ·  {when}")
            options.add_option(Option(label, id=r.name))
        names = [r.name for r in records]
        target = highlight or self.current
        if target in names:
            options.highlighted = names.index(target)
        elif names:
            options.highlighted = 0
        options.focus()

    def _selected(self) -> str | None:
        option = self.query_one("#sessions", OptionList).highlighted_option
        return option.id if option is not None else None

    @on(OptionList.OptionSelected)
    def open_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(("open", event.option.id))

    def action_close(self) -> None:
        self.dismiss(None)

    def action_new(self) -> None:
        self.dismiss(("new", None))

    def action_rename(self) -> None:
        name = self._selected()
        if name is None:
            return

        def done(new_name: str | None) -> None:
            if not new_name or new_name == name:
                return
            try:
                self.db.rename(self.db.get(name).id, new_name)
            except LolachatError as err:
                self.notify(str(err), severity="error")
                return
            if self.current == name:
                self.current = new_name
            self.reload(new_name)

        self.app.push_screen(TextPrompt(f"Rename session {name!r} to:", name), done)

    def action_delete(self) -> None:
        name = self._selected()
        if name is None:
            return

        def done(yes: bool | None) -> None:
            if yes:
                self.db.delete(self.db.get(name).id)
                self.reload()

        self.app.push_screen(Confirm(f"Delete session {name!r}, its transcript and its snapshots?"), done)


class RewindScreen(ModalScreen[int | None]):
    """Pick a turn to go back to; dismisses with the number of messages to keep."""

    DEFAULT_CSS = MODAL_CSS.format(name="RewindScreen")
    BINDINGS = [Binding("escape", "close", "Close")]

    def __init__(self, turns: list[Turn]):
        super().__init__()
        self.turns = turns

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("Rewind: go back to before a turn (later turns are deleted)", classes="title")
            options = []
            for t in self.turns:
                text = " ".join(t.user.split())
                text = text if len(text) <= 60 else text[:59] + "…"
                snap = "snapshot" if t.restorable else "re-read"
                options.append(Option(Text(f"{t.number:>3}. {text}   [{snap}]"), id=str(t.start)))
            yield OptionList(*options, id="turns")
            yield Label("[snapshot]: the state before this turn is restored instantly; "
                        "[re-read]: its snapshot was not kept, the transcript is read again", classes="hint",
                        markup=False)

    def on_mount(self) -> None:
        options = self.query_one("#turns", OptionList)
        if self.turns:
            options.highlighted = len(self.turns) - 1
        options.focus()

    @on(OptionList.OptionSelected)
    def chosen(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(int(event.option.id))

    def action_close(self) -> None:
        self.dismiss(None)


SAMPLING_FIELDS = (
    ("temperature", "temperature (0 = greedy)", float),
    ("top_k", "top-k (0 = off)", int),
    ("top_p", "top-p (1 = off)", float),
    ("max_new_tokens", "max new tokens", int),
)


class SettingsScreen(ModalScreen[dict | None]):
    """System prompt and sampling settings of the current session."""

    DEFAULT_CSS = MODAL_CSS.format(name="SettingsScreen") + """
    SettingsScreen TextArea { height: 6; }
    SettingsScreen Grid { grid-size: 2; grid-columns: 28 1fr; height: auto; grid-rows: 3; margin-top: 1; }
    SettingsScreen Grid Label { padding-top: 1; }
    """
    BINDINGS = [Binding("escape", "cancel", "Cancel"), Binding("ctrl+s", "save", "Save")]

    def __init__(self, system: str | None, sampling: dict):
        super().__init__()
        self.system = system or ""
        self.sampling = sampling

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("Session settings", classes="title")
            yield Label("System prompt (changing it makes the next turn re-read the conversation):")
            yield TextArea(self.system, id="system")
            with Grid():
                for key, label, _ in SAMPLING_FIELDS:
                    yield Label(label)
                    yield Input(str(self.sampling[key]), id=key)
            yield Static("", id="error", markup=False)
            with Horizontal():
                yield Button("Save", id="save", variant="primary")
                yield Button("Cancel", id="cancel")

    @on(Button.Pressed, "#save")
    def action_save(self) -> None:
        values = {}
        for key, label, kind in SAMPLING_FIELDS:
            raw = self.query_one(f"#{key}", Input).value.strip()
            try:
                values[key] = kind(raw)
            except ValueError:
                self.query_one("#error", Static).update(f"{label}: not a number: {raw!r}")
                return
        problem = check_sampling(values)
        if problem:
            self.query_one("#error", Static).update(problem)
            return
        values["system"] = self.query_one("#system", TextArea).text
        self.dismiss(values)

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)


def check_sampling(values: dict) -> str | None:
    if values["max_new_tokens"] < 1:
        return "max new tokens must be at least 1"
    if values["temperature"] < 0 or values["top_k"] < 0 or not 0 < values["top_p"] <= 1:
        return "need temperature >= 0, top-k >= 0 and 0 < top-p <= 1"
    return None
