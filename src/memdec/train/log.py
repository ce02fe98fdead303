"""``CKPT/log.jsonl``: one JSON line per logged step and per validation, of the main process."""

from __future__ import annotations

import json
from pathlib import Path

from ..checks import COUNT, check_field
from ..files import append_jsonl, atomic_write_text, read_jsonl


class RunLog:
    """The log of one run in ``out``; every call is a no-op on a process other than the main one."""

    def __init__(self, out: Path, main: bool):
        self.path, self.main = out / "log.jsonl", main

    def open(self, start_step: int) -> None:
        """Start the log afresh (``start_step`` 0), or cut it back to the resumed step so that no step
        repeats; a line cut short by an interruption is dropped too."""
        if not self.main:
            return
        if start_step == 0:
            self.path.unlink(missing_ok=True)
        elif self.path.is_file():
            records = read_jsonl(self.path)
            for r in records:
                check_field(r, "step", self.path, COUNT)
            kept = [r for r in records if r["step"] <= start_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        """Append ``record`` as one line."""
        if self.main:
            append_jsonl(self.path, record)
