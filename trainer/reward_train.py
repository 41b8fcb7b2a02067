"""`rso reward train`: fit a Bradley-Terry reward model on preference pairs.

    rso reward train --data pairs.jsonl.gz --model BACKBONE_DIR --output RM_DIR [--mode head]

The model is an ``AutoModelForSequenceClassification`` with one output on any Hugging Face
backbone, trained with ``L = -log sigmoid(r(x, y_w) - r(x, y_l))`` (Bradley & Terry 1952;
InstructGPT eq. 1; TRL's RewardTrainer). Pairs: :mod:`trainer.reward_data` (TRL or HH-RLHF
form, JSONL(.gz) or Parquet); the held-out split is by the hash of the prompt id
(:func:`trainer.data.in_eval_split`), so a prompt never sits on both sides.

Input text: exactly what the pipeline's reward stage builds (:mod:`rso.reward_input`): the
conversation plus the response with the backbone tokenizer's chat template, or, without one,
:func:`rso.transcript.hh_transcript` tokenised with special tokens; each input is cut from the
LEFT to ``--max-length`` tokens (the end of the dialogue is kept), and the saved tokenizer's
``model_max_length`` is that limit, so the pipeline cuts the same way. ``--kind pairwise``
trains SPEC 2's pairwise model instead: one output = logit P(A better than B) for
``[CONTEXT] {x} [RESPONSE A] {a} [RESPONSE B] {b}``, each pair giving both orders.

Modes:
- ``head`` (default): the backbone stays frozen. Features = the input of the classifier's final
  one-output linear layer as the saved model's own forward computes it, cached once in
  ``OUTPUT/features.safetensors``. ``--pooling model``: the classifier's own pooling (decoders:
  the final hidden state at the rightmost non-pad token; BERT-style encoders: their pooler
  output); ``--pooling mean``: the mean of the final hidden states over the input's tokens
  (:class:`rso.pooling.MeanPooledClassifier`, what sentence-transformers encoders were trained
  for); ``auto`` (default) takes ``mean`` for a sentence-transformers backbone whose
  ``1_Pooling/config.json`` pools by mean. Then a Bradley-Terry (logistic, no intercept) head on
  feature differences, L2 strength C chosen by k-fold cross-validation on the training split
  (folds by prompt), fitted by Newton's method in float64. The saved directory, loaded with
  :func:`rso.hf.load_classifier` (as the pipeline loads it), is checked to reproduce the fitted
  scores of (up to 64) held-out pairs to 1e-4 (relative to the largest score when above 1).
- ``full``: full fine-tuning with AdamW, the trainer's conventions (progress bar,
  ``metrics.jsonl``, PNG curves, ``checkpoint-*`` directories, exact ``--resume``).

Output: ``OUTPUT/`` is the reward model (safetensors, tokenizer), loadable as the pipeline's
``--reward-model`` as is, plus ``reward_fit.json`` (held-out accuracy and its 95% Wilson
interval, pairs, settings, the data's content hash), ``metrics.jsonl`` and ``plots/``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from rso.config import Config, ConfigError, check_optimizer, option
from rso.pooling import MeanPooledClassifier, is_mean_pooled, sentence_transformers_mean
from rso.reward_input import pairwise_ids, pointwise_ids, render_pointwise
from rso.stats import wilson_interval
from rso.storage import cleaned_up_on_failure
from rso.transcript import hh_transcript
from trainer import checkpoint as ckpt
from trainer.checkpoint import run_preemptible
from trainer.data import DataError
from trainer.losses import bradley_terry_loss
from trainer.metrics import METRICS_FILE, MetricsWriter, Progress, peak_memory
from trainer.reward_data import PreferenceData, PreferenceExample, read_preferences, split_by_prompt

log = logging.getLogger("rso.reward")

FIT_FILE = "reward_fit.json"
FEATURES_FILE = "features.safetensors"
Z95 = 1.959963984540054
MIN_PROMPTS_PER_FOLD = 10  # fewer training prompts per cross-validation fold: a warning
VERIFY_PAIRS = 64  # held-out pairs re-scored through the saved directory's own forward
DEFAULT_C_GRID = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0]
RESUME_INVARIANTS = ("data", "rows", "model", "kind", "pooling", "max_length", "eval_fraction",
                     "max_train_pairs", "seed", "batch_size", "lr", "epochs", "max_steps",
                     "warmup_steps", "weight_decay")


@dataclasses.dataclass
class RewardConfig(Config):
    data: list[str] = option([], "preference pairs: *.jsonl, *.jsonl.gz or *.parquet (TRL "
                             "prompt/chosen/rejected or HH-RLHF dialogues); repeatable")
    rows: str = option("", "keep rows START:END of the inputs' concatenation (e.g. 256:)")
    model: str = option("", "backbone: a Hugging Face model directory (encoder or decoder)")
    output: str = option("", "output directory: the reward model, reward_fit.json, metrics")
    mode: Literal["head", "full"] = option("head", "head: frozen backbone + Bradley-Terry "
                                           "linear head (fast); full: fine-tune everything")
    kind: Literal["pointwise", "pairwise"] = option(
        "pointwise", "pointwise: r(x, y); pairwise: logit P(A better than B) (SPEC 2)")
    pooling: Literal["auto", "model", "mean"] = option(
        "auto", "what the head scores: model = the classifier's own pooling (decoders: the "
        "last non-pad token; BERT: its pooler output); mean = the mean of the final hidden "
        "states over the input (rso.pooling); auto = mean for a sentence-transformers backbone "
        "that pools by mean (its 1_Pooling/config.json), else model")
    max_length: int = option(384, "tokens per input; longer ones lose their oldest tokens")
    eval_fraction: float = option(0.25, "held-out share of prompts (by hash of prompt_id)")
    max_train_pairs: int | None = option(None, "train on at most this many pairs (the "
                                            "first ones of the training split)")
    seed: int = option(0, "seeds fold assignment, data order and torch")
    batch_size: int = option(16, "pairs per forward pass (features) or per optimizer step")
    # ---- head mode
    folds: int = option(5, "cross-validation folds for choosing C")
    c_grid: list[float] = option(DEFAULT_C_GRID, "inverse L2 strengths C to try (sklearn's "
                                 "C: loss = C * sum log-loss + |w|^2 / 2 on standardised "
                                 "features)")
    learning_curve: list[int] = option([], "also fit on the first N training pairs for each N "
                                       "and report held-out accuracy (head mode)")
    # ---- full mode
    lr: float = option(1e-5, "AdamW peak learning rate (full mode)")
    weight_decay: float = option(0.0, "AdamW decoupled weight decay")
    warmup_steps: int = option(0, "linear warm-up steps, then linear decay to 0")
    epochs: int = option(1, "passes over the training pairs (full mode)")
    max_steps: int | None = option(None, "optimizer steps; overrides --epochs")
    max_grad_norm: float = option(1.0, "clip the global gradient norm (0 = off)")
    save_every: int = option(0, "checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = option(2, "recent checkpoints to keep (0 = all)")
    eval_every: int = option(0, "held-out evaluation every N steps (0 = only at the end)")
    log_every: int = option(1, "write train metrics every N steps")
    resume: bool = option(False, "continue from the latest checkpoint in --output")
    overwrite: bool = option(False, "start from scratch even if --output holds a run")
    # ---- runtime
    device: Literal["auto", "cpu", "cuda"] = option("auto", "auto = cuda when available")
    num_threads: int | None = option(None, "torch CPU threads (default: torch's choice)")
    trust_remote_code: bool = option(False, "let the model repository run its own code")
    progress: bool = option(True, "show progress bars")
    plots: bool = option(True, "write PNG curves to OUTPUT/plots")
    verbose: bool = option(False, "show third-party INFO logs")

    def row_range(self) -> tuple[int, int | None] | None:
        if not self.rows:
            return None
        try:
            start, _, end = self.rows.partition(":")
            return int(start or 0), (int(end) if end else None)
        except ValueError:
            raise ConfigError(f"--rows must be START:END, got {self.rows!r}") from None

    def validate(self) -> None:
        for name in ("data", "model", "output"):
            if not getattr(self, name):
                raise ConfigError(f"--{name} is required")
        if "://" not in self.model and not os.path.isdir(self.model):
            raise ConfigError(f"model directory not found: {self.model}")
        if "://" in self.output:
            raise ConfigError("--output must be a local directory")
        self.row_range()
        if self.max_length < 8:
            raise ConfigError(f"--max-length must be >= 8, got {self.max_length}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError(f"--eval-fraction must be in (0, 1), got {self.eval_fraction}")
        for name in ("batch_size", "epochs", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if self.folds < 2:
            raise ConfigError(f"--folds must be >= 2, got {self.folds}")
        if not self.c_grid or any(not (c > 0 and math.isfinite(c)) for c in self.c_grid):
            raise ConfigError(f"--c-grid must hold positive numbers, got {self.c_grid}")
        if self.max_train_pairs is not None and self.max_train_pairs < 2:
            raise ConfigError("--max-train-pairs must be >= 2")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError("--max-steps must be >= 1")
        check_optimizer(lr=self.lr, weight_decay=self.weight_decay,
                        max_grad_norm=self.max_grad_norm, warmup_steps=self.warmup_steps)
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite exclude each other")


# ------------------------------------------------------------------------------ statistics
def accuracy_summary(margins: torch.Tensor) -> dict[str, Any]:
    """Pairwise accuracy (margin > 0; a tie counts as wrong) with its 95% Wilson interval."""
    n = int(margins.numel())
    correct = int((margins > 0).sum())
    lo, hi = wilson_interval(correct, n)
    return {"accuracy": correct / max(1, n), "accuracy_ci95": [lo, hi], "pairs": n}


# ------------------------------------------------------------------------------ inputs
def encode_examples(tok: Any, examples: Sequence[PreferenceExample], kind: str,
                    max_length: int) -> tuple[list[list[int]], list[list[int]], int]:
    """Token ids (A, B) of each pair, laid out as the pipeline scores them: pointwise A =
    (x, y_w), B = (x, y_l); pairwise A = (x, y_w, y_l), B = (x, y_l, y_w). Returns (A, B, number
    of inputs that were cut)."""
    special = set(tok.all_special_ids)
    first, second, cut = [], [], 0
    for ex in examples:
        if kind == "pointwise":
            prompt = render_pointwise(tok, ex.messages, None)
            a, ta, _ = pointwise_ids(tok, ex.messages, ex.chosen, max_length, special, prompt)
            b, tb, _ = pointwise_ids(tok, ex.messages, ex.rejected, max_length, special, prompt)
        else:
            context = hh_transcript(ex.messages)
            a, ta, _ = pairwise_ids(tok, context, ex.chosen, ex.rejected, max_length, special)
            b, tb, _ = pairwise_ids(tok, context, ex.rejected, ex.chosen, max_length, special)
        first.append(a)
        second.append(b)
        cut += ta + tb
    return first, second, cut


def margins_of(kind: str, score_a: torch.Tensor, score_b: torch.Tensor) -> torch.Tensor:
    """Per-pair preference margin: pointwise r(y_w) - r(y_l); pairwise the both-orders
    debiased (s(y_w, y_l) - s(y_l, y_w)) / 2 (the pipeline's default)."""
    diff = score_a - score_b
    return diff if kind == "pointwise" else diff / 2


def pair_loss(kind: str, score_a: torch.Tensor, score_b: torch.Tensor) -> torch.Tensor:
    """[B] losses: pointwise Bradley-Terry; pairwise the logistic loss of both orders
    (label 1 for (y_w, y_l), 0 for (y_l, y_w)), averaged."""
    if kind == "pointwise":
        return bradley_terry_loss(score_a, score_b)
    return 0.5 * (F.softplus(-score_a) + F.softplus(score_b))


# ------------------------------------------------------------------------------ the model
def load_backbone(cfg: RewardConfig, path: str, device: torch.device) -> tuple[Any, Any, int]:
    """(classifier with one output, tokenizer, pad id) in fp32 on ``device``. The tokenizer
    pads with its pad token, else EOS (then set as its pad token), and the model's
    ``pad_token_id`` is that id: classifiers pool the rightmost non-pad token."""
    from rso import hf

    try:
        tok = hf.load_tokenizer(path, cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load the backbone's tokenizer from {path}: {e}") from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ConfigError(f"{path}: the tokenizer has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    from transformers.utils import logging as hf_logging

    from rso import hf

    verbosity = hf_logging.get_verbosity()
    if not cfg.verbose:  # "newly initialized weights: score.weight" is expected here
        hf_logging.set_verbosity_error()
    wanted = resolve_pooling(cfg.pooling, cfg.model)
    saved_mean = _is_rso_classifier(path)
    if saved_mean and wanted != "mean":
        raise ConfigError(f"{path} is a mean-pooled reward model: its pooling is fixed, and "
                          f"--pooling {cfg.pooling} means {wanted!r} (use mean or auto)")
    try:
        if wanted == "mean" and not saved_mean:
            model = MeanPooledClassifier.from_encoder(path, 1, cfg.trust_remote_code)
        else:
            model = hf.load_classifier(path, "float32", None, cfg.trust_remote_code,
                                       train=True, num_labels=1, new_head=True)
    except hf.load_errors() as e:
        raise ConfigError(f"cannot load the backbone {path}: {e}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config.pad_token_id = tok.pad_token_id
    model.config.get_text_config().pad_token_id = tok.pad_token_id
    limits = [n for n in (getattr(model.config.get_text_config(), "max_position_embeddings",
                                  None), tok.model_max_length) if isinstance(n, int) and n > 0]
    # Saved with the model, so the pipeline cuts inputs where training did; longer texts are
    # cut by rso.reward_input.truncate_left, so the tokenizer's length warning is silenced.
    tok.model_max_length = min([cfg.max_length] + limits)
    tok.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    log.info("backbone %s, pooling %s", path, pooling_of_model(model))
    return model.to(device), tok, tok.pad_token_id


def pooling_of_model(model: Any) -> str:
    """``mean`` for a :class:`rso.pooling.MeanPooledClassifier`, else ``model``."""
    return "mean" if isinstance(model, MeanPooledClassifier) else "model"


def resolve_pooling(pooling: str, path: str) -> str:
    """``--pooling`` for the backbone in ``path``: ``auto`` becomes ``mean`` for a
    sentence-transformers model that pools by mean or a mean-pooled rso reward model, else
    ``model``. ConfigError for an unreadable ``1_Pooling/config.json``."""
    if pooling != "auto":
        return pooling
    try:
        return "mean" if sentence_transformers_mean(path) or _is_rso_classifier(path) \
            else "model"
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None


def _is_rso_classifier(path: str) -> bool:
    """Whether ``path`` already holds a mean-pooled classifier (a checkpoint being resumed, or
    a trained reward model used as a backbone). ConfigError for an unknown ``rso_pooling``."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError):
        return False  # not a model directory: the load that follows says so
    try:
        return is_mean_pooled(config)
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None


def head_layer(model: torch.nn.Module) -> torch.nn.Linear:
    """The classifier's final linear layer with one output (``score``, ``classifier``,
    ``classifier.out_proj``...): the last such module in the model."""
    heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 1]
    if not heads:
        raise ConfigError("the classifier has no one-output linear layer to fit")
    return heads[-1]


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device
         ) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[row, :len(s)] = 1
    return ids.to(device), mask.to(device)


def _rightmost_non_pad(ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """transformers' sequence-classification pooling index: the rightmost token != pad."""
    positions = torch.arange(ids.shape[-1], device=ids.device, dtype=torch.int32)
    return (positions * (ids != pad_id).to(torch.int32)).argmax(-1)


@torch.no_grad()
def head_features(model: torch.nn.Module, seqs: Sequence[Sequence[int]], pad_id: int,
                  batch_size: int, device: torch.device, desc: str = "features",
                  progress: bool = True) -> torch.Tensor:
    """[N, H] float32: what the one-output head receives for each sequence in the model's own
    forward (a [B, T, H] head input is pooled at the rightmost non-pad token, as transformers'
    classifiers do). Right-padded, length-sorted batches; returned in input order."""
    from rso.console import ProgressBar

    head = head_layer(model)
    captured: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    out: torch.Tensor | None = None
    model.eval()
    try:
        batches = _batches([len(s) for s in seqs], batch_size)
        bar = ProgressBar(len(batches), desc=desc, unit="batch", enabled=progress, logger=log)
        for idx in batches:
            ids, mask = _pad([seqs[i] for i in idx], pad_id, device)
            captured.clear()
            model(input_ids=ids, attention_mask=mask)
            x = captured[-1].float()
            if x.dim() == 3:
                x = x[torch.arange(len(idx), device=x.device), _rightmost_non_pad(ids, pad_id)]
            if out is None:
                out = torch.empty((len(seqs), x.shape[-1]), dtype=torch.float32)
            out[torch.tensor(idx)] = x.cpu()
            bar.update()
    finally:
        hook.remove()
    bar.close()
    assert out is not None
    return out


@torch.no_grad()
def model_scores(model: torch.nn.Module, seqs: Sequence[Sequence[int]], pad_id: int,
                 batch_size: int, device: torch.device) -> torch.Tensor:
    """[N] float64: the classifier's own logits for each sequence (right-padded batches)."""
    model.eval()
    scores = torch.empty(len(seqs), dtype=torch.float64)
    for idx in _batches([len(s) for s in seqs], batch_size):
        ids, mask = _pad([seqs[i] for i in idx], pad_id, device)
        scores[torch.tensor(idx)] = model(input_ids=ids, attention_mask=mask).logits[:, 0] \
            .double().cpu()
    return scores


# ------------------------------------------------------------------------------ head fit
def fit_logistic(x: torch.Tensor, c: float, max_iter: int = 50, tol: float = 1e-10
                 ) -> torch.Tensor:
    """Argmin of ``C * sum_i softplus(-x_i . w) + |w|^2 / 2`` (L2 logistic regression with all
    labels +1 and no intercept, sklearn's C convention) by Newton's method in float64: the
    objective is strictly convex, so each step solves ``(C X^T D X + I) dw = -grad`` with
    ``D = p (1 - p)``, halving the step until the objective falls. x: [N, H]; returns [H]."""
    x = x.double()
    w = torch.zeros(x.shape[1], dtype=torch.float64)
    eye = torch.eye(x.shape[1], dtype=torch.float64)

    def objective(v: torch.Tensor) -> float:
        return float(c * F.softplus(-x @ v).sum() + 0.5 * v.square().sum())

    current = objective(w)
    for _ in range(max_iter):
        p = torch.sigmoid(x @ w)  # P(the row's preferred side wins)
        grad = -c * (x.T @ (1 - p)) + w
        hessian = c * (x.T * (p * (1 - p))) @ x + eye
        step = torch.linalg.solve(hessian, -grad)
        t = 1.0
        while t > 1e-8:
            candidate = objective(w + t * step)
            if candidate <= current:
                break
            t /= 2
        w, previous, current = w + t * step, current, candidate
        if previous - current <= tol * max(1.0, abs(current)):
            break
    return w


def _fold_of(prompt_id: str, seed: int, folds: int) -> int:
    import hashlib

    digest = hashlib.sha256(f"rso-fold\x00{seed}\x00{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % folds


@dataclasses.dataclass
class HeadFit:
    """A fitted head: weights on raw features (w / scale) and how C was chosen."""
    weight: torch.Tensor  # [H] float64, applied to raw features
    c: float
    cv: list[dict]  # per C: cv_accuracy, cv_loss


def fit_head(rows: Callable[[torch.Tensor], torch.Tensor], fa: torch.Tensor, fb: torch.Tensor,
             prompt_ids: Sequence[str], kind: str, c_grid: Sequence[float], folds: int,
             seed: int) -> HeadFit:
    """Chooses C by k-fold cross-validation (folds by prompt id, held-out pairwise accuracy,
    ties broken by held-out log-loss then smaller C) and fits on all ``fa``/``fb`` ([N, H]).
    ``rows(idx)`` gives the logistic rows of pairs ``idx`` on standardised features."""
    fold = torch.tensor([_fold_of(p, seed, folds) for p in prompt_ids])
    table = []
    for c in c_grid:
        correct, loss, n = 0, 0.0, 0
        for k in range(folds):
            train_idx, test_idx = (fold != k).nonzero()[:, 0], (fold == k).nonzero()[:, 0]
            if len(test_idx) == 0 or len(train_idx) == 0:
                continue
            w = fit_logistic(rows(train_idx), c)
            sa, sb = rows.standardise(fa[test_idx]) @ w, rows.standardise(fb[test_idx]) @ w
            m = margins_of(kind, sa, sb)
            correct += int((m > 0).sum())
            loss += float(pair_loss(kind, sa, sb).sum())
            n += len(test_idx)
        table.append({"C": c, "cv_accuracy": correct / max(1, n), "cv_loss": loss / max(1, n)})
    best = max(table, key=lambda r: (r["cv_accuracy"], -r["cv_loss"], -r["C"]))
    w = fit_logistic(rows(torch.arange(len(fa))), best["C"])
    return HeadFit(w / rows.scale, best["C"], table)


class _Rows:
    """Logistic rows on standardised features: pointwise f(A) - f(B); pairwise f(A), -f(B)."""

    def __init__(self, fa: torch.Tensor, fb: torch.Tensor, kind: str):
        self.fa, self.fb, self.kind = fa.double(), fb.double(), kind
        spread = (self.fa - self.fb) if kind == "pointwise" else torch.cat([self.fa, self.fb])
        self.scale = spread.std(0).clamp_min(1e-6)

    def standardise(self, f: torch.Tensor) -> torch.Tensor:
        return f.double() / self.scale

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        a, b = self.standardise(self.fa[idx]), self.standardise(self.fb[idx])
        return a - b if self.kind == "pointwise" else torch.cat([a, -b])


# ------------------------------------------------------------------------------ runs
@dataclasses.dataclass
class RewardResult:
    output: str
    fit: dict  # the content of reward_fit.json
    finished: bool = True


def _prepare_output(cfg: RewardConfig) -> str | None:
    """Checks --output before any work; returns the checkpoint to resume from (full mode), if
    any. Creates nothing and deletes nothing: :func:`_clear_previous` does that once the data
    and the backbone have loaded, so a run that fails early leaves a directory as it was."""
    latest = ckpt.latest_checkpoint(cfg.output) if os.path.isdir(cfg.output) else None
    done = os.path.exists(os.path.join(cfg.output, FIT_FILE))
    if cfg.overwrite:
        return None
    if (done or latest) and not cfg.resume:
        raise ConfigError(f"{cfg.output} already holds a reward-model run; pass --resume to "
                          f"continue it or --overwrite to start over")
    if latest:
        saved = ckpt.saved_config(latest)
        mine = cfg.to_dict()
        changed = [k for k in RESUME_INVARIANTS if k != "pooling" and saved.get(k) != mine[k]]
        if resolve_pooling(saved.get("pooling", "auto"), saved.get("model", "")) != \
                resolve_pooling(cfg.pooling, cfg.model):
            changed.append("pooling")
        if changed:
            raise ConfigError(f"cannot resume {latest}: setting(s) {', '.join(changed)} differ "
                              f"from the interrupted run's")
    return latest


def _clear_previous(cfg: RewardConfig) -> None:
    """Creates --output; with --overwrite, removes an earlier run's results and checkpoints
    (the earlier model files are replaced only when the new model is saved and verified)."""
    os.makedirs(cfg.output, exist_ok=True)
    if not cfg.overwrite:
        return
    for path in ckpt.list_checkpoints(cfg.output) + [os.path.join(cfg.output, n) for n in (
            "plots", METRICS_FILE, FIT_FILE, FEATURES_FILE)]:
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def _load_data(cfg: RewardConfig) -> tuple[PreferenceData, list[PreferenceExample],
                                           list[PreferenceExample]]:
    data = read_preferences(cfg.data, cfg.row_range())
    train, held = split_by_prompt(data.examples, cfg.eval_fraction)
    if cfg.max_train_pairs is not None:
        train = train[:cfg.max_train_pairs]
    if len(train) < 2 or not held:
        raise DataError(f"{len(train)} training and {len(held)} held-out pairs: too few "
                        f"(more data, or another --eval-fraction)")
    log.info("%d pairs (%d identical ones skipped) of %d rows read: %d train, %d held out",
             len(data.examples), data.skipped_identical, data.rows, len(train), len(held))
    return data, train, held


def _fit_record(cfg: RewardConfig, data: PreferenceData, train: list, held: list,
                margins: torch.Tensor, scores: torch.Tensor, extra: dict) -> dict:
    summary = accuracy_summary(margins)
    return {"heldout_accuracy": summary["accuracy"],
            "heldout_accuracy_ci95": summary["accuracy_ci95"],
            "heldout_pairs": summary["pairs"], "train_pairs": len(train),
            "heldout_reward_mean": float(scores.mean()), "heldout_reward_std": float(scores.std()),
            "heldout_margin_mean": float(margins.mean()),
            "data_sha256": data.content_hash, "rows_read": data.rows,
            "skipped_identical": data.skipped_identical,
            "settings": {k: v for k, v in cfg.to_dict().items()
                         if k not in ("progress", "plots", "verbose", "resume", "overwrite")},
            **extra}


def _save_model(model: Any, tok: Any, output: str,
                check: Callable[[str], float] | None = None) -> float | None:
    """Saves model and tokenizer into ``OUTPUT/.saving``, runs ``check(that directory)`` (it
    raises if the saved model is wrong) and only then moves the files into ``output``: a run
    that fails leaves an earlier model there as it was. Returns what ``check`` returned."""
    staging = os.path.join(output, ".saving")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tok.save_pretrained(staging)
        result = check(staging) if check is not None else None
        for name in sorted(os.listdir(staging)):
            os.replace(os.path.join(staging, name), os.path.join(output, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


def _feature_cache(cfg: RewardConfig, data_hash: str, pooling: str,
                   compute: Callable[[], dict]) -> dict:
    """The cached features of this (backbone, data, layout), or ``compute()`` saved."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(cfg.output, FEATURES_FILE)
    from rso.model_id import model_id

    # the backbone by content (a directory rebuilt at the same path is another backbone)
    key = json.dumps({"model": model_id(os.path.abspath(cfg.model)), "data": data_hash,
                      "kind": cfg.kind, "pooling": pooling, "max_length": cfg.max_length,
                      "rows": cfg.rows, "eval_fraction": cfg.eval_fraction,
                      "max_train_pairs": cfg.max_train_pairs}, sort_keys=True)
    if os.path.exists(path):
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            if (f.metadata() or {}).get("key") == key:
                log.info("reusing cached features %s", path)
                return load_file(path)
    tensors = compute()
    save_file({k: v.contiguous() for k, v in tensors.items()}, path + ".tmp",
              metadata={"key": key})
    os.replace(path + ".tmp", path)
    return tensors


def train_head(cfg: RewardConfig) -> RewardResult:
    """``--mode head``: frozen backbone, cached features, cross-validated Bradley-Terry head."""
    started = time.perf_counter()
    device = _setup(cfg)
    _prepare_output(cfg)
    data, train, held = _load_data(cfg)
    model, tok, pad_id = load_backbone(cfg, cfg.model, device)
    _clear_previous(cfg)
    train_a, train_b, cut_train = encode_examples(tok, train, cfg.kind, tok.model_max_length)
    held_a, held_b, cut_held = encode_examples(tok, held, cfg.kind, tok.model_max_length)

    def compute() -> dict:
        feats = head_features(model, train_a + train_b + held_a + held_b, pad_id,
                              cfg.batch_size, device, progress=cfg.progress)
        n, m = len(train), len(held)
        return {"train_a": feats[:n], "train_b": feats[n:2 * n],
                "held_a": feats[2 * n:2 * n + m], "held_b": feats[2 * n + m:]}

    t0 = time.perf_counter()
    feats = _feature_cache(cfg, data.content_hash, pooling_of_model(model), compute)
    feature_s = time.perf_counter() - t0
    ids = [ex.prompt_id for ex in train]
    prompts = len(set(ids))
    if prompts < MIN_PROMPTS_PER_FOLD * cfg.folds:
        log.warning("%d training prompts for %d-fold cross-validation: C is chosen on folds of "
                    "about %.0f prompts, a noisy choice (more data, or fewer --folds)",
                    prompts, cfg.folds, prompts / cfg.folds)
    rows = _Rows(feats["train_a"], feats["train_b"], cfg.kind)
    fit = fit_head(rows, feats["train_a"], feats["train_b"], ids, cfg.kind, cfg.c_grid,
                   cfg.folds, cfg.seed)
    score = lambda f: f.double() @ fit.weight  # noqa: E731
    held_margins = margins_of(cfg.kind, score(feats["held_a"]), score(feats["held_b"]))
    train_margins = margins_of(cfg.kind, score(feats["train_a"]), score(feats["train_b"]))

    curve = []
    for size in sorted(set(cfg.learning_curve)):
        if size > len(train) or size < cfg.folds:
            log.warning("--learning-curve %d: outside [%d, %d] training pairs, skipped", size,
                        cfg.folds, len(train))
            continue
        sub = _Rows(feats["train_a"][:size], feats["train_b"][:size], cfg.kind)
        part = fit_head(sub, feats["train_a"][:size], feats["train_b"][:size], ids[:size],
                        cfg.kind, cfg.c_grid, cfg.folds, cfg.seed)
        m = margins_of(cfg.kind, feats["held_a"].double() @ part.weight,
                       feats["held_b"].double() @ part.weight)
        s = accuracy_summary(m)
        curve.append({"train_pairs": size, "C": part.c,
                      "cv_accuracy": max(r["cv_accuracy"] for r in part.cv),
                      "heldout_accuracy": s["accuracy"], "heldout_accuracy_ci95":
                      s["accuracy_ci95"]})

    # ---- the head goes into the classifier's own final layer; its forward is checked
    head = head_layer(model)
    with torch.no_grad():
        head.weight.copy_(fit.weight.float().unsqueeze(0))
        if head.bias is not None:
            head.bias.zero_()
    held_scores = torch.cat([score(feats["held_a"]), score(feats["held_b"])])
    k = min(VERIFY_PAIRS, len(held))  # both sides of the first k held-out pairs
    check = _save_model(model, tok, cfg.output, lambda saved: _verify_saved(
        cfg, saved, held_a[:k] + held_b[:k],
        torch.cat([held_scores[:k], held_scores[len(held):len(held) + k]]), device))
    record = _fit_record(cfg, data, train, held, held_margins, held_scores, {
        "mode": "head", "kind": cfg.kind, "pooling": pooling_of_model(model),
        "C": fit.c, "cross_validation": fit.cv,
        "train_accuracy": accuracy_summary(train_margins)["accuracy"],
        "learning_curve": curve, "saved_model_max_abs_diff": check,
        "inputs_truncated": cut_train + cut_held, "feature_seconds": feature_s,
        "wall_seconds": time.perf_counter() - started})
    _write_head_metrics(cfg, record)
    return RewardResult(cfg.output, record)


def _verify_saved(cfg: RewardConfig, saved_dir: str, seqs: list, expected: torch.Tensor,
                  device: torch.device) -> float:
    """Loads ``saved_dir`` with :func:`rso.hf.load_classifier` and checks that its logits equal the
    fitted scores to 1e-4, relative to the largest score when that is above 1 (the saved model
    runs in float32: a score of 7,000 is only exact to about 1e-3); returns the largest gap."""
    from rso import hf

    saved = hf.load_classifier(saved_dir, "float32", None, cfg.trust_remote_code).to(device)
    got = model_scores(saved, seqs, saved.config.pad_token_id, cfg.batch_size, device)
    gap = float((got - expected).abs().max())
    tolerance = 1e-4 * max(1.0, float(expected.abs().max()))
    if not gap <= tolerance:
        raise RuntimeError(f"the saved model's forward differs from the fitted head by {gap:.2e} "
                           f"(> {tolerance:.1e}): its features are not the ones the head was "
                           f"fitted on (another pooling, or a stale {FEATURES_FILE}); nothing "
                           f"was replaced in {cfg.output}")
    return gap


def _write_head_metrics(cfg: RewardConfig, record: dict) -> None:
    writer = MetricsWriter(cfg.output, tensorboard=False)
    try:
        for i, row in enumerate(record["cross_validation"]):
            writer.log("cv", i, row)
        for row in record["learning_curve"]:
            writer.log("learning_curve", row["train_pairs"], row)
        writer.log("eval", 0, {"accuracy": record["heldout_accuracy"],
                               "pairs": record["heldout_pairs"]})
    finally:
        writer.close()
    with open(os.path.join(cfg.output, FIT_FILE), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    if cfg.plots:
        _plot_head(record, os.path.join(cfg.output, "plots"))
    log.info("held-out accuracy %.3f [%.3f, %.3f] on %d pairs (C=%g); model in %s",
             record["heldout_accuracy"], *record["heldout_accuracy_ci95"],
             record["heldout_pairs"], record["C"], cfg.output)


def _plot_head(record: dict, out_dir: str) -> list[str]:
    """``cv.png`` (cross-validated accuracy against C) and ``learning_curve.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    written = []
    cv = record["cross_validation"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogx([r["C"] for r in cv], [r["cv_accuracy"] for r in cv], "o-")
    ax.set(xlabel="C (inverse L2 strength)", ylabel="cross-validated accuracy",
           title="choice of C")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    written.append(os.path.join(out_dir, "cv.png"))
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)
    curve = record["learning_curve"]
    if curve:
        fig, ax = plt.subplots(figsize=(6, 4))
        x = [r["train_pairs"] for r in curve]
        y = [r["heldout_accuracy"] for r in curve]
        lo = [r["heldout_accuracy"] - r["heldout_accuracy_ci95"][0] for r in curve]
        hi = [r["heldout_accuracy_ci95"][1] - r["heldout_accuracy"] for r in curve]
        ax.errorbar(x, y, yerr=[lo, hi], fmt="o-", capsize=3, label="held out (95% Wilson)")
        ax.axhline(0.5, color="grey", ls=":", label="chance")
        ax.set(xlabel="training pairs", ylabel="pairwise accuracy", title="learning curve")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(os.path.join(out_dir, "learning_curve.png"))
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written


def _setup(cfg: RewardConfig) -> torch.device:
    cfg.validate()
    from rso.hf import resolve_device

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if not cfg.verbose:  # transformers' own loading/saving progress bars
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    torch.manual_seed(cfg.seed)
    return resolve_device(cfg.device)


def train_full(cfg: RewardConfig, *, should_stop: Callable[[], bool] | None = None,
               stop_after: int | None = None) -> RewardResult:
    """``--mode full``: AdamW on every weight, one optimizer step per ``--batch-size`` pairs
    (linear warm-up then linear decay). ``should_stop()`` is asked after each step (SIGTERM):
    a checkpoint is saved and the run returns unfinished; ``stop_after=s`` returns after step
    s without saving, as a killed process would (to test resuming)."""
    from trainer.optim import lr_multiplier

    device = _setup(cfg)
    resume_from = _prepare_output(cfg)
    data, train, held = _load_data(cfg)
    model, tok, pad_id = load_backbone(cfg, resume_from or cfg.model, device)
    _clear_previous(cfg)
    train_a, train_b, _ = encode_examples(tok, train, cfg.kind, tok.model_max_length)
    held_a, held_b, _ = encode_examples(tok, held, cfg.kind, tok.model_max_length)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, cfg.warmup_steps, total, "linear"))
    state = ckpt.TrainState()
    if resume_from:
        saved = ckpt.load_trainer_state(resume_from)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = ckpt.TrainState(**saved["state"])
        ckpt.set_rng_state(saved["rng"])
        log.info("resumed from %s at step %d", resume_from, state.step)
    writer = MetricsWriter(cfg.output, False, resume_step=state.step if resume_from else None)
    progress = Progress(total, state.step, cfg.progress)
    last_ckpt, last_eval = resume_from, {}

    def evaluate() -> tuple[dict, torch.Tensor, torch.Tensor]:
        sa = model_scores(model, held_a, pad_id, cfg.batch_size, device)
        sb = model_scores(model, held_b, pad_id, cfg.batch_size, device)
        model.train()
        m = margins_of(cfg.kind, sa, sb)
        s = accuracy_summary(m)
        return ({"loss": float(pair_loss(cfg.kind, sa, sb).mean()), "accuracy": s["accuracy"],
                 "reward_chosen": float(sa.mean()), "reward_rejected": float(sb.mean()),
                 "reward_margin": float(m.mean()), "pairs": s["pairs"]}, sa, sb)

    model.train()
    try:
        while state.step < total:
            t0 = time.perf_counter()
            epoch, first = state.epoch, state.batches_in_epoch
            if first >= steps_per_epoch:
                epoch, first = epoch + 1, 0
            order = np.random.default_rng([cfg.seed, epoch]).permutation(len(train))
            idx = order[first * cfg.batch_size:(first + 1) * cfg.batch_size].tolist()
            seqs = [train_a[i] for i in idx] + [train_b[i] for i in idx]
            ids, mask = _pad(seqs, pad_id, device)
            scores = model(input_ids=ids, attention_mask=mask).logits[:, 0].float()
            sa, sb = scores[:len(idx)], scores[len(idx):]
            losses = pair_loss(cfg.kind, sa, sb)
            if not torch.isfinite(losses).all():
                raise FloatingPointError(f"non-finite loss at step {state.step + 1}")
            lr = scheduler.get_last_lr()[0]
            losses.mean().backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(
                params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - t0
            state = ckpt.TrainState(step=state.step + 1, epoch=epoch,
                                    batches_in_epoch=first + 1,
                                    pairs_seen=state.pairs_seen + len(idx),
                                    tokens_seen=state.tokens_seen + int(mask.sum()),
                                    train_time_s=state.train_time_s + elapsed)
            with torch.no_grad():
                margins = margins_of(cfg.kind, sa, sb)
                values = {"loss": float(losses.mean()), "accuracy": float((margins > 0).float()
                                                                          .mean()),
                          "reward_chosen": float(sa.mean()), "reward_rejected": float(sb.mean()),
                          "reward_margin": float(margins.mean()), "grad_norm": float(grad_norm),
                          "lr": lr, "pairs_per_s": len(idx) / elapsed, "epoch": epoch,
                          **peak_memory(device)}
            progress.update(values)
            done = state.step == total
            if state.step % cfg.log_every == 0 or done:
                writer.log("train", state.step, values)
            if done or (cfg.eval_every and state.step % cfg.eval_every == 0):
                last_eval = evaluate()[0]
                writer.log("eval", state.step, last_eval)
                log.info("step %d: held-out accuracy %.3f", state.step, last_eval["accuracy"])
            stopping = not done and should_stop is not None and should_stop()
            if done or stopping or (cfg.save_every and state.step % cfg.save_every == 0):
                last_ckpt = ckpt.save_checkpoint(cfg.output, model, tok, optimizer, scheduler,
                                                 state, cfg.to_dict(), cfg.keep_checkpoints)
            if stopping:
                log.warning("stopped at step %d; run again with --resume", state.step)
                return RewardResult(cfg.output, {}, finished=False)
            if not done and stop_after is not None and state.step >= stop_after:
                return RewardResult(cfg.output, {}, finished=False)
        writer.log("summary", state.step, {"steps": state.step, "pairs": state.pairs_seen,
                                           "train_time_s": state.train_time_s,
                                           "pairs_per_s": state.pairs_seen /
                                           max(state.train_time_s, 1e-9)})
    finally:
        progress.close()
        writer.close()
    _, sa, sb = evaluate()
    _save_model(model, tok, cfg.output)
    record = _fit_record(cfg, data, train, held, margins_of(cfg.kind, sa, sb),
                         torch.cat([sa, sb]), {
                             "mode": "full", "kind": cfg.kind,
                             "pooling": pooling_of_model(model), "steps": state.step,
                             "final_checkpoint": last_ckpt,
                             "pairs_per_s": state.pairs_seen / max(state.train_time_s, 1e-9)})
    with open(os.path.join(cfg.output, FIT_FILE), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    if cfg.plots:
        from trainer.plots import plot_metrics

        plot_metrics(writer.path, os.path.join(cfg.output, "plots"))
    log.info("held-out accuracy %.3f [%.3f, %.3f] on %d pairs; model in %s",
             record["heldout_accuracy"], *record["heldout_accuracy_ci95"],
             record["heldout_pairs"], cfg.output)
    return RewardResult(cfg.output, record)


def train_reward(cfg: RewardConfig, **kw: Any) -> RewardResult:
    """Runs ``cfg.mode``."""
    return train_full(cfg, **kw) if cfg.mode == "full" else train_head(cfg)


USAGE = "usage: rso reward train [flags]   (rso reward train --help lists them)"


def main(argv: Sequence[str] | None = None) -> int:
    """``rso reward train ...``: 0 when done, 2 for bad configuration or data, 143 when
    SIGTERM stopped a full run after saving a checkpoint."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "train":
        print(USAGE, file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if "--verbose" not in argv:
        for name in ("transformers", "urllib3", "filelock"):
            logging.getLogger(name).setLevel(logging.WARNING)

    def body(should_stop):
        cfg, _ = RewardConfig.parse_args(argv[1:], prog="rso reward train",
                                         description="Train a Bradley-Terry reward model.")
        # head mode: minutes of feature extraction, which SIGTERM ends as usual; a run that
        # fails at start leaves no folder
        with cleaned_up_on_failure(cfg.output):
            return train_reward(cfg) if cfg.mode == "head" else train_reward(
                cfg, should_stop=should_stop)

    return run_preemptible("rso reward train", body, (ConfigError, DataError))


if __name__ == "__main__":
    sys.exit(main())
