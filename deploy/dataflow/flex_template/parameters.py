"""The Flex Template's parameters, generated from ``GenerateConfig``'s fields (no list kept by
hand), and the translation of the launcher's ``--name=value`` arguments into ``rso generate``
flags.

    python -m deploy.dataflow.flex_template.parameters > deploy/dataflow/flex_template/metadata.json
    python -m deploy.dataflow.flex_template.parameters --check   # exit 1 if the file is stale

Dataflow passes each template parameter to the launcher as ``--name=value`` (names are the
config keys, with underscores). Values are strings: booleans ``true``/``false``, a list (the
reward models) ``;``-separated, ``{run_date}`` in ``output`` the launch's UTC date (so a
fixed scheduler request writes ``ROOT/dt={run_date}``). Every other argument (Beam's pipeline
options, which Dataflow adds itself) passes through unchanged.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys
import typing
from collections.abc import Sequence
from typing import Any, get_args, get_origin

from beam_pipelines.config import GenerateConfig
from rso.config import strip_optional

METADATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metadata.json")
NAME = "rso generate (nightly RSO preference data)"
# Config keys a template job does not take: `candidates` is rso select's; `overwrite` is
# refused for a job the launcher does not wait for (beam_pipelines.pipeline.run).
NOT_EXPOSED = ("candidates", "overwrite")
CONFIG = "config"  # --config YAML: not a field, but a parameter
LIST_SEPARATOR = ";"
RUN_DATE = "{run_date}"

INT = r"^-?[0-9]+$"
FLOAT = r"^(-?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?|inf|-inf)$"
BOOL = r"^(true|false)$"


def _fields() -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(GenerateConfig)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(GenerateConfig)
            if f.name not in NOT_EXPOSED}


def _regex(tp: Any) -> str | None:
    inner, _ = strip_optional(tp)
    if inner is bool:
        return BOOL
    if inner is int:
        return INT
    if inner is float:
        return FLOAT
    if get_origin(inner) is typing.Literal:
        return "^(" + "|".join(str(a) for a in get_args(inner)) + ")$"
    return None


def parameters() -> list[dict[str, Any]]:
    """One metadata parameter per exposed ``GenerateConfig`` field (name, label, helpText,
    isOptional, regexes, paramType), plus ``config``."""
    out = [{"name": CONFIG, "label": "Config file",
            "helpText": "YAML file of rso generate settings (gs://...); parameters override it",
            "isOptional": True, "paramType": "TEXT"}]
    for name, (f, tp) in _fields().items():
        param: dict[str, Any] = {
            "name": name, "label": name.replace("_", " ").capitalize(),
            "helpText": f.metadata.get("help", ""), "isOptional": True, "paramType": "TEXT"}
        if get_origin(strip_optional(tp)[0]) is list:
            param["helpText"] += f" ({LIST_SEPARATOR}-separated)"
        regex = _regex(tp)
        if regex:
            param["regexes"] = [regex]
        if name == "output":
            param["helpText"] += f"; {RUN_DATE} is replaced by the launch's UTC date"
        out.append(param)
    return out


def metadata() -> dict[str, Any]:
    return {"name": NAME,
            "description": "RSO preference data: read, render, generate, reward, select, pair, "
                           "write (beam_pipelines/pipeline.py). Generated from GenerateConfig "
                           "by deploy/dataflow/flex_template/parameters.py.",
            "parameters": parameters()}


def render() -> str:
    return json.dumps(metadata(), indent=2, ensure_ascii=False) + "\n"


def to_flags(argv: Sequence[str], today: datetime.date | None = None) -> list[str]:
    """The launcher's arguments as ``rso generate`` flags (see the module doc)."""
    fields = _fields()
    date = (today or datetime.datetime.now(datetime.timezone.utc).date()).isoformat()
    out: list[str] = []
    for arg in argv:
        name, sep, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if not sep or (name not in fields and name != CONFIG):
            out.append(arg)
            continue
        flag = "--" + name.replace("_", "-")
        if name == CONFIG:
            out += [flag, value]
            continue
        inner, _ = strip_optional(fields[name][1])
        if inner is bool:
            out.append(flag if value.lower() == "true" else "--no-" + flag[2:])
        elif get_origin(inner) is list:
            out += [x for item in value.split(LIST_SEPARATOR) if item for x in (flag, item)]
        else:
            out += [flag, value.replace(RUN_DATE, date) if name == "output" else value]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--check"]:
        with open(METADATA, encoding="utf-8") as f:
            if f.read() != render():
                print(f"{METADATA} is stale: regenerate it with python -m "
                      f"deploy.dataflow.flex_template.parameters > {METADATA}", file=sys.stderr)
                return 1
        return 0
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
