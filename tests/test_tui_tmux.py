"""End to end in a real terminal: tmux starts plain `lolachat` (the TUI is the default command) over a
tiny local model named in the config file, a question is typed, and the answer and the memory panel
are read back with capture-pane. Skipped where tmux is not installed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from tiny_chat_model import build

from lolachat.sessions_db import SessionsDB

TMUX = shutil.which("tmux")
LOLACHAT = Path(sys.executable).with_name("lolachat")

pytestmark = [
    pytest.mark.skipif(TMUX is None, reason="tmux is not installed"),
    pytest.mark.skipif(not LOLACHAT.exists(), reason="the lolachat entry point is not installed"),
]


class Tmux:
    """One private tmux server (its own socket), so nothing else the user runs is touched."""

    def __init__(self, width: int = 120, height: int = 36):
        self.socket = f"lolachat-test-{uuid.uuid4().hex[:8]}"
        self.width, self.height = width, height

    def __call__(self, *args: str) -> str:
        out = subprocess.run([TMUX, "-L", self.socket, *args], capture_output=True, text=True, timeout=20)
        return out.stdout

    def start(self, command: str, env: dict[str, str]) -> None:
        exports = " ".join(f"{k}={shlex_quote(v)}" for k, v in env.items())
        self("new-session", "-d", "-s", "main", "-x", str(self.width), "-y", str(self.height),
             f"env -i {exports} {command}; echo EXITED $?; sleep 30")

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "main")

    def wait_for(self, pattern: str, timeout: float = 90) -> str:
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen()
            if re.search(pattern, screen):
                return screen
            time.sleep(0.2)
        raise AssertionError(f"{pattern!r} did not appear; the screen was:\n{screen}")

    def stop(self) -> None:
        self("kill-server")


def shlex_quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def test_plain_lolachat_in_tmux(tmp_path):
    folder = build(tmp_path / "tiny-chat")
    home = tmp_path / "home"
    config = tmp_path / "lolachat.toml"
    config.write_text(f'[model]\ndefault = "{folder}"\n\n[runtime]\ndevice = "cpu"\ndtype = "float32"\n'
                      'threads = 1\n\n[generation]\nmax_new_tokens = 12\ntemperature = 0.0\n')
    # a clean environment (env -i): no COLUMNS/LINES inherited from the test runner
    env = {"LOLACHAT_HOME": str(home), "LOLACHAT_CONFIG": str(config), "TERM": "xterm-256color",
           "COLORTERM": "truecolor", "PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    tmux = Tmux()
    try:
        tmux.start(str(LOLACHAT), env)
        screen = tmux.wait_for(r"new conversation", timeout=180)  # the model is loaded, a session open
        assert "lolachat" in screen and "chat 1" in screen
        tmux("send-keys", "-t", "main", "-l", "What is the capital of France?")
        tmux("send-keys", "-t", "main", "Enter")
        screen = tmux.wait_for(r"12 tokens · .* · saved")  # the turn is done and saved
        assert "What is the capital of France?" in screen
        assert "You" in screen and "Assistant" in screen
        # the side panel: exact attention (the tiny model has no adapter) and why, with live numbers
        assert "MEMORY · exact attention" in screen and "no LoLA adapter" in screen
        tokens = int(re.search(r"tokens seen\s+([\d,]+)", screen).group(1).replace(",", ""))
        assert tokens > 12
        assert re.search(r"KV cache\s+[\d.]+ KiB", screen) and re.search(r"decode\s+[\d.,]+ tok/s", screen)
        tmux("send-keys", "-t", "main", "C-q")
        tmux.wait_for(r"EXITED 0", timeout=30)
    finally:
        tmux.stop()
    db = SessionsDB(home / "sessions")
    record = db.get("chat 1")
    messages = db.messages(record.id)
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[0]["content"] == "What is the capital of France?"
    assert messages[1]["content"] and re.sub(r"\s+", " ", messages[1]["content"]).strip()[:10] in \
        re.sub(r"\s+", " ", screen)
    assert len(db.snapshots(record.id)) == 1 and record.model == str(folder)
