"""The progress of one process's share of a step (several processes): ``KeysProgress`` in
``.keys-shard-i.json`` and ``TargetsProgress`` in ``targets/shard-i/progress.json``, each resumed from
its last finished chunk."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..checks import NON_NEGATIVE, SCORE, WHOLE
from ..errors import DatastoreError
from ..files import read_json_object
from ..store import Record, typed


@dataclass
class KeysProgress(Record):
    """``.keys-shard-i.json``: the keys chunks one process has finished (``KeysStep``'s counters)."""

    chunks_done: int = typed(WHOLE, required=True, default=0)
    seconds: float = typed(NON_NEGATIVE, required=True, default=0.0)
    positions_done: int | None = typed(WHOLE)
    positions: int | None = typed(WHOLE)
    tokens_per_s: float | None = typed(NON_NEGATIVE)


@dataclass
class TargetsProgress(Record):
    """``targets/shard-i/progress.json``: the target rows one process has searched (``TargetsStep``'s counters)."""

    rows_done: int = typed(WHOLE, required=True, default=0)
    nnz: int = typed(WHOLE, required=True, default=0)
    kl_sum: float = typed(SCORE, required=True, default=0.0)
    self_missing: int = typed(WHOLE, required=True, default=0)
    empty_slots: int = typed(WHOLE, required=True, default=0)
    seconds: float = typed(NON_NEGATIVE, required=True, default=0.0)
    rows_per_s: float | None = typed(NON_NEGATIVE)


def read_progress(cls: type[Record], path: Path, what: str):
    """A shard's progress file (a ``KeysProgress`` or ``TargetsProgress``)."""
    return cls.from_json(read_json_object(path, what, DatastoreError), path)
