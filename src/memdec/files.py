"""Writing files so that a crash never leaves a half-written one, and reading JSON with clear errors.

Every artefact memdec writes goes through ``atomic_write``: the bytes land in a temporary file in
the same folder, which is then renamed over the target (an atomic step on POSIX filesystems).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from .errors import MemdecError


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)``, then rename the temporary file onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | os.PathLike, payload, **dump_kwargs) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, **dump_kwargs) + "\n")


def read_json_object(file: str | os.PathLike, what: str) -> dict:
    """A JSON file that must hold an object; MemdecError naming ``what`` if it is unreadable."""
    file = Path(file)
    try:
        value = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MemdecError(f"{file}: unreadable {what}: {exc}") from None
    if not isinstance(value, dict):
        raise MemdecError(f"{file}: {what} must hold a JSON object")
    return value
