"""The live memory panel (DESIGN §4.6): what the conversation's attention memory holds right now.

`render_stats` is a pure function from the engine's own numbers (`Session.stats()`, `Engine.info`)
to text, so the panel shows exactly what the engine reports. Fields that depend on the clock or the
machine (speeds, RSS, GPU memory) can be masked for reproducible screenshots.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.text import Text
from textual.widgets import Static

SPARK = "▁▂▃▄▅▆▇█"
MASK = "··"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def bar(value: int, capacity: int, width: int = 10) -> str:
    if capacity <= 0:
        return "░" * width
    filled = round(width * min(value, capacity) / capacity)
    return "█" * filled + "░" * (width - filled)


def sparkline(values: list[float], top: float | None = None, width: int = 20) -> str:
    values = values[-width:]
    if not values:
        return ""
    top = top if top else max(values) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((len(SPARK) - 1) * v / top + 0.5))] if v > 0 else " "
                   for v in values)


@dataclass
class ProcessMemory:
    rss_bytes: int = 0
    gpu_allocated: int | None = None
    gpu_reserved: int | None = None
    gpu_total: int | None = None

    @classmethod
    def read(cls, device: str) -> ProcessMemory:
        from lolachat.resources import rss_bytes

        out = cls(rss_bytes=rss_bytes())
        if device.startswith("cuda"):
            import torch

            if torch.cuda.is_available():
                d = torch.device(device)
                out.gpu_allocated = torch.cuda.memory_allocated(d)
                out.gpu_reserved = torch.cuda.memory_reserved(d)
                out.gpu_total = torch.cuda.get_device_properties(d).total_memory
        return out


@dataclass
class History:
    """Cache and full-KV bytes at the end of each turn, for the sparklines (one point per turn, so a
    screenshot does not depend on how fast tokens arrived)."""

    cache: list[float] = field(default_factory=list)
    full_kv: list[float] = field(default_factory=list)

    def add(self, stats: dict) -> None:
        self.cache.append(stats["cache_bytes"])
        self.full_kv.append(stats["full_kv_bytes"])

    def clear(self) -> None:
        self.cache.clear()
        self.full_kv.clear()


EXACT_WHY = ("exact attention: this model has no LoLA adapter (or --exact was given), so every token "
             "stays in a full KV cache and memory grows with the conversation")
IDENTITY_WHY = "LoLA with untrained identity feature maps (--feature-map identity): experimental"


def render_stats(stats: dict | None, info: dict | None, *, history: History | None = None,
                 process: ProcessMemory | None = None, mask: bool = False, width: int = 30) -> Text:
    """The panel's text. `stats` is `Session.stats()`, `info` is `Engine.describe()`."""
    t = Text(no_wrap=False, overflow="fold")
    label_w = 16

    def row(label: str, value: str, style: str = "") -> None:
        t.append(f"{label:<{label_w}}", style="dim")
        t.append(f"{value:>{width - label_w}}\n", style=style)

    def head(title: str) -> None:
        t.append(f"{title}\n", style="bold")

    if info is None:
        t.append("no model loaded yet\n", style="dim")
        return t
    mode = info["mode"]
    head("MEMORY · " + {"exact": "exact attention", "lola": "LoLA", "lola-identity": "LoLA (identity maps)"}
         .get(mode, mode))
    if mode == "exact":
        t.append(EXACT_WHY + "\n", style="yellow")
    elif mode == "lola-identity":
        t.append(IDENTITY_WHY + "\n", style="yellow")
    if stats is None:
        return t
    turn = stats.get("last_turn") or {}
    row("tokens seen", f"{stats['tokens_seen']:,}", "bold")
    if mode == "exact":
        row("KV cache", human_bytes(stats["cache_bytes"]), "bold")
        if stats["tokens_seen"]:
            row("  per token", human_bytes(stats["cache_bytes"] / stats["tokens_seen"]))
        t.append(f"{'growth':<{label_w}}", style="dim")
        t.append(f"{sparkline((history.cache if history else []) + [stats['cache_bytes']], width=width - label_w)}\n",
                 style="yellow")
    else:
        window_cap = 2 * (info.get("window") or 0)
        sparse_cap = info.get("sparse") or 0
        t.append(f"{'window':<8}", style="dim")
        t.append(bar(stats["window_tokens"], window_cap, width - 8 - 10), style="cyan")
        t.append(f"{stats['window_tokens']:>4}/{window_cap:<4}\n")
        t.append(f"{'sparse':<8}", style="dim")
        t.append(bar(stats["sparse_tokens"], sparse_cap, width - 8 - 10), style="magenta")
        t.append(f"{stats['sparse_tokens']:>4}/{sparse_cap:<4}\n")
        row("linear state", human_bytes(stats["state_bytes"]))
        row("  folded tok", f"{stats['linear_tokens']:,}")
        row("cache total", human_bytes(stats["cache_bytes"]), "bold")
    full = stats["full_kv_bytes"]
    row("full KV now", human_bytes(full))
    ratio = stats["cache_bytes"] / full if full else 0.0
    row("cache/full KV", f"{ratio:.2f}×" if full else "–", "green" if full and ratio < 1 else "")
    if history is not None and mode != "exact":
        t.append(f"{'cache':<8}", style="dim")
        top = max(history.full_kv + history.cache + [full, stats["cache_bytes"], 1])
        t.append(f"{sparkline(history.cache + [stats['cache_bytes']], top, width - 8)}\n", style="green")
        t.append(f"{'full KV':<8}", style="dim")
        t.append(f"{sparkline(history.full_kv + [full], top, width - 8)}\n", style="red")
    if mode != "exact":
        row("evictions/turn", f"{turn.get('evictions', 0):,}")
    t.append("\n")
    head("SPEED")
    row("prefill", MASK if mask else f"{turn.get('prefill_tok_s', 0):,.0f} tok/s")
    row("decode", MASK if mask else f"{turn.get('decode_tok_s', 0):,.1f} tok/s")
    row("last reply", f"{turn.get('new_tokens', 0):,} tok")
    t.append("\n")
    head("PROCESS")
    proc = process or ProcessMemory()
    row("RSS", MASK if mask else human_bytes(proc.rss_bytes))
    if proc.gpu_total is not None:
        row("GPU alloc", MASK if mask else human_bytes(proc.gpu_allocated or 0))
        row("GPU reserved", MASK if mask else human_bytes(proc.gpu_reserved or 0))
        row("GPU total", human_bytes(proc.gpu_total))
    row("device", f"{info['device']} · {info['dtype']}")
    if mode != "exact":
        row("C / λ", f"{info.get('window')} / {info.get('sparse')}")
        row("eviction", eviction_policy(info))
    return t


def eviction_policy(info: dict) -> str:
    """How the sparse cache's pairs are chosen, in a few words: "others · 128 recent" (lola.LolaConfig)."""
    parts = [info.get("score") or "error"]
    if info.get("recent_slots"):
        parts.append(f"{info['recent_slots']} recent")
    if info.get("score_halflife"):
        parts.append(f"half-life {info['score_halflife']:,}")
    return " · ".join(parts)


class StatsPanel(Static):
    """The side panel. `show(stats, info)` re-renders from the engine's numbers; `stats` keeps them."""

    DEFAULT_CSS = """
    StatsPanel {
        width: 34;
        height: 1fr;
        padding: 0 1;
        border-left: vkey $primary 50%;
        overflow-y: auto;
    }
    """

    def __init__(self, *, mask: bool = False, **kwargs):
        super().__init__("", **kwargs)
        self.mask = mask
        self.stats: dict | None = None
        self.info: dict | None = None
        self.history = History()
        self.process: ProcessMemory | None = None
        self.note = ""

    def show(self, stats: dict | None, info: dict | None, *, note: str | None = None) -> None:
        self.stats, self.info = stats, info
        if note is not None:
            self.note = note
        if info is not None:
            self.process = ProcessMemory.read(info["device"])
        text = render_stats(stats, info, history=self.history, process=self.process, mask=self.mask)
        if self.note:
            text.append("\n" + self.note + "\n", style="dim")
        self.update(text)
