"""Typed configuration shared by `rso generate` and `rso train`.

A config is a dataclass whose fields carry their help text (``option(default, "help")``). It is
built from an optional YAML file and command-line flags, flags winning; unknown keys and unknown
flags are errors (except where a caller passes them on, as `rso generate` does to Beam).
``validate()`` checks values once, at start, and raises :class:`ConfigError` with one clear
message.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from typing import Any, Literal, Sequence, TypeVar, Union, get_args, get_origin

import yaml

C = TypeVar("C", bound="Config")


class ConfigError(ValueError):
    """A configuration that cannot run: raised at start, before any work."""


def option(default: Any = dataclasses.MISSING, help: str = "", *, flag: str | None = None,
           short: str | None = None) -> Any:
    """A config field with its help text. Mutable defaults (lists) are copied per instance."""
    metadata = {"help": help, "flag": flag, "short": short}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _coerce(name: str, tp: Any, value: Any) -> Any:
    """Converts a YAML or flag value to the field's declared type, or raises ConfigError."""
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name}: a value is required")
    origin = get_origin(tp)
    try:
        if origin is Literal:
            choices = get_args(tp)
            if value not in choices:
                raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(str, choices))}")
            return value
        if origin in (list, tuple, Sequence):
            (item_tp,) = get_args(tp)[:1]
            items = value if isinstance(value, (list, tuple)) else [value]
            return [_coerce(name, item_tp, v) for v in items]
        if dataclasses.is_dataclass(tp):
            if isinstance(value, tp):
                return value
            if isinstance(value, str) and hasattr(tp, "from_string"):
                return tp.from_string(value)
            if isinstance(value, dict):
                return tp.from_dict(value, prefix=f"{name}.")
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        if tp is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{name}: {value!r} is not a boolean")
        if tp is float:
            if isinstance(value, str) and value.lower() in ("inf", "infinity", "+inf"):
                return math.inf
            return float(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ConfigError(f"{name}: {value!r} is not an integer")
            return int(value)
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ConfigError(f"{name}: expected a string, got {value!r}")
            return str(value)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{name}: cannot read {value!r} as {getattr(tp, '__name__', tp)}") from e
    return value


@dataclasses.dataclass
class Config:
    """Base class: subclasses are dataclasses whose fields are declared with :func:`option`."""

    @classmethod
    def _fields(cls) -> dict[str, tuple[dataclasses.Field, Any]]:
        hints = typing.get_type_hints(cls)
        return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any], prefix: str = "") -> C:
        """Builds a config from a mapping; keys may use '-' or '_'. Unknown keys are errors."""
        fields = cls._fields()
        kwargs = {}
        unknown = []
        for key, value in (data or {}).items():
            name = str(key).replace("-", "_")
            if name not in fields:
                unknown.append(f"{prefix}{key}")
                continue
            kwargs[name] = _coerce(prefix + name, fields[name][1], value)
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(unknown)}; known keys are: "
                              f"{', '.join(prefix + n for n in fields)}")
        missing = [prefix + n for n, (f, _) in fields.items() if n not in kwargs
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"missing required setting(s): {', '.join(missing)}")
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls: type[C], path: str) -> C:
        from rso.storage import open_file

        with open_file(path, "r") as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a config file must be a YAML mapping")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        """Subclasses raise ConfigError for values that cannot run."""

    # ---------------------------------------------------------------- command line
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One flag per field (``--num-candidates`` for ``num_candidates``), default unset."""
        for name, (f, tp) in cls._fields().items():
            flag = f.metadata.get("flag") or "--" + name.replace("_", "-")
            names = [flag] + ([f.metadata["short"]] if f.metadata.get("short") else [])
            inner, _ = _strip_optional(tp)
            kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS,
                                  "help": f.metadata.get("help", "")}
            if inner is bool:
                kw["action"] = argparse.BooleanOptionalAction
            elif get_origin(inner) in (list, tuple, Sequence):
                kw["action"] = "append"  # repeat the flag, or give a comma-separated list
            if f.default is not dataclasses.MISSING and f.default is not None:
                kw["help"] += f" (default: {f.default})"
            # argparse %-formats help texts ("%(default)s"); a literal "%" must be doubled.
            kw["help"] = kw["help"].replace("%", "%%")
            parser.add_argument(*names, **kw)

    @classmethod
    def parse_args(cls: type[C], argv: Sequence[str] | None = None, *, prog: str | None = None,
                   description: str | None = None, allow_unknown: bool = False
                   ) -> tuple[C, list[str]]:
        """``--config FILE.yaml`` then flags. Returns the validated config and leftover flags
        (only when ``allow_unknown``; otherwise an unknown flag is an error)."""
        parser = argparse.ArgumentParser(prog=prog, description=description,
                                         allow_abbrev=False)
        parser.add_argument("--config", default=None, help="YAML file; flags override it")
        cls.add_arguments(parser)
        if allow_unknown:
            ns, rest = parser.parse_known_args(argv)
        else:
            ns, rest = parser.parse_args(argv), []
        data: dict[str, Any] = {}
        if ns.config:
            data = cls.from_yaml(ns.config).to_dict()
        fields = cls._fields()
        for name, value in vars(ns).items():
            if name == "config":
                continue
            inner, _ = _strip_optional(fields[name][1])
            if get_origin(inner) in (list, tuple, Sequence):
                value = [v for item in value for v in
                         (item.split(",") if _splittable(inner) else [item])]
            data[name] = value
        cfg = cls.from_dict(data)
        cfg.validate()
        return cfg, list(rest)


def _splittable(list_tp: Any) -> bool:
    (item_tp,) = get_args(list_tp)[:1]
    return item_tp in (int, float)
