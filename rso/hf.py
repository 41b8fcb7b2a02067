"""Hugging Face model loading, written once for the pipeline, the trainer and the tools.

Every loader keeps ``trust_remote_code`` off unless the caller turns it on, loads weights with
transformers' ``from_pretrained`` (safetensors when the directory has them) and never downloads:
paths are local directories (``HF_HUB_OFFLINE`` is respected by transformers itself).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DTYPES = ("float32", "bfloat16", "float16")


def load_errors() -> tuple[type[Exception], ...]:
    """What loading a model directory raises for a bad or damaged one (missing or corrupt
    files, a config transformers cannot read, a truncated safetensors header): the callers turn
    these into one ConfigError line naming the directory."""
    from safetensors import SafetensorError

    return OSError, ValueError, SafetensorError


def torch_dtype(name: str) -> torch.dtype:
    """``"float32" | "bfloat16" | "float16"`` -> the torch dtype; ValueError otherwise."""
    import torch

    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return table[name]


def native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether bfloat16 matrix products run natively on this machine: a CUDA device with bf16
    support, or an x86 CPU with AVX512-BF16 or AMX-BF16 (the ``avx512_bf16`` / ``amx_bf16``
    flags of ``/proc/cpuinfo``; ``cpuinfo`` overrides that file's text, for tests). Elsewhere
    torch and vLLM emulate bf16 on the CPU: measured on a 2-core AVX2 EPYC, one thread, a
    1024x1024 matmul ran at 0.7 GFLOP/s in bf16 against 57.6 in fp32, and vLLM decoded
    SmolLM2-135M at 16 tok/s in bf16 (benchmarks/engine_throughput.py)."""
    if cpuinfo is None:
        import torch

        if torch.cuda.is_available():
            return bool(torch.cuda.is_bf16_supported())
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    flags = {flag for line in cpuinfo.splitlines() if line.startswith("flags")
             for flag in line.split(":", 1)[-1].split()}
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error
    (:class:`rso.config.ConfigError`); anything else is passed to ``torch.device``."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        from rso.config import ConfigError

        raise ConfigError("--device cuda: no CUDA device is available")
    return torch.device(device)


def load_tokenizer(path: str, trust_remote_code: bool = False, required: bool = True) -> Any:
    """The tokenizer saved in ``path``; with ``required=False``, None when there is none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        if required:
            raise
        return None


def architectures(path: str) -> list[str]:
    """The ``architectures`` that ``path``'s config.json names (``rso_pooling: "mean"`` counts
    as ``MeanPooledClassifier``); [] when it names none or is not a readable local file."""
    import json
    import os

    try:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return []
    if not isinstance(config, dict):
        return []
    names = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    return names + (["MeanPooledClassifier"] if config.get("rso_pooling") else [])


def check_role(path: str, role: str) -> None:
    """ValueError when the model in ``path`` is plainly the other kind: a reward model
    (``*ForSequenceClassification``) where a causal LM is wanted (``role="causal-lm"``: a
    policy), a causal LM (``*ForCausalLM``) where a reward model is (``role="classifier"``),
    or, for either, a base model with no head at all (``BertModel``).
    Read from config.json before any weight is loaded: transformers would otherwise build
    the asked-for class around the weights it finds (a tied-embedding classifier loads as a
    causal LM without a warning) and initialise the rest at random. Silent when config.json
    names no architecture."""
    names = architectures(path)
    classifier = [a for a in names if a.endswith("ForSequenceClassification")
                  or a == "MeanPooledClassifier"]
    causal = [a for a in names if a.endswith("ForCausalLM")]
    # a backbone without any head (BertModel, LlamaModel): neither a policy nor a reward model
    bare = names and all(a.endswith("Model") and not a.endswith("LMHeadModel") for a in names)
    if role == "causal-lm" and classifier and not causal:
        raise ValueError(f"{path} is a reward model ({classifier[0]}), not a causal LM")
    if role == "causal-lm" and bare:
        raise ValueError(f"{path} is a base model without a language-model head "
                         f"({names[0]}), not a causal LM")
    if role == "classifier" and causal and not classifier:
        raise ValueError(f"{path} is a causal LM ({causal[0]}), not a reward model (a "
                         f"sequence classifier with one output per response)")
    if role == "classifier" and bare:
        raise ValueError(f"{path} is a base model without a reward head ({names[0]}); fit one "
                         f"on it with `rso reward train --model {path}`")


def load_causal_lm(path: str, dtype: str = "float32", device: str | None = None,
                   trust_remote_code: bool = False, train: bool = False) -> Any:
    """``AutoModelForCausalLM`` from ``path`` in ``dtype``, on ``device`` (None: stay on the
    CPU; ``auto``: :func:`resolve_device`), in eval mode unless ``train``. ValueError for a
    reward model (:func:`check_role`)."""
    from transformers import AutoModelForCausalLM

    check_role(path, "causal-lm")
    model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype),
                                                 trust_remote_code=trust_remote_code)
    if device is not None:
        model.to(resolve_device(device))
    model.train(train)
    return model


def load_classifier(path: str, dtype: str = "float32", device: str | None = None,
                    trust_remote_code: bool = False, train: bool = False,
                    new_head: bool = False, **config_overrides: Any) -> Any:
    """``AutoModelForSequenceClassification`` from ``path``, like :func:`load_causal_lm`, or a
    :class:`rso.pooling.MeanPooledClassifier` when its config says ``rso_pooling: "mean"``;
    ``config_overrides`` (e.g. ``num_labels=1`` for a new head on a backbone) go to the config.
    ValueError on an ``rso_pooling`` this version does not know, and when the checkpoint lacks
    weights the model has (transformers would initialise them at random, e.g. a mean-pooled
    model whose config lost ``rso_pooling``), unless ``new_head`` (a backbone getting a new
    classification head: only weights outside the base model may be missing), and for a
    causal LM that is not getting one (:func:`check_role`)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from rso.pooling import MeanPooledClassifier, is_mean_pooled

    if not new_head:
        check_role(path, "classifier")
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code,
                                        **config_overrides)
    cls: Any = MeanPooledClassifier if is_mean_pooled(config) else \
        AutoModelForSequenceClassification
    model, info = cls.from_pretrained(path, config=config, dtype=torch_dtype(dtype),
                                      trust_remote_code=trust_remote_code,
                                      output_loading_info=True)
    prefix = getattr(model, "base_model_prefix", "") + "."
    missing = sorted(k for k in info.get("missing_keys", ())
                     if not (new_head and not k.startswith(prefix)))
    if missing:
        raise ValueError(f"{path}: the checkpoint has no weights for {len(missing)} of the "
                         f"model's parameters (e.g. {missing[0]}), which would be random: it "
                         f"was saved by another architecture than its config names")
    if device is not None:
        model.to(resolve_device(device))
    model.train(train)
    return model


def pad_token_id(tokenizer: Any, model: Any = None, default: int | None = 0) -> int | None:
    """The id to pad batches with: the model config's pad (what sequence classifiers pool
    against: the last token that is not it), else the tokenizer's pad, else the tokenizer's EOS,
    else ``default``. Where padding is masked (left-padded log-probs) any id gives the same
    values."""
    config: Any = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for candidate in (getattr(text_config, "pad_token_id", None),
                      getattr(tokenizer, "pad_token_id", None),
                      getattr(tokenizer, "eos_token_id", None)):
        if isinstance(candidate, int):
            return candidate
    return default
