"""The typed config: YAML + flags, checks declared on fields, validation at start, one-line
errors, unknown flags refused, content-based run ids."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from beam_pipelines.config import GenerateConfig, RewardModelSpec
from beam_pipelines.pipeline import beam_option_parser
from beam_pipelines.pipeline import main as generate_main
from rso.config import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture()
def dirs(tmp_path, tiny_policy, tiny_reward_model):
    """(policy, reward model, input file): real model directories and a JSONL prompt file."""
    prompts = tmp_path / "in.jsonl"
    prompts.write_text('{"prompt_id": "p0", "prompt": "hello"}\n')
    return tiny_policy, tiny_reward_model, str(prompts)


def prompts_of(dirs):
    return dirs[2]


def _args(policy, rm, prompts, *extra):
    return ["--input", prompts, "--output", "out", "--policy", policy, "--reward-model", rm,
            *extra]


def test_flags_override_yaml_and_beam_flags_pass_through(tmp_path, dirs):
    policy, rm, prompts = dirs
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"input: {prompts}\noutput: o\npolicy: {policy}\nbeta: 2.0\n"
                        f"num-candidates: 16\nreward_model:\n  - {{path: {rm}, weight: 0.25}}\n")
    cfg, rest = GenerateConfig.parse_args(
        ["--config", str(cfg_file), "--beta", "inf", "--runner", "DirectRunner",
         "--direct_num_workers=2"], passthrough=beam_option_parser())
    assert cfg.beta == math.inf and cfg.num_candidates == 16 and cfg.input == prompts
    assert cfg.reward_model == [RewardModelSpec(path=rm, weight=0.25)]
    assert rest == ["--runner", "DirectRunner", "--direct_num_workers=2"]


def test_reward_model_flag_syntax(dirs):
    policy, rm, prompts = dirs
    cfg, _ = GenerateConfig.parse_args(_args(policy, rm + ",weight=0.5,kind=pairwise", prompts,
                                             "--reward-model", rm))
    assert [(r.weight, r.kind) for r in cfg.reward_model] == [(0.5, "pairwise"),
                                                              (1.0, "pointwise")]


@pytest.mark.parametrize("extra, message", [
    (["--beta", "-1"], "--beta must be >= 0, got -1.0"),
    (["--beta", "nan"], "--beta must be >= 0, got nan"),
    (["--num-samples", "9", "--num-candidates", "4"], "cannot exceed --num-candidates"),
    (["--selection", "magic"], "not one of"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--temperature", "nan"], "--temperature must be finite, got nan"),
    (["--top-p", "1.5"], "--top-p must be > 0 and <= 1, got 1.5"),
    (["--tie-margin", "inf"], "--tie-margin must be finite"),
    (["--num-samples", "1"], "can form no pair"),
    (["--num-candidates", "1", "--selection", "rest"], "can form no pair"),
    (["--max-model-len", "1"], "--max-model-len must be >= 2, got 1"),
    (["--max-model-len", "100000"], "exceeds the policy's context length"),
    (["--reward-model", "x,weight=nan"], "weight must be finite"),
])
def test_bad_values_fail_at_start_with_one_message(dirs, extra, message):
    policy, rm, prompts = dirs
    with pytest.raises(ConfigError) as err:
        GenerateConfig.parse_args(_args(policy, rm, prompts, *extra))
    assert message in str(err.value)


def test_checks_run_on_every_construction_not_only_on_the_command_line():
    with pytest.raises(ConfigError, match="--temperature must be finite"):
        GenerateConfig(temperature=float("nan"))
    with pytest.raises(ConfigError, match="--engine: 'tpu' is not one of"):
        GenerateConfig(engine="tpu")
    with pytest.raises(ConfigError, match="--max-prompts must be >= 1"):
        GenerateConfig().replace(max_prompts=0)
    assert GenerateConfig(num_samples=1, selection="best-of-n").num_samples == 1


def test_inputs_and_models_that_cannot_run_are_refused_at_start(tmp_path, dirs):
    policy, rm, prompts = dirs
    empty = tmp_path / "empty_policy"
    empty.mkdir()
    parquet = tmp_path / "p.parquet"
    parquet.write_bytes(b"PAR1 not really")
    cases = [
        (_args("/nope", rm, prompts), "model directory not found: /nope"),
        (_args(str(empty), rm, prompts), "is not a Hugging Face model directory: it has no "
                                         "config.json"),
        (_args(policy, str(empty), prompts), "--reward-model"),
        # the two kinds of model swapped: told apart by config.json, before any weight loads
        (_args(rm, rm, prompts), f"--policy: {rm} is a reward model (LlamaForSequence"),
        (_args(policy, policy, prompts), f"--reward-model: {policy} is a causal LM (Llama"),
        (_args(policy, rm, str(tmp_path)), "is a directory; give a file or a glob"),
        (_args(policy, rm, str(tmp_path / "nothing*.jsonl")), "matches no file"),
        (_args(policy, rm, prompts, "--input-format", "parquet"), "is not a Parquet file"),
        (_args(policy, rm, str(parquet), "--input-format", "jsonl"), "is a Parquet file"),
    ]
    for argv, message in cases:
        with pytest.raises(ConfigError) as err:
            GenerateConfig.parse_args(argv)
        assert message in str(err.value), argv


def test_a_reward_model_is_not_loaded_as_a_policy_anywhere(tmp_path, dirs):
    """transformers builds a causal LM around a tied-embedding classifier's weights without a
    word; every policy loader (trainer, HF engine, fp32 re-score) goes through
    rso.hf.load_causal_lm, which refuses it, and the trainer says so in one ConfigError."""
    import torch

    from rso import hf
    from trainer.model import load_policy

    policy, rm, _ = dirs
    with pytest.raises(ValueError, match="is a reward model"):
        hf.load_causal_lm(rm)
    with pytest.raises(ConfigError, match=f"cannot load the policy {rm}: .* not a causal LM"):
        load_policy(rm, torch.device("cpu"))
    with pytest.raises(ValueError, match="is a causal LM"):
        hf.load_classifier(policy)
    assert hf.load_causal_lm(policy) is not None and hf.load_classifier(rm) is not None
    # a bare encoder (BertModel, as sentence-transformers saves one) is neither
    from tests import tiny_models

    encoder = tiny_models.build_sentence_encoder(str(tmp_path / "encoder"))
    for argv, message in ((_args(encoder, rm, prompts_of(dirs)), "without a language-model head"),
                          (_args(policy, encoder, prompts_of(dirs)), "without a reward head")):
        with pytest.raises(ConfigError, match=message):
            GenerateConfig.parse_args(argv)


def test_unknown_yaml_key_and_yaml_syntax_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key.*num_candiates"):
        GenerateConfig.from_dict({"num_candiates": 3})
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: a\n  beta: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+, column \d+: not valid YAML"):
        GenerateConfig.from_yaml(str(bad))


def test_unknown_flags_are_refused_with_a_suggestion_and_without_their_value(dirs):
    policy, rm, prompts = dirs
    parser = beam_option_parser()
    with pytest.raises(ConfigError) as err:
        GenerateConfig.parse_args(_args(policy, rm, prompts, "--num-candiates", "4",
                                        "--hf_token=s3cr3t", "--runer", "DirectRunner"),
                                  passthrough=parser)
    message = str(err.value)
    assert "--num-candiates (did you mean --num-candidates?)" in message
    assert "--runer (did you mean --runner?)" in message
    assert "--hf_token" in message and "s3cr3t" not in message
    # Options of every registered PipelineOptions class are known, e.g. Dataflow's and Flink's.
    _, rest = GenerateConfig.parse_args(
        _args(policy, rm, prompts, "--project", "p", "--flink_master=[local]",
              "--sdk_container_image", "img"), passthrough=parser)
    assert rest == ["--project", "p", "--flink_master=[local]", "--sdk_container_image", "img"]


def test_generate_errors_are_one_line_and_exit_2(tmp_path, dirs, capsys):
    policy, rm, prompts = dirs
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("beta: [\n")
    out = str(tmp_path / "out")
    for argv in (["--config", str(bad_yaml)],
                 ["--input", prompts, "--output", out, "--policy", policy, "--reward-model", rm,
                  "--temperature", "nan"],
                 ["--input", prompts, "--output", out, "--policy", policy, "--reward-model", rm,
                  "--hf-token", "s3cr3t"],
                 ["--num-candidates", "four"]):
        code = generate_main(argv)
        err = capsys.readouterr().err
        assert code == 2, argv
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("rso generate: error: "), err
        assert "s3cr3t" not in err and "Traceback" not in err
    assert not os.path.exists(out)


def test_generate_cli_error_in_a_fresh_process_is_one_line(tmp_path, dirs):
    """What a user sees: `rso generate` with a mistyped --input glob."""
    policy, rm, _ = dirs
    proc = subprocess.run(
        [sys.executable, "-m", "rso_cli.cli", "generate", "--input", str(tmp_path / "x*.jsonl"),
         "--output", str(tmp_path / "o"), "--policy", policy, "--reward-model", rm],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"rso generate: error: --input {str(tmp_path / 'x*.jsonl')!r} matches no file"], proc.stderr


def test_run_id_is_a_hash_of_content_not_paths(tmp_path, dirs, monkeypatch):
    policy, rm, prompts = dirs
    a, _ = GenerateConfig.parse_args(_args(policy, rm, prompts))
    b, _ = GenerateConfig.parse_args(_args(policy, rm, prompts, "--overwrite", "--output", "x"))
    c, _ = GenerateConfig.parse_args(_args(policy, rm, prompts, "--seed", "1"))
    assert a.resolved_run_id() == b.resolved_run_id() != c.resolved_run_id()
    # Relative and absolute paths to the same models and input: the same id.
    monkeypatch.chdir(os.path.dirname(policy))
    rel, _ = GenerateConfig.parse_args(_args(
        os.path.relpath(policy), os.path.relpath(rm), os.path.relpath(prompts)))
    assert rel.resolved_run_id() == a.resolved_run_id()
    # Different weights at the same path: a different id.
    copy = str(tmp_path / "policy_copy")
    shutil.copytree(policy, copy)
    same, _ = GenerateConfig.parse_args(_args(copy, rm, prompts))
    before = same.resolved_run_id()
    assert before == a.resolved_run_id()  # a copy elsewhere, under another name
    weights = next(f for f in os.listdir(copy) if f.endswith(".safetensors"))
    with open(os.path.join(copy, weights), "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    changed, _ = GenerateConfig.parse_args(_args(copy, rm, prompts))
    assert changed.resolved_run_id() != before
    # Different prompts in the same file: a different id.
    original = a.resolved_run_id()
    with open(prompts, "a") as f:
        f.write(json.dumps({"prompt_id": "p1", "prompt": "more"}) + "\n")
    more, _ = GenerateConfig.parse_args(_args(policy, rm, prompts))
    assert more.resolved_run_id() != original


@pytest.mark.parametrize("flags,native", [
    ("fpu sse2 avx2 fma", False),
    ("fpu avx2 avx512f avx512_bf16", True),
    ("fpu avx2 amx_bf16 amx_tile", True),
    ("", False),
])
def test_native_bf16_reads_the_cpu_flags(flags, native):
    from rso.hf import native_bf16

    assert native_bf16(f"processor\t: 0\nflags\t\t: {flags}\nbugs\t: \n") is native


def test_auto_dtype_is_resolved_once_and_travels_with_the_config(monkeypatch):
    """auto = bf16 for vLLM only where bf16 is native; the launcher's answer is kept in the
    config that is pickled to the workers, whose own hardware is not asked again."""
    import pickle

    import rso.hf

    monkeypatch.setattr(rso.hf, "native_bf16", lambda cpuinfo=None: False)
    emulated = GenerateConfig(engine="vllm")
    assert emulated.generation_dtype == "float32" and not emulated.rescore_in_fp32
    monkeypatch.setattr(rso.hf, "native_bf16", lambda cpuinfo=None: True)
    native = GenerateConfig(engine="vllm")
    assert native.generation_dtype == "bfloat16" and native.rescore_in_fp32
    assert pickle.loads(pickle.dumps(emulated)).generation_dtype == "float32"  # not re-asked
    assert GenerateConfig(engine="transformers").generation_dtype == "float32"
    assert GenerateConfig(engine="vllm", dtype="bfloat16").generation_dtype == "bfloat16"


def test_torch_threads_default_to_half_the_cores():
    """Workers share their cores: torch on all of them collapsed under contention
    (benchmarks/contention.py), so the default is half, at least one."""
    import torch

    from beam_pipelines.handlers import default_torch_threads, set_torch_threads

    cores = len(os.sched_getaffinity(0))
    assert default_torch_threads() == max(1, cores // 2)
    before = torch.get_num_threads()
    try:
        set_torch_threads(None)
        assert torch.get_num_threads() == max(1, cores // 2)
        set_torch_threads(3)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
