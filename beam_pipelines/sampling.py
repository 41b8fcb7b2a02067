"""Choosing which of a prompt's N candidates are kept (SPEC 3). Pure functions: numpy only.

Every function takes the prompt's rewards (after non-finite rewards were removed upstream) and,
where a random choice is made, a ``numpy.random.Generator`` seeded from (run seed, prompt_id)
by :func:`beam_pipelines.seeding.prompt_rng`. Results are indices into ``rewards``.
"""
from __future__ import annotations

import math
import operator
from typing import Callable, Hashable, Sequence

import numpy as np

def finite_rewards(rewards: Sequence[float]) -> np.ndarray:
    """``rewards`` as a 1-D float64 array; ValueError unless every value is finite."""
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 1:
        raise ValueError(f"rewards must be a 1-D sequence of floats, got shape {r.shape}")
    if not np.all(np.isfinite(r)):
        raise ValueError(f"rewards must be finite, got {r[~np.isfinite(r)].tolist()[:5]}")
    return r


def _positive_count(num_samples: int) -> int:
    k = operator.index(num_samples)
    if k < 1:
        raise ValueError(f"num_samples must be >= 1, got {k}")
    return k


def _acceptance_probabilities(r: np.ndarray, m: float, beta: float) -> np.ndarray:
    """``exp((r_i - m) / beta)`` with its limits: beta=0 -> [r_i == m], beta=inf -> 1."""
    if beta == 0.0:
        return (r == m).astype(np.float64)
    if math.isinf(beta):
        return np.ones_like(r)
    with np.errstate(over="ignore", under="ignore"):  # r - m <= 0: the result lies in [0, 1]
        return np.exp((r - m) / beta)


def statistical_rejection_sampling(rewards: Sequence[float], num_samples: int, beta: float,
                                   rng: np.random.Generator) -> list[int]:
    """Keep ``num_samples`` candidates by statistical rejection sampling (Algorithm 1, SPEC 3).

    The kept responses approach the optimal policy's distribution
    ``pi_r(y|x) ∝ pi_sft(y|x) * exp(r(x, y) / beta)`` as N grows (Theorem 1 of Liu et al.),
    given that the candidates were drawn from pi_sft. Algorithm, with k = ``num_samples``::

        remaining = all indices; accepted = []
        while len(accepted) < k and remaining:
            m = max(r_i for i in remaining)                  # recomputed every round
            for i in remaining, in a fresh random order:     # one permutation per round
                accept i with probability exp((r_i - m) / beta)
                stop as soon as len(accepted) == k
            remaining -= accepted                            # without replacement

    The round's arg-max has probability exp(0) = 1, so every round accepts at least one index
    and the loop ends. Limits, exact and without division: ``beta == 0`` accepts only the
    indices whose reward equals the round's maximum (top-k; tied maxima in random order), and
    ``beta == inf`` accepts every visited index (the first k of a random permutation, a uniform
    random subset). With fewer than k candidates all are returned. Each visit draws one
    uniform u in [0, 1) and accepts when u < probability.

    Returns the accepted indices in acceptance order. Raises ValueError when ``num_samples < 1``,
    ``beta`` is negative or NaN, or a reward is not finite.
    """
    k = _positive_count(num_samples)
    beta = float(beta)
    if math.isnan(beta) or beta < 0:
        raise ValueError(f"beta must be >= 0 (0 = top-k, inf = random), got {beta}")
    r = finite_rewards(rewards)
    remaining = np.arange(r.size)
    accepted: list[int] = []
    while len(accepted) < k and remaining.size:
        order = rng.permutation(remaining)
        probabilities = _acceptance_probabilities(r[order], r[remaining].max(), beta)
        hits = order[rng.random(order.size) < probabilities][: k - len(accepted)]
        accepted.extend(hits.tolist())
        remaining = remaining[~np.isin(remaining, hits)]
    return accepted


def rest_filter(rewards: Sequence[float], num_samples: int, threshold: float) -> list[int]:
    """ReST-style filter: indices with ``(r_i - min r) / (max r - min r) > threshold``.

    Returned best first (equal rewards by index), at most ``num_samples`` of them. When every
    reward is equal (including a single candidate) the normalisation is undefined and no
    response stands out: nothing is kept (the caller counts the prompt as under-filled).
    ``threshold`` must lie in [0, 1): the best response (normalised 1) always passes.
    """
    k = _positive_count(num_samples)
    threshold = float(threshold)
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"rest_threshold must be in [0, 1), got {threshold}")
    r = finite_rewards(rewards)
    if r.size == 0 or r.max() == r.min():
        return []
    normalised = (r - r.min()) / (r.max() - r.min())
    best_first = np.argsort(-r, kind="stable")
    return [int(i) for i in best_first if normalised[i] > threshold][:k]


_SELECTORS: dict[str, Callable[[Sequence[float], int, float, np.random.Generator, float],
                               list[int]]] = {
    "rso": lambda r, k, beta, rng, t: statistical_rejection_sampling(r, k, beta, rng),
    "top-k": lambda r, k, beta, rng, t: statistical_rejection_sampling(r, k, 0.0, rng),
    "random": lambda r, k, beta, rng, t: statistical_rejection_sampling(r, k, math.inf, rng),
    "best-of-n": lambda r, k, beta, rng, t: statistical_rejection_sampling(r, 1, 0.0, rng),
    "rest": lambda r, k, beta, rng, t: rest_filter(r, k, t),
}
SELECTION_METHODS: tuple[str, ...] = tuple(_SELECTORS)


def select(method: str, rewards: Sequence[float], num_samples: int, beta: float,
           rng: np.random.Generator, rest_threshold: float = 0.7) -> list[int]:
    """Indices of the kept candidates for one of :data:`SELECTION_METHODS` (SPEC 3).

    - ``rso``: :func:`statistical_rejection_sampling` with ``beta``.
    - ``top-k``: the same with beta = 0 (the k best; tied rewards in random order).
    - ``random``: the same with beta = inf (a uniform random subset, "sft-sample-rank").
    - ``best-of-n``: the same with k = 1 and beta = 0: one arg-max (a random one among ties);
      ``num_samples`` is ignored.
    - ``rest``: :func:`rest_filter` with ``rest_threshold`` (``beta`` and ``rng`` unused).

    ``beta`` is only read by ``rso``. Raises ValueError for an unknown method or bad arguments.
    """
    try:
        selector = _SELECTORS[method]
    except KeyError:
        raise ValueError(f"unknown selection method {method!r}; "
                         f"expected one of {', '.join(SELECTION_METHODS)}") from None
    return selector(rewards, num_samples, beta, rng, rest_threshold)


def dedup(token_ids: Sequence[Sequence[int]]) -> list[int]:
    """Indices of the first occurrence of each distinct token-id sequence, in original order.

    SPEC 3 collapses duplicate responses (identical generated token ids) before selection.
    """
    seen: set[Hashable] = set()
    keep: list[int] = []
    for i, ids in enumerate(token_ids):
        key = tuple(int(t) for t in ids)
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return keep
