"""The chat TUI (Textual): `LolachatApp` — conversation, live memory panel, sessions, models."""

from lolachat.tui.app import LolachatApp

__all__ = ["LolachatApp"]
