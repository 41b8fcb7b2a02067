"""What a rerun keeps: an earlier output is kept when it is complete and is what this run would
write. `rso iterate` and `rso demo` run the same command again to continue an interrupted run;
these tell which of its steps' outputs can stay.

- a pipeline output (`rso generate`, `rso select`) is kept when it is complete (``_SUCCESS``)
  and its manifest's ``run_id`` is the one the step's flags resolve to
  (``GenerateConfig.resolved_run_id``: a digest of every setting and model that shapes the
  records);
- an evaluation is kept when its ``evaluation.json`` records the settings and model content ids
  the step's flags give (:func:`rso_cli.evaluate.finished_evaluation`);
- a training run is continued by ``rso train --resume``, which refuses other settings or data.
"""
from __future__ import annotations

from collections.abc import Sequence


def data_run_id(data: str) -> str | None:
    """The run id of the complete pipeline output in ``data``, or None (none there, or not
    finished)."""
    from rso.layout import is_complete
    from rso_cli.inspect_output import read_manifest

    if not is_complete(data):
        return None
    try:
        return read_manifest(data)["run_id"]
    except (OSError, ValueError):
        return None


def wanted_run_id(generate_argv: Sequence[str]) -> str | None:
    """The run id `rso generate generate_argv` would have (None when its flags do not parse:
    the step then says why)."""
    from beam_pipelines.config import GenerateConfig
    from beam_pipelines.pipeline import beam_option_parser
    from rso.config import ConfigError

    try:
        config, _ = GenerateConfig.parse_args(generate_argv, passthrough=beam_option_parser())
    except ConfigError:
        return None
    return config.resolved_run_id()


def wanted_select_run_id(select_argv: Sequence[str]) -> str | None:
    """The run id `rso select select_argv` would have (None when its flags or the candidate
    store are not usable: the step then says why)."""
    from beam_pipelines.pipeline import select_argv as full_argv
    from rso.config import ConfigError

    try:
        return wanted_run_id(full_argv(select_argv))
    except ConfigError:
        return None
