#!/usr/bin/env bash
# Sets up everything the tests need (idempotent) and runs the whole suite on CPU, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# An independent TFRecord reader: TensorFlow's own, in a separate venv (it must not share the
# pipeline's protobuf/numpy pins). The tests call it through tests/tf_reader.py.
if [ ! -x .venv-tf/bin/python ]; then
  "${PYTHON:-python3.11}" -m venv .venv-tf
  .venv-tf/bin/pip install -q tensorflow-cpu==2.21.0
fi
export RSO_TF_PYTHON="$PWD/.venv-tf/bin/python"
# Lint (ruff.toml) and types (mypy.ini: rso/ and the pure modules) before the tests.
.venv/bin/ruff check .
.venv/bin/mypy
exec .venv/bin/python -m pytest -q -p no:cacheprovider --timeout=900 --durations=15 tests "$@"
