"""Typed configuration shared by `rso generate` and `rso train`.

A config is a dataclass whose fields carry their help text (``option(default, "help")``). It is
built from an optional YAML file and command-line flags, flags winning; unknown keys and unknown
flags are errors (except where a caller passes them on, as `rso generate` does to Beam).
Checks are declared once, on the fields (``option(..., min=1)``, ``finite=True``, ``choices``,
or a ``Literal`` type) and run whenever a config is constructed (``__post_init__``, as vLLM's
``SamplingParams.__post_init__`` does), so an instance with an out-of-range value cannot exist.
``validate()`` adds the cross-field and filesystem checks, once, at start. Both raise
:class:`ConfigError` with one clear line; :meth:`Config.parse_args` prints such errors (and
argparse's) as one line ``PROG: error: ...`` and exits 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

C = TypeVar("C", bound="Config")


class ConfigError(ValueError):
    """A configuration that cannot run: raised at start, before any work."""


def option(default: Any = dataclasses.MISSING, help: str = "", *, flag: str | None = None,
           short: str | None = None, choices: Sequence[Any] | None = None,
           min: float | None = None, max: float | None = None, gt: float | None = None,
           lt: float | None = None, finite: bool = False) -> Any:
    """A config field with its help text and its checks. Mutable defaults are copied per instance.

    Checks (run by ``Config.__post_init__`` on every construction; ``None`` is always allowed
    for an ``Optional`` field): ``choices`` (also implied by a ``Literal`` type), ``min``/``max``
    (inclusive bounds), ``gt``/``lt`` (exclusive bounds), ``finite`` (no NaN or infinity; NaN
    also fails every bound, since it compares false with everything).
    """
    metadata = {"help": help, "flag": flag, "short": short, "choices": choices, "min": min,
                "max": max, "gt": gt, "lt": lt, "finite": finite}
    if isinstance(default, (list, dict)):
        factory: Callable[[], Any] = functools.partial(type(default), default)
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def strip_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _coerce(name: str, tp: Any, value: Any) -> Any:
    """Converts a YAML or flag value to the field's declared type, or raises ConfigError."""
    tp, optional = strip_optional(tp)
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
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            nested: Any = tp
            if isinstance(value, tp):
                return value
            if isinstance(value, str) and hasattr(tp, "from_string"):
                return nested.from_string(value)
            if isinstance(value, dict):
                return nested.from_dict(value, prefix=f"{name}.")
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


def check_field(label: str, tp: Any, meta: Any, value: Any) -> None:
    """Raises ConfigError if ``value`` breaks the checks :func:`option` declared (see there)."""
    inner, optional = strip_optional(tp)
    if value is None:
        return
    choices = meta.get("choices") or (get_args(inner) if get_origin(inner) is Literal else None)
    if choices is not None:
        items = value if isinstance(value, (list, tuple)) else [value]
        for item in items:
            if item not in choices:
                raise ConfigError(f"{label}: {item!r} is not one of "
                                  f"{', '.join(map(str, choices))}")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    lo, hi, gt, lt = (meta.get(k) for k in ("min", "max", "gt", "lt"))
    nan = isinstance(value, float) and math.isnan(value)
    if meta.get("finite") and not math.isfinite(value):
        raise ConfigError(f"{label} must be finite, got {value}")
    if (lo is not None and (nan or value < lo)) or (hi is not None and (nan or value > hi)) or (
            gt is not None and (nan or value <= gt)) or (lt is not None and (nan or value >= lt)):
        bounds = [f">= {lo:g}" if lo is not None else "", f"> {gt:g}" if gt is not None else "",
                  f"<= {hi:g}" if hi is not None else "", f"< {lt:g}" if lt is not None else ""]
        raise ConfigError(f"{label} must be {' and '.join(b for b in bounds if b)}, got {value}")


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but an error is one line ``PROG: error: MESSAGE`` (exit 2), not the usage, and
    no flag may be abbreviated (``allow_abbrev`` False unless given; subcommands' parsers are of
    this class too, so theirs neither)."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        """argparse's, but an unknown flag is named with a "did you mean" (from this parser's
        and its subcommands' flags) and its value is never echoed (:func:`unknown_flags`)."""
        ns, rest = self.parse_known_args(args, namespace)
        message = unknown_flags(self, rest)
        if message:
            self.error(message)
        return ns


def check_optimizer(*, lr: float, weight_decay: float, max_grad_norm: float, warmup_steps: int,
                    adam_beta1: float = 0.9, adam_beta2: float = 0.999,
                    adam_eps: float = 1e-8) -> None:
    """ConfigError naming the flag for an AdamW setting that torch would refuse only at the
    first step, with a traceback (``--adam-beta1 2``, ``--lr -1``), or accept silently
    (``--weight-decay nan`` makes every weight NaN; ``--max-grad-norm nan`` turns clipping
    off): lr, weight decay and max grad norm finite and >= 0, betas in [0, 1), eps finite and
    > 0, warm-up steps >= 0."""
    for flag, value in (("lr", lr), ("weight-decay", weight_decay),
                        ("max-grad-norm", max_grad_norm)):
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"--{flag} must be a finite number >= 0, got {value}")
    for flag, value in (("adam-beta1", adam_beta1), ("adam-beta2", adam_beta2)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"--{flag} must be in [0, 1), got {value}")
    if not (math.isfinite(adam_eps) and adam_eps > 0):
        raise ConfigError(f"--adam-eps must be a finite number > 0, got {adam_eps}")
    if warmup_steps < 0:
        raise ConfigError(f"--warmup-steps must be >= 0, got {warmup_steps}")


def unknown_flags(parser: argparse.ArgumentParser, rest: Sequence[str],
                  passthrough: argparse.ArgumentParser | None = None) -> str | None:
    """:func:`unknown_flag_error` for what ``parser.parse_known_args`` left over (``rest``),
    less what ``passthrough`` (e.g. Beam's pipeline options) knows; None when nothing is
    unknown. Suggestions come from both parsers' flags."""
    unknown = list(rest)
    if passthrough is not None:
        _, unknown = passthrough.parse_known_args(rest)
    parsers = [p for p in (parser, passthrough) if p is not None]
    parsers += [sp for p in parsers for a in p._actions  # and their subcommands' parsers
                if isinstance(a, argparse._SubParsersAction) for sp in a.choices.values()]
    known = [o for p in parsers for o in p._option_string_actions]  # argparse: no public list
    return unknown_flag_error(unknown, known)


def unknown_flag_error(tokens: Sequence[str], known: Sequence[str]) -> str | None:
    """One line naming the flags in ``tokens`` (leftovers of argparse) with a "did you mean"
    from ``known``; values are never echoed (a secret given by mistake stays out of logs)."""
    # "--flag=VALUE" and "-fVALUE" (a short flag with its value attached) name the flag only
    flags = [t.split("=", 1)[0] if t.startswith("--") else t[:2] for t in tokens
             if t.startswith("-") and t != "--"]
    if not flags:
        return (f"{len(tokens)} unexpected argument(s) without a flag (values are not shown)"
                if tokens else None)
    parts = []
    for flag in flags:
        near = difflib.get_close_matches(flag, known, n=1, cutoff=0.6) or \
            difflib.get_close_matches(flag.replace("_", "-"), known, n=1, cutoff=0.6)
        parts.append(f"{flag} (did you mean {near[0]}?)" if near else flag)
    return f"unknown flag(s): {', '.join(parts)}"


@dataclasses.dataclass
class Config:
    """Base class: subclasses are dataclasses whose fields are declared with :func:`option`."""

    def __post_init__(self) -> None:
        for name, (f, tp) in self._fields().items():
            check_field(self._label(name), tp, f.metadata, getattr(self, name))

    @classmethod
    def _label(cls, name: str) -> str:
        """How an error names a field: its flag."""
        return "--" + name.replace("_", "-")

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
        missing = [prefix + n for n, (f, _) in fields.items()
                   if n not in kwargs and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"missing required setting(s): {', '.join(missing)}")
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls: type[C], path: str) -> C:
        from rso.storage import open_file

        try:
            with open_file(path, "r") as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"--config {path}: no such file") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or type(e).__name__
            raise ConfigError(f"--config {path}:{where}: not valid YAML ({problem})") from None
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
    def add_arguments(cls, parser: argparse.ArgumentParser, hidden: Sequence[str] = ()
                      ) -> None:
        """One flag per field (``--num-candidates`` for ``num_candidates``), default unset;
        the fields named in ``hidden`` are left out of ``--help`` (still parsed)."""
        for name, (f, tp) in cls._fields().items():
            flag = f.metadata.get("flag") or "--" + name.replace("_", "-")
            names = [flag] + ([f.metadata["short"]] if f.metadata.get("short") else [])
            inner, _ = strip_optional(tp)
            kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS,
                                  "help": f.metadata.get("help", "")}
            if inner is bool:
                kw["action"] = argparse.BooleanOptionalAction
            elif get_origin(inner) in (list, tuple, Sequence):
                kw["action"] = "append"  # repeat the flag, or give a comma-separated list
            if f.default not in (dataclasses.MISSING, None, ""):  # "": a path to be given
                kw["help"] += f" (default: {f.default})"
            # argparse %-formats help texts ("%(default)s"); a literal "%" must be doubled.
            kw["help"] = kw["help"].replace("%", "%%")
            if name in hidden:
                kw["help"] = argparse.SUPPRESS
            parser.add_argument(*names, **kw)

    @classmethod
    def parse_args(cls: type[C], argv: Sequence[str] | None = None, *, prog: str | None = None,
                   description: str | None = None, allow_unknown: bool = False,
                   passthrough: argparse.ArgumentParser | None = None,
                   exit_on_error: bool = False, hidden: Sequence[str] = ()
                   ) -> tuple[C, list[str]]:
        """``--config FILE.yaml`` then flags. Returns the validated config and the leftover
        flags, which must all be known to ``passthrough`` (a parser of the flags the caller
        passes on, e.g. Beam's pipeline options), or, with ``allow_unknown``, may be anything.
        Any other flag is an error naming it (never its value) with a "did you mean".

        Raises ConfigError, or with ``exit_on_error`` prints it as one line
        ``PROG: error: ...`` and exits 2 (argparse's own errors always do that). ``hidden``:
        fields ``--help`` leaves out.
        """
        parser = ArgumentParser(prog=prog, description=description)
        parser.add_argument("--config", default=None, help="YAML file; flags override it")
        cls.add_arguments(parser, hidden)
        try:
            ns, rest = parser.parse_known_args(argv)
            if not allow_unknown:
                message = unknown_flags(parser, rest, passthrough)
                if message:
                    raise ConfigError(message)
            return cls._from_namespace(ns), list(rest)
        except ConfigError as e:
            if not exit_on_error:
                raise
            parser.error(str(e))

    @classmethod
    def _from_namespace(cls: type[C], ns: argparse.Namespace) -> C:
        data: dict[str, Any] = {}
        if ns.config:
            data = cls.from_yaml(ns.config).to_dict()
        fields = cls._fields()
        for name, value in vars(ns).items():
            if name == "config":
                continue
            inner, _ = strip_optional(fields[name][1])
            if get_origin(inner) in (list, tuple, Sequence):
                value = [v for item in value for v in
                         (item.split(",") if _splittable(inner) else [item])]
            data[name] = value
        cfg = cls.from_dict(data)
        cfg.validate()
        return cfg


def _splittable(list_tp: Any) -> bool:
    (item_tp,) = get_args(list_tp)[:1]
    return item_tp in (int, float)
