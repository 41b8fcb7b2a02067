"""Statistics for `rso evaluate` and `rso inspect`: pure functions, numpy only.

- :func:`match_scores`: one judge comparison per prompt -> win 1, tie 0.5, loss 0;
- :func:`wilson_interval`: the Wilson score interval of a proportion (Wilson 1927);
- :func:`win_rate`: wins, ties, losses, the win rate and its 95% interval over prompts;
- :func:`proportion`: a fraction of items with a property, with its interval (e.g. the fraction
  of pairs whose chosen response is longer, the classic length-bias signal);
- :func:`summarize`: count, mean, std, min, quantiles and max of a series.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

Z_95 = 1.959963984540054  # the 0.975 quantile of the standard normal: a two-sided 95% interval
WIN, TIE, LOSS = 1.0, 0.5, 0.0
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def finite_1d(values: Sequence[float], name: str) -> np.ndarray:
    """``values`` as a 1-D float64 array; ValueError naming ``name`` unless every value is
    finite."""
    a = np.asarray(values, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of floats, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite, got {a[~np.isfinite(a)].tolist()[:5]}")
    return a


def match_scores(policy_rewards: Sequence[float], baseline_rewards: Sequence[float],
                 tie_margin: float = 0.0) -> np.ndarray:
    """Per-prompt scores of the policy against the baseline under a judge.

    With ``d_i = policy_rewards[i] - baseline_rewards[i]`` (same prompt, same judge):
    ``score_i = 1`` (win) if ``d_i > tie_margin``, ``0`` (loss) if ``d_i < -tie_margin``, and
    ``0.5`` (tie: the judge rewards are equal within ``tie_margin``) otherwise. A tie counts as
    half a win, as in Chatbot Arena / AlpacaEval style win rates. With the default
    ``tie_margin = 0`` only exactly equal rewards tie.

    Shapes: two sequences of the same length n (one entry per prompt) -> float array (n,).
    Raises ValueError for different lengths, a non-finite reward or a negative margin.
    """
    p = finite_1d(policy_rewards, "policy_rewards")
    b = finite_1d(baseline_rewards, "baseline_rewards")
    if p.shape != b.shape:
        raise ValueError(f"policy and baseline rewards differ in length: {p.size} vs {b.size}")
    margin = float(tie_margin)
    if not margin >= 0:  # also rejects NaN
        raise ValueError(f"tie_margin must be >= 0, got {tie_margin}")
    d = p - b
    return np.where(d > margin, WIN, np.where(d < -margin, LOSS, TIE))


def wilson_interval(successes: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval for a proportion ``p = successes / n``.

    ``center = (p + z^2 / (2n)) / (1 + z^2 / n)``,
    ``half = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / (4 n^2))``,
    interval ``[center - half, center + half]``, clipped to [0, 1] against rounding
    (E. B. Wilson, "Probable inference, the law of succession, and statistical inference",
    JASA 22, 1927; recommended over the normal interval by Brown, Cai & DasGupta, Statistical
    Science 16, 2001). ``successes`` may be fractional (ties counted as half a win): the
    variance of any [0, 1]-valued score with mean p is at most p (1 - p), so the interval is
    then conservative. ``z = 1.96`` gives 95%. Returns (nan, nan) when ``n == 0``.
    Raises ValueError unless ``0 <= successes <= n``.
    """
    if n == 0:
        return math.nan, math.nan
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(max(p * (1 - p) / n + z2 / (4 * n * n), 0.0))
    return max(0.0, center - half), min(1.0, center + half)


def win_rate(scores: Sequence[float], z: float = Z_95) -> dict[str, Any]:
    """Summary of per-prompt scores (:func:`match_scores`).

    Returns ``{"num_prompts", "wins", "ties", "losses", "win_rate", "win_rate_ci95"}`` where
    ``win_rate = (wins + ties / 2) / num_prompts`` (a tie is half a win) and ``win_rate_ci95``
    is ``[lo, hi]``, the :func:`wilson_interval` of that proportion over prompts (``None``
    values with no prompt). Raises ValueError for a score other than 0, 0.5 or 1.
    """
    s = np.asarray(scores, dtype=np.float64)
    bad = s[~np.isin(s, (WIN, TIE, LOSS))]
    if bad.size:
        raise ValueError(f"scores must be 0, 0.5 or 1, got {bad.tolist()[:5]}")
    n = int(s.size)
    wins, ties = int(np.sum(s == WIN)), int(np.sum(s == TIE))
    points = wins + 0.5 * ties
    lo, hi = wilson_interval(points, n, z)
    return {"num_prompts": n, "wins": wins, "ties": ties, "losses": n - wins - ties,
            "win_rate": points / n if n else None,
            "win_rate_ci95": [lo, hi] if n else None}


def proportion(hits: int, n: int, z: float = Z_95) -> dict[str, Any]:
    """``{"count": hits, "n": n, "fraction": hits / n, "ci95": [lo, hi]}`` (Wilson interval;
    ``None`` for the fraction and interval when ``n == 0``)."""
    lo, hi = wilson_interval(hits, n, z)
    return {"count": int(hits), "n": int(n), "fraction": hits / n if n else None,
            "ci95": [lo, hi] if n else None}


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """``{"count", "mean", "std" (population), "min", "q10", "q25", "median", "q75", "q90",
    "max"}`` of the finite values (quantiles by numpy's linear interpolation); ``count`` only
    when there is none. Non-finite values are left out and counted as ``"non_finite"``."""
    a = np.asarray(values, dtype=np.float64).reshape(-1)
    finite = a[np.isfinite(a)]
    out: dict[str, Any] = {"count": int(finite.size)}
    if a.size != finite.size:
        out["non_finite"] = int(a.size - finite.size)
    if finite.size == 0:
        return out
    q = np.quantile(finite, QUANTILES)
    out.update({"mean": float(finite.mean()), "std": float(finite.std()),
                "min": float(finite.min()), "q10": float(q[0]), "q25": float(q[1]),
                "median": float(q[2]), "q75": float(q[3]), "q90": float(q[4]),
                "max": float(finite.max())})
    return out
