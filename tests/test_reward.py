"""Reward handlers and ScoreRewards (SPEC 2) on real tiny HF models and Beam's DirectRunner."""
from __future__ import annotations

import functools
import json
import math

import apache_beam as beam
import pytest
import torch
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.util import assert_that

from beam_pipelines.config import GenerateConfig, RewardModelSpec
from beam_pipelines.elements import Candidate, PromptCandidates, RenderedPrompt
from beam_pipelines.reward import ScoreRewards
from beam_pipelines.reward_handlers import (
    PairwiseRewardHandler,
    PointwiseRewardHandler,
    check_reward_model,
)
from beam_pipelines.seeding import prompt_rng
from rso.config import ConfigError
from rso.reward_input import pairwise_text, truncate_left
from rso.transcript import hh_transcript
from tests.tiny_models import _llama_config, build_tokenizer

# The tiny template, but raising (as Llama-2/Mistral templates do) when roles do not alternate.
STRICT_TEMPLATE = (
    "{% for m in messages %}{% if loop.index0 > 0 and m['role'] == "
    "messages[loop.index0 - 1]['role'] %}{{ raise_exception('roles must alternate') }}"
    "{% endif %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
POISON_WORD = "picture"  # its embedding is set to inf in the adversarial model


def build_classifier(out_dir: str, num_labels: int, seed: int, pad: bool = True) -> str:
    """A 2-layer Llama sequence classifier with the tiny tokenizer, saved to out_dir."""
    from transformers import LlamaForSequenceClassification

    tok = build_tokenizer(out_dir)
    if not pad:
        tok.pad_token = None
        tok.save_pretrained(out_dir)
    torch.manual_seed(seed)
    cfg = _llama_config(tok, num_labels=num_labels)
    if not pad:
        cfg.pad_token_id = None
    LlamaForSequenceClassification(cfg).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


@pytest.fixture(scope="module")
def pairwise_models(tmp_path_factory) -> dict[int, str]:
    """Pairwise classifiers with one output (sigmoid) and two outputs (softmax)."""
    return {n: build_classifier(str(tmp_path_factory.mktemp(f"pairwise{n}")), n, seed=10 + n)
            for n in (1, 2)}


@pytest.fixture(scope="module")
def adversarial_model(tiny_reward_model, tmp_path_factory) -> str:
    """The tiny reward model with an inf embedding for POISON_WORD (NaN reward for any text
    containing it, same rewards as the original otherwise) and a template that rejects
    non-alternating conversations."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = str(tmp_path_factory.mktemp("adversarial"))
    tok = AutoTokenizer.from_pretrained(tiny_reward_model)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model)
    with torch.no_grad():
        model.get_input_embeddings().weight[tok.convert_tokens_to_ids(POISON_WORD)] = math.inf
    tok.chat_template = STRICT_TEMPLATE
    tok.save_pretrained(out)
    model.save_pretrained(out, safe_serialization=True)
    return out


def config(**kw) -> GenerateConfig:
    return GenerateConfig(**kw)


def prompt(pid: str, messages, responses) -> PromptCandidates:
    rendered = RenderedPrompt(pid, prompt=hh_transcript(messages), prompt_token_ids=(4, 5),
                              messages=tuple(messages))
    return PromptCandidates(rendered, [Candidate(r, tuple(range(len(r.split()))), "stop", -1.0)
                                       for r in responses])


PROMPTS = [
    prompt("p1", [("user", "what is two plus two?")],
           ["two plus two is four", "four", "i do not know, please check", "two"]),
    prompt("p2", [("user", "tell me a joke."), ("assistant", "why?"), ("user", "the road")],
           ["to get to the other side of the road", "no"]),
    prompt("p3", [("system", "be kind"), ("user", "how do i bake bread?")],
           ["mix flour, water, salt and yeast, then knead and bake.", "bake it", "flour"]),
]


def load(path: str):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def forward(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def direct_pointwise(model, tok, messages, response: str) -> float:
    turns = [{"role": r, "content": c} for r, c in messages] + [
        {"role": "assistant", "content": response}]
    text = tok.apply_chat_template(turns, tokenize=False)
    return float(forward(model, tok(text, add_special_tokens=False)["input_ids"])[0])


def direct_pairwise_score(model, tok, pc: PromptCandidates, a: int, b: int) -> float:
    """logit P(A better than B): z for one output, log(p1 / p0) of the softmax for two."""
    text = pairwise_text(hh_transcript(pc.prompt.messages), pc.candidates[a].text,
                         pc.candidates[b].text)
    z = forward(model, tok(text)["input_ids"])
    if z.numel() == 1:
        return float(z[0])
    p = torch.softmax(z.double(), -1)
    return float(torch.log(p[1] / p[0]))


def rewards_of(handler, batch, loaded) -> list[list[float]]:
    out = list(handler.run_inference(batch, loaded))
    assert [r.example for r in out] == list(batch)
    return [r.inference for r in out]


# ------------------------------------------------------------------------------ pure helpers
def test_truncate_left_drops_oldest_context_then_response():
    ids = list(range(10))  # head [0], context 1..5, response 6..9
    assert truncate_left(ids, 1, 6, 10) == (ids, False, False)
    assert truncate_left(ids, 1, 6, 7) == ([0, 4, 5, 6, 7, 8, 9], True, False)
    assert truncate_left(ids, 1, 6, 4) == ([0, 7, 8, 9], True, True)


# ------------------------------------------------------------------------------ pointwise
def test_pointwise_equals_direct_forward_and_ignores_batch_composition(tiny_reward_model):
    spec = RewardModelSpec(path=tiny_reward_model)
    handler = PointwiseRewardHandler(spec, config(reward_batch_size=3))
    loaded = handler.load_model()
    rewards = rewards_of(handler, PROMPTS, loaded)

    model, tok = load(tiny_reward_model)
    for pc, rs in zip(PROMPTS, rewards):
        assert len(rs) == len(pc.candidates)
        for cand, r in zip(pc.candidates, rs):
            assert r == pytest.approx(direct_pointwise(model, tok, pc.prompt.messages,
                                                       cand.text), abs=1e-5)
    assert len({round(r, 4) for rs in rewards for r in rs}) > 5  # a real, varying model

    one_by_one = PointwiseRewardHandler(spec, config(reward_batch_size=1))
    reversed_batch = rewards_of(one_by_one, PROMPTS[::-1], loaded)[::-1]
    alone = [rewards_of(handler, [pc], loaded)[0] for pc in PROMPTS]
    for other in (reversed_batch, alone):
        for rs, rs2 in zip(rewards, other):
            assert rs2 == pytest.approx(rs, abs=1e-5)


@pytest.mark.parametrize("kind", ["pointwise", "pairwise"])
def test_rewards_are_bit_identical_alone_and_in_any_batch(kind, tiny_reward_model,
                                                          pairwise_models):
    """Issue 8 item 5: a prompt's rewards must not depend on which other prompts share its
    Beam batch (bundle timing); compared with ==, not approx."""
    path = tiny_reward_model if kind == "pointwise" else pairwise_models[2]
    cfg = config(reward_batch_size=3, seed=3)
    handler = (PointwiseRewardHandler if kind == "pointwise" else PairwiseRewardHandler)(
        RewardModelSpec(path=path, kind=kind), cfg)
    loaded = handler.load_model()
    alone = [rewards_of(handler, [pc], loaded)[0] for pc in PROMPTS]
    together = rewards_of(handler, PROMPTS, loaded)
    shuffled = rewards_of(handler, [PROMPTS[2], PROMPTS[0], PROMPTS[1]], loaded)
    assert together == alone
    assert shuffled == [alone[2], alone[0], alone[1]]


def test_pointwise_truncates_the_oldest_context_and_keeps_the_response(tiny_reward_model):
    handler = PointwiseRewardHandler(RewardModelSpec(path=tiny_reward_model),
                                     config(reward_max_length=12))
    loaded = handler.load_model()
    assert loaded.max_length == 12
    long_prompt = " ".join(["water"] * 30)
    pc = prompt("long", [("user", long_prompt)], ["two is four", "two " * 14])
    (rewards,) = rewards_of(handler, [pc], loaded)

    model, tok = load(tiny_reward_model)
    for cand, r in zip(pc.candidates, rewards):
        text = tok.apply_chat_template([{"role": "user", "content": long_prompt},
                                        {"role": "assistant", "content": cand.text}],
                                       tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) > 12  # no leading special token in this template: keep the last 12
        assert r == pytest.approx(float(forward(model, ids[-12:])[0]), abs=1e-5)
    plan = handler._plan(pc, loaded)
    assert (plan.truncated, plan.response_truncated) == (2, 1)  # the 14-word response is cut


def test_missing_pad_token_pads_with_eos(tmp_path):
    path = build_classifier(str(tmp_path), 1, seed=3, pad=False)
    handler = PointwiseRewardHandler(RewardModelSpec(path=path), config(reward_batch_size=4))
    loaded = handler.load_model()
    eos = loaded.tokenizer.eos_token_id
    assert loaded.pad_id == eos and loaded.model.config.pad_token_id == eos
    batch = PROMPTS[:2]
    rewards = rewards_of(handler, batch, loaded)  # batches of mixed lengths, padded with eos
    model, tok = load(path)
    model.config.pad_token_id = eos
    for pc, rs in zip(batch, rewards):
        for cand, r in zip(pc.candidates, rs):
            assert r == pytest.approx(direct_pointwise(model, tok, pc.prompt.messages,
                                                       cand.text), abs=1e-5)


def test_wrong_number_of_outputs_fails_at_start(pairwise_models, tiny_reward_model):
    two = pairwise_models[2]
    with pytest.raises(ConfigError, match="num_labels"):
        ScoreRewards(config(), [RewardModelSpec(path=tiny_reward_model),
                                RewardModelSpec(path=two, kind="pointwise")])
    with pytest.raises(ConfigError, match="num_labels"):
        PointwiseRewardHandler(RewardModelSpec(path=two), config()).load_model()
    check_reward_model(RewardModelSpec(path=two, kind="pairwise"))  # fine for pairwise
    with pytest.raises(ConfigError, match="weight"):
        ScoreRewards(config(), [RewardModelSpec(path=tiny_reward_model, weight=math.inf)])


# ------------------------------------------------------------------------------ pairwise
@pytest.mark.parametrize("num_labels", [1, 2])
def test_pairwise_both_orders_against_a_seeded_baseline(pairwise_models, num_labels):
    path = pairwise_models[num_labels]
    handler = PairwiseRewardHandler(RewardModelSpec(path=path, kind="pairwise"),
                                    config(seed=7, reward_batch_size=3))
    loaded = handler.load_model()
    rewards = rewards_of(handler, PROMPTS, loaded)
    model, tok = load(path)
    for pc, rs in zip(PROMPTS, rewards):
        n = len(pc.candidates)
        b = int(prompt_rng(7, pc.prompt.prompt_id, "pairwise-baseline").integers(n))
        assert rs[b] == 0.0
        for i in range(n):
            if i != b:
                expected = (direct_pairwise_score(model, tok, pc, i, b)
                            - direct_pairwise_score(model, tok, pc, b, i)) / 2
                assert rs[i] == pytest.approx(expected, abs=1e-5)
        assert any(abs(r) > 1e-4 for r in rs)

    # Antisymmetry: swapping which response is the baseline negates the reward.
    pc = PROMPTS[1]  # two candidates
    b = int(prompt_rng(7, "p2", "pairwise-baseline").integers(2))
    swapped = PromptCandidates(pc.prompt, pc.candidates[::-1])
    (r_swapped,) = rewards_of(handler, [swapped], loaded)
    assert r_swapped[1 - b] == pytest.approx(-rewards[1][1 - b], abs=1e-5)
    # Identical responses score exactly 0 in both orders.
    same = PromptCandidates(pc.prompt, [pc.candidates[0], pc.candidates[0]])
    assert rewards_of(handler, [same], loaded) == [[0.0, 0.0]]


def test_pairwise_is_deterministic_in_the_seed(pairwise_models):
    spec = RewardModelSpec(path=pairwise_models[1], kind="pairwise")
    seed7 = PairwiseRewardHandler(spec, config(seed=7))
    loaded = seed7.load_model()
    first = rewards_of(seed7, PROMPTS, loaded)
    again = rewards_of(PairwiseRewardHandler(spec, config(seed=7, reward_batch_size=1)),
                       PROMPTS, loaded)
    for rs, rs2 in zip(first, again):
        assert rs2 == pytest.approx(rs, abs=1e-5)
    baselines = {s: [int(prompt_rng(s, pc.prompt.prompt_id, "pairwise-baseline")
                         .integers(len(pc.candidates))) for pc in PROMPTS] for s in (7, 8)}
    assert baselines[7] != baselines[8]
    second = rewards_of(PairwiseRewardHandler(spec, config(seed=8)), PROMPTS, loaded)
    for rs, bs in ((first, baselines[7]), (second, baselines[8])):
        assert [rs_p.index(0.0) if 0.0 in rs_p else None for rs_p in rs] == bs
    assert second != first


def test_pairwise_random_flip_scores_one_seeded_order(pairwise_models):
    path = pairwise_models[1]
    handler = PairwiseRewardHandler(RewardModelSpec(path=path, kind="pairwise"),
                                    config(seed=3, pairwise_debias="random-flip"))
    rewards = rewards_of(handler, PROMPTS, handler.load_model())
    model, tok = load(path)
    orders = set()
    for pc, rs in zip(PROMPTS, rewards):
        n = len(pc.candidates)
        b = int(prompt_rng(3, pc.prompt.prompt_id, "pairwise-baseline").integers(n))
        flips = prompt_rng(3, pc.prompt.prompt_id, "pairwise-flip").random(n) < 0.5
        for i in range(n):
            if i == b:
                assert rs[i] == 0.0
                continue
            orders.add(bool(flips[i]))
            expected = (-direct_pairwise_score(model, tok, pc, b, i) if flips[i]
                        else direct_pairwise_score(model, tok, pc, i, b))
            assert rs[i] == pytest.approx(expected, abs=1e-5)
    assert orders == {True, False}  # both orders occurred


# ------------------------------------------------------------------------------ ScoreRewards
_CAPTURED: dict[str, list] = {}


def _capture(name: str, actual) -> None:
    """An assert_that matcher recording what reached it (the DirectRunner runs in-process)."""
    _CAPTURED[name] = list(actual)


def run_pipeline(elements, transform):
    """Runs ``elements | transform`` on the DirectRunner; returns (main as a dict by prompt id,
    dead letters, "rso" counters)."""
    _CAPTURED.clear()
    p = beam.Pipeline()
    out = p | beam.Create([(pc.prompt.prompt_id, pc) for pc in elements]) | transform
    assert_that(out.main, functools.partial(_capture, "main"), label="main")
    assert_that(out.dead_letters, functools.partial(_capture, "dead"), label="dead")
    result = p.run()
    result.wait_until_finish()
    counters: dict[str, int] = {}  # summed over the steps that report each name
    for c in result.metrics().query(MetricsFilter().with_namespace("rso"))["counters"]:
        counters[c.key.metric.name] = counters.get(c.key.metric.name, 0) + c.committed
    return dict(_CAPTURED["main"]), _CAPTURED["dead"], counters


def test_score_rewards_weighted_sum_and_truncation_counter(tiny_reward_model, pairwise_models):
    long_pc = prompt("long", [("user", " ".join(["water"] * 40))], ["two is four", "no", "two"])
    elements = PROMPTS + [long_pc]
    cfg = config(seed=5, reward_max_length=40, reward_batch_size=4, reward_prompts_per_batch=2)
    specs = [RewardModelSpec(path=tiny_reward_model, weight=0.5),
             RewardModelSpec(path=pairwise_models[1], weight=-2.0, kind="pairwise")]
    r1, r2 = [], []
    for spec, out in zip(specs, (r1, r2)):
        handler = PointwiseRewardHandler(spec, cfg) if spec.kind == "pointwise" else \
            PairwiseRewardHandler(spec, cfg)
        loaded = handler.load_model()
        out += rewards_of(handler, elements, loaded)
        # Only the long prompt exceeds 40 tokens.
        assert [handler._plan(pc, loaded).truncated for pc in elements] == \
            [0, 0, 0, len(handler._plan(long_pc, loaded).sequences)]

    main, dead, counters = run_pipeline(elements, ScoreRewards(cfg, specs))
    assert dead == []
    assert sorted(main) == sorted(pc.prompt.prompt_id for pc in elements)
    for pc, a, b in zip(elements, r1, r2):
        got = main[pc.prompt.prompt_id]
        assert got.prompt == pc.prompt
        assert [c.text for c in got.candidates] == [c.text for c in pc.candidates]
        assert [c.reward for c in got.candidates] == pytest.approx(
            [0.5 * x - 2.0 * y for x, y in zip(a, b)], abs=1e-5)
    assert all(c.reward is None for pc in elements for c in pc.candidates)  # inputs untouched
    assert counters.get("reward_truncated") == 3 + 2 * 2  # 3 pointwise + 2 x 2 pairwise
    assert "dead_letter_non_finite_reward" not in counters
    assert "dead_letter_reward_failed" not in counters


def test_non_finite_rewards_and_failures_become_dead_letters(tiny_reward_model,
                                                             adversarial_model):
    ok1 = prompt("ok1", [("user", "what is two plus two?")],
                 ["two is four", f"a {POISON_WORD} of bread", "four"])
    bad = prompt("bad", [("user", "hello"), ("user", "are you there?")], ["yes", "no"])
    ok2 = prompt("ok2", [("user", "tell me a joke.")], ["why did the chicken cross", "no"])
    cfg = config(reward_batch_size=2)
    clean = PointwiseRewardHandler(RewardModelSpec(path=tiny_reward_model), cfg)
    expected = rewards_of(clean, [ok1, ok2], clean.load_model())

    main, dead, counters = run_pipeline(
        [ok1, bad, ok2], ScoreRewards(cfg, [RewardModelSpec(path=adversarial_model)]))

    assert sorted(main) == ["ok1", "ok2"]
    assert [c.text for c in main["ok1"].candidates] == ["two is four", "four"]
    assert [c.reward for c in main["ok1"].candidates] == pytest.approx(
        [expected[0][0], expected[0][2]], abs=1e-5)
    assert [c.reward for c in main["ok2"].candidates] == pytest.approx(expected[1], abs=1e-5)

    by_reason = {d.reason: d for d in dead}
    assert sorted(by_reason) == ["non_finite_reward", "reward_failed"] and len(dead) == 2
    nf = by_reason["non_finite_reward"]
    assert (nf.stage, nf.prompt_id) == ("reward", "ok1")
    assert nf.input == {"text": f"a {POISON_WORD} of bread", "token_ids": [0, 1, 2, 3],
                        "reward": "nan"}
    failed = by_reason["reward_failed"]
    assert (failed.stage, failed.prompt_id) == ("reward", "bad")
    assert "roles must alternate" in failed.detail
    assert [c["text"] for c in failed.input["candidates"]] == ["yes", "no"]
    assert "NaN" not in nf.to_json() and json.loads(nf.to_json())["input"]["reward"] == "nan"
    assert counters["dead_letter_non_finite_reward"] == 1
    assert counters["dead_letter_reward_failed"] == 1
