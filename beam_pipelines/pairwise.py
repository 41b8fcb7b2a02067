"""Pure helpers of pairwise reward models (SPEC 2): which (A, B) orders to score against a
prompt's baseline, and how the scores become rewards. No Beam, no torch;
:mod:`beam_pipelines.reward_handlers` uses them. The text a pairwise model reads is
:func:`rso.reward_input.pairwise_text` (shared with reward-model training).
"""
from __future__ import annotations

from collections.abc import Sequence


def pairwise_rewards(num_candidates: int, baseline: int, scores: Sequence[float],
                     debias: str, flips: Sequence[bool]) -> list[float]:
    """Rewards from the pairwise scores, in the order :func:`pairwise_orders` listed them.

    both-orders: ``r_i = (s(y_i, y_b) - s(y_b, y_i)) / 2``; random-flip: ``r_i = s(y_i, y_b)`` or,
    when flipped, ``-s(y_b, y_i)``; ``r_b = 0``.
    """
    rewards = [0.0] * num_candidates
    it = iter(scores)
    for i in range(num_candidates):
        if i == baseline:
            continue
        if debias == "both-orders":
            forward, backward = next(it), next(it)
            rewards[i] = (forward - backward) / 2.0
        else:
            s = next(it)
            rewards[i] = -s if flips[i] else s
    return rewards


def pairwise_orders(num_candidates: int, baseline: int, debias: str,
                    flips: Sequence[bool]) -> list[tuple[int, int]]:
    """The (A, B) candidate-index pairs to score, in the order :func:`pairwise_rewards` reads."""
    pairs: list[tuple[int, int]] = []
    for i in range(num_candidates):
        if i == baseline:
            continue
        if debias == "both-orders":
            pairs += [(i, baseline), (baseline, i)]
        else:
            pairs.append((baseline, i) if flips[i] else (i, baseline))
    return pairs
