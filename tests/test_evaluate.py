"""`rso evaluate`: the win-rate statistics (pure, hand-computed) and the command end to end on
tiny real models with the transformers engine (the policy against itself, and against another
policy), through the real Beam pipeline."""
from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil

import pyarrow.parquet as pq
import pytest

from rso import stats
from rso_cli import evaluate as E
from rso_cli.cli import main as rso

PROMPTS = ["How do I bake bread?", "What is the capital of France?", "Tell me a joke.",
           "What is two plus two?", "Is it going to rain today?"]


# ---------------------------------------------------------------- statistics
def test_wilson_interval_equals_the_hand_computed_one():
    # 7 successes of 10, z = 1.959964: center = (0.7 + z^2/20) / (1 + z^2/10) = 0.644493,
    # half = z / (1 + z^2/10) * sqrt(0.7 * 0.3 / 10 + z^2 / 400) = 0.247715
    # -> [0.396778, 0.892209] (the textbook [0.3968, 0.8922]).
    lo, hi = stats.wilson_interval(7, 10)
    assert lo == pytest.approx(0.396778, abs=1e-6)
    assert hi == pytest.approx(0.892209, abs=1e-6)
    # Symmetric around 1/2 for p = 1/2, and clipped to [0, 1] at the ends.
    lo, hi = stats.wilson_interval(3, 6)
    assert lo + hi == pytest.approx(1.0) and lo == pytest.approx(0.187616, abs=1e-6)
    assert stats.wilson_interval(0, 5)[0] == 0.0 and stats.wilson_interval(5, 5)[1] == 1.0
    assert all(math.isnan(x) for x in stats.wilson_interval(0, 0))
    with pytest.raises(ValueError):
        stats.wilson_interval(6, 5)


def test_ties_are_equal_rewards_within_the_margin_and_count_half():
    policy = [1.0, 2.0, 3.0, 3.0, 0.0]
    baseline = [1.0, 1.0, 4.0, 3.05, 0.2]
    assert stats.match_scores(policy, baseline).tolist() == [0.5, 1.0, 0.0, 0.0, 0.0]
    scores = stats.match_scores(policy, baseline, tie_margin=0.1)
    assert scores.tolist() == [0.5, 1.0, 0.0, 0.5, 0.0]  # |3 - 3.05| <= 0.1 is a tie
    result = stats.win_rate(scores)
    assert (result["wins"], result["ties"], result["losses"]) == (1, 2, 2)
    assert result["win_rate"] == pytest.approx((1 + 2 * 0.5) / 5)
    assert result["win_rate_ci95"] == pytest.approx(list(stats.wilson_interval(2.0, 5)))
    # A margin equal to the difference is still a tie (<=), one just below is not.
    assert stats.match_scores([1.5], [1.0], tie_margin=0.5).tolist() == [0.5]
    assert stats.match_scores([1.5], [1.0], tie_margin=0.49).tolist() == [1.0]
    with pytest.raises(ValueError, match="differ in length"):
        stats.match_scores([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="finite"):
        stats.match_scores([math.nan], [1.0])
    with pytest.raises(ValueError, match="tie_margin"):
        stats.match_scores([1.0], [1.0], tie_margin=-1)
    assert stats.win_rate([])["win_rate"] is None


def test_pairing_by_prompt_id_reports_one_sided_prompts():
    p = [{"prompt_id": "a", "x": 1}, {"prompt_id": "b", "x": 2}]
    b = [{"prompt_id": "b", "x": 3}, {"prompt_id": "c", "x": 4}]
    pairs, unpaired = E.pair_by_prompt(p, b)
    assert [(x["x"], y["x"]) for x, y in pairs] == [(2, 3)]
    assert unpaired == {"policy_only": ["a"], "baseline_only": ["c"]}
    with pytest.raises(ValueError, match="two responses"):
        E.pair_by_prompt(p + p[:1], b)


# ---------------------------------------------------------------- command line
BASE = ["--policy", "p", "--baseline", "b", "--judge", "j", "--prompts", "x.jsonl",
        "--output", "o"]


def _exit_code(call) -> int:
    with pytest.raises(SystemExit) as stop:
        call()
    return stop.value.code


@pytest.mark.parametrize("extra, named", [
    (["--dtyp", "bfloat16"], "--dtyp (did you mean --dtype?)"),
    (["--max-new-tokns", "5"], "--max-new-tokns (did you mean --max-new-tokens?)"),
    (["--foo", "bar"], "--foo"),
    (["--runer", "DirectRunner"], "--runer (did you mean --runner?)"),
])
def test_unknown_flags_are_refused_with_a_suggestion(extra, named, capsys):
    """As `rso generate` refuses them (rso.config.unknown_flag_error): one line, exit 2, the
    flag and a "did you mean" from evaluate's own flags (and Beam's), never the value."""
    for call in (lambda: E.parse_args(BASE + extra), lambda: rso(["evaluate", *BASE, *extra])):
        assert _exit_code(call) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"rso evaluate: error: unknown flag(s): {named}")
        assert len(err.strip().splitlines()) == 1 and extra[1] not in err


def test_beam_pipeline_options_pass_through():
    beam = ["--runner", "DirectRunner", "--direct_num_workers", "1",
            "--direct_running_mode=in_memory"]
    args, beam_args = E.parse_args(BASE[:4] + beam + BASE[4:])
    assert beam_args == beam and args.policy == "p" and args.output == "o"
    assert E.parse_args(BASE)[1] == []


def test_help_shows_the_defaults(capsys):
    assert _exit_code(lambda: E.parse_args(["--help"])) == 0
    out = capsys.readouterr().out
    # The description keeps its layout (RawDescriptionHelpFormatter).
    assert "\n    rso evaluate --policy DIR --baseline DIR --judge DIR --prompts FILE " in out
    assert "\n    evaluation.json          settings, model ids" in out
    options = out.split("\noptions:\n", 1)[1]
    helps = {m[1]: " ".join(m[2].split()) for m in re.finditer(
        r"^  (--[\w-]+)(.*?)(?=^  -|\Z)", options, flags=re.M | re.S)}
    for flag, default in (("--engine", "vllm"), ("--max-new-tokens", "128"), ("--seed", "0"),
                          ("--batch-size", "8"), ("--tie-margin", "0.0"),
                          ("--judge-kind", "pointwise")):
        assert helps[flag].endswith(f"(default: {default})"), (flag, helps[flag])


def test_settings_record_dtype_batch_size_and_the_absolute_baseline_generations(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args, _ = E.parse_args(BASE + ["--baseline-generations", "first/generations/baseline",
                                   "--batch-size", "3"])
    settings = E.settings(args)
    assert (settings["dtype"], settings["batch_size"]) == ("float32", 3)
    assert settings["baseline_generations"] == str(tmp_path / "first/generations/baseline")
    assert E.settings(E.parse_args(BASE)[0])["baseline_generations"] is None
    args, _ = E.parse_args(BASE + ["--baseline-generations", "gs://bucket/eval/baseline"])
    assert E.settings(args)["baseline_generations"] == "gs://bucket/eval/baseline"


def test_an_evaluation_root_given_as_baseline_generations_names_its_baseline(tmp_path):
    """Not "no _SUCCESS; wait for the run to finish": the directory is an evaluation's output,
    and its generations/baseline is what the flag wants."""
    from rso.config import ConfigError

    root = tmp_path / "eval"
    (root / "generations" / "baseline").mkdir(parents=True)
    (root / "generations" / "baseline" / "_SUCCESS").write_text("")
    (root / "evaluation.json").write_text("{}")
    with pytest.raises(ConfigError) as err:
        E.check_reusable(str(root), "run-x")
    assert str(err.value) == (
        f"--baseline-generations {root} is an evaluation's output directory, not its "
        f"baseline's generations: give {root / 'generations' / 'baseline'}")


def test_bad_settings_are_one_line_errors_in_evaluate_terms(tiny_policy, tiny_reward_model,
                                                            tmp_path, capsys):
    """`rso evaluate: error: ...`, exit 2, naming evaluate's flags (not the --input or the
    --policy of the `rso generate` runs underneath); nothing is written."""
    out = str(tmp_path / "out")
    missing = str(tmp_path / "missing.jsonl")
    assert rso(["evaluate", "--policy", tiny_policy, "--baseline", tiny_policy, "--judge",
                tiny_reward_model, "--prompts", missing, "--output", out]) == 2
    assert capsys.readouterr().err == \
        f"rso evaluate: error: --prompts {missing!r} matches no file\n"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt_id": "a", "prompt": "hi"}) + "\n")
    nowhere = str(tmp_path / "nowhere")
    for argv, message in (
            (["--baseline", nowhere, "--judge", tiny_reward_model],
             f"--baseline: model directory not found: {nowhere}"),
            (["--baseline", tiny_policy, "--judge", nowhere],
             f"--judge: model directory not found: {nowhere}"),
            # the models swapped: found before the policy generates (once only after it)
            (["--baseline", tiny_policy, "--judge", tiny_policy],
             f"--judge: {tiny_policy} is a causal LM (LlamaForCausalLM), not a reward model (a "
             f"sequence classifier with one output per response)"),
            (["--baseline", tiny_reward_model, "--judge", tiny_reward_model],
             f"--baseline: {tiny_reward_model} is a reward model (LlamaForSequenceClassification)"
             f", not a causal LM")):
        assert rso(["evaluate", "--policy", tiny_policy, *argv, "--prompts", str(prompts),
                    "--output", out]) == 2
        assert capsys.readouterr().err == f"rso evaluate: error: {message}\n"
    # NaN passed a "< 0" check and failed only after both sides had generated
    assert _exit_code(lambda: E.parse_args(BASE + ["--tie-margin", "nan"])) == 2
    assert "--tie-margin must be a finite number >= 0, got nan" in capsys.readouterr().err
    assert not os.path.exists(out)


# ---------------------------------------------------------------- end to end
def test_both_sides_generate_in_float32_unless_told(monkeypatch):
    """A short fine-tune moves weights by less than bf16's resolution: evaluating in bf16 (what
    the pipeline's "auto" picks on a CPU with native bf16) would round the update away."""
    import rso.hf

    monkeypatch.setattr(rso.hf, "native_bf16", lambda cpuinfo=None: True)
    base = ["--policy", "p", "--baseline", "b", "--judge", "j", "--prompts", "x.jsonl",
            "--output", "o"]
    args, _ = E.parse_args(base)
    assert E.generation_config("p", args, "o/g").generation_dtype == "float32"
    args, _ = E.parse_args(base + ["--dtype", "auto"])
    assert E.generation_config("p", args, "o/g").generation_dtype == "bfloat16"


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt_id": f"p{i}", "prompt": p}) + "\n"
                            for i, p in enumerate(PROMPTS)))
    return str(path)


@pytest.fixture(scope="module")
def other_policy(tmp_path_factory):
    from tests import tiny_models

    return tiny_models.build_policy(str(tmp_path_factory.mktemp("other_policy")), seed=3)


def _evaluate(policy, baseline, judge, prompts, out, *extra):
    return rso(["evaluate", "--policy", policy, "--baseline", baseline, "--judge", judge,
                "--prompts", prompts, "--output", out, "--engine", "transformers",
                "--max-new-tokens", "6", "--seed", "11", *extra])


def _sft(out: str, side: str) -> dict[str, dict]:
    (path,) = glob.glob(os.path.join(out, "generations", side, "sft-*.parquet"))
    return {r["prompt_id"]: r for r in pq.read_table(path).to_pylist()}


@pytest.mark.slow
def test_policy_against_itself_ties_on_every_prompt(tiny_policy, tiny_reward_model, prompts,
                                                     tmp_path, capsys, caplog):
    import logging

    out = str(tmp_path / "self")
    with caplog.at_level(logging.INFO):
        assert _evaluate(tiny_policy, tiny_policy, tiny_reward_model, prompts, out) == 0
    # one line per stage: each side's counters and cost table only with --verbose
    assert "cost: stage" not in caplog.text and "beam counters" not in caplog.text
    ev = json.load(open(os.path.join(out, "evaluation.json")))
    n = len(PROMPTS)
    assert (ev["num_prompts"], ev["ties"], ev["wins"], ev["losses"]) == (n, n, 0, 0)
    assert ev["win_rate"] == 0.5
    assert ev["win_rate_ci95"] == pytest.approx(list(stats.wilson_interval(n / 2, n)))
    # best-of-n with N=1 writes exactly one response per prompt, the same seeds on both sides.
    policy, baseline = _sft(out, "policy"), _sft(out, "baseline")
    assert sorted(policy) == sorted(baseline) == [f"p{i}" for i in range(n)]
    for pid in policy:
        assert policy[pid]["completion_token_ids"] == baseline[pid]["completion_token_ids"]
        assert policy[pid]["reward"] == baseline[pid]["reward"]
    for name in (E.EVALUATION, E.COMPARISONS, *E.PLOT_FILES):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    rows = [json.loads(line) for line in open(os.path.join(out, E.COMPARISONS))]
    assert len(rows) == n and all(r["score"] == 0.5 and r["judge_margin"] == 0 for r in rows)
    # the result is a log line like every other (time-stamped), its interval as [lo, hi]
    assert re.search(r"\[result\] win rate 0\.500, 95% CI \[0\.\d{3}, 0\.\d{3}\], over "
                     rf"{n} prompts: 0 wins, {n} ties", caplog.text), caplog.text
    assert "INFO" not in capsys.readouterr().out
    # A second run into the same directory is refused without --overwrite.
    assert _evaluate(tiny_policy, tiny_policy, tiny_reward_model, prompts, out) == 2
    # ... and is what that command would write (a rerun of `rso demo` keeps it), unlike
    # another seed or another judge (by content id: a copy in another directory differs)
    argv = ["--policy", tiny_policy, "--baseline", tiny_policy, "--judge", tiny_reward_model,
            "--prompts", prompts, "--output", out, "--engine", "transformers",
            "--max-new-tokens", "6", "--seed", "11"]
    assert E.finished_evaluation(argv) == ev
    assert E.finished_evaluation(argv[:-1] + ["12"]) is None
    judge = shutil.copytree(tiny_reward_model, str(tmp_path / "judge"))
    assert E.finished_evaluation(argv[:5] + [judge] + argv[6:]) is None


@pytest.mark.slow
def test_policy_against_another_model(tiny_policy, other_policy, tiny_reward_model, prompts,
                                      tmp_path):
    out = str(tmp_path / "other")
    assert _evaluate(other_policy, tiny_policy, tiny_reward_model, prompts, out) == 0
    ev = json.load(open(os.path.join(out, "evaluation.json")))
    policy, baseline = _sft(out, "policy"), _sft(out, "baseline")
    assert any(policy[p]["completion_token_ids"] != baseline[p]["completion_token_ids"]
               for p in policy)
    # The verdicts are the judge's rewards compared prompt by prompt (tie margin 0).
    wins = sum(policy[p]["reward"] > baseline[p]["reward"] for p in policy)
    ties = sum(policy[p]["reward"] == baseline[p]["reward"] for p in policy)
    n = len(PROMPTS)
    assert (ev["wins"], ev["ties"], ev["losses"]) == (wins, ties, n - wins - ties)
    assert ev["win_rate"] == pytest.approx((wins + ties / 2) / n)
    assert ev["win_rate_ci95"] == pytest.approx(list(stats.wilson_interval(wins + ties / 2, n)))
    assert ev["policy"]["reward"]["mean"] == pytest.approx(
        sum(r["reward"] for r in policy.values()) / n)
    assert ev["baseline"]["length_tokens"]["mean"] == pytest.approx(
        sum(len(r["completion_token_ids"]) for r in baseline.values()) / n)
    assert ev["models"]["policy"].startswith(os.path.basename(other_policy) + "@sha256:")
    assert ev["unpaired"] == {"policy_only": [], "baseline_only": []}


def _snapshot(root: str) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(d, name), root): open(os.path.join(d, name), "rb").read()
            for d, _, names in os.walk(root) for name in names}


@pytest.mark.slow
def test_a_failed_overwrite_leaves_the_previous_evaluation_whole(
        tiny_policy, other_policy, tiny_reward_model, prompts, tmp_path, monkeypatch):
    """`--overwrite` that failed after the policy side had generated left the old
    evaluation.json beside the new policy generations: a result describing responses that
    were no longer there. Both sides are now staged and published together, the report last."""
    out = str(tmp_path / "kept")
    assert _evaluate(other_policy, tiny_policy, tiny_reward_model, prompts, out) == 0
    before = _snapshot(out)

    def judge_crashed(*args, **kwargs):
        raise RuntimeError("judge crashed")

    with monkeypatch.context() as patch:
        patch.setattr(E, "report", judge_crashed)
        with pytest.raises(RuntimeError, match="judge crashed"):  # after both sides generated
            _evaluate(other_policy, tiny_policy, tiny_reward_model, prompts, out,
                      "--overwrite", "--seed", "12")
    assert _snapshot(out) == before  # no staging directory left either
    fresh = tmp_path / "a" / "b"  # a new nested output: nothing of it is left
    with monkeypatch.context() as patch:
        patch.setattr(E, "report", judge_crashed)
        with pytest.raises(RuntimeError, match="judge crashed"):
            _evaluate(other_policy, tiny_policy, tiny_reward_model, prompts, str(fresh))
    assert not (tmp_path / "a").exists()
    # an evaluation stopped while publishing (its evaluation.json gone, the sides already
    # written) is finished by the same command, without --overwrite (which it once needed,
    # naming an inner generations/ directory)
    os.remove(os.path.join(out, "evaluation.json"))
    assert _evaluate(other_policy, tiny_policy, tiny_reward_model, prompts, out,
                     "--seed", "12") == 0
    ev = json.load(open(os.path.join(out, "evaluation.json")))
    assert ev["settings"]["seed"] == 12
    for side in E.SIDES:
        with open(os.path.join(out, "generations", side, "manifest.json")) as f:
            assert json.load(f)["config"]["seed"] == 12
    assert not glob.glob(os.path.join(out, "generations", "*", "_staging-*"))


@pytest.mark.slow
def test_baseline_generations_are_reused_only_when_they_are_the_same_run(
        tiny_policy, other_policy, tiny_reward_model, prompts, tmp_path, capsys, caplog):
    """--baseline-generations reads an earlier evaluation's baseline instead of generating it
    again, with the same verdicts; another seed (or baseline, judge, prompts) is refused."""
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    assert _evaluate(other_policy, tiny_policy, tiny_reward_model, prompts, first) == 0
    reused = os.path.join(first, "generations", "baseline")
    with caplog.at_level("INFO", logger="rso.evaluate"):
        assert _evaluate(other_policy, tiny_policy, tiny_reward_model, prompts, second,
                         "--baseline-generations", reused) == 0
    a, b = (json.load(open(os.path.join(d, "evaluation.json"))) for d in (first, second))
    assert (b["wins"], b["ties"], b["losses"], b["win_rate"]) == \
        (a["wins"], a["ties"], a["losses"], a["win_rate"])
    assert b["generations"]["baseline"] == reused
    assert a["settings"]["baseline_generations"] is None
    assert b["settings"]["baseline_generations"] == os.path.abspath(reused)
    assert all((ev["settings"]["dtype"], ev["settings"]["batch_size"]) == ("float32", 8)
               for ev in (a, b))
    assert not os.path.exists(os.path.join(second, "generations", "baseline"))
    assert "[baseline] reusing" in caplog.text
    other_seed = str(tmp_path / "other-seed")
    assert _evaluate(other_policy, tiny_policy, tiny_reward_model, prompts, other_seed,
                     "--baseline-generations", reused, "--seed", "12") == 2
    assert f"holds run {json.load(open(os.path.join(reused, 'manifest.json')))['run_id']}, " \
        "not run-" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(other_seed, "evaluation.json"))
    assert _evaluate(other_policy, tiny_policy, tiny_reward_model, prompts, other_seed,
                     "--baseline-generations", str(tmp_path / "nowhere")) == 2
    assert "nowhere does not exist" in capsys.readouterr().err
    # the first evaluation's root instead of its generations/baseline: the hint names that
    assert _evaluate(other_policy, tiny_policy, tiny_reward_model, prompts, other_seed,
                     "--baseline-generations", first) == 2
    assert capsys.readouterr().err == (
        f"rso evaluate: error: --baseline-generations {first} is an evaluation's output "
        f"directory, not its baseline's generations: give {reused}\n")
    # --overwrite reading the baseline from elsewhere: the old run's own baseline goes
    # (it was left beside the new results, from another run)
    replaced, elsewhere = str(tmp_path / "replaced"), str(tmp_path / "elsewhere")
    shutil.copytree(first, replaced)
    shutil.copytree(reused, elsewhere)
    assert _evaluate(other_policy, tiny_policy, tiny_reward_model, prompts, replaced,
                     "--overwrite", "--baseline-generations", elsewhere) == 0
    assert not os.path.exists(os.path.join(replaced, "generations", "baseline"))
    with open(os.path.join(replaced, "evaluation.json")) as f:
        assert json.load(f)["generations"]["baseline"] == elsewhere
    # the same run id, but a record file removed: refused, not a comparison of fewer prompts
    damaged = str(tmp_path / "damaged")
    shutil.copytree(reused, damaged)
    for path in glob.glob(os.path.join(damaged, "sft-*.parquet")):
        os.remove(path)
    assert _evaluate(other_policy, tiny_policy, tiny_reward_model, prompts, other_seed,
                     "--baseline-generations", damaged) == 2
    assert "listed in its manifest but missing" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(other_seed, "evaluation.json"))


@pytest.mark.slow
def test_pairwise_judge_of_a_policy_against_itself_is_all_ties(tiny_policy, tiny_reward_model,
                                                               prompts, tmp_path):
    """With the pipeline's pairwise handler, both orders: s(y, y) - s(y, y) = 0 exactly."""
    out = str(tmp_path / "pairwise")
    assert _evaluate(tiny_policy, tiny_policy, tiny_reward_model, prompts, out,
                     "--judge-kind", "pairwise", "--num-prompts", "3") == 0
    ev = json.load(open(os.path.join(out, "evaluation.json")))
    assert (ev["num_prompts"], ev["ties"], ev["win_rate"]) == (3, 3, 0.5)
    assert ev["policy"]["reward"] is None  # a pairwise judge gives margins, not rewards
