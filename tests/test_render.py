"""Prompt rendering: chat template vs plain text, errors, token ids, the Beam DoFn."""
from __future__ import annotations

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from transformers import AutoTokenizer

from beam_pipelines.config import GenerateConfig
from beam_pipelines.elements import DeadLetter, PromptInput, RenderedPrompt
from beam_pipelines.render import (
    PromptError,
    RenderPrompts,
    context_length,
    max_prompt_tokens,
    new_token_budget,
    render_prompt,
)
from rso.transcript import hh_transcript

CONVERSATION = (("user", "How do I bake bread?"), ("assistant", "Mix flour and water."),
                ("user", "What then?"))


@pytest.fixture(scope="module")
def tok(tiny_policy):
    return AutoTokenizer.from_pretrained(tiny_policy)


@pytest.fixture()
def plain_tok(tiny_policy):
    t = AutoTokenizer.from_pretrained(tiny_policy)
    t.chat_template = None
    return t


def test_messages_use_the_chat_template(tok):
    r = render_prompt(tok, "p1", None, CONVERSATION, 255)
    expected_text = tok.apply_chat_template([{"role": a, "content": b} for a, b in CONVERSATION],
                                            tokenize=False, add_generation_prompt=True)
    expected_ids = tok.apply_chat_template([{"role": a, "content": b} for a, b in CONVERSATION],
                                           tokenize=True, add_generation_prompt=True,
                                           return_dict=False)
    assert r.prompt == expected_text
    assert r.prompt.endswith("<|assistant|>")
    assert r.prompt_token_ids == tuple(expected_ids)
    assert r.prompt_token_ids[-1] == tok.convert_tokens_to_ids("<|assistant|>")
    assert r.messages == CONVERSATION
    assert r.prompt_id == "p1"


def test_plain_prompt_is_used_verbatim(tok):
    text = "Human: what is two plus two?\n\nAssistant:"
    r = render_prompt(tok, "p2", text, None, 255)
    assert r.prompt == text
    assert r.prompt_token_ids == tuple(tok(text)["input_ids"])
    assert r.messages == (("user", text),)


def test_no_chat_template_falls_back_to_plain_transcript(plain_tok):
    r = render_prompt(plain_tok, "p3", None, CONVERSATION, 255)
    assert r.prompt == ("Human: How do I bake bread?\n\nAssistant: Mix flour and water.\n\n"
                        "Human: What then?\n\nAssistant:")
    assert r.prompt == hh_transcript(CONVERSATION, open_assistant_turn=True)
    assert r.prompt_token_ids == tuple(plain_tok(r.prompt)["input_ids"])
    assert r.messages == CONVERSATION


@pytest.mark.parametrize("prompt,messages,reason", [
    ("", None, "empty_prompt"),
    ("  \n ", None, "empty_prompt"),
    (None, (("user", " "),), "empty_prompt"),
    (None, (), "empty_prompt"),
    (None, None, "invalid_prompt"),
    ("hi", (("user", "hi"),), "invalid_prompt"),
    (None, (("user",),), "invalid_prompt"),
])
def test_bad_prompts_raise_prompt_error(tok, prompt, messages, reason):
    with pytest.raises(PromptError) as e:
        render_prompt(tok, "x", prompt, messages, 255)
    assert e.value.reason == reason


def test_prompt_length_limit_is_context_minus_one(tok, tiny_policy):
    limit = max_prompt_tokens(context_length(tiny_policy))
    assert limit == 255  # the tiny model has 256 positions
    fits = " ".join(["water"] * limit)
    assert len(render_prompt(tok, "a", fits, None, limit).prompt_token_ids) == limit
    with pytest.raises(PromptError) as e:
        render_prompt(tok, "b", fits + " water", None, limit)
    assert e.value.reason == "prompt_too_long"
    assert "256 tokens > 255" in e.value.detail


def test_context_length_and_new_token_budget(tiny_policy):
    assert context_length(tiny_policy) == 256
    assert context_length(tiny_policy, max_model_len=64) == 64
    assert new_token_budget(prompt_len=10, max_new_tokens=16, max_model_len=256) == 16
    assert new_token_budget(prompt_len=250, max_new_tokens=16, max_model_len=256) == 6
    assert new_token_budget(prompt_len=255, max_new_tokens=16, max_model_len=256) == 1


class Collect(beam.DoFn):
    """Appends a PCollection's elements to ``Collect.sink[name]`` (the DirectRunner runs
    in-process; a module-level class is pickled by reference, so the sink is this one)."""
    sink: dict[str, list] = {}

    def __init__(self, name: str):
        self._name = name
        Collect.sink[name] = []

    def process(self, element):
        Collect.sink[self._name].append(element)


def _collect(name):
    return beam.ParDo(Collect(name))


def test_render_prompts_transform_routes_failures_to_dead_letters(tiny_policy):
    inputs = [
        PromptInput("good-chat", messages=CONVERSATION, source="f.jsonl:1"),
        PromptInput("good-plain", prompt="tell me a joke", source="f.jsonl:2"),
        PromptInput("empty", prompt="   ", source="f.jsonl:3"),
        PromptInput("long", prompt=" ".join(["water"] * 300), source="f.jsonl:4"),
    ]
    config = GenerateConfig(policy=tiny_policy)
    p = beam.Pipeline(runner="DirectRunner")
    out = p | beam.Create(inputs) | RenderPrompts(config)
    _ = out.main | "CollectRendered" >> _collect("rendered")
    _ = out.dead_letters | "CollectDead" >> _collect("dead")
    result = p.run()
    result.wait_until_finish()

    rendered = {r.prompt_id: r for r in Collect.sink["rendered"]}
    assert set(rendered) == {"good-chat", "good-plain"}
    assert all(isinstance(r, RenderedPrompt) for r in rendered.values())
    assert rendered["good-plain"].prompt == "tell me a joke"
    dead = {d.prompt_id: d for d in Collect.sink["dead"]}
    assert set(dead) == {"empty", "long"}
    assert all(isinstance(d, DeadLetter) and d.stage == "render" for d in dead.values())
    assert dead["empty"].reason == "empty_prompt"
    assert dead["long"].reason == "prompt_too_long"
    assert dead["long"].input["source"] == "f.jsonl:4"
    assert '"reason": "prompt_too_long"' in dead["long"].to_json()

    def counter(name):
        res = result.metrics().query(MetricsFilter().with_namespace("rso").with_name(name))
        return sum(c.committed for c in res["counters"])

    assert counter("prompts_rendered") == 2
    assert counter("dead_letter_empty_prompt") == 1
    assert counter("dead_letter_prompt_too_long") == 1


def test_every_render_failure_reason_is_documented():
    import re

    from beam_pipelines import prompts, render

    raised = set(re.findall(r'PromptError\("([a-z_]+)"', open(render.__file__).read()))
    assert raised and raised <= set(prompts.REASONS)


def test_lone_surrogate_is_an_unexpected_error_dead_letter_that_can_be_written(tiny_policy):
    """Valid JSON can hold a lone UTF-16 surrogate; the tokenizer raises TypeError on it."""
    import json

    inputs = [PromptInput("s1", prompt="broken \ud83d emoji"), PromptInput("ok", prompt="hi")]
    p = beam.Pipeline(runner="DirectRunner")
    out = p | beam.Create(inputs) | RenderPrompts(GenerateConfig(policy=tiny_policy))
    _ = out.main | "CollectRendered" >> _collect("rendered_s")
    _ = out.dead_letters | "CollectDead" >> _collect("dead_s")
    p.run().wait_until_finish()

    assert [r.prompt_id for r in Collect.sink["rendered_s"]] == ["ok"]
    [dead] = Collect.sink["dead_s"]
    assert (dead.stage, dead.reason, dead.prompt_id) == ("render", "unexpected_error", "s1")
    assert dead.detail.startswith("TypeError: ")
    line = dead.to_json()
    line.encode("utf-8")  # writable as UTF-8
    assert json.loads(line)["input"]["prompt"] == "broken \ud83d emoji"
