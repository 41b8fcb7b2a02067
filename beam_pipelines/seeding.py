"""Every random choice of the pipeline is seeded from (run seed, prompt_id, stream).

A re-run, a retried bundle or a re-executed DoFn therefore makes the same decisions for the same
prompt, whatever the runner, the worker or the order of elements.
"""
from __future__ import annotations

import hashlib

import numpy as np


def prompt_seed(run_seed: int, prompt_id: str, stream: str) -> int:
    """A 63-bit seed from the run seed, the prompt id and the consumer ("generate", "select"...)."""
    digest = hashlib.sha256(f"{run_seed}\x00{prompt_id}\x00{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def prompt_rng(run_seed: int, prompt_id: str, stream: str) -> np.random.Generator:
    """A numpy Generator seeded by :func:`prompt_seed`."""
    return np.random.default_rng(prompt_seed(run_seed, prompt_id, stream))
