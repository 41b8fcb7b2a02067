"""Per-stage cost accounting (rso.cost, the manifest's ``cost`` section): structure, exact
counts on the tiny models, the price arithmetic, on the FnApiRunner and on the DirectRunner
with worker processes. No timing assertion: seconds are only checked to be finite and >= 0."""
from __future__ import annotations

import glob
import json
import logging
import math
import os

import pyarrow.parquet as pq
import pytest

from beam_pipelines.config import GenerateConfig, RewardModelSpec
from beam_pipelines.pipeline import main as generate
from beam_pipelines.pipeline import select_main
from rso import cost
from tests.test_pipeline_e2e import key

WORDS = ["sea", "sky", "bread", "river", "city", "music", "rain"]
N, K = 4, 3  # candidates per prompt, responses kept
REWARD_BATCH, RESCORE_BATCH, BATCH = 3, 2, 3
ALL_STAGES = ("read", "render", "generate", "reward", "select", "rescore", "records", "write")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("cost") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt_id": f"p{i}", "prompt": f"Tell me about the "
                                        f"{w}."}) + "\n" for i, w in enumerate(WORDS)))
    return str(path)


def common(prompts: str, policy: str) -> list[str]:
    return ["--input", prompts, "--policy", policy, "--engine", "transformers",
            "--num-candidates", str(N), "--num-samples", str(K), "--max-new-tokens", "5",
            "--batch-size", str(BATCH), "--reward-batch-size", str(REWARD_BATCH),
            "--rescore", "on", "--rescore-batch-size", str(RESCORE_BATCH), "--seed", "5",
            "--torch-threads", "1"]


def manifest(out: str) -> dict:
    with open(os.path.join(out, "manifest.json")) as f:
        return json.load(f)


def records(out: str) -> list[dict]:
    rows = [r for p in sorted(glob.glob(os.path.join(out, "pairs-*.parquet")))
            for r in pq.read_table(p).to_pylist()]
    return sorted(rows, key=key)


def check_exact_counts(m: dict, reward_kinds: list[tuple[str, str]]) -> None:
    """Counts that follow from the data alone (FnApiRunner or worker processes alike)."""
    c = m["cost"]
    prompts = m["accounting"]["prompts"]["prompts_read"]
    assert prompts == len(WORDS) and m["accounting"]["balanced"] is True
    stages = c["stages"]
    assert sorted(stages) == sorted(ALL_STAGES)  # every stage measured
    for name, s in stages.items():
        for field in ("wall_seconds", "cpu_seconds"):
            assert math.isfinite(s[field]) and s[field] >= 0, (name, field, s[field])
    assert math.isclose(sum(s["share"] for s in stages.values()), 1.0, rel_tol=1e-9)
    assert math.isclose(c["busy_seconds"], sum(s["wall_seconds"] for s in stages.values()))

    gen = stages["generate"]  # transformers: one generate() call per prompt, N sequences each
    assert gen["items"] == prompts and gen["calls"] == prompts
    assert gen["sequences"] == prompts * N
    assert gen["tokens_out"] == m["accounting"]["decoding"]["tokens_decoded"] > 0
    assert gen["tokens_in"] > 0
    assert math.ceil(prompts / BATCH) <= gen["batches"] <= prompts

    per_prompt = [cost.reward_calls_expected(kind, N, K, debias)[0]
                  for kind, debias in reward_kinds]
    rew = stages["reward"]
    assert rew["items"] == prompts * len(reward_kinds)
    assert rew["sequences"] == prompts * sum(per_prompt)
    assert rew["calls"] == prompts * sum(math.ceil(s / REWARD_BATCH) for s in per_prompt)
    models = c["reward_model_calls"]
    assert [(r["model"], r["kind"]) for r in models] == [
        (i, kind) for i, (kind, _) in enumerate(reward_kinds)]
    for r, expected, (kind, debias) in zip(models, per_prompt, reward_kinds):
        assert r["prompts"] == prompts
        assert r["sequences_per_prompt"] == r["expected_per_prompt"] == expected
        if kind == "pairwise":  # the paper's N - 1 + k/2, times 2 with both orders
            orders = 2 if debias == "both-orders" else 1
            assert r["paper_per_prompt"] == orders * (N - 1 + K / 2)
            assert r["expected_per_prompt"] == orders * (N - 1)

    by_k = {int(k): n for k, n in m["acceptance"]["prompts_by_num_accepted"].items()}
    # each prompt once, then its kept responses RESCORE_BATCH per forward pass (on the
    # prompt's cache); exact when no kept response is a single token, as here
    res = stages["rescore"]
    assert res["sequences"] == m["counters"]["accepted"]
    assert res["calls"] == sum(n * (1 + math.ceil(k / RESCORE_BATCH))
                               for k, n in by_k.items() if k > 0)
    assert res["items"] == sum(n for k, n in by_k.items() if k > 0)
    for name in ("read", "render", "select", "records", "write"):
        assert stages[name]["calls"] == 0 and stages[name]["wall_seconds"] > 0
    assert c["pairs"] == m["counters"]["records_written"] > 0 and c["pairs_unit"] == "pairs"
    launcher = c["launcher"]
    assert launcher["machines"] == 1 and launcher["wall_seconds"] > 0


@pytest.mark.slow
def test_cost_on_the_fn_api_runner_with_prices(prompts, tiny_policy, tiny_reward_model,
                                               tmp_path, caplog):
    import torch

    out = str(tmp_path / "priced")
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with caplog.at_level(logging.INFO, logger="rso.generate"):
            assert generate(["--output", out, *common(prompts, tiny_policy),
                             "--reward-model", tiny_reward_model,
                             "--reward-model", tiny_reward_model + ",kind=pairwise",
                             "--price-per-hour", "2.5", "--write-candidates"]) == 0
        # the in-process stages ran on --torch-threads 1; the caller keeps its own setting
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)
    m = manifest(out)
    check_exact_counts(m, [("pointwise", "both-orders"), ("pairwise", "both-orders")])
    c = m["cost"]
    assert c["price_per_hour"] == 2.5
    assert math.isclose(c["busy_cost_usd"], c["busy_seconds"] / 3600 * 2.5)
    assert math.isclose(c["cost_per_1000_pairs"], c["busy_cost_usd"] / c["pairs"] * 1000)
    launcher = c["launcher"]
    assert math.isclose(launcher["wall_cost_usd"], launcher["wall_seconds"] / 3600 * 2.5)
    assert math.isclose(launcher["cost_per_1000_pairs"],
                        launcher["wall_cost_usd"] / c["pairs"] * 1000)
    # the console's last lines: the table, one line per stage, then pairs and the costs
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("cost: ")]
    assert len(lines) == 1 + len(ALL_STAGES) + 2
    assert [ln.split()[1] for ln in lines[1:-2]] == list(ALL_STAGES)  # in pipeline order
    assert "per 1,000" in lines[-1] and "at $2.5/h" in lines[-1]
    assert all(len(ln) <= 100 for ln in lines)

    # accounting only: the same run without a price writes the same records (run_id included)
    plain = str(tmp_path / "plain")
    assert generate(["--output", plain, *common(prompts, tiny_policy),
                     "--reward-model", tiny_reward_model,
                     "--reward-model", tiny_reward_model + ",kind=pairwise"]) == 0
    assert records(plain) == records(out)
    assert manifest(plain)["cost"]["cost_per_1000_pairs"] is None

    # rso select on the stored candidates: its own stages only, and its own last lines
    selected = str(tmp_path / "selected")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rso.select"):
        # --rescore off: rso select would otherwise inherit the store run's "--rescore on"
        assert select_main(["--candidates", out, "--output", selected, "--policy", tiny_policy,
                            "--num-samples", "2", "--rescore", "off",
                            "--price-per-hour", "1"]) == 0
    s = manifest(selected)["cost"]
    assert sorted(s["stages"]) == ["records", "select", "write"]
    assert s["reward_model_calls"] == [] and s["pairs"] == len(records(selected)) > 0
    assert math.isclose(s["cost_per_1000_pairs"], s["busy_seconds"] / 3600 / s["pairs"] * 1000)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("cost: ")]
    assert [ln.split()[1] for ln in lines[1:-2]] == ["select", "records", "write"]


@pytest.mark.slow
def test_cost_with_worker_processes(prompts, tiny_policy, tiny_reward_model, tmp_path):
    """Usage records travel as PCollections: they reach the manifest from worker processes."""
    out = str(tmp_path / "workers")
    assert generate(["--output", out, *common(prompts, tiny_policy),
                     "--reward-model", tiny_reward_model + ",kind=pairwise",
                     "--pairwise-debias", "random-flip",
                     "--runner", "DirectRunner", "--direct_num_workers", "2",
                     "--direct_running_mode", "multi_processing"]) == 0
    m = manifest(out)
    check_exact_counts(m, [("pairwise", "random-flip")])
    c = m["cost"]
    assert c["price_per_hour"] is None and c["busy_cost_usd"] is None
    assert c["cost_per_1000_pairs"] is None and c["launcher"]["cost_per_1000_pairs"] is None
    assert "resources only" in cost.format_lines(c)[-1]


# ---------------------------------------------------------------- pure parts
def usage(stage: str, part: str = "", **kw) -> cost.Usage:
    return cost.Usage(stage, part, **kw)


def test_cost_section_sums_parts_orders_stages_and_prices():
    config = {"num_candidates": 8, "num_samples": 4, "pairwise_debias": "random-flip",
              "price_per_hour": 3.6, "reward_model": [{"kind": "pointwise"},
                                                      {"kind": "pairwise"}]}
    section = cost.cost_section(config, [
        usage("write", wall_seconds=1.0, cpu_seconds=0.5),
        usage("reward", "1", wall_seconds=2.0, cpu_seconds=4.0, items=10, calls=7,
              sequences=70, tokens_in=700),
        usage("reward", "0", wall_seconds=1.0, cpu_seconds=1.0, items=10, calls=8,
              sequences=80, tokens_in=400),
        usage("generate", wall_seconds=6.0, cpu_seconds=11.0, items=10, batches=2, calls=2,
              sequences=80, tokens_in=50, tokens_out=600),
        usage("generate", wall_seconds=0.0, cpu_seconds=1.0),
    ], pairs=20)
    assert sorted(section["stages"]) == ["generate", "reward", "write"]
    assert [ln.split()[0] for ln in cost.format_lines(section)[1:4]] == [
        "generate", "reward", "write"]
    gen, rew = section["stages"]["generate"], section["stages"]["reward"]
    assert gen["cpu_seconds"] == 12.0 and gen["calls"] == 2 and gen["share"] == 0.6
    assert gen["tokens_per_second"] == 100.0  # generated tokens for decoding
    assert rew["calls"] == 15 and rew["sequences"] == 150
    assert rew["tokens_per_second"] == 1100 / 3.0  # tokens read for scoring
    assert section["busy_seconds"] == 10.0 and section["cpu_seconds"] == 17.5
    assert section["busy_cost_usd"] == pytest.approx(0.01)  # 10 s at $3.6/h
    assert section["cost_per_1000_pairs"] == pytest.approx(0.5)
    models = section["reward_model_calls"]
    assert [(r["model"], r["kind"], r["sequences_per_prompt"], r["expected_per_prompt"])
            for r in models] == [(0, "pointwise", 8.0, 8), (1, "pairwise", 7.0, 7)]
    assert models[1]["paper_per_prompt"] == 9.0  # N - 1 + k/2 = 7 + 2
    launcher = cost.launcher_section(section, wall_seconds=30.0, machines=4)
    assert launcher["wall_cost_usd"] == pytest.approx(0.12)  # 30 s x 4 machines at $3.6/h
    assert launcher["cost_per_1000_pairs"] == pytest.approx(6.0)
    assert cost.launcher_section(section, 30.0, None)["wall_cost_usd"] is None


def test_no_price_and_no_pairs_report_resources_only():
    section = cost.cost_section({}, [usage("select", wall_seconds=0.5)], pairs=0)
    assert section["busy_cost_usd"] is None and section["cost_per_1000_pairs"] is None
    priced = cost.cost_section({"price_per_hour": 1.0}, [usage("select", wall_seconds=0.5)],
                               pairs=0)
    assert priced["busy_cost_usd"] is not None and priced["cost_per_1000_pairs"] is None
    section["launcher"] = cost.launcher_section(section, 2.0, 1)
    lines = cost.format_lines(section)
    assert lines[1].split()[0] == "select" and "resources only" in lines[-1]
    assert "launcher wall 2.0 s x 1 machine(s)" in lines[-1]


def test_reward_calls_expected():
    assert cost.reward_calls_expected("pointwise", 64, 8, "both-orders") == (64, 64.0)
    assert cost.reward_calls_expected("pairwise", 64, 8, "random-flip") == (63, 67.0)
    assert cost.reward_calls_expected("pairwise", 64, 8, "both-orders") == (126, 134.0)


def test_record_counts_into_the_metered_block_of_this_thread_only():
    cost.record(calls=5)  # outside any block: nothing to count into, no error
    outer = cost.Usage("reward")
    with cost.metered(outer):
        cost.record(calls=1, sequences=3, tokens_in=30)
        inner = cost.Usage("rescore")
        with cost.metered(inner):
            cost.record(calls=2, tokens_out=7)
        cost.record(calls=1)
    assert (outer.calls, outer.sequences, outer.tokens_in, outer.tokens_out) == (2, 3, 30, 0)
    assert (inner.calls, inner.tokens_out) == (2, 7)
    assert outer.wall_seconds >= inner.wall_seconds >= 0 and outer.cpu_seconds >= 0


def test_metered_iter_passes_outputs_and_errors_through():
    u = cost.Usage("read")
    assert list(cost.metered_iter(lambda: iter([1, 2, 3]), u)) == [1, 2, 3]
    assert list(cost.metered_iter(lambda: None, u)) == []

    def failing():
        yield 1
        raise ValueError("bad")

    it = cost.metered_iter(failing, u)
    assert next(it) == 1
    with pytest.raises(ValueError, match="bad"):
        next(it)
    assert math.isfinite(u.wall_seconds) and u.wall_seconds >= 0


@pytest.mark.parametrize("args, machines", [
    ([], 1),
    (["--runner", "DirectRunner", "--direct_num_workers", "2"], 1),
    (["--runner=PortableRunner", "--environment_type=LOOPBACK"], 1),
    (["--runner", "PortableRunner", "--environment_type", "DOCKER"], None),
    (["--runner", "FlinkRunner"], None),
    (["--runner", "DataflowRunner", "--num_workers", "3", "--max_num_workers", "10"], 10),
    (["--runner=DataflowRunner", "--num_workers=3"], 3),
    (["--runner", "DataflowRunner"], None),
])
def test_machines_from_beam_args(args, machines):
    assert cost.machines_from_beam_args(args) == machines


def test_the_price_does_not_change_the_run_id(tmp_path, tiny_policy, tiny_reward_model):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    base = GenerateConfig(input=str(prompts), output=str(tmp_path / "o"), policy=tiny_policy,
                          reward_model=[RewardModelSpec(path=tiny_reward_model)])
    assert base.replace(price_per_hour=4.0).resolved_run_id() == base.resolved_run_id()
    from rso.config import ConfigError

    with pytest.raises(ConfigError, match="--price-per-hour"):
        base.replace(price_per_hour=-1.0)
