#!/bin/sh
# Container entrypoint: fetch the models if the image names a GCS prefix, then hand over to the
# Beam SDK boot program with the arguments the runner passed (Dataflow and Flink both require it).
set -eu
if [ -n "${RSO_MODELS_GCS:-}" ]; then
  python /opt/rso/deploy/dataflow/fetch_models.py "$RSO_MODELS_GCS" /models
fi
exec /opt/apache/beam/boot "$@"
