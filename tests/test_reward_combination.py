from __future__ import annotations

import math

import pytest

from beam_pipelines.reward_combination import combine_rewards


def test_weighted_sum():
    assert combine_rewards([[1.0, 2.0], [3.0, -1.0]], [1.0, 0.5]) == [2.5, 1.5]


def test_mean_minus_std_penalises_disagreement():
    # candidate 0: models agree (2, 2); candidate 1: same mean, they disagree (0, 4)
    r = combine_rewards([[2.0, 0.0], [2.0, 4.0]], [1.0, 1.0], "mean-minus-std", 0.5)
    assert r == pytest.approx([2.0, 2.0 - 0.5 * 2.0])


def test_one_model_is_its_weighted_score():
    assert combine_rewards([[1.0, -2.0]], [2.0], "mean-minus-std", 3.0) == [2.0, -4.0]


def test_nan_propagates_and_bad_arguments_raise():
    assert math.isnan(combine_rewards([[math.nan]], [1.0])[0])
    with pytest.raises(ValueError, match="shape"):
        combine_rewards([[1.0]], [1.0, 1.0])
    with pytest.raises(ValueError, match="penalty"):
        combine_rewards([[1.0]], [1.0], "mean-minus-std", -1.0)
    with pytest.raises(ValueError, match="unknown"):
        combine_rewards([[1.0]], [1.0], "max")
