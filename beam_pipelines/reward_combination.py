"""Combining several reward models' scores into the one reward selection uses (SPEC 2). Pure.

``scores`` is [M models][N candidates]; ``weights`` [M] are the ``--reward-model PATH*WEIGHT``
weights.

- ``weighted-sum`` (SPEC 2, the default): ``r = sum_m w_m s_m``.
- ``mean-minus-std`` (a pessimistic ensemble against reward hacking: Coste et al. 2024,
  "Reward Model Ensembles Help Mitigate Overoptimization", uncertainty-weighted optimisation;
  Eisenstein et al. 2024): ``r = mean_m(w_m s_m) - lambda * std_m(w_m s_m)``, population std
  over the M weighted scores; ``lambda = --reward-std-penalty``. A candidate the models disagree
  on is scored down. With one model the std is 0 and it equals the weighted score.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

COMBINATIONS = ("weighted-sum", "mean-minus-std")


def combine_rewards(scores: Sequence[Sequence[float]], weights: Sequence[float],
                    method: str = "weighted-sum", std_penalty: float = 1.0) -> list[float]:
    """The combined reward of each of N candidates from M models' scores (see module doc).

    Raises ValueError for an unknown method, a shape mismatch or a negative/NaN penalty.
    Non-finite scores propagate (the reward stage dead-letters such candidates).
    """
    s = np.asarray(scores, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != w.size or w.size == 0:
        raise ValueError(f"scores must be [models][candidates] with one weight per model, got "
                         f"shape {s.shape} and {w.size} weights")
    weighted = s * w[:, None]
    if method == "weighted-sum":
        return weighted.sum(axis=0).tolist()
    if method == "mean-minus-std":
        if math.isnan(std_penalty) or std_penalty < 0:
            raise ValueError(f"reward_std_penalty must be >= 0, got {std_penalty}")
        return (weighted.mean(axis=0) - std_penalty * weighted.std(axis=0)).tolist()
    raise ValueError(f"unknown reward combination {method!r}; expected one of "
                     f"{', '.join(COMBINATIONS)}")
