"""Turning a prompt's k kept responses into preference pairs (SPEC 4). Pure functions: numpy only.

A pair is ``(chosen_index, rejected_index)`` into the rewards given; the chosen response has the
higher reward. A pair whose rewards differ by no more than ``tie_margin`` (so, with the default
0, exactly equal rewards) has no defined preference: it is dropped and counted.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np

from beam_pipelines.sampling import finite_rewards

IndexPair = tuple[int, int]


def _game(a: int, b: int, r: np.ndarray) -> IndexPair:
    """(winner, loser): the higher reward wins; exactly equal rewards: the lower index wins."""
    if r[a] > r[b] or (r[a] == r[b] and a < b):
        return a, b
    return b, a


def _play_round(entrants: Sequence[int], r: np.ndarray) -> tuple[list[IndexPair], list[int]]:
    """Neighbours (0, 1), (2, 3)... play one game each; an odd last entrant has a bye.

    Returns the games as (winner, loser) and the next round's entrants: the bye (if any) first,
    so no entrant gets two byes in a row, then the winners in game order.
    """
    games = [_game(entrants[i], entrants[i + 1], r) for i in range(0, len(entrants) - 1, 2)]
    byes = [entrants[-1]] if len(entrants) % 2 else []
    return games, byes + [winner for winner, _ in games]


def _first_round(r: np.ndarray, rng: np.random.Generator) -> list[IndexPair]:
    """Shuffle with ``rng`` and pair neighbours: floor(k / 2) games."""
    games, _ = _play_round(rng.permutation(r.size).tolist(), r)
    return games


def _tournament(r: np.ndarray, rng: np.random.Generator) -> list[IndexPair]:
    """Single elimination over the shuffled responses: k - 1 games, in the order played.

    Its first round is exactly ``first-round``'s pairing for the same generator state. Each
    game's winner advances, even from a tie (dropped as a pair); the last game's winner has the
    maximum reward (the lowest index among tied maxima).
    """
    entrants = rng.permutation(r.size).tolist()
    games: list[IndexPair] = []
    while len(entrants) > 1:
        played, entrants = _play_round(entrants, r)
        games.extend(played)
    return games


def _all_pairs(r: np.ndarray, rng: np.random.Generator) -> list[IndexPair]:
    """Every unordered pair once, k (k - 1) / 2 games, in index order (``rng`` unused)."""
    return [_game(a, b, r) for a, b in itertools.combinations(range(r.size), 2)]


def _best_vs_worst(r: np.ndarray, rng: np.random.Generator) -> list[IndexPair]:
    """One game: the highest against the lowest reward (the lowest index among ties; ``rng``
    unused). The widest margin the kept set offers: the common "best-vs-worst" construction of
    iterative DPO pipelines (e.g. Xiong et al. 2024, "Iterative Preference Learning from Human
    Feedback", section 5)."""
    if r.size < 2:
        return []
    best, worst = int(np.argmax(r)), int(np.argmin(r))
    return [(best, worst)] if best != worst else [(best, int(np.argsort(r, kind="stable")[1]))]


def _best_vs_mean_minus_2std(r: np.ndarray, rng: np.random.Generator) -> list[IndexPair]:
    """One game: the highest reward against the response whose reward is closest to
    ``mean(r) - 2 * std(r)`` (population std; the lowest index among equally close ones;
    ``rng`` unused). Xiao et al. 2025, "Finding the Sweet Spot: Preference Data Construction for
    Scaling Preference Optimization" (arXiv 2502.16825), found this rejected position better than
    the minimum as N grows. They take mean and std over all N samples: to match them keep all N
    (``--selection random --num-samples N``); otherwise the statistics are the kept set's."""
    if r.size < 2:
        return []
    best = int(np.argmax(r))
    target = r.mean() - 2.0 * r.std()
    distance = np.abs(r - target)
    distance[best] = np.inf
    return [(best, int(np.argmin(distance)))]


_PAIRINGS: dict[str, Callable[[np.ndarray, np.random.Generator], list[IndexPair]]] = {
    "first-round": _first_round,
    "tournament": _tournament,
    "all-pairs": _all_pairs,
    "best-vs-worst": _best_vs_worst,
    "best-vs-mean-2std": _best_vs_mean_minus_2std,
}
PAIRING_METHODS: tuple[str, ...] = tuple(_PAIRINGS)


def make_pairs(method: str, rewards: Sequence[float], rng: np.random.Generator,
               tie_margin: float = 0.0) -> tuple[list[IndexPair], int]:
    """Preference pairs from the k kept responses' ``rewards`` for one of PAIRING_METHODS.

    - ``first-round`` (the paper's default): shuffle with ``rng``, pair neighbours, k // 2
      games (an odd last response is left out).
    - ``tournament``: single elimination after the same shuffle, k - 1 games; every game is a
      pair. An odd entrant out gets a bye and plays first in the next round. Exactly equal
      rewards: the lower index advances.
    - ``all-pairs``: all k (k - 1) / 2 games.
    - ``best-vs-worst``: one game, the highest against the lowest reward.
    - ``best-vs-mean-2std``: one game, the highest against the response closest to
      mean - 2 std of the rewards (arXiv 2502.16825).

    In every game the higher reward is chosen. A game with ``|r_a - r_b| <= tie_margin`` is
    dropped. Returns ``(pairs, dropped)``: the kept ``(chosen_index, rejected_index)`` pairs, in
    game order, and the number of games dropped as ties. Raises ValueError for an unknown
    method, a non-finite reward, or a negative or NaN ``tie_margin``.
    """
    try:
        pairing = _PAIRINGS[method]
    except KeyError:
        raise ValueError(f"unknown pairing method {method!r}; "
                         f"expected one of {', '.join(PAIRING_METHODS)}") from None
    tie_margin = float(tie_margin)
    if math.isnan(tie_margin) or tie_margin < 0:
        raise ValueError(f"tie_margin must be >= 0, got {tie_margin}")
    r = finite_rewards(rewards)
    games = pairing(r, rng)
    pairs = [(int(win), int(loss)) for win, loss in games if r[win] - r[loss] > tie_margin]
    return pairs, len(games) - len(pairs)
