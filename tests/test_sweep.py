"""`rso sweep`'s estimates against values computed by hand from Algorithm 1 (SPEC 3)."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from beam_pipelines.sweep import estimate_prompt, sweep

REWARDS = [0.0, 1.0, 3.0]


def exact_k1_inclusion(rewards, beta):
    """P(candidate i is the one kept) for k = 1 under Algorithm 1: one round; candidates are
    visited in a uniformly random order and the first accepted is kept (the round's maximum is
    accepted with probability 1, so the round always ends with one)."""
    r = np.asarray(rewards, dtype=float)
    a = np.exp((r - r.max()) / beta)
    p = np.zeros(r.size)
    perms = list(itertools.permutations(range(r.size)))
    for order in perms:
        survive = 1.0
        for i in order:
            p[i] += survive * a[i] / len(perms)
            survive *= 1.0 - a[i]
    return p


def kl_uniform(p):
    p = np.asarray(p) / np.sum(p)
    nz = p > 0
    return float(np.sum(p[nz] * np.log(p[nz] * p.size)))


def test_top_k_is_exact():
    (point,) = sweep([("p", REWARDS)], [0.0], num_samples=2, replicates=20)
    assert point.kept_reward == pytest.approx((1.0 + 3.0) / 2)
    assert point.kl == pytest.approx(math.log(3 / 2))
    assert point.chosen_reward == pytest.approx(3.0)  # first-round: one pair, best is chosen
    assert point.acceptance_rate == pytest.approx(2 / 3)
    assert point.underfilled == 0.0


def test_random_matches_uniform_subsets():
    (point,) = sweep([("p", REWARDS)], [math.inf], num_samples=2, replicates=4000)
    assert point.kept_reward == pytest.approx(np.mean(REWARDS), abs=0.05)
    # every subset of 2 is equally likely: inclusion 2/3 each, so KL is 0 up to MC noise
    assert point.kl == pytest.approx(0.0, abs=0.01)
    # E[max of a random pair] = (1 + 3 + 3) / 3
    assert point.chosen_reward == pytest.approx(7 / 3, abs=0.05)


def test_finite_beta_matches_the_exact_algorithm_1_probabilities():
    beta = 1.0
    exact = exact_k1_inclusion(REWARDS, beta)
    est = estimate_prompt("p", REWARDS, beta, 1, "first-round", seed=3, replicates=20000)
    assert est.inclusion == pytest.approx(exact, abs=0.015)  # ~4 standard errors
    assert est.kept_reward == pytest.approx(float(exact @ REWARDS), abs=0.05)
    assert est.kl() == pytest.approx(kl_uniform(exact), abs=0.02)
    assert math.isnan(est.chosen_reward)  # k = 1 forms no pair


def test_underfilled_and_seeded():
    a = sweep([("p", [1.0]), ("q", [0.0, 2.0])], [0.5], num_samples=2, replicates=50, seed=7)
    b = sweep([("p", [1.0]), ("q", [0.0, 2.0])], [0.5], num_samples=2, replicates=50, seed=7)
    assert a == b
    assert a[0].underfilled == pytest.approx(0.5)  # p has one candidate for k = 2


def test_negative_beta_is_refused():
    with pytest.raises(ValueError, match="beta"):
        sweep([("p", REWARDS)], [-1.0], num_samples=1)


def write_store(directory, rewards_by_prompt, beta=0.5):
    """A synthetic candidate store: schema of rso.schema.CANDIDATE_COLUMNS, _SUCCESS last."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from rso import layout, schema

    rows = []
    for pid, rewards in rewards_by_prompt.items():
        for i, r in enumerate(rewards):
            rows.append({"prompt_id": pid, "prompt": "x", "prompt_token_ids": [1],
                         "prompt_messages": json.dumps([["user", "x"]]),
                         "candidate_index": i, "response": f"y{i}",
                         "response_token_ids": [10 + i], "finish_reason": "stop",
                         "sft_logp": -1.0, "sft_logp_dtype": "float32", "reward_scores": [r],
                         "reward": r, "policy_model": "p", "reward_model": "r",
                         "sampling_params": "{}", "run_id": "t"})
    for row in rows:
        schema.validate_record(row, columns=schema.CANDIDATE_COLUMNS)
    pq.write_table(pa.Table.from_pylist(rows, schema.arrow_schema(schema.CANDIDATE_COLUMNS)),
                   directory / "candidates-00000-of-00001.parquet")
    (directory / layout.MANIFEST).write_text(json.dumps(
        {"config": {"beta": beta, "num_samples": 2, "pairing": "first-round"}}))
    (directory / layout.SUCCESS).write_text("")


def test_cli_reads_a_store_and_writes_table_json_and_plot(tmp_path, capsys):
    import json

    from rso_cli.sweep import main

    write_store(tmp_path, {"a": REWARDS, "b": [2.0, 2.0, 5.0, 1.0]})
    assert main(["--candidates", str(tmp_path), "--beta", "0,0.5,inf",
                 "--replicates", "50"]) == 0
    out = capsys.readouterr().out
    assert "2 prompts, k = 2" in out
    doc = json.loads((tmp_path / "sweep.json").read_text())
    assert [p["beta"] for p in doc["points"]] == [0.0, 0.5, "inf"]
    top_k = doc["points"][0]
    # top-k: a -> mean(1, 3) = 2; b (after dedup of nothing: distinct ids) -> mean(5, 2) = 3.5
    assert top_k["kept_reward"] == pytest.approx((2.0 + 3.5) / 2)
    assert doc["run_beta"] == 0.5
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_refuses_an_incomplete_store(tmp_path, capsys):
    from rso_cli.sweep import main

    assert main(["--candidates", str(tmp_path)]) == 2
    assert "not a complete run" in capsys.readouterr().err
