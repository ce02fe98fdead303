"""``--out`` as one run's folder: whether memdec may write there, which run it holds, where to take up.

A folder that memdec did not create is refused as ``--out`` (``check_out_folder``), and so is a
checkpoint of another run: ``--no-resume`` starts the same run over, nothing else. ``RunFolder``
finds the newest complete trainer step of an earlier call of this run (``previous``), reading its
files before any model loads, so that a bad file is one line at once; ``load_resumed`` puts the
optimizer, scheduler and RNG states back.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..checkpoint import BASELINE_FORMAT, BASELINE_JSON, CHECKPOINT_FORMAT, MEMDEC_JSON, load_safetensors
from ..checks import COUNT, SCORE, TEXT, check_field, check_own_folder, holds_record
from ..decoders import DecoderShape
from ..errors import MemdecError
from ..files import read_json_object
from .recipe import Recipe
from .state import OWN_STEP_WEIGHTS, TrainerState, load_optimizer_state, read_rng_json, restore_rng_state

CHECKPOINT_META_FILES = (MEMDEC_JSON, BASELINE_JSON)  # each marks a finished checkpoint memdec wrote


def check_out_folder(out: Path, recipe: Recipe, datastore: str | None) -> None:
    """``--out`` must be new, empty, or a checkpoint folder of this kind that memdec made: a folder
    memdec did not create is never changed."""
    if datastore is not None:
        ds = Path(datastore).expanduser().resolve()
        if out.resolve() == ds or ds in out.resolve().parents:
            raise MemdecError(f"--out {out} lies inside the datastore {datastore}; choose a folder of its own")
    # a finished checkpoint without trainer state (a meta file): the resume logic says what to do
    check_own_folder(out, "checkpoint", legacy=is_unmarked_checkpoint)


def is_unmarked_checkpoint(out: Path) -> bool:
    """Whether ``out`` is a checkpoint folder memdec made before folder markers: a ``memdec.json`` or
    ``baseline.json`` of memdec's format, or a ``trainer_state/`` of its committed or staged steps."""
    if holds_record(out / MEMDEC_JSON, format=CHECKPOINT_FORMAT) or holds_record(out / BASELINE_JSON,
                                                                               format=BASELINE_FORMAT):
        return True
    state = out / "trainer_state"
    step = re.compile(r"\.?step-\d{8}(\.tmp)?")  # TrainerState's committed and staged steps
    return state.is_dir() and any(p.is_dir() and step.fullmatch(p.name) or p.name == "state.json"
                                  for p in state.iterdir())


class RunFolder:
    """The run ``fingerprint`` of ``recipe`` in ``out`` (its steps in ``state``), planned for ``total_steps``:
    which earlier call of it to take up, if any. ``resume``: ``--resume``; ``patience``: ``--patience``
    (a finished run asked again with another one may not be extended); ``rank``: this process's."""

    def __init__(self, out: Path, state: TrainerState, recipe: Recipe, fingerprint: str, total_steps: int,
                 resume: bool, patience: int | None, rank: int = 0):
        self.out, self.state, self.recipe, self.fingerprint = out, state, recipe, fingerprint
        self.total_steps, self.resume, self.patience, self.rank = total_steps, resume, patience, rank

    def previous(self) -> dict | None:
        """The state of the newest complete step of an earlier call of this run, to resume from. A folder
        holding another run is refused, with or without --no-resume: that starts this very run over."""
        prev = self.state.latest()
        if prev is None:
            if self.meta_file() is not None:
                return self._finished_without_state() if self.resume else self._check_same_finished_run()
            return None
        if prev.get("run_fingerprint") != self.fingerprint or prev.get("recipe", self.recipe.name) != self.recipe.name:
            raise self.another_run()
        if not self.resume:
            return None
        if prev["folder"] is None and prev["step"] < self.total_steps:
            raise MemdecError(f"{self.state.dir} was written by an older memdec and cannot be resumed; "
                              f"delete {self.out} (or use --no-resume) to start over")
        if prev["folder"] is not None:  # read before any model loads: a bad file is one line, at once
            if prev.get("best") is not None:
                check_field(prev, f"best.{self.recipe.select}", prev["folder"] / "state.json", SCORE)
            prev["rng_file"] = prev["folder"] / f"rng-{self.rank}.json"
            prev["rng"] = read_rng_json(prev["rng_file"], prev["step"])
        return prev

    def meta_file(self) -> Path | None:
        """The metadata file of a finished checkpoint in ``--out`` (this recipe's first; any recipe's
        marks the folder as memdec's), or None."""
        names = dict.fromkeys([self.recipe.meta_file, *self.recipe.meta_files, *CHECKPOINT_META_FILES])
        return next((self.out / n for n in names if (self.out / n).is_file()), None)

    def another_run(self) -> MemdecError:
        return MemdecError(f"{self.out} holds a checkpoint of another run (other datastore, settings or method); "
                           f"choose another --out, or delete {self.out} to start over (--no-resume starts over the "
                           f"same run only)")

    def _check_same_finished_run(self) -> None:
        """--no-resume over a finished checkpoint without trainer state: None (start over) when it is this
        very run (its recipe's metadata, its ``run_fingerprint``); MemdecError when it is another run."""
        file = self.meta_file()
        meta = read_json_object(file, file.name)
        others = [n for n in CHECKPOINT_META_FILES if n not in self.recipe.meta_files and (self.out / n).is_file()]
        if others or meta.get("run_fingerprint") != self.fingerprint:
            raise self.another_run()

    def _finished_without_state(self) -> dict:
        """A finished run whose ``trainer_state/`` was dropped (no --keep-trainer-state): this very run
        asked again is done (``folder`` None); asked to train further, or another run, one line."""
        file = self.meta_file()
        meta = read_json_object(file, file.name)
        if "dropped_trainer_state_at" not in meta:
            raise MemdecError(f"{self.out} holds a finished checkpoint without trainer state; choose another --out")
        step = check_field(meta, "dropped_trainer_state_at", file, COUNT)
        if check_field(meta, "run_fingerprint", file, TEXT) != self.fingerprint:
            raise self.another_run()
        patience = (meta.get("train_config") or {}).get("patience")
        if step < self.total_steps and patience != self.patience:
            raise MemdecError(f"{self.out}: this run finished at step {step} and its trainer state was dropped (it ran "
                              f"without --keep-trainer-state), so it cannot be extended to step {self.total_steps}; "
                              f"train into a new --out, with --keep-trainer-state to extend it later")
        return {"step": step, "folder": None}


def load_resumed(previous: dict, optimizer, scheduler, state_dir: Path) -> None:
    """Optimizer, scheduler and RNG states of ``previous`` (``RunFolder.previous``'s step; weights are
    loaded before ``prepare``)."""
    load_optimizer_state(previous["folder"], previous["step"], optimizer, scheduler, state_dir)
    restore_rng_state(previous["rng_file"], previous["rng"])


def load_step_weights(model, folder: Path, recipe: Recipe, shape: DecoderShape, own_only: bool,
                      state_dir: Path) -> None:
    """The weights of the step ``folder`` into ``model``: the recipe's, or a shape's own tensors
    (``state.OWN_STEP_WEIGHTS``, where ``own_only``); MemdecError where they do not fit."""
    if not own_only:
        recipe.load_weights(model, folder)
        return
    file = folder / OWN_STEP_WEIGHTS
    saved, own = load_safetensors(file), shape.own_tensors(model)
    if saved.keys() != own.keys() or any(saved[k].shape != own[k].shape for k in own):
        raise MemdecError(f"{file}: the saved tensors do not fit the {shape.spec} decoder "
                          f"(delete {state_dir} or use --no-resume to start over)")
    model.load_state_dict(saved, strict=False)
