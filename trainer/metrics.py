"""What the trainer reports: per-step metrics to JSONL and TensorBoard, and a progress bar.

``OUTPUT/metrics.jsonl`` holds one JSON object per line with a ``split``:
- ``train`` (every --log-every steps): loss, accuracy (share of pairs with gamma*d_w >
  gamma*d_l), reward_margin, reward_chosen = gamma*d_w, reward_rejected = gamma*d_l,
  logp_chosen, logp_rejected, grad_norm, lr, pairs, tokens, padding (share of padded
  positions), step_time_s, pairs_per_s, tokens_per_s, peak_rss_gib (and peak_cuda_gib), epoch;
- ``eval``: the same pair metrics over the held-out pairs;
- ``reference``: the step-0 gap between stored and recomputed reference log-probs;
- ``summary`` (last line): steps, pairs, tokens, train_time_s (optimizer steps, data reading
  included; start-up, evaluation and checkpoints excluded), pairs_per_s and tokens_per_s over
  that time, wall_time_s (the whole run), peak memory, final_checkpoint.
A train record at step s describes the parameters before update s (so step 1 is the initial
policy).
"""
from __future__ import annotations

import json
import logging
import os
import resource
import sys
from typing import Any

import torch

from trainer.losses import implicit_rewards

GIB = 1024 ** 3


class PairMetrics:
    """Running sums over pairs of one step (or of an evaluation); :meth:`means` averages them."""

    def __init__(self) -> None:
        self.pairs = 0
        self.tokens = 0
        self.positions = 0
        self.sums: dict[str, float] = {}

    def add(self, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
            ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, losses: torch.Tensor,
            gamma: float, tokens: int = 0, positions: int = 0) -> None:
        with torch.no_grad():
            chosen, rejected = implicit_rewards(policy_chosen, policy_rejected, ref_chosen,
                                                ref_rejected, gamma)
            values = {"loss": losses, "accuracy": (chosen > rejected).float(),
                      "reward_margin": chosen - rejected, "reward_chosen": chosen,
                      "reward_rejected": rejected, "logp_chosen": policy_chosen,
                      "logp_rejected": policy_rejected}
            for name, v in values.items():
                self.sums[name] = self.sums.get(name, 0.0) + float(v.detach().float().sum())
        self.pairs += int(losses.numel())
        self.tokens += tokens
        self.positions += positions

    def means(self) -> dict[str, float]:
        out = {name: total / max(1, self.pairs) for name, total in self.sums.items()}
        out.update(pairs=self.pairs, tokens=self.tokens,
                   padding=1.0 - self.tokens / self.positions if self.positions else 0.0)
        return out


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak resident memory of this process (GiB) and, on CUDA, peak allocated device memory."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024
    out = {"peak_rss_gib": rss_bytes / GIB}
    if device.type == "cuda":
        out["peak_cuda_gib"] = torch.cuda.max_memory_allocated(device) / GIB
    return out


METRICS_FILE = "metrics.jsonl"  # in the training output directory


class MetricsWriter:
    """Appends records to OUTPUT/metrics.jsonl and scalars to TensorBoard (``split/name``).

    On resume from step s, records after s (written by the interrupted run) are dropped first,
    so the file reads as one uninterrupted run.
    """

    def __init__(self, output: str, tensorboard: bool, resume_step: int | None = None):
        self.path = os.path.join(output, METRICS_FILE)
        if resume_step is not None:
            self._truncate_after(resume_step)
        elif os.path.exists(self.path):
            os.remove(self.path)
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(output, "tensorboard"),
                                     purge_step=resume_step + 1 if resume_step else None)

    def _truncate_after(self, step: int) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            kept = [line for line in f if line.strip() and
                    json.loads(line).get("split") != "summary" and
                    json.loads(line).get("step", 0) <= step]
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(kept)

    def log(self, split: str, step: int, values: dict[str, Any]) -> None:
        record = {"split": split, "step": step, **values}
        self._file.write(json.dumps(record, sort_keys=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{split}/{name}", v, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class Progress:
    """Progress over optimizer steps showing loss, accuracy and pairs/s: a tqdm bar on a
    terminal, a log line a minute when stderr is redirected (:class:`rso.console.ProgressBar`)."""

    def __init__(self, total: int, initial: int, enabled: bool):
        import contextlib

        from tqdm.contrib.logging import logging_redirect_tqdm

        from rso.console import ProgressBar

        self._bar = ProgressBar(total, initial=initial, enabled=enabled, unit="step",
                                desc="train", logger=logging.getLogger("trainer.progress"))
        # log lines while the bar is shown go above it (tqdm.write), not into its line, whatever
        # handler the root logger has (rso.console's already writes through tqdm.write; a
        # library user's plain StreamHandler is redirected while the bar is open)
        self._redirect = contextlib.ExitStack()
        if enabled:
            self._redirect.enter_context(logging_redirect_tqdm())

    def update(self, values: dict[str, float]) -> None:
        self._bar.set_postfix(loss=f"{values['loss']:.4f}", acc=f"{values['accuracy']:.2f}",
                              pairs_s=f"{values['pairs_per_s']:.1f}")
        self._bar.update(1)

    def close(self) -> None:
        self._redirect.close()
        self._bar.close()
