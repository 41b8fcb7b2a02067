"""Deployment helpers (Dataflow, Flink, nightly refresh); see deploy/README.md."""
