"""Sequence log-probabilities: log pi(y|x) = sum over response tokens of log-softmax at each step.

The one implementation used by the trainer (policy log-probs, reference recomputation) and by the
pipeline's float32 re-scoring, so that the stored reference and the trainer agree by construction.
Sequences are left-padded so every response ends at the last position; only the logits of the
last ``max response length + 1`` positions are computed (``logits_to_keep``), which keeps the
vocabulary-sized tensor small. Explicit ``position_ids`` make left padding exact for any
position-embedding scheme.

:func:`shared_prompt_logps` computes the same sums for several responses to ONE prompt without
re-running the prompt for each: the prompt is encoded once (its key/value cache) and the
responses run on copies of that cache (the pipeline's float32 re-scoring).
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from rso import cost


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


def shared_prompt_logps(model: Any, prompt: Sequence[int], responses: Sequence[Sequence[int]],
                        pad_id: int, batch_size: int) -> torch.Tensor:
    """log pi(response | prompt) for each response to one prompt: [len(responses)] float32.

    The same quantity as :func:`sequence_logps` with the prompt repeated (equal up to float
    rounding, ~1e-5 nats), at the cost of the prompt's tokens once instead of once per response:

    1. one forward pass over the prompt (batch 1) gives its key/value cache and the logits at its
       last position, which predict each response's first token;
    2. responses, sorted by (length, token ids) and cut into batches of ``batch_size``, run right-
       padded on a copy of that cache repeated ``batch_size`` times
       (``DynamicCache.batch_repeat_interleave``), with positions ``len(prompt) + t``; causal
       attention keeps the right padding out of every real position.

    Models whose cache cannot be repeated along the batch (recurrent and hybrid layers: Mamba,
    RWKV, LFM2, Jamba...) get :func:`sequence_logps` on the same chunks instead: the same
    values, without the saving. Equal-length responses are ordered by their token ids, so the
    result, bit for bit, depends only on (prompt, the multiset of responses, batch_size), never
    on their order or on other prompts. For inference (``torch.inference_mode``/``no_grad``:
    the cache is deep-copied); ``prompt`` and each response are sequences of ints.
    Each forward pass is counted as a model call (:func:`rso.cost.record`: into the metered
    stage running in this thread, if any). Raises ValueError for an empty prompt or
    ``batch_size < 1``.
    """
    if not prompt:
        raise ValueError("every prompt needs at least one token to condition the response on")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    out = torch.zeros(len(responses), dtype=torch.float32)
    if not any(responses):
        return out
    encoded = model(input_ids=torch.tensor([list(prompt)], device=device), use_cache=True,
                    logits_to_keep=1)
    cost.record(calls=1)
    cache = getattr(encoded, "past_key_values", None)
    first = torch.log_softmax(encoded.logits[0, -1].float(), dim=-1)
    order = sorted((j for j in range(len(responses)) if responses[j]),
                   key=lambda j: (len(responses[j]), tuple(responses[j])))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        if not _repeatable(cache):
            values = sequence_logps(model, [prompt] * len(chunk),
                                    [responses[j] for j in chunk], pad_id)
            cost.record(calls=1)
            out[chunk] = values.float().cpu()
            continue
        rest = _continuation_logps(model, cache, len(prompt), [responses[j] for j in chunk],
                                   pad_id, device)
        for j, value in zip(chunk, rest.tolist()):
            out[j] = first[responses[j][0]].item() + value
    return out


def _repeatable(cache: Any) -> bool:
    """Whether a model's cache can be copied and repeated along the batch: a transformers
    ``Cache`` whose every layer supports ``batch_repeat_interleave`` (attention layers do;
    linear-attention and state-space layers do not)."""
    return (hasattr(cache, "batch_repeat_interleave")
            and all(hasattr(layer, "batch_repeat_interleave")
                    for layer in getattr(cache, "layers", ())))


def _continuation_logps(model: Any, prompt_cache: Any, prompt_len: int,
                        responses: Sequence[Sequence[int]], pad_id: int,
                        device: torch.device) -> torch.Tensor:
    """``sum_{t>=1} log pi(r_t | prompt, r_<t)`` for each (non-empty) response, on a copy of
    the prompt's cache: [len(responses)] float32 (see :func:`shared_prompt_logps`)."""
    n, steps = len(responses), max(len(r) for r in responses) - 1
    if steps == 0:
        return torch.zeros(n, dtype=torch.float32)
    input_ids = torch.full((n, steps), pad_id, dtype=torch.long)
    labels = torch.zeros((n, steps), dtype=torch.long)
    mask = torch.zeros((n, steps), dtype=torch.float32)
    for b, r in enumerate(responses):
        input_ids[b, :len(r) - 1] = torch.tensor(r[:-1], dtype=torch.long)
        labels[b, :len(r) - 1] = torch.tensor(r[1:], dtype=torch.long)
        mask[b, :len(r) - 1] = 1.0
    attention_mask = torch.cat([torch.ones((n, prompt_len), dtype=torch.long),
                                mask.long()], dim=1)
    cache = copy.deepcopy(prompt_cache)
    cache.batch_repeat_interleave(n)
    inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
              "position_ids": torch.arange(prompt_len, prompt_len + steps,
                                           device=device).expand(n, steps),
              "past_key_values": cache, "use_cache": True}
    labels, mask = labels.to(device), mask.to(device)
    head = _fused_head(model)
    cost.record(calls=1)
    if head is None:
        return gather_logps(model(**inputs).logits, labels, mask).cpu()
    hidden = model.base_model(**inputs).last_hidden_state
    rows, cols = mask.nonzero(as_tuple=True)
    token_logps = _LinearLogSoftmaxGather.apply(hidden[rows, cols], head.weight,
                                                labels[rows, cols], CHUNK_ROWS)
    return torch.zeros(n, dtype=torch.float32, device=device).index_add(0, rows,
                                                                        token_logps).cpu()
