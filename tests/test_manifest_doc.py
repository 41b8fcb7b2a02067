"""Every key a real manifest holds is documented in docs/MANIFEST.md."""
from __future__ import annotations

import glob
import json
import os
import pathlib

import pytest

DOC = (pathlib.Path(__file__).parent.parent / "docs" / "MANIFEST.md").read_text()


def test_every_manifest_key_is_documented(tmp_path, tiny_policy, tiny_reward_model):
    from beam_pipelines.pipeline import main as generate
    from tests.test_pipeline_e2e import VALID

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in VALID))
    out = str(tmp_path / "out")
    assert generate(["--input", str(prompts), "--output", out, "--policy", tiny_policy,
                     "--reward-model", tiny_reward_model, "--engine", "transformers",
                     "--num-candidates", "4", "--num-samples", "2", "--max-new-tokens", "4",
                     "--write-candidates"]) == 0
    with open(glob.glob(os.path.join(out, "manifest.json"))[0]) as f:
        manifest = json.load(f)
    keys = list(manifest)
    for section in ("accounting", "selection", "files", "models", "dead_letters", "acceptance",
                    "reward_statistics", "cost"):
        keys += [k for k in manifest[section] if k != "checksums"]
    missing = sorted({k for k in keys if f"`{k}`" not in DOC and f"`{k}" not in DOC})
    if missing:
        pytest.fail(f"undocumented manifest keys: {missing}")
    assert manifest["accounting"]["balanced"] is True
    nested = [k for stage in manifest["cost"]["stages"].values() for k in stage]
    nested += [k for m in manifest["cost"]["reward_model_calls"] for k in m]
    nested += list(manifest["cost"]["launcher"]) + list(manifest["cost"]["stages"])
    missing = sorted({k for k in nested if f"`{k}`" not in DOC})
    assert not missing, f"undocumented cost keys: {missing}"
