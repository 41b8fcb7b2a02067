"""`rso reward train` (trainer/reward_train.py) on the tiny Llama built offline: formats, errors,
both modes, exact resume, and the saved model scored by the pipeline's own reward handlers."""
from __future__ import annotations

import gzip
import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file

from beam_pipelines.config import GenerateConfig, RewardModelSpec
from beam_pipelines.elements import Candidate, PromptCandidates, RenderedPrompt
from beam_pipelines.prompts import parse_hh_dialogue, prompt_id_for
from beam_pipelines.reward_handlers import PairwiseRewardHandler, PointwiseRewardHandler
from rso.config import ConfigError
from rso.transcript import hh_transcript
from trainer.data import DataError
from trainer.losses import bradley_terry_loss
from trainer.metrics import read_metrics
from trainer.reward_data import parse_preference, read_preferences
from trainer.reward_train import (
    RewardConfig,
    encode_examples,
    model_scores,
    train_reward,
    wilson_interval,
)
from trainer.reward_train import main as reward_main

WORDS = ("water bread salt flour sea poem road side time day people work house light world "
         "mother father earth animal picture").split()
QUESTIONS = ["how do i bake bread?", "what is the capital of france?", "tell me a joke.",
             "how can i stay safe online?", "can you help me with my homework?"]


def marker_rows(n: int, seed: int = 0, long_prompt_every: int = 0) -> list[dict]:
    """HH-RLHF rows whose chosen reply ends in "good" and rejected in "no" (a signal a tiny
    model can learn from its last token); every ``long_prompt_every``-th prompt is long."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        question = f"{rng.choice(QUESTIONS)} {' '.join(rng.choices(WORDS, k=3))} {i}"
        if long_prompt_every and i % long_prompt_every == 0:
            question += " " + " ".join(rng.choices(WORDS, k=40))
        reply = " ".join(rng.choices(WORDS, k=rng.randint(2, 6)))
        chosen, rejected = f"{reply} very good", f"{reply} very no"
        rows.append({"chosen": f"\n\nHuman: {question}\n\nAssistant: {chosen}",
                     "rejected": f"\n\nHuman: {question}\n\nAssistant: {rejected}"})
    return rows


def write_jsonl(path, rows, gz: bool = False) -> str:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def marker_data(tmp_path_factory) -> str:
    return write_jsonl(tmp_path_factory.mktemp("rm_data") / "pairs.jsonl.gz",
                       marker_rows(120, long_prompt_every=7), gz=True)


def cfg(data, model, output, **kw) -> RewardConfig:
    base = dict(data=[data], model=model, output=str(output), eval_fraction=0.3,
                max_length=48, batch_size=8, progress=False, num_threads=1)
    base.update(kw)
    return RewardConfig(**base)


# ------------------------------------------------------------------------------ pure parts
def test_wilson_interval_matches_a_hand_computed_case():
    # 60 of 100, z = 1.96: centre (0.6 + 0.019208) / 1.038416 = 0.596305,
    # half 1.96 * sqrt(0.0024 + 0.00009604) / 1.038416 = 0.094300
    lo, hi = wilson_interval(60, 100, z=1.96)
    assert lo == pytest.approx(0.502005, abs=1e-5)
    assert hi == pytest.approx(0.690605, abs=1e-5)
    assert wilson_interval(0, 10)[0] == 0.0
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0)


def test_bradley_terry_loss_is_log2_at_equal_rewards_and_falls_with_the_margin():
    losses = bradley_terry_loss(torch.tensor([0.0, 2.0, -2.0]), torch.tensor([0.0, 0.0, 0.0]))
    assert losses[0] == pytest.approx(math.log(2))
    assert losses[1] == pytest.approx(math.log1p(math.exp(-2)))
    assert losses[2] > losses[0] > losses[1]


def test_every_input_form_parses_to_the_same_pair():
    hh = {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and?\n\nAssistant: yes",
          "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and?\n\nAssistant: nope"}
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "and?"}]
    conversational = {"prompt": msgs, "chosen": [{"role": "assistant", "content": "yes"}],
                      "rejected": [{"role": "assistant", "content": "nope"}]}
    implicit = {"chosen": msgs + [{"role": "assistant", "content": "yes"}],
                "rejected": msgs + [{"role": "assistant", "content": "nope"}]}
    parsed = [parse_preference(r, "f: line 1") for r in (hh, conversational, implicit)]
    assert len({(p.prompt_id, p.messages, p.chosen, p.rejected) for p in parsed}) == 1
    assert parsed[0].messages == (("user", "hi"), ("assistant", "hello"), ("user", "and?"))
    assert (parsed[0].chosen, parsed[0].rejected) == ("yes", "nope")
    standard = parse_preference({"prompt": "hi", "chosen": "a", "rejected": "b"}, "f")
    assert standard.messages == (("user", "hi"),)
    assert standard.prompt_id == prompt_id_for(prompt="hi")  # the pipeline's id


def test_hh_prompts_and_ids_equal_the_pipelines_on_bundled_rows():
    from rso_cli.demo import bundled_data

    with gzip.open(bundled_data(), "rt", encoding="utf-8") as f:
        rows = [json.loads(next(f)) for _ in range(200)]
    for row in rows:
        ex = parse_preference(row, "x")
        messages = parse_hh_dialogue(row["chosen"])
        assert ex.messages == messages
        assert ex.prompt_id == prompt_id_for(messages=messages)
        assert row["chosen"].endswith(ex.chosen) and row["rejected"].endswith(ex.rejected)


def test_bad_rows_are_errors_naming_file_and_line(tmp_path):
    good = marker_rows(2)
    path = write_jsonl(tmp_path / "bad.jsonl", good + [{"chosen": "no dialogue here",
                                                         "rejected": "nor here"}])
    with pytest.raises(DataError, match=r"bad\.jsonl: line 3: .*Assistant"):
        read_preferences([path])
    (tmp_path / "broken.jsonl").write_text(json.dumps(good[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"broken\.jsonl: line 2: not valid JSON"):
        read_preferences([str(tmp_path / "broken.jsonl")])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"prompt": "q", "chosen": "a", "rejected": None}]),
                   tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad\.parquet: row 0: needs 'chosen' and 'rejected'"):
        read_preferences([str(tmp_path / "bad.parquet")])
    code = reward_main(["train", "--data", path, "--model", str(tmp_path), "--output",
                        str(tmp_path / "out")])
    assert code == 2


def test_identical_pairs_are_skipped_and_counted(tmp_path):
    rows = marker_rows(3)
    rows[1]["rejected"] = rows[1]["chosen"]
    data = read_preferences([write_jsonl(tmp_path / "p.jsonl", rows)])
    assert (len(data.examples), data.skipped_identical, data.rows) == (2, 1, 3)


# ------------------------------------------------------------------------------ head mode
def pipeline_candidates(ex) -> PromptCandidates:
    rendered = RenderedPrompt(ex.prompt_id, prompt=hh_transcript(ex.messages),
                              prompt_token_ids=(4, 5), messages=ex.messages)
    return PromptCandidates(rendered, [Candidate(t, (1,), "stop", -1.0)
                                       for t in (ex.chosen, ex.rejected)])


@pytest.fixture(scope="module")
def head_run(marker_data, tiny_policy, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm_head")
    return train_reward(cfg(marker_data, tiny_policy, out, c_grid=[0.01, 0.1, 1.0],
                            learning_curve=[20, 40]))


def test_head_mode_beats_chance_and_writes_its_report(head_run, marker_data):
    fit = head_run.fit
    assert fit["heldout_accuracy"] >= 0.85, fit
    lo, hi = fit["heldout_accuracy_ci95"]
    assert lo < fit["heldout_accuracy"] < hi or fit["heldout_accuracy"] == 1.0
    assert fit["heldout_pairs"] + fit["train_pairs"] == 120
    assert fit["saved_model_max_abs_diff"] <= 1e-4
    assert fit["inputs_truncated"] > 0  # the long prompts were cut from the left
    assert fit["data_sha256"] == read_preferences([marker_data]).content_hash
    assert [r["train_pairs"] for r in fit["learning_curve"]] == [20, 40]
    with open(f"{head_run.output}/reward_fit.json") as f:
        assert json.load(f)["C"] == fit["C"]
    splits = {r["split"] for r in read_metrics(f"{head_run.output}/metrics.jsonl")}
    assert {"cv", "eval", "learning_curve"} <= splits
    import os

    assert os.path.exists(f"{head_run.output}/plots/learning_curve.png")
    assert os.path.exists(f"{head_run.output}/model.safetensors")


def test_pipeline_renders_and_scores_exactly_as_training(head_run, marker_data):
    """The pipeline's pointwise handler builds the same token ids as training (long prompts
    cut from the left included) and its reward equals the fitted model's score."""
    from transformers import AutoTokenizer

    from rso.hf import load_classifier as hf_classifier

    examples = read_preferences([marker_data]).examples[:16]
    tok = AutoTokenizer.from_pretrained(head_run.output)
    assert tok.model_max_length == 48
    ids_a, ids_b, cut = encode_examples(tok, examples, "pointwise", 48)
    assert cut > 0
    handler = PointwiseRewardHandler(RewardModelSpec(path=head_run.output), GenerateConfig())
    loaded = handler.load_model()
    batch = [pipeline_candidates(ex) for ex in examples]
    for pc, a, b in zip(batch, ids_a, ids_b):
        assert handler._plan(pc, loaded).sequences == [a, b]
    rewards = [r.inference for r in handler.run_inference(batch, loaded)]
    model = hf_classifier(head_run.output)
    ours = model_scores(model, ids_a + ids_b, model.config.pad_token_id, 4, torch.device("cpu"))
    for i, (ra, rb) in enumerate(rewards):
        assert ra == pytest.approx(float(ours[i]), abs=1e-4)
        assert rb == pytest.approx(float(ours[len(examples) + i]), abs=1e-4)
    assert sum(ra > rb for ra, rb in rewards) >= 13  # and it prefers the marked replies


def test_output_drives_rso_generate(head_run, tiny_policy, tmp_path):
    from beam_pipelines.pipeline import main as generate

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUESTIONS[:3]))
    out = tmp_path / "gen"
    assert generate(["--input", str(prompts), "--output", str(out), "--policy", tiny_policy,
                     "--reward-model", head_run.output, "--engine", "transformers",
                     "--num-candidates", "4", "--num-samples", "2", "--max-new-tokens", "6",
                     "--seed", "0"]) == 0
    assert (out / "_SUCCESS").exists()


def test_pairwise_kind_beats_chance_and_matches_the_pipeline(marker_data, tiny_policy,
                                                             tmp_path):
    result = train_reward(cfg(marker_data, tiny_policy, tmp_path / "pw", kind="pairwise",
                              c_grid=[0.1, 1.0], max_length=64))
    assert result.fit["heldout_accuracy"] >= 0.8, result.fit
    from transformers import AutoTokenizer

    examples = read_preferences([marker_data]).examples[:6]
    tok = AutoTokenizer.from_pretrained(result.output)
    ids_a, ids_b, _ = encode_examples(tok, examples, "pairwise", 64)
    handler = PairwiseRewardHandler(RewardModelSpec(path=result.output, kind="pairwise"),
                                    GenerateConfig(pairwise_debias="both-orders"))
    loaded = handler.load_model()
    for ex, a, b in zip(examples, ids_a, ids_b):
        sequences = handler._plan(pipeline_candidates(ex), loaded).sequences
        assert sorted(sequences) == sorted([a, b])  # (y_w, y_l) and (y_l, y_w)


# ------------------------------------------------------------------------------ full mode
def test_full_mode_beats_chance_and_resumes_exactly(marker_data, tiny_policy, tmp_path):
    common = dict(mode="full", lr=3e-3, epochs=3, batch_size=8, save_every=4, seed=1)
    straight = train_reward(cfg(marker_data, tiny_policy, tmp_path / "a", **common))
    assert straight.fit["heldout_accuracy"] >= 0.75, straight.fit
    stopped = train_reward(cfg(marker_data, tiny_policy, tmp_path / "b", **common),
                           stop_after=6)  # killed after step 6: checkpoint 4 is the latest
    assert not stopped.finished
    resumed = train_reward(cfg(marker_data, tiny_policy, tmp_path / "b", resume=True,
                               **common))
    assert resumed.fit["steps"] == straight.fit["steps"]
    wa = load_file(str(tmp_path / "a" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)
    assert resumed.fit["heldout_accuracy"] == straight.fit["heldout_accuracy"]
    train_a = [r for r in read_metrics(str(tmp_path / "a" / "metrics.jsonl"))
               if r["split"] == "train"]
    train_b = [r for r in read_metrics(str(tmp_path / "b" / "metrics.jsonl"))
               if r["split"] == "train"]
    assert [r["step"] for r in train_b] == [r["step"] for r in train_a]
    assert [r["loss"] for r in train_b] == pytest.approx([r["loss"] for r in train_a],
                                                         abs=1e-5)


# ------------------------------------------------------------------------------ mean pooling
@pytest.fixture(scope="module")
def sentence_encoder(tmp_path_factory) -> str:
    from tests.tiny_models import build_sentence_encoder

    return build_sentence_encoder(str(tmp_path_factory.mktemp("tiny_encoder")))


def test_a_sentence_transformers_encoder_is_mean_pooled_everywhere(marker_data,
                                                                  sentence_encoder, tmp_path):
    """`--pooling auto` reads the encoder's 1_Pooling config; the saved model scores the mean
    of its token states (checked by hand), the same in a padded batch as alone, and loads in
    the pipeline's reward handler with the same scores."""
    from rso.hf import load_classifier as hf_classifier
    from rso.pooling import POOLING_KEY, MeanPooledClassifier

    result = train_reward(cfg(marker_data, sentence_encoder, tmp_path / "rm",
                              c_grid=[0.1, 1.0, 10.0]))
    assert result.fit["pooling"] == "mean"
    assert result.fit["heldout_accuracy"] >= 0.8, result.fit
    assert result.fit["saved_model_max_abs_diff"] <= 1e-4
    with open(tmp_path / "rm" / "config.json") as f:
        assert json.load(f)[POOLING_KEY] == "mean"
    model = hf_classifier(result.output)
    assert isinstance(model, MeanPooledClassifier)

    from transformers import AutoTokenizer

    examples = read_preferences([marker_data]).examples[:8]
    tok = AutoTokenizer.from_pretrained(result.output)
    ids_a, ids_b, _ = encode_examples(tok, examples, "pointwise", 48)
    batched = model_scores(model, ids_a + ids_b, model.config.pad_token_id, 16,
                           torch.device("cpu"))
    with torch.no_grad():
        one = torch.tensor([ids_a[0]])
        hidden = model.encoder(input_ids=one).last_hidden_state[0]  # [T, H]
        by_hand = float(model.score(hidden.mean(0))[0])
        alone = float(model(input_ids=one, attention_mask=torch.ones_like(one)).logits[0, 0])
    assert alone == pytest.approx(by_hand, abs=1e-5)
    assert float(batched[0]) == pytest.approx(alone, abs=1e-5)  # padding changes nothing

    handler = PointwiseRewardHandler(RewardModelSpec(path=result.output), GenerateConfig())
    loaded = handler.load_model()
    rewards = [r.inference for r in handler.run_inference(
        [pipeline_candidates(ex) for ex in examples], loaded)]
    for i, (ra, rb) in enumerate(rewards):
        assert ra == pytest.approx(float(batched[i]), abs=1e-4)
        assert rb == pytest.approx(float(batched[len(examples) + i]), abs=1e-4)


def test_pooling_model_keeps_the_stock_classifier_and_unknown_poolings_fail(
        marker_data, sentence_encoder, tmp_path):
    from rso.hf import load_classifier as hf_classifier

    result = train_reward(cfg(marker_data, sentence_encoder, tmp_path / "rm", pooling="model",
                              c_grid=[1.0]))
    assert result.fit["pooling"] == "model"
    assert type(hf_classifier(result.output)).__name__ == "BertForSequenceClassification"
    with open(tmp_path / "rm" / "config.json") as f:
        config = json.load(f)
    assert "rso_pooling" not in config
    config["rso_pooling"] = "max"  # written by some other version
    with open(tmp_path / "rm" / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="rso_pooling='max'"):
        hf_classifier(result.output)
    from beam_pipelines.reward_handlers import check_reward_model
    from rso.config import ConfigError as PipelineConfigError

    with pytest.raises(PipelineConfigError, match="rso_pooling='max'"):  # at start, not in Beam
        check_reward_model(RewardModelSpec(path=result.output))


def test_mean_pooled_full_mode_resumes_exactly(marker_data, sentence_encoder, tmp_path):
    common = dict(mode="full", lr=3e-3, epochs=2, batch_size=8, save_every=4, seed=1)
    straight = train_reward(cfg(marker_data, sentence_encoder, tmp_path / "a", **common))
    assert straight.fit["pooling"] == "mean"
    train_reward(cfg(marker_data, sentence_encoder, tmp_path / "b", **common), stop_after=6)
    with pytest.raises(ConfigError, match="pooling differ"):
        train_reward(cfg(marker_data, sentence_encoder, tmp_path / "b", resume=True,
                         **{**common, "pooling": "model"}))
    # "auto" resolved to mean when the run started: --pooling mean is the same setting
    resumed = train_reward(cfg(marker_data, sentence_encoder, tmp_path / "b", resume=True,
                               **{**common, "pooling": "mean"}))
    wa = load_file(str(tmp_path / "a" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert wa.keys() == wb.keys() and "score.weight" in wa
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)
    assert resumed.fit["heldout_accuracy"] == straight.fit["heldout_accuracy"]


def test_a_model_whose_weights_are_not_its_configs_is_refused(marker_data, sentence_encoder,
                                                              tmp_path):
    """Without this check transformers initialises the weights it cannot find at random and
    the pipeline scores with them: a mean-pooled model whose config lost ``rso_pooling``, and a
    stock classifier whose config gained it."""
    from rso.hf import load_classifier as hf_classifier

    mean = train_reward(cfg(marker_data, sentence_encoder, tmp_path / "mean", c_grid=[1.0]))
    stock = train_reward(cfg(marker_data, sentence_encoder, tmp_path / "stock", c_grid=[1.0],
                             pooling="model"))
    for out, edit in ((mean.output, lambda c: c.pop("rso_pooling")),
                      (stock.output, lambda c: c.update(rso_pooling="mean"))):
        with open(f"{out}/config.json") as f:
            config = json.load(f)
        edit(config)
        with open(f"{out}/config.json", "w") as f:
            json.dump(config, f)
        with pytest.raises(ValueError, match="no weights for"):
            hf_classifier(out)


def test_a_failed_or_refused_run_leaves_the_earlier_model_as_it_was(
        marker_data, sentence_encoder, tmp_path, monkeypatch):
    import os
    import shutil

    import trainer.reward_train as R

    out = tmp_path / "rm"
    train_reward(cfg(marker_data, sentence_encoder, out, c_grid=[1.0]))
    before = {n: (out / n).read_bytes() for n in ("model.safetensors", "reward_fit.json")}

    def unchanged():
        assert {n: (out / n).read_bytes() for n in before} == before
        assert not (out / ".saving").exists()

    # the saved model fails its check: nothing replaces the earlier one
    def wrong(*args, **kwargs):
        raise RuntimeError("the saved model's forward differs")

    monkeypatch.setattr(R, "_verify_saved", wrong)
    with pytest.raises(RuntimeError, match="differs"):
        train_reward(cfg(marker_data, sentence_encoder, out, c_grid=[1.0], resume=True))
    unchanged()
    monkeypatch.undo()
    # a backbone that cannot load: one ConfigError, and --overwrite has deleted nothing
    broken = tmp_path / "broken"
    shutil.copytree(sentence_encoder, broken)
    os.remove(broken / "model.safetensors")
    with pytest.raises(ConfigError, match="cannot load the backbone"):
        train_reward(cfg(marker_data, str(broken), out, overwrite=True))
    unchanged()
    bare = tmp_path / "bare"  # a config and nothing else: no tokenizer either
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="cannot load the backbone"):
        train_reward(cfg(marker_data, str(bare), out, overwrite=True))
    unchanged()
    # a corrupt sentence-transformers pooling file is an error, not a silent switch to "model"
    shutil.copytree(sentence_encoder, tmp_path / "corrupt")
    (tmp_path / "corrupt" / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tok')
    with pytest.raises(ConfigError, match="pooling config"):
        train_reward(cfg(marker_data, str(tmp_path / "corrupt"), tmp_path / "c"))
    assert not (tmp_path / "c").exists()
    # a trained mean-pooled model as the backbone of a --pooling model run: refused
    with pytest.raises(ConfigError, match="its pooling is fixed"):
        train_reward(cfg(marker_data, str(out), tmp_path / "m", pooling="model"))


def test_features_are_cached_by_the_backbones_content(marker_data, tmp_path, caplog):
    """A backbone rebuilt at the same path is another backbone: its features are computed
    again, and the saved model reproduces its fitted scores."""
    import logging

    from tests.tiny_models import build_sentence_encoder

    backbone = build_sentence_encoder(str(tmp_path / "enc"), seed=2)
    out = tmp_path / "rm"
    train_reward(cfg(marker_data, backbone, out, c_grid=[1.0]))
    build_sentence_encoder(backbone, seed=9)
    with caplog.at_level(logging.INFO, logger="rso.reward"):
        again = train_reward(cfg(marker_data, backbone, out, c_grid=[1.0], resume=True))
    assert "reusing cached features" not in caplog.text
    assert again.fit["saved_model_max_abs_diff"] <= 1e-4
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rso.reward"):
        train_reward(cfg(marker_data, backbone, out, c_grid=[1.0], resume=True))
    assert "reusing cached features" in caplog.text


def test_too_few_pairs_for_cross_validation_is_said(tmp_path, tiny_policy, caplog):
    import logging

    data = write_jsonl(tmp_path / "few.jsonl", marker_rows(12))
    with caplog.at_level(logging.WARNING, logger="rso.reward"):
        result = train_reward(cfg(data, tiny_policy, tmp_path / "rm", c_grid=[1.0]))
    assert result.fit["train_pairs"] < 50
    assert "a noisy choice" in caplog.text
