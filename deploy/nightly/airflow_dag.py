"""Airflow (Cloud Composer) DAG: the nightly RSO refresh from the Dataflow Flex Template.

Copy this file to the Composer environment's ``dags/`` folder. Two tasks:

1. ``generate``: ``DataflowStartFlexTemplateOperator`` launches the template built from
   ``deploy/dataflow/flex_template/`` (its launcher image is the worker image plus Google's
   launcher, so no Composer worker or other machine holds the models) with
   :data:`TEMPLATE_PARAMETERS`: the night's partition ``ROOT/dt={{ ds }}`` and
   ``reuse_candidates`` = ROOT, so only prompts no earlier night stored are decoded
   (docs/CANDIDATES.md, Incremental runs). It waits for the job to finish.
2. ``publish``: a pod of the worker image runs ``deploy/nightly/publish.py`` to move ``LATEST``
   to the partition, only if it has ``_SUCCESS``. No retention: with reuse on, old nights'
   candidates are still in use (``publish --keep`` is refused).

``RUN_DATE`` is the run's logical date (``{{ ds }}``), so ``airflow dags backfill`` fills past
nights into their own partitions (a backfill never moves ``LATEST`` back). A relaunch of a night
whose partition is complete fails at the launcher (the output exists) and leaves it as it was.

Settings come from Airflow Variables (Admin > Variables): ``rso_template`` (gs:// path of the
template spec), ``rso_image`` (the worker image), ``rso_project``, ``rso_region``,
``rso_bucket``, ``rso_output_root``, ``rso_config`` (a YAML in gs:// with input, policy,
reward_model and the settings). Credentials: Composer's service account and the pod's
Kubernetes service account bound with Workload Identity (Dataflow Developer, Storage Object
Admin on the bucket, Service Account User on the workers' account); no keys are stored.

Requires ``apache-airflow-providers-google`` and ``apache-airflow-providers-cncf-kubernetes``
(both in Composer).
"""
from __future__ import annotations

import datetime

from airflow import DAG
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.providers.google.cloud.operators.dataflow import DataflowStartFlexTemplateOperator

ROOT = "{{ var.value.rso_output_root }}"
# The template's parameters (deploy/dataflow/flex_template/metadata.json); a literal, so
# tests/test_deploy.py parses them with GenerateConfig and builds the job graph offline.
TEMPLATE_PARAMETERS = {
    "config": "{{ var.value.rso_config }}",
    "output": "{{ var.value.rso_output_root }}/dt={{ ds }}",
    "reuse_candidates": "{{ var.value.rso_output_root }}",
}
# GPU workers as deploy/dataflow/run.sh starts them (README "Why these options").
ENVIRONMENT = {
    "sdkContainerImage": "{{ var.value.rso_image }}",
    "tempLocation": "{{ var.value.rso_bucket }}/tmp",
    "stagingLocation": "{{ var.value.rso_bucket }}/staging",
    "machineType": "g2-standard-8",
    "numWorkers": 1,
    "maxWorkers": 4,
    "additionalExperiments": ["use_runner_v2", "no_use_multiple_sdk_containers",
                              "worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver"],
}

with DAG(
    dag_id="rso_nightly_refresh",
    schedule="30 2 * * *",  # 02:30 UTC
    start_date=datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc),
    catchup=False,
    max_active_runs=1,  # never two nights at once: a night reuses the ones before it
    default_args={"retries": 1, "retry_delay": datetime.timedelta(minutes=30)},
    tags=["rso"],
) as dag:
    generate = DataflowStartFlexTemplateOperator(
        task_id="generate",
        project_id="{{ var.value.rso_project }}",
        location="{{ var.value.rso_region }}",
        body={"launchParameter": {
            "jobName": "rso-nightly-{{ ds_nodash }}",
            "containerSpecGcsPath": "{{ var.value.rso_template }}",
            "parameters": TEMPLATE_PARAMETERS,
            "environment": ENVIRONMENT,
        }},
        wait_until_finished=True,
        execution_timeout=datetime.timedelta(hours=12),
    )
    publish = KubernetesPodOperator(
        task_id="publish",
        name="rso-nightly-publish",
        namespace="composer-user-workloads",
        service_account_name="rso-launcher",
        image="{{ var.value.rso_image }}",
        cmds=["python", "-m", "deploy.nightly.publish", "publish", ROOT, "dt={{ ds }}"],
        container_resources={"requests": {"cpu": "1", "memory": "1Gi"}},
        get_logs=True,
        on_finish_action="delete_pod",
    )
    generate >> publish
