"""``AdaptRun``: one ``memdec adapt`` call as the stages see it (the run folder, its settings, the
stages' inputs and their record), and ``remove``, which deletes what an earlier call made."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from .presets import Settings
from .stagebook import StageBook


@dataclass
class AdaptRun:
    """One ``memdec adapt`` call: the run folder, its settings, the stages' inputs and their record."""

    run: Path
    s: Settings
    device: str
    book: StageBook
    inputs: dict
    keep_trainer_state: bool = False
    keep_candidates: bool = False

    @property
    def datastore(self) -> Path:
        return self.run / "datastore"

    @property
    def ckpt(self) -> Path:
        return self.run / "memdec"


def remove(*paths: Path) -> None:
    """Delete what an earlier call of this run made (a symlink, or a folder under the run)."""
    for p in paths:
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.exists():
            shutil.rmtree(p)
