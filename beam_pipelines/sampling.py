"""Choosing which of a prompt's N candidates are kept (SPEC 3). Pure functions: numpy only.

Every function takes the prompt's rewards (after non-finite rewards were removed upstream) and,
where a random choice is made, a ``numpy.random.Generator`` seeded from (run seed, prompt_id)
by :func:`beam_pipelines.seeding.prompt_rng`. Results are indices into ``rewards``.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Hashable, Sequence
from typing import NamedTuple

import numpy as np

from rso.stats import finite_1d


def finite_rewards(rewards: Sequence[float]) -> np.ndarray:
    """``rewards`` as a 1-D float64 array; ValueError unless every value is finite."""
    return finite_1d(rewards, "rewards")


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


class Round(NamedTuple):
    """One round of Algorithm 1: candidates whose coin was tossed, and how many were accepted.

    ``visited`` counts the remaining candidates in the round's random order up to and including
    the one whose acceptance filled k (all of them when k was not filled). Its acceptance rate is
    ``accepted / visited``.
    """
    visited: int
    accepted: int


def rejection_sampling_rounds(rewards: Sequence[float], num_samples: int, beta: float,
                              rng: np.random.Generator) -> tuple[list[int], list[Round]]:
    """:func:`statistical_rejection_sampling` that also reports its rounds.

    Returns ``(accepted indices, rounds)``: the indices are exactly those of
    :func:`statistical_rejection_sampling` for the same ``rng`` state (the same draws are made),
    ``rounds`` holds one :class:`Round` per pass over the remaining candidates.
    Raises as :func:`statistical_rejection_sampling`.
    """
    k = _positive_count(num_samples)
    beta = float(beta)
    if math.isnan(beta) or beta < 0:
        raise ValueError(f"beta must be >= 0 (0 = top-k, inf = random), got {beta}")
    r = finite_rewards(rewards)
    remaining = np.arange(r.size)
    accepted: list[int] = []
    rounds: list[Round] = []
    while len(accepted) < k and remaining.size:
        order = rng.permutation(remaining)
        probabilities = _acceptance_probabilities(r[order], r[remaining].max(), beta)
        mask = rng.random(order.size) < probabilities
        need = k - len(accepted)
        positions = np.flatnonzero(mask)[:need]
        hits = order[positions]
        visited = int(positions[-1]) + 1 if positions.size == need else int(order.size)
        rounds.append(Round(visited=visited, accepted=int(hits.size)))
        accepted.extend(hits.tolist())
        remaining = remaining[~np.isin(remaining, hits)]
    return accepted, rounds


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

    ``beta`` is in reward units: see :func:`scaled_beta` for a beta relative to the prompt's
    reward spread. Returns the accepted indices in acceptance order
    (:func:`rejection_sampling_rounds` also reports the rounds). Raises ValueError when
    ``num_samples < 1``, ``beta`` is negative or NaN, or a reward is not finite.
    """
    return rejection_sampling_rounds(rewards, num_samples, beta, rng)[0]


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


BETA_SCALES: tuple[str, ...] = ("none", "std")


def reward_spread(rewards: Sequence[float]) -> float:
    """Population standard deviation (ddof=0) of a prompt's candidate rewards; 0.0 for fewer
    than two. The unit of ``beta`` under ``beta_scale="std"``."""
    r = finite_rewards(rewards)
    return float(r.std()) if r.size > 1 else 0.0


def scaled_beta(beta: float, rewards: Sequence[float], beta_scale: str = "none") -> float:
    """The beta Algorithm 1 uses for one prompt: ``beta_eff`` in ``exp((r_i - m) / beta_eff)``.

    - ``"none"``: ``beta`` itself, in reward units (the paper's setting, right for a reward that
      is a calibrated log-odds, e.g. the logit of a Bradley-Terry model).
    - ``"std"``: ``beta * sigma``, with ``sigma = reward_spread(rewards)`` the population
      standard deviation of the prompt's candidate rewards. The acceptance probability becomes
      ``exp((z_i - z_max) / beta)`` with ``z = r / sigma``: the selection is then invariant to
      any per-prompt affine change of the reward ``r -> a*r + b`` (a > 0), so one beta means
      the same for every reward model. ``sigma == 0`` (one candidate, or all rewards equal)
      gives 0: every candidate ties with the maximum, and every beta accepts the same.

    ``beta`` 0 and inf are kept as they are (top-k and uniform random under any scale).
    Raises ValueError for an unknown scale or a negative/NaN beta.
    """
    beta = float(beta)
    if math.isnan(beta) or beta < 0:
        raise ValueError(f"beta must be >= 0 (0 = top-k, inf = random), got {beta}")
    if beta_scale not in BETA_SCALES:
        raise ValueError(f"unknown beta scale {beta_scale!r}; expected one of "
                         f"{', '.join(BETA_SCALES)}")
    if beta_scale == "none" or beta == 0.0 or math.isinf(beta):
        return beta
    return beta * reward_spread(rewards)


class SelectionResult(NamedTuple):
    """What :func:`select_rounds` returns for one prompt."""
    indices: list[int]  # kept candidates, in acceptance order (as :func:`select`)
    beta: float | None  # the beta Algorithm 1 used (after scaling); None for ``rest``
    rounds: list[Round]  # Algorithm 1's rounds; empty for ``rest`` (one threshold pass)


def select_rounds(method: str, rewards: Sequence[float], num_samples: int, beta: float,
                  rng: np.random.Generator, rest_threshold: float = 0.7,
                  beta_scale: str = "none") -> SelectionResult:
    """:func:`select` with the beta it used and Algorithm 1's rounds (see :class:`Round`).

    ``beta_scale`` (:data:`BETA_SCALES`) applies to ``rso`` only (:func:`scaled_beta`); top-k
    and random use beta 0 and inf under any scale. The indices equal :func:`select`'s for the
    same ``rng`` state.
    """
    if method not in SELECTION_METHODS:
        raise ValueError(f"unknown selection method {method!r}; "
                         f"expected one of {', '.join(SELECTION_METHODS)}")
    if method == "rest":
        return SelectionResult(rest_filter(rewards, num_samples, rest_threshold), None, [])
    if method == "rso":
        beta = scaled_beta(beta, rewards, beta_scale)
    else:
        beta = {"top-k": 0.0, "best-of-n": 0.0, "random": math.inf}[method]
    k = 1 if method == "best-of-n" else num_samples
    indices, rounds = rejection_sampling_rounds(rewards, k, beta, rng)
    return SelectionResult(indices, beta, rounds)


SELECTION_METHODS: tuple[str, ...] = ("rso", "top-k", "random", "best-of-n", "rest")


def select(method: str, rewards: Sequence[float], num_samples: int, beta: float,
           rng: np.random.Generator, rest_threshold: float = 0.7,
           beta_scale: str = "none") -> list[int]:
    """Indices of the kept candidates for one of :data:`SELECTION_METHODS` (SPEC 3).

    - ``rso``: :func:`statistical_rejection_sampling` with ``beta`` (scaled per
      ``beta_scale``: :func:`scaled_beta`).
    - ``top-k``: the same with beta = 0 (the k best; tied rewards in random order).
    - ``random``: the same with beta = inf (a uniform random subset, "sft-sample-rank").
    - ``best-of-n``: the same with k = 1 and beta = 0: one arg-max (a random one among ties);
      ``num_samples`` is ignored.
    - ``rest``: :func:`rest_filter` with ``rest_threshold`` (``beta`` and ``rng`` unused).

    ``beta`` is only read by ``rso``. Raises ValueError for an unknown method or bad arguments.
    """
    return select_rounds(method, rewards, num_samples, beta, rng, rest_threshold,
                         beta_scale).indices


# Two-sided 95% bound of a standard normal: |z| below it is "indistinguishable from random".
RANDOM_Z = 1.96


class SelectionEffect(NamedTuple):
    """What selection did to one prompt's rewards (see :func:`selection_effect`)."""
    num_candidates: int  # n: candidates selection chose from
    num_accepted: int  # a: responses kept
    spread: float  # population std of the n candidate rewards
    gain: float | None  # mean(accepted) - mean(candidates); None when a == 0
    decisive: bool  # 0 < a < n and spread > 0: the choice of subset can change the rewards
    relative_gain: float | None  # gain / top-k's gain: 0 ~ random, 1 = top-k (decisive only)
    z: float | None  # gain / its std under a uniform random subset of size a (decisive only)
    equals_top_k: bool  # decisive and the accepted rewards are the a largest (as a multiset)
    like_random: bool  # decisive and |z| < RANDOM_Z


def selection_effect(candidate_rewards: Sequence[float],
                     accepted_rewards: Sequence[float]) -> SelectionEffect:
    """Measures one prompt's selection against top-k and a uniform random subset.

    With n candidate rewards r (mean mu, population variance s^2) and a accepted rewards:

    - ``gain = mean(accepted) - mu``;
    - ``decisive``: ``0 < a < n`` and ``s > 0``. Otherwise every subset of size a has the same
      rewards (or there is none), top-k and random coincide, and the prompt says nothing about
      beta; such prompts are left out of the fractions below;
    - ``relative_gain = gain / (mean(top a of r) - mu)``: 1 for top-k, 0 for random on average;
    - ``z = gain / sqrt(s^2 / a * (n - a) / (n - 1))``: the mean of a uniform random subset of
      size a (drawn without replacement) has mean mu and exactly this variance (finite-
      population correction), so z is the gain in units of random selection's noise;
    - ``equals_top_k``: the sorted accepted rewards equal the a largest of r (ties in reward
      count as equal, whichever candidate was kept);
    - ``like_random``: ``|z| < RANDOM_Z`` (1.96): a two-sided 5% test cannot tell the accepted
      mean from a uniform random subset's. Both flags may hold at once when n is small.

    Rewards must be finite (ValueError otherwise); the accepted rewards must come from the
    candidates (not checked).
    """
    r = finite_rewards(candidate_rewards)
    acc = finite_rewards(accepted_rewards)
    n, a = int(r.size), int(acc.size)
    spread = float(r.std()) if n > 1 else 0.0
    gain = float(acc.mean() - r.mean()) if a and n else None
    decisive = 0 < a < n and spread > 0
    if not decisive:
        return SelectionEffect(n, a, spread, gain, False, None, None, False, False)
    assert gain is not None  # a > 0 and n > 0 here
    top = np.sort(r)[::-1][:a]
    top_gain = float(top.mean() - r.mean())
    z = gain / math.sqrt(spread ** 2 / a * (n - a) / (n - 1))
    return SelectionEffect(
        n, a, spread, gain, True, gain / top_gain if top_gain > 0 else None, z,
        bool(np.array_equal(np.sort(acc)[::-1], top)), abs(z) < RANDOM_Z)


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
