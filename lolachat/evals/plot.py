"""Depth × length heat map of needle retrieval, drawn with matplotlib when it is installed (optional extra)."""

from __future__ import annotations

from pathlib import Path


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def heat_map(result: dict, path: str | Path, title: str | None = None) -> bool:
    """Write a PNG of the score per (depth, length) cell; False (nothing written) without matplotlib."""
    if not matplotlib_available():
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lolachat.persist import atomic_write

    lengths, depths = result["lengths"], result["depths"]
    grid = [[None] * len(lengths) for _ in depths]
    for cell in result["cells"]:
        grid[depths.index(cell["depth"])][lengths.index(cell["length"])] = cell["score"]
    values = [[float("nan") if v is None else v for v in row] for row in grid]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(lengths), 1.0 + 0.45 * len(depths)))
    image = ax.imshow(values, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(lengths)), [_short(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if v is not None:
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8)
    ax.set_title(title or f"{result['task']}: {result['score']}%", fontsize=9)
    fig.colorbar(image, ax=ax, label="score (%)")
    fig.tight_layout()
    with atomic_write(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return True


def _short(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)
