"""The typed config: YAML + flags, unknown keys, validation at start."""
import math

import pytest

from beam_pipelines.config import GenerateConfig, RewardModelSpec
from rso.config import ConfigError


@pytest.fixture()
def dirs(tmp_path):
    (tmp_path / "policy").mkdir()
    (tmp_path / "rm").mkdir()
    return str(tmp_path / "policy"), str(tmp_path / "rm")


def _args(policy, rm, *extra):
    return ["--input", "in.jsonl", "--output", "out", "--policy", policy, "--reward-model", rm,
            *extra]


def test_flags_override_yaml_and_unknown_flags_pass_to_beam(tmp_path, dirs):
    policy, rm = dirs
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"input: a.jsonl\noutput: o\npolicy: {policy}\nbeta: 2.0\n"
                        f"num-candidates: 16\nreward_model:\n  - {{path: {rm}, weight: 0.25}}\n")
    cfg, rest = GenerateConfig.parse_args(["--config", str(cfg_file), "--beta", "inf",
                                           "--runner", "DirectRunner"], allow_unknown=True)
    assert cfg.beta == math.inf and cfg.num_candidates == 16 and cfg.input == "a.jsonl"
    assert cfg.reward_model == [RewardModelSpec(path=rm, weight=0.25)]
    assert rest == ["--runner", "DirectRunner"]


def test_reward_model_flag_syntax(dirs):
    policy, rm = dirs
    cfg, _ = GenerateConfig.parse_args(_args(policy, rm + ",weight=0.5,kind=pairwise",
                                             "--reward-model", rm))
    assert [(r.weight, r.kind) for r in cfg.reward_model] == [(0.5, "pairwise"),
                                                              (1.0, "pointwise")]


@pytest.mark.parametrize("extra, message", [
    (["--beta", "-1"], "--beta must be >= 0"),
    (["--num-samples", "9", "--num-candidates", "4"], "cannot exceed --num-candidates"),
    (["--selection", "magic"], "not one of"),
    (["--temperature", "0"], "--temperature must be > 0"),
])
def test_bad_values_fail_at_start_with_one_message(dirs, extra, message, capsys):
    policy, rm = dirs
    with pytest.raises((ConfigError, SystemExit)) as err:
        GenerateConfig.parse_args(_args(policy, rm, *extra))
    assert message in (str(err.value) + capsys.readouterr().err)


def test_missing_model_directory_and_unknown_yaml_key(tmp_path, dirs):
    policy, rm = dirs
    with pytest.raises(ConfigError, match="model directory not found: /nope"):
        GenerateConfig.parse_args(_args("/nope", rm))
    with pytest.raises(ConfigError, match="unknown config key.*num_candiates"):
        GenerateConfig.from_dict({"num_candiates": 3})


def test_run_id_is_a_stable_hash_of_the_config(dirs):
    policy, rm = dirs
    a, _ = GenerateConfig.parse_args(_args(policy, rm))
    b, _ = GenerateConfig.parse_args(_args(policy, rm, "--overwrite"))
    c, _ = GenerateConfig.parse_args(_args(policy, rm, "--seed", "1"))
    assert a.resolved_run_id() == b.resolved_run_id() != c.resolved_run_id()
