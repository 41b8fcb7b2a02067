"""What a selection setting would do, estimated from stored candidates alone (``rso sweep``).

Pure functions (numpy only): the selection and pairing code is the pipeline's own
(:func:`beam_pipelines.sampling.select`, :func:`beam_pipelines.pairing.make_pairs`), run many
times per prompt with generators seeded by (seed, prompt_id, replicate), so an estimate is what
the pipeline would do on average over its own random choices.

For one prompt with candidate pool ``y_1..y_n`` (after dedup, as the pipeline selects) drawn from
the proposal pi_sft, and a selection that keeps ``k``:

- ``kept_reward``: E[mean reward of the kept responses].
- ``chosen_reward``: E[mean reward of the chosen responses of the pairs] (prompts that form no
  pair do not count).
- ``inclusion[i]``: P(y_i is kept). The kept set's distribution over the pool is
  ``p_i = inclusion[i] / sum(inclusion)``; the proposal, estimated from its own samples, is the
  uniform ``q_i = 1/n``, so

      ``kl = KL(p || q) = sum_i p_i log(n p_i)``   (nats)

  0 for random selection (beta = inf), ``log(n / k)`` for top-k without ties (beta = 0): the
  "KL from the SFT policy" axis of the reward-KL trade-off (Liu et al. 2024, Fig. 3; Gao et al.
  2023 use the same axis for best-of-n).
- ``acceptance_rate``: E[kept] / n; ``underfilled``: P(fewer than k kept).

Estimates are Monte-Carlo means over ``replicates`` runs; their standard error shrinks as
``1/sqrt(replicates * prompts)``.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import numpy as np

from beam_pipelines import pairing, sampling
from beam_pipelines.seeding import prompt_rng


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    """The estimates for one beta, averaged over prompts (see the module docstring)."""
    beta: float
    kept_reward: float
    chosen_reward: float  # nan when no prompt forms a pair
    candidate_reward: float  # mean reward of all candidates: the gain's baseline
    kl: float
    acceptance_rate: float
    underfilled: float
    num_prompts: int

    @property
    def reward_gain(self) -> float:
        """``kept_reward - candidate_reward``: what selection adds over random."""
        return self.kept_reward - self.candidate_reward


@dataclasses.dataclass(frozen=True)
class PromptEstimate:
    kept_reward: float
    chosen_reward: float  # nan when no pair forms
    inclusion: np.ndarray  # [n], P(candidate i is kept)
    underfilled: float

    def kl(self) -> float:
        """KL(kept-set distribution || uniform over the pool), nats."""
        total = self.inclusion.sum()
        if total <= 0:
            return math.nan
        p = self.inclusion / total
        nz = p > 0
        return float(np.sum(p[nz] * np.log(p[nz] * p.size)))


def estimate_prompt(prompt_id: str, rewards: Sequence[float], beta: float, num_samples: int,
                    pairing_method: str, seed: int, replicates: int, tie_margin: float = 0.0
                    ) -> PromptEstimate:
    """Monte-Carlo estimates for one prompt's (deduplicated) ``rewards`` under statistical
    rejection sampling with ``beta`` (0 = top-k, inf = random) keeping ``num_samples``."""
    r = sampling.finite_rewards(rewards)
    n = r.size
    inclusion = np.zeros(n)
    kept_means, chosen_means, under = [], [], 0
    for rep in range(replicates):
        kept = sampling.statistical_rejection_sampling(
            list(rewards), num_samples, beta, prompt_rng(seed, prompt_id, f"sweep-select-{rep}"))
        inclusion[kept] += 1.0
        under += len(kept) < num_samples
        if kept:
            kept_r = r[kept]
            kept_means.append(float(kept_r.mean()))
            pairs, _ = pairing.make_pairs(pairing_method, kept_r.tolist(),
                                          prompt_rng(seed, prompt_id, f"sweep-pair-{rep}"),
                                          tie_margin=tie_margin)
            if pairs:
                chosen_means.append(float(np.mean([kept_r[c] for c, _ in pairs])))
    return PromptEstimate(
        kept_reward=float(np.mean(kept_means)) if kept_means else math.nan,
        chosen_reward=float(np.mean(chosen_means)) if chosen_means else math.nan,
        inclusion=inclusion / replicates, underfilled=under / replicates)


def sweep(prompts: Iterable[tuple[str, Sequence[float]]], betas: Sequence[float],
          num_samples: int, pairing_method: str = "first-round", seed: int = 0,
          replicates: int = 200, tie_margin: float = 0.0) -> list[SweepPoint]:
    """One :class:`SweepPoint` per beta over ``prompts`` ((prompt_id, deduplicated rewards)
    pairs; prompts with no candidate are skipped). Raises ValueError for a negative beta."""
    prompts = [(pid, list(r)) for pid, r in prompts if len(r)]
    points = []
    for beta in betas:
        beta = float(beta)
        if math.isnan(beta) or beta < 0:
            raise ValueError(f"beta must be >= 0 (0 = top-k, inf = random), got {beta}")
        est = [estimate_prompt(pid, r, beta, num_samples, pairing_method, seed, replicates,
                               tie_margin) for pid, r in prompts]
        chosen = [e.chosen_reward for e in est if not math.isnan(e.chosen_reward)]
        points.append(SweepPoint(
            beta=beta,
            kept_reward=_mean(e.kept_reward for e in est),
            chosen_reward=_mean(chosen),
            candidate_reward=_mean(float(np.mean(r)) for _, r in prompts),
            kl=_mean(e.kl() for e in est),
            acceptance_rate=_mean(float(e.inclusion.sum()) / e.inclusion.size for e in est),
            underfilled=_mean(e.underfilled for e in est),
            num_prompts=len(prompts)))
    return points


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return float(np.mean(values)) if values else math.nan
