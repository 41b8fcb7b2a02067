"""Calls TensorFlow's TFRecord reader (tests/tf_reader.py) in its own venv."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))


def tensorflow_python() -> str:
    """The TensorFlow venv's python: $RSO_TF_PYTHON, else .venv-tf/ (made by scripts/test.sh)."""
    path = os.environ.get("RSO_TF_PYTHON") or os.path.join(_HERE, "..", ".venv-tf", "bin",
                                                           "python")
    if not os.path.exists(path):
        if os.environ.get("CI"):
            raise RuntimeError(f"TensorFlow venv missing at {path}: scripts/test.sh makes it")
        pytest.skip("TensorFlow venv not built (run scripts/test.sh)")
    return path


def read_with_tensorflow(paths: list[str]) -> list[dict]:
    """Every example of the files, as {feature: {"kind": ..., "value": [...]}}."""
    out = subprocess.run([tensorflow_python(), os.path.join(_HERE, "tf_reader.py"), *paths],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        raise AssertionError(f"TensorFlow could not read {paths}: {out.stderr[-2000:]}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
