"""Prompt parsing (pure): record forms, every bad-input reason, HH-RLHF on the real data file,
prompt_id stability."""
from __future__ import annotations

import gzip
import hashlib
import json

import pytest

from beam_pipelines import prompts as P
from rso.transcript import HH_ASSISTANT, hh_prompt_end

DATA = "/work/shared/data/hh-rlhf-harmless-base-test.jsonl.gz"


def _line(obj) -> bytes:
    return json.dumps(obj).encode("utf-8")


def _reason(line: bytes, kind: str = "auto") -> str:
    with pytest.raises(P.PromptError) as e:
        P.parse_json_line(line, "f.jsonl", kind)
    assert e.value.reason in P.REASONS
    return e.value.reason


@pytest.mark.parametrize("line, reason", [
    (b'{"prompt": "caf\xe9"}', "undecodable"),  # latin-1 byte, not UTF-8
    (b"\xff\xfe{}", "undecodable"),
    (b'{"prompt": "unterminated}', "invalid_json"),
    (b'["a list", "not an object"]', "invalid_json"),
    (b'"just a string"', "invalid_json"),
    (_line({"text": "no known field"}), "missing_prompt"),
    (_line({"prompt": None}), "missing_prompt"),
    (_line({"prompt": 42}), "missing_prompt"),
    (_line({"prompt": ""}), "empty_prompt"),
    (_line({"prompt": " \n\t "}), "empty_prompt"),
    (_line({"messages": [{"role": "user", "content": "  "}]}), "empty_prompt"),
    (_line({"messages": "hello"}), "invalid_messages"),
    (_line({"messages": []}), "invalid_messages"),
    (_line({"messages": [{"role": "user"}]}), "invalid_messages"),
    (_line({"messages": [{"role": "user", "content": 3}]}), "invalid_messages"),
    (_line({"messages": [["user", "hi"]]}), "invalid_messages"),
    (_line({"prompt": [{"content": "no role"}]}), "invalid_messages"),
    (_line({"chosen": "no dialogue turns at all"}), "invalid_dialogue"),
    (_line({"chosen": ["not", "a", "string"]}), "invalid_dialogue"),
    (_line({"chosen": "preamble\n\nHuman: hi\n\nAssistant: yo"}), "invalid_dialogue"),
    (_line({"chosen": "\n\nHuman: hi\n\nAssistant: yo\n\nAssistant: again"}), "invalid_dialogue"),
    (_line({"chosen": "\n\nHuman:   \n\nAssistant: yo"}), "empty_prompt"),
    (_line({"prompt_id": "", "prompt": "x"}), "invalid_prompt_id"),
    (_line({"prompt_id": True, "prompt": "x"}), "invalid_prompt_id"),
    (_line({"prompt_id": {"a": 1}, "prompt": "x"}), "invalid_prompt_id"),
])
def test_each_bad_input_has_its_reason(line, reason):
    assert _reason(line) == reason


def test_hh_rlhf_kind_requires_the_dialogue():
    assert _reason(_line({"prompt": "plain"}), kind="hh-rlhf") == "missing_prompt"
    p = P.parse_json_line(_line({"prompt": "ignored", "chosen": "\n\nHuman: hi\n\nAssistant: yo"}),
                          "f", kind="hh-rlhf")
    assert p.messages == (("user", "hi"),) and p.prompt is None


def test_plain_prompt_and_its_id():
    p = P.parse_json_line(_line({"prompt": "How do I bake bread?"}), "in.jsonl")
    assert p.prompt == "How do I bake bread?" and p.messages is None and p.source == "in.jsonl"
    assert p.prompt_id == hashlib.sha256(b"How do I bake bread?").hexdigest()


def test_given_prompt_id_wins_and_integers_become_strings():
    assert P.parse_json_line(_line({"prompt_id": "q-1", "prompt": "x"}), "f").prompt_id == "q-1"
    assert P.parse_json_line(_line({"prompt_id": 7, "prompt": "x"}), "f").prompt_id == "7"


def test_prompt_id_depends_only_on_content():
    a = P.parse_json_line(b'{"prompt": "caf\\u00e9", "other": 1}', "a.jsonl")
    b = P.parse_json_line('{ "other":2,  "prompt":"café" }'.encode(), "b.jsonl")
    assert a.prompt_id == b.prompt_id
    assert a.prompt_id != P.parse_json_line(_line({"prompt": "cafe"}), "c").prompt_id
    # A conversation hashes its canonical JSON: key order and spacing do not matter.
    m1 = P.parse_json_line(b'{"messages": [{"role": "user", "content": "hi"}]}', "f")
    m2 = P.parse_json_line(b'{"messages":[{"content":"hi","role":"user"}]}', "f")
    assert m1.prompt_id == m2.prompt_id == hashlib.sha256(
        b'[{"content":"hi","role":"user"}]').hexdigest()
    assert m1.prompt_id != P.parse_json_line(_line({"prompt": "hi"}), "f").prompt_id


def test_messages_and_trl_conversational_prompt():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    a = P.parse_json_line(_line({"messages": msgs}), "f")
    b = P.parse_json_line(_line({"prompt": msgs, "chosen": [{"role": "assistant",
                                                           "content": "x"}]}), "f")
    assert a.messages == b.messages == (("system", "Be brief."), ("user", "Hi"))
    assert a.prompt is None and a.prompt_id == b.prompt_id


def test_hh_dialogue_becomes_messages_with_the_same_id_as_the_conversation():
    dialogue = ("\n\nHuman: What is two plus two?\n\nAssistant: Four.\n\nHuman: And three?"
                "\n\nAssistant: Six.")
    rejected = dialogue.replace("Six.", "Five.")
    p = P.parse_json_line(_line({"chosen": dialogue, "rejected": rejected}), "f")
    assert p.messages == (("user", "What is two plus two?"), ("assistant", "Four."),
                          ("user", "And three?"))
    same = P.parse_row({"messages": [{"role": r, "content": c} for r, c in p.messages]}, "g")
    assert same.prompt_id == p.prompt_id


def test_hh_consecutive_turns_of_one_speaker_are_joined():
    dialogue = "\n\nHuman: a\n\nAssistant: b\n\nAssistant: c\n\nHuman: d\n\nAssistant: e"
    assert P.parse_hh_dialogue(dialogue) == (("user", "a"), ("assistant", "b\n\nc"),
                                             ("user", "d"))


def test_utf8_bom_is_dropped():
    p = P.parse_json_line("\ufeff".encode() + _line({"prompt": "x"}), "f")
    assert p.prompt == "x"


def test_parquet_row_forms():
    assert P.parse_row({"prompt": "x", "messages": None}, "t.parquet").prompt == "x"
    row = {"prompt": None, "messages": [{"role": "user", "content": "hi"}]}
    assert P.parse_row(row, "t.parquet").messages == (("user", "hi"),)
    with pytest.raises(P.PromptError) as e:
        P.parse_row({"prompt": None, "messages": None}, "t.parquet")
    assert e.value.reason == "missing_prompt"


def test_escape_line_keeps_undecodable_bytes_visible():
    assert P.escape_line(b'{"prompt": "caf\xe9"}') == '{"prompt": "caf\\xe9"}'


def test_real_hh_rlhf_lines():
    with gzip.open(DATA, "rb") as f:
        lines = f.read().splitlines()
    assert len(lines) == 2312
    first = P.parse_json_line(lines[0], DATA)
    assert first.messages[0] == ("user", "what are some pranks with a pen i can do?")
    assert first.messages[1] == ("assistant", "Are you looking for practical joke ideas?")
    assert first.messages[-1] == ("user", "okay some of these do not have anything to do with "
                                          "pens")
    assert [r for r, _ in first.messages] == ["user", "assistant"] * 2 + ["user"]
    parsed, reasons, same_prompt = [], [], 0
    for line in lines:
        try:
            p = P.parse_json_line(line, DATA)
        except P.PromptError as e:
            reasons.append(e.reason)
            continue
        parsed.append(p)
        assert p.messages[-1][0] == "user" and p.prompt is None
        assert all(a[0] != b[0] for a, b in zip(p.messages, p.messages[1:]))  # alternating
        # 'rejected' shares the dialogue up to the last Assistant turn in almost every line.
        try:
            rejected = P.parse_row({"chosen": json.loads(line)["rejected"]}, DATA)
            same_prompt += rejected.prompt_id == p.prompt_id
        except P.PromptError:
            pass
    # Every line splits at the end of the prefix chosen and rejected share (four of them have
    # a chosen response that itself contains "\n\nAssistant:": see test_hh_split_*).
    assert reasons == []
    assert len(parsed) == 2312 and len({p.prompt_id for p in parsed}) == 2310
    assert same_prompt >= 2300


# The four bundled rows whose chosen response contains "\n\nAssistant:" (0-based line numbers)
# and the last human turn of their prompt.
HH_RESPONSE_WITH_MARKER = {
    1254: "Isn't that drag kings?",
    1688: "If I want to rob someone's house, what time should I do it?",
    1952: "Yes, please find me a serial.",
    2036: "Yes, I have that.",
}


def test_hh_split_at_the_shared_prefix_on_the_four_real_rows():
    with gzip.open(DATA, "rb") as f:
        lines = f.read().splitlines()
    for i, last_human in HH_RESPONSE_WITH_MARKER.items():
        row = json.loads(lines[i])
        chosen, rejected = row["chosen"], row["rejected"]
        # Cutting chosen alone at its last marker would put part of the response in the prompt.
        assert chosen.rfind(HH_ASSISTANT) != hh_prompt_end(chosen, rejected)
        with pytest.raises(P.PromptError) as e:
            P.parse_hh_dialogue(chosen)
        assert e.value.reason == "invalid_dialogue"
        p = P.parse_json_line(lines[i], DATA)
        assert p.messages[-1] == ("user", last_human)
        cut = hh_prompt_end(chosen, rejected)
        assert chosen[:cut] == rejected[:cut]
        assert chosen[cut:].startswith(HH_ASSISTANT) and rejected[cut:].startswith(
            HH_ASSISTANT)
        # The same prompt as the rejected dialogue alone gives.
        assert P.parse_hh_dialogue(rejected) == p.messages


def test_hh_split_synthetic():
    head = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Write a dialogue."
    chosen = head + "\n\nAssistant: Sure.\n\nHuman: hey\n\nAssistant: ho"
    rejected = head + "\n\nAssistant: No."
    expected = (("user", "Hi"), ("assistant", "Hello."), ("user", "Write a dialogue."))
    assert hh_prompt_end(chosen, rejected) == len(head)
    assert P.parse_row({"chosen": chosen, "rejected": rejected}, "f").messages == expected
    # Only chosen: its last marker (here inside the response: a wrong but valid prompt).
    assert P.parse_row({"chosen": chosen}, "f").messages[-1] == ("user", "hey")
    # Responses sharing their first words: the cut goes back to the marker before them.
    assert P.parse_hh_dialogue(head + "\n\nAssistant: Sure, a", head + "\n\nAssistant: Sure, b"
                               ) == expected
    # Identical dialogues: the last marker.
    assert P.parse_hh_dialogue(head + "\n\nAssistant: x", head + "\n\nAssistant: x") == expected
    for rejected, reason in [("\n\nHuman: Other\n\nAssistant: x", "invalid_dialogue"),
                             (7, "invalid_dialogue")]:
        with pytest.raises(P.PromptError) as e:
            P.parse_row({"chosen": chosen, "rejected": rejected}, "f")
        assert e.value.reason == reason
    # A shared prefix that ends in an Assistant turn is still refused.
    with pytest.raises(P.PromptError, match="not a 'Human:' turn"):
        P.parse_hh_dialogue(head + "\n\nAssistant: a\n\nAssistant: b",
                            head + "\n\nAssistant: a\n\nAssistant: c")


# ---------------------------------------------------------------- rendering: BOS and EOS
# (render.render_prompt; SPEC 1: the prompt ids hold one BOS at most)
LLAMA2_STYLE_TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] "
                         "{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}[assistant] {% endif %}")


def _tokenizer_with(tiny_policy: str, out_dir: str, single: str, specials: list[str]):
    """The tiny word-level tokenizer with a post-processor template (e.g. "<s> $A")."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_policy)
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=single, special_tokens=[(t, tok.convert_tokens_to_ids(t)) for t in specials])
    tok.chat_template = LLAMA2_STYLE_TEMPLATE
    tok.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


@pytest.fixture(scope="module")
def bos_dir(tiny_policy, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("bos_tok"))
    _tokenizer_with(tiny_policy, out, "<s> $A", ["<s>"])
    return out


@pytest.fixture(scope="module")
def eos_dir(tiny_policy, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("eos_tok"))
    _tokenizer_with(tiny_policy, out, "<s> $A </s>", ["<s>", "</s>"])
    return out


def test_pre_rendered_prompt_gets_one_bos_like_its_messages(bos_dir):
    from transformers import AutoTokenizer

    from beam_pipelines.render import render_prompt

    tok = AutoTokenizer.from_pretrained(bos_dir)
    bos = tok.bos_token_id
    messages = (("user", "How do I bake bread?"),)
    text = "<s>[user] How do I bake bread?\n[assistant] "
    assert tok(text)["input_ids"][:2] == [bos, bos]  # what plain tokenisation would give
    from_messages = render_prompt(tok, "m", None, messages, 255)
    assert from_messages.prompt == text
    from_text = render_prompt(tok, "t", text, None, 255)
    assert from_text.prompt_token_ids == from_messages.prompt_token_ids
    assert from_text.prompt_token_ids[:2] != (bos, bos) and from_text.prompt_token_ids[0] == bos
    # A prompt without its own BOS still gets the tokenizer's one.
    ids = render_prompt(tok, "p", "how do i bake bread?", None, 255).prompt_token_ids
    assert ids[0] == bos and ids[1] != bos and ids == tuple(tok("how do i bake bread?")[
        "input_ids"])


def test_eos_appended_by_the_post_processor_is_removed(eos_dir):
    from transformers import AutoTokenizer

    from beam_pipelines.render import render_prompt

    tok = AutoTokenizer.from_pretrained(eos_dir)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    raw = tok("how do i bake bread?")["input_ids"]
    assert raw[0] == bos and raw[-1] == eos
    ids = render_prompt(tok, "p", "how do i bake bread?", None, 255).prompt_token_ids
    assert ids == tuple(raw[:-1])
    # Both at once: a pre-rendered prompt under a "<s> $A </s>" post-processor.
    text = "<s>[user] How do I bake bread?\n[assistant] "
    both = render_prompt(tok, "t", text, None, 255).prompt_token_ids
    assert both == tuple(tok(text, add_special_tokens=False)["input_ids"])
    assert both[0] == bos and both[1] != bos and both[-1] != eos
    # An EOS the text itself ends with is the user's: kept.
    kept = render_prompt(tok, "e", "how do i bake bread? </s>", None, 255).prompt_token_ids
    assert kept[-1] == eos and kept[-2] != eos


def test_render_counts_removed_bos_and_eos(bos_dir, eos_dir):
    import apache_beam as beam
    from apache_beam.metrics.metric import MetricsFilter

    from beam_pipelines.config import GenerateConfig
    from beam_pipelines.elements import PromptInput
    from beam_pipelines.render import RenderPrompts

    def run(policy, inputs):
        p = beam.Pipeline(runner="DirectRunner")
        _ = p | beam.Create(inputs) | RenderPrompts(GenerateConfig(policy=policy,
                                                                    max_model_len=64))
        result = p.run()
        result.wait_until_finish()
        counters = result.metrics().query(MetricsFilter().with_namespace("rso"))["counters"]
        return {c.key.metric.name: c.committed for c in counters}

    pre = "<s>[user] How do I bake bread?\n[assistant] "
    inputs = [PromptInput("a", prompt=pre), PromptInput("b", prompt="how do i bake bread?"),
              PromptInput("c", messages=(("user", "hi"),))]
    got = run(bos_dir, inputs)
    assert got["prompts_rendered"] == 3 and got["prompt_double_bos_removed"] == 1
    assert "prompt_appended_eos_removed" not in got
    got = run(eos_dir, inputs)
    assert got["prompt_double_bos_removed"] == 1 and got["prompt_appended_eos_removed"] == 2
