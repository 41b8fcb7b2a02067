"""A sequence classifier that scores the MEAN of an encoder's final hidden states.

transformers' stock classifiers pool one position: decoders the rightmost non-pad token,
BERT-style encoders the [CLS] state through their pooler (dense + tanh). Sentence-embedding
encoders such as all-MiniLM-L6-v2 were trained (sentence-transformers) to be read as the mean
of their token states over the attention mask: their ``1_Pooling/config.json`` says
``"pooling_mode_mean_tokens": true``, and the BERT pooler they still carry was never trained for
that objective. On the bundled HH-RLHF pairs a Bradley-Terry head on MiniLM's mean-pooled states
was 0.62-0.63 accurate on held-out pairs where the same head on its pooler output was 0.53-0.58
(docs/RESULTS.md). No stock transformers class pools by mean over a BERT encoder, hence this one
(about forty lines; sentence-transformers has no sequence-classification head to build on).

A saved model is an ordinary Hugging Face directory: the encoder's ``config.json`` plus
``rso_pooling: "mean"`` and ``num_labels``, and ``model.safetensors`` with the encoder's weights
under ``encoder.`` and the one-output linear layer under ``score.``. :func:`rso.hf.load_classifier`
(hence the pipeline's ``--reward-model``, ``rso evaluate --judge`` and ``rso reward train``)
loads it as this class. A stock ``AutoModelForSequenceClassification`` (TRL, a user's script)
builds a BERT classifier from the config, finds none of its weights under their names and
initialises them at random, with only transformers' load report to say so:
:func:`rso.hf.load_classifier` refuses such a load.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

POOLING_KEY = "rso_pooling"  # the config.json key a mean-pooled classifier carries
MEAN = "mean"


def sentence_transformers_mean(path: str) -> bool:
    """Whether ``path`` is a sentence-transformers model directory whose
    ``1_Pooling/config.json`` selects mean pooling and no other pooling. ValueError when that
    file exists but is not a JSON object (a corrupt file must not silently change pooling)."""
    file = os.path.join(path, "1_Pooling", "config.json")
    if not os.path.exists(file):
        return False
    try:
        with open(file) as f:
            cfg = json.load(f)
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the sentence-transformers pooling config {file}: "
                         f"{e}") from None
    modes = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v is True]
    return modes == ["pooling_mode_mean_tokens"]


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """[B, T, H], [B, T] (1 = token, 0 = padding) -> [B, H]: the mean of each row's token
    states; padding contributes nothing, so a row scores the same padded or alone."""
    if attention_mask is None:
        return hidden.mean(1)
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


class MeanPooledClassifier(PreTrainedModel):
    """``logits[b] = score(masked_mean(encoder(input_ids[b]).last_hidden_state))``: [B, T] token
    ids and mask -> ``SequenceClassifierOutput(logits=[B, num_labels])``."""

    base_model_prefix = "encoder"
    _supports_sdpa = True  # attention runs in the wrapped encoder, which picks its own kernel
    config_class: Any = AutoConfig  # type: ignore[assignment]  # any encoder's own config

    def __init__(self, config: Any):
        super().__init__(config)
        self.encoder = AutoModel.from_config(config)
        self.score = torch.nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        if module is getattr(self, "score", None):
            std = getattr(self.config, "initializer_range", 0.02)
            torch.nn.init.normal_(module.weight, std=std)
            torch.nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, **kwargs: Any
                ) -> SequenceClassifierOutput:
        kwargs.pop("labels", None)
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              **kwargs).last_hidden_state
        return SequenceClassifierOutput(logits=self.score(masked_mean(hidden, attention_mask)))

    @classmethod
    def from_encoder(cls, path: str, num_labels: int = 1, trust_remote_code: bool = False
                     ) -> MeanPooledClassifier:
        """A new classifier on the encoder saved in ``path`` (its weights kept, a freshly
        initialised ``score`` layer), fp32, in training mode."""
        encoder = AutoModel.from_pretrained(path, trust_remote_code=trust_remote_code)
        config = encoder.config
        config.num_labels = num_labels
        setattr(config, POOLING_KEY, MEAN)
        model = cls(config)
        model.encoder.load_state_dict(encoder.state_dict())
        return model.train()


def is_mean_pooled(config: Any) -> bool:
    """Whether a loaded config is a :class:`MeanPooledClassifier`'s; ValueError on a pooling
    this module does not know (a newer rso wrote it)."""
    pooling = getattr(config, POOLING_KEY, None)
    if pooling not in (None, MEAN):
        raise ValueError(f"{POOLING_KEY}={pooling!r} in the model's config: this rso knows "
                         f"only {MEAN!r}")
    return pooling == MEAN
