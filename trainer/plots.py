"""PNG training curves from ``metrics.jsonl`` (matplotlib, Agg backend: no display needed).

One figure per panel, train and eval on the same axes where both exist:
loss, accuracy, rewards (chosen, rejected, margin), learning rate, gradient norm, throughput.
"""
from __future__ import annotations

import os
from typing import Any

from trainer.metrics import read_metrics

PANELS: dict[str, tuple[str, ...]] = {
    "loss": ("loss",),
    "accuracy": ("accuracy",),
    "rewards": ("reward_chosen", "reward_rejected", "reward_margin"),
    "lr": ("lr",),
    "grad_norm": ("grad_norm",),
    "throughput": ("pairs_per_s",),
}


def _series(records: list[dict[str, Any]], split: str, name: str) -> tuple[list, list]:
    points = [(r["step"], r[name]) for r in records if r.get("split") == split and name in r]
    return [s for s, _ in points], [v for _, v in points]


def plot_metrics(metrics_path: str, out_dir: str) -> list[str]:
    """Writes ``out_dir/<panel>.png`` for each panel with data; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for panel, names in PANELS.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        drawn = False
        for split, style in (("train", "-"), ("eval", "o--")):
            for name in names:
                steps, values = _series(records, split, name)
                if steps:
                    ax.plot(steps, values, style, label=f"{split} {name}", markersize=4)
                    drawn = True
        if drawn:
            ax.set_xlabel("optimizer step")
            ax.set_title(panel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            path = os.path.join(out_dir, f"{panel}.png")
            fig.savefig(path, dpi=100)
            written.append(path)
        plt.close(fig)
    return written
