"""The policy: loading, device and precision choice, and pair log-probs in one forward pass.

A micro-batch of B pairs becomes 2B sequences (B chosen, then B rejected, each after its prompt),
left-padded by :func:`rso.logprobs.pack` and scored in a single forward pass, so chosen and
rejected share the batch and the kernel launches.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from contextlib import AbstractContextManager as ContextManager
from typing import Any

import torch

from rso import hf
from rso.config import ConfigError
from rso.logprobs import PackedBatch, forward_logps, pack
from trainer.data import Pair

log = logging.getLogger("rso.trainer")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32.

    auto: bf16 on a CUDA device that supports it, else fp32. bf16 on CPU runs only when asked for.
    """
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "auto":
        return torch.bfloat16 if cuda_bf16 else None
    if precision == "bf16":
        if device.type == "cuda" and not cuda_bf16:
            from rso.config import ConfigError

            raise ConfigError("--precision bf16: this CUDA device does not support bfloat16")
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> ContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def load_policy(path: str, device: torch.device, trust_remote_code: bool = False
                ) -> tuple[torch.nn.Module, Any]:
    """The causal LM in fp32 (master weights) on ``device``, in train mode, and its tokenizer if
    it has one (kept only to be saved with checkpoints: the trainer never tokenises)."""
    try:
        model = hf.load_causal_lm(path, "float32", str(device), trust_remote_code, train=True)
        tokenizer = hf.load_tokenizer(path, trust_remote_code, required=False)
    except hf.load_errors() as e:
        raise ConfigError(f"cannot load the policy {path}: {e}") from None
    if tokenizer is None:
        log.warning("no tokenizer in %s; checkpoints will hold the model only", path)
    return model, tokenizer


def pad_token_id(model: torch.nn.Module, tokenizer: Any) -> int:
    """Any id works (padding is masked and left of every sequence); prefer the declared pad."""
    return hf.pad_token_id(tokenizer, model)


def pack_pairs(pairs: Sequence[Pair], pad_id: int) -> PackedBatch:
    """2B left-padded sequences: the B chosen responses, then the B rejected ones."""
    prompts = [p.prompt_token_ids for p in pairs]
    responses = ([p.chosen_token_ids for p in pairs] + [p.rejected_token_ids for p in pairs])
    return pack(prompts + prompts, responses, pad_id)


def pair_logps(model: torch.nn.Module, pairs: Sequence[Pair], pad_id: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor, PackedBatch]:
    """``(log pi(chosen|x), log pi(rejected|x))``, each [B] float32, from one forward pass."""
    batch = pack_pairs(pairs, pad_id).to(device)
    logps = forward_logps(model, batch)
    return logps[:len(pairs)], logps[len(pairs):], batch


def reference_logps(pairs: Sequence[Pair], device: torch.device
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs' reference log-probs as float32 tensors."""
    chosen = torch.tensor([p.ref_chosen_logps for p in pairs], dtype=torch.float32)
    rejected = torch.tensor([p.ref_rejected_logps for p in pairs], dtype=torch.float32)
    return chosen.to(device), rejected.to(device)
