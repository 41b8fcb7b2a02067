"""PNG plots of a run, drawn from the manifest's statistics (no extra pass over the data).

- ``reward_distribution.png``: density of candidate rewards vs accepted rewards (what rejection
  sampling did to the distribution);
- ``chosen_vs_rejected.png``: density of chosen vs rejected rewards, and the chosen - rejected
  margin;
- ``acceptance.png``: prompts by number of responses kept (k), with the under-filled fraction;
  and Algorithm 1's acceptance rate per round, with what selection did (the manifest's
  ``selection`` section, docs/SELECTION.md): beta scale, relative gain, fractions of decisive
  prompts equal to top-k and indistinguishable from random.
A plot whose data is empty says so instead of failing.
"""
from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

PLOT_NAMES = ("reward_distribution.png", "chosen_vs_rejected.png", "acceptance.png")


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend, imported when a plot is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _density_steps(ax, stats: Mapping[str, Any], series: str, label: str) -> bool:
    s = stats.get(series) or {}
    hist = s.get("histogram")
    if not hist or not s.get("count"):
        return False
    edges, counts = hist["edges"], hist["counts"]
    width = edges[1] - edges[0]
    total = sum(counts)
    density = [c / (total * width) for c in counts]
    ax.stairs(density, edges, label=f"{label} (n={s['count']}, mean={s['mean']:.3g})",
              linewidth=1.5)
    return True


def _no_data(ax) -> None:
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    _pyplot().close(fig)
    return buf.getvalue()


def reward_distribution(stats: Mapping[str, Any], title: str = "") -> bytes:
    fig, ax = _pyplot().subplots(figsize=(7, 4))
    drawn = [_density_steps(ax, stats, "candidate", "candidates"),
             _density_steps(ax, stats, "accepted", "accepted")]
    if any(drawn):
        ax.legend()
    else:
        _no_data(ax)
    ax.set(xlabel="reward", ylabel="density", title=f"Reward distribution {title}".strip())
    return _png(fig)


def chosen_vs_rejected(stats: Mapping[str, Any], title: str = "") -> bytes:
    fig, (left, right) = _pyplot().subplots(1, 2, figsize=(11, 4))
    drawn = [_density_steps(left, stats, "chosen", "chosen"),
             _density_steps(left, stats, "rejected", "rejected")]
    if any(drawn):
        left.legend()
    else:
        _no_data(left)
    left.set(xlabel="reward", ylabel="density", title="Chosen vs rejected rewards")
    if not _density_steps(right, stats, "margin", "chosen - rejected"):
        _no_data(right)
    else:
        right.legend()
    right.set(xlabel="reward margin", ylabel="density", title=f"Pair margins {title}".strip())
    return _png(fig)


def _rounds(ax, selection: Mapping[str, Any]) -> None:
    rounds = selection.get("acceptance_by_round") or []
    if rounds:
        ax.bar([r["round"] for r in rounds], [r["rate"] or 0.0 for r in rounds],
               color="tab:orange")
        for r in rounds:
            ax.annotate(f"{r['accepted']}/{r['visited']}", (r["round"], r["rate"] or 0.0),
                        ha="center", va="bottom", fontsize=8)
    else:
        _no_data(ax)
    head = "Acceptance rate per round (accepted / visited)"
    parts = [f"beta {selection.get('beta')} ({selection.get('beta_scale', 'none')})"]
    for key, label in (("mean_relative_gain", "relative gain"),
                       ("equals_top_k_fraction", "= top-k"),
                       ("like_random_fraction", "~ random")):
        if selection.get(key) is not None:
            parts.append(f"{label}: {selection[key]:.2f}")
    ax.set_title(head + "\n" + ", ".join(parts), fontsize=10)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="round of Algorithm 1", ylabel="acceptance rate", ylim=(0, 1.1))


def acceptance(acceptance_stats: Mapping[str, Any], title: str = "",
               selection: Mapping[str, Any] | None = None) -> bytes:
    """Prompts by k kept; with ``selection`` (the manifest's section) a second panel of
    Algorithm 1's acceptance rate per round."""
    if selection is None:
        fig, ax = _pyplot().subplots(figsize=(7, 4))
    else:
        fig, (ax, right) = _pyplot().subplots(1, 2, figsize=(12, 4))
        _rounds(right, selection)
    by_k = {int(k): v for k, v in (acceptance_stats.get("prompts_by_num_accepted") or {}).items()}
    head = f"Responses kept per prompt {title}".strip()
    frac = acceptance_stats.get("underfilled_fraction")
    ratio = acceptance_stats.get("mean_accepted_over_candidates")
    if frac is not None and ratio is not None:
        head += f"\nunder-filled: {frac:.1%}, mean k/N: {ratio:.3g}"
    if by_k:
        ax.bar(list(by_k), list(by_k.values()), color="tab:blue")
    else:
        _no_data(ax)
    ax.set_title(head)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="responses kept (k)", ylabel="prompts")
    if selection is not None:
        fig.tight_layout()
    return _png(fig)


def render_plots(manifest: Mapping[str, Any]) -> dict[str, bytes]:
    """{file name: PNG bytes} for the manifest's reward and acceptance statistics."""
    stats = manifest.get("reward_statistics", {})
    title = f"({manifest.get('run_id', '')})"
    return {
        "reward_distribution.png": reward_distribution(stats, title),
        "chosen_vs_rejected.png": chosen_vs_rejected(stats, title),
        "acceptance.png": acceptance(manifest.get("acceptance", {}), title,
                                     manifest.get("selection")),
    }
