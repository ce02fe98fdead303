"""Processes: one, or several under ``accelerate launch`` / ``torchrun`` (``Ranks``,
``launched_ranks``), the barrier that hands rank 0's manifest to every rank (``sync``), and how the
work is split among them (``shard_bounds``, ``default_threads``)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

from accelerate import PartialState

from ..store import Manifest, read_manifest


@dataclass
class Ranks:
    """This process's place in a launch: ``rank`` of ``world`` processes, and the device it runs on.

    Alone (no ``WORLD_SIZE`` above 1 in the environment) it is rank 0 of 1 and ``barrier`` does
    nothing; under ``accelerate launch`` or ``torchrun`` accelerate's ``PartialState`` joins the
    process group (gloo on CPU, NCCL on GPUs; each rank takes its own GPU), as training does.
    """

    rank: int = 0
    world: int = 1
    device: str = "cpu"
    state: PartialState | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every process gets here."""
        if self.state is not None:
            self.state.wait_for_everyone()


BARRIER_TIMEOUT = datetime.timedelta(days=7)  # the other ranks wait while rank 0 tokenizes, builds the index
# or merges the targets: hours at a billion tokens, far past torch's default of 30 minutes


def launched_ranks(device: str) -> Ranks:
    """The ``Ranks`` of this process on ``device`` (cpu or cuda) under the launcher that started it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Ranks(device=device)
    state = PartialState(cpu=not device.startswith("cuda"), timeout=BARRIER_TIMEOUT)
    rank_device = str(state.device) if device.startswith("cuda") else "cpu"
    return Ranks(state.process_index, state.num_processes, rank_device, state)


def is_main_process() -> bool:
    """Whether this process prints a launch's results (rank 0, or a process on its own)."""
    return os.environ.get("RANK", "0") == "0"


def sync(out: Path, manifest: Manifest | None, ranks: Ranks) -> Manifest:
    """A barrier, after which every rank holds the manifest rank 0 wrote (rank 0 keeps its own)."""
    ranks.barrier()
    return manifest if ranks.main else read_manifest(out)


def shard_bounds(start: int, end: int, world: int, align: int = 1) -> list[list[int]]:
    """``world`` contiguous ranges ``[a, b)`` that tile ``[start, end)`` as evenly as ``align`` allows
    (every inner bound is ``start`` plus a multiple of ``align``)."""
    units = -(-(end - start) // align)
    cuts = [min(end, start + align * (units * i // world)) for i in range(world + 1)]
    return [[cuts[i], cuts[i + 1]] for i in range(world)]


def default_threads(threads: int | None, ranks: Ranks) -> int:
    """``threads`` (--threads), else this machine's cores shared among the launch's processes on it."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", ranks.world))
    return threads or max(1, (os.cpu_count() or 1) // max(local, 1))
