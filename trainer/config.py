"""`rso train` configuration: one typed, validated object for the whole trainer.

Built from ``--config FILE.yaml`` and flags (flags win), in the same style as the pipeline's
``GenerateConfig`` (:mod:`rso.config`). Every field is documented in place; ``validate()`` fails
at start with one clear message.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Literal

from rso.config import Config, ConfigError, check_optimizer, option

LossType = Literal["sigmoid-norm", "hinge-norm", "hinge", "ipo"]

# A resumed run equals an uninterrupted one only with the same settings. These decide which pairs
# land in which optimizer step, the schedule and the weights' origin: a resumed run must keep them.
RESUME_FIXED = ("policy", "data_format", "eval_fraction", "batch_size", "grad_accum", "seed",
                "shuffle_buffer", "bucket_batches", "max_length", "recompute_reference",
                "optimizer", "epochs", "max_steps", "scheduler", "warmup_steps")
# These a resumed run may change only when --allow-change names them: the new value applies from
# the resumed step on (optimizer hyper-parameters are written into the restored optimizer state)
# and the checkpoint records the change. "data" and "eval_data" compare the files' content (the
# sha256 of every file, trainer.data.data_id), not their paths.
RESUME_CHANGEABLE = ("data", "eval_data", "loss", "gamma", "lr", "weight_decay", "adam_beta1",
                     "adam_beta2", "adam_eps", "max_grad_norm", "precision")
# Not compared (they do not change what is computed, or only by float rounding): output, device,
# num_threads, gradient_checkpointing, trust_remote_code, the reference check, checkpoint,
# evaluation and logging settings.


# Loss scales that train in float32 (every loss, tiny policy: tests/test_trainer_cli.py). Far
# outside, the loss or its gradient overflows (measured: ipo at 1e-20, sigmoid-norm at 1e30
# give non-finite values for every pair) or rounds to nothing.
GAMMA_RANGE = (1e-4, 1e4)


@dataclasses.dataclass
class TrainConfig(Config):
    # ---- data
    data: list[str] = option([], "pipeline output directory (needs _SUCCESS), or a glob of "
                             "pairs-*.parquet / *.tfrecord[.gz] files; local or gs://; repeatable")
    data_format: Literal["auto", "parquet", "tfrecord"] = option(
        "auto", "which files of an output directory to read; auto = Parquet if present")
    eval_data: list[str] = option([], "held-out pairs, same forms as --data (optional)")
    eval_fraction: float = option(0.0, "hold out this fraction of prompts of --data for "
                                  "evaluation (by hash of prompt_id, so a prompt's pairs stay on "
                                  "one side)")
    max_length: int | None = option(None, "skip pairs whose prompt + longer response exceeds "
                                       "this many tokens (never truncated: that would break the "
                                       "reference log-probs)")
    shuffle_buffer: int = option(4096, "pairs held in the streaming shuffle buffer (1 = no "
                                 "shuffle)")
    bucket_batches: int = option(16, "length bucketing: sort windows of this many batches by "
                                 "length, then shuffle the batches (1 = no bucketing)")
    # ---- model
    policy: str = option("", "initial policy: Hugging Face causal LM directory")
    output: str = option("", "local output directory: checkpoints, metrics, plots, final model")
    trust_remote_code: bool = option(False, "let the model repository run its own code")
    gradient_checkpointing: bool = option(True, "recompute activations in backward: on a "
                                          "135M model 1.7x less peak memory for ~15% speed "
                                          "(--no-gradient-checkpointing to turn off)")
    precision: Literal["auto", "fp32", "bf16"] = option(
        "auto", "bf16 autocast (weights stay fp32); auto = bf16 on a CUDA device that supports "
        "it, fp32 elsewhere; bf16 on CPU is opt-in")
    device: Literal["auto", "cpu", "cuda"] = option("auto", "auto = cuda when available")
    num_threads: int | None = option(None, "torch CPU threads (default: torch's choice)")
    # ---- loss (SPEC 6)
    loss: LossType = option("sigmoid-norm", "sigmoid-norm (DPO) | hinge-norm (RSO/SLiC "
                            "normalised) | hinge (SLiC) | ipo")
    gamma: float = option(0.05, "loss scale gamma (not the sampling beta)")
    # ---- reference log-probs
    strict_reference: bool = option(False, "stop when the first batch's stored reference "
                                    "log-probs disagree with the initial policy")
    reference_tolerance: float = option(0.05, "largest per-sequence gap (nats) between stored "
                                        "and recomputed reference log-probs before warning")
    recompute_reference: bool = option(False, "compute reference log-probs once with the "
                                       "initial policy in fp32, cache them in --output, and "
                                       "train from the cache")
    # ---- optimisation
    optimizer: Literal["adamw", "adafactor"] = option("adamw", "adamw | adafactor (the paper's)")
    lr: float = option(1e-6, "peak learning rate")
    weight_decay: float = option(0.0, "decoupled weight decay")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    adam_eps: float = option(1e-8, "AdamW epsilon")
    scheduler: Literal["constant", "linear", "cosine"] = option(
        "linear", "decay after warm-up: constant | linear (to 0) | cosine (to 0)")
    warmup_steps: int = option(0, "linear warm-up steps from 0 to --lr")
    batch_size: int = option(8, "pairs per micro-batch (2x sequences in one forward)")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    max_grad_norm: float = option(1.0, "clip the global gradient norm to this (0 = off)")
    epochs: int = option(1, "passes over the training pairs (ignored when --max-steps is set)")
    max_steps: int | None = option(None, "optimizer steps to run; overrides --epochs")
    # ---- checkpoints, evaluation, logging
    save_every: int = option(0, "save a checkpoint every N optimizer steps (0 = only at the "
                             "end)")
    keep_checkpoints: int = option(2, "how many recent checkpoints to keep (0 = all)")
    eval_every: int = option(0, "evaluate every N optimizer steps (0 = only at the end)")
    resume: bool = option(False, "continue from the latest checkpoint in --output (starts from "
                          "scratch when there is none)")
    overwrite: bool = option(False, "start from scratch even if --output holds checkpoints")
    allow_change: list[str] = option([], "with --resume: settings that may differ from the "
                                     "interrupted run's, comma-separated (" +
                                     ", ".join(RESUME_CHANGEABLE) + "); applied from the "
                                     "resumed step on and recorded in the checkpoints. Any "
                                     "other difference is refused")
    seed: int = option(0, "seeds data order and torch (dropout)")
    log_every: int = option(1, "write metrics every N optimizer steps")
    tensorboard: bool = option(True, "also write TensorBoard event files to OUTPUT/tensorboard")
    progress: bool = option(True, "show a progress bar")
    plots: bool = option(True, "write PNG training curves to OUTPUT/plots at the end")

    def validate(self) -> None:
        def fail(msg: str) -> None:
            raise ConfigError(msg)

        if not self.data:
            fail("--data is required")
        if not self.policy:
            fail("--policy is required")
        if not self.output:
            fail("--output is required")
        if "://" in self.output:
            fail(f"--output must be a local directory (got {self.output}); copy the result to "
                 f"remote storage after training")
        for data in [*self.data, *(self.eval_data or [])]:
            if "://" not in data and os.path.realpath(data) == os.path.realpath(self.output):
                fail(f"--output {self.output} is the --data directory: checkpoints, metrics and "
                     f"plots would be written into the pipeline's run; choose another folder")
        if "://" not in self.policy and not os.path.isdir(self.policy):
            fail(f"policy directory not found: {self.policy}")
        if not (self.gamma > 0 and math.isfinite(self.gamma)):
            fail(f"--gamma must be a positive finite number, got {self.gamma}")
        low, high = GAMMA_RANGE
        if not low <= self.gamma <= high:
            fail(f"--gamma {self.gamma:g} is outside [{low:g}, {high:g}]: gamma scales every "
                 f"log-prob margin (ipo aims at the margin 1/(2*gamma)), so beyond this range "
                 f"the float32 loss or its gradient overflows, or vanishes; usual values are "
                 f"0.01 to 1 (the paper's is 0.05)")
        check_optimizer(lr=self.lr, weight_decay=self.weight_decay,
                        max_grad_norm=self.max_grad_norm, warmup_steps=self.warmup_steps,
                        adam_beta1=self.adam_beta1, adam_beta2=self.adam_beta2,
                        adam_eps=self.adam_eps)
        for name in ("batch_size", "grad_accum", "epochs", "shuffle_buffer", "bucket_batches",
                     "log_every"):
            if getattr(self, name) < 1:
                fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("save_every", "keep_checkpoints", "eval_every"):
            if getattr(self, name) < 0:
                fail(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            fail(f"--max-steps must be >= 1, got {self.max_steps}")
        if self.max_length is not None and self.max_length < 2:
            fail(f"--max-length must be >= 2, got {self.max_length}")
        if not 0.0 <= self.eval_fraction < 1.0:
            fail(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        if self.reference_tolerance < 0:
            fail(f"--reference-tolerance must be >= 0, got {self.reference_tolerance}")
        if self.resume and self.overwrite:
            fail("--resume and --overwrite exclude each other")
        self.allow_change = [n.strip().replace("-", "_") for item in self.allow_change
                             for n in item.split(",") if n.strip()]
        unknown = [n for n in self.allow_change if n not in RESUME_CHANGEABLE]
        if unknown:
            fail(f"--allow-change: {', '.join(unknown)} cannot change in a resumed run; "
                 f"allowed: {', '.join(RESUME_CHANGEABLE)}")
        if self.allow_change and not self.resume:
            fail("--allow-change only applies with --resume")
        if self.num_threads is not None and self.num_threads < 1:
            fail(f"--num-threads must be >= 1, got {self.num_threads}")
