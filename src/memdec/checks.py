"""Range checks for user-given settings: one function per kind of check, one clear line per failure;
and the typed fields of the metadata files memdec reads (``check_field``, one ``Kind`` per type).

Every command validates its arguments with these before it loads a model or writes a file.
NaN fails every check (comparisons with NaN are false).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .errors import MemdecError


def _number(value, what: str, error: type[MemdecError] = MemdecError) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise error(f"{what} must be a number, got {value!r}") from None


# --- devices, thread counts, plain names and output paths -----------------------------------


_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_device(value, what: str = "--device") -> str:
    """A device that exists here: auto, cpu, cuda (with a GPU), cuda:N (N below the GPU count) or
    mps (where available). Returns it unchanged."""
    m = _DEVICE.match(str(value))
    if m is None:
        raise MemdecError(f"{what} must be auto, cpu, cuda, cuda:N or mps, got {value!r}")
    if value.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(m.group(2)[1:]) if m.group(2) else 0
        if index >= count:
            have = f"{count} CUDA device{'s' if count != 1 else ''}" if count else "no CUDA device"
            raise MemdecError(f"{what} {value}: this machine has {have}")
    if value == "mps" and not torch.backends.mps.is_available():
        raise MemdecError(f"{what} mps: MPS is not available on this machine")
    return value


def check_threads(value, what: str = "--threads") -> int | None:
    """A thread count: None (every core) or an integer >= 1."""
    return None if value is None else check_positive_int(value, what)


def check_plain_name(value, what: str) -> str:
    """A name that becomes a file name: no folder part, not empty, not ``.`` or ``..``."""
    name = str(value)
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or name != name.strip():
        raise MemdecError(f"{what} must be a plain name (no folder, no '/' or '..'), got {value!r}")
    return name


_MODEL_NAME = re.compile(r"[A-Za-z0-9][\w.:@+-]*")


def check_model_name(value, what: str) -> str:
    """A name a model is served under (``serve --memdec NAME=CKPT``, a domain router's domains): letters,
    digits and ``. _ - : @ +``, a letter or digit first (so never empty, no folder part, no space)."""
    if not isinstance(value, str) or _MODEL_NAME.fullmatch(value) is None:
        raise MemdecError(f"{what} {value!r} must be letters, digits, and . _ - : @ + (a letter or digit first)")
    return value


def _nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_path(value, what: str, folder: bool = False) -> Path:
    """An output path memdec can create or replace: a file (``folder``: a folder) that exists and is
    writable, or one whose nearest existing ancestor is a writable folder. Checked before any work,
    so an unwritable output fails at once rather than after the run. Returns it as a Path."""
    path = Path(value).expanduser()
    if path.exists():
        if folder != path.is_dir():
            raise MemdecError(f"{what} {value} is a {'file' if folder else 'folder'}; give a "
                              f"{'folder' if folder else 'file name'}")
        if not os.access(path, os.W_OK):
            raise MemdecError(f"{what} {value}: not writable")
        if folder:
            return path
    parent = _nearest_existing(path.parent if path.exists() else path)
    if not parent.is_dir():
        raise MemdecError(f"{what} {value}: cannot be created, {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MemdecError(f"{what} {value}: cannot write in {parent} (permission denied or read-only)")
    return path


def check_own_folder(value, *markers: str, what: str = "--out", partial: tuple[str, ...] = ()) -> Path:
    """An output folder memdec may write: new, empty, or one memdec made, known by one of ``markers``
    (a file it writes there first; a name ending in ``/``: a folder). A folder memdec did not create is
    never changed. ``partial``: what a run of the command killed before it wrote its marker can leave
    (the files it writes first, the temporary files of an interrupted ``atomic_write``); a folder that
    holds nothing else is one memdec began, and the rerun goes on. Returns it as a Path."""
    path = check_writable_path(value, what, folder=True)
    if not path.exists() or not any(path.iterdir()):
        return path
    if partial and all(p.is_file() and not p.is_symlink() and p.name in partial for p in path.iterdir()):
        return path
    if any((path / m).is_dir() if m.endswith("/") else (path / m).is_file() for m in markers):
        return path
    raise MemdecError(f"{what} {value} is a folder memdec did not create (no {' or '.join(markers)}); memdec never "
                      f"changes such a folder: choose a new or empty {what}")


def check_context(n_prompt: int, n_new: int | None, context: int | None,
                  error: Callable[[str, str], Exception]) -> None:
    """Raise ``error(message, part)`` unless ``n_prompt`` prompt tokens and ``n_new`` new ones (None: not
    given) fit a model's ``context`` (None: the model does not say). ``part``: "prompt" when the prompt
    alone fills the context, else "new"; the message is OpenAI's wording (the server returns it as is)."""
    if context is None:
        return
    if n_prompt >= context:
        raise error(f"This model's maximum context length is {context} tokens, but the prompt has "
                    f"{n_prompt} tokens", "prompt")
    if n_new is not None and n_prompt + n_new > context:
        raise error(f"This model's maximum context length is {context} tokens; you requested "
                    f"{n_prompt + n_new} tokens ({n_prompt} in the prompt, {n_new} for the completion)", "new")


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


def within(low: float, high: float) -> Kind:
    """A finite number in [``low``, ``high``] (a field whose sane range is known: a temperature)."""
    return Kind(f"a number in [{low:g}, {high:g}]", lambda v: _is_number(v) and low <= v <= high)


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
