"""`rso generate` configuration: one typed, validated object for the whole pipeline.

Built from ``--config FILE.yaml`` and flags (flags win); flags it does not know are Beam pipeline
options (``--runner``, ``--direct_num_workers``, ...). Every field is documented in place.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from typing import Literal, Optional

from rso.config import Config, ConfigError, option

Selection = Literal["rso", "top-k", "random", "best-of-n", "rest"]
Pairing = Literal["first-round", "tournament", "all-pairs", "best-vs-worst", "best-vs-mean-2std"]
BetaScale = Literal["none", "std"]  # the unit of --beta (docs/SELECTION.md)


@dataclasses.dataclass
class RewardModelSpec(Config):
    """One reward model of a weighted sum (SPEC 2)."""
    path: str = option("", "Hugging Face model directory")
    weight: float = option(1.0, "weight of this model's reward in the sum")
    kind: Literal["pointwise", "pairwise"] = option(
        "pointwise", "pointwise: a sequence classifier with one output; pairwise: a model giving "
        "P(A better than B) for '[CONTEXT] x [RESPONSE A] a [RESPONSE B] b'")

    @classmethod
    def from_string(cls, text: str) -> "RewardModelSpec":
        """``PATH[,weight=W][,kind=pointwise|pairwise]`` as given on the command line."""
        path, *opts = text.split(",")
        data: dict = {"path": path}
        for o in opts:
            key, sep, value = o.partition("=")
            if not sep:
                raise ConfigError(f"--reward-model {text!r}: expected key=value after the path")
            data[key.strip()] = value.strip()
        return cls.from_dict(data, prefix="reward_model.")

    def __str__(self) -> str:
        return f"{self.path},weight={self.weight:g},kind={self.kind}"

    def validate(self) -> None:
        if not self.path:
            raise ConfigError("a reward model needs a path")
        if not math.isfinite(self.weight):
            raise ConfigError(f"reward model {self.path}: weight must be finite, "
                              f"got {self.weight}")


@dataclasses.dataclass
class GenerateConfig(Config):
    # ---- read
    input: str = option("", "prompts: JSONL/Parquet/HH-RLHF file, glob or gs:// path")
    output: str = option("", "output directory (local or gs://)")
    input_format: Literal["auto", "jsonl", "parquet", "hh-rlhf"] = option(
        "auto", "auto: by extension (.parquet) and content (a 'chosen' field means HH-RLHF)")
    max_prompts: Optional[int] = option(None, "keep a deterministic shard of about this many "
                                        "prompts (chosen by hash of prompt_id and seed)")
    # ---- generate
    policy: str = option("", "SFT policy: Hugging Face causal LM directory")
    engine: Literal["vllm", "transformers"] = option("vllm", "decoding engine")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", "generation precision; auto = bfloat16 for vLLM, float32 for transformers")
    rescore: Literal["auto", "on", "off"] = option(
        "auto", "recompute sft_logp of kept responses in float32; auto = on whenever "
        "generation ran in reduced precision")
    num_candidates: int = option(64, "N: candidates sampled per prompt")
    max_new_tokens: int = option(128, "longest response, in tokens")
    temperature: float = option(1.0, "sampling temperature (1.0 = pi_sft, as SPEC 1 requires)")
    top_p: float = option(1.0, "nucleus sampling (1.0 = off)")
    top_k: int = option(0, "top-k sampling (0 = off)")
    max_model_len: Optional[int] = option(None, "context length; default: the model's")
    batch_size: int = option(8, "prompts per engine call")
    enforce_eager: bool = option(False, "vLLM: skip graph compilation (faster start, slower "
                                 "decoding)")
    trust_remote_code: bool = option(False, "let model repositories run their own code")
    vllm_gpu_memory_utilization: Optional[float] = option(
        None, "vLLM: fraction of accelerator memory the engine may use; default 0.9 on GPU, "
        "0.3 on CPU (there it only bounds vLLM's start-up memory check)")
    vllm_cpu_kv_cache_gib: Optional[int] = option(
        None, "vLLM on CPU: KV-cache size in GiB (VLLM_CPU_KVCACHE_SPACE); default: that "
        "environment variable, else 1")
    rescore_batch_size: int = option(16, "sequences per float32 re-scoring forward pass")
    # ---- reward
    reward_model: list[RewardModelSpec] = option(
        [], "reward model, repeatable: PATH[,weight=W][,kind=pointwise|pairwise]")
    reward_batch_size: int = option(16, "sequences per reward forward pass")
    reward_prompts_per_batch: int = option(
        4, "prompts per reward RunInference batch; all their candidates are sorted by token "
        "length and scored in forward passes of --reward-batch-size sequences")
    reward_max_length: Optional[int] = option(
        None, "longest reward-model input in tokens (capped at the model's own limit); longer "
        "inputs lose their oldest context tokens, counted as reward_truncated")
    pairwise_debias: Literal["both-orders", "random-flip"] = option(
        "both-orders", "pairwise reward models' position bias: both-orders scores (y, b) and "
        "(b, y) and averages (2 forwards per candidate); random-flip scores one order chosen by "
        "a coin seeded from (seed, prompt_id)")
    # ---- select and pair
    selection: Selection = option("rso", "rso | top-k | random | best-of-n | rest (SPEC 3)")
    num_samples: int = option(8, "k: responses kept per prompt")
    beta: float = option(0.5, "rejection-sampling temperature (0 = top-k, inf = random)")
    beta_scale: BetaScale = option(
        "none", "unit of --beta: none = reward units (for a calibrated log-odds reward); std = "
        "the prompt's candidate-reward standard deviation, beta_eff = beta * std (for a reward "
        "model whose outputs are not log-odds; see docs/SELECTION.md)")
    rest_threshold: float = option(0.7, "rest: keep responses whose min-max normalised reward "
                                   "exceeds this")
    dedup: bool = option(True, "collapse candidates with identical token ids before selection")
    pairing: Pairing = option("first-round", "first-round | tournament | all-pairs (SPEC 4) | best-vs-worst | best-vs-mean-2std (docs/GLOSSARY.md)")
    tie_margin: float = option(0.0, "drop pairs whose rewards differ by no more than this")
    # ---- run
    seed: int = option(0, "run seed; with prompt_id it seeds every random choice")
    run_id: Optional[str] = option(None, "id written into every record; default: a hash of "
                                   "this config")
    overwrite: bool = option(False, "replace an existing complete output directory")

    def validate(self) -> None:
        def fail(msg: str) -> None:
            raise ConfigError(msg)

        if not self.input:
            fail("--input is required")
        if not self.output:
            fail("--output is required")
        if not self.policy:
            fail("--policy is required")
        if not self.reward_model:
            fail("at least one --reward-model is required")
        for path in [self.policy] + [r.path for r in self.reward_model]:
            if "://" not in path and not os.path.isdir(path):
                fail(f"model directory not found: {path}")
        if self.num_candidates < 1:
            fail(f"--num-candidates must be >= 1, got {self.num_candidates}")
        if self.num_samples < 1:
            fail(f"--num-samples must be >= 1, got {self.num_samples}")
        if self.selection != "rest" and self.num_samples > self.num_candidates:
            fail(f"--num-samples ({self.num_samples}) cannot exceed --num-candidates "
                 f"({self.num_candidates})")
        if math.isnan(self.beta) or self.beta < 0:
            fail(f"--beta must be >= 0 (0 = top-k, inf = random), got {self.beta}")
        if self.max_new_tokens < 1:
            fail(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            fail(f"--temperature must be > 0 (the proposal must be a distribution), "
                 f"got {self.temperature}")
        if not 0 < self.top_p <= 1:
            fail(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            fail(f"--top-k must be >= 0, got {self.top_k}")
        if not 0 <= self.rest_threshold < 1:
            fail(f"--rest-threshold must be in [0, 1), got {self.rest_threshold}")
        if self.tie_margin < 0:
            fail(f"--tie-margin must be >= 0, got {self.tie_margin}")
        if self.max_prompts is not None and self.max_prompts < 1:
            fail(f"--max-prompts must be >= 1, got {self.max_prompts}")
        for spec in self.reward_model:
            spec.validate()
        for name in ("batch_size", "reward_batch_size", "reward_prompts_per_batch",
                     "rescore_batch_size"):
            if getattr(self, name) < 1:
                fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.reward_max_length is not None and self.reward_max_length < 2:
            fail(f"--reward-max-length must be >= 2, got {self.reward_max_length}")
        if self.vllm_gpu_memory_utilization is not None and not (
                0 < self.vllm_gpu_memory_utilization <= 1):
            fail(f"--vllm-gpu-memory-utilization must be in (0, 1], "
                 f"got {self.vllm_gpu_memory_utilization}")
        if self.vllm_cpu_kv_cache_gib is not None and self.vllm_cpu_kv_cache_gib < 1:
            fail(f"--vllm-cpu-kv-cache-gib must be >= 1, got {self.vllm_cpu_kv_cache_gib}")
        self._validate_selection_scale()

    # ---- selection scale checks (docs/SELECTION.md)
    def _validate_selection_scale(self) -> None:
        from beam_pipelines.sampling import BETA_SCALES

        if self.beta_scale not in BETA_SCALES:
            raise ConfigError(f"--beta-scale must be one of {', '.join(BETA_SCALES)}, "
                              f"got {self.beta_scale!r}")

    # ---- derived values
    @property
    def generation_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if self.engine == "vllm" else "float32"

    @property
    def rescore_in_fp32(self) -> bool:
        if self.rescore == "auto":
            return self.generation_dtype != "float32"
        return self.rescore == "on"

    @property
    def is_pi_sft_proposal(self) -> bool:
        """SPEC 1: only temperature 1, top_p 1, no top_k samples pi_sft itself."""
        return self.temperature == 1.0 and self.top_p == 1.0 and self.top_k == 0

    @property
    def effective_num_samples(self) -> int:
        return 1 if self.selection == "best-of-n" else self.num_samples

    @property
    def effective_beta(self) -> float:
        return {"top-k": 0.0, "random": math.inf}.get(self.selection, self.beta)

    def resolved_run_id(self) -> str:
        """The given run_id, else a hash of everything that shapes the records (not where they
        are written: the same run written elsewhere has the same id)."""
        if self.run_id:
            return self.run_id
        data = {k: v for k, v in self.to_dict().items()
                if k not in ("output", "overwrite", "run_id")}
        digest = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode())
        return "run-" + digest.hexdigest()[:12]
