"""Airflow (Cloud Composer) DAG: the nightly RSO refresh as one Kubernetes pod.

Copy this file to the Composer environment's ``dags/`` folder. The pod runs the worker image built
from ``deploy/dataflow/Dockerfile`` (it holds this package, the models or ``RSO_MODELS_GCS``, and
``deploy/``) and executes ``deploy/nightly/refresh.sh``, which launches the Dataflow job, waits for
it, and moves ``LATEST`` only after ``_SUCCESS``. Airflow adds the schedule, retries, alerting and
backfills: ``RUN_DATE`` is the run's logical date (``{{ ds }}``), so ``airflow dags backfill``
fills past nights into their own dated directories (a backfill never moves ``LATEST`` back).

Settings come from Airflow Variables (Admin > Variables): ``rso_image``, ``rso_project``,
``rso_region``, ``rso_bucket``, ``rso_output_root``, ``rso_config`` (a YAML path readable in the
pod, e.g. gs://...), ``rso_keep``. Credentials: the pod's Kubernetes service account, bound to a
Google service account with Workload Identity (Dataflow Developer, Storage Object Admin on the
bucket, Service Account User on the workers' account); no keys are stored anywhere.

Requires ``apache-airflow-providers-cncf-kubernetes`` (installed in Composer).
"""
from __future__ import annotations

import datetime

from airflow import DAG
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

with DAG(
    dag_id="rso_nightly_refresh",
    schedule="30 2 * * *",  # 02:30 UTC
    start_date=datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc),
    catchup=False,
    max_active_runs=1,  # never two refreshes at once (refresh.sh also takes a lock)
    default_args={"retries": 1, "retry_delay": datetime.timedelta(minutes=30)},
    tags=["rso"],
) as dag:
    KubernetesPodOperator(
        task_id="generate_and_publish",
        name="rso-nightly-refresh",
        namespace="composer-user-workloads",
        service_account_name="rso-launcher",
        image="{{ var.value.rso_image }}",
        cmds=["/opt/rso/deploy/nightly/refresh.sh"],
        env_vars={
            "RUN_DATE": "{{ ds }}",
            "OUTPUT_ROOT": "{{ var.value.rso_output_root }}",
            "KEEP": "{{ var.value.get('rso_keep', '14') }}",
            "PROJECT": "{{ var.value.rso_project }}",
            "REGION": "{{ var.value.rso_region }}",
            "BUCKET": "{{ var.value.rso_bucket }}",
            "IMAGE": "{{ var.value.rso_image }}",
            "CONFIG": "{{ var.value.rso_config }}",
            "SETUP_FILE": "",  # the image already holds the code
            "LOCK_FILE": "",  # one pod per run; max_active_runs=1 prevents overlap
        },
        container_resources={"requests": {"cpu": "2", "memory": "8Gi"}},
        execution_timeout=datetime.timedelta(hours=12),
        get_logs=True,
        on_finish_action="delete_pod",
    )
