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
from typing import Sequence

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

    def to(self, device: torch.device | str) -> "PackedBatch":
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


def forward_logps(model: torch.nn.Module, batch: PackedBatch) -> torch.Tensor:
    """Runs the model once on the packed batch; returns [B] response log-prob sums (float32)."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=batch.position_ids, logits_to_keep=batch.logits_to_keep,
                use_cache=False)
    logits = out.logits[:, -batch.logits_to_keep:-1, :]
    return gather_logps(logits, batch.labels, batch.response_mask)


def sequence_logps(model: torch.nn.Module, prompts: Sequence[Sequence[int]],
                   responses: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """log pi(response | prompt) for each pair, summed over response tokens, in one forward."""
    device = next(model.parameters()).device
    return forward_logps(model, pack(prompts, responses, pad_id).to(device))
