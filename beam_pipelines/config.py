"""`rso generate` configuration: one typed, validated object for the whole pipeline.

Built from ``--config FILE.yaml`` and flags (flags win); flags it does not know are Beam pipeline
options (``--runner``, ``--direct_num_workers``, ...). Every field is documented in place.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import math
import os
from typing import Literal

from rso import layout
from rso import storage as rso_io
from rso.config import Config, ConfigError, option
from rso.console import command_log
from rso.model_id import content_id, model_id

Selection = Literal["rso", "top-k", "random", "best-of-n", "rest"]
Pairing = Literal["first-round", "tournament", "all-pairs", "best-vs-worst", "best-vs-mean-2std"]
BetaScale = Literal["none", "std"]  # the unit of --beta (docs/SELECTION.md)


@dataclasses.dataclass
class RewardModelSpec(Config):
    """One reward model of a weighted sum (SPEC 2)."""
    path: str = option("", "Hugging Face model directory")
    weight: float = option(1.0, "weight of this model's reward in the sum", finite=True)
    kind: Literal["pointwise", "pairwise"] = option(
        "pointwise", "pointwise: a sequence classifier with one output; pairwise: a model giving "
        "P(A better than B) for '[CONTEXT] x [RESPONSE A] a [RESPONSE B] b'")

    @classmethod
    def from_string(cls, text: str) -> RewardModelSpec:
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

    def _label(self, name: str) -> str:
        return f"--reward-model {self.path}: {name}"

    def validate(self) -> None:
        if not self.path:
            raise ConfigError("a reward model needs a path")


@dataclasses.dataclass
class GenerateConfig(Config):
    # ---- read
    input: str = option("", "prompts: JSONL/Parquet/HH-RLHF file, glob or gs:// path")
    output: str = option("", "output directory (local or gs://)")
    input_format: Literal["auto", "jsonl", "parquet", "hh-rlhf"] = option(
        "auto", "auto: by extension (.parquet) and content (a 'chosen' field means HH-RLHF)")
    max_prompts: int | None = option(None, "keep a deterministic shard of about this many "
                                        "prompts (chosen by hash of prompt_id and seed)", min=1)
    # ---- generate
    policy: str = option("", "SFT policy: Hugging Face causal LM directory")
    engine: Literal["vllm", "transformers"] = option("vllm",
                                                     "decoding engine: vllm or transformers")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", "generation precision; auto = bfloat16 for vLLM on a GPU or a CPU with native "
        "bf16 (AVX512-BF16/AMX), else float32 (bf16 is emulated, and far slower, elsewhere)")
    rescore: Literal["auto", "on", "off"] = option(
        "auto", "recompute sft_logp of kept responses in float32; auto = on whenever "
        "generation ran in reduced precision")
    num_candidates: int = option(64, "N: candidates sampled per prompt", min=1)
    max_new_tokens: int = option(128, "longest response, in tokens", min=1)
    temperature: float = option(1.0, "sampling temperature (1.0 = pi_sft, as SPEC 1 requires)",
                                gt=0, finite=True)
    top_p: float = option(1.0, "nucleus sampling (1.0 = off)", gt=0, max=1)
    top_k: int = option(0, "top-k sampling (0 = off)", min=0)
    max_model_len: int | None = option(
        None, "context length; default: the model's (a prompt needs 1 position and its response "
        "at least 1)", min=2)
    batch_size: int = option(8, "prompts per engine call", min=1)
    enforce_eager: bool = option(False, "vLLM: skip graph compilation (faster start, slower "
                                 "decoding)")
    trust_remote_code: bool = option(False, "let model repositories run their own code")
    vllm_gpu_memory_utilization: float | None = option(
        None, "vLLM: fraction of accelerator memory the engine may use; default 0.9 on GPU, "
        "0.3 on CPU (there it only bounds vLLM's start-up memory check)", gt=0, max=1)
    vllm_cpu_kv_cache_gib: int | None = option(
        None, "vLLM on CPU: KV-cache size in GiB (VLLM_CPU_KVCACHE_SPACE); default: that "
        "environment variable, else 1", min=1)
    rescore_batch_size: int = option(16, "sequences per float32 re-scoring forward pass", min=1)
    # ---- reward
    reward_model: list[RewardModelSpec] = option(
        [], "reward model, repeatable: PATH[,weight=W][,kind=pointwise|pairwise]")
    reward_batch_size: int = option(16, "sequences per reward forward pass", min=1)
    reward_prompts_per_batch: int = option(
        4, "prompts per reward RunInference batch; all their candidates are sorted by token "
        "length and scored in forward passes of --reward-batch-size sequences", min=1)
    reward_max_length: int | None = option(
        None, "longest reward-model input in tokens (capped at the model's own limit); longer "
        "inputs lose their oldest context tokens, counted as reward_truncated", min=2)
    pairwise_debias: Literal["both-orders", "random-flip"] = option(
        "both-orders", "pairwise reward models' position bias: both-orders scores (y, b) and "
        "(b, y) and averages (2 forwards per candidate); random-flip scores one order chosen by "
        "a coin seeded from (seed, prompt_id)")
    reward_combination: Literal["weighted-sum", "mean-minus-std"] = option(
        "weighted-sum", "how several reward models' scores become one reward: weighted-sum "
        "(SPEC 2) or mean-minus-std, mean - lambda * std across models (a pessimistic ensemble)")
    reward_std_penalty: float = option(
        1.0, "lambda of --reward-combination mean-minus-std", min=0, finite=True)
    torch_threads: int | None = option(
        None, "torch CPU threads of the transformers engine, reward and re-scoring models "
        "(default: half this machine's cores, at least 1: workers share their cores, and with "
        "all of them a competing process slowed decoding 30x); fix it to get bit-identical "
        "records on workers with different core counts", min=1)
    write_candidates: bool = option(
        False, "also write every scored candidate to candidates-*.parquet (docs/CANDIDATES.md), "
        "so that rso select and rso sweep can re-select without decoding")
    candidates: str | None = option(
        None, "select from this candidate store (a complete run written with "
        "--write-candidates) instead of reading and decoding prompts (rso select)")
    reuse_candidates: str | None = option(
        None, "incremental run: reuse the stored candidates of the complete earlier runs in "
        "this directory's subdirectories (same policy, rendered prompt and sampling parameters) "
        "instead of decoding those prompts again; implies --write-candidates "
        "(docs/CANDIDATES.md, Incremental runs)")
    # ---- select and pair
    selection: Selection = option("rso", "rso | top-k | random | best-of-n | rest (SPEC 3)")
    num_samples: int = option(8, "k: responses kept per prompt (a pairing needs k >= 2)", min=1)
    beta: float = option(0.5, "rejection-sampling temperature (0 = top-k, inf = random)", min=0)
    beta_scale: BetaScale = option(
        "none", "unit of --beta: none = reward units (for a calibrated log-odds reward); std = "
        "the prompt's candidate-reward standard deviation, beta_eff = beta * std (for a reward "
        "model whose outputs are not log-odds; see docs/SELECTION.md)")
    rest_threshold: float = option(0.7, "rest: keep responses whose min-max normalised reward "
                                   "exceeds this", min=0, lt=1)
    dedup: bool = option(True, "collapse candidates with identical token ids before selection")
    pairing: Pairing = option("first-round", "first-round | tournament | all-pairs (SPEC 4) | "
                              "best-vs-worst | best-vs-mean-2std (docs/GLOSSARY.md)")
    tie_margin: float = option(0.0, "drop pairs whose rewards differ by no more than this",
                               min=0, finite=True)
    # ---- run
    seed: int = option(0, "run seed; with prompt_id it seeds every random choice")
    run_id: str | None = option(None, "id written into every record; default: a hash of "
                                   "the input's content, the models' content ids and the "
                                   "settings (not of paths)")
    overwrite: bool = option(False, "replace an existing complete output directory, once the "
                             "new run is complete (a failed run leaves the old one)")
    price_per_hour: float | None = option(
        None, "USD per machine-hour of the machines that run the job: the manifest's cost "
        "section and the last lines then give the cost per 1,000 pairs (docs/MANIFEST.md); "
        "without it they report resources only", min=0, finite=True)

    def validate(self) -> None:
        """Cross-field and filesystem checks (the per-field ones ran at construction): raises
        ConfigError for a configuration that would fail every prompt or cannot start."""
        def fail(msg: str) -> None:
            raise ConfigError(msg)

        required = (("output", "--output"), ("policy", "--policy"))
        if not self.candidates:
            required = (("input", "--input"), *required)
        for name, flag in required:
            if not getattr(self, name):
                fail(f"{flag} is required")
        if not self.reward_model and not self.candidates:
            fail("at least one --reward-model is required")
        for spec in self.reward_model:
            spec.validate()
        if rso_io.has_glob_chars(self.output):
            # Beam's file sinks match their own temp and shard paths as patterns when they
            # finalise (apache_beam/io/filebasedsink.py), so such a directory is never written.
            fail(f"--output {self.output}: a directory name with *, ? or [ cannot be written "
                 f"(Beam's file sinks read it as a glob pattern); choose a name without them")
        if self.selection != "rest" and self.num_samples > self.num_candidates:
            fail(f"--num-samples ({self.num_samples}) cannot exceed --num-candidates "
                 f"({self.num_candidates})")
        kept = min(self.num_samples, self.num_candidates)
        if self.selection != "best-of-n" and kept < 2:
            fail(f"--num-samples {self.num_samples} with --num-candidates "
                 f"{self.num_candidates} keeps at most {kept} response per prompt, so "
                 f"--pairing {self.pairing} can form no pair; keep >= 2 or use --selection "
                 f"best-of-n")
        check_model_dir(self.policy, "--policy", tokenizer=True, role="causal-lm")
        for spec in self.reward_model:
            check_model_dir(spec.path, "--reward-model")
        if self.max_model_len is not None and "://" not in self.policy:
            from beam_pipelines.render import context_length

            limit = context_length(self.policy, None, self.trust_remote_code)
            if self.max_model_len > limit:
                fail(f"--max-model-len {self.max_model_len} exceeds the policy's context "
                     f"length ({limit})")
        if self.candidates and self.reuse_candidates:
            fail("--reuse-candidates is for rso generate (decoding what is not stored yet); "
                 "--candidates re-selects one store without decoding: give one of them")
        if self.reuse_candidates and same_path(self.reuse_candidates, self.output):
            fail(f"--output {self.output} is the --reuse-candidates root itself; write each run "
                 f"to a subdirectory of it (e.g. ROOT/dt=YYYY-MM-DD)")
        if self.reuse_candidates:
            check_reuse_root(self.reuse_candidates)
        if self.candidates:
            from beam_pipelines.candidates import check_store

            if same_path(self.candidates, self.output):
                fail(f"--output {self.output} is the --candidates store itself: re-selecting "
                     f"would replace the candidates it reads; choose another --output")
            check_store(self.candidates, self.policy)
        else:
            check_input(self.input, self.input_format)

    # ---- derived values
    @property
    def generation_dtype(self) -> str:
        """The precision candidates are generated in. ``auto``: bfloat16 for vLLM where bf16 is
        native (a CUDA device, or a CPU with AVX512-BF16/AMX: :func:`rso.hf.native_bf16`),
        float32 otherwise and for transformers. Resolved once, on the machine that builds the
        job, and kept with the config (pickled to the workers): give --dtype explicitly when
        the workers' hardware differs from the launcher's (deploy/dataflow's example does)."""
        if self.dtype != "auto":
            return self.dtype
        if "_auto_dtype" not in self.__dict__:
            from rso.hf import native_bf16

            native = self.engine == "vllm" and native_bf16()
            self.__dict__["_auto_dtype"] = "bfloat16" if native else "float32"
        return self.__dict__["_auto_dtype"]

    @property
    def stores_candidates(self) -> bool:
        """Whether the run writes a candidate store: --write-candidates, or --reuse-candidates
        (the next incremental run reuses what this one decodes)."""
        return self.write_candidates or bool(self.reuse_candidates)

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

    def model_ids(self) -> dict[str, str]:
        """``policy`` and ``reward`` ids (name + content hash, :func:`rso.model_id.model_id`) as
        records and the manifest carry; ``reward`` names the combination when it is not the
        weighted sum. Selecting from a store without new reward models keeps the store's id."""
        rewards = [f"{model_id(r.path)}*{r.weight:g}" + (":pairwise" if r.kind == "pairwise"
                                                          else "") for r in self.reward_model]
        if rewards:
            reward = "+".join(rewards)
            if self.reward_combination != "weighted-sum":
                reward += f"|{self.reward_combination}(lambda={self.reward_std_penalty:g})"
        else:
            from beam_pipelines.candidates import store_identity

            reward = store_identity(self.candidates)[1]
        return {"policy": model_id(self.policy), "reward": reward}

    def input_id(self) -> str:
        """Content id of the data: the input files' (:func:`rso.model_id.content_id`), or, when
        selecting from a store, that of the input of the run that wrote it. Computed once per
        (input, candidates) value: hashing a large input is the slow part of start-up."""
        key = (self.input, self.candidates)
        cached = self.__dict__.get("_input_id")
        if cached is None or cached[0] != key:
            if self.candidates:  # the same data as the run that wrote the store
                from beam_pipelines.candidates import store_identity

                value = store_identity(self.candidates)[0]
            else:
                value = content_id(self.input)
            self.__dict__["_input_id"] = cached = (key, value)
        return cached[1]

    def resolved_run_id(self) -> str:
        """The given run_id, else ``run-<12 hex>``: a hash of what shapes the records, by
        content: the input's :func:`rso.model_id.content_id`, the models'
        :func:`rso.model_id.model_id` and every other setting. Paths do not count (relative or
        absolute, or a copy elsewhere, give the same id; new weights at the same path do not),
        nor where the output goes, nor whether candidates were reused (--reuse-candidates gives
        the records a full run would)."""
        if self.run_id:
            return self.run_id
        data = {k: v for k, v in self.to_dict().items()
                if k not in ("output", "overwrite", "run_id", "input", "policy", "reward_model",
                             "candidates", "write_candidates", "reuse_candidates",
                             "price_per_hour")}
        data["dtype"] = self.generation_dtype  # "auto" resolves by hardware
        data["input"] = self.input_id()
        data["policy"] = content_part(model_id(self.policy))
        # "name@sha256:x*1+..." without the names: content and weights only
        data["reward_model"] = [content_part(part) for part in
                                self.model_ids()["reward"].split("+")]
        digest = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode())
        return "run-" + digest.hexdigest()[:12]


def same_path(a: str, b: str) -> bool:
    """Whether two local paths (or URLs) name the same directory."""
    if "://" in a or "://" in b:
        return a.rstrip("/") == b.rstrip("/")
    return os.path.realpath(a) == os.path.realpath(b)


def check_reuse_root(root: str) -> None:
    """ConfigError unless ``root`` (``--reuse-candidates``) can be a root of runs: a directory
    (or one not made yet) that is not itself a run. A file, or one run's directory (it holds
    ``_SUCCESS``; its partitions would be its subdirectories), would silently reuse nothing."""
    if rso_io.exists(root) and not rso_io.isdir(root):
        raise ConfigError(f"--reuse-candidates {root} is a file; give the root directory that "
                          f"holds the dt= partitions")
    if layout.is_complete(root):
        raise ConfigError(f"--reuse-candidates {root} is one run's directory (it holds "
                          f"{layout.SUCCESS}); give the root that holds the dt= partitions "
                          f"(e.g. {rso_io.parent(root)})")


def content_part(model: str) -> str:
    """``sha256:...`` of a model id ``name@sha256:...`` (the directory's name does not count)."""
    return model.rsplit("@", 1)[-1]


# Files a Hugging Face model directory must hold: its config, and weights in one of these forms.
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json",
                    "*.pt", "*.gguf")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_model_dir(path: str, flag: str, tokenizer: bool = False,
                    role: str = "classifier") -> None:
    """ConfigError unless the local directory ``path`` looks like a loadable Hugging Face model
    (config.json, weights, and with ``tokenizer`` a tokenizer) of the kind ``role`` says
    (``causal-lm`` or ``classifier``: :func:`rso.hf.check_role`). Remote paths are left to the
    engine. This is what ``from_pretrained`` would otherwise fail on mid-pipeline."""
    if "://" in path:
        return
    if not os.path.isdir(path):
        raise ConfigError(f"{flag}: model directory not found: {path}")
    names = set(os.listdir(path))
    missing = []
    if "config.json" not in names:
        missing.append("config.json")
    if not any(fnmatch.filter(names, p) for p in _WEIGHT_PATTERNS):
        missing.append("weights (*.safetensors or *.bin)")
    if tokenizer and not names & set(_TOKENIZER_FILES):
        missing.append("a tokenizer (tokenizer.json or tokenizer_config.json)")
    if missing:
        raise ConfigError(f"{flag} {path} is not a Hugging Face model directory: it has no "
                          f"{', '.join(missing)}")
    from rso.hf import check_role

    try:
        check_role(path, role)
    except ValueError as e:
        raise ConfigError(f"{flag}: {e}") from None


PARQUET_MAGIC = b"PAR1"
_MAX_FILES_SNIFFED = 64  # bounds start-up time on inputs of many shards on an object store


def check_input(pattern: str, input_format: str) -> list[str]:
    """The files ``--input`` matches, checked at start (ConfigError): it matches at least one
    file and no directory, and each file's first bytes agree with ``input_format`` (Parquet
    files begin with ``PAR1``; JSONL, gzip-decompressed, does not). Sniffs at most the first
    64 files."""
    from apache_beam.io.filesystems import FileSystems

    from beam_pipelines import read

    if "://" not in pattern and os.path.isdir(pattern):
        raise ConfigError(f"--input {pattern} is a directory; give a file or a glob such as "
                          f"{os.path.join(pattern, '*.jsonl')}")
    files = [f for f in read.check_input(pattern) if "://" in f or not os.path.isdir(f)]
    if not files:
        raise ConfigError(f"--input {pattern} matches only directories; give files")
    parquet = read.resolve_format(files, input_format, pattern) == "parquet"
    # A format that fits none of the files is a wrong setting (refused here); a file that does
    # not fit among files that do is damaged data: the read stage makes it a dead letter.
    problems = []
    sniffed = files[:_MAX_FILES_SNIFFED]
    for path in sniffed:
        try:
            with FileSystems.open(path) as f:  # decompresses .gz by extension
                head = f.read(len(PARQUET_MAGIC))
        except Exception as e:  # noqa: BLE001 - corrupt gzip, permissions, ...
            problems.append(f"--input {path}: cannot read it: {e}")
            continue
        if parquet and head != PARQUET_MAGIC:
            problems.append(f"--input {path} is not a Parquet file (it does not begin with "
                            f"PAR1); set --input-format to jsonl, hh-rlhf or auto")
        elif not parquet and head == PARQUET_MAGIC:
            problems.append(f"--input {path} is a Parquet file but --input-format is "
                            f"{input_format}; use parquet or auto")
    if problems and len(problems) == len(sniffed):
        raise ConfigError(problems[0])
    for problem in problems:
        command_log().warning("%s (it will be a dead letter)", problem)
    return files
