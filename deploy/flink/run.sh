#!/usr/bin/env bash
# Runs `rso generate` on Apache Flink through Beam's portable runner.
#
# Two ways to reach Flink (see deploy/README.md):
#   FLINK_MASTER=host:8081   FlinkRunner: Beam starts a Flink job server for you (it needs the
#                            beam-runners-flink job-server jar: downloaded from Maven Central on
#                            first use, or FLINK_JOB_SERVER_JAR=/path/to.jar when offline).
#   JOB_ENDPOINT=host:8099   PortableRunner against a job server you run yourself (e.g. the
#                            apache/beam_flink<ver>_job_server container next to the cluster).
#
# Where the Python SDK workers run (ENVIRONMENT_TYPE):
#   DOCKER (default)  each TaskManager starts ENVIRONMENT_CONFIG (default: $IMAGE), the image
#                     built from deploy/dataflow/Dockerfile (Beam SDK + this package + models);
#   EXTERNAL          a worker pool already running beside each TaskManager
#                     (python -m apache_beam.runners.worker.worker_pool_main --service_port=50000);
#                     ENVIRONMENT_CONFIG=localhost:50000;
#   LOOPBACK          in this process (local testing only; what the tests use).
#
# Required: INPUT, OUTPUT, POLICY, REWARD_MODEL (model directories must exist at the same path
# here and on the workers; see deploy/README.md). Optional: CONFIG (a YAML for `rso generate`),
# PARALLELISM, SDK_WORKER_PARALLELISM (default 1: one SDK harness, so one model, per TaskManager
# slot group), FLINK_VERSION, PYTHON (default: python), JOB_NAME, DRY_RUN=1 (print the command
# and exit). Every argument is passed on to `rso generate` (pipeline flags or Beam options).
set -euo pipefail

: "${INPUT:?set INPUT (prompts: file, glob or gs:// path)}"
: "${OUTPUT:?set OUTPUT (output directory, local or gs://)}"
: "${POLICY:?set POLICY (SFT model directory)}"
: "${REWARD_MODEL:?set REWARD_MODEL (reward model directory[,weight=W][,kind=...])}"

PYTHON="${PYTHON:-python}"
ENVIRONMENT_TYPE="${ENVIRONMENT_TYPE:-DOCKER}"
SDK_WORKER_PARALLELISM="${SDK_WORKER_PARALLELISM:-1}"
JOB_NAME="${JOB_NAME:-rso-generate-$(date -u +%Y%m%d-%H%M%S)}"

args=(-m rso_cli.cli generate --input "$INPUT" --output "$OUTPUT" --policy "$POLICY"
      --reward-model "$REWARD_MODEL")
if [[ -n "${CONFIG:-}" ]]; then
  args+=(--config "$CONFIG")
fi

if [[ -n "${JOB_ENDPOINT:-}" ]]; then
  args+=(--runner PortableRunner --job_endpoint "$JOB_ENDPOINT")
elif [[ -n "${FLINK_MASTER:-}" ]]; then
  args+=(--runner FlinkRunner --flink_master "$FLINK_MASTER")
  [[ -n "${FLINK_VERSION:-}" ]] && args+=(--flink_version "$FLINK_VERSION")
  [[ -n "${FLINK_JOB_SERVER_JAR:-}" ]] && args+=(--flink_job_server_jar "$FLINK_JOB_SERVER_JAR")
else
  echo "run.sh: set FLINK_MASTER (host:port of the Flink REST endpoint) or JOB_ENDPOINT" \
       "(host:port of a Beam job server)" >&2
  exit 2
fi

args+=(--job_name "$JOB_NAME" --environment_type "$ENVIRONMENT_TYPE"
       --sdk_worker_parallelism "$SDK_WORKER_PARALLELISM")
case "$ENVIRONMENT_TYPE" in
  DOCKER)
    : "${ENVIRONMENT_CONFIG:=${IMAGE:?set IMAGE (SDK container image) or ENVIRONMENT_CONFIG}}"
    args+=(--environment_config "$ENVIRONMENT_CONFIG") ;;
  EXTERNAL)
    args+=(--environment_config "${ENVIRONMENT_CONFIG:-localhost:50000}") ;;
  LOOPBACK) ;;
  *)
    echo "run.sh: ENVIRONMENT_TYPE must be DOCKER, EXTERNAL or LOOPBACK," \
         "got '$ENVIRONMENT_TYPE'" >&2
    exit 2 ;;
esac
[[ -n "${PARALLELISM:-}" ]] && args+=(--parallelism "$PARALLELISM")

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "$PYTHON" "${args[@]}" "$@"
  printf '\n'
  exit 0
fi
exec "$PYTHON" "${args[@]}" "$@"
