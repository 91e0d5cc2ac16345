"""How an option is declared: a dataclass field whose metadata carries its help text, flat key and checks.

Every stage config (``SamplingConfig``, ``ScoringConfig``, ``TrainConfig``, ``EvalConfig``, and the run,
model and data settings) declares its options once, with :func:`option`; ``__post_init__`` calls
:func:`check_options`, so a bad value is refused where the config is built, with the option's flat key
in the message. A field that only repeats an option declared elsewhere (``seed``, ``system_prompt``, ...)
is declared with :func:`shared`: it has no help text of its own and is filled from the same flat key.

Metadata keys: ``help``; ``stage`` (the first pipeline stage whose result the option changes, ``None``
for none); ``key`` (the flat YAML key and ``--flag`` name when it differs from the field name);
``choices``; ``range`` (interval notation, e.g. ``"[1,)"``, ``"(0,1]"``); ``shared``.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Iterable
from dataclasses import field
from typing import Any

STAGES = ("sample", "score", "train", "eval")


class ConfigError(ValueError):
    """A bad configuration value or file; the message names the key, value and file.

    ``key``: the flat option key at fault (None when the error is about a whole file).
    """

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    stage: str | None,
    key: str | None = None,
    choices: tuple[str, ...] | None = None,
    range: str | None = None,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field that is a pipeline option (a YAML key and a ``--flag``)."""
    if stage is not None and stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES} or None, got {stage!r}")
    meta = {"help": help, "stage": stage, "key": key, "choices": choices, "range": range}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def shared(key: str, default: Any) -> Any:
    """A field filled from the option ``key`` declared (with help and checks) by another config."""
    return field(default=default, metadata={"shared": True, "key": key})


def flat_key(f: dataclasses.Field) -> str:
    return f.metadata.get("key") or f.name


def is_option(f: dataclasses.Field) -> bool:
    return "help" in f.metadata or bool(f.metadata.get("shared"))


def option_fields(cls_or_obj: Any) -> list[dataclasses.Field]:
    """The fields of a config class (or instance) that are options, declared or shared."""
    return [f for f in dataclasses.fields(cls_or_obj) if is_option(f)]


# ---------------------------------------------------------------------- checks
def _parse_range(spec: str) -> tuple[float | None, bool, float | None, bool]:
    lo_closed, hi_closed = spec[0] == "[", spec[-1] == "]"
    lo, hi = (s.strip() for s in spec[1:-1].split(","))
    return (float(lo) if lo else None, lo_closed, float(hi) if hi else None, hi_closed)


def describe_range(spec: str) -> str:
    lo, lo_closed, hi, hi_closed = _parse_range(spec)
    fmt = "{:g}".format
    if hi is None:
        return f"{'>=' if lo_closed else '>'} {fmt(lo)}"
    if lo is None:
        return f"{'<=' if hi_closed else '<'} {fmt(hi)}"
    return f"in {spec[0]}{fmt(lo)}, {fmt(hi)}{spec[-1]}"


def in_range(value: float, spec: str) -> bool:
    lo, lo_closed, hi, hi_closed = _parse_range(spec)
    ok_lo = lo is None or (value >= lo if lo_closed else value > lo)
    ok_hi = hi is None or (value <= hi if hi_closed else value < hi)
    return bool(ok_lo and ok_hi)


def bad_value(key: str, rule: str, value: Any) -> ConfigError:
    """The one message shape of a refused value: ``KEY must be RULE, got VALUE``."""
    return ConfigError(f"{key} must be {rule}, got {value!r}", key=key)


def check_options(obj: Any) -> None:
    """Check every declared option of ``obj`` against its ``choices`` and ``range`` (None passes)."""
    hints = typing.get_type_hints(type(obj))
    for f in option_fields(obj):
        value = getattr(obj, f.name)
        if value is None:
            continue
        key = flat_key(f)
        base = strip_optional(hints[f.name])[1]
        if base is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise bad_value(key, "an integer", value)
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise bad_value(key, f"one of {', '.join(choices)}", value)
        spec = f.metadata.get("range")
        if spec and not (isinstance(value, (int, float)) and in_range(value, spec)):
            raise bad_value(key, describe_range(spec), value)


def strip_optional(tp: Any) -> tuple[bool, Any]:
    """``(is_optional, base type)`` of a type hint such as ``int | None``."""
    args = typing.get_args(tp)
    if args and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return True, rest[0]
    return False, tp


def suggest(word: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
