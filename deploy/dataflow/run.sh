#!/usr/bin/env bash
# Runs `rso generate` on Google Cloud Dataflow (Runner v2) with GPU workers; blocks until the job
# ends, so its exit status is the job's. See deploy/README.md for the image and the reasoning.
#
# Required: PROJECT, REGION, BUCKET (gs://bucket[/prefix] for temp and staging files), IMAGE
# (the SDK container built from deploy/dataflow/Dockerfile, pushed to Artifact Registry).
# Pipeline settings: CONFIG (YAML for `rso generate`), and/or INPUT, OUTPUT, POLICY,
# REWARD_MODEL (several: separated by ';'), each passed on only when set (flags override CONFIG).
# Model directories must exist at the same path here and in the image (e.g. /models/policy).
# Workers: MACHINE_TYPE (g2-standard-8: 1 NVIDIA L4), GPU_TYPE (nvidia-l4; "none" for CPU
# workers), GPU_COUNT (1), NUM_WORKERS (1), MAX_NUM_WORKERS (4), DISK_SIZE_GB (100),
# HARNESS_THREADS (1: one bundle at a time per worker, see README), SETUP_FILE (default: this
# checkout's setup.py, so the workers re-install this checkout's code over the image's; empty to
# use the image's code as is).
# Optional: JOB_NAME, SERVICE_ACCOUNT, SUBNETWORK, NO_PUBLIC_IPS=1, PYTHON (python), DRY_RUN=1
# (print the command and exit), RSO_MODELS_GCS (copy gs://.../models to MODELS_DIR, default
# /models, before launching: what the image's entrypoint does on workers; set in images built
# with MODELS_GCS). Arguments are passed on to `rso generate`.
# Credentials come from the environment (gcloud auth application-default login, or the
# VM's service account); this script never reads or prints them.
set -euo pipefail

: "${PROJECT:?set PROJECT (GCP project id)}"
: "${REGION:?set REGION (Dataflow region, e.g. us-central1)}"
: "${BUCKET:?set BUCKET (gs://bucket[/prefix] for temp and staging files)}"
: "${IMAGE:?set IMAGE (SDK container image built from deploy/dataflow/Dockerfile)}"

REPO="$(cd "$(dirname "$0")/../.." && pwd)"
PYTHON="${PYTHON:-python}"
BUCKET="${BUCKET%/}"
JOB_NAME="${JOB_NAME:-rso-generate-$(date -u +%Y%m%d-%H%M%S)}"
MACHINE_TYPE="${MACHINE_TYPE:-g2-standard-8}"
GPU_TYPE="${GPU_TYPE:-nvidia-l4}"
GPU_COUNT="${GPU_COUNT:-1}"
SETUP_FILE="${SETUP_FILE-$REPO/setup.py}"

args=(-m rso_cli.cli generate)
[[ -n "${CONFIG:-}" ]] && args+=(--config "$CONFIG")
[[ -n "${INPUT:-}" ]] && args+=(--input "$INPUT")
[[ -n "${OUTPUT:-}" ]] && args+=(--output "$OUTPUT")
[[ -n "${POLICY:-}" ]] && args+=(--policy "$POLICY")
if [[ -n "${REWARD_MODEL:-}" ]]; then
  IFS=';' read -r -a reward_models <<< "$REWARD_MODEL"
  for rm in "${reward_models[@]}"; do
    args+=(--reward-model "$rm")
  done
fi

args+=(
  --runner DataflowRunner
  --project "$PROJECT"
  --region "$REGION"
  --job_name "$JOB_NAME"
  --temp_location "$BUCKET/tmp"
  --staging_location "$BUCKET/staging"
  --sdk_container_image "$IMAGE"
  --sdk_location container
  --experiments use_runner_v2
  # One SDK process per VM (not one per vCPU): one vLLM engine per GPU.
  --experiments no_use_multiple_sdk_containers
  --number_of_worker_harness_threads "${HARNESS_THREADS:-1}"
  --machine_type "$MACHINE_TYPE"
  --disk_size_gb "${DISK_SIZE_GB:-100}"
  --num_workers "${NUM_WORKERS:-1}"
  --max_num_workers "${MAX_NUM_WORKERS:-4}"
  --autoscaling_algorithm THROUGHPUT_BASED
)
if [[ "$GPU_TYPE" != none ]]; then
  args+=(--dataflow_service_options
         "worker_accelerator=type:$GPU_TYPE;count:$GPU_COUNT;install-nvidia-driver")
fi
[[ -n "$SETUP_FILE" ]] && args+=(--setup_file "$SETUP_FILE")
[[ -n "${SERVICE_ACCOUNT:-}" ]] && args+=(--service_account_email "$SERVICE_ACCOUNT")
[[ -n "${SUBNETWORK:-}" ]] && args+=(--subnetwork "$SUBNETWORK")
[[ "${NO_PUBLIC_IPS:-0}" == 1 ]] && args+=(--no_use_public_ips)

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "$PYTHON" "${args[@]}" "$@"
  printf '\n'
  exit 0
fi
if [[ -n "${RSO_MODELS_GCS:-}" ]]; then
  "$PYTHON" "$REPO/deploy/dataflow/fetch_models.py" "$RSO_MODELS_GCS" "${MODELS_DIR:-/models}"
fi
exec "$PYTHON" "${args[@]}" "$@"
