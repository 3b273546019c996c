"""Process memory readings for stats output."""

from __future__ import annotations

import resource
import sys


def rss_bytes() -> int:
    """Current resident set size (Linux /proc; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class MemoryTrace:
    """Samples (tokens seen, cache bytes, RSS) of a session, e.g. once per prefill block."""

    def __init__(self, session, max_samples: int = 64):
        self.session = session
        self.max_samples = max_samples
        self.samples: list[dict] = []

    def sample(self) -> None:
        stats = self.session.engine.memory_stats(self.session.memory)
        self.samples.append({"tokens": stats["tokens_seen"], "cache_bytes": stats["cache_bytes"],
                             "rss_bytes": rss_bytes()})
        if len(self.samples) > self.max_samples:
            self.samples = self.samples[::2]
