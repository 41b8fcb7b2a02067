"""`rso iterate`: round 2's candidates come from round 1's trained policy."""
from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest

from rso import layout
from rso.model_id import model_id
from rso_cli.iterate import main


def test_an_interrupted_round_continues(tiny_policy, tiny_reward_model, tmp_path, caplog):
    """Rerunning the same command after a round was interrupted (its data written, its
    training stopped before the round was marked finished) refused ("already holds a complete
    run"); now the round keeps its data and resumes its training."""
    import logging

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_id": f"p{i}", "prompt": f"Hi {i}"}) + "\n"
                               for i in range(4)))
    root = tmp_path / "iter"
    argv = ["--rounds", "1", "--policy", tiny_policy, "--input", str(prompts),
            "--reward-model", tiny_reward_model, "--output", str(root),
            "--generate-args", "--engine transformers --num-candidates 4 --num-samples 2 "
                               "--max-new-tokens 6",
            "--train-args", "--max-steps 2 --batch-size 2 --no-progress --no-tensorboard "
                            "--no-plots --num-threads 1"]
    assert main(argv) == 0
    os.remove(root / "round-0" / "round.json")  # as if stopped before the round was marked
    manifest = (root / "round-0" / "data" / "manifest.json").read_text()
    with caplog.at_level(logging.INFO, logger="rso_cli.iterate"):
        assert main(argv) == 0
    assert "round 1/1: data generated earlier (run run-" in caplog.text
    assert "(resuming)" in caplog.text
    assert (root / "round-0" / "data" / "manifest.json").read_text() == manifest  # not redone
    assert (root / "round-0" / "round.json").exists()


def test_two_rounds_on_tiny_models(tiny_policy, tiny_reward_model, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_id": f"p{i}", "prompt": f"Tell me about "
                                            f"the {w}."}) + "\n"
                               for i, w in enumerate(["sea", "sky", "bread", "river"])))
    root = tmp_path / "iter"
    rc = main(["--rounds", "2", "--policy", tiny_policy, "--input", str(prompts),
               "--reward-model", tiny_reward_model, "--output", str(root),
               "--generate-args", "--engine transformers --num-candidates 4 --num-samples 2 "
                                  "--max-new-tokens 6",
               "--train-args", "--max-steps 2 --batch-size 2 --lr 1e-3 --no-progress "
                               "--no-tensorboard --no-plots --num-threads 1"])
    assert rc == 0
    summary = json.loads((root / "iterate.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    round1_policy = summary["rounds"][0]["trained_policy"]
    assert os.path.isdir(round1_policy)
    records = [row for path in layout.pair_files(str(root / "round-1" / "data"), "parquet")
               for row in pq.read_table(path).to_pylist()]
    assert records, "round 2 wrote no pairs"
    # round 2's proposal (and reference) is round 1's trained policy, by content id
    assert {r["policy_model"] for r in records} == {model_id(round1_policy)}
    assert model_id(round1_policy) != model_id(tiny_policy)
    assert summary["final_policy"] == summary["rounds"][1]["trained_policy"]


def test_a_bad_nested_flag_is_refused_before_round_one(tiny_policy, tiny_reward_model, tmp_path,
                                                       capsys):
    """A misspelt `--train-args` flag was found only when round 1 reached its training, after
    its generation had run; both nested commands' flags are now checked first."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt_id": "p0", "prompt": "Hi"}) + "\n")
    root = tmp_path / "iter"
    base = ["--rounds", "2", "--policy", tiny_policy, "--input", str(prompts),
            "--reward-model", tiny_reward_model, "--output", str(root)]
    for extra, named in ((["--train-args", "--max-step 2"], "--max-step (did you mean "
                                                              "--max-steps?)"),
                         (["--generate-args", "--num-sample 2"], "--num-sample (did you mean "
                                                                 "--num-samples?)"),
                         # what iterate sets for each round may not be set again (a generate
                         # run once wrote into --generate-args' --output, outside the root)
                         (["--generate-args", "--output /x"], "--generate-args: --output is set "
                                                              "by rso iterate"),
                         (["--train-args=--data=/x"], "--train-args: --data is set by rso "
                                                      "iterate")):
        with pytest.raises(SystemExit, match="2"):
            main(base + extra)
        err = capsys.readouterr().err
        assert err.startswith("rso iterate: error: ") and named in err, err
        assert not root.exists()  # nothing ran
