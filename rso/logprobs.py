"""Sequence log-probabilities: log pi(y|x) = sum over response tokens of log-softmax at each step.

The one implementation used by the trainer (policy log-probs, reference recomputation) and by the
pipeline's float32 re-scoring, so that the stored reference and the trainer agree by construction.
Sequences are left-padded so every response ends at the last position; only the logits of the
last ``max response length + 1`` positions are computed (``logits_to_keep``), which keeps the
vocabulary-sized tensor small. Explicit ``position_ids`` make left padding exact for any
position-embedding scheme.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch


def gather_logps(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum_t mask[b, t] * log_softmax(logits[b, t])[labels[b, t]]`` for each row b, in float32.

    logits: [B, T, V]; labels, mask: [B, T]. Pure tensor function. Computed as
    ``logit[label] - logsumexp(logits)`` row by row, so no [B, T, V] log-softmax tensor is
    materialised (or kept for backward): only the logits themselves.
    """
    rows = []
    for b in range(logits.shape[0]):
        row = logits[b].float()
        picked = torch.gather(row, 1, labels[b].unsqueeze(-1)).squeeze(-1)
        rows.append(((picked - torch.logsumexp(row, dim=-1)) * mask[b]).sum())
    return torch.stack(rows)


@dataclasses.dataclass
class PackedBatch:
    """Left-padded prompt+response sequences and what is needed to score the responses."""
    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    position_ids: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B, K-1]: the tokens the last K-1 kept logits predict
    response_mask: torch.Tensor  # [B, K-1]: 1 where the label is a response token
    logits_to_keep: int  # K

    def to(self, device: torch.device | str) -> PackedBatch:
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device)
                                           for f in dataclasses.fields(self)
                                           if isinstance(getattr(self, f.name), torch.Tensor)})

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def pack(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
         pad_id: int) -> PackedBatch:
    """Builds a left-padded batch of prompt + response token ids."""
    if len(prompts) != len(responses):
        raise ValueError("prompts and responses must have the same length")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token to condition the response on")
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
    length = max(len(s) for s in seqs)
    keep = max(len(r) for r in responses) + 1
    batch = len(seqs)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    response_mask = torch.zeros((batch, keep - 1), dtype=torch.float32)
    for b, (s, r) in enumerate(zip(seqs, responses)):
        input_ids[b, length - len(s):] = torch.tensor(s, dtype=torch.long)
        attention_mask[b, length - len(s):] = 1
        if len(r):
            response_mask[b, keep - 1 - len(r):] = 1.0
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    labels = input_ids[:, length - keep + 1:]
    return PackedBatch(input_ids, attention_mask, position_ids, labels, response_mask, keep)


class _LinearLogSoftmaxGather(torch.autograd.Function):
    """``log_softmax(hidden @ weight.T)[labels]`` per row, a chunk of rows at a time.

    Neither direction keeps the [rows, vocab] logits: the forward saves only the hidden states
    and each row's logsumexp, and the backward recomputes each chunk's logits, using
    ``d(logit_y - logsumexp)/d logits = onehot(y) - softmax``. On a 49k vocabulary this is
    most of a training step's activation memory.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk: int):
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        for s in range(0, hidden.shape[0], chunk):
            logits = (hidden[s:s + chunk] @ weight.T).float()
            lse[s:s + chunk] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, labels[s:s + chunk, None]).squeeze(1)
            out[s:s + chunk] = picked - lse[s:s + chunk]
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, labels, lse = ctx.saved_tensors
        grad_h = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            h, g_out = hidden[s:s + ctx.chunk], grad_out[s:s + ctx.chunk]
            g = torch.exp((h @ weight.T).float() - lse[s:s + ctx.chunk, None]) * -g_out[:, None]
            g.scatter_add_(1, labels[s:s + ctx.chunk, None], g_out[:, None])
            g = g.to(hidden.dtype)
            if grad_h is not None:
                grad_h[s:s + ctx.chunk] = g @ weight
            if grad_w is not None:
                grad_w += g.T @ h
        return grad_h, grad_w, None, None


def _fused_head(model: Any) -> torch.nn.Linear | None:
    """The output projection when the logits are exactly ``base_model(x) @ W.T`` (a bias-free
    linear head, no logit scaling or soft-capping); None for any other model."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    cfg = getattr(model, "config", None)
    base = getattr(model, "base_model", None)
    if (not isinstance(head, torch.nn.Linear) or head.bias is not None or base is None
            or base is model or getattr(cfg, "final_logit_softcapping", None)
            or getattr(cfg, "logit_scale", None) not in (None, 1, 1.0)
            or getattr(cfg, "model_type", "") not in _FUSED_MODEL_TYPES):
        return None
    return head


# Causal LMs whose logits are exactly ``lm_head(base_model(...).last_hidden_state)``.
_FUSED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo2"})
CHUNK_ROWS = 256


def forward_logps(model: Any, batch: PackedBatch) -> torch.Tensor:
    """Runs the model once on the packed batch; returns [B] response log-prob sums (float32).

    For the common decoder families (``_FUSED_MODEL_TYPES``) the output projection is applied
    to the response positions only, chunk by chunk (:class:`_LinearLogSoftmaxGather`);
    other models go through their own forward with ``logits_to_keep``.
    """
    head = _fused_head(model)
    if head is None:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids, logits_to_keep=batch.logits_to_keep,
                    use_cache=False)
        logits = out.logits[:, -batch.logits_to_keep:-1, :]
        return gather_logps(logits, batch.labels, batch.response_mask)
    hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              position_ids=batch.position_ids, use_cache=False
                              ).last_hidden_state[:, -batch.logits_to_keep:-1, :]
    rows, cols = batch.response_mask.nonzero(as_tuple=True)
    token_logps = _LinearLogSoftmaxGather.apply(hidden[rows, cols], head.weight,
                                                batch.labels[rows, cols], CHUNK_ROWS)
    return torch.zeros(hidden.shape[0], dtype=torch.float32,
                       device=hidden.device).index_add(0, rows, token_logps)


def sequence_logps(model: torch.nn.Module, prompts: Sequence[Sequence[int]],
                   responses: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """log pi(response | prompt) for each pair, summed over response tokens, in one forward."""
    device = next(model.parameters()).device
    return forward_logps(model, pack(prompts, responses, pad_id).to(device))
