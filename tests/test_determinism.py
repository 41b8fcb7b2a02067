"""Bit-identical records for the same input, seed and models on every runner and worker count
(issue: rewards once depended on which prompts shared a padded reward batch)."""
from __future__ import annotations

import glob
import json
import os

import pyarrow.parquet as pq
import pytest

from beam_pipelines.pipeline import main as generate
from tests.test_deploy import job_service  # noqa: F401 - a fixture
from tests.test_pipeline_e2e import key

WORDS = ["sea", "sky", "bread", "river", "city", "music", "rain", "garden", "moon", "train",
         "forest", "winter"]


def records(out: str) -> list[dict]:
    rows = [r for p in sorted(glob.glob(os.path.join(out, "pairs-*.parquet")))
            for r in pq.read_table(p).to_pylist()]
    return sorted(rows, key=key)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("det") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt_id": f"p{i:02d}", "prompt": f"Tell me about "
                                        f"the {w} and the {WORDS[(i * 5) % len(WORDS)]}."}) + "\n"
                            for i, w in enumerate(WORDS * 2)))
    return str(path)


@pytest.mark.slow
def test_same_records_on_every_runner_and_worker_count(prompts, tiny_policy, tiny_reward_model,
                                                       tmp_path, job_service):  # noqa: F811
    endpoint, _ = job_service
    common = ["--input", prompts, "--policy", tiny_policy, "--reward-model", tiny_reward_model,
              "--engine", "transformers", "--num-candidates", "6", "--num-samples", "4",
              "--max-new-tokens", "6", "--seed", "3", "--reward-prompts-per-batch", "5",
              "--batch-size", "3", "--torch-threads", "1"]
    runs = {
        "direct, 1 worker": [],
        "direct, 2 worker processes": ["--runner", "DirectRunner", "--direct_num_workers", "2",
                                       "--direct_running_mode", "multi_processing"],
        "portable (Flink's path)": ["--runner", "PortableRunner", "--job_endpoint", endpoint,
                                    "--environment_type", "LOOPBACK"],
    }
    results = {}
    for name, beam_args in runs.items():
        out = str(tmp_path / name.replace(" ", "_").replace(",", ""))
        assert generate(["--output", out, *common, *beam_args]) == 0, name
        results[name] = records(out)
    first = results["direct, 1 worker"]
    assert len(first) >= len(WORDS)
    for name, rows in results.items():
        assert rows == first, f"{name} differs from the first run"  # exact, floats included
