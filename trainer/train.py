"""`rso train`: optimise a policy on preference pairs with one model in memory (SPEC 6).

    python -m trainer.train --data OUT_DIR --policy SFT_DIR --output RUN_DIR [--loss sigmoid-norm]

Read top to bottom like nanoGPT's train.py: :func:`setup` (device, model, data, optimizer,
resume), :func:`pair_loss` (one forward, per-pair losses; shared with :func:`evaluate`),
:func:`train_step` (one optimizer step), then the loop in :func:`train`. Each stage's details
live in a module of its own name: config (TrainConfig), data (load: reading, validation,
bucketing), model (loading, one-forward pair log-probs), losses (SPEC 6), reference (step-0
gap check, --recompute-reference cache), optim (optimizer, schedule), checkpoint (exact
resume), metrics (JSONL, TensorBoard, progress bar), plots (PNGs).
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from rso import ownership
from rso.config import ConfigError
from rso.hf import resolve_device
from rso.storage import cleaned_up_on_failure
from trainer import checkpoint as ckpt
from trainer import reference as ref
from trainer.config import RESUME_CHANGEABLE, RESUME_FIXED, TrainConfig
from trainer.data import (
    DataError,
    Pair,
    PairSource,
    data_id,
    in_eval_split,
    length_filter,
    verify_files,
)
from trainer.losses import preference_loss
from trainer.memory import limit_heap_retention
from trainer.metrics import (
    METRICS_FILE,
    MetricsWriter,
    PairMetrics,
    Progress,
    peak_memory,
    read_metrics,
)
from trainer.model import (
    autocast,
    load_policy,
    pad_token_id,
    pair_logps,
    reference_logps,
    resolve_precision,
)
from trainer.optim import build_optimizer, build_scheduler, override_saved_hyperparameters

log = logging.getLogger("rso.trainer")


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN or infinite; the message names the pairs."""


@dataclasses.dataclass
class TrainResult:
    output: str
    steps: int
    checkpoint: str | None  # the last checkpoint written (the final model at the end)
    metrics_path: str
    train: dict  # metrics of the last logged train step
    eval: dict  # metrics of the last evaluation (empty without eval pairs)
    summary: dict
    finished: bool  # False when stopped early (``should_stop``)


def _step_groups(source: PairSource, cfg: TrainConfig, epoch: int, skip: int
                 ) -> Iterator[tuple[int, int, list[list[Pair]]]]:
    """Endless ``(epoch, first micro-batch index, micro-batches)`` of each optimizer step,
    starting at the data position (epoch, skip); the last step of an epoch may be shorter."""
    while True:
        batches = source.epoch(epoch, cfg.seed, cfg.batch_size, cfg.bucket_batches,
                               cfg.shuffle_buffer)
        index = 0
        for group in iter(lambda: list(itertools.islice(batches, cfg.grad_accum)), []):
            if index >= skip:
                yield epoch, index, group
            index += len(group)
        epoch, skip = epoch + 1, 0
        if index == 0:
            raise DataError("no training pairs to read")


def _prepare_output(cfg: TrainConfig, data_ids: dict[str, str | None]
                    ) -> tuple[str | None, list[dict]]:
    """Creates the output directory; returns the checkpoint to resume from (if any) and the
    settings changes on record: the interrupted run's, plus those this resume applies.

    A resume with settings other than the checkpoint's is refused (:class:`ConfigError`),
    unless every difference is in :data:`RESUME_CHANGEABLE` and named by --allow-change.

    Takes the directory for this process (``OUTPUT/_LOCK``, released at exit;
    :class:`rso.ownership.OutputLockedError` if another run owns it).
    """
    os.makedirs(cfg.output, exist_ok=True)
    ownership.hold_until_exit(cfg.output, run_id="rso train")
    latest = ckpt.latest_checkpoint(cfg.output)
    if cfg.overwrite:
        stale = ckpt.list_checkpoints(cfg.output) + [
            os.path.join(cfg.output, name)
            for name in ("tensorboard", "plots", ref.CACHE_FILE, METRICS_FILE)]
        for path in stale:
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
        return None, []
    if latest and not cfg.resume:
        raise ConfigError(f"{cfg.output} already holds checkpoints ({os.path.basename(latest)});"
                          f" pass --resume to continue that run or --overwrite to start over")
    if not latest:
        if cfg.resume:
            log.info("--resume: no checkpoint in %s, starting from scratch", cfg.output)
        return None, []
    saved = ckpt.saved_run(latest)
    diff = ckpt.resume_differences(saved, cfg.to_dict(), data_ids,
                                   RESUME_FIXED + RESUME_CHANGEABLE)
    refused = [k for k in diff if k not in cfg.allow_change]
    if refused:
        detail = "; ".join(f"{k}: {diff[k][0]} -> {diff[k][1]}" for k in refused)
        fixed = [k for k in refused if k in RESUME_FIXED]
        raise ConfigError(
            f"cannot resume {latest}: setting(s) {', '.join(refused)} differ from the "
            f"interrupted run's ({detail}); a resumed run must use the same settings to equal "
            f"an uninterrupted one. " + (
                f"{', '.join(fixed)} cannot change in a resumed run" if fixed else
                f"pass --allow-change {','.join(refused)} to apply the new values from step "
                f"{saved['state']['step']} on (recorded in the checkpoints)"))
    step = saved["state"]["step"]
    if _finished(cfg.output, saved, diff):
        raise AlreadyFinished(latest, step)
    applied = [{"step": step, "setting": k, "from": old, "to": new}
               for k, (old, new) in diff.items()]
    for change in applied:
        log.warning("--allow-change: %s changes from %s to %s at step %d", change["setting"],
                    change["from"], change["to"], step)
    return latest, saved.get("changes", []) + applied


class AlreadyFinished(Exception):
    """--resume of a run that finished with these settings and data: :func:`setup` raises it
    before loading anything (the run's last checkpoint and step); :func:`train` returns it."""

    def __init__(self, checkpoint: str, step: int):
        super().__init__(checkpoint)
        self.checkpoint, self.step = checkpoint, step


def _finished(output: str, saved: dict, diff: dict) -> bool:
    """Whether the run whose last checkpoint's :func:`ckpt.saved_run` is ``saved`` finished
    with the settings and data now asked for (``diff``: none differ): its closing summary is
    at that checkpoint's step."""
    return not diff and _summary_step(output) == saved["state"]["step"]


def finished_run(argv: Sequence[str]) -> str | None:
    """The final checkpoint when `rso train ARGV --resume` would take no step (the run in its
    --output finished with these settings and data); None otherwise, or when ARGV would be
    refused (`rso train` then says why). Reads JSON and the data's content ids, loads no model:
    `rso demo` asks before it starts a trainer."""
    try:
        cfg = parse_config(argv)
        latest = ckpt.latest_checkpoint(cfg.output)
        if latest is None:
            return None
        _, _, data_ids = _data_files(cfg)
        saved = ckpt.saved_run(latest)
    except (ConfigError, DataError, OSError, ValueError):
        return None
    diff = ckpt.resume_differences(saved, cfg.to_dict(), data_ids,
                                   RESUME_FIXED + RESUME_CHANGEABLE)
    return latest if _finished(cfg.output, saved, diff) else None


def _data_files(cfg: TrainConfig) -> tuple[list, list, dict[str, str | None]]:
    """--data's and --eval-data's files, each checked against its manifest's sha256 (a
    DataError names the file), and their content ids (``data``, ``eval_data``)."""
    files = verify_files(cfg.data, cfg.data_format)
    eval_files = verify_files(cfg.eval_data, cfg.data_format) if cfg.eval_data else []
    return files, eval_files, {"data": data_id(files),
                               "eval_data": data_id(eval_files) if eval_files else None}


def _summary_step(output: str) -> int | None:
    """The step of the run's closing ``summary`` record in metrics.jsonl (written after its
    final checkpoint), or None (none: the run did not finish, or the file is gone)."""
    try:
        records = read_metrics(os.path.join(output, METRICS_FILE))
    except (OSError, ValueError):
        return None
    steps = [r.get("step") for r in records if r.get("split") == "summary"]
    return steps[-1] if steps else None


def _sources(cfg: TrainConfig, vocab_size: int, files: list[str], eval_files: list[str]
             ) -> tuple[PairSource, list[PairSource]]:
    """The training pairs, and the evaluation sets: the held-out prompts of --data
    (--eval-fraction), then --eval-data."""
    fits = length_filter(cfg.max_length)

    def split(held_out: bool) -> PairSource:
        return PairSource(files, vocab_size=vocab_size, keep=lambda p: fits(p) and (
            in_eval_split(p.prompt_id, cfg.eval_fraction) == held_out))

    evals = [split(True)] if cfg.eval_fraction > 0 else []
    if eval_files:
        evals.append(PairSource(eval_files, keep=fits, vocab_size=vocab_size))
    return split(False), evals


def _count(cfg: TrainConfig, train: PairSource, evals: list[PairSource]) -> tuple[int, int]:
    """Reads (and so validates) every pair once; returns (training pairs, evaluation pairs)."""
    fits = length_filter(cfg.max_length)
    tally = collections.Counter(
        "too long" if not fits(p) else
        "held out" if in_eval_split(p.prompt_id, cfg.eval_fraction) else "train"
        for p in dataclasses.replace(train, keep=lambda p: True).pairs())
    if tally["too long"]:
        log.warning("--max-length %d: skipping %d longer pairs", cfg.max_length,
                    tally["too long"])
    if tally["train"] == 0:
        raise DataError(f"no training pairs in {', '.join(cfg.data)} (after --eval-fraction "
                        f"and --max-length)")
    return tally["train"], tally["held out"] + (evals[-1].count() if cfg.eval_data else 0)


def _reference_cache(cfg: TrainConfig, model: torch.nn.Module, sources: list[PairSource],
                     pad_id: int, device: torch.device, resuming: bool
                     ) -> dict[str, tuple[float, float]]:
    """--recompute-reference: the cache in --output, computed now (fp32) on a fresh run."""
    cache = ref.load_cache(cfg.output)
    if cache is not None:
        return cache
    if resuming:
        raise DataError(f"{os.path.join(cfg.output, ref.CACHE_FILE)} is missing, and the "
                        f"initial policy's log-probs cannot be recomputed from a checkpoint")
    log.info("computing reference log-probs with the initial policy in fp32")
    cache = {}
    for source in sources:
        batches = dataclasses.replace(source, require_reference=False).sequential(
            cfg.batch_size, cfg.bucket_batches)
        cache.update(ref.compute_reference(model, batches, pad_id, device))
    ref.save_cache(cfg.output, cache, cfg.policy)
    return cache


@dataclasses.dataclass
class Run:
    """What the loop works with, built once by :func:`setup`."""
    cfg: TrainConfig
    device: torch.device
    amp: torch.dtype | None  # bf16 autocast, or None for fp32
    model: torch.nn.Module
    tokenizer: Any
    pad_id: int
    train_source: PairSource
    eval_sources: list[PairSource]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    total_steps: int
    state: ckpt.TrainState  # the data position and counters after the last step
    resumed_from: str | None  # the checkpoint this run continues, if any
    run_info: dict  # saved in every checkpoint: data content ids, settings changed on resume


def setup(cfg: TrainConfig) -> Run:
    """Device, output directory, model, data (read and validated once), optimizer, schedule
    and, when resuming, the interrupted run's optimizer, schedule, RNG and data position."""
    cfg.validate()
    limit_heap_retention()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    amp = resolve_precision(cfg.precision, device)

    # ---- data files: checked against their manifest's sha256 (fails naming the file)
    files, eval_files, data_ids = _data_files(cfg)

    # ---- output directory; a resume must keep the settings (or --allow-change them)
    resume_from, changes = _prepare_output(cfg, data_ids)
    torch.manual_seed(cfg.seed)

    # ---- model: the initial policy, or the interrupted run's weights
    model, tokenizer = load_policy(resume_from or cfg.policy, device, cfg.trust_remote_code)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    pad_id = pad_token_id(model, tokenizer)

    # ---- data: every pair is read and validated once up front (fails early, naming the row)
    train_source, eval_sources = _sources(cfg, model.get_input_embeddings().num_embeddings,
                                          [f.path for f in files], [f.path for f in eval_files])
    if cfg.recompute_reference:
        cache = _reference_cache(cfg, model, [train_source] + eval_sources, pad_id, device,
                                 resuming=resume_from is not None)
        for source in [train_source] + eval_sources:
            source.reference = cache
    num_pairs, num_eval = _count(cfg, train_source, eval_sources)
    steps_per_epoch = math.ceil(math.ceil(num_pairs / cfg.batch_size) / cfg.grad_accum)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    log.info("%d training pairs (%d steps per epoch), %d held-out pairs; %d steps, loss %s, "
             "gamma %g, %s on %s", num_pairs, steps_per_epoch, num_eval, total_steps, cfg.loss,
             cfg.gamma, "bf16 autocast" if amp else "fp32", device)

    # ---- optimizer, schedule, and the state of an interrupted run
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    state = ckpt.TrainState()
    if resume_from:
        saved = ckpt.load_trainer_state(resume_from)
        override_saved_hyperparameters(saved["optimizer"], saved["scheduler"], cfg,
                                       [c["setting"] for c in changes
                                        if c["step"] == saved["state"]["step"]], total_steps)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = ckpt.TrainState(**saved["state"])
        ckpt.set_rng_state(saved["rng"])
        log.info("resumed from %s: step %d, epoch %d, micro-batch %d", resume_from, state.step,
                 state.epoch, state.batches_in_epoch)
    return Run(cfg, device, amp, model, tokenizer, pad_id, train_source, eval_sources,
               optimizer, scheduler, total_steps, state, resume_from,
               {"data_ids": data_ids, "changes": changes})


def pair_loss(run: Run, pairs: Sequence[Pair], metrics: PairMetrics) -> torch.Tensor:
    """One forward pass over a micro-batch: its per-pair losses ([B], SPEC 6), also added to
    ``metrics``. Shared by training and evaluation."""
    with autocast(run.device, run.amp):
        chosen, rejected, batch = pair_logps(run.model, pairs, run.pad_id, run.device)
    ref_chosen, ref_rejected = reference_logps(pairs, run.device)
    losses = preference_loss(chosen, rejected, ref_chosen, ref_rejected, run.cfg.loss,
                             run.cfg.gamma)
    metrics.add(chosen, rejected, ref_chosen, ref_rejected, losses, run.cfg.gamma,
                batch.num_tokens, batch.input_ids.numel())
    return losses


def train_step(run: Run, group: Sequence[Sequence[Pair]], step: int
               ) -> tuple[PairMetrics, float]:
    """Optimizer step ``step`` (1-based) over the micro-batches ``group``, pairs weighted equally
    (the mean loss over all pairs of the step): backward per micro-batch, clip the global
    gradient norm, step the optimizer and the schedule. Returns the step's pair metrics and the
    gradient norm before clipping. Raises :class:`NonFiniteLossError` naming the pairs."""
    step_pairs = sum(len(pairs) for pairs in group)
    metrics = PairMetrics()
    for pairs in group:
        losses = pair_loss(run, pairs, metrics)
        finite = torch.isfinite(losses)
        if not finite.all():
            bad = [p for p, ok in zip(pairs, finite.tolist()) if not ok]
            raise NonFiniteLossError(f"non-finite loss at step {step}; pairs: " + "; ".join(
                f"prompt_id {p.prompt_id} ({p.where})" for p in bad))
        (losses.sum() / step_pairs).backward()
    max_norm = run.cfg.max_grad_norm if run.cfg.max_grad_norm > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(
        [p for p in run.model.parameters() if p.requires_grad], max_norm)
    if not torch.isfinite(grad_norm):
        raise NonFiniteLossError(f"non-finite gradient norm at step {step}; prompt_ids: " +
                                 ", ".join(p.prompt_id for pairs in group for p in pairs))
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    return metrics, float(grad_norm)


def evaluate(run: Run) -> dict:
    """Pair metrics over every evaluation set (pair-weighted), in eval mode, without gradients."""
    results = []
    run.model.eval()
    with torch.no_grad():
        for source in run.eval_sources:
            metrics = PairMetrics()
            for pairs in source.sequential(run.cfg.batch_size, run.cfg.bucket_batches):
                pair_loss(run, pairs, metrics)
            results.append(metrics.means())
    run.model.train()
    return _merge_eval(results)


def save(run: Run, state: ckpt.TrainState) -> str:
    """Writes the checkpoint of ``state.step`` (see :mod:`trainer.checkpoint`)."""
    return ckpt.save_checkpoint(run.cfg.output, run.model, run.tokenizer, run.optimizer,
                                run.scheduler, state, run.cfg.to_dict(),
                                run.cfg.keep_checkpoints, run.run_info)


def train(cfg: TrainConfig, *, should_stop: Callable[[], bool] | None = None
          ) -> TrainResult:
    """Runs (or resumes) training as ``cfg`` says.

    ``should_stop()`` is asked after every step but the last; when true, a checkpoint is saved
    and training returns unfinished (``main`` wires it to SIGTERM). An exception it raises
    leaves the loop without saving, as if the process had been killed there.
    """
    started = time.perf_counter()
    try:
        run = setup(cfg)
        state, last_checkpoint = run.state, run.resumed_from
        if run.resumed_from and state.step >= run.total_steps:  # stopped before its summary
            raise AlreadyFinished(run.resumed_from, state.step)
    except AlreadyFinished as ended:  # leave it as it is
        log.info("already finished: %d steps, final model in %s", ended.step, ended.checkpoint)
        return TrainResult(cfg.output, ended.step, ended.checkpoint,
                           os.path.join(cfg.output, METRICS_FILE), {}, {}, {},
                           finished=True)
    writer = MetricsWriter(cfg.output, cfg.tensorboard,
                           resume_step=state.step if run.resumed_from else None)
    progress = Progress(run.total_steps, state.step, cfg.progress)
    last_train: dict = {}
    last_eval: dict = {}
    groups = _step_groups(run.train_source, cfg, state.epoch, state.batches_in_epoch)
    try:
        while state.step < run.total_steps:
            t0 = time.perf_counter()
            epoch, first, group = next(groups)

            # ---- before the first step: stored reference log-probs against the initial policy
            if state.step == 0 and not run.resumed_from:
                t_check = time.perf_counter()
                gap = ref.measure_gap(run.model, group[0], run.pad_id, run.device)
                writer.log("reference", 0, gap.as_dict())
                ref.check_reference(gap, cfg.reference_tolerance, cfg.strict_reference)
                t0 += time.perf_counter() - t_check  # not part of the step's throughput

            # ---- one optimizer step over grad_accum micro-batches
            lr = run.scheduler.get_last_lr()[0]
            metrics, grad_norm = train_step(run, group, state.step + 1)
            elapsed = time.perf_counter() - t0
            state = ckpt.TrainState(step=state.step + 1, epoch=epoch,
                                    batches_in_epoch=first + len(group),
                                    pairs_seen=state.pairs_seen + metrics.pairs,
                                    tokens_seen=state.tokens_seen + metrics.tokens,
                                    train_time_s=state.train_time_s + elapsed)

            # ---- metrics
            last_train = {**metrics.means(), "grad_norm": grad_norm, "lr": lr,
                          "step_time_s": elapsed, "pairs_per_s": metrics.pairs / elapsed,
                          "tokens_per_s": metrics.tokens / elapsed, **peak_memory(run.device),
                          "epoch": epoch}
            progress.update(last_train)
            done = state.step == run.total_steps
            if state.step % cfg.log_every == 0 or done:
                writer.log("train", state.step, last_train)

            # ---- evaluation and checkpoints
            if run.eval_sources and (done or (cfg.eval_every and
                                              state.step % cfg.eval_every == 0)):
                last_eval = evaluate(run)
                writer.log("eval", state.step, last_eval)
                log.info("step %d: eval loss %.4f accuracy %.3f", state.step,
                         last_eval["loss"], last_eval["accuracy"])
            if done or (cfg.save_every and state.step % cfg.save_every == 0):
                last_checkpoint = save(run, state)

            # ---- stop early (SIGTERM): save the step just done, return unfinished
            if not done and should_stop is not None and should_stop():
                if last_checkpoint != ckpt.checkpoint_dir(cfg.output, state.step):
                    last_checkpoint = save(run, state)
                log.warning("stopped at step %d; checkpoint %s; run again with --resume to "
                            "continue", state.step, last_checkpoint)
                return TrainResult(cfg.output, state.step, last_checkpoint, writer.path,
                                   last_train, last_eval, {}, finished=False)

        summary = _summary(state, time.perf_counter() - started, run.device, last_checkpoint)
        writer.log("summary", state.step, summary)
    finally:
        progress.close()
        writer.close()
    if cfg.plots:
        from trainer.plots import plot_metrics

        plot_metrics(writer.path, os.path.join(cfg.output, "plots"))
    log.info("done: %d steps, %.2f pairs/s, final model in %s", state.step,
             summary["pairs_per_s"], last_checkpoint)
    return TrainResult(cfg.output, state.step, last_checkpoint, writer.path, last_train,
                       last_eval, summary, finished=True)


def _summary(state: ckpt.TrainState, wall_time_s: float, device: torch.device,
             final_checkpoint: str | None) -> dict:
    """The run's ``summary`` metrics record (see :mod:`trainer.metrics`)."""
    return {"steps": state.step, "pairs": state.pairs_seen, "train_time_s": state.train_time_s,
            "pairs_per_s": state.pairs_seen / max(state.train_time_s, 1e-9),
            "tokens": state.tokens_seen,
            "tokens_per_s": state.tokens_seen / max(state.train_time_s, 1e-9),
            "wall_time_s": wall_time_s, **peak_memory(device), "final_checkpoint": final_checkpoint}


def _merge_eval(results: Sequence[dict]) -> dict:
    """Pair-weighted mean of evaluations over several held-out sources."""
    total = sum(r["pairs"] for r in results)
    merged = {k: sum(r[k] * r["pairs"] for r in results) / max(1, total)
              for k in results[0] if k not in ("pairs", "tokens")}
    merged.update(pairs=total, tokens=sum(r["tokens"] for r in results))
    return merged


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """``TrainConfig.parse_args`` for ``rso train``; an unreadable or malformed ``--config``
    file is a one-line :class:`ConfigError` (raised by ``rso.config.Config.from_yaml``)."""
    cfg, _ = TrainConfig.parse_args(argv, prog="rso train",
                                    description="Train a policy on RSO/DPO preference pairs.")
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``rso train`` calls it with the flags after ``train``).

    Returns 0 when done, 2 for bad configuration or data, 143 when SIGTERM stopped the run after
    saving a checkpoint (preemption: run again with --resume).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    def body(should_stop: Callable[[], bool]) -> TrainResult:
        cfg = parse_config(argv)
        with cleaned_up_on_failure(cfg.output):  # a run that fails at start leaves no folder
            try:
                return train(cfg, should_stop=should_stop)
            except BaseException:
                ownership.release_held(cfg.output)  # now, not at exit: the run is over
                raise

    return ckpt.run_preemptible(
        "rso train", body,
        (ConfigError, DataError, ref.ReferenceMismatchError, NonFiniteLossError))


if __name__ == "__main__":
    sys.exit(main())
