"""The chat TUI driven by Textual's Pilot with a tiny model: real user flows, the memory panel against
the engine's own numbers, the models screen against the Hub imitation, and snapshot tests."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from hub_imitation import isolated_home, serve_hub, tiny_llama_repo
from rich.text import Text
from textual.app import App, ComposeResult
from tiny_chat_model import build, filler, load_engine

from lolachat import cli, store
from lolachat.config import load_config
from lolachat.conversation import Conversation
from lolachat.sessions_db import SessionsDB
from lolachat.tui import LolachatApp
from lolachat.tui.models_screen import ModelsScreen
from lolachat.tui.screens import RewindScreen, SessionsScreen, SettingsScreen, TextPrompt
from lolachat.tui.stats_panel import StatsPanel, eviction_policy, render_stats
from lolachat.tui.widgets import MessageView

SIZE = (120, 40)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
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


@pytest.fixture(scope="module")
def exact_engine(folder):
    return load_engine(folder, mode="exact")


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.delenv("LOLACHAT_CONFIG", raising=False)
    return isolated_home(tmp_path, monkeypatch)


def make_app(engine, tmp_path, **kw) -> LolachatApp:
    kw.setdefault("sampling", {"temperature": 0.0, "max_new_tokens": 8})
    return LolachatApp(engine=engine, db=SessionsDB(tmp_path / "sessions"), mask_volatile=True,
                       export_dir=tmp_path / "exports", **kw)


async def wait_until(pilot, predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the app")
        await pilot.pause(0.01)
    await pilot.pause()


async def idle(pilot) -> None:
    """Until no worker runs and the app has handled what they reported."""
    app = pilot.app
    await wait_until(pilot, lambda: app.busy is None and app.conv is not None)


async def send(pilot, text: str, type_it: bool = False) -> None:
    if type_it:
        await pilot.press(*text)
    else:
        pilot.app.prompt.load_text(text)  # typing every key costs a pilot pause each
    await turn(pilot, "enter")


async def turn(pilot, *keys: str) -> None:
    """Press keys that start a turn, and wait until it is done."""
    app = pilot.app
    before = app.turns_done
    await pilot.press(*keys)
    await wait_until(pilot, lambda: app.turns_done > before)
    await idle(pilot)


def panel_value(shown: str, label: str) -> str:
    """The last word of the panel line that starts with `label`."""
    line = next(x for x in shown.splitlines() if x.strip().startswith(label))
    return line.split()[-1]


def roles(app: LolachatApp) -> list[str]:
    return [v.role for v in app.conversation_view.query(MessageView)]


def run(coro) -> None:
    asyncio.run(coro)


def test_send_streams_the_reply_and_the_panel_shows_the_engine_stats(engine, tmp_path):
    async def scenario():
        app = make_app(engine, tmp_path, sampling={"temperature": 0.0, "max_new_tokens": 40})
        async with app.run_test(size=SIZE) as pilot:
            await idle(pilot)
            assert app.conv.name == "chat 1" and app.status_text == "new conversation"
            app.ui_interval = 0  # one screen update per piece
            await send(pilot, "Hello there", type_it=True)
            assert roles(app) == ["user", "assistant"]
            reply = app.conv.messages[-1]["content"]
            view = app.conversation_view.query(MessageView).last()
            assert reply and view.content == reply and view.markdown.source == reply
            assert app.deltas > 3  # it arrived piece by piece
            stats = app.conv.session.stats()
            assert app.panel.stats == stats  # the panel shows the engine's numbers, as they are
            shown = app.panel.content.plain
            assert panel_value(shown, "tokens seen") == f"{stats['tokens_seen']:,}"
            assert panel_value(shown, "window") == f"{stats['window_tokens']}/16"
            assert panel_value(shown, "sparse") == f"{stats['sparse_tokens']}/16"
            assert panel_value(shown, "evictions/turn") == str(stats["last_turn"]["evictions"])
            assert panel_value(shown, "folded tok") == f"{stats['linear_tokens']:,}"
            ratio = stats["cache_bytes"] / stats["full_kv_bytes"]
            assert panel_value(shown, "cache/full KV") == f"{ratio:.2f}×"
            assert panel_value(shown, "eviction ") == "error"  # the policy row, not "evictions/turn"
            assert app.status_text.startswith("max new tokens · 40 tokens")
            db = app.db
            assert db.messages(app.conv.id) == app.conv.messages and len(db.snapshots(app.conv.id)) == 1
    run(scenario())


def test_panel_names_the_eviction_policy():
    assert eviction_policy({"score": "others", "recent_slots": 128, "score_halflife": 0}) == "others · 128 recent"
    aged = {"score": "others", "recent_slots": 0, "score_halflife": 16384}
    assert eviction_policy(aged) == "others · half-life 16,384"
    assert eviction_policy({"score": None}) == "error"


def test_escape_stops_generation_at_once(engine, tmp_path):
    async def scenario():
        app = make_app(engine, tmp_path, sampling={"temperature": 0.0, "max_new_tokens": 100_000})
        async with app.run_test(size=SIZE) as pilot:
            await idle(pilot)
            app.prompt.load_text("Tell me a story")
            await pilot.press("enter")
            await wait_until(pilot, lambda: app.reply_view is not None and app.reply_view.content)
            assert app.busy == "reply"
            started = time.monotonic()
            await pilot.press("escape")
            assert app.stop_event.is_set()
            await idle(pilot)
            assert time.monotonic() - started < 15
            turn = app.conv.session.last_turn
            assert turn.stopped_by == "interrupted" and 0 < turn.new_tokens < 100_000
            assert app.status_text.startswith("stopped")
            view = app.conversation_view.query(MessageView).last()
            assert view.border_subtitle == "stopped" and view.content == app.conv.messages[-1]["content"]
            # the partial turn is saved like any other, with its snapshot
            assert app.db.messages(app.conv.id) == app.conv.messages
            assert app.db.snapshots(app.conv.id)[0].messages == 2
    run(scenario())


def test_escape_while_a_long_message_is_read(engine, tmp_path):
    async def scenario():
        app = make_app(engine, tmp_path)
        async with app.run_test(size=SIZE) as pilot:
            await idle(pilot)
            await send(pilot, "Hello there")
            before = list(app.conv.messages)
            position = app.conv.session.memory.position
            long = filler(4_000)
            app.prompt.load_text(long)
            reads = []
            report = app._prefill_progress

            def escape_during_prefill(done: int, total: int) -> None:
                reads.append(done)
                app.stop_event.set()  # what Esc does, at a moment the test controls: between two blocks
                report(done, total)

            app._prefill_progress = escape_during_prefill
            done = app.turns_done
            await pilot.press("enter")
            await wait_until(pilot, lambda: app.turns_done > done)
            assert reads == [1024]  # stopped after the first block of the prefill
            await idle(pilot)
            assert app.conv.messages == before and app.db.messages(app.conv.id) == before
            assert app.conv.session.memory.position == position  # back to the saved state
            assert app.prompt.text == long and "nothing was sent" in app.status_text
            assert roles(app) == ["user", "assistant"]
    run(scenario())


def test_regenerate_and_edit_last_message(engine, tmp_path):
    async def scenario():
        app = make_app(engine, tmp_path)
        async with app.run_test(size=SIZE) as pilot:
            await idle(pilot)
            await send(pilot, "Hello there")
            await send(pilot, "What is the capital of France?")
            before = list(app.conv.messages)
            await turn(pilot, "ctrl+r")
            assert app.conv.messages == before  # greedy: regenerated to the same reply
            assert roles(app) == ["user", "assistant"] * 2
            await pilot.press("ctrl+l")
            assert app.editing and app.prompt.text == "What is the capital of France?"
            app.prompt.clear()
            await send(pilot, "And of Italy?")
            assert not app.editing
            assert [m["content"] for m in app.conv.messages[::2]] == ["Hello there", "And of Italy?"]
            assert app.db.messages(app.conv.id) == app.conv.messages
            assert roles(app) == ["user", "assistant"] * 2
    run(scenario())


def test_switch_sessions_resumes_from_snapshots(engine, tmp_path):
    async def scenario():
        app = make_app(engine, tmp_path)
        async with app.run_test(size=SIZE) as pilot:
            await idle(pilot)
            await send(pilot, "First chat")
            first = list(app.conv.messages)
            await pilot.press("ctrl+n")
            await idle(pilot)
            assert app.conv.name == "chat 2" and roles(app) == []
            await send(pilot, "Second chat")
            await pilot.press("ctrl+o")
            await wait_until(pilot, lambda: isinstance(app.screen, SessionsScreen))
            await pilot.press("down")  # the list is most recent first: chat 2, then chat 1
            await pilot.press("enter")
            await idle(pilot)
            assert app.conv.name == "chat 1" and app.conv.messages == first
            assert app.conv.report.source == "snapshot" and app.conv.report.prefilled_tokens == 0
            assert "no re-prefill" in app.status_text and "·· ms" in app.status_text
            assert roles(app) == ["user", "assistant"]
            assert app.panel.stats == app.conv.session.stats()
            # rename and delete from the sessions screen
            await pilot.press("ctrl+o")
            await wait_until(pilot, lambda: isinstance(app.screen, SessionsScreen))
            await pilot.press("r")
            await wait_until(pilot, lambda: isinstance(app.screen, TextPrompt))
            app.screen.query_one("Input").value = "renamed"
            await pilot.press("enter")
            await wait_until(pilot, lambda: isinstance(app.screen, SessionsScreen))
            assert app.db.find("renamed") is not None and app.db.find("chat 1") is None
            await pilot.press("escape")
            await pilot.pause()
            assert app.conv.name == "renamed" and app.sub_title.startswith("renamed")
    run(scenario())


def test_rewind_to_an_earlier_turn(engine, tmp_path):
    async def scenario():
        app = make_app(engine, tmp_path)
        async with app.run_test(size=SIZE) as pilot:
            await idle(pilot)
            for text in ("one", "two", "three"):
                await send(pilot, f"message {text}")
            after_two = app.db.snapshots(app.conv.id)[1]
            await pilot.press("ctrl+t")
            await wait_until(pilot, lambda: isinstance(app.screen, RewindScreen))
            await pilot.press("enter")  # the last turn is highlighted: take it back
            await idle(pilot)
            assert [m["content"] for m in app.conv.messages[::2]] == ["message one", "message two"]
            assert app.conv.report.source == "snapshot" and app.conv.report.prefilled_tokens == 0
            assert app.conv.session.memory.position == after_two.tokens
            assert app.db.messages(app.conv.id) == app.conv.messages
            assert roles(app) == ["user", "assistant"] * 2
            assert app.prompt.text == "message three"  # back in the prompt, to edit and resend
    run(scenario())


def test_export_markdown(engine, tmp_path):
    async def scenario():
        app = make_app(engine, tmp_path)
        async with app.run_test(size=SIZE) as pilot:
            await idle(pilot)
            await send(pilot, "Hello there")
            await pilot.press("ctrl+s")
            await wait_until(pilot, lambda: isinstance(app.screen, TextPrompt))
            await pilot.press("enter")
            await pilot.pause()
            path = tmp_path / "exports" / "chat-1.md"
            text = path.read_text()
            assert text.startswith("# chat 1\n") and "## You\n\nHello there\n" in text
            assert app.conv.messages[-1]["content"].rstrip() in text
            assert app.status_text == f"exported to {path}"
    run(scenario())


def test_settings_change_system_prompt_and_sampling(engine, tmp_path):
    async def scenario():
        app = make_app(engine, tmp_path)
        async with app.run_test(size=SIZE) as pilot:
            await idle(pilot)
            await pilot.press("f2")
            await wait_until(pilot, lambda: isinstance(app.screen, SettingsScreen))
            app.screen.query_one("#system").load_text("You are terse.")
            app.screen.query_one("#max_new_tokens").value = "3"
            await pilot.press("ctrl+s")
            await pilot.pause()
            assert app.sampling["max_new_tokens"] == 3
            assert app.db.messages(app.conv.id) == [{"role": "system", "content": "You are terse."}]
            await send(pilot, "Hi")
            assert app.conv.session.last_turn.new_tokens == 3
            assert app.conv.record.settings["max_new_tokens"] == 3
    run(scenario())


def test_models_screen_pulls_from_the_hub_with_progress(engine, tmp_path, monkeypatch):
    def hub_gen():
        yield from serve_hub(monkeypatch)

    hubs = hub_gen()
    hub = next(hubs)
    hub.add_repo("test/tiny-llama", tiny_llama_repo())

    async def scenario():
        app = make_app(engine, tmp_path)
        async with app.run_test(size=SIZE) as pilot:
            await idle(pilot)
            await pilot.press("f3")
            await wait_until(pilot, lambda: isinstance(app.screen, ModelsScreen))
            screen = app.screen
            screen.query_one("#spec").value = "test/tiny-llama"
            await pilot.click("#pull")
            await wait_until(pilot, lambda: screen.pulling is None and screen.events)
            size = len(tiny_llama_repo()["model.safetensors"])
            assert ("model.safetensors", size, size) in screen.events
            bar = screen.query_one("#bar")
            assert bar.total == bar.progress > 0
            assert "pulled test/tiny-llama" in str(screen.query_one("#pull-status").content)
            table = screen.query_one("#models")
            assert table.row_count == 1 and store.find("test/tiny-llama") is not None
            # set it as the default model (written to the config file), then delete it
            await pilot.press("ctrl+d")
            await pilot.pause()
            assert load_config()["model"]["default"] == "test/tiny-llama"
            assert "default" in str(table.get_row_at(0)[4])
            await pilot.press("delete")
            await pilot.press("y")
            await pilot.pause()
            assert store.find("test/tiny-llama") is None and table.row_count == 0
            await pilot.press("escape")
            await pilot.pause()
            assert app.screen is app.chat

    try:
        run(scenario())
    finally:
        hubs.close()


def test_models_screen_cancel_keeps_the_partial_download_for_resume(engine, tmp_path, monkeypatch):
    def hub_gen():
        yield from serve_hub(monkeypatch)

    hubs = hub_gen()
    hub = next(hubs)
    files = tiny_llama_repo()
    files["model.safetensors"] = files["model.safetensors"] + b"\0" * 3_000_000  # big enough to cancel
    hub.add_repo("test/big", files)

    async def scenario():
        app = make_app(engine, tmp_path)
        async with app.run_test(size=SIZE) as pilot:
            await idle(pilot)
            await pilot.press("f3")
            await wait_until(pilot, lambda: isinstance(app.screen, ModelsScreen))
            screen = app.screen
            screen.cancel.set()  # cancel at the first progress report
            screen.query_one("#spec").value = "test/big"
            screen.start_pull()
            screen.cancel.set()
            await wait_until(pilot, lambda: screen.pulling is None)
            assert "cancelled" in str(screen.query_one("#pull-status").content)
            assert store.find("test/big") is None
            screen.cancel.clear()
            screen.start_pull()  # pulled again: completes (resuming where it stopped)
            await wait_until(pilot, lambda: screen.pulling is None)
            assert store.find("test/big") is not None

    try:
        run(scenario())
    finally:
        hubs.close()


def test_use_another_model_from_the_models_screen(engine, exact_engine, folder, tmp_path):
    store.pull(str(folder))  # import the tiny model into the store, so the models screen lists it
    asked = []

    def loader(name, progress, notice):
        asked.append(name)
        progress("model.safetensors", 10, 10)
        return exact_engine

    async def scenario():
        app = make_app(engine, tmp_path, loader=loader)
        async with app.run_test(size=SIZE) as pilot:
            await idle(pilot)
            await send(pilot, "Hello there")
            await pilot.press("f3")
            await wait_until(pilot, lambda: isinstance(app.screen, ModelsScreen))
            assert app.screen.selected() == "tiny-chat"
            await pilot.press("ctrl+u")
            await wait_until(pilot, lambda: app.engine is exact_engine and app.busy is None)
            await idle(pilot)
            assert asked == ["tiny-chat"] and app.screen is app.chat
            # the session's snapshot was made in LoLA mode: refused, and the transcript read again
            report = app.conv.report
            assert report.source == "transcript" and "mode=lola-identity" in report.refused[0]
            assert "refused" in app.status_text and "re-read the transcript" in app.status_text
            assert app.panel.stats["mode"] == "exact" and app.panel.stats == app.conv.session.stats()
    run(scenario())


def test_exact_mode_panel_explains_the_growth(exact_engine, tmp_path):
    async def scenario():
        app = make_app(exact_engine, tmp_path)
        async with app.run_test(size=SIZE) as pilot:
            await idle(pilot)
            await send(pilot, "Hello there")
            first = app.panel.stats["cache_bytes"]
            await send(pilot, "Again")
            stats = app.conv.session.stats()
            assert app.panel.stats == stats and stats["cache_bytes"] > first
            shown = app.panel.content.plain
            assert "MEMORY · exact attention" in shown and "no LoLA adapter" in shown
            assert "grows with the conversation" in shown
            assert "KV cache" in shown and "growth" in shown
    run(scenario())


def test_command_palette_lists_the_chat_commands(engine, tmp_path):
    async def scenario():
        app = make_app(engine, tmp_path)
        async with app.run_test(size=SIZE) as pilot:
            await idle(pilot)
            titles = [c.title for c in app.get_system_commands(app.screen)]
            for title in ("Theme", "New chat", "Sessions", "Regenerate", "Rewind", "Export as Markdown",
                          "Models", "Settings", "Stop"):
                assert title in titles
            await pilot.press("ctrl+p")
            await pilot.pause()
            await pilot.press(*"New chat")
            await pilot.pause(0.3)
            await pilot.press("enter")
            await idle(pilot)
            assert app.conv.name == "chat 2"
    run(scenario())


def test_theme_choice_is_remembered(engine, tmp_path):
    async def scenario(expect: str | None):
        app = make_app(engine, tmp_path)
        async with app.run_test(size=SIZE) as pilot:
            await idle(pilot)
            if expect:
                assert app.theme == expect
            else:
                app.theme = "nord"
                await pilot.pause()
    run(scenario(None))
    run(scenario("nord"))


# -- snapshot tests (fixed terminal size; speeds, RSS and times are masked) ----------------------------------


def test_snapshot_chat_screen(snap_compare, engine, tmp_path):
    app = make_app(engine, tmp_path, sampling={"temperature": 0.0, "max_new_tokens": 12})

    async def run_before(pilot):
        await idle(pilot)
        await send(pilot, "Hello there")
        await send(pilot, "What is the capital of France?")
        await pilot.pause()

    assert snap_compare(app, terminal_size=(110, 34), run_before=run_before)


class PanelApp(App):
    def __init__(self, stats: dict, info: dict, history: list[dict]):
        super().__init__()
        self.stats, self.info, self.history_points = stats, info, history

    def compose(self) -> ComposeResult:
        yield StatsPanel(mask=True)

    def on_mount(self) -> None:
        panel = self.query_one(StatsPanel)
        for point in self.history_points:
            panel.history.add(point)
        panel.show(self.stats, self.info)


def _panel_data(engine) -> tuple[dict, dict, list[dict]]:
    session = engine.session()
    history = []
    for text in ("Hello there", "What is the capital of France?", "Tell me a story about a cat"):
        "".join(session.chat(text, max_new_tokens=10, temperature=0.0))
        history.append(session.stats())
    return history[-1], engine.describe(), history[:-1]


def test_snapshot_stats_panel_lola(snap_compare, engine):
    stats, info, history = _panel_data(engine)
    assert snap_compare(PanelApp(stats, info, history), terminal_size=(36, 30))


def test_snapshot_stats_panel_exact(snap_compare, exact_engine):
    stats, info, history = _panel_data(exact_engine)
    assert snap_compare(PanelApp(stats, info, history), terminal_size=(36, 30))


def test_render_stats_masks_only_volatile_fields(engine):
    stats, info, _ = _panel_data(engine)
    plain = render_stats(stats, info, mask=False).plain
    masked = render_stats(stats, info, mask=True).plain
    assert "tok/s" in plain and "tok/s" not in masked
    keep = [line for line in plain.splitlines() if not line.startswith(("prefill", "decode", "RSS"))]
    assert keep == [line for line in masked.splitlines() if not line.startswith(("prefill", "decode", "RSS"))]
    assert isinstance(render_stats(None, None), Text)


def test_resume_in_the_tui_after_restart(engine, tmp_path):
    async def first():
        app = make_app(engine, tmp_path)
        async with app.run_test(size=SIZE) as pilot:
            await idle(pilot)
            await send(pilot, "Remember me")
            return list(app.conv.messages)

    async def second(expected):
        app = make_app(engine, tmp_path)
        async with app.run_test(size=SIZE) as pilot:
            await idle(pilot)  # plain start reopens the most recent session
            assert app.conv.messages == expected and app.conv.report.source == "snapshot"
            assert roles(app) == ["user", "assistant"]

    messages = asyncio.run(first())
    run(second(messages))
    reopened = Conversation.open(SessionsDB(tmp_path / "sessions"), engine, "chat 1")
    assert reopened.report.prefilled_tokens == 0



def test_chat_command_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["no-such-model"]) == 1  # plain `lolachat ARGS` is the chat command
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
    assert cli.main(["chat", str(tmp_path / "missing")]) == 1
    assert "no such file or folder" in capsys.readouterr().err
    assert cli.main(["--new"]) == 1  # under pytest stdin is no terminal
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs a terminal" in err
