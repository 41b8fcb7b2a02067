#!/usr/bin/env bash
# Cloud Scheduler + Cloud Run job: the nightly refresh without a VM or Airflow.
#
# Cloud Run runs the worker image (deploy/dataflow/Dockerfile) with deploy/nightly/refresh.sh as
# its command: it launches the Dataflow job, waits, and moves LATEST after _SUCCESS. Cloud
# Scheduler starts that Cloud Run job every night through the Cloud Run Admin API.
# Run once to set up (needs gcloud, authenticated as someone allowed to create both):
#   PROJECT=... REGION=us-central1 BUCKET=gs://... IMAGE=... CONFIG=gs://.../rso.yaml \
#   OUTPUT_ROOT=gs://.../rso/nightly LAUNCHER_SA=rso-launcher@PROJECT.iam.gserviceaccount.com \
#   SCHEDULER_SA=rso-scheduler@PROJECT.iam.gserviceaccount.com deploy/nightly/cloud_scheduler.sh
# LAUNCHER_SA needs Dataflow Developer, Storage Object Admin on the bucket and Service Account
# User on the Dataflow workers' account; SCHEDULER_SA needs Cloud Run Invoker on the job.
# A Cloud Run job task may run up to 24 h (--task-timeout); RUN_DATE defaults to today (UTC).
set -euo pipefail
: "${PROJECT:?}" "${REGION:?}" "${BUCKET:?}" "${IMAGE:?}" "${CONFIG:?}" "${OUTPUT_ROOT:?}"
: "${LAUNCHER_SA:?}" "${SCHEDULER_SA:?}"
JOB="${JOB:-rso-nightly-refresh}"

gcloud run jobs deploy "$JOB" \
  --project "$PROJECT" --region "$REGION" --image "$IMAGE" \
  --command /opt/rso/deploy/nightly/refresh.sh \
  --set-env-vars "^|^PROJECT=$PROJECT|REGION=$REGION|BUCKET=$BUCKET|IMAGE=$IMAGE|CONFIG=$CONFIG|OUTPUT_ROOT=$OUTPUT_ROOT|KEEP=${KEEP:-14}|SETUP_FILE=|LOCK_FILE=" \
  --service-account "$LAUNCHER_SA" \
  --cpu 2 --memory 8Gi --task-timeout 24h --max-retries 0 --tasks 1

gcloud scheduler jobs create http "$JOB" \
  --project "$PROJECT" --location "$REGION" \
  --schedule "30 2 * * *" --time-zone UTC \
  --http-method POST \
  --uri "https://run.googleapis.com/v2/projects/$PROJECT/locations/$REGION/jobs/$JOB:run" \
  --oauth-service-account-email "$SCHEDULER_SA"
