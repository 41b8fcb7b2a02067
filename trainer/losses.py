"""Preference losses of SPEC section 6, one small function per loss, all per pair.

Notation: for a pair (x, y_w, y_l) with summed response log-probs under the policy
``log pi_theta(y|x)`` and stored reference log-probs ``log pi_ref(y|x)``:

    d_w = log pi_theta(y_w|x) - log pi_ref(y_w|x)
    d_l = log pi_theta(y_l|x) - log pi_ref(y_l|x)

gamma is the loss scale (paper default 0.05); it is not the sampling beta of rejection sampling.
Every function takes float tensors of shape [B] and returns the per-pair losses, shape [B].
Pure tensor functions: no model, no data, no reduction.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import get_args

import torch
import torch.nn.functional as F

from trainer.config import LossType

LOSS_TYPES: tuple[str, ...] = get_args(LossType)


def sigmoid_norm_loss(d_w: torch.Tensor, d_l: torch.Tensor, gamma: float) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, eq. 7) / RSO "sigmoid-norm":

        L = -log sigmoid(gamma * (d_w - d_l))

    Equals log 2 when the policy is the reference (d_w = d_l = 0).
    """
    return -F.logsigmoid(gamma * (d_w - d_l))


def hinge_norm_loss(d_w: torch.Tensor, d_l: torch.Tensor, gamma: float) -> torch.Tensor:
    """Normalised SLiC / RSO "hinge-norm" (Liu et al. 2024, eq. 4):

        L = max(0, 1 - gamma * (d_w - d_l))
    """
    return torch.relu(1.0 - gamma * (d_w - d_l))


def hinge_loss(logp_w: torch.Tensor, logp_l: torch.Tensor, gamma: float) -> torch.Tensor:
    """SLiC-HF calibration loss (Zhao et al. 2023), no reference model:

        L = max(0, 1 - gamma * (log pi_theta(y_w|x) - log pi_theta(y_l|x)))
    """
    return torch.relu(1.0 - gamma * (logp_w - logp_l))


def ipo_loss(d_w: torch.Tensor, d_l: torch.Tensor, gamma: float) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17) with tau = gamma:

        L = ((d_w - d_l) - 1 / (2 * gamma)) ** 2
    """
    return ((d_w - d_l) - 1.0 / (2.0 * gamma)) ** 2


def preference_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                    ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
                    loss_type: str, gamma: float) -> torch.Tensor:
    """Per-pair loss ``loss_type`` of SPEC 6 ("sigmoid-norm", "hinge-norm", "hinge", "ipo").

    All inputs are [B] tensors of summed response log-probs; returns [B] losses. The reference
    log-probs are ignored by "hinge".
    """
    if not (gamma > 0 and math.isfinite(gamma)):
        raise ValueError(f"gamma must be a positive finite number, got {gamma}")
    if loss_type == "hinge":
        return hinge_loss(policy_chosen_logps, policy_rejected_logps, gamma)
    normalised: dict[str, Callable[..., torch.Tensor]] = {
        "sigmoid-norm": sigmoid_norm_loss, "hinge-norm": hinge_norm_loss, "ipo": ipo_loss}
    if loss_type not in normalised:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    d_w = policy_chosen_logps - ref_chosen_logps
    d_l = policy_rejected_logps - ref_rejected_logps
    return normalised[loss_type](d_w, d_l, gamma)


def implicit_rewards(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                     ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
                     gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The implicit rewards ``(gamma * d_w, gamma * d_l)`` of each pair (DPO section 5)."""
    return (gamma * (policy_chosen_logps - ref_chosen_logps),
            gamma * (policy_rejected_logps - ref_rejected_logps))


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Reward-model loss of the Bradley-Terry model (Bradley & Terry 1952; InstructGPT,
    Ouyang et al. 2022, eq. 1; TRL's RewardTrainer):

        L = -log sigmoid(r(x, y_w) - r(x, y_l))

    ``r_chosen``, ``r_rejected``: [B] scalar rewards; returns [B] losses (log 2 when equal).
    """
    return -F.logsigmoid(r_chosen - r_rejected)
