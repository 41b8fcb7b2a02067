"""Checkpoints that resume exactly.

``OUTPUT/checkpoint-00000042/`` is a Hugging Face model directory (``save_pretrained``, weights
as safetensors, plus the tokenizer) that also holds:
- ``trainer_state.pt``: optimizer and scheduler state, RNG states (torch CPU and CUDA, Python,
  NumPy) and the data position; written with ``torch.save`` and read with
  ``torch.load(weights_only=True)``, so loading runs no pickled code;
- ``trainer_state.json``: the same position and the config, for people, plus the content ids
  of the data (``data_ids``: a resumed run refuses other data) and the settings changed on a
  resume (``changes``: step, setting, from, to).
A checkpoint is written to a temporary directory and renamed into place, so a run killed while
saving leaves the previous checkpoint intact.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

PREFIX = "checkpoint-"
STATE_PT = "trainer_state.pt"
STATE_JSON = "trainer_state.json"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")


@dataclasses.dataclass
class TrainState:
    """Where training stands: optimizer steps done and the data position after them."""
    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of ``epoch`` already consumed
    pairs_seen: int = 0
    tokens_seen: int = 0  # non-padding tokens of the forward passes
    train_time_s: float = 0.0


def rng_state() -> dict[str, Any]:
    name, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                             "numpy": (name, torch.from_numpy(key.astype(np.int64)), pos,
                                       has_gauss, gauss)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(output: str, step: int) -> str:
    return os.path.join(output, f"{PREFIX}{step:08d}")


def list_checkpoints(output: str) -> list[str]:
    """Complete checkpoints in ``output``, oldest first."""
    if not os.path.isdir(output):
        return []
    found = []
    for name in os.listdir(output):
        m = _NAME.match(name)
        if m and os.path.exists(os.path.join(output, name, STATE_PT)):
            found.append((int(m.group(1)), os.path.join(output, name)))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output: str) -> str | None:
    checkpoints = list_checkpoints(output)
    return checkpoints[-1] if checkpoints else None


def save_checkpoint(output: str, model: torch.nn.Module, tokenizer: Any,
                    optimizer: torch.optim.Optimizer, scheduler: Any, state: TrainState,
                    config: dict[str, Any], keep: int = 0,
                    run_info: dict[str, Any] | None = None) -> str:
    """Writes ``checkpoint-<step>`` atomically and keeps only the ``keep`` newest (0 = all).
    ``run_info`` (JSON values) goes into ``trainer_state.json`` next to the config."""
    final = checkpoint_dir(output, state.step)
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": rng_state(), "state": dataclasses.asdict(state)},
               os.path.join(tmp, STATE_PT))
    with open(os.path.join(tmp, STATE_JSON), "w", encoding="utf-8") as f:
        json.dump({"state": dataclasses.asdict(state), "config": config, **(run_info or {})},
                  f, indent=2, default=str)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if keep:
        for old in list_checkpoints(output)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(path: str) -> dict[str, Any]:
    """The ``trainer_state.pt`` of a checkpoint (tensors and plain containers only)."""
    return torch.load(os.path.join(path, STATE_PT), map_location="cpu", weights_only=True)


def saved_run(path: str) -> dict[str, Any]:
    """A checkpoint's ``trainer_state.json``: ``state``, ``config`` and the run information
    saved with it (``data_ids``, ``changes``)."""
    with open(os.path.join(path, STATE_JSON), encoding="utf-8") as f:
        return json.load(f)


def saved_config(path: str) -> dict[str, Any]:
    return saved_run(path)["config"]


def resume_differences(saved: dict[str, Any], config: dict[str, Any],
                       data_ids: dict[str, str | None], names: Sequence[str]
                       ) -> dict[str, tuple[Any, Any]]:
    """``{setting: (saved value, current value)}`` for each of ``names`` that differs between
    a checkpoint's :func:`saved_run` and the current ``config``. ``data`` and ``eval_data`` are
    compared by content id (``data_ids``) when the checkpoint has them, else by path."""
    saved_ids = saved.get("data_ids") or {}
    out = {}
    for name in names:
        if name in ("data", "eval_data") and name in saved_ids:
            old, new = saved_ids[name], data_ids.get(name)
            if old != new:
                out[name] = (f"{saved['config'].get(name)} (content {str(old)[:12]})",
                             f"{config[name]} (content {str(new)[:12]})")
        elif saved["config"].get(name) != config[name]:
            out[name] = (saved["config"].get(name), config[name])
    return out


def run_preemptible(prog: str, body: Callable[[Callable[[], bool]], Any],
                    errors: tuple[type[BaseException], ...]) -> int:
    """A training command's exit code: ``body(should_stop)`` with SIGTERM (a preemption) setting
    ``should_stop`` (when called from the main thread), so the loop saves a checkpoint at the
    current step and returns a result whose ``finished`` is False. 0 when done; 2 with one line
    ``{prog}: error: ...`` for one of ``errors``; 143 (128 + SIGTERM) when stopped early."""
    stop = threading.Event()
    previous = (signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
                if threading.current_thread() is threading.main_thread() else None)
    try:
        result = body(stop.is_set)
    except errors as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0 if result.finished else 128 + signal.SIGTERM
