"""matplotlib helpers shared by the commands that draw PNGs (`rso inspect`, `rso evaluate`):
the file-only Agg backend, reproducible PNG bytes, a labelled empty plot and a step density.

matplotlib is imported when a plot is drawn, so importing this module costs nothing.
"""
from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

NUM_BINS = 30


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png(fig) -> bytes:
    """The figure as PNG bytes, without the software/date metadata (so the same data gives the
    same bytes); closes the figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    pyplot().close(fig)
    return buf.getvalue()


def no_data(ax, text: str = "no data") -> None:
    """Writes ``text`` in the middle of an empty plot."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)


def density(ax, values: Sequence[float], label: str, edges: np.ndarray | None = None) -> bool:
    """Step density (counts / (total * bin width)) of the finite ``values`` on ``ax``, over
    ``edges`` or :data:`NUM_BINS` equal bins (widened by 0.5 each side when all values are
    equal); the label carries n and the mean. Returns False (nothing drawn) when empty."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return False
    if edges is None and v.min() == v.max():
        edges = np.linspace(v.min() - 0.5, v.max() + 0.5, NUM_BINS + 1)
    counts, edges = np.histogram(v, bins=NUM_BINS if edges is None else edges)
    ax.stairs(counts / (counts.sum() * np.diff(edges)), edges, linewidth=1.5,
              label=f"{label} (n={v.size}, mean={v.mean():.3g})")
    return True
