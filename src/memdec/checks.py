"""Range checks for user-given settings: one function per kind of check, one clear line per failure;
the typed fields of the metadata files memdec reads (``check_field``, one ``Kind`` per type); and the
folders memdec made: the marker every command writes first into a folder it creates (``mark_own_folder``)
and the one check of an output folder (``check_own_folder``).

Every command validates its arguments with these before it loads a model or writes a file.
NaN fails every check (comparisons with NaN are false).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
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
    so an unwritable output fails at once rather than after the run: by a real write in the folder
    that will hold it (``probe_folder``), which also catches what permission bits do not say (``/proc``,
    ``/sys``, a read-only mount, for root too). Returns it as a Path."""
    path = Path(value).expanduser()
    if path.exists():
        if folder != path.is_dir():
            raise MemdecError(f"{what} {value} is a {'file' if folder else 'folder'}; give a "
                              f"{'folder' if folder else 'file name'}")
        if not os.access(path, os.W_OK):
            raise MemdecError(f"{what} {value}: not writable")
        if folder:
            probe_folder(path, what, value)
            return path
    parent = _nearest_existing(path.parent if path.exists() else path)
    if not parent.is_dir():
        raise MemdecError(f"{what} {value}: cannot be created, {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MemdecError(f"{what} {value}: cannot write in {parent} (permission denied or read-only)")
    probe_folder(parent, what, value)
    return path


def probe_folder(folder: Path, what: str, value) -> None:
    """MemdecError unless a file can be created in ``folder`` (then removed at once): the step every
    atomic write takes first (a temporary file beside its target)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".memdec-probe-", dir=folder)
    except OSError as exc:
        raise MemdecError(f"{what} {value}: cannot write in {folder} ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)


def check_text(value: str, what: str) -> str:
    """Text a tokenizer can read: a ``str`` that UTF-8 can encode. A JSON string may hold a lone UTF-16
    surrogate (``"\\ud800"``) and a command line a byte that is not UTF-8 (read as ``\\udcff``): neither is text."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise MemdecError(f"{what} holds {value[exc.start]!a} at character {exc.start}: a lone surrogate, not "
                          f"text (send UTF-8)") from None
    return value


# --- folders memdec made: the marker each writes first, and its check ----------------------------


OWN_MARKER = ".memdec-folder.json"  # written first into every folder a memdec command creates
OWN_MARKER_VERSION = 1
FOLDER_KINDS = {  # the kinds of folder memdec writes (the marker's "memdec_folder"), in words
    "adapt-run": "adapt run folder", "checkpoint": "checkpoint folder (memory decoder or baseline)",
    "router": "router folder", "domain-router": "domain router folder", "tasks": "task folder",
    "datastore": "datastore", "bench": "benchmark output folder (bench/*.py)",
    "vllm-export": "vLLM joint folder (memdec export vllm)",
}


def folder_kind(path: str | os.PathLike) -> str | None:
    """The kind of memdec folder ``path`` is, by its marker (``OWN_MARKER``); None where it has no
    marker memdec wrote (absent, unreadable, or another record)."""
    try:
        record = json.loads((Path(path) / OWN_MARKER).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("version") != OWN_MARKER_VERSION:
        return None
    kind = record.get("memdec_folder")
    return kind if isinstance(kind, str) and kind in FOLDER_KINDS else None


def mark_own_folder(path: str | os.PathLike, kind: str) -> Path:
    """Create the folder ``path`` (if need be) and write its marker, before anything else memdec writes
    there; a folder that has a marker keeps it (a router written into a checkpoint folder). The marker
    is whole or absent: written to a temporary name, flushed, then renamed (the layers keep this module
    from ``files.atomic_write``). Returns the folder."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if folder_kind(path) is None:
        tmp = path / f".{OWN_MARKER}.tmp"
        with open(tmp, "w") as f:
            f.write(json.dumps({"memdec_folder": kind, "version": OWN_MARKER_VERSION}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path / OWN_MARKER)
    return path


def holds_record(file: str | os.PathLike, **fields) -> bool:
    """Whether ``file`` is a JSON object with each of ``fields`` at that value (never raises): how a
    folder made before markers is known by its metadata file's format (``format="memdec-router"``)."""
    try:
        record = json.loads(Path(file).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(record, dict) and all(type(record.get(k)) is type(v) and record.get(k) == v
                                            for k, v in fields.items())


def check_own_folder(value, kind: str, *also: str, legacy: Callable[[Path], bool] | None = None, what: str = "--out",
                     error: type[MemdecError] = MemdecError, partial: tuple[str, ...] = ()) -> Path:
    """An output folder memdec may write as a ``kind`` folder: new, empty, or one a memdec command made,
    known by its marker (``OWN_MARKER``) of ``kind`` or of one of ``also`` (the kinds this command may
    write into); ``legacy(path)``: whether a folder without a marker is one memdec made before markers,
    known by the content of its own records (never by a file name alone). A folder memdec did not
    create is never changed; another kind of memdec folder is refused too. ``partial``: what a run killed
    before its marker was whole can leave (the files it writes first, the temporary files of an interrupted
    atomic write; the marker's own temporary file always): a folder holding nothing else is one memdec
    began, and the rerun goes on. Returns it as a Path."""
    path = Path(value).expanduser()
    began = (*partial, f".{OWN_MARKER}.tmp")
    if path.is_dir() and any(path.iterdir()) and not all(
            p.is_file() and not p.is_symlink() and p.name in began for p in path.iterdir()):
        found = folder_kind(path)
        if found is None and not (legacy is not None and legacy(path)):
            raise error(f"{what} {value} is a folder memdec did not create (not a memdec {FOLDER_KINDS[kind]}: "
                        f"no {OWN_MARKER}); memdec never changes such a folder: choose a new or empty {what}")
        if found is not None and found not in (kind, *also):
            wanted = FOLDER_KINDS[kind]
            article = "an" if wanted[0] in "aeiou" else "a"
            raise error(f"{what} {value} is a memdec {FOLDER_KINDS[found]}, not {article} {wanted}: choose a new or "
                        f"empty {what}")
    try:
        return check_writable_path(path, what, folder=True)
    except MemdecError as exc:
        raise error(str(exc)) from None


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


GREEDY_BELOW = 1e-5  # a sampling temperature below this picks the likeliest token, as vLLM does: dividing
#                      logits by 1e-45 makes them infinite, and sampling from them fails


def check_temperature(value, what: str = "temperature", error: type[MemdecError] = MemdecError) -> float:
    """A softmax temperature: a finite number > 0 (``error``: the MemdecError kind to raise)."""
    return check_positive(value, what, error)


def check_non_negative(value, what: str) -> float:
    """A finite number >= 0."""
    x = _number(value, what)
    if not (math.isfinite(x) and x >= 0):
        raise MemdecError(f"{what} must be a number >= 0, got {value}")
    return x


def check_positive_int(value, what: str, most: int | None = None) -> int:
    """An integer >= 1 (a count, a size, an interval); ``most``: its largest sensible value."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MemdecError(f"{what} must be a whole number >= 1, got {shown(value)}")
    if most is not None and value > most:
        raise MemdecError(f"{what} must be at most {most}, got {shown(value)}")
    return value


SEED_MAX = 2**32 - 1  # numpy's and torch's seeds: what every seed of memdec reaches


def check_seed(value, what: str = "--seed") -> int:
    """A random seed: a whole number in [0, 2**32 - 1], the range numpy and torch both take."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SEED_MAX:
        raise MemdecError(f"{what} must be a whole number from 0 to {SEED_MAX}, got {shown(value)}")
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
    """A value as JSON, cut to ``limit`` characters: what an error says a field held (an integer too long
    for Python to print, past 4,300 digits, by its size)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 10_000:
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
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


def check_items(record: dict, name: str, where, fields: dict[str, Kind], optional: dict[str, Kind] | None = None,
                error: type[MemdecError] = MemdecError) -> list[dict]:
    """The list field ``name`` of ``record`` (read from ``where``), each item a JSON object whose ``fields``
    (and, where present, ``optional`` ones) have their kinds: ``eval.json: field "results" item 2 must be
    a JSON object``, ``eval.json (results item 2): field "ppl" must be ...``."""
    items = check_field(record, name, where, LIST, error=error)
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise error(f'{where}: field "{name}" item {i} must be a JSON object, got {shown(item)}')
        check_fields(item, f"{where} ({name} item {i})", fields, error=error)
        check_fields(item, f"{where} ({name} item {i})", optional or {}, optional=True, error=error)
    return items
