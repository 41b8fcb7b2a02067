"""Dataflow: worker image entrypoint helpers (fetch_models.py) and run.sh."""
