"""Range checks for user-given settings: one function per kind of check, one clear line per failure;
and the typed fields of the metadata files memdec reads (``check_field``, one ``Kind`` per type).

Every command validates its arguments with these before it loads a model or writes a file.
NaN fails every check (comparisons with NaN are false).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Callable

from .errors import MemdecError


def _number(value, what: str, error: type[MemdecError] = MemdecError) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise error(f"{what} must be a number, got {value!r}") from None


def check_unit_interval(value, what: str) -> float:
    """A number in [0, 1] (a weight such as λ or α), as a float."""
    x = _number(value, what)
    if not 0.0 <= x <= 1.0:
        raise MemdecError(f"{what} must lie in [0, 1], got {value}")
    return x


def check_lambda(value, what: str = "lambda") -> float:
    """λ, the memory decoder's weight in the mixture: a number in [0, 1]."""
    return check_unit_interval(value, what)


def check_positive(value, what: str, error: type[MemdecError] = MemdecError) -> float:
    """A finite number > 0 (a learning rate, a temperature, a norm)."""
    x = _number(value, what, error)
    if not (math.isfinite(x) and x > 0):
        raise error(f"{what} must be a positive number, got {value}")
    return x


def check_temperature(value, what: str = "temperature", error: type[MemdecError] = MemdecError) -> float:
    """A softmax temperature: a finite number > 0 (``error``: the MemdecError kind to raise)."""
    return check_positive(value, what, error)


def check_non_negative(value, what: str) -> float:
    """A finite number >= 0."""
    x = _number(value, what)
    if not (math.isfinite(x) and x >= 0):
        raise MemdecError(f"{what} must be a number >= 0, got {value}")
    return x


def check_positive_int(value, what: str) -> int:
    """An integer >= 1 (a count, a size, an interval)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MemdecError(f"{what} must be a whole number >= 1, got {value}")
    return value


# --- fields of the metadata files memdec reads (memdec.json, manifest.json, state.json, ...) ----


@dataclass(frozen=True)
class Kind:
    """What a metadata field must hold: ``text`` says it in an error, ``test`` checks a value."""

    text: str
    test: Callable[[object], bool]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON's true is no number


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


TEXT = Kind("a string", lambda v: isinstance(v, str))
BOOL = Kind("true or false", lambda v: isinstance(v, bool))
WHOLE = Kind("a whole number >= 0", lambda v: _is_int(v) and v >= 0)
COUNT = Kind("a whole number >= 1", lambda v: _is_int(v) and v >= 1)
NON_NEGATIVE = Kind("a number >= 0", lambda v: _is_number(v) and v >= 0)
POSITIVE = Kind("a positive number", lambda v: _is_number(v) and v > 0)
SCORE = Kind("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v))
UNIT = Kind("a number in [0, 1]", lambda v: _is_number(v) and 0 <= v <= 1)
OBJECT = Kind("a JSON object", lambda v: isinstance(v, dict))
LIST = Kind("a JSON list", lambda v: isinstance(v, list))


def one_of(*choices) -> Kind:
    """A field that must equal one of ``choices``, of the same JSON type (``true`` is not ``1``)."""
    return Kind(f"one of {', '.join(shown(c) for c in choices)}",
                lambda v: any(type(v) is type(c) and v == c for c in choices))


def or_null(kind: Kind) -> Kind:
    """``kind``, or null (a field that must be there but may be empty)."""
    return Kind(f"{kind.text} or null", lambda v: v is None or kind.test(v))


def shown(value, limit: int = 60) -> str:
    """A value as JSON, cut to ``limit`` characters: what an error says a field held."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_field(record: dict, name: str, where, kind: Kind, *, optional: bool = False,
                error: type[MemdecError] = MemdecError):
    """The field ``name`` (dotted for a nested one: ``steps.targets.k``) of ``record``, the JSON
    object read from the file ``where``, if it is ``kind``; ``optional``: None where it is absent or
    null. Raises ``error`` naming the file and the field: ``manifest.json: field "dim" must be a
    whole number >= 1, got "abc"``."""
    value, parts = record, name.split(".")
    for i, part in enumerate(parts):
        if not isinstance(value, dict):
            raise error(f'{where}: field "{".".join(parts[:i])}" must be a JSON object, got {shown(value)}')
        if value.get(part) is None:
            if optional:
                return None
            if part not in value:
                raise error(f'{where}: lacks field "{".".join(parts[: i + 1])}"')
        value = value[part]
    if not kind.test(value):
        raise error(f'{where}: field "{name}" must be {kind.text}, got {shown(value)}')
    return value


def check_fields(record: dict, where, fields: dict[str, Kind], *, optional: bool = False,
                 error: type[MemdecError] = MemdecError) -> None:
    """``check_field`` for each ``name: kind`` of ``fields``, in order."""
    for name, kind in fields.items():
        check_field(record, name, where, kind, optional=optional, error=error)
