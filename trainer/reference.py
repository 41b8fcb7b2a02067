"""Reference log-probs: checking the stored ones, and recomputing them once when asked.

No reference model is ever loaded. The losses need log pi_ref(y|x), which the pipeline stores
(``ref_chosen_logps``/``ref_rejected_logps``, SPEC 5). On the first batch of a run the trainer
scores the responses with the initial policy (fp32, eval mode) and measures

    gap_i = | log pi_theta0(y_i|x_i) - stored ref_i |      over the 2B sequences,

reporting its mean and max. If the data was made by the same model in fp32 the gap is ~1e-5
nats; another model, tokenizer or bf16 generation shows up as tenths of nats or more.
With ``--recompute-reference`` the log-probs of every pair are computed once with the initial
policy in fp32 and cached in ``OUTPUT/reference_logps.parquet`` (keyed by the pair's token ids);
training, and any resumed run, reads the cache instead of the stored values.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from trainer.data import Pair
from trainer.model import pair_logps

log = logging.getLogger("rso.trainer")

CACHE_FILE = "reference_logps.parquet"


class ReferenceMismatchError(RuntimeError):
    """The stored reference log-probs were not made by the initial policy (--strict-reference)."""


@dataclasses.dataclass(frozen=True)
class ReferenceGap:
    mean: float
    max: float
    num_sequences: int

    def as_dict(self) -> dict[str, float]:
        return {"gap_mean": self.mean, "gap_max": self.max, "sequences": self.num_sequences}


def reference_gap(policy_logps: torch.Tensor, stored_logps: torch.Tensor) -> ReferenceGap:
    """Mean and max of |policy - stored| per sequence, in nats."""
    gap = (policy_logps.double() - stored_logps.double()).abs()
    return ReferenceGap(float(gap.mean()), float(gap.max()), int(gap.numel()))


def check_reference(gap: ReferenceGap, tolerance: float, strict: bool) -> None:
    """Logs the gap; warns, or raises ReferenceMismatchError if ``strict``, above tolerance."""
    log.info("reference check on the first batch: |policy - stored| mean %.2e, max %.2e nats "
             "per sequence over %d sequences", gap.mean, gap.max, gap.num_sequences)
    if gap.max <= tolerance:
        return
    message = (f"the stored reference log-probs differ from the initial policy's by up to "
               f"{gap.max:.3g} nats per sequence (mean {gap.mean:.3g}; tolerance {tolerance:g}): "
               f"the data was probably made by another model, tokenizer or precision (e.g. "
               f"bf16 generation without fp32 re-scoring). Losses would start biased; use "
               f"--recompute-reference to compute them with this policy in fp32")
    if strict:
        raise ReferenceMismatchError(message)
    log.warning(message)


@torch.no_grad()
def measure_gap(model: torch.nn.Module, pairs: Sequence[Pair], pad_id: int,
                device: torch.device) -> ReferenceGap:
    """Gap between the model's fp32 log-probs of ``pairs`` and their stored reference."""
    was_training = model.training
    model.eval()
    try:
        chosen, rejected, _ = pair_logps(model, pairs, pad_id, device)
    finally:
        model.train(was_training)
    stored = torch.tensor([p.ref_chosen_logps for p in pairs] +
                          [p.ref_rejected_logps for p in pairs], dtype=torch.float64)
    return reference_gap(torch.cat([chosen, rejected]).cpu(), stored)


@torch.no_grad()
def compute_reference(model: torch.nn.Module, batches: Iterable[Sequence[Pair]], pad_id: int,
                      device: torch.device) -> dict[str, tuple[float, float]]:
    """``{pair key: (log pi(chosen|x), log pi(rejected|x))}`` with the model in fp32, eval mode."""
    was_training = model.training
    model.eval()
    cache: dict[str, tuple[float, float]] = {}
    try:
        for pairs in batches:
            todo = [p for p in pairs if p.key not in cache]
            if not todo:
                continue
            chosen, rejected, _ = pair_logps(model, todo, pad_id, device)
            for p, c, r in zip(todo, chosen.tolist(), rejected.tolist()):
                cache[p.key] = (c, r)
    finally:
        model.train(was_training)
    return cache


def save_cache(output: str, cache: dict[str, tuple[float, float]], policy: str) -> str:
    path = os.path.join(output, CACHE_FILE)
    keys = list(cache)
    table = pa.table({"key": keys,
                      "ref_chosen_logps": [cache[k][0] for k in keys],
                      "ref_rejected_logps": [cache[k][1] for k in keys]})
    table = table.replace_schema_metadata({"policy": policy})
    pq.write_table(table, path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def load_cache(output: str) -> dict[str, tuple[float, float]] | None:
    path = os.path.join(output, CACHE_FILE)
    if not os.path.exists(path):
        return None
    table = pq.read_table(path)
    cols = table.to_pydict()
    return {k: (c, r) for k, c, r in zip(cols["key"], cols["ref_chosen_logps"],
                                         cols["ref_rejected_logps"])}
