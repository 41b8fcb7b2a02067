"""Preference pairs for the trainer's tests, made like the pipeline makes them, offline.

Responses are sampled from the tiny policy (transformers ``generate``, temperature 1, seeded),
their reference log-probs computed with :func:`rso.logprobs.sequence_logps` in fp32, and the
pairs written as a SPEC 5 output directory (``pairs-*.parquet``, ``pairs-*.tfrecord.gz``,
``manifest.json`` with the files' checksums, ``_SUCCESS``) with pyarrow and
:func:`rso.tfrecord.write_records`.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from rso.checksums import CHECKSUMS, digest
from rso.logprobs import sequence_logps
from rso.schema import COLUMN_NAMES, arrow_schema, to_example
from rso.tfrecord import write_records

QUESTIONS = [
    "how do I bake bread?", "what is the capital of France?", "tell me a joke.",
    "how can I stay safe online?", "can you help me with my homework?", "what is two plus two?",
    "is it going to rain today?", "write a short poem about the sea.",
    "what is the name of the big animal that can live in water?",
    "tell me about the first people who came to the land.",
    "how do I make a small house for a little animal?", "why is the sea water so hot?",
]


def build_pairs(policy_dir: str, num_prompts: int = 8, pairs_per_prompt: int = 2,
                max_new_tokens: int = 10, seed: int = 0) -> list[dict[str, Any]]:
    """SPEC 5 records: responses sampled from the policy, fp32 reference log-probs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(policy_dir)
    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    records = []
    for i in range(num_prompts):
        question = QUESTIONS[i % len(QUESTIONS)] + " " + " ".join(["please"] * (i // len(
            QUESTIONS)))
        messages = [{"role": "user", "content": question.strip()}]
        prompt_ids = tok.apply_chat_template(messages, add_generation_prompt=True,
                                             return_dict=False)
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        torch.manual_seed(seed * 1000 + i)
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt_ids]), do_sample=True, temperature=1.0,
                                 top_k=0, top_p=1.0, num_return_sequences=2 * pairs_per_prompt,
                                 max_new_tokens=max_new_tokens - i % 3)
        responses = []
        for row in out[:, len(prompt_ids):].tolist():
            ids = row[:row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row
            responses.append((ids, "stop" if ids[-1] == tok.eos_token_id else "length"))
        with torch.no_grad():
            logps = sequence_logps(model, [prompt_ids] * len(responses),
                                   [r for r, _ in responses], tok.pad_token_id).tolist()
        prompt_id = hashlib.sha256(prompt.encode()).hexdigest()
        for j in range(pairs_per_prompt):
            a, b = 2 * j, 2 * j + 1
            reward_a, reward_b = float(len(responses[a][0])), float(len(responses[b][0])) + 0.5
            win, loss = (a, b) if reward_a > reward_b else (b, a)
            records.append({
                "prompt_id": prompt_id, "prompt": prompt, "prompt_token_ids": list(prompt_ids),
                "chosen": tok.decode(responses[win][0]), "rejected": tok.decode(responses[loss][0]),
                "chosen_token_ids": responses[win][0], "rejected_token_ids": responses[loss][0],
                "ref_chosen_logps": logps[win], "ref_rejected_logps": logps[loss],
                "chosen_reward": max(reward_a, reward_b),
                "rejected_reward": min(reward_a, reward_b),
                "chosen_finish_reason": responses[win][1],
                "rejected_finish_reason": responses[loss][1],
                "selection": "rso", "pairing": "first-round", "beta": 0.5,
                "num_candidates": 2 * pairs_per_prompt, "num_accepted": 2 * pairs_per_prompt,
                "policy_model": os.path.basename(policy_dir), "reward_model": "length",
                "run_id": "test-run"})
    return records


def write_parquet(path: str, records: Sequence[dict[str, Any]],
                  columns: Sequence[str] = COLUMN_NAMES) -> None:
    schema = arrow_schema()
    schema = pa.schema([schema.field(c) for c in columns])
    table = pa.Table.from_pylist([{c: r[c] for c in columns} for r in records], schema=schema)
    pq.write_table(table, path)


def write_output_dir(out_dir: str, records: Sequence[dict[str, Any]], num_shards: int = 2,
                     success: bool = True) -> str:
    """A pipeline output directory holding ``records`` in both formats (same shards)."""
    os.makedirs(out_dir, exist_ok=True)
    for s in range(num_shards):
        shard = list(records[s::num_shards])
        name = f"pairs-{s:05d}-of-{num_shards:05d}"
        write_parquet(os.path.join(out_dir, name + ".parquet"), shard)
        write_records(os.path.join(out_dir, name + ".tfrecord.gz"), (to_example(r) for r in shard))
    with open(os.path.join(out_dir, "dead_letter-00000-of-00001.jsonl"), "w"):
        pass
    digests = {}
    for name in sorted(os.listdir(out_dir)):
        if name.startswith("pairs-"):
            with open(os.path.join(out_dir, name), "rb") as f:
                digests[name] = digest(f)
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump({"run_id": "test-run", "num_pairs": len(records),
                   "files": {CHECKSUMS: digests}}, f)
    if success:
        with open(os.path.join(out_dir, "_SUCCESS"), "w"):
            pass
    return out_dir
