"""Optimizer (AdamW or Adafactor) and learning-rate schedule (warm-up, then constant, linear or
cosine decay)."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from trainer.config import TrainConfig


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, kind: str) -> float:
    """Factor applied to the peak learning rate before optimizer step ``step`` (0-based).

    Warm-up, for step < W:  (step + 1) / W
    then with p = (step - W) / max(1, T - W), clamped to [0, 1]:
      constant: 1;   linear: 1 - p;   cosine: (1 + cos(pi * p)) / 2
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    progress = min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {kind!r}")


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (torch), or Adafactor (transformers) as the paper used it: factored second moment,
    no first moment; its learning rate is ours (no relative step, no parameter scaling)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        # The fused kernel (CPU and CUDA) steps all parameters at once: measured 0.34-0.40 s
        # per step on SmolLM2-135M on 2 CPU cores against 1.4-4.4 s for the per-tensor loop,
        # and a lower memory peak.
        fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point
                    for p in params)
        return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                 eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
                                 fused=fused or None)
    from transformers.optimization import Adafactor

    return Adafactor(params, lr=cfg.lr, scale_parameter=False, relative_step=False,
                     warmup_init=False, weight_decay=cfg.weight_decay, beta1=None)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    def multiplier(step: int) -> float:
        return lr_multiplier(step, cfg.warmup_steps, total_steps, cfg.scheduler)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def override_saved_hyperparameters(optimizer_state: dict, scheduler_state: dict,
                                   cfg: TrainConfig, names: Sequence[str],
                                   total_steps: int) -> None:
    """Writes ``cfg``'s values of ``names`` (of lr, weight_decay, adam_beta1, adam_beta2,
    adam_eps) into a checkpoint's optimizer and scheduler state dicts, in place, before they are
    loaded. Needed because ``Optimizer.load_state_dict`` restores the hyper-parameters saved in
    ``param_groups`` and ``LambdaLR.load_state_dict`` its ``base_lrs``: without this, a resumed
    run would silently keep the old values. Settings the optimizer has no use for (Adam's betas
    and eps under Adafactor) are left alone."""
    lr = cfg.lr * lr_multiplier(scheduler_state["last_epoch"], cfg.warmup_steps, total_steps,
                                cfg.scheduler)
    for group in optimizer_state["param_groups"]:
        if "lr" in names:
            group["initial_lr"], group["lr"] = cfg.lr, lr
        if "weight_decay" in names:
            group["weight_decay"] = cfg.weight_decay
        if cfg.optimizer == "adamw":
            beta1, beta2 = group["betas"]
            group["betas"] = (cfg.adam_beta1 if "adam_beta1" in names else beta1,
                              cfg.adam_beta2 if "adam_beta2" in names else beta2)
            if "adam_eps" in names:
                group["eps"] = cfg.adam_eps
    if "lr" in names:
        groups = len(optimizer_state["param_groups"])
        scheduler_state["base_lrs"] = [cfg.lr] * groups
        scheduler_state["_last_lr"] = [lr] * groups
