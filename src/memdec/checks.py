"""Range checks for user-given settings: one function per kind of check, one clear line per failure.

Every command validates its arguments with these before it loads a model or writes a file.
NaN fails every check (comparisons with NaN are false).
"""

from __future__ import annotations

import math

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
