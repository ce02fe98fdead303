"""Writing files so that a crash never leaves a half-written one; reading JSON with clear errors;
``.npy`` files that grow by appends and are checked against their expected shape.

Every artefact memdec writes goes through ``atomic_write``: the bytes land in a temporary file in
the same folder (``temp_path``: ``.NAME.tmp``), which is then renamed over the target (an atomic step
on POSIX filesystems). A run killed while writing leaves that temporary file: memdec's own leftover.

Every JSON file memdec reads goes through ``parse_json`` (``read_json``, ``read_json_object``,
``read_jsonl``; corpora's JSON lines too): a value nested deeper than ``MAX_JSON_DEPTH`` is a
``JSONTooDeep``, one of the ``json.JSONDecodeError`` its readers already turn into one line, never
the ``RecursionError`` Python's parser raises at about a thousand levels.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np

from .errors import DatastoreError, MemdecError


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a folder's data and metadata to the disk (``os.fsync``)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """``fsync_path`` every file under ``folder``, then every folder, deepest first: before a rename commits it."""
    folder = Path(folder)
    for p in sorted(folder.rglob("*"), key=lambda q: len(q.parts), reverse=True):
        if p.is_file() and not p.is_symlink():
            fsync_path(p)
    for p in sorted((q for q in folder.rglob("*") if q.is_dir() and not q.is_symlink()),
                    key=lambda q: len(q.parts), reverse=True):
        fsync_path(p)
    fsync_path(folder)


_OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)")  # how safetensors' Rust writer reports a failed write


@contextmanager
def os_errors_named(path: str | os.PathLike, tmp: str | os.PathLike | None = None) -> Iterator[None]:
    """Writes inside raise an OSError naming ``path`` (where it named no file, or the temporary
    ``tmp``), also where a foreign writer wraps it: safetensors' ``SafetensorError('... I/O error:
    No space left on device (os error 28)')`` becomes ``OSError(28, ..., path)``. Other errors pass."""
    try:
        yield
    except OSError as exc:  # a failed write to an open file names no file: name the one memdec was writing
        if exc.filename is None or (tmp is not None and str(exc.filename) == str(tmp)):
            exc.filename = str(path)
        raise
    except Exception as exc:
        found = _OS_ERROR_CODE.search(str(exc))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from exc


def temp_path(path: str | os.PathLike) -> Path:
    """Where ``atomic_write`` puts the bytes of ``path`` before the rename: ``.NAME.tmp`` beside it (what a
    run killed while writing ``path`` leaves, and the next write of ``path`` replaces)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)``, fsync the temporary file, rename it onto ``path``, fsync the folder:
    once this returns, ``path`` is whole on the disk, even after a power loss. Any OSError (a full
    disk, a read-only one) is raised naming ``path``; the file that was there before is unchanged."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with os_errors_named(path, tmp):
            write(tmp)
            fsync_path(tmp)
            os.replace(tmp, path)
            fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def remove_interrupted_writes(folder: str | os.PathLike, *staging_prefixes: str) -> list[str]:
    """Remove what writes killed mid-way (SIGKILL, power loss) left directly in ``folder``, a folder
    memdec owns (the caller checked it): ``atomic_write``'s temporary files (``.NAME.tmp``) and the
    staging folders whose names start with one of ``staging_prefixes`` (dot names memdec alone makes).
    Nothing else is touched. Returns the names removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in sorted(folder.iterdir()):
        if p.is_dir() and not p.is_symlink() and any(p.name.startswith(x) for x in staging_prefixes):
            shutil.rmtree(p, ignore_errors=True)
        elif not p.is_dir() and p.name.startswith(".") and p.name.endswith(".tmp") and len(p.name) > len("..tmp"):
            p.unlink(missing_ok=True)
        else:
            continue
        removed.append(p.name)
    return removed


class _RecordingFile:
    """A binary file that keeps the OSError of a failed write, for writers that wrap it in another
    error (``torch.save`` raises ``RuntimeError: ... unexpected pos``)."""

    def __init__(self, f: BinaryIO):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.f.flush()


def atomic_write_stream(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """``atomic_write`` for a writer that takes a file object (``torch.save(obj, f)``): a failed
    write is raised as its OSError naming ``path``, whatever error the writer turned it into."""

    def to_file(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            recording = _RecordingFile(f)
            try:
                write(recording)
            except OSError:
                raise
            except Exception:
                if recording.error is not None:
                    raise recording.error from None
                raise

    atomic_write(path, to_file)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | os.PathLike, payload, **dump_kwargs) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, **dump_kwargs) + "\n")


MAX_JSON_DEPTH = 64  # containers inside containers in a JSON file memdec reads (its own files need fewer than 10)


class JSONTooDeep(json.JSONDecodeError):
    """A JSON value nested deeper than a reader takes: a ``json.JSONDecodeError``, so that every handler of a
    malformed file gives its one line (Python's parser raises ``RecursionError`` at about a thousand levels)."""

    def __init__(self, limit: int):
        ValueError.__init__(self, f"nested more than {limit} levels deep")
        self.msg, self.doc, self.pos, self.lineno, self.colno = str(self), "", 0, 1, 1


MAX_JSON_DIGITS = 4300  # digits of a JSON integer (Python's own limit of int(str)): no count or size is longer


def _json_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_JSON_DIGITS:
        raise ValueError(f"an integer of {len(digits.lstrip('-'))} digits (at most {MAX_JSON_DIGITS})")
    return int(digits)


def parse_json(text: str | bytes, max_depth: int = MAX_JSON_DEPTH):
    """``json.loads(text)``; ``JSONTooDeep`` where the value is nested deeper than ``max_depth`` (or too deep
    for the parser itself); a ValueError saying so for an integer of more than ``MAX_JSON_DIGITS`` digits."""
    try:
        value = json.loads(text, parse_int=_json_int)
    except RecursionError:
        raise JSONTooDeep(max_depth) from None
    if json_depth(value) > max_depth:
        raise JSONTooDeep(max_depth)
    return value


def json_depth(value) -> int:
    """How many containers deep a parsed JSON value goes (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def read_json(file: str | os.PathLike, what: str, error: type[MemdecError] = MemdecError):
    """The JSON value in ``file``; ``error`` (a MemdecError) naming ``what`` if it is unreadable, not JSON or
    nested too deeply (``parse_json``)."""
    file = Path(file)
    try:
        return parse_json(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{file}: unreadable {what}: {exc}") from None


def read_json_object(file: str | os.PathLike, what: str, error: type[MemdecError] = MemdecError) -> dict:
    """A JSON file that must hold an object; ``error`` (a MemdecError) naming ``what`` if it is unreadable."""
    value = read_json(file, what, error)
    if not isinstance(value, dict):
        raise error(f"{file}: {what} must hold a JSON object")
    return value


def read_jsonl(file: str | os.PathLike, error: type[MemdecError] = MemdecError,
               skip: Callable[[str], None] | None = None) -> list[dict]:
    """The records of a JSON-lines log (each line a JSON object); its last line, cut short by an
    interruption (no newline), is skipped. Anything else that is not a JSON object, or bytes that are
    not UTF-8, raise ``error`` naming the file and the line; with ``skip``, such a line is left out
    and ``skip`` gets that message instead (a reader that can do without it: a report's plot)."""
    file = Path(file)
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise error(f"{file}: unreadable log ({exc.strerror or exc})") from None
    lines, records, offset = data.split(b"\n"), [], 0
    for number, raw in enumerate(lines, 1):
        try:
            record = _jsonl_record(file, number, _jsonl_text(file, number, raw, offset, error),
                                   cut_short=number == len(lines), error=error)
        except MemdecError as exc:
            if skip is None:
                raise
            skip(str(exc))
            record = None
        offset += len(raw) + 1
        if record is not None:
            records.append(record)
    return records


def _jsonl_text(file: Path, number: int, raw: bytes, offset: int, error: type[MemdecError]) -> str:
    """Line ``number`` of a log (its bytes ``raw``, at ``offset`` in the file) as text."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        byte = offset + exc.start
        raise error(f"{file}: line {number} is not UTF-8 text (byte {byte}); the log is corrupt") from None


def _jsonl_record(file: Path, number: int, line: str, cut_short: bool, error: type[MemdecError]) -> dict | None:
    """The object on line ``number`` of a log; None for a blank line or a last line ``cut_short``."""
    if not line.strip():
        return None
    try:
        record = parse_json(line)
    except json.JSONDecodeError as exc:
        if cut_short:
            return None
        raise error(f"{file}: line {number} is not JSON ({exc.msg}); the log is corrupt") from None
    if not isinstance(record, dict):
        if cut_short:  # a number or a string cut short still parses
            return None
        raise error(f"{file}: line {number} must hold a JSON object; the log is corrupt")
    return record


def append_jsonl(file: str | os.PathLike, record: dict) -> None:
    """Append one record to a JSON-lines log."""
    with open(file, "a") as f:
        f.write(json.dumps(record) + "\n")


# --- .npy files that grow, and their checks ---------------------------------------------------


NPY_HEADER_BYTES = 128  # fixed, so an array can grow in place while staying a valid .npy file


def _npy_header(dtype: np.dtype, n: int) -> bytes:
    d = f"{{'descr': '{np.dtype(dtype).str}', 'fortran_order': False, 'shape': ({n},), }}"
    body = d.ljust(NPY_HEADER_BYTES - 10 - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body.encode("latin1")


class NpyAppender:
    """A 1-D .npy file that grows by appends and is valid after every ``flush``.

    Opening truncates the file to its first ``n`` elements (those a finished chunk recorded),
    so a resumed run continues byte for byte where the last one ended.
    """

    def __init__(self, path: str | os.PathLike, dtype, n: int = 0):
        self.path, self.dtype, self.n = Path(path), np.dtype(dtype), int(n)
        size = NPY_HEADER_BYTES + self.n * self.dtype.itemsize
        if self.n == 0:
            self.f = open(self.path, "w+b")
        else:
            if not self.path.is_file() or self.path.stat().st_size < size:
                raise DatastoreError(
                    f"{self.path}: shorter than the {self.n} entries the manifest records (truncated?)"
                )
            self.f = open(self.path, "r+b")
        self.f.truncate(size)
        self.f.seek(0)
        self.f.write(_npy_header(self.dtype, self.n))
        self.f.seek(size)

    def append(self, arr: np.ndarray) -> None:
        self.f.write(np.ascontiguousarray(arr, dtype=self.dtype).tobytes())
        self.n += len(arr)

    def flush(self) -> None:
        self.f.seek(0)
        self.f.write(_npy_header(self.dtype, self.n))
        self.f.seek(0, os.SEEK_END)
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.flush()
        self.f.close()


def check_npy(path: str | os.PathLike, dtype, shape: tuple[int, ...] | None = None, what: str = "") -> tuple[int, ...]:
    """Check a .npy file's header and exact size without reading its data. Returns its shape.

    Raises DatastoreError naming the file on a missing, truncated, padded or mismatched file.
    """
    path = Path(path)
    label = f"{path}" + (f" ({what})" if what else "")
    if not path.is_file():
        raise DatastoreError(f"{label}: missing")
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            got_shape, fortran, got_dtype = read(f)
            offset = f.tell()
    except Exception as exc:  # noqa: BLE001 - any parse failure means a corrupt file
        raise DatastoreError(f"{label}: not a readable .npy file ({exc})") from None
    if got_dtype != np.dtype(dtype) or fortran:
        raise DatastoreError(f"{label}: holds {got_dtype} data, expected {np.dtype(dtype)}")
    if shape is not None and tuple(got_shape) != tuple(shape):
        raise DatastoreError(f"{label}: has shape {list(got_shape)}, the manifest says {list(shape)}")
    expected = offset + int(np.prod(got_shape, dtype=np.int64)) * got_dtype.itemsize
    actual = path.stat().st_size
    if actual != expected:
        raise DatastoreError(f"{label}: {actual} bytes on disk, {expected} expected (truncated or corrupt)")
    return tuple(got_shape)
