"""The manifest adds up and says what selection did (docs/SELECTION.md).

Unit checks of the combiners and sections on hand-made summaries, then the real pipeline
(Beam FnApiRunner, transformers engine, tiny models built offline) on a mixed input: blank
lines, bad JSON, a duplicate prompt_id, a prompt too long to render, a reward model that gives
NaN for one prompt, and --max-prompts leaving prompts out. Every input record, candidate and
pair must be accounted for.
"""
from __future__ import annotations

import glob
import json
import math
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from beam_pipelines import manifest as M
from beam_pipelines import sampling
from beam_pipelines.config import GenerateConfig
from beam_pipelines.elements import (
    Candidate,
    DeadLetter,
    PromptCandidates,
    PromptSummary,
    RenderedPrompt,
)
from beam_pipelines.seeding import prompt_rng
from beam_pipelines.selection import select_and_pair


def summary(pid, cands, acc, rounds, beta=0.5, pairs=1) -> PromptSummary:
    return PromptSummary(pid, len(cands), len(cands), 0, len(acc), False, list(cands),
                         list(acc), pairs, 0, 10, beta=beta, selection_rounds=rounds)


SUMMARIES = [
    summary("a", [0.0, 1.0, 2.0, 3.0], [3.0, 2.0], [(4, 1), (2, 1)]),      # top-k
    summary("b", [0.0, 1.0, 2.0, 3.0], [0.0, 3.0], [(4, 2)], beta=2.0),    # gain 0
    summary("c", [1.0, 1.0, 1.0], [1.0, 1.0], [(3, 2)]),                   # no spread
    summary("d", [5.0], [5.0], [(1, 1)], pairs=0),                         # all kept
]


def totals(summaries=SUMMARIES, split=2) -> dict:
    fn = M.SummaryTotalsFn()
    accs = []
    for part in (summaries[:split], summaries[split:]):  # merging must not change the result
        acc = fn.create_accumulator()
        for s in part:
            acc = fn.add_input(acc, s)
        accs.append(acc)
    return fn.extract_output(fn.merge_accumulators(accs))


def test_selection_section_by_hand():
    t = totals()
    assert t == totals(split=0) == totals(split=4)
    sel = M.selection_section({"selection": "rso", "beta": 0.5, "beta_scale": "std"}, t,
                              {"candidate": {"mean": 1.5}, "accepted": {"mean": 2.0}})
    assert sel["beta_scale"] == "std" and sel["beta"] == 0.5
    assert sel["beta_used"]["min"] == 0.5 and sel["beta_used"]["max"] == 2.0
    assert sel["beta_used"]["count"] == 4
    # Per prompt gains: a 1.0, b 0.0, c 0.0, d 0.0.
    assert sel["mean_reward_gain"] == pytest.approx(0.25) and sel["prompts_with_accepted"] == 4
    assert sel["pooled_reward_gain"] == pytest.approx(0.5)
    assert sel["decisive_prompts"] == 2  # a and b; c has no spread, d kept everything
    assert sel["mean_relative_gain"] == pytest.approx(0.5)  # (1 + 0) / 2
    assert sel["mean_standardized_gain"] == pytest.approx(1 / math.sqrt(1.25) / 2)
    assert sel["equals_top_k_fraction"] == 0.5 and sel["like_random_fraction"] == 1.0
    assert sel["acceptance_by_round"] == [
        {"round": 1, "visited": 12, "accepted": 6, "rate": 0.5},
        {"round": 2, "visited": 2, "accepted": 1, "rate": 0.5}]


def test_selection_section_without_prompts():
    sel = M.selection_section({}, totals([]), {})
    assert sel["mean_reward_gain"] is None and sel["equals_top_k_fraction"] is None
    assert sel["acceptance_by_round"] == [] and sel["beta_scale"] == "none"
    assert sel["beta_used"]["count"] == 0


def test_summary_values_have_the_per_prompt_series():
    values = list(M.summary_values(SUMMARIES[0]))
    assert ("prompt_reward_std", pytest.approx(math.sqrt(1.25))) in values
    assert ("prompt_accepted_gain", 1.0) in values
    assert M.histogram_group("prompt_reward_std") == "prompt_reward_std"
    assert M.histogram_group("chosen") == M.histogram_group("candidate") == "reward"


def _dead(stage, reason, n=1, inp=None):
    return [DeadLetter(stage, reason, "", None, inp)] * n


def test_accounting_identities_and_a_broken_one():
    fn = M.CountByFn()
    acc = fn.create_accumulator()
    dead = (_dead("read", "invalid_json", 2) + _dead("read", "duplicate_prompt_id")
            + _dead("render", "prompt_too_long")
            + _dead("reward", "reward_failed", 1, {"prompt": "x", "candidates": [{}] * 6})
            + _dead("reward", "non_finite_reward", 2) + _dead("write", "invalid_record"))
    for d in dead:
        acc = fn.add_input(acc, d)
    dl = fn.extract_output(fn.merge_accumulators([acc, fn.create_accumulator()]))
    assert dl["candidates"] == 8 and dl["by_stage_reason"]["reward/reward_failed"] == 1
    t = totals()  # 4 prompts selected, 12 candidates, 7 accepted, 3 pairs
    counts = {"input_records": 12, "blank_lines": 2, "prompts_not_in_shard": 1,
              "prompts_read": 6, "candidates_generated": 20, "records_built": 3}
    a = M.accounting_section({"selection": "rso"}, t, dl, 2, counts)
    assert a["inputs"] == {"input_records": 12, "prompts_read": 6, "read_dead_letters": 3,
                           "blank_lines": 2, "prompts_not_in_shard": 1, "balanced": True,
                           "corrupt_input_files": 0}
    assert a["prompts"]["balanced"] and a["prompts"]["reward_dead_letters"] == 1
    assert a["candidates"] == {"generated": 20, "accepted": 7, "rejected_by_selection": 5,
                               "duplicates": 0, "dead_lettered": 8, "balanced": True}
    assert a["pairs"]["made"] == 3 and a["pairs"]["lost_after_selection"] == 0
    assert a["pairs"]["balanced"] and a["balanced"]
    broken = M.accounting_section({"selection": "rso"}, t, dl, 2,
                                  {**counts, "input_records": 13})
    assert broken["inputs"]["balanced"] is False and broken["balanced"] is False
    missing = M.accounting_section({}, t, dl, 2, {})
    assert missing["inputs"]["balanced"] is None and missing["balanced"] is False
    # best-of-n: one SFT target per accepted response.
    bon = M.accounting_section({"selection": "best-of-n"}, t, dl, 6,
                               {**counts, "records_built": 7})
    assert bon["pairs"]["unit"] == "sft_targets" and bon["pairs"]["made"] == 7
    assert bon["pairs"]["balanced"]


def _group(rewards) -> PromptCandidates:
    prompt = RenderedPrompt("p", "x", (1, 2))
    return PromptCandidates(prompt, [Candidate(f"r{i}", (i,), "stop", -1.0, float(r))
                                     for i, r in enumerate(rewards)])


@pytest.mark.parametrize("scale", ["none", "std"])
def test_select_and_pair_records_the_beta_it_used(scale):
    rewards = np.random.default_rng(0).normal(scale=0.25, size=8)
    config = GenerateConfig(num_candidates=8, num_samples=4, beta=0.5, beta_scale=scale)
    group, s = select_and_pair(_group(rewards), config)
    want = 0.5 * float(np.std(rewards)) if scale == "std" else 0.5
    assert s.beta == pytest.approx(want) and group.beta == s.beta
    kept, rounds = sampling.rejection_sampling_rounds(rewards, 4, want,
                                                      prompt_rng(0, "p", "select"))
    assert [c.text for c in group.candidates] == [f"r{i}" for i in kept]
    assert s.selection_rounds == [tuple(r) for r in rounds]
    from beam_pipelines.records import pair_records

    records = pair_records(group, config, "run", "pol", "rm")
    assert records and all(r["beta"] == s.beta for r in records)


# ---------------------------------------------------------------- the real pipeline
# The tiny reward model that returns NaN for any text containing POISON_WORD (shared fixture).
from tests.test_pipeline_e2e import POISON_WORD, poisoned_rm  # noqa: E402,F401

VALID = [{"prompt_id": f"v{i}", "prompt": text} for i, text in enumerate([
    "How do I bake bread?", "What is the capital of France?", "Tell me a joke.",
    "How can I stay safe online?", "What is two plus two?"])]
LINES = [json.dumps(r).encode() for r in VALID] + [
    b"",                                                                  # blank
    b"   ",                                                               # blank
    b'{"prompt": "unterminated',                                          # invalid_json
    json.dumps({"prompt_id": "v0", "prompt": "Is it going to rain today?"}).encode(),  # dup id
    json.dumps({"prompt_id": "long", "prompt": " ".join(["water"] * 80)}).encode(),
    json.dumps({"prompt_id": "nan", "prompt": f"Draw a {POISON_WORD} of a house"}).encode(),
]
N, K = 6, 4


@pytest.fixture(scope="module")
def mixed_run(tiny_policy, poisoned_rm, tmp_path_factory):  # noqa: F811
    from beam_pipelines.pipeline import main as generate

    base = tmp_path_factory.mktemp("mixed")
    inputs = str(base / "in.jsonl")
    with open(inputs, "wb") as f:
        f.write(b"\n".join(LINES) + b"\n")
    out = str(base / "out")
    # 7 distinct prompt ids (v0..v4, long, nan; the second v0 is a duplicate): --max-prompts 6
    # leaves out the one with the largest shard key, v1 for seed 3.
    assert generate(["--input", inputs, "--output", out, "--policy", tiny_policy,
                     "--reward-model", poisoned_rm, "--engine", "transformers",
                     "--num-candidates", str(N), "--num-samples", str(K),
                     "--max-new-tokens", "3", "--max-model-len", "40", "--max-prompts", "6",
                     "--beta-scale", "std", "--seed", "3"]) == 0
    with open(os.path.join(out, "manifest.json")) as f:
        m = json.load(f)
    dead = [json.loads(line) for p in glob.glob(os.path.join(out, "dead_letter-*.jsonl"))
            for line in open(p)]
    rows = [r for p in glob.glob(os.path.join(out, "pairs-*.parquet"))
            for r in pq.read_table(p).to_pylist()]
    return m, dead, rows


@pytest.mark.slow
def test_the_manifest_accounts_for_every_input_candidate_and_pair(mixed_run):
    m, dead, rows = mixed_run
    a = m["accounting"]
    assert a["balanced"] is True, json.dumps(a, indent=1)
    reasons = sorted(d["reason"] for d in dead if d["stage"] in ("read", "render"))
    assert reasons == ["duplicate_prompt_id", "invalid_json", "prompt_too_long"]
    assert "v1" not in {r["prompt_id"] for r in rows}
    inputs = a["inputs"]
    assert inputs["input_records"] == len(LINES) == 11
    assert inputs["blank_lines"] == 2 and inputs["read_dead_letters"] == 2
    # 7 distinct ids, 6 kept by --max-prompts.
    assert inputs["prompts_not_in_shard"] == 1 and inputs["prompts_read"] == 6
    assert (inputs["prompts_read"] + inputs["read_dead_letters"] + inputs["blank_lines"]
            + inputs["prompts_not_in_shard"]) == inputs["input_records"]
    p = a["prompts"]
    assert p["prompts_read"] == p["selected"] + p["render_dead_letters"] + \
        p["generate_dead_letters"] + p["reward_dead_letters"]
    c = a["candidates"]
    assert c["generated"] == N * (p["selected"] + p["reward_dead_letters"])
    assert c["generated"] == c["accepted"] + c["rejected_by_selection"] + c["duplicates"] + \
        c["dead_lettered"]
    nan_dead = [d for d in dead if d["reason"] == "non_finite_reward"]
    assert c["dead_lettered"] == len(nan_dead)
    assert len([d for d in nan_dead if d["prompt_id"] == "nan"]) == N  # all its candidates
    pairs = a["pairs"]
    assert pairs["made"] == pairs["written"] == len(rows) == m["counters"]["pairs"]
    assert pairs["lost_after_selection"] == 0 and pairs["invalid_records"] == 0


@pytest.mark.slow
def test_the_manifest_says_what_selection_did(mixed_run):
    m, _, rows = mixed_run
    sel = m["selection"]
    assert sel["method"] == "rso" and sel["beta_scale"] == "std" and sel["beta"] == 0.5
    rounds = sel["acceptance_by_round"]
    assert rounds and sum(r["accepted"] for r in rounds) == m["counters"]["accepted"]
    assert all(0 < r["rate"] <= 1 and r["accepted"] <= r["visited"] for r in rounds)
    spread = m["reward_statistics"]["prompt_reward_std"]
    # One value per prompt with candidates: every prompt but "nan" (all its rewards were NaN).
    assert spread["count"] == m["counters"]["prompts"] - 1 == sel["beta_used"]["count"]
    # Under --beta-scale std a record's beta is 0.5 * its prompt's reward std.
    used = sel["beta_used"]
    assert used["min"] == pytest.approx(0.5 * spread["min"])
    assert used["max"] == pytest.approx(0.5 * spread["max"])
    for r in rows:
        assert used["min"] - 1e-12 <= r["beta"] <= used["max"] + 1e-12
    assert sel["decisive_prompts"] <= m["counters"]["prompts"]
    for name in ("equals_top_k_fraction", "like_random_fraction"):
        assert sel[name] is None or 0 <= sel[name] <= 1


def test_acceptance_plot_has_the_rounds_panel():
    import io

    from PIL import Image

    from beam_pipelines.plots import render_plots

    doc = {"acceptance": {"prompts_by_num_accepted": {"2": 3, "1": 1}},
           "selection": M.selection_section({"selection": "rso", "beta": 0.5}, totals(), {})}
    with_rounds = Image.open(io.BytesIO(render_plots(doc)["acceptance.png"]))
    without = Image.open(io.BytesIO(render_plots({})["acceptance.png"]))
    assert with_rounds.size[0] > without.size[0]  # the second panel
