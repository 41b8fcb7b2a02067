"""Candidate generation with real vLLM and real transformers on a tiny model, and fp32 rescoring.

One vLLM engine serves the whole module (the handlers share it through the process cache).
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
import weakref

import apache_beam as beam
import pytest
import torch
from apache_beam.metrics.metric import MetricsFilter
from transformers import AutoModelForCausalLM, AutoTokenizer

from beam_pipelines import generate, generate_vllm, handlers
from beam_pipelines.config import GenerateConfig
from beam_pipelines.elements import Candidate, Failure, PromptCandidates, RenderedPrompt
from beam_pipelines.generate import (
    GenerateCandidates,
    make_generation_handler,
    response_text,
    truncate_at_eos,
)
from beam_pipelines.generate_hf import TransformersGenerationHandler
from beam_pipelines.generate_vllm import VLLMGenerationHandler, get_vllm_engine
from beam_pipelines.render import render_prompt
from beam_pipelines.rescore import RescoreCandidates
from beam_pipelines.seeding import prompt_seed
from rso.logprobs import sequence_logps
from tests.test_render import Collect

N = 6
MAX_NEW = 20
TOL = 1e-3  # nats per sequence
OUT_OF_VOCAB = 10 ** 6


@pytest.fixture(scope="module")
def policy(tiny_policy, tmp_path_factory) -> str:
    """The tiny policy with an EOS logit of about 3.5 (P(EOS) ~ 0.1 per step) so that samples
    end both ways ("stop" and "length") within MAX_NEW tokens."""
    out = str(tmp_path_factory.mktemp("eos_policy"))
    shutil.copytree(tiny_policy, out, dirs_exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(7, 250, (8, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[-1].reshape(-1, 128)
        mean = hidden.mean(0)
        model.lm_head.weight[model.config.eos_token_id] = 3.5 * mean / mean.norm() ** 2
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def tok(policy):
    return AutoTokenizer.from_pretrained(policy)


@pytest.fixture(scope="module")
def fp32_model(policy):
    return AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts(tok) -> list[RenderedPrompt]:
    return [
        render_prompt(tok, "chat", None, (("user", "How do I bake bread?"),), 255),
        render_prompt(tok, "plain", "Human: what is two plus two?\n\nAssistant:", None, 255),
        render_prompt(tok, "joke", None, (("user", "Tell me a joke."),), 255),
    ]


@pytest.fixture(scope="module")
def near_context_end(tok) -> RenderedPrompt:
    """250 prompt tokens in a 256-token context: at most 6 new tokens."""
    return render_prompt(tok, "long", " ".join(["water"] * 250), None, 255)


def bad_prompt() -> RenderedPrompt:
    return RenderedPrompt("bad", "broken", (4, OUT_OF_VOCAB, 5), (("user", "broken"),))


def make_config(policy: str, **changes) -> GenerateConfig:
    base = dict(policy=policy, engine="vllm", dtype="float32", num_candidates=N,
                max_new_tokens=MAX_NEW, enforce_eager=True, vllm_cpu_kv_cache_gib=1, seed=7,
                batch_size=8)
    return GenerateConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def vllm_config(policy) -> GenerateConfig:
    return make_config(policy)


@pytest.fixture(scope="module")
def vllm_model(vllm_config):
    handler = VLLMGenerationHandler(vllm_config)
    model = handler.load_model()
    yield model
    generate_vllm.clear_vllm_engines()


def run(handler, batch, model) -> list:
    return [r.inference for r in handler.run_inference(batch, model)]


def assert_consistent(pc: PromptCandidates, eos_id: int, budget: int = MAX_NEW) -> None:
    """N candidates; "stop" iff the last token is EOS; no EOS elsewhere; lengths in budget."""
    assert len(pc.candidates) == N
    for c in pc.candidates:
        assert 1 <= c.num_tokens <= budget
        assert eos_id not in c.token_ids[:-1]
        if c.finish_reason == "stop":
            assert c.token_ids[-1] == eos_id
        else:
            assert c.finish_reason == "length"
            assert c.token_ids[-1] != eos_id and c.num_tokens == budget


def assert_raw_logps(pcs: list[PromptCandidates], model, pad_id: int, tol: float = TOL) -> None:
    """sft_logp == rso.logprobs.sequence_logps of the same token ids (fp32)."""
    for pc in pcs:
        expected = sequence_logps(model, [pc.prompt.prompt_token_ids] * len(pc.candidates),
                                  [c.token_ids for c in pc.candidates], pad_id).tolist()
        for c, e in zip(pc.candidates, expected):
            assert c.sft_logp == pytest.approx(e, abs=tol)


def signature(pc: PromptCandidates) -> list:
    return [(c.token_ids, c.finish_reason, round(c.sft_logp, 4)) for c in pc.candidates]


# ----------------------------------------------------------------------------- pure helpers
def test_truncate_at_eos():
    eos = frozenset({3, 9})
    assert truncate_at_eos([5, 6, 3, 1, 1], eos) == ((5, 6, 3), "stop")
    assert truncate_at_eos([5, 9], eos) == ((5, 9), "stop")
    assert truncate_at_eos([5, 6, 7], eos) == ((5, 6, 7), "length")


def test_make_generation_handler_and_weakref_model(policy):
    assert isinstance(make_generation_handler(make_config(policy)), VLLMGenerationHandler)
    handler = make_generation_handler(make_config(policy, engine="transformers"))
    assert isinstance(handler, TransformersGenerationHandler)
    assert handler.batch_elements_kwargs() == {"min_batch_size": 8, "max_batch_size": 8}
    model = handler.load_model()
    assert weakref.ref(model)() is model


def test_warns_once_when_proposal_is_not_pi_sft(policy, caplog, monkeypatch):
    monkeypatch.setattr(generate, "_warned_not_pi_sft", False)
    with caplog.at_level(logging.WARNING, logger=generate.__name__):
        generate.warn_if_not_pi_sft(make_config(policy))
        assert not caplog.records
        generate.warn_if_not_pi_sft(make_config(policy, temperature=0.7, top_k=40))
        generate.warn_if_not_pi_sft(make_config(policy, top_p=0.9))
    assert len(caplog.records) == 1
    assert "not pi_sft" in caplog.records[0].getMessage()


# ----------------------------------------------------------------------------- vLLM
def test_vllm_candidates_match_trainer_logps(vllm_config, vllm_model, prompts, near_context_end,
                                             tok, fp32_model):
    handler = VLLMGenerationHandler(vllm_config)
    results = run(handler, prompts + [near_context_end], vllm_model)
    for pc in results[:-1]:
        assert_consistent(pc, tok.eos_token_id)
    assert_consistent(results[-1], tok.eos_token_id, budget=6)  # cut at the context end
    finishes = {c.finish_reason for pc in results[:-1] for c in pc.candidates}
    assert finishes == {"stop", "length"}
    assert_raw_logps(results, fp32_model, tok.pad_token_id)
    for pc in results:
        for c in pc.candidates:
            assert c.text == response_text(tok, pc.prompt.prompt_token_ids, c.token_ids)


def test_vllm_seeding_is_per_prompt(vllm_config, vllm_model, prompts):
    handler = VLLMGenerationHandler(vllm_config)
    first = run(handler, prompts, vllm_model)
    again = run(handler, list(reversed(prompts)), vllm_model)[::-1]
    assert [signature(a) for a in first] == [signature(b) for b in again]
    # Same prompt text, another prompt id: another seed, other samples.
    renamed = dataclasses.replace(prompts[0], prompt_id="chat-2")
    assert prompt_seed(7, "chat", "generate") != prompt_seed(7, "chat-2", "generate")
    other = run(handler, [renamed], vllm_model)[0]
    assert [c.token_ids for c in other.candidates] != [c.token_ids for c in first[0].candidates]
    # Another run seed: other samples for the same prompt id.
    reseeded = run(VLLMGenerationHandler(vllm_config.replace(seed=8)), prompts[:1], vllm_model)
    assert signature(reseeded[0]) != signature(first[0])


def test_vllm_logps_stay_raw_at_other_temperatures(vllm_config, vllm_model, prompts, tok,
                                                   fp32_model):
    config = vllm_config.replace(temperature=0.6, top_k=40)
    handler = VLLMGenerationHandler(config)
    assert get_vllm_engine(config) is vllm_model.llm  # sampling knobs do not start an engine
    # nor does the logging level of the moment (it only decides whether loading shows a bar)
    vllm_log = logging.getLogger("vllm")
    level = vllm_log.level
    try:
        for other in (logging.INFO, logging.WARNING):
            vllm_log.setLevel(other)
            assert get_vllm_engine(config) is vllm_model.llm
    finally:
        vllm_log.setLevel(level)
    results = run(handler, prompts[:2], vllm_model)
    assert_raw_logps(results, fp32_model, tok.pad_token_id)


def test_vllm_failing_prompt_does_not_fail_its_batch(vllm_config, vllm_model, prompts):
    handler = VLLMGenerationHandler(vllm_config)
    results = run(handler, [prompts[0], bad_prompt(), prompts[1]], vllm_model)
    assert isinstance(results[1], Failure) and results[1].reason == "generation_failed"
    assert "vocab" in results[1].detail
    alone = run(handler, [prompts[0], prompts[1]], vllm_model)
    assert [signature(r) for r in (results[0], results[2])] == [signature(r) for r in alone]


def test_generate_candidates_on_the_direct_runner(vllm_config, vllm_model, prompts):
    p = beam.Pipeline(runner="DirectRunner")
    out = p | beam.Create(prompts + [bad_prompt()]) | GenerateCandidates(vllm_config)
    _ = out.main | "CollectCandidates" >> beam.ParDo(Collect("gen"))
    _ = out.dead_letters | "CollectDead" >> beam.ParDo(Collect("gen_dead"))
    result = p.run()
    result.wait_until_finish()

    got = dict(Collect.sink["gen"])
    assert set(got) == {p.prompt_id for p in prompts}
    direct = run(VLLMGenerationHandler(vllm_config), prompts, vllm_model)
    for d in direct:
        assert got[d.prompt.prompt_id].prompt == d.prompt
        assert signature(got[d.prompt.prompt_id]) == signature(d)
    [dead] = Collect.sink["gen_dead"]
    assert (dead.stage, dead.reason, dead.prompt_id) == ("generate", "generation_failed", "bad")
    assert dead.input["prompt_token_ids"] == [4, OUT_OF_VOCAB, 5]
    counters = {c.key.metric.name: c.committed for c in result.metrics().query(
        MetricsFilter().with_namespace("rso"))["counters"]}
    assert counters["prompts_generated"] == 3
    assert counters["dead_letter_generation_failed"] == 1


# ----------------------------------------------------------------------------- transformers
@pytest.fixture(scope="module")
def hf_handler(policy):
    handler = TransformersGenerationHandler(make_config(policy, engine="transformers",
                                                        temperature=0.7, top_k=40))
    return handler, handler.load_model()


def test_transformers_candidates_match_trainer_logps(hf_handler, prompts, near_context_end, tok,
                                                     fp32_model):
    handler, model = hf_handler  # temperature 0.7, top_k 40: sft_logp must still be raw
    results = run(handler, prompts[:2] + [near_context_end], model)
    for pc in results[:-1]:
        assert_consistent(pc, tok.eos_token_id)
    assert_consistent(results[-1], tok.eos_token_id, budget=6)
    assert {c.finish_reason for pc in results[:-1] for c in pc.candidates} == {"stop", "length"}
    assert_raw_logps(results, fp32_model, tok.pad_token_id)
    for pc in results:
        for c in pc.candidates:
            assert c.text == response_text(tok, pc.prompt.prompt_token_ids, c.token_ids)


def test_transformers_seeding_and_failures(hf_handler, prompts):
    handler, model = hf_handler
    first = run(handler, prompts[:2], model)
    state = torch.random.get_rng_state()
    again = run(handler, [prompts[1], bad_prompt(), prompts[0]], model)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    assert signature(again[2]) == signature(first[0])
    assert signature(again[0]) == signature(first[1])
    assert isinstance(again[1], Failure) and again[1].reason == "generation_failed"
    assert signature(first[0]) != signature(first[1])


# ----------------------------------------------------------------------------- rescore
def test_rescore_bf16_candidates_to_fp32(policy, prompts, tok, fp32_model):
    config = make_config(policy, engine="transformers", dtype="bfloat16", rescore_batch_size=4)
    assert config.rescore_in_fp32
    handler = TransformersGenerationHandler(config)
    bf16 = run(handler, prompts, handler.load_model())
    expected = {pc.prompt.prompt_id: sequence_logps(
        fp32_model, [pc.prompt.prompt_token_ids] * N, [c.token_ids for c in pc.candidates],
        tok.pad_token_id).tolist() for pc in bf16}
    gap = max(abs(c.sft_logp - e) for pc in bf16
              for c, e in zip(pc.candidates, expected[pc.prompt.prompt_id]))
    assert gap > 1e-3  # bf16 log-probs are off: rescoring has something to fix
    broken = PromptCandidates(dataclasses.replace(prompts[0], prompt_id="broken"),
                              [Candidate("x", (OUT_OF_VOCAB,), "length", 0.0)])

    p = beam.Pipeline(runner="DirectRunner")
    out = (p | beam.Create([(pc.prompt.prompt_id, pc) for pc in bf16 + [broken]])
           | RescoreCandidates(config))
    _ = out.main | "CollectRescored" >> beam.ParDo(Collect("rescored"))
    _ = out.dead_letters | "CollectDead" >> beam.ParDo(Collect("rescore_dead"))
    p.run().wait_until_finish()

    rescored = dict(Collect.sink["rescored"])
    assert set(rescored) == set(expected)
    for pc in bf16:
        new = rescored[pc.prompt.prompt_id]
        assert [c.token_ids for c in new.candidates] == [c.token_ids for c in pc.candidates]
        assert [c.sft_logp for c in new.candidates] == pytest.approx(
            expected[pc.prompt.prompt_id], abs=1e-4)
    [dead] = Collect.sink["rescore_dead"]
    assert (dead.stage, dead.prompt_id, dead.reason) == ("rescore", "broken", "rescore_failed")


def test_vllm_big_batch_matches_prompts_alone(vllm_config, vllm_model, tok, caplog):
    """More prompt tokens than one engine step takes (4096 on CPU): on CPU, vLLM cannot split
    a seeded prompt's prefill across steps, so the handler turns chunked prefill off there.
    Each prompt's candidates do not depend on the batch it came in."""
    words = "how do i bake bread ? what is the capital of france ? tell me a joke".split()
    batch = [render_prompt(tok, f"big-{i}", " ".join(words[(i + j) % len(words)]
                                                     for j in range(200)), None, 255)
             for i in range(12)]
    handler = VLLMGenerationHandler(vllm_config)
    with caplog.at_level(logging.WARNING):
        together = run(handler, batch, vllm_model)
    # The batch ran as one engine call: no engine error, no one-by-one retry.
    assert not [r for r in caplog.records
                if r.name in (generate_vllm.__name__, handlers.__name__)]
    assert not [r for r in together if isinstance(r, Failure)]
    alone = [run(handler, [p], vllm_model)[0] for p in batch[:3]]
    assert [signature(r) for r in together[:3]] == [signature(r) for r in alone]


def test_rescore_is_bit_identical_alone_and_in_any_batch(hf_handler, prompts, fp32_model, tok):
    """Issue 8 item 5: a prompt's float32 log-probs do not depend on the other prompts of
    its Beam batch (==, not approx)."""
    from beam_pipelines.rescore import rescore

    handler, model = hf_handler
    generated = run(handler, prompts, model)
    together = rescore(fp32_model, tok.pad_token_id, generated, 4)
    shuffled = rescore(fp32_model, tok.pad_token_id, generated[::-1], 4)[::-1]
    for i, pc in enumerate(generated):
        [alone] = rescore(fp32_model, tok.pad_token_id, [pc], 4)
        assert [c.sft_logp for c in together[i].candidates] == \
            [c.sft_logp for c in alone.candidates] == [c.sft_logp for c in shuffled[i].candidates]


# ----------------------------------------------------------------------------- multi-byte text
EMOJI = "\U0001F642"  # 4 UTF-8 bytes


def build_byte_tokenizer(out_dir: str):
    """A byte-level BPE tokenizer (GPT-2 style) with few merges: an emoji is several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["hello world, how are you?", "fine thanks"] * 5, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>",
                                 eos_token="</s>")
    hf.save_pretrained(out_dir)
    return hf


@pytest.fixture(scope="module")
def byte_policy(tmp_path_factory) -> str:
    """A 2-layer Llama over the byte-level tokenizer: random samples are mostly broken UTF-8."""
    from transformers import LlamaForCausalLM

    from tests.tiny_models import _llama_config

    out = str(tmp_path_factory.mktemp("byte_policy"))
    tok = build_byte_tokenizer(out)
    torch.manual_seed(0)
    cfg = _llama_config(tok, max_position_embeddings=64)
    cfg.vocab_size = 320  # >= len(tok); a multiple of 64 for vLLM's kernels
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    return out


def test_vllm_candidate_text_is_the_decoding_of_the_ids():
    """vLLM's incremental detokenizer holds back a character cut by the end of the response:
    its CompletionOutput.text misses it. The stored text is the tokenizer's decoding."""
    import tempfile

    from vllm.outputs import CompletionOutput

    from beam_pipelines.generate_vllm import vllm_candidate

    with tempfile.TemporaryDirectory() as d:
        tok = build_byte_tokenizer(d)
    prompt_ids = tok("hello")["input_ids"]
    ids = tok(" hi " + EMOJI, add_special_tokens=False)["input_ids"]
    assert len(tok(EMOJI, add_special_tokens=False)["input_ids"]) > 1
    cut = ids[:-1]  # ends inside the emoji's bytes
    held_back = CompletionOutput(index=0, text=" hi ", token_ids=cut, cumulative_logprob=-3.0,
                                 logprobs=None, finish_reason="length")
    c = vllm_candidate(held_back, tok, prompt_ids)
    assert c.text == response_text(tok, prompt_ids, cut) == " hi \ufffd" != held_back.text
    assert c.token_ids == tuple(cut) and c.sft_logp == -3.0


@pytest.mark.slow
def test_vllm_and_transformers_store_the_decoding_of_multibyte_ids(byte_policy):
    """Both engines on a byte-level model whose samples end mid-character: the stored text is
    exactly the decoding of the stored ids (what rewards are computed on)."""
    from vllm.inputs import TokensPrompt

    tok = AutoTokenizer.from_pretrained(byte_policy)
    p = render_prompt(tok, "bytes", "hello world", None, 63)
    cfg = make_config(byte_policy, max_new_tokens=7, max_model_len=64)
    llm = get_vllm_engine(cfg)
    try:
        raw = llm.generate([TokensPrompt(prompt_token_ids=list(p.prompt_token_ids))],
                           [generate_vllm.vllm_sampling_params(cfg, p.prompt_id)],
                           use_tqdm=False)[0].outputs
        decoded = [response_text(tok, p.prompt_token_ids, o.token_ids) for o in raw]
        assert any(o.text != d for o, d in zip(raw, decoded))  # vLLM's own text differs
        handler = VLLMGenerationHandler(cfg)
        [pc] = run(handler, [p], handler.load_model())
    finally:
        generate_vllm.clear_vllm_engines()
    assert [c.token_ids for c in pc.candidates] == [tuple(o.token_ids) for o in raw]
    assert [c.text for c in pc.candidates] == decoded
    assert any("\ufffd" in t for t in decoded)

    hf = TransformersGenerationHandler(make_config(byte_policy, engine="transformers",
                                                   max_new_tokens=7, max_model_len=64))
    [pc] = run(hf, [p], hf.load_model())
    assert [c.text for c in pc.candidates] == [
        tok.decode(list(p.prompt_token_ids) + list(c.token_ids), skip_special_tokens=True)[
            len(tok.decode(list(p.prompt_token_ids), skip_special_tokens=True)):]
        for c in pc.candidates]


def test_handlers_size_batches_from_token_counts_and_retry_one_by_one(policy, prompts):
    """get_num_bytes counts token ids (Beam's default pickles every batch); a failing batch
    is retried one element at a time and only the failing element is a Failure."""
    handler = TransformersGenerationHandler(make_config(policy, engine="transformers"))
    assert handler.get_num_bytes(prompts) == handlers.BYTES_PER_TOKEN * sum(
        len(p.prompt_token_ids) for p in prompts)
    pcs = [PromptCandidates(p, [Candidate("x", (1, 2, 3), "length", 0.0)]) for p in prompts]
    assert handler.get_num_bytes(pcs) == handlers.BYTES_PER_TOKEN * sum(
        len(p.prompt_token_ids) + 3 for p in prompts)

    calls = []

    def fn(items):
        calls.append(list(items))
        if 2 in items:
            raise KeyError(2)
        return [10 * i for i in items]

    results = handlers.run_with_retry([1, 2, 3], fn, "test_failed", "model: ")
    assert results[0] == 10 and results[2] == 30
    assert results[1] == Failure("test_failed", "model: KeyError: 2")
    assert calls == [[1, 2, 3], [1], [2], [3]]
