"""``CKPT/trainer_state/``: a run's resumable steps, each committed by one rename, and the RNG files.

``TrainerState`` stages a step whole and commits it by one rename; ``read_state_json`` and
``read_rng_json`` read a step's ``state.json`` and ``rng-RANK.json`` (one line naming the file and
the field where one is wrong); ``load_optimizer_state`` reads ``optimizer.pt`` with
``weights_only=True``. Nothing here is unpickled.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from ..checks import COUNT, LIST, NON_NEGATIVE, OBJECT, TEXT, WHOLE, Kind, check_field, check_fields, or_null
from ..errors import MemdecError, one_line
from ..files import fsync_path, fsync_tree, read_json_object

OWN_STEP_WEIGHTS = "decoder.safetensors"  # a trainer step of a decoder shape other than copy: its own tensors


class TrainerState:
    """``CKPT/trainer_state/``: the resumable checkpoints of a run, one folder per saved step.

    A step is written whole into ``.step-NNNNNNNN.tmp/`` (weights, ``optimizer.pt``,
    ``rng-RANK.json`` of every process, then ``state.json``) and renamed to ``step-NNNNNNNN/``:
    one atomic rename commits it, after every staged file and folder is fsynced. Only then are older
    steps deleted, so an interruption at any point leaves the previous complete step in place, and a
    resume takes the newest complete one.
    Nothing here is unpickled: RNG states are JSON, the optimizer is read with ``weights_only=True``.
    """

    def __init__(self, out: Path):
        self.dir = out / "trainer_state"

    def step_dirs(self) -> list[Path]:
        """Complete steps, oldest first (a ``step-*`` folder exists only once its rename committed it)."""
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if p.is_dir() and re.fullmatch(r"step-\d{8}", p.name))

    def latest(self) -> dict | None:
        """``state.json`` of the newest complete step, with its ``folder``; None if there is none.
        MemdecError naming the file and the field if it is unreadable or a field is wrong."""
        steps = self.step_dirs()
        if steps:
            file = steps[-1] / "state.json"
            state = read_state_json(file, _STATE_FIELDS)
            if state["step"] != int(steps[-1].name.removeprefix("step-")):
                raise MemdecError(f'{file}: field "step" is {state["step"]}, not the step of its folder (corrupt)')
            return {**state, "folder": steps[-1]}
        legacy = self.dir / "state.json"  # memdec before per-step folders: readable, not resumable
        if legacy.is_file():
            return {**read_state_json(legacy, {"step": WHOLE}), "folder": None}
        return None

    def staging(self, step: int) -> Path:
        return self.dir / f".step-{step:08d}.tmp"

    def begin(self, step: int) -> Path:
        """A fresh staging folder for ``step`` (the main process calls this before any rank writes)."""
        tmp = self.staging(step)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def promote(self, step: int) -> Path:
        """Rename the staged step into place: the commit. The caller then ``clean``s the older ones."""
        final = self.dir / f"step-{step:08d}"
        if final.exists():  # a leftover of an interrupted run at the same step, newer than any resumed from
            shutil.rmtree(final)
        fsync_tree(self.staging(step))  # the step's bytes on the disk before the rename commits it
        os.rename(self.staging(step), final)
        fsync_path(self.dir)  # and the rename itself
        return final

    def clean(self, keep: Path | None) -> None:
        """Delete staging folders and every step but ``keep``."""
        if not self.dir.is_dir():
            return
        for p in self.dir.iterdir():
            if p != keep and p.is_dir() and (p.name.startswith(".step-") or re.fullmatch(r"step-\d{8}", p.name)):
                shutil.rmtree(p, ignore_errors=True)


_STATE_FIELDS: dict[str, Kind] = {"step": COUNT, "total_steps": COUNT, "run_fingerprint": TEXT}
_STATE_OPTIONAL: dict[str, Kind] = {"recipe": TEXT, "best": OBJECT, "seconds": NON_NEGATIVE}


def read_state_json(file: Path, required: dict[str, Kind]) -> dict:
    """A trainer ``state.json`` with the ``required`` fields and the optional ones checked
    (``best``, where there is one, names its ``step``). Raises MemdecError naming the file and field."""
    state = read_json_object(file, "trainer state")
    check_fields(state, file, required)
    check_fields(state, file, _STATE_OPTIONAL, optional=True)
    if state.get("best") is not None:
        check_field(state, "best.step", file, COUNT)
    return state


_RNG_FIELDS: dict[str, Kind] = {"step": COUNT, "rng": OBJECT, "rng.torch": LIST, "rng.numpy": LIST, "rng.python": LIST,
                                "rng.cuda": or_null(LIST)}


def read_rng_json(file: Path, step: int) -> dict:
    """The RNG states in ``rng-R.json`` (``rng_state_json``'s form) of the checkpoint ``step``.
    Raises MemdecError naming the file and the field."""
    record = read_json_object(file, "RNG state")
    check_fields(record, file, _RNG_FIELDS)
    if record["step"] != step:
        raise MemdecError(f"{file}: RNG state is from step {record['step']}, not {step} (corrupt)")
    return record["rng"]


def rng_state_json() -> dict:
    """Every RNG this process uses, as plain JSON (never a pickle)."""
    np_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {"torch": torch.get_rng_state().tolist(),
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": [version, list(internal), gauss],
            "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else None}


def restore_rng_state(file: Path, state: dict) -> None:
    """``set_rng_state_json``, or MemdecError naming ``file`` (read by ``read_rng_json``) if its
    states do not fit this process's generators."""
    try:
        set_rng_state_json(state)
    except (TypeError, ValueError, OverflowError, RuntimeError, IndexError) as exc:
        raise MemdecError(f'{file}: field "rng" does not hold RNG states memdec wrote ({one_line(exc)}); '
                          f"delete {file.parent.parent} or use --no-resume to start over") from None


def set_rng_state_json(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def load_optimizer_state(folder: Path, step: int, optimizer, scheduler, state_dir: Path) -> None:
    """Load the optimizer and scheduler states of the step ``folder`` (``optimizer.pt``, written at
    ``step``) into ``optimizer`` and ``scheduler``; MemdecError naming the file (and ``state_dir``,
    to start over) if it is unreadable, of another step or does not fit. Never unpickles."""
    file = folder / "optimizer.pt"
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a corrupt or crafted file: refuse it, never unpickle
        raise MemdecError(f"{file}: unreadable optimizer state ({type(exc).__name__}); "
                          f"delete {state_dir} or use --no-resume to start over") from None
    if not isinstance(payload, dict) or not {"optimizer", "scheduler"} <= payload.keys():
        raise MemdecError(f"{file}: not an optimizer state memdec wrote (corrupt)")
    if payload.get("step") != step:
        raise MemdecError(f"{folder}: optimizer state is from step {payload.get('step')}, not {step} (corrupt)")
    try:
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
    except (TypeError, ValueError, KeyError, RuntimeError) as exc:
        raise MemdecError(f"{file}: the optimizer state does not fit this run ({one_line(exc)})") from None
