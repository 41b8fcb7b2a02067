"""`rso train`: optimise a policy on preference pairs with one model in memory (SPEC 6).

    python -m trainer.train --data OUT_DIR --policy SFT_DIR --output RUN_DIR [--loss sigmoid-norm]

The whole loop is in :func:`train`; the pieces it calls live in small modules next to it:
config (TrainConfig), data (reading, bucketing), model (loading, one-forward pair log-probs),
losses (SPEC 6), reference (step-0 gap check, --recompute-reference cache), optim (optimizer,
schedule), checkpoint (exact resume), metrics (JSONL, TensorBoard, progress bar), plots (PNGs).
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from typing import Callable, Iterator, Optional, Sequence

import torch

from rso.config import ConfigError
from rso import ownership
from rso.hf import resolve_device
from trainer import checkpoint as ckpt
from trainer import reference as ref
from trainer.config import RESUME_INVARIANTS, TrainConfig
from trainer.data import DataError, Pair, PairSource, in_eval_split, length_filter, resolve_files
from trainer.losses import preference_loss
from trainer.memory import limit_heap_retention
from trainer.metrics import MetricsWriter, PairMetrics, Progress, peak_memory
from trainer.model import (autocast, load_policy, pad_token_id, pair_logps, reference_logps,
                           resolve_precision)
from trainer.optim import build_optimizer, build_scheduler

log = logging.getLogger("rso.trainer")


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN or infinite; the message names the pairs."""


@dataclasses.dataclass
class TrainResult:
    output: str
    steps: int
    checkpoint: Optional[str]  # the last checkpoint written (the final model at the end)
    metrics_path: str
    train: dict  # metrics of the last logged train step
    eval: dict  # metrics of the last evaluation (empty without eval pairs)
    summary: dict
    finished: bool  # False when stopped early (``should_stop`` or ``stop_after``)


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


def _evaluate(model: torch.nn.Module, source: PairSource, cfg: TrainConfig, pad_id: int,
              device: torch.device, amp: Optional[torch.dtype]) -> dict:
    metrics = PairMetrics()
    model.eval()
    with torch.no_grad():
        for pairs in source.sequential(cfg.batch_size, cfg.bucket_batches):
            with autocast(device, amp):
                chosen, rejected, batch = pair_logps(model, pairs, pad_id, device)
            ref_chosen, ref_rejected = reference_logps(pairs, device)
            losses = preference_loss(chosen, rejected, ref_chosen, ref_rejected, cfg.loss,
                                     cfg.gamma)
            metrics.add(chosen, rejected, ref_chosen, ref_rejected, losses, cfg.gamma,
                        batch.num_tokens, batch.input_ids.numel())
    model.train()
    return metrics.means()


def _prepare_output(cfg: TrainConfig) -> Optional[str]:
    """Creates the output directory and takes it for this process (``OUTPUT/_LOCK``, released
    at exit; :class:`rso.ownership.OutputLockedError` if another run owns it); returns the
    checkpoint to resume from, if any."""
    os.makedirs(cfg.output, exist_ok=True)
    ownership.hold_until_exit(cfg.output, run_id="rso train")
    latest = ckpt.latest_checkpoint(cfg.output)
    if cfg.overwrite:
        stale = ckpt.list_checkpoints(cfg.output) + [
            os.path.join(cfg.output, name)
            for name in ("tensorboard", "plots", ref.CACHE_FILE, "metrics.jsonl")]
        for path in stale:
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
        return None
    if latest and not cfg.resume:
        raise ConfigError(f"{cfg.output} already holds checkpoints ({os.path.basename(latest)});"
                          f" pass --resume to continue that run or --overwrite to start over")
    if latest:
        saved = ckpt.saved_config(latest)
        current = cfg.to_dict()
        changed = [k for k in RESUME_INVARIANTS if saved.get(k) != current[k]]
        if changed:
            raise ConfigError(f"cannot resume {latest}: setting(s) {', '.join(changed)} differ "
                              f"from the interrupted run's")
    elif cfg.resume:
        log.info("--resume: no checkpoint in %s, starting from scratch", cfg.output)
    return latest


def _sources(cfg: TrainConfig, vocab_size: int) -> tuple[PairSource, list[PairSource]]:
    """The training pairs, and the evaluation sets: the held-out prompts of --data
    (--eval-fraction), then --eval-data."""
    fits = length_filter(cfg.max_length)
    files = resolve_files(cfg.data, cfg.data_format)

    def split(held_out: bool) -> PairSource:
        return PairSource(files, vocab_size=vocab_size, keep=lambda p: fits(p) and (
            in_eval_split(p.prompt_id, cfg.eval_fraction) == held_out))

    evals = [split(True)] if cfg.eval_fraction > 0 else []
    if cfg.eval_data:
        evals.append(PairSource(resolve_files(cfg.eval_data, cfg.data_format), keep=fits,
                                vocab_size=vocab_size))
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


def train(cfg: TrainConfig, *, should_stop: Optional[Callable[[], bool]] = None,
          stop_after: Optional[int] = None) -> TrainResult:
    """Runs (or resumes) training as ``cfg`` says.

    ``should_stop()`` is asked after every step; when true, a checkpoint is saved and training
    returns unfinished (``main`` wires it to SIGTERM). ``stop_after=s`` returns after step s
    without saving, as if the process had been killed there (to test resuming).
    """
    cfg.validate()
    started = time.perf_counter()
    limit_heap_retention()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    amp = resolve_precision(cfg.precision, device)
    resume_from = _prepare_output(cfg)
    torch.manual_seed(cfg.seed)

    # ---- model: the initial policy, or the interrupted run's weights
    model, tokenizer = load_policy(resume_from or cfg.policy, device, cfg.trust_remote_code)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    pad_id = pad_token_id(model, tokenizer)
    vocab_size = model.get_input_embeddings().num_embeddings

    # ---- data: every pair is read and validated once up front (fails early, naming the row)
    train_source, eval_sources = _sources(cfg, vocab_size)
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
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = ckpt.TrainState(**saved["state"])
        ckpt.set_rng_state(saved["rng"])
        log.info("resumed from %s: step %d, epoch %d, micro-batch %d", resume_from, state.step,
                 state.epoch, state.batches_in_epoch)

    writer = MetricsWriter(cfg.output, cfg.tensorboard, resume_step=state.step if resume_from
                           else None)
    progress = Progress(total_steps, state.step, cfg.progress)
    params = [p for p in model.parameters() if p.requires_grad]
    last_train: dict = {}
    last_eval: dict = {}
    last_checkpoint = resume_from
    groups = _step_groups(train_source, cfg, state.epoch, state.batches_in_epoch)
    try:
        while state.step < total_steps:
            t0 = time.perf_counter()
            epoch, first, group = next(groups)
            if state.step == 0 and not resume_from:
                t_check = time.perf_counter()
                gap = ref.measure_gap(model, group[0], pad_id, device)
                writer.log("reference", 0, gap.as_dict())
                ref.check_reference(gap, cfg.reference_tolerance, cfg.strict_reference)
                t0 += time.perf_counter() - t_check  # not part of the step's throughput

            # ---- one optimizer step over grad_accum micro-batches, pairs weighted equally
            step_pairs = sum(len(pairs) for pairs in group)
            metrics = PairMetrics()
            lr = scheduler.get_last_lr()[0]
            for pairs in group:
                with autocast(device, amp):
                    chosen, rejected, batch = pair_logps(model, pairs, pad_id, device)
                ref_chosen, ref_rejected = reference_logps(pairs, device)
                losses = preference_loss(chosen, rejected, ref_chosen, ref_rejected, cfg.loss,
                                         cfg.gamma)
                if not torch.isfinite(losses).all():
                    bad = [p for p, ok in zip(pairs, torch.isfinite(losses).tolist()) if not ok]
                    raise NonFiniteLossError(
                        f"non-finite loss at step {state.step + 1}; pairs: " +
                        "; ".join(f"prompt_id {p.prompt_id} ({p.where})" for p in bad))
                (losses.sum() / step_pairs).backward()
                metrics.add(chosen, rejected, ref_chosen, ref_rejected, losses, cfg.gamma,
                            batch.num_tokens, batch.input_ids.numel())
            grad_norm = torch.nn.utils.clip_grad_norm_(
                params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
            if not torch.isfinite(grad_norm):
                raise NonFiniteLossError(
                    f"non-finite gradient norm at step {state.step + 1}; prompt_ids: " +
                    ", ".join(p.prompt_id for pairs in group for p in pairs))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - t0

            state = ckpt.TrainState(step=state.step + 1, epoch=epoch,
                                    batches_in_epoch=first + len(group),
                                    pairs_seen=state.pairs_seen + step_pairs,
                                    tokens_seen=state.tokens_seen + metrics.tokens,
                                    train_time_s=state.train_time_s + elapsed)
            last_train = {**metrics.means(), "grad_norm": float(grad_norm), "lr": lr,
                          "step_time_s": elapsed, "pairs_per_s": step_pairs / elapsed,
                          "tokens_per_s": metrics.tokens / elapsed, **peak_memory(device),
                          "epoch": epoch}
            progress.update(last_train)
            if state.step % cfg.log_every == 0 or state.step == total_steps:
                writer.log("train", state.step, last_train)

            # ---- evaluation and checkpoints
            done = state.step == total_steps
            if eval_sources and (done or (cfg.eval_every and state.step % cfg.eval_every == 0)):
                last_eval = _merge_eval([_evaluate(model, s, cfg, pad_id, device, amp)
                                         for s in eval_sources])
                writer.log("eval", state.step, last_eval)
                progress.write(f"step {state.step}: eval loss {last_eval['loss']:.4f} "
                               f"accuracy {last_eval['accuracy']:.3f}")
            if done or (cfg.save_every and state.step % cfg.save_every == 0):
                last_checkpoint = ckpt.save_checkpoint(cfg.output, model, tokenizer, optimizer,
                                                       scheduler, state, cfg.to_dict(),
                                                       cfg.keep_checkpoints)
            if not done and should_stop is not None and should_stop():
                if last_checkpoint != ckpt.checkpoint_dir(cfg.output, state.step):
                    last_checkpoint = ckpt.save_checkpoint(
                        cfg.output, model, tokenizer, optimizer, scheduler, state,
                        cfg.to_dict(), cfg.keep_checkpoints)
                log.warning("stopped at step %d; checkpoint %s; run again with --resume to "
                            "continue", state.step, last_checkpoint)
                stop_after = state.step
            if not done and stop_after is not None and state.step >= stop_after:
                return TrainResult(cfg.output, state.step, last_checkpoint, writer.path,
                                   last_train, last_eval, {}, finished=False)

        summary = {"steps": state.step, "pairs": state.pairs_seen,
                   "train_time_s": state.train_time_s,
                   "pairs_per_s": state.pairs_seen / max(state.train_time_s, 1e-9),
                   "tokens": state.tokens_seen,
                   "tokens_per_s": state.tokens_seen / max(state.train_time_s, 1e-9),
                   "wall_time_s": time.perf_counter() - started,
                   **peak_memory(device), "final_checkpoint": last_checkpoint}
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


def _merge_eval(results: Sequence[dict]) -> dict:
    """Pair-weighted mean of evaluations over several held-out sources."""
    total = sum(r["pairs"] for r in results)
    merged = {k: sum(r[k] * r["pairs"] for r in results) / max(1, total)
              for k in results[0] if k not in ("pairs", "tokens")}
    merged.update(pairs=total, tokens=sum(r["tokens"] for r in results))
    return merged


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point (``rso train`` calls it with the flags after ``train``).

    Returns 0 when done, 2 for bad configuration or data, 143 when SIGTERM stopped the run after
    saving a checkpoint (preemption: run again with --resume).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    stop = threading.Event()
    previous = (signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
                if threading.current_thread() is threading.main_thread() else None)
    try:
        cfg, _ = TrainConfig.parse_args(argv, prog="rso train",
                                        description="Train a policy on RSO/DPO preference pairs.")
        result = train(cfg, should_stop=stop.is_set)
    except (ConfigError, DataError, ref.ReferenceMismatchError, NonFiniteLossError) as e:
        print(f"rso train: error: {e}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0 if result.finished else 128 + signal.SIGTERM


if __name__ == "__main__":
    sys.exit(main())
