"""Preference pairing (SPEC 4): counts, orientation, ties, tournament structure, determinism."""
from __future__ import annotations

import itertools
import math
from collections import Counter
from typing import get_args

import numpy as np
import pytest

from beam_pipelines.config import Pairing
from beam_pipelines.pairing import PAIRING_METHODS, make_pairs
from beam_pipelines.seeding import prompt_rng


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _distinct_rewards(k: int, seed: int) -> np.ndarray:
    return _rng(seed).permutation(k) * 0.5 - 1.0


def test_pairing_methods_match_the_config():
    assert set(PAIRING_METHODS) == set(get_args(Pairing))


@pytest.mark.parametrize("k", [1, 2, 3, 7, 8, 9])
def test_pair_counts_and_orientation(k):
    expected = {"first-round": k // 2, "tournament": k - 1, "all-pairs": k * (k - 1) // 2}
    for seed in range(20):
        rewards = _distinct_rewards(k, seed)
        for method, count in expected.items():
            pairs, dropped = make_pairs(method, rewards, _rng(seed))
            assert (len(pairs), dropped) == (count, 0)
            for chosen, rejected in pairs:
                assert chosen != rejected and 0 <= chosen < k and 0 <= rejected < k
                assert rewards[chosen] > rewards[rejected]


def test_first_round_pairs_are_disjoint_and_shuffled():
    k = 8
    rewards = _distinct_rewards(k, 0)
    seen = set()
    for seed in range(50):
        pairs, _ = make_pairs("first-round", rewards, _rng(seed))
        members = [i for pair in pairs for i in pair]
        assert sorted(members) == list(range(k))
        seen.add(frozenset(frozenset(p) for p in pairs))
    assert len(seen) >= 40  # 105 possible matchings of 8


def test_first_round_odd_leaves_exactly_one_out():
    rewards = _distinct_rewards(7, 1)
    left_out = Counter()
    for seed in range(140):
        pairs, _ = make_pairs("first-round", rewards, _rng(seed))
        members = {i for pair in pairs for i in pair}
        assert len(members) == 6
        left_out.update(set(range(7)) - members)
    assert set(left_out) == set(range(7))


@pytest.mark.parametrize("k", [2, 3, 5, 6, 8, 11])
def test_tournament_is_single_elimination_won_by_the_max(k):
    for seed in range(30):
        rewards = _distinct_rewards(k, seed)
        pairs, _ = make_pairs("tournament", rewards, _rng(seed))
        losers = [rejected for _, rejected in pairs]
        champion = int(np.argmax(rewards))
        # Everyone but the champion loses exactly once; the champion never loses.
        assert sorted(losers) == sorted(set(range(k)) - {champion})
        # The last game is the final, and the champion wins it.
        assert pairs[-1][0] == champion
        # Nobody plays after losing.
        for position, (_, loser) in enumerate(pairs):
            assert all(loser not in later for later in pairs[position + 1:])


def test_tournament_first_round_is_the_first_round_pairing():
    rewards = _distinct_rewards(8, 3)
    for seed in range(10):
        first, _ = make_pairs("first-round", rewards, _rng(seed))
        tournament, _ = make_pairs("tournament", rewards, _rng(seed))
        assert tournament[:4] == first


def test_tournament_bye_does_not_repeat():
    # With 5 entrants the bye of round 1 plays first in round 2: every entrant plays at least
    # once before the final, so nobody reaches the final with two byes.
    rewards = _distinct_rewards(5, 4)
    for seed in range(30):
        pairs, _ = make_pairs("tournament", rewards, _rng(seed))
        before_final = {i for pair in pairs[:-1] for i in pair}
        assert before_final == set(range(5))


def test_tournament_tie_winner_is_the_lower_index():
    # Rewards [3, 3, 0]: the bracket is a shuffle of three; one game then the final.
    # If 0 and 1 meet first (tie, dropped), 0 advances and beats 2: pair (0, 2).
    # If 0 beats 2 first, the final 0-1 is a tie: pair (0, 2). If 1 beats 2 first: pair (1, 2).
    # So (0, 2) happens 2/3 of the time with the lower-index rule (1/3 with higher-index,
    # 1/2 with a coin flip).
    outcomes = Counter()
    for seed in range(600):
        pairs, dropped = make_pairs("tournament", [3.0, 3.0, 0.0], _rng(seed))
        assert dropped == 1 and len(pairs) == 1
        outcomes[pairs[0]] += 1
    assert set(outcomes) == {(0, 2), (1, 2)}
    assert 0.6 < outcomes[(0, 2)] / 600 < 0.73


def test_all_pairs_covers_every_pair_once():
    rewards = _distinct_rewards(6, 5)
    pairs, dropped = make_pairs("all-pairs", rewards, _rng(0))
    assert dropped == 0
    assert sorted(frozenset(p) for p in pairs) == sorted(
        frozenset(p) for p in itertools.combinations(range(6), 2))


@pytest.mark.parametrize("method, games", [("first-round", 2), ("tournament", 3),
                                           ("all-pairs", 6)])
def test_equal_rewards_are_all_dropped_and_counted(method, games):
    assert make_pairs(method, [1.5, 1.5, 1.5, 1.5], _rng(0)) == ([], games)


def test_tie_margin_drops_close_pairs():
    rewards = [0.0, 0.3, 1.0, 2.0]
    pairs, dropped = make_pairs("all-pairs", rewards, _rng(0), tie_margin=0.5)
    assert dropped == 1  # only 0.0 vs 0.3
    assert sorted(pairs) == [(2, 0), (2, 1), (3, 0), (3, 1), (3, 2)]
    # The margin is inclusive: a difference of exactly 1.0 is a tie at tie_margin=1.0.
    pairs, dropped = make_pairs("all-pairs", rewards, _rng(0), tie_margin=1.0)
    assert (sorted(pairs), dropped) == ([(3, 0), (3, 1)], 4)
    # With the default margin only exact equality is a tie.
    pairs, dropped = make_pairs("all-pairs", [0.0, 0.0, 1e-12], _rng(0))
    assert (sorted(pairs), dropped) == ([(2, 0), (2, 1)], 1)


def test_tournament_with_margin_still_advances_the_better_one():
    # 1.0 beats 0.9 (a tie within margin, dropped) and must then meet 5.0 in the final.
    for seed in range(20):
        pairs, dropped = make_pairs("tournament", [0.9, 1.0, 5.0], _rng(seed), tie_margin=0.2)
        assert dropped in (0, 1)
        if dropped:  # 0 and 1 met first
            assert pairs == [(2, 1)]
        else:  # 2 played one of them first, then beat the other in the final
            assert len(pairs) == 2 and all(chosen == 2 for chosen, _ in pairs)


DETERMINISTIC = ("all-pairs", "best-vs-worst", "best-vs-mean-2std")


@pytest.mark.parametrize("method", PAIRING_METHODS)
def test_deterministic_for_the_same_prompt_seed(method):
    rewards = _distinct_rewards(8, 6)
    first = make_pairs(method, rewards, prompt_rng(3, "p-1", "pair"))
    assert first == make_pairs(method, rewards, prompt_rng(3, "p-1", "pair"))
    others = {tuple(make_pairs(method, rewards, prompt_rng(3, f"p-{i}", "pair"))[0])
              for i in range(10)}
    if method in DETERMINISTIC:  # no random choice: the same pairs for every prompt
        assert len(others) == 1
    else:
        assert len(others) >= 8


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="swiss"), "unknown pairing method 'swiss'"),
    (dict(tie_margin=-0.1), "tie_margin"),
    (dict(tie_margin=math.nan), "tie_margin"),
    (dict(rewards=[0.0, math.inf]), "finite"),
])
def test_invalid_arguments_raise(kwargs, message):
    args = dict(method="first-round", rewards=[0.0, 1.0], rng=_rng(0)) | kwargs
    with pytest.raises(ValueError, match=message):
        make_pairs(**args)


def test_empty_and_single():
    for method in PAIRING_METHODS:
        assert make_pairs(method, [], _rng(0)) == ([], 0)
        assert make_pairs(method, [2.0], _rng(0)) == ([], 0)


def test_best_vs_worst():
    rng = np.random.default_rng(0)
    assert make_pairs("best-vs-worst", [0.3, 2.0, -1.0, 1.0], rng) == ([(1, 2)], 0)
    assert make_pairs("best-vs-worst", [1.0], rng) == ([], 0)
    # all equal: one game, dropped as a tie
    assert make_pairs("best-vs-worst", [1.0, 1.0, 1.0], rng) == ([], 1)


def test_best_vs_mean_minus_2std_picks_the_response_nearest_the_target():
    r = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, -3.0])
    target = r.mean() - 2 * r.std()  # 3.0 - 2 * 3.195 = -3.39: nearest is -3.0 (index 9)
    assert abs(r[9] - target) < abs(r[0] - target)
    assert make_pairs("best-vs-mean-2std", r, np.random.default_rng(0)) == ([(8, 9)], 0)
    # two responses: the only other one is rejected
    assert make_pairs("best-vs-mean-2std", [1.0, 0.0], np.random.default_rng(0)) == ([(0, 1)], 0)
