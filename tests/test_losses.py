"""SPEC 6 losses: each formula against a hand computation, and the properties that matter."""
from __future__ import annotations

import math

import pytest
import torch

from trainer.losses import LOSS_TYPES, implicit_rewards, preference_loss

POLICY_W = torch.tensor([-10.0, -4.0, -7.5, -3.0], dtype=torch.float64)
POLICY_L = torch.tensor([-12.0, -3.0, -7.5, -9.0], dtype=torch.float64)
REF_W = torch.tensor([-11.0, -4.5, -7.0, -2.0], dtype=torch.float64)
REF_L = torch.tensor([-11.5, -2.0, -8.0, -9.5], dtype=torch.float64)


def expected(loss_type: str, gamma: float, i: int) -> float:
    """SPEC 6, written with Python floats."""
    pw, pl, rw, rl = (float(t[i]) for t in (POLICY_W, POLICY_L, REF_W, REF_L))
    d_w, d_l = pw - rw, pl - rl
    if loss_type == "sigmoid-norm":
        return -math.log(1.0 / (1.0 + math.exp(-gamma * (d_w - d_l))))
    if loss_type == "hinge-norm":
        return max(0.0, 1.0 - gamma * (d_w - d_l))
    if loss_type == "hinge":
        return max(0.0, 1.0 - gamma * (pw - pl))
    return ((d_w - d_l) - 1.0 / (2.0 * gamma)) ** 2


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("gamma", [0.05, 0.5, 3.0])
def test_formulas(loss_type, gamma):
    got = preference_loss(POLICY_W, POLICY_L, REF_W, REF_L, loss_type, gamma)
    assert got.shape == (4,)
    for i in range(4):
        assert got[i].item() == pytest.approx(expected(loss_type, gamma, i), rel=1e-12, abs=1e-12)


def test_loss_types_are_the_spec_ones():
    assert set(LOSS_TYPES) == {"sigmoid-norm", "hinge-norm", "hinge", "ipo"}


def test_sigmoid_norm_is_log2_when_policy_is_reference():
    logps = torch.tensor([-3.0, -40.0, -0.1])
    other = torch.tensor([-5.0, -1.0, -60.0])
    loss = preference_loss(logps, other, logps, other, "sigmoid-norm", 0.05)
    assert torch.allclose(loss, torch.full((3,), math.log(2.0)))


def test_hinge_ignores_reference_and_normalised_losses_do_not():
    a = preference_loss(POLICY_W, POLICY_L, REF_W, REF_L, "hinge", 0.5)
    b = preference_loss(POLICY_W, POLICY_L, REF_W * 3, REF_L - 7, "hinge", 0.5)
    assert torch.equal(a, b)
    for loss_type in ("sigmoid-norm", "hinge-norm", "ipo"):
        c = preference_loss(POLICY_W, POLICY_L, REF_W, REF_L, loss_type, 0.5)
        d = preference_loss(POLICY_W, POLICY_L, REF_W, REF_L - 1.0, loss_type, 0.5)
        assert not torch.allclose(c, d)


def test_hinge_is_zero_past_the_margin():
    # gamma * (d_w - d_l) = 0.5 * 4 = 2 > 1: no loss, no gradient.
    pw = torch.tensor([0.0], requires_grad=True)
    loss = preference_loss(pw, torch.tensor([-4.0]), torch.zeros(1), torch.zeros(1),
                           "hinge-norm", 0.5)
    loss.sum().backward()
    assert loss.item() == 0.0 and pw.grad.item() == 0.0


def test_ipo_minimum_is_at_margin_one_over_two_gamma():
    gamma = 0.25
    margin = torch.tensor([1.0 / (2 * gamma)])
    assert preference_loss(margin, torch.zeros(1), torch.zeros(1), torch.zeros(1), "ipo",
                           gamma).item() == 0.0


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradient_raises_chosen_and_lowers_rejected(loss_type):
    pw = torch.tensor([-5.0], requires_grad=True)
    pl = torch.tensor([-5.0], requires_grad=True)
    preference_loss(pw, pl, torch.tensor([-5.0]), torch.tensor([-5.0]), loss_type,
                    0.1).sum().backward()
    assert pw.grad.item() < 0 < pl.grad.item()


def test_sigmoid_norm_is_stable_for_large_margins():
    loss = preference_loss(torch.tensor([-1e4]), torch.tensor([0.0]), torch.zeros(1),
                           torch.zeros(1), "sigmoid-norm", 1.0)
    assert torch.isfinite(loss).all() and loss.item() == pytest.approx(1e4)


def test_implicit_rewards_are_gamma_times_d():
    rw, rl = implicit_rewards(POLICY_W, POLICY_L, REF_W, REF_L, 0.05)
    assert torch.allclose(rw, 0.05 * (POLICY_W - REF_W))
    assert torch.allclose(rl, 0.05 * (POLICY_L - REF_L))


@pytest.mark.parametrize("gamma", [0.0, -1.0, math.inf, math.nan])
def test_bad_gamma_is_refused(gamma):
    with pytest.raises(ValueError, match="gamma"):
        preference_loss(POLICY_W, POLICY_L, REF_W, REF_L, "sigmoid-norm", gamma)


def test_unknown_loss_is_refused():
    with pytest.raises(ValueError, match="unknown loss_type"):
        preference_loss(POLICY_W, POLICY_L, REF_W, REF_L, "dpo", 0.1)
