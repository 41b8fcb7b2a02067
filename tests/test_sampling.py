"""Selection algorithms (SPEC 3): Algorithm 1's properties, its limits, Theorem 1, and the
other selection methods. Real seeded numpy generators throughout, no stubs."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import get_args

import numpy as np
import pytest

from beam_pipelines.config import Selection
from beam_pipelines.sampling import (
    SELECTION_METHODS,
    dedup,
    rest_filter,
    select,
    statistical_rejection_sampling,
)
from beam_pipelines.seeding import prompt_rng

rs = statistical_rejection_sampling


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---------------------------------------------------------------- Algorithm 1: properties

@pytest.mark.timeout(30)
def test_argmax_accepted_first_and_max_recomputed_each_round():
    # Round 1: index 0 has probability 1, the others exp(-1000) = 0. Round 2 must recompute the
    # maximum over the remaining (-1000) to accept anything: a variant that kept m = 0 would
    # return one index or never stop (hence the timeout).
    rewards = [0.0] + [-1000.0] * 9
    seconds = []
    for seed in range(200):
        kept = rs(rewards, 3, 1.0, _rng(seed))
        assert kept[0] == 0
        assert len(kept) == 3 and len(set(kept)) == 3
        seconds.append(kept[1])
    # Round 2 visits the nine tied candidates in a fresh random order: several are reached first.
    assert len(set(seconds)) >= 6


@pytest.mark.parametrize("beta", [1e-3, 0.5, 2.0, 100.0])
def test_every_round_accepts_at_least_one(beta):
    gen = _rng(1)
    for seed in range(100):
        n = int(gen.integers(1, 30))
        rewards = gen.normal(scale=5.0, size=n)
        k = int(gen.integers(1, n + 1))
        kept = rs(rewards, k, beta, _rng(seed))
        assert len(kept) == k and len(set(kept)) == k
        assert all(0 <= i < n for i in kept)


def test_tiny_beta_on_distinct_rewards_is_topk_in_descending_order():
    gen = _rng(2)
    for seed in range(50):
        rewards = gen.permutation(20).astype(float)  # distinct, spaced by 1: exp(-1000) = 0
        kept = rs(rewards, 5, 1e-3, _rng(seed))
        assert kept == list(np.argsort(-rewards)[:5])


def test_beta_zero_is_topk_exactly_including_ties():
    gen = _rng(3)
    for seed in range(300):
        n = int(gen.integers(1, 13))
        rewards = gen.integers(0, 4, size=n).astype(float)  # many ties
        k = int(gen.integers(1, n + 3))
        kept = rs(rewards, k, 0.0, _rng(seed))
        assert len(kept) == min(k, n) and len(set(kept)) == len(kept)
        kept_rewards = [rewards[i] for i in kept]
        assert kept_rewards == sorted(rewards, reverse=True)[: len(kept)]  # best first


def test_beta_zero_breaks_ties_at_random():
    rewards = [1.0, 3.0, 3.0, 3.0, 0.0]
    firsts = {rs(rewards, 2, 0.0, _rng(seed))[0] for seed in range(60)}
    assert firsts == {1, 2, 3}


def test_beta_inf_is_a_uniform_random_subset():
    # Rewards differ a lot: any reward-dependent acceptance would skew the counts.
    rewards = [5.0, -3.0, 0.0, 1.0, 2.0, 10.0]
    n, k, trials = len(rewards), 2, 6000
    included = np.zeros(n)
    first = np.zeros(n)
    for seed in range(trials):
        kept = rs(rewards, k, math.inf, _rng(seed))
        assert len(kept) == k and len(set(kept)) == k
        included[kept] += 1
        first[kept[0]] += 1

    def chi_square(counts: np.ndarray) -> float:
        expected = counts.sum() / counts.size
        return float(((counts - expected) ** 2 / expected).sum())

    # 5 degrees of freedom: P(chi2 > 20.5) = 0.001. Top-k here would score in the thousands.
    assert chi_square(included) < 20.5
    assert chi_square(first) < 20.5


@pytest.mark.parametrize("beta", [0.0, 0.5, math.inf])
def test_fewer_candidates_than_k_keeps_all(beta):
    rewards = [0.3, -1.0, 2.0, 2.0, 0.0]
    kept = rs(rewards, 10, beta, _rng(4))
    assert sorted(kept) == [0, 1, 2, 3, 4]
    assert rs([], 3, beta, _rng(4)) == []


def test_same_seed_same_result_and_different_seeds_differ():
    rewards = _rng(5).normal(size=30)
    kept = rs(rewards, 8, 1.0, prompt_rng(7, "prompt-a", "select"))
    assert kept == rs(rewards, 8, 1.0, prompt_rng(7, "prompt-a", "select"))
    others = {tuple(rs(rewards, 8, 1.0, prompt_rng(7, f"prompt-{i}", "select")))
              for i in range(20)}
    assert len(others) >= 15


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_samples=0), "num_samples"),
    (dict(beta=-0.1), "beta"),
    (dict(beta=math.nan), "beta"),
    (dict(rewards=[1.0, math.nan]), "finite"),
    (dict(rewards=[1.0, math.inf]), "finite"),
    (dict(rewards=[-math.inf]), "finite"),
])
def test_invalid_arguments_raise(kwargs, message):
    args = dict(rewards=[1.0, 2.0], num_samples=1, beta=0.5, rng=_rng(0)) | kwargs
    with pytest.raises(ValueError, match=message):
        rs(**args)


def test_extreme_rewards_do_not_overflow():
    rewards = [1e308, -1e308, 0.0, 1e308]
    with np.errstate(all="raise"):
        kept = rs(rewards, 2, 1e-300, _rng(0))
    assert sorted(kept) == [0, 3]


# ---------------------------------------------------------------- Theorem 1

# Five distinct responses: pi_sft probabilities P and rewards R; target pi_r ∝ P exp(R / beta).
P = np.array([0.40, 0.25, 0.15, 0.12, 0.08])
R = np.array([0.0, 0.3, 0.8, 1.2, 1.5])
BETA = 0.5
PI_R = P * np.exp(R / BETA) / (P * np.exp(R / BETA)).sum()
N_CANDIDATES, TRIALS, TOLERANCE = 200, 4000, 0.04

Selector = Callable[[np.ndarray, int, np.random.Generator], list[int]]


def _accepted_distribution(selector: Selector, k: int) -> np.ndarray:
    """Empirical distribution of the responses kept from N draws of pi_sft, pooled over trials."""
    counts = np.zeros(P.size)
    for trial in range(TRIALS):
        rng = _rng(10_000 + trial)
        responses = rng.choice(P.size, size=N_CANDIDATES, p=P)
        for i in selector(R[responses], k, rng):
            counts[responses[i]] += 1
    return counts / counts.sum()


def _tv(a: np.ndarray, b: np.ndarray) -> float:
    return 0.5 * float(np.abs(a - b).sum())


def _wrong_temperature(rewards, k, rng):  # exp(r_i - m): beta forgotten
    return rs(rewards, k, 1.0, rng)


def _unnormalised(rewards, k, rng):  # accept with min(1, exp(r_i / beta)): max not subtracted
    order = rng.permutation(rewards.size)
    accept = rng.random(rewards.size) < np.minimum(1.0, np.exp(rewards[order] / BETA))
    return order[accept][:k].tolist()


@pytest.mark.parametrize("k", [1, 4])
def test_theorem_1_kept_responses_follow_pi_r(k):
    tv = _tv(_accepted_distribution(lambda r, kk, g: rs(r, kk, BETA, g), k), PI_R)
    assert tv < TOLERANCE, f"TV(kept, pi_r) = {tv:.3f}"


@pytest.mark.parametrize("wrong", [
    lambda r, k, g: g.permutation(r.size)[:k].tolist(),  # uniform: follows pi_sft, not pi_r
    lambda r, k, g: rs(r, k, 0.0, g),                     # top-k
    _wrong_temperature,
    _unnormalised,
], ids=["uniform", "top-k", "wrong-temperature", "unnormalised"])
def test_theorem_1_negative_controls_fail_the_same_bound(wrong):
    tv = _tv(_accepted_distribution(wrong, 1), PI_R)
    assert tv > 3 * TOLERANCE, f"a wrong selector passed: TV = {tv:.3f}"


# ---------------------------------------------------------------- select()

def test_selection_methods_match_the_config():
    assert set(SELECTION_METHODS) == set(get_args(Selection))


def test_select_rso_uses_beta_and_topk_ignores_it():
    rewards = [0.5, 3.0, -1.0, 2.0, 1.0]
    assert select("rso", rewards, 2, 0.0, _rng(0)) == [1, 3]
    assert select("top-k", rewards, 2, 50.0, _rng(0)) == [1, 3]
    assert {tuple(select("rso", rewards, 2, 50.0, _rng(s))) for s in range(30)} != {(1, 3)}


def test_select_random_ignores_beta():
    rewards = [0.5, 3.0, -1.0, 2.0, 1.0]
    kept = {tuple(sorted(select("random", rewards, 2, 0.0, _rng(s)))) for s in range(100)}
    assert len(kept) == 10  # every 2-subset of 5 appears


def test_select_best_of_n_keeps_one_argmax():
    assert select("best-of-n", [0.1, 0.9, 0.3], 8, 0.5, _rng(0)) == [1]
    tied = [2.0, 0.0, 2.0, 1.0]
    winners = {tuple(select("best-of-n", tied, 4, 0.5, _rng(s))) for s in range(40)}
    assert winners == {(0,), (2,)}


def test_select_rest_threshold_order_and_cap():
    rewards = [0.0, 1.0, 5.0, 2.0, 3.0, 4.0]  # normalised: r / 5
    assert select("rest", rewards, 8, 0.5, _rng(0)) == [2, 5]  # 1.0, 0.8 > 0.7; best first
    assert select("rest", rewards, 1, 0.5, _rng(0)) == [2]
    assert select("rest", rewards, 8, 0.5, _rng(0), rest_threshold=0.5) == [2, 5, 4]
    assert select("rest", rewards, 8, 0.5, _rng(0), rest_threshold=0.0) == [2, 5, 4, 3, 1]
    # Strictly exceeds: 0.8 is not > 0.8.
    assert rest_filter(rewards, 8, 0.8) == [2]
    # Equal rewards rank by index.
    assert rest_filter([1.0, 3.0, 3.0, 0.0], 8, 0.7) == [1, 2]


def test_select_rest_all_equal_rewards_keeps_nothing():
    assert select("rest", [1.5, 1.5, 1.5], 2, 0.5, _rng(0)) == []
    assert select("rest", [7.0], 2, 0.5, _rng(0)) == []
    assert select("rest", [], 2, 0.5, _rng(0)) == []


@pytest.mark.parametrize("threshold", [-0.1, 1.0, math.nan])
def test_select_rest_rejects_bad_threshold(threshold):
    with pytest.raises(ValueError, match="rest_threshold"):
        select("rest", [0.0, 1.0], 2, 0.5, _rng(0), rest_threshold=threshold)


def test_select_unknown_method():
    with pytest.raises(ValueError, match="unknown selection method 'beam'.*rso"):
        select("beam", [0.0], 1, 0.5, _rng(0))


@pytest.mark.parametrize("method", SELECTION_METHODS)
def test_every_method_validates_rewards(method):
    with pytest.raises(ValueError, match="finite"):
        select(method, [0.0, math.nan], 1, 0.5, _rng(0))


# ---------------------------------------------------------------- dedup()

def test_dedup_keeps_first_occurrences_in_order():
    ids = [[1, 2], [3], (1, 2), [], np.array([3]), [], [2, 1], [1, 2, 0]]
    assert dedup(ids) == [0, 1, 3, 6, 7]
    assert dedup([]) == []
    assert dedup([[5, 5]] * 4) == [0]


# ---------------------------------------------------------------- rounds, beta scale, effect
# (docs/SELECTION.md)
from beam_pipelines.config import BetaScale, GenerateConfig  # noqa: E402
from beam_pipelines.sampling import (  # noqa: E402
    BETA_SCALES,
    RANDOM_Z,
    Round,
    rejection_sampling_rounds,
    reward_spread,
    scaled_beta,
    select_rounds,
    selection_effect,
)


@pytest.mark.parametrize("beta", [0.0, 0.1, 1.0, math.inf])
def test_rounds_keep_the_same_indices_and_add_up(beta):
    gen = _rng(11)
    for seed in range(200):
        n = int(gen.integers(1, 20))
        rewards = gen.normal(size=n)
        k = int(gen.integers(1, n + 2))
        indices, rounds = rejection_sampling_rounds(rewards, k, beta, _rng(seed))
        assert indices == rs(rewards, k, beta, _rng(seed))
        assert sum(r.accepted for r in rounds) == len(indices) == min(k, n)
        remaining = n
        for j, r in enumerate(rounds):
            assert 1 <= r.accepted <= r.visited <= remaining
            if j < len(rounds) - 1:  # k not yet filled: the whole round was visited
                assert r.visited == remaining
            remaining -= r.accepted


def test_rounds_of_the_limits():
    rewards = [0.0, 3.0, 1.0, 2.0]
    # beta = inf: one round, the first k visited are all accepted.
    assert rejection_sampling_rounds(rewards, 3, math.inf, _rng(0))[1] == [Round(3, 3)]
    # beta = 0 on distinct rewards: one acceptance (the maximum) per round.
    _, rounds = rejection_sampling_rounds(rewards, 3, 0.0, _rng(0))
    assert [r.accepted for r in rounds] == [1, 1, 1]
    assert [r.visited for r in rounds[:2]] == [4, 3]
    # Round acceptance rate of a tiny beta is ~1/remaining; of a huge beta ~1.
    _, rounds = rejection_sampling_rounds(np.linspace(0, 1, 64), 8, 1e3, _rng(0))
    assert len(rounds) == 1 and rounds[0].visited <= 9


@pytest.mark.parametrize("method", SELECTION_METHODS)
def test_select_rounds_agrees_with_select(method):
    gen = _rng(5)
    for seed in range(30):
        rewards = gen.normal(size=12)
        for scale in BETA_SCALES:
            result = select_rounds(method, rewards, 4, 0.5, _rng(seed), beta_scale=scale)
            assert result.indices == select(method, rewards, 4, 0.5, _rng(seed), beta_scale=scale)
            assert (result.rounds == []) == (method == "rest")
    assert select_rounds("top-k", [1.0, 2.0], 1, 9.0, _rng(0)).beta == 0.0
    assert select_rounds("random", [1.0, 2.0], 1, 9.0, _rng(0), beta_scale="std").beta == math.inf
    assert select_rounds("rest", [1.0, 2.0], 1, 9.0, _rng(0)).beta is None


def test_beta_scales_match_the_config():
    assert set(BETA_SCALES) == set(get_args(BetaScale))
    assert GenerateConfig().beta_scale == "none"


def test_scaled_beta():
    rewards = [1.0, 2.0, 3.0, 4.0]
    sigma = math.sqrt(1.25)
    assert reward_spread(rewards) == pytest.approx(sigma)
    assert scaled_beta(0.5, rewards) == 0.5
    assert scaled_beta(0.5, rewards, "none") == 0.5
    assert scaled_beta(0.5, rewards, "std") == pytest.approx(0.5 * sigma)
    assert scaled_beta(0.0, rewards, "std") == 0.0
    assert scaled_beta(math.inf, [1.0, 1.0], "std") == math.inf  # not inf * 0 = nan
    assert scaled_beta(0.5, [7.0], "std") == 0.0
    assert scaled_beta(0.5, [], "std") == 0.0
    with pytest.raises(ValueError, match="beta scale 'iqr'"):
        scaled_beta(0.5, rewards, "iqr")
    with pytest.raises(ValueError, match="beta must be >= 0"):
        scaled_beta(-1.0, rewards, "std")


def test_std_scale_is_invariant_to_affine_rewards_and_none_is_not():
    gen = _rng(3)
    rewards = gen.normal(scale=0.25, size=16)
    moved = 40.0 * rewards - 3.0
    same_std = differ_none = 0
    for seed in range(100):
        same_std += select("rso", rewards, 4, 0.5, _rng(seed), beta_scale="std") == \
            select("rso", moved, 4, 0.5, _rng(seed), beta_scale="std")
        differ_none += select("rso", rewards, 4, 0.5, _rng(seed)) != \
            select("rso", moved, 4, 0.5, _rng(seed))
    assert same_std == 100
    assert differ_none >= 50


def _mean_effect(scale: str, beta: float, reward_std: float, seeds: int = 300):
    gen = _rng(17)
    effects = []
    for seed in range(seeds):
        rewards = gen.normal(scale=reward_std, size=16)
        kept = select("rso", rewards, 4, beta, _rng(seed), beta_scale=scale)
        effects.append(selection_effect(rewards, rewards[kept]))
    return (float(np.mean([e.relative_gain for e in effects])),
            float(np.mean([e.like_random for e in effects])),
            float(np.mean([e.equals_top_k for e in effects])))


def test_uncalibrated_rewards_make_a_fixed_beta_random_and_std_scale_fixes_it():
    # The demo's reward model: std 0.25, beta 0.5 in reward units is nearly uniform selection.
    gain_none, random_none, _ = _mean_effect("none", 0.5, 0.25)
    gain_std, random_std, _ = _mean_effect("std", 0.5, 0.25)
    # Measured: relative gain 0.37 and 80% like random (none) vs 0.87 and 15% (std).
    assert gain_none < 0.45 and random_none > 0.7
    assert gain_std > 0.8 and random_std < 0.25
    # Under "std" the effect does not depend on the reward's unit.
    assert _mean_effect("std", 0.5, 25.0) == pytest.approx((gain_std, random_std, _mean_effect(
        "std", 0.5, 0.25)[2]), abs=1e-9)


def test_selection_effect_by_hand():
    e = selection_effect([0.0, 1.0, 2.0, 3.0], [3.0, 2.0])
    assert (e.num_candidates, e.num_accepted, e.decisive) == (4, 2, True)
    assert e.spread == pytest.approx(math.sqrt(1.25))
    assert e.gain == pytest.approx(1.0) and e.relative_gain == pytest.approx(1.0)
    assert e.z == pytest.approx(1.0 / math.sqrt(1.25 / 2 * 2 / 3))  # 1.549
    assert e.equals_top_k and e.like_random  # n = 4 is too small to tell them apart
    e = selection_effect([0.0, 1.0, 2.0, 3.0], [0.0, 3.0])
    assert e.gain == 0.0 and e.relative_gain == 0.0 and not e.equals_top_k and e.like_random
    e = selection_effect([0.0, 2.0, 2.0, 1.0], [2.0])  # either tied maximum is top-k
    assert e.equals_top_k
    for cands, acc in [([1.0, 2.0], [1.0, 2.0]), ([5.0, 5.0, 5.0], [5.0]), ([1.0], [1.0]),
                       ([1.0, 2.0], [])]:
        e = selection_effect(cands, acc)
        assert not (e.decisive or e.equals_top_k or e.like_random)
        assert e.z is None and e.relative_gain is None
    assert selection_effect([1.0, 2.0], []).gain is None
    with pytest.raises(ValueError, match="finite"):
        selection_effect([1.0, math.inf], [1.0])


def test_z_is_calibrated_for_random_subsets_and_large_for_top_k():
    gen = _rng(23)
    random_flags, topk_flags = [], []
    for seed in range(2000):
        rewards = gen.normal(size=64)
        kept = select("random", rewards, 8, 0.0, _rng(seed))
        random_flags.append(selection_effect(rewards, rewards[kept]).like_random)
        top = select("top-k", rewards, 8, 0.0, _rng(seed))
        e = selection_effect(rewards, rewards[top])
        topk_flags.append((e.like_random, e.equals_top_k, e.relative_gain))
    assert 0.93 < np.mean(random_flags) < 0.97  # the two-sided 5% test's nominal 0.95
    assert all(not lr and eq and rg == pytest.approx(1.0) for lr, eq, rg in topk_flags)
    assert RANDOM_Z == 1.96
