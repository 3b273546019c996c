"""Chat widgets: a message (Markdown, streamed by deltas) and the multi-line prompt."""

from __future__ import annotations

from textual import events
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Markdown, TextArea
from textual.widgets.markdown import MarkdownStream

ROLE_TITLES = {"user": "You", "assistant": "Assistant", "system": "System prompt"}


class MessageView(Vertical):
    """One message of the conversation. Assistant replies are streamed: `start_stream()` then
    `write()` appends deltas (the Markdown widget parses only what changed), `finish()` flushes."""

    DEFAULT_CSS = """
    MessageView {
        height: auto;
        margin: 0 1 1 0;
        padding: 0 1;
        border: round $primary 40%;
        border-title-color: $text-muted;
    }
    MessageView.user { border: round $accent 60%; }
    MessageView.system { border: round $warning 40%; }
    MessageView.interrupted { border-subtitle-color: $warning; }
    MessageView Markdown { margin: 0; padding: 0; }
    MessageView Markdown > * { margin: 0 0 1 0; }
    MessageView Markdown > *:last-child { margin: 0; }
    """

    def __init__(self, role: str, content: str = "", **kwargs):
        super().__init__(classes=role, **kwargs)
        self.role = role
        self.content = content
        self.border_title = ROLE_TITLES.get(role, role)
        self._stream: MarkdownStream | None = None

    def compose(self):
        yield Markdown(self.content)

    @property
    def markdown(self) -> Markdown:
        return self.query_one(Markdown)

    def start_stream(self) -> None:
        self._stream = Markdown.get_stream(self.markdown)

    async def write(self, delta: str) -> None:
        self.content += delta
        if self._stream is None:
            self.start_stream()
        await self._stream.write(delta)

    async def finish(self, note: str | None = None) -> None:
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        if note:
            self.border_subtitle = note
            self.add_class("interrupted")


class PromptInput(TextArea):
    """Multi-line input: Enter sends; Ctrl+J (or Shift/Alt+Enter where the terminal reports them)
    inserts a new line; pasted text keeps its lines."""

    BINDINGS = [Binding("ctrl+j", "newline", "New line", show=False)]

    class Submitted(Message):
        def __init__(self, prompt: PromptInput, text: str):
            super().__init__()
            self.prompt = prompt
            self.text = text

    def __init__(self, **kwargs):
        super().__init__(soft_wrap=True, show_line_numbers=False, tab_behavior="focus", **kwargs)

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.post_message(self.Submitted(self, self.text))
            return
        if event.key in ("shift+enter", "alt+enter", "ctrl+j"):
            event.stop()
            event.prevent_default()
            self.action_newline()
            return
        await super()._on_key(event)

    def action_newline(self) -> None:
        self.insert("\n")
