#!/usr/bin/env bash
# Cloud Scheduler: the nightly refresh without a VM or Airflow. Two ways (run once to set up;
# needs gcloud, authenticated as someone allowed to create them):
#
# 1. TEMPLATE set (gs:// path of the Flex Template spec built from deploy/dataflow/flex_template/):
#    Cloud Scheduler calls the Dataflow flexTemplates:launch API every night with a fixed request:
#    output OUTPUT_ROOT/dt={run_date} (the launcher puts in the launch's UTC date) and
#    reuse_candidates OUTPUT_ROOT. The launcher is the worker image plus Google's launcher, so no
#    machine of yours holds the models. Nothing runs after the job, so LATEST is not moved: read
#    the newest dt= partition with _SUCCESS, or use way 2 or the Airflow DAG (which publish).
#      PROJECT=... REGION=us-central1 BUCKET=gs://... IMAGE=... CONFIG=gs://.../rso.yaml \
#      OUTPUT_ROOT=gs://.../rso/nightly TEMPLATE=gs://.../templates/rso-generate.json \
#      SCHEDULER_SA=rso-scheduler@PROJECT.iam.gserviceaccount.com deploy/nightly/cloud_scheduler.sh
#    SCHEDULER_SA needs Dataflow Developer, Storage Object Admin on the bucket and Service
#    Account User on the workers' account.
# 2. Without TEMPLATE: a Cloud Run job runs the worker image with deploy/nightly/refresh.sh
#    (dt= partition, --reuse-candidates, LATEST after _SUCCESS); Cloud Scheduler starts it
#    through the Cloud Run Admin API. Also needs LAUNCHER_SA (Dataflow Developer, Storage Object
#    Admin, Service Account User); SCHEDULER_SA needs Cloud Run Invoker on the job. A Cloud Run
#    task may run up to 24 h (--task-timeout); RUN_DATE defaults to today (UTC).
# DRY_RUN=1 prints the gcloud commands instead of running them.
set -euo pipefail
: "${PROJECT:?}" "${REGION:?}" "${BUCKET:?}" "${IMAGE:?}" "${CONFIG:?}" "${OUTPUT_ROOT:?}"
: "${SCHEDULER_SA:?}"
JOB="${JOB:-rso-nightly-refresh}"
OUTPUT_ROOT="${OUTPUT_ROOT%/}"
BUCKET="${BUCKET%/}"

run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

if [[ -n "${TEMPLATE:-}" ]]; then
  # The template's parameters (deploy/dataflow/flex_template/metadata.json) and GPU workers as
  # deploy/dataflow/run.sh starts them.
  BODY=$(tr '\n' ' ' <<JSON
{"launchParameter": {"jobName": "$JOB", "containerSpecGcsPath": "$TEMPLATE",
 "parameters": {"config": "$CONFIG", "output": "$OUTPUT_ROOT/dt={run_date}",
                "reuse_candidates": "$OUTPUT_ROOT"},
 "environment": {"sdkContainerImage": "$IMAGE", "tempLocation": "$BUCKET/tmp",
                 "stagingLocation": "$BUCKET/staging", "machineType": "g2-standard-8",
                 "numWorkers": 1, "maxWorkers": 4,
                 "additionalExperiments": ["use_runner_v2", "no_use_multiple_sdk_containers",
                   "worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver"]}}}
JSON
)
  run gcloud scheduler jobs create http "$JOB" \
    --project "$PROJECT" --location "$REGION" \
    --schedule "30 2 * * *" --time-zone UTC \
    --http-method POST \
    --uri "https://dataflow.googleapis.com/v1b3/projects/$PROJECT/locations/$REGION/flexTemplates:launch" \
    --headers "Content-Type=application/json" \
    --message-body "$BODY" \
    --oauth-service-account-email "$SCHEDULER_SA"
  exit 0
fi

: "${LAUNCHER_SA:?}"
run gcloud run jobs deploy "$JOB" \
  --project "$PROJECT" --region "$REGION" --image "$IMAGE" \
  --command /opt/rso/deploy/nightly/refresh.sh \
  --set-env-vars "^|^PROJECT=$PROJECT|REGION=$REGION|BUCKET=$BUCKET|IMAGE=$IMAGE|CONFIG=$CONFIG|OUTPUT_ROOT=$OUTPUT_ROOT|SETUP_FILE=|LOCK_FILE=" \
  --service-account "$LAUNCHER_SA" \
  --cpu 2 --memory 8Gi --task-timeout 24h --max-retries 0 --tasks 1

run gcloud scheduler jobs create http "$JOB" \
  --project "$PROJECT" --location "$REGION" \
  --schedule "30 2 * * *" --time-zone UTC \
  --http-method POST \
  --uri "https://run.googleapis.com/v2/projects/$PROJECT/locations/$REGION/jobs/$JOB:run" \
  --oauth-service-account-email "$SCHEDULER_SA"
