"""`rso demo`'s whole loop (generate + store, select random, train both, evaluate both against
SFT under a judge) through the same code path as the real demo, at tiny sizes."""
from __future__ import annotations

import json
import os

from rso_cli.demo import main

TINY = {"train_prompts": 6, "eval_prompts": 4, "num_candidates": 4, "num_samples": 2,
        "max_new_tokens": 6, "train_steps": 2, "batch_size": 2}


def test_whole_loop_on_tiny_models(tiny_policy, tiny_reward_model, tmp_path, capsys):
    out = str(tmp_path / "demo")
    assert main(["--output", out, "--policy", tiny_policy, "--proxy", tiny_reward_model,
                 "--judge", tiny_reward_model, "--engine", "transformers",
                 "--eval-engine", "transformers", "--lr", "1e-3",
                 "--sizes", json.dumps(TINY)]) == 0
    printed = capsys.readouterr().out
    assert "rso-sample-rank (rso)" in printed and "sft-sample-rank (random)" in printed
    with open(os.path.join(out, "demo.json")) as f:
        summary = json.load(f)
    assert set(summary["methods"]) == {"rso", "random"}
    for method, m in summary["methods"].items():
        lo, hi = m["win_rate_ci95"]
        assert 0.0 <= lo <= m["win_rate"] <= hi <= 1.0
        assert m["wins"] + m["ties"] + m["losses"] >= 1
        assert os.path.exists(os.path.join(m["evaluation"], "evaluation.json"))
    # random selection re-used the stored candidates: nothing was decoded for it
    with open(os.path.join(out, "pairs-random", "manifest.json")) as f:
        assert json.load(f)["accounting"]["decoding"]["tokens_decoded"] == 0
